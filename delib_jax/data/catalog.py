"""TensorFlow Datasets catalog datasets by name, read from a local TFDS data folder you prepared (nothing is
downloaded here, TensorFlow is never imported).

    tfds build beans --data_dir ~/tensorflow_datasets --file_format array_record     # once, where TFDS runs
    ds = load_catalog("beans", "~/tensorflow_datasets")      # NAME[/CONFIG][:VERSION]; an ImageDataset
    ds = load_dataset("tfds", "~/tensorflow_datasets", options={"name": "beans:0.1.0"})

Any dataset with an image feature and a class-label feature: the features are found from the dataset's own
description (its ``supervised_keys``, else its only `Image` and `ClassLabel` features), or named. Its splits are
mapped by name (train / training; validation / valid / val / dev; test / testing) to train, val and test; a missing
val or test split is carved from train as for class folders (`delib_jax.data.images.carve`); other splits are
left out, said in one line, unless ``splits`` maps them. The prepared folder must hold ArrayRecord files (random
access); the dataset's version defaults to the newest prepared one, and the run records the one read.

The labels are read once from every record (the images stay encoded); the pipelines then fetch each image by random
access (`CatalogRecords`), so batches are deterministic and resumable exactly as for the other datasets.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from delib_jax.data._text import DatasetError, fail
from delib_jax.data.images import (
    DEFAULT_TEST_FRACTION,
    DEFAULT_VAL_FRACTION,
    SPLITS,
    ImageDataset,
    Names,
    carve,
    check_classes,
    check_fractions,
    split_name,
    with_options,
)

_VERSION = re.compile(r"^\d+\.\d+\.\d+$")
_NAME = re.compile(r"^(?P<name>[A-Za-z0-9_]+)(?:/(?P<config>[^:/]+))?(?::(?P<version>[^:/]+))?$")
_CHUNK = 256  # records read at once to collect the labels


def default_data_dir() -> Path:
    """Where ``tfds.load`` looks by default: ``$TFDS_DATA_DIR``, else ``~/tensorflow_datasets``."""
    return Path(os.environ.get("TFDS_DATA_DIR") or "~/tensorflow_datasets").expanduser()


def parse_name(spec: str) -> tuple[str, str | None, str | None]:
    """``NAME[/CONFIG][:VERSION]`` -> (name, config or None, version or None); ValueError otherwise."""
    m = _NAME.match(spec.strip())
    if not m or (m["version"] is not None and not _VERSION.match(m["version"])):
        raise ValueError(f"{spec!r} is not a TFDS dataset name NAME[/CONFIG][:VERSION] (e.g. beans, cifar10:3.0.2)")
    return m["name"], m["config"], m["version"]


def _version_key(v: str) -> tuple[int, ...]:
    return tuple(int(x) for x in v.split("."))


def _versions(folder: Path) -> list[str]:
    """Prepared version folders (holding dataset_info.json) of ``folder``, oldest first."""
    if not folder.is_dir():
        return []
    found = [p.name for p in folder.iterdir() if _VERSION.match(p.name) and (p / "dataset_info.json").is_file()]
    return sorted(found, key=_version_key)


def find_prepared(spec: str, data_dir: str | Path) -> tuple[Path, str | None]:
    """The version folder of the prepared dataset ``spec`` (NAME[/CONFIG][:VERSION]) in the TFDS ``data_dir``,
    ``DATA_DIR/NAME[/CONFIG]/VERSION`` (the newest version when none is given), and its config (None: the dataset has
    none). `DatasetError` (one line) when the folder does not hold it, naming what it holds."""
    name, config, version = parse_name(spec)
    data_dir = Path(data_dir).expanduser()
    if not data_dir.is_dir():
        raise fail(data_dir, "no such TFDS data folder (give --tfds-data-dir, the folder tfds build prepared into)")
    dataset = data_dir / name
    prepare = f"prepare it there first (tfds build {name} --data_dir {data_dir} --file_format array_record)"
    if not dataset.is_dir():
        held = sorted(p.name for p in data_dir.iterdir() if p.is_dir() and not p.name.startswith(("_", ".")))
        holds = f"it holds {', '.join(held[:10])}" + (" ..." if len(held) > 10 else "") if held else "it holds none"
        raise fail(data_dir, f"no prepared TFDS dataset {name!r} ({holds}): {prepare}")
    configs = sorted(p.name for p in dataset.iterdir() if p.is_dir() and _versions(p))
    if config is None:
        if _versions(dataset):
            folder = dataset
        elif len(configs) == 1:
            folder, config = dataset / configs[0], configs[0]
        elif configs:
            raise fail(dataset, f"prepared in several configs ({', '.join(configs)}): give {name}/CONFIG")
        else:
            raise fail(dataset, f"no prepared version (no VERSION/dataset_info.json): {prepare}")
    else:
        folder = dataset / config
        if not _versions(folder):
            there = f"its prepared configs: {', '.join(configs)}" if configs else "no config is prepared"
            raise fail(dataset, f"config {config!r} is not prepared ({there})")
    versions = _versions(folder)
    if version is None:
        version = versions[-1]
    elif version not in versions:
        raise fail(folder, f"version {version} is not prepared (prepared: {', '.join(versions)})")
    return folder / version, config


class CatalogRecords:
    """Random access to the encoded images of a catalog dataset by example index: ``encoded(i)`` -> (image bytes,
    None), from the serialized records (only the image's bytes are taken out of each)."""

    def __init__(self, sources: Sequence, split: np.ndarray, key: np.ndarray, image_feature: str):
        self.sources, self.split, self.key = list(sources), np.asarray(split), np.asarray(key)
        self.image_feature = image_feature

    def __len__(self) -> int:
        return len(self.split)

    def encoded(self, index: int) -> tuple[bytes, None]:
        from tensorflow_datasets.proto import tf_example_pb2

        serialized = self.sources[int(self.split[index])][int(self.key[index])]
        feature = tf_example_pb2.Example.FromString(serialized).features.feature
        return feature[self.image_feature].bytes_list.value[0], None


def _feature(features, kind, given: str | None, role: str, preferred: str | None, title: str) -> str:
    """The name of the top-level feature of type ``kind`` to read as ``role``: ``given`` (checked), else
    ``preferred`` (the supervised key) if of that type, else the only one of that type."""
    import tensorflow_datasets as tfds

    items = dict(features.items()) if isinstance(features, tfds.features.FeaturesDict) else {}
    of_kind = sorted(k for k, f in items.items() if isinstance(f, kind) and (kind is not tfds.features.Image
                                                                             or len(f.shape) == 3))  # fmt: skip
    what = {"image": "an image feature (tfds.features.Image)", "label": "a class-label feature (ClassLabel)"}[role]
    several = {"image": "image features", "label": "class-label features"}[role]
    flag = f"--{role}-feature"
    if given is not None:
        if given not in items:
            raise DatasetError(f"{title} has no feature {given!r} ({flag}); its features: {', '.join(sorted(items))}")
        if given not in of_kind:
            found = type(items[given]).__name__
            others = f"; {', '.join(of_kind)} would do" if of_kind else ""
            raise DatasetError(f"{title}: feature {given!r} is a {found}, not {what}{others}")
        return given
    if preferred in of_kind:
        return preferred
    if len(of_kind) == 1:
        return of_kind[0]
    if not of_kind:
        raise DatasetError(f"{title} has no {what} among its features ({', '.join(sorted(items)) or 'none'})")
    raise DatasetError(f"{title} has several {several}, {', '.join(of_kind)}: name the one to read with {flag}")


def load_catalog(
    spec: str,
    data_dir: str | Path | None = None,
    *,
    image_feature: str | None = None,
    label_feature: str | None = None,
    splits: Mapping[str, str] | None = None,
    val_fraction: float = DEFAULT_VAL_FRACTION,
    test_fraction: float = DEFAULT_TEST_FRACTION,
    seed: int = 0,
) -> ImageDataset:
    """The prepared TFDS dataset ``spec`` (NAME[/CONFIG][:VERSION]) in ``data_dir`` (default `default_data_dir`) as
    an `ImageDataset` (module docstring).

    Args:
      image_feature, label_feature: the features to read (default: found from the dataset's description).
      splits: {'train' | 'val' | 'test': the dataset's split name} instead of the mapping by name.
      val_fraction, test_fraction, seed: how a missing val or test split is carved from train.

    Raises:
      DatasetError: one line: the folder does not hold the dataset (or that config or version), it was prepared as
        TFRecord, a feature is missing or of the wrong type, no train split, one class only, classes differing only
        in case.
    """
    check_fractions(val_fraction, test_fraction)
    path, config = find_prepared(spec, default_data_dir() if data_dir is None else data_dir)
    try:
        info = json.loads((path / "dataset_info.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise fail(path / "dataset_info.json", f"cannot read ({e})") from None
    name, version = parse_name(spec)[0], path.name
    full = f"{name}{'/' + config if config else ''}:{version}"
    title = f"the TFDS dataset {full} in {path.parents[1 if config is None else 2]}"
    stored = info.get("fileFormat", "tfrecord")
    if stored != "array_record":
        raise fail(path, f"prepared as {stored}; reading by random access needs ArrayRecord: prepare it again with "
                         f"tfds build {name} --file_format array_record")  # fmt: skip
    import tensorflow_datasets as tfds
    from tensorflow_datasets.core.decode import DeserializeMethod

    try:
        builder = tfds.builder_from_directory(path)
    except Exception as e:  # noqa: BLE001 -- TFDS raises many types for damaged metadata
        raise fail(path, f"cannot read the prepared dataset ({type(e).__name__}: {e})") from None
    features = builder.info.features
    keys = builder.info.supervised_keys if isinstance(builder.info.supervised_keys, tuple) else (None, None)
    image_feature = _feature(features, tfds.features.Image, image_feature, "image", keys[0], title)
    label_feature = _feature(features, tfds.features.ClassLabel, label_feature, "label", keys[1], title)
    class_names = tuple(str(n) for n in features[label_feature].names)
    check_classes(title, class_names)

    theirs = list(builder.info.splits)
    if splits is None:
        mapping: dict[str, str] = {}
        for s in theirs:
            ours = split_name(s)
            if ours is not None and ours not in mapping:
                mapping[ours] = s
    else:
        mapping = {split_name(k) or k: v for k, v in splits.items()}
        bad = [k for k in mapping if k not in SPLITS] + [v for v in mapping.values() if v not in theirs]
        if bad:
            raise DatasetError(f"{title}: cannot map splits {bad[0]!r}: ours are {', '.join(SPLITS)}, its "
                               f"{', '.join(theirs)}")  # fmt: skip
    if "train" not in mapping:
        raise DatasetError(f"{title}: no train split (its splits: {', '.join(theirs)}); map one with splits")
    order = [s for s in SPLITS if s in mapping]
    sources, labels, split_ix, keys_ix, names = [], [], [], [], []
    for j, ours in enumerate(order):
        source = builder.as_data_source(split=mapping[ours], deserialize_method=DeserializeMethod.RAW_BYTES)
        sources.append(source)
        n = len(source)
        labels.append(_labels(source, n, label_feature, path, mapping[ours]))
        split_ix.append(np.full(n, SPLITS.index(ours), np.int8))
        keys_ix.append(np.stack([np.full(n, j, np.int64), np.arange(n, dtype=np.int64)], axis=1))
        names += [f"{mapping[ours]}/{k}" for k in range(n)]
    labels_a = np.concatenate(labels)
    if len(labels_a) and (labels_a.min() < 0 or labels_a.max() >= len(class_names)):
        bad = int(labels_a[(labels_a < 0) | (labels_a >= len(class_names))][0])
        raise DatasetError(f"{title}: label {bad} outside its {len(class_names)} classes (an unlabelled split?)")
    if not len(labels_a):
        raise DatasetError(f"{title}: no examples in its splits {', '.join(mapping.values())}")
    where = np.concatenate(keys_ix)
    missing = [s for s in ("val", "test") if s not in mapping]
    split_a = carve(np.concatenate(split_ix), labels_a, names, missing=missing, val_fraction=val_fraction,
                    test_fraction=test_fraction, seed=seed)  # fmt: skip
    unused = [s for s in theirs if s not in mapping.values()]
    why = "not train, validation or test; --tfds-split maps one" if splits is None else "not mapped"
    notes = (f"left out of {title}: its splits {', '.join(unused)} ({why})",) if unused else ()
    options = {
        "name": full, "image_feature": image_feature,
        "label_feature": label_feature, "splits": mapping, "val_fraction": float(val_fraction),
        "test_fraction": float(test_fraction), "seed": int(seed),
    }  # fmt: skip
    return ImageDataset(
        kind="tfds", root=path, title=title, image_paths=Names(names, prefix=f"{path}::"), labels=labels_a,
        split=split_a, class_names=class_names, given=tuple(order), options=options,
        records=CatalogRecords(sources, where[:, 0], where[:, 1], image_feature), notes=notes,
    )  # fmt: skip


def _labels(source, n: int, feature: str, path: Path, split: str) -> np.ndarray:
    """(n,) int64 label of every record of one split, read from the serialized records."""
    from tensorflow_datasets.proto import tf_example_pb2

    out = np.empty(n, np.int64)
    for start in range(0, n, _CHUNK):
        keys = list(range(start, min(n, start + _CHUNK)))
        for k, serialized in zip(keys, source.__getitems__(keys)):
            values = tf_example_pb2.Example.FromString(serialized).features.feature[feature].int64_list.value
            if len(values) != 1:
                raise fail(path, f"record {k} of split {split} has {len(values)} values of {feature!r}, not one label")
            out[k] = values[0]
    return out


def names_same(given: str, recorded: str) -> bool:
    """Whether ``given`` (NAME[/CONFIG][:VERSION], as on a command line) names the ``recorded`` dataset
    (NAME[/CONFIG]:VERSION, as a run records it): a config or version left out matches any."""
    try:
        (a, ca, va), (b, cb, vb) = parse_name(given), parse_name(recorded)
    except ValueError:
        return False
    return a == b and (ca is None or ca == cb) and (va is None or va == vb)


def load(path: str | Path | None, options: Mapping[str, Any] | None = None) -> ImageDataset:
    """`load_catalog` with the TFDS data folder ``path`` and a run's recorded ``options`` (``name`` required)."""
    o = with_options(options, name=None, image_feature=None, label_feature=None, splits=None,
                     val_fraction=DEFAULT_VAL_FRACTION, test_fraction=DEFAULT_TEST_FRACTION, seed=0)  # fmt: skip
    if not o["name"]:
        raise ValueError("a TFDS catalog dataset needs its name (NAME[:VERSION], --tfds)")
    return load_catalog(o.pop("name"), path, **o)


__all__ = ["CatalogRecords", "default_data_dir", "find_prepared", "load", "load_catalog", "names_same", "parse_name"]
