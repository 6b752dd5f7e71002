"""CUB-200-2011 reader on generated trees in the release format, including the release's quirks and broken files."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from delib_jax.data import DatasetError, attribute_groups, cub, load_cub
from delib_jax.data.synthetic import make_cub

CLASSES, PER_CLASS = 3, 4


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cub")
    make_cub(out, classes=CLASSES, images_per_class=PER_CLASS, size=48, seed=3)
    return out


@pytest.fixture
def tree(pristine, tmp_path) -> Path:
    """A private copy of the generated tree (parent folder) that a test may break."""
    shutil.copytree(pristine, tmp_path / "t")
    return tmp_path / "t"


def _edit_line(path: Path, line: int, new: str) -> None:
    lines = path.read_text().splitlines()
    lines[line - 1] = new
    path.write_text("\n".join(lines) + "\n")


def test_loads_release_layout_from_root_and_parent(pristine):
    ds = load_cub(pristine)
    same = load_cub(pristine / "CUB_200_2011")
    n = CLASSES * PER_CLASS
    assert len(ds) == n and ds.num_classes == CLASSES
    assert ds.image_ids.tolist() == list(range(1, n + 1))
    assert ds.labels.tolist() == [c for c in range(CLASSES) for _ in range(PER_CLASS)]
    assert ds.is_train.tolist() == [True, True, True, False] * CLASSES
    assert ds.parts.shape == (n, 15, 2) and ds.part_visible.shape == (n, 15)
    assert ds.attributes.shape == (n, 312) and ds.attribute_certainty.shape == (n, 312)
    assert ds.class_attributes.shape == (CLASSES, 312)
    assert ds.part_names == cub.PART_NAMES and ds.attribute_names == cub.ATTRIBUTE_NAMES
    assert ds.certainty_names == ("not visible", "guessing", "probably", "definitely")
    assert all(Path(p).is_file() for p in ds.image_paths)
    assert (ds.parts[~ds.part_visible] == 0).all()
    np.testing.assert_array_equal(ds.attributes, same.attributes)


def test_byte_order_marks_are_ignored(pristine, tree):
    """Files saved by spreadsheet tools start with a UTF-8 byte-order mark: the same data."""
    root = tree / "CUB_200_2011"
    for name in ("images.txt", "classes.txt", "image_class_labels.txt", "parts/part_locs.txt"):
        path = root / name
        path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    ds, ref = load_cub(tree), load_cub(pristine)
    assert ds.class_names == ref.class_names and ds.image_ids.tolist() == ref.image_ids.tolist()
    np.testing.assert_array_equal(ds.parts, ref.parts)


def test_first_lines_parsed_exactly(pristine):
    root = pristine / "CUB_200_2011"
    ds = load_cub(root)
    _, part, x, y, vis = (root / "parts" / "part_locs.txt").read_text().splitlines()[1].split()
    assert part == "2"
    np.testing.assert_allclose(ds.parts[0, 1], [float(x), float(y)] if vis == "1" else [0, 0], rtol=0, atol=1e-4)
    box = [float(t) for t in (root / "bounding_boxes.txt").read_text().splitlines()[0].split()[1:]]
    np.testing.assert_allclose(ds.boxes[0], box, atol=1e-4)
    lines = (root / "attributes" / "image_attribute_labels.txt").read_text().splitlines()
    _, attr, present, certainty, _ = lines[312 + 8].split()  # image 2, attribute 9
    assert attr == "9"
    assert ds.attributes[1, 8] == (present == "1") and ds.attribute_certainty[1, 8] == int(certainty)
    first_row = [
        float(t) for t in (root / "attributes" / "class_attribute_labels_continuous.txt").read_text().split()[:312]
    ]
    np.testing.assert_allclose(ds.class_attributes[0], np.asarray(first_row) / 100, rtol=1e-6)


def test_attribute_groups_match_release_ranges():
    groups = attribute_groups(cub.ATTRIBUTE_NAMES)
    assert len(groups) == 28
    for group, (first, last) in {"bill_shape": (1, 9), "eye_color": (136, 149), "size": (218, 222),
                                 "shape": (223, 236), "wing_pattern": (309, 312)}.items():  # fmt: skip
        assert groups[group][0] + 1 == first and groups[group][-1] + 1 == last
    assert cub.ATTRIBUTE_NAMES[0] == "has_bill_shape::curved_(up_or_down)"
    assert cub.ATTRIBUTE_NAMES[311] == "has_wing_pattern::multi-colored"


def test_attributes_txt_inside_attributes_folder(tree):
    shutil.move(tree / "attributes.txt", tree / "CUB_200_2011" / "attributes" / "attributes.txt")
    assert load_cub(tree).attribute_names == cub.ATTRIBUTE_NAMES


def test_missing_attributes_txt(tree):
    (tree / "attributes.txt").unlink()
    with pytest.raises(DatasetError, match=r"attributes\.txt"):
        load_cub(tree)


def _renumber(root: Path, mapping: dict[int, int]) -> None:
    """Rewrite image ids (first field of every per-image file) through ``mapping``."""
    files = ["images.txt", "image_class_labels.txt", "train_test_split.txt", "bounding_boxes.txt",
             "parts/part_locs.txt", "parts/part_click_locs.txt", "attributes/image_attribute_labels.txt"]  # fmt: skip
    for name in files:
        path = root / name
        lines = [re.sub(r"^\d+", lambda m: str(mapping.get(int(m.group()), int(m.group()))), line)
                 for line in path.read_text().splitlines()]  # fmt: skip
        path.write_text("\n".join(lines) + "\n")


def test_release_six_field_lines(tree):
    root = tree / "CUB_200_2011"
    before = load_cub(tree)
    _renumber(root, {3: 2275, 4: 9364})
    path = root / "attributes" / "image_attribute_labels.txt"
    lines = path.read_text().splitlines()
    for i, line in enumerate(lines):
        if line.split()[0] in ("2275", "9364") and line.split()[1] in ("1", "57"):
            lines[i] = line + " 0"  # the release's 6-field lines
    path.write_text("\n".join(lines) + "\n")
    after = load_cub(tree)
    assert after.image_ids.tolist()[:5] == [1, 2, 2275, 9364, 5]
    np.testing.assert_array_equal(after.attributes, before.attributes)
    np.testing.assert_array_equal(after.attribute_certainty, before.attribute_certainty)
    np.testing.assert_array_equal(after.parts, before.parts)


def test_six_fields_elsewhere_is_an_error(tree):
    path = tree / "CUB_200_2011" / "attributes" / "image_attribute_labels.txt"
    line = path.read_text().splitlines()[700]
    _edit_line(path, 701, line + " 7")
    with pytest.raises(DatasetError, match=r"image_attribute_labels\.txt:701: expected 5 fields, found 6"):
        load_cub(tree)


@pytest.mark.parametrize(
    "name, line, new, message",
    [
        ("images.txt", 2, "2", "expected 2 fields"),
        ("images.txt", 3, "2 001.x/y.jpg", "duplicate image id 2"),
        ("images.txt", 3, "-3 001.x/y.jpg", "value -3 must be at least 1$"),
        ("classes.txt", 2, "3 002.Foo", "expected id 2"),
        ("image_class_labels.txt", 4, "4 9", r"outside \[1, 3\]"),
        ("train_test_split.txt", 1, "1 yes", "expected an integer"),
        ("bounding_boxes.txt", 5, "5 1.0 2.0 nan? 4.0", "expected a number"),
        ("parts/parts.txt", 15, "15", "expected 2 fields or more"),
        ("parts/part_locs.txt", 17, "2 2 1.0 2.0 3", r"outside \[0, 1\]"),
        ("parts/part_locs.txt", 20, "2 16 1.0 2.0 1", r"outside \[1, 15\]"),
        ("attributes/image_attribute_labels.txt", 1000, "4 64 1 x 2.0", "expected an integer, found 'x'"),
        ("attributes/image_attribute_labels.txt", 1001, "4 65 1 5 2.0", r"outside \[1, 4\]"),
        ("attributes/image_attribute_labels.txt", 1002, "4 64 1 2 2.0", "duplicate line for image id 4, attribute 64"),
        ("attributes/image_attribute_labels.txt", 1003, "4 67 1", "expected 5 fields, found 3"),
        ("attributes/image_attribute_labels.txt", 1004, "99 68 1 3 1.0", "unknown image id 99"),
        ("attributes/certainties.txt", 2, "7 guessing", "expected id 2"),
        ("attributes/class_attribute_labels_continuous.txt", 2, "1 2 3", "expected 312 fields, found 3"),
        ("attributes/class_attribute_labels_continuous.txt", 3, " ".join(["101"] * 312), r"\[0, 100\]"),
    ],
)
def test_malformed_line_names_file_and_line(tree, name, line, new, message):
    path = tree / "CUB_200_2011" / name
    _edit_line(path, line, new)
    with pytest.raises(DatasetError, match=re.escape(f"{path}:{line}:") + ".*" + message):
        load_cub(tree)


@pytest.mark.parametrize(
    "name, message",
    [
        ("image_class_labels.txt", "no line for image id 7"),
        ("parts/part_locs.txt", "no line for image id 7, part 1"),
        ("attributes/image_attribute_labels.txt", "no line for image id 7, attribute 1"),
        ("attributes/class_attribute_labels_continuous.txt", "expected 3 rows"),
    ],
)
def test_missing_lines(tree, name, message):
    path = tree / "CUB_200_2011" / name
    lines = path.read_text().splitlines()
    keep = [ln for ln in lines if not ln.startswith("7 ")] if "continuous" not in name else lines[:-1]
    path.write_text("\n".join(keep) + "\n")
    with pytest.raises(DatasetError, match=re.escape(str(path)) + ".*" + message):
        load_cub(tree)


@pytest.mark.parametrize("name", ["images.txt", "parts/parts.txt", "attributes/certainties.txt", "bounding_boxes.txt",
                                  "attributes/image_attribute_labels.txt"])  # fmt: skip
def test_missing_file_is_named(tree, name):
    path = tree / "CUB_200_2011" / name
    path.unlink()
    with pytest.raises(DatasetError, match=re.escape(str(path) if name != "images.txt" else str(tree))):
        load_cub(tree)
