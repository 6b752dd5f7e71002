"""CUB-200-2011 reader for the official release layout (``CUB_200_2011.tgz``).

All ids in the release are 1-based; everything returned here is 0-based (``labels``, part and attribute axes). Part
locations are kept in the release's pixel units, in the project's convention (see `delib_jax.data.transforms`):
``(x, y)`` with the top-left image corner at ``(0, 0)`` and pixel ``(i, j)`` covering ``[j, j + 1) x [i, i + 1)``.
Invisible parts read ``(0, 0)`` with ``part_visible`` False, as in the release.

Example::

    ds = load_cub("/data/CUB_200_2011")      # or its parent folder
    train = np.flatnonzero(ds.is_train)
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

import numpy as np

from delib_jax.data._text import DatasetError, fail, read_text, require_file, rows, to_float, to_int

PART_NAMES: tuple[str, ...] = (
    "back", "beak", "belly", "breast", "crown", "forehead", "left eye", "left leg", "left wing", "nape",
    "right eye", "right leg", "right wing", "tail", "throat",
)  # fmt: skip

COLOR_VALUES: tuple[str, ...] = (
    "blue", "brown", "iridescent", "purple", "rufous", "grey", "yellow", "olive", "green", "pink", "orange", "black",
    "white", "red", "buff",
)  # fmt: skip
PATTERN_VALUES: tuple[str, ...] = ("solid", "spotted", "striped", "multi-colored")

# (group, values) in release order; attribute ids run 1..312 through them.
ATTRIBUTE_GROUPS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("bill_shape", ("curved_(up_or_down)", "dagger", "hooked", "needle", "hooked_seabird", "spatulate", "all-purpose",
                    "cone", "specialized")),
    ("wing_color", COLOR_VALUES),
    ("upperparts_color", COLOR_VALUES),
    ("underparts_color", COLOR_VALUES),
    ("breast_pattern", PATTERN_VALUES),
    ("back_color", COLOR_VALUES),
    ("tail_shape", ("forked_tail", "rounded_tail", "notched_tail", "fan-shaped_tail", "pointed_tail", "squared_tail")),
    ("upper_tail_color", COLOR_VALUES),
    ("head_pattern", ("spotted", "malar", "crested", "masked", "unique_pattern", "eyebrow", "eyering", "plain",
                      "eyeline", "striped", "capped")),
    ("breast_color", COLOR_VALUES),
    ("throat_color", COLOR_VALUES),
    ("eye_color", tuple(c for c in COLOR_VALUES if c != "iridescent")),
    ("bill_length", ("about_the_same_as_head", "longer_than_head", "shorter_than_head")),
    ("forehead_color", COLOR_VALUES),
    ("under_tail_color", COLOR_VALUES),
    ("nape_color", COLOR_VALUES),
    ("belly_color", COLOR_VALUES),
    ("wing_shape", ("rounded-wings", "pointed-wings", "broad-wings", "tapered-wings", "long-wings")),
    ("size", ("large_(16_-_32_in)", "small_(5_-_9_in)", "very_large_(32_-_72_in)", "medium_(9_-_16_in)",
              "very_small_(3_-_5_in)")),
    ("shape", ("upright-perching_water-like", "chicken-like-marsh", "long-legged-like", "duck-like", "owl-like",
               "gull-like", "hummingbird-like", "pigeon-like", "tree-clinging-like", "hawk-like", "sandpiper-like",
               "upland-ground-like", "swallow-like", "perching-like")),
    ("back_pattern", PATTERN_VALUES),
    ("tail_pattern", PATTERN_VALUES),
    ("belly_pattern", PATTERN_VALUES),
    ("primary_color", COLOR_VALUES),
    ("leg_color", COLOR_VALUES),
    ("bill_color", COLOR_VALUES),
    ("crown_color", COLOR_VALUES),
    ("wing_pattern", PATTERN_VALUES),
)  # fmt: skip

ATTRIBUTE_NAMES: tuple[str, ...] = tuple(f"has_{g}::{v}" for g, values in ATTRIBUTE_GROUPS for v in values)

CERTAINTY_NAMES: tuple[str, ...] = ("not visible", "guessing", "probably", "definitely")

# Part -> the attribute groups that describe it (ground truth of the evaluation protocol). upperparts/underparts
# colour, size, shape and primary colour describe no single part.
PART_ATTRIBUTE_GROUPS: dict[str, tuple[str, ...]] = {
    "back": ("back_color", "back_pattern"),
    "beak": ("bill_shape", "bill_length", "bill_color"),
    "belly": ("belly_color", "belly_pattern"),
    "breast": ("breast_pattern", "breast_color"),
    "crown": ("head_pattern", "forehead_color", "crown_color"),
    "forehead": ("head_pattern", "forehead_color"),
    "left eye": ("eye_color", "head_pattern"),
    "left leg": ("leg_color",),
    "left wing": ("wing_color", "wing_shape", "wing_pattern"),
    "nape": ("nape_color",),
    "right eye": ("eye_color", "head_pattern"),
    "right leg": ("leg_color",),
    "right wing": ("wing_color", "wing_shape", "wing_pattern"),
    "tail": ("tail_shape", "upper_tail_color", "under_tail_color", "tail_pattern"),
    "throat": ("head_pattern", "throat_color"),
}

# Image ids whose lines in attributes/image_attribute_labels.txt carry a 6th field in the release.
SIX_FIELD_IMAGE_IDS: frozenset[int] = frozenset({2275, 9364})


@dataclasses.dataclass(frozen=True)
class CubDataset:
    """The CUB-200-2011 annotations, N images in ``images.txt`` order, C classes, A attributes, 15 parts.

    Attributes:
      root: the ``CUB_200_2011`` folder.
      image_ids: (N,) int64, the release's 1-based image ids.
      image_paths: N absolute image paths.
      labels: (N,) int64 class index in [0, C).
      is_train: (N,) bool, the official split.
      boxes: (N, 4) float32 ``(x, y, w, h)`` in pixels.
      parts: (N, 15, 2) float32 ``(x, y)`` in pixels; ``(0, 0)`` where invisible.
      part_visible: (N, 15) bool.
      attributes: (N, A) bool, image-level ``is_present``.
      attribute_certainty: (N, A) int64 certainty id (1 not visible .. 4 definitely, see ``certainty_names``).
      class_attributes: (C, A) float32 in [0, 1], the class-level continuous attribute percentages / 100.
      class_names: C names (``"001.Black_footed_Albatross"``).
      part_names: 15 part names.
      attribute_names: A names (``"has_bill_shape::dagger"``).
      certainty_names: names of certainty ids 1, 2, ...
      records: None for a release folder (images are the files ``image_paths``); for a TFDS build
        (`delib_jax.data.tfds`) the random-access records the encoded images are read from (``image_paths`` then only
        name them).
    """

    root: Path
    image_ids: np.ndarray
    image_paths: tuple[str, ...]
    labels: np.ndarray
    is_train: np.ndarray
    boxes: np.ndarray
    parts: np.ndarray
    part_visible: np.ndarray
    attributes: np.ndarray
    attribute_certainty: np.ndarray
    class_attributes: np.ndarray
    class_names: tuple[str, ...]
    part_names: tuple[str, ...]
    attribute_names: tuple[str, ...]
    certainty_names: tuple[str, ...]
    records: Any = None

    def __len__(self) -> int:
        return len(self.image_paths)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def attribute_groups(attribute_names: tuple[str, ...] | list[str]) -> dict[str, np.ndarray]:
    """Map each group (``"bill_shape"``) to the 0-based indices of its attributes, in order of first appearance.

    Names are ``"has_<group>::<value>"`` as in ``attributes.txt``; the ``has_`` prefix is dropped from group names.
    """
    groups: dict[str, list[int]] = {}
    for i, name in enumerate(attribute_names):
        group = name.split("::", 1)[0]
        groups.setdefault(group.removeprefix("has_"), []).append(i)
    return {g: np.asarray(ix, dtype=np.int64) for g, ix in groups.items()}


def find_cub_root(path: str | Path) -> Path:
    """The ``CUB_200_2011`` folder, given it or its parent; `DatasetError` if neither holds ``images.txt``."""
    path = Path(path)
    for candidate in (path, path / "CUB_200_2011"):
        if (candidate / "images.txt").is_file():
            return candidate
    raise fail(path, "not a CUB-200-2011 release: no images.txt here or in CUB_200_2011/")


def find_attributes_txt(root: Path) -> Path:
    """``attributes.txt``: in ``attributes/`` (as the README says) or beside ``CUB_200_2011/`` (as in the tarball)."""
    for candidate in (root / "attributes" / "attributes.txt", root.parent / "attributes.txt", root / "attributes.txt"):
        if candidate.is_file():
            return candidate
    raise fail(root / "attributes" / "attributes.txt", f"file not found (nor at {root.parent / 'attributes.txt'})")


def _id_names(path: Path) -> tuple[str, ...]:
    """Read ``<id> <name with spaces>`` lines whose ids must run 1..K in order."""
    names = []
    for line, (id_, name) in rows(path, fields=2, rest=True):
        if to_int(path, line, id_) != len(names) + 1:
            raise fail(path, f"expected id {len(names) + 1}, found {id_}", line)
        names.append(name.strip())
    if not names:
        raise fail(path, "file is empty")
    return tuple(names)


def _per_image(path: Path, index: dict[int, int], fields: int, parse) -> list:
    """Read a file of one line per image (first field the image id); every image exactly once, in any order."""
    values: list = [None] * len(index)
    for line, parts in rows(path, fields=fields):
        image_id = to_int(path, line, parts[0])
        if image_id not in index:
            raise fail(path, f"unknown image id {image_id}", line)
        i = index[image_id]
        if values[i] is not None:
            raise fail(path, f"duplicate line for image id {image_id}", line)
        values[i] = parse(line, parts[1:])
    for image_id, i in index.items():
        if values[i] is None:
            raise fail(path, f"no line for image id {image_id}")
    return values


def _read_images(path: Path) -> tuple[np.ndarray, list[str]]:
    ids, paths, seen = [], [], set()
    for line, (id_, rel) in rows(path, fields=2):
        image_id = to_int(path, line, id_, low=1)
        if image_id in seen:
            raise fail(path, f"duplicate image id {image_id}", line)
        seen.add(image_id)
        ids.append(image_id)
        paths.append(rel)
    if not ids:
        raise fail(path, "file is empty")
    return np.asarray(ids, dtype=np.int64), paths


def _read_part_locs(path: Path, index: dict[int, int], num_parts: int) -> tuple[np.ndarray, np.ndarray]:
    locs = np.zeros((len(index), num_parts, 2), np.float32)
    visible = np.zeros((len(index), num_parts), bool)
    seen = np.zeros((len(index), num_parts), bool)
    for line, (id_, part, x, y, vis) in rows(path, fields=5):
        image_id = to_int(path, line, id_)
        if image_id not in index:
            raise fail(path, f"unknown image id {image_id}", line)
        i, p = index[image_id], to_int(path, line, part, low=1, high=num_parts) - 1
        if seen[i, p]:
            raise fail(path, f"duplicate line for image id {image_id}, part {p + 1}", line)
        seen[i, p] = True
        locs[i, p] = to_float(path, line, x), to_float(path, line, y)
        visible[i, p] = to_int(path, line, vis, low=0, high=1) == 1
    if not seen.all():
        i, p = np.argwhere(~seen)[0]
        image_id = next(k for k, v in index.items() if v == i)
        raise fail(path, f"no line for image id {image_id}, part {p + 1}")
    locs[~visible] = 0.0
    return locs, visible


_SIX_FIELDS = re.compile(rb"^[ \t]*(\S+)(?:[ \t]+\S+){5,}[ \t]*\r?$", re.MULTILINE)


def _read_image_attributes(
    path: Path, index: dict[int, int], num_attributes: int, num_certainties: int
) -> tuple[np.ndarray, np.ndarray]:
    """``<image_id> <attr_id> <is_present> <certainty_id> <time>``, with the release's two 6-field lines tolerated.

    The file has N x A lines (3.7 M in the release): a vectorised parse first, then a line-by-line scan that names the
    first bad line if the fast parse fails or the table is inconsistent.
    """
    require_file(path)
    data = path.read_bytes()
    for m in _SIX_FIELDS.finditer(data):
        if m.group(0).split().__len__() != 6 or _int_or_none(m.group(1)) not in SIX_FIELD_IMAGE_IDS:
            raise _first_bad_attribute_line(path, index, num_attributes, num_certainties)
    try:
        table = np.loadtxt(path, dtype=np.int64, usecols=(0, 1, 2, 3), comments=None, ndmin=2, encoding="utf-8")
    except ValueError:
        raise _first_bad_attribute_line(path, index, num_attributes, num_certainties) from None
    if table.shape[0] != len(index) * num_attributes:
        raise _first_bad_attribute_line(path, index, num_attributes, num_certainties)
    ids = np.asarray(sorted(index), dtype=np.int64)
    pos = np.searchsorted(ids, table[:, 0])
    pos = np.minimum(pos, len(ids) - 1)
    attr = table[:, 1] - 1
    ok = (
        (ids[pos] == table[:, 0])
        & (attr >= 0) & (attr < num_attributes)
        & ((table[:, 2] == 0) | (table[:, 2] == 1))
        & (table[:, 3] >= 1) & (table[:, 3] <= num_certainties)
    )  # fmt: skip
    if not ok.all():
        raise _first_bad_attribute_line(path, index, num_attributes, num_certainties)
    order = np.asarray([index[i] for i in ids.tolist()], dtype=np.int64)[pos]
    flat = order * num_attributes + attr
    if np.bincount(flat, minlength=len(index) * num_attributes).max() != 1:
        raise _first_bad_attribute_line(path, index, num_attributes, num_certainties)
    present = np.zeros(len(index) * num_attributes, bool)
    certainty = np.zeros(len(index) * num_attributes, np.int64)
    present[flat] = table[:, 2] == 1
    certainty[flat] = table[:, 3]
    return present.reshape(len(index), num_attributes), certainty.reshape(len(index), num_attributes)


def _int_or_none(token: bytes) -> int | None:
    try:
        return int(token)
    except ValueError:
        return None


def _first_bad_attribute_line(
    path: Path, index: dict[int, int], num_attributes: int, num_certainties: int
) -> DatasetError:
    """Slow exact scan of ``image_attribute_labels.txt``: the `DatasetError` for its first bad line."""
    seen = set()
    for number, line in enumerate(read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.split()
        image_id = _int_or_none(parts[0].encode()) if parts else None
        if not (len(parts) == 5 or (len(parts) == 6 and image_id in SIX_FIELD_IMAGE_IDS)):
            return fail(path, f"expected 5 fields, found {len(parts)}: {line!r}", number)
        try:
            image_id = to_int(path, number, parts[0])
            attr = to_int(path, number, parts[1], low=1, high=num_attributes)
            to_int(path, number, parts[2], low=0, high=1)
            to_int(path, number, parts[3], low=1, high=num_certainties)
        except DatasetError as e:
            return e
        if image_id not in index:
            return fail(path, f"unknown image id {image_id}", number)
        if (image_id, attr) in seen:
            return fail(path, f"duplicate line for image id {image_id}, attribute {attr}", number)
        seen.add((image_id, attr))
    for image_id in index:
        for attr in range(1, num_attributes + 1):
            if (image_id, attr) not in seen:
                return fail(path, f"no line for image id {image_id}, attribute {attr}")
    return fail(path, "could not be parsed")


def _read_class_attributes(path: Path, num_classes: int, num_attributes: int) -> np.ndarray:
    values = []
    for line, parts in rows(path, fields=num_attributes):
        row = [to_float(path, line, t) for t in parts]
        if min(row) < 0.0 or max(row) > 100.0:
            raise fail(path, "percentages must lie in [0, 100]", line)
        values.append(row)
    if len(values) != num_classes:
        raise fail(path, f"expected {num_classes} rows (one per class), found {len(values)}")
    return np.asarray(values, dtype=np.float32) / 100.0


def load_cub(path: str | Path) -> CubDataset:
    """Read a CUB-200-2011 release.

    Args:
      path: the ``CUB_200_2011`` folder or its parent.

    Returns:
      a `CubDataset` (N images, C classes, A attributes).

    Raises:
      DatasetError: a file is missing or a line is malformed; the message names the file and line.
    """
    root = find_cub_root(path)
    ids, rel_paths = _read_images(root / "images.txt")
    index = {int(i): k for k, i in enumerate(ids)}
    class_names = _id_names(root / "classes.txt")
    num_classes = len(class_names)

    p = root / "image_class_labels.txt"
    labels = _per_image(p, index, 2, lambda ln, f: to_int(p, ln, f[0], low=1, high=num_classes) - 1)
    s = root / "train_test_split.txt"
    is_train = _per_image(s, index, 2, lambda ln, f: to_int(s, ln, f[0], low=0, high=1) == 1)
    b = root / "bounding_boxes.txt"
    boxes = _per_image(b, index, 5, lambda ln, f: [to_float(b, ln, t) for t in f])

    part_names = _id_names(root / "parts" / "parts.txt")
    parts, part_visible = _read_part_locs(root / "parts" / "part_locs.txt", index, len(part_names))

    attribute_names = tuple(n.split()[0] if n.split() else n for n in _id_names(find_attributes_txt(root)))
    certainty_names = _id_names(root / "attributes" / "certainties.txt")
    attributes, certainty = _read_image_attributes(
        root / "attributes" / "image_attribute_labels.txt", index, len(attribute_names), len(certainty_names)
    )
    class_attributes = _read_class_attributes(
        root / "attributes" / "class_attribute_labels_continuous.txt", num_classes, len(attribute_names)
    )
    images = root / "images"
    return CubDataset(
        root=root,
        image_ids=ids,
        image_paths=tuple(str(images / r) for r in rel_paths),
        labels=np.asarray(labels, dtype=np.int64),
        is_train=np.asarray(is_train, dtype=bool),
        boxes=np.asarray(boxes, dtype=np.float32).reshape(len(ids), 4),
        parts=parts,
        part_visible=part_visible,
        attributes=attributes,
        attribute_certainty=certainty,
        class_attributes=class_attributes,
        class_names=class_names,
        part_names=part_names,
        attribute_names=attribute_names,
        certainty_names=certainty_names,
    )
