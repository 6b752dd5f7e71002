"""ADE20K SceneParsing reader on generated trees: scene classes from training, unseen validation scenes, objectInfo."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from delib_jax.data import DatasetError, load_ade20k, read_object_info
from delib_jax.data.synthetic import OBJECT_NAMES, make_ade20k


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ade")
    make_ade20k(out, scenes=3, images_per_scene=4, size=40, seed=1, unseen_val_images=2)
    return out / "ADEChallengeData2016"


@pytest.fixture
def tree(pristine, tmp_path) -> Path:
    shutil.copytree(pristine, tmp_path / "ADEChallengeData2016")
    return tmp_path / "ADEChallengeData2016"


def test_scene_classes_from_training_and_unseen_val_dropped(pristine):
    ds = load_ade20k(pristine.parent)
    scenes = dict(line.split() for line in (pristine / "sceneCategories.txt").read_text().splitlines())
    train_stems = [s for s in scenes if s.startswith("ADE_train_")]
    assert ds.scene_names == tuple(sorted({scenes[s] for s in train_stems}))
    assert len(ds.scene_names) == 3
    assert ds.num_dropped_val == 2 and all(scenes[s] not in ds.scene_names for s in ds.dropped_val_stems)
    assert ds.is_train.sum() == 9 and (~ds.is_train).sum() == 3  # 4 per scene: 3 train + 1 val; 2 unseen dropped
    for stem, label, path, mask in zip(ds.stems, ds.labels, ds.image_paths, ds.mask_paths):
        assert ds.scene_names[label] == scenes[stem]
        assert Path(path).name == f"{stem}.jpg" and Path(mask).name == f"{stem}.png"
    assert ds.stems[: ds.is_train.sum()] == tuple(sorted(train_stems))
    m = np.asarray(Image.open(ds.mask_paths[0]))
    assert m.ndim == 2 and m.dtype == np.uint8 and m.max() <= 150


def test_object_info_txt_with_stray_spaces(pristine):
    text = (pristine / "objectInfo150.txt").read_text()
    assert text.startswith("Idx\tRatio\tTrain\tVal\tName\n")
    assert " \t" in text  # the generator reproduces the release's stray spaces
    info = load_ade20k(pristine).objects
    assert info.names == OBJECT_NAMES
    assert info.names[3] == "floor, flooring"  # a padded row
    assert info.train_count.shape == (150,) and info.ratio.dtype == np.float32


def test_object_info_counts_match_masks(pristine):
    ds = load_ade20k(pristine)
    counts = np.zeros(150, int)
    for mask, train in zip(ds.mask_paths, ds.is_train):
        if train:
            counts[np.unique(np.asarray(Image.open(mask)))[1:] - 1] += 1  # drop the 0 label when present
    m0 = [0 in np.unique(np.asarray(Image.open(m))) for m, t in zip(ds.mask_paths, ds.is_train) if t]
    assert all(m0)  # clutter is unlabelled in every image, so [1:] above drops exactly the 0
    np.testing.assert_array_equal(counts, ds.objects.train_count)


def test_object_info_csv_variant(tmp_path, pristine):
    make_ade20k(tmp_path, scenes=3, images_per_scene=4, size=40, seed=1, unseen_val_images=2, object_info="csv")
    root = tmp_path / "ADEChallengeData2016"
    assert not (root / "objectInfo150.txt").exists()
    csv_info = load_ade20k(root).objects
    txt_info = read_object_info(pristine / "objectInfo150.txt")
    assert csv_info.names[1] == "building;edifice"
    np.testing.assert_array_equal(csv_info.train_count, txt_info.train_count)
    np.testing.assert_array_equal(csv_info.ratio, txt_info.ratio)


def test_csv_with_quoted_names(tmp_path):
    path = tmp_path / "objectInfo150.csv"
    path.write_text('Idx,Ratio,Train,Val,Stuff,Name\n1, 0.1576 ,11664,1172,1,"wall, partition"\n')
    info = read_object_info(path)
    assert info.names == ("wall, partition",) and info.train_count.tolist() == [11664]


@pytest.mark.parametrize(
    "line, new, message",
    [
        (2, "1\t0.1\tmany\t3\twall", "expected an integer, found 'many'"),
        (3, "7\t0.1\t2\t3\tbuilding", "expected Idx 2, found 7"),
        (4, "3\t0.1\t2", "expected 5 fields, found 3"),
        (1, "Idx\tRatio\tTrain\tName", "header lacks column"),
    ],
)
def test_malformed_object_info(tree, line, new, message):
    path = tree / "objectInfo150.txt"
    lines = path.read_text().splitlines()
    lines[line - 1] = new
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DatasetError, match=re.escape(f"{path}:{line}:") + ".*" + message):
        load_ade20k(tree)


def test_malformed_scene_categories(tree):
    path = tree / "sceneCategories.txt"
    lines = path.read_text().splitlines()
    lines[4] = "ADE_train_00000005"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DatasetError, match=re.escape(f"{path}:5:") + " expected 2 fields, found 1"):
        load_ade20k(tree)


def test_image_without_scene_or_mask(tree):
    path = tree / "sceneCategories.txt"
    path.write_text("\n".join(ln for ln in path.read_text().splitlines() if not ln.startswith("ADE_val_00000001 ")))
    with pytest.raises(DatasetError, match="sceneCategories.txt: no scene label for image ADE_val_00000001"):
        load_ade20k(tree)


def test_missing_mask_and_missing_object_info(tree):
    (tree / "annotations" / "training" / "ADE_train_00000002.png").unlink()
    with pytest.raises(DatasetError, match=r"ADE_train_00000002\.png: annotation not found"):
        load_ade20k(tree)
    (tree / "objectInfo150.txt").unlink()
    with pytest.raises(DatasetError, match=r"objectInfo150\.txt: file not found"):
        load_ade20k(tree)
    with pytest.raises(DatasetError, match="not an ADEChallengeData2016 release"):
        load_ade20k(tree / "images")
