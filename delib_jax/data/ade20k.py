"""ADE20K SceneParsing reader (``ADEChallengeData2016``) for scene classification with object masks.

Layout: ``images/{training,validation}/ADE_{train,val}_NNNNNNNN.jpg``, ``annotations/<same split>/<same stem>.png``
(one channel, 0 = other, 1..150 = objects of ``objectInfo150``), ``sceneCategories.txt`` (``<stem> <scene>`` for both
splits) and ``objectInfo150.txt`` (tab-separated ``Idx Ratio Train Val Name``) or ``objectInfo150.csv``.

Scene classes are the labels that occur in the training split (sorted, 0-based ids). Validation images whose scene
never occurs in training cannot be scored and are dropped; `Ade20kDataset.dropped_val_stems` lists them.
Masks are read lazily (`delib_jax.data.pipeline.decode_mask`); only their paths are kept here.
"""

from __future__ import annotations

import csv
import dataclasses
import io
from pathlib import Path
from typing import Any

import numpy as np

from delib_jax.data._text import fail, read_text, rows, to_float, to_int

SPLITS = (("training", "train"), ("validation", "val"))


@dataclasses.dataclass(frozen=True)
class ObjectInfo:
    """The K (150) object classes; object ``k`` (0-based) has mask value ``k + 1``.

    Attributes:
      names: K names (the full ``Name`` field, e.g. ``"windowpane, window"``).
      ratio: (K,) float32 pixel ratio.
      train_count: (K,) int64 training images containing the object.
      val_count: (K,) int64 validation images containing the object.
    """

    names: tuple[str, ...]
    ratio: np.ndarray
    train_count: np.ndarray
    val_count: np.ndarray


@dataclasses.dataclass(frozen=True)
class Ade20kDataset:
    """ADE20K scene-parsing images with scene labels, N = training + kept validation images, S scenes.

    Attributes:
      root: the ``ADEChallengeData2016`` folder.
      stems: N file stems (``"ADE_train_00000001"``).
      image_paths: N absolute image paths.
      mask_paths: N absolute annotation PNG paths.
      labels: (N,) int64 scene id in [0, S).
      is_train: (N,) bool, True for the training split, False for validation.
      scene_names: S scene labels occurring in training, sorted.
      objects: the object vocabulary.
      dropped_val_stems: validation images dropped because their scene never occurs in training.
      records: None for a release folder (images and masks are the files of ``image_paths`` / ``mask_paths``); for a
        TFDS build (`delib_jax.data.tfds`) the random-access records they are read from (the paths then only name
        them).
    """

    root: Path
    stems: tuple[str, ...]
    image_paths: tuple[str, ...]
    mask_paths: tuple[str, ...]
    labels: np.ndarray
    is_train: np.ndarray
    scene_names: tuple[str, ...]
    objects: ObjectInfo
    dropped_val_stems: tuple[str, ...]
    records: Any = None

    def __len__(self) -> int:
        return len(self.stems)

    @property
    def num_classes(self) -> int:
        return len(self.scene_names)

    @property
    def num_dropped_val(self) -> int:
        """How many validation images were dropped for an unseen scene."""
        return len(self.dropped_val_stems)


def find_ade20k_root(path: str | Path) -> Path:
    """The ``ADEChallengeData2016`` folder, given it or its parent."""
    path = Path(path)
    for candidate in (path, path / "ADEChallengeData2016"):
        if (candidate / "sceneCategories.txt").is_file() and (candidate / "images").is_dir():
            return candidate
    raise fail(path, "not an ADEChallengeData2016 release: no sceneCategories.txt and images/ here or below")


def read_object_info(path: str | Path) -> ObjectInfo:
    """Parse ``objectInfo150.txt`` (tab-separated, stray spaces stripped) or ``objectInfo150.csv``.

    Columns are found by header name (``Idx``, ``Ratio``, ``Train``, ``Val``, ``Name``, any case); extra columns (the
    csv's ``Stuff``) are ignored. Ids must run 1..K.
    """
    path = Path(path)
    text = read_text(path)
    delimiter = "," if path.suffix.lower() == ".csv" else "\t"
    records = [
        (n, r)
        for n, r in enumerate(csv.reader(io.StringIO(text), delimiter=delimiter), start=1)
        if any(c.strip() for c in r)
    ]
    if not records:
        raise fail(path, "file is empty")
    header = [c.strip().lower() for c in records[0][1]]
    needed = ("idx", "ratio", "train", "val", "name")
    missing = [c for c in needed if c not in header]
    if missing:
        raise fail(path, f"header lacks column(s) {', '.join(missing)}: {records[0][1]!r}", records[0][0])
    col = {c: header.index(c) for c in needed}
    names, ratio, train, val = [], [], [], []
    for line, record in records[1:]:
        if len(record) < len(header):
            raise fail(path, f"expected {len(header)} fields, found {len(record)}: {record!r}", line)
        field = {c: record[i].strip() for c, i in col.items()}
        if to_int(path, line, field["idx"]) != len(names) + 1:
            raise fail(path, f"expected Idx {len(names) + 1}, found {field['idx']}", line)
        if not field["name"]:
            raise fail(path, "empty Name", line)
        names.append(field["name"])
        ratio.append(to_float(path, line, field["ratio"]))
        train.append(to_int(path, line, field["train"], low=0))
        val.append(to_int(path, line, field["val"], low=0))
    if not names:
        raise fail(path, "no object rows")
    return ObjectInfo(
        names=tuple(names),
        ratio=np.asarray(ratio, np.float32),
        train_count=np.asarray(train, np.int64),
        val_count=np.asarray(val, np.int64),
    )


def find_object_info(root: Path) -> Path:
    """``objectInfo150.txt``, else ``objectInfo150.csv``, in ``root`` or its parent."""
    for folder in (root, root.parent):
        for name in ("objectInfo150.txt", "objectInfo150.csv"):
            if (folder / name).is_file():
                return folder / name
    raise fail(root / "objectInfo150.txt", "file not found (nor objectInfo150.csv)")


def read_scene_categories(path: Path) -> dict[str, str]:
    """``<stem> <scene>`` lines -> ``{stem: scene}``; duplicates are errors."""
    scenes: dict[str, str] = {}
    for line, (stem, scene) in rows(path, fields=2):
        if stem in scenes:
            raise fail(path, f"duplicate stem {stem}", line)
        scenes[stem] = scene
    return scenes


def _split_files(root: Path, folder: str, prefix: str) -> list[str]:
    images = root / "images" / folder
    if not images.is_dir():
        raise fail(images, "folder not found")
    stems = sorted(
        p.stem for p in images.iterdir() if p.suffix.lower() == ".jpg" and p.stem.startswith(f"ADE_{prefix}_")
    )
    annotations = root / "annotations" / folder
    present = {p.name for p in annotations.iterdir()} if annotations.is_dir() else set()
    for stem in stems:
        if f"{stem}.png" not in present:
            raise fail(annotations / f"{stem}.png", "annotation not found for its image")
    return stems


def load_ade20k(path: str | Path) -> Ade20kDataset:
    """Read an ADEChallengeData2016 release.

    Args:
      path: the ``ADEChallengeData2016`` folder or its parent.

    Returns:
      an `Ade20kDataset`: training images then kept validation images, each split in file-name order.

    Raises:
      DatasetError: a file is missing or malformed (the message names the file and line), or an image has no scene.
    """
    root = find_ade20k_root(path)
    scene_file = root / "sceneCategories.txt"
    scenes = read_scene_categories(scene_file)
    objects = read_object_info(find_object_info(root))
    split_stems = {prefix: _split_files(root, folder, prefix) for folder, prefix in SPLITS}
    for stems in split_stems.values():
        for stem in stems:
            if stem not in scenes:
                raise fail(scene_file, f"no scene label for image {stem}")
    if not split_stems["train"]:
        raise fail(root / "images" / "training", "no training images")
    scene_names = tuple(sorted({scenes[s] for s in split_stems["train"]}))
    scene_id = {name: i for i, name in enumerate(scene_names)}
    kept_val = [s for s in split_stems["val"] if scenes[s] in scene_id]
    dropped = tuple(s for s in split_stems["val"] if scenes[s] not in scene_id)
    entries = [(s, "training", True) for s in split_stems["train"]] + [(s, "validation", False) for s in kept_val]
    return Ade20kDataset(
        root=root,
        stems=tuple(s for s, _, _ in entries),
        image_paths=tuple(str(root / "images" / f / f"{s}.jpg") for s, f, _ in entries),
        mask_paths=tuple(str(root / "annotations" / f / f"{s}.png") for s, f, _ in entries),
        labels=np.asarray([scene_id[scenes[s]] for s, _, _ in entries], dtype=np.int64),
        is_train=np.asarray([t for _, _, t in entries], dtype=bool),
        scene_names=scene_names,
        objects=objects,
        dropped_val_stems=dropped,
    )
