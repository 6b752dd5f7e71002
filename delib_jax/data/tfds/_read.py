"""Read a TFDS build back as the folder readers' `CubDataset` / `Ade20kDataset`, through ``tfds.data_sources``.

The annotations are read once from every record; the encoded images (and masks) are fetched by random access when
the pipeline asks for an example (`TfdsRecords.encoded`), so the grain pipelines stay random-access, deterministic
and resumable. Examples are ordered by their stored ``index``: the same order and indices as the folder reader, hence
the same batches for the same seed.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds
from tensorflow_datasets.core.decode import DeserializeMethod
from tensorflow_datasets.proto import tf_example_pb2

from delib_jax.data._text import DatasetError, fail
from delib_jax.data.ade20k import Ade20kDataset, ObjectInfo
from delib_jax.data.cub import CubDataset
from delib_jax.data.sources import TfdsBuild, find_tfds_builds
from delib_jax.data.tfds._builders import VERSION

# Which split of a build is the folder reader's training split.
TRAIN = "train"


class TfdsRecords:
    """Random access to the encoded images (and masks) of a TFDS build by dataset index.

    Args:
      sources: one ``tfds.data_sources`` source per split, images (and masks) left encoded.
      split: (N,) int64, the source holding each dataset index.
      key: (N,) int64, its position in that source.
      raw: the same sources returning the serialized records (``DeserializeMethod.RAW_BYTES``), from which `encoded`
        takes the image (and mask) bytes alone: TFDS's NumPy parsing of every feature of a record cost 0.27 ms per
        image, a fifth of a pre-resized image's whole input cost; this takes 0.03 ms. None: parse whole records.
    """

    def __init__(self, sources: Sequence, split: np.ndarray, key: np.ndarray, raw: Sequence | None = None):
        self.sources, self.split, self.key = list(sources), np.asarray(split), np.asarray(key)
        self.raw = None if raw is None else list(raw)

    def __len__(self) -> int:
        return len(self.split)

    def record(self, index: int) -> dict:
        """The whole record of dataset index ``index`` (image and mask as encoded bytes)."""
        return self.sources[int(self.split[index])][int(self.key[index])]

    def encoded(self, index: int) -> tuple[bytes, bytes | None]:
        """``(image bytes, mask bytes or None)`` of dataset index ``index``."""
        if self.raw is None:
            record = self.record(index)
            return record["image"], record.get("mask")
        serialized = self.raw[int(self.split[index])][int(self.key[index])]
        feature = tf_example_pb2.Example.FromString(serialized).features.feature
        mask = feature["mask"].bytes_list.value[0] if "mask" in feature else None
        return feature["image"].bytes_list.value[0], mask


def _text(value) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _find(path: str | Path) -> TfdsBuild:
    builds = find_tfds_builds(path)
    if len(builds) != 1:
        what = "no TFDS build of delib_jax's builders" if not builds else f"{len(builds)} TFDS builds"
        raise fail(path, f"{what} here (dataset_info.json): give the version folder of one build")
    return builds[0]


def _annotations(record: dict) -> dict:
    """A record without its encoded image and mask (read again by index when needed)."""
    return {k: v for k, v in record.items() if k not in ("image", "mask")}


def _read(build: TfdsBuild, decoders: dict) -> tuple[tfds.core.DatasetBuilder, list[dict], TfdsRecords, np.ndarray]:
    """The builder, every record's annotations in dataset-index order, the `TfdsRecords`, and (N,) bool "in the train
    split"."""
    if build.version != VERSION:
        raise fail(
            build.path,
            f"built by version {build.version} of the {build.name} builder; this code reads "
            f"{VERSION}: build it again (python -m delib_jax.data.tfds build)",
        )
    builder = tfds.builder_from_directory(build.path)
    names = list(builder.info.splits)
    sources = [builder.as_data_source(split=name, decoders=decoders) for name in names]
    rows = [(int(r["index"]), j, k, _annotations(r)) for j, s in enumerate(sources) for k, r in enumerate(s)]
    rows.sort(key=lambda r: r[0])
    index = np.asarray([r[0] for r in rows], np.int64)
    if not np.array_equal(index, np.arange(len(rows))):
        raise fail(build.path, "damaged build: the records' indices are not 0..N-1 once each; build it again")
    split = np.asarray([r[1] for r in rows], np.int64)
    raw = [builder.as_data_source(split=name, deserialize_method=DeserializeMethod.RAW_BYTES) for name in names]
    records = TfdsRecords(sources, split, np.asarray([r[2] for r in rows], np.int64), raw)
    examples = [r[3] for r in rows]
    is_train = np.asarray([names[j] == TRAIN for j in split], bool)
    return builder, examples, records, is_train


def _metadata(builder, build: TfdsBuild, keys: Sequence[str]) -> dict:
    meta = dict(builder.info.metadata or {})
    missing = [k for k in keys if k not in meta]
    if missing:
        raise fail(build.path, f"metadata.json lacks {', '.join(missing)}: not a complete {build.name} build")
    return meta


def load_cub_build(path: str | Path | TfdsBuild) -> CubDataset:
    """A ``delib_cub`` build as a `CubDataset` (``records`` set; ``image_paths`` name ``BUILD::images/...`` files)."""
    build = path if isinstance(path, TfdsBuild) else _find(path)
    builder, examples, records, is_train = _read(build, {"image": tfds.decode.SkipDecoding()})
    meta = _metadata(builder, build, ("part_names", "attribute_names", "certainty_names", "class_attributes"))
    n, p, a = len(examples), len(meta["part_names"]), len(meta["attribute_names"])

    def stack(key, dtype, shape):
        return np.asarray([e[key] for e in examples], dtype).reshape(n, *shape)

    return CubDataset(
        root=build.path,
        image_ids=stack("image_id", np.int64, ()),
        image_paths=tuple(f"{build.path}::images/{_text(e['file_name'])}" for e in examples),
        labels=stack("label", np.int64, ()),
        is_train=is_train,
        boxes=stack("bbox", np.float32, (4,)),
        parts=stack("parts", np.float32, (p, 2)),
        part_visible=stack("part_visible", bool, (p,)),
        attributes=stack("attributes", bool, (a,)),
        attribute_certainty=stack("attribute_certainty", np.int64, (a,)),
        class_attributes=np.asarray(meta["class_attributes"], np.float32),
        class_names=tuple(builder.info.features["label"].names),
        part_names=tuple(meta["part_names"]),
        attribute_names=tuple(meta["attribute_names"]),
        certainty_names=tuple(meta["certainty_names"]),
        records=records,
    )


def load_ade20k_build(path: str | Path | TfdsBuild) -> Ade20kDataset:
    """A ``delib_ade20k`` build as an `Ade20kDataset` (``records`` set; the paths name ``BUILD::STEM.jpg|png``)."""
    build = path if isinstance(path, TfdsBuild) else _find(path)
    skip = tfds.decode.SkipDecoding()
    builder, examples, records, is_train = _read(build, {"image": skip, "mask": skip})
    meta = _metadata(builder, build, ("object_names", "object_ratio", "object_train_count", "object_val_count",
                                      "dropped_val_stems"))  # fmt: skip
    stems = tuple(_text(e["file_name"]) for e in examples)
    return Ade20kDataset(
        root=build.path,
        stems=stems,
        image_paths=tuple(f"{build.path}::{s}.jpg" for s in stems),
        mask_paths=tuple(f"{build.path}::{s}.png" for s in stems),
        labels=np.asarray([e["label"] for e in examples], np.int64).reshape(len(examples)),
        is_train=is_train,
        scene_names=tuple(builder.info.features["label"].names),
        objects=ObjectInfo(
            names=tuple(meta["object_names"]),
            ratio=np.asarray(meta["object_ratio"], np.float32),
            train_count=np.asarray(meta["object_train_count"], np.int64),
            val_count=np.asarray(meta["object_val_count"], np.int64),
        ),
        dropped_val_stems=tuple(meta["dropped_val_stems"]),
        records=records,
    )


def load(path: str | Path | TfdsBuild) -> CubDataset | Ade20kDataset:
    """A build of either builder, read as the folder reader's dataset type."""
    build = path if isinstance(path, TfdsBuild) else _find(path)
    if build.dataset == "cub":
        return load_cub_build(build)
    if build.dataset == "ade20k":
        return load_ade20k_build(build)
    raise DatasetError(f"{build.path}: a TFDS build of {build.name}, not of delib_jax's builders")
