"""Synthetic datasets: complete release trees, byte-identical by seed, consistent annotations."""

from __future__ import annotations

import hashlib
import itertools
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from delib_jax.data import load_cub
from delib_jax.data import synthetic as S
from delib_jax.data.cub import PART_NAMES, attribute_groups

CUB_FILES = [
    "images.txt", "image_class_labels.txt", "train_test_split.txt", "classes.txt", "bounding_boxes.txt",
    "parts/parts.txt", "parts/part_locs.txt", "parts/part_click_locs.txt", "attributes/image_attribute_labels.txt",
    "attributes/certainties.txt", "attributes/class_attribute_labels_continuous.txt", "README",
]  # fmt: skip


def _digest(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def small_cub(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cub")
    S.make_cub(out, classes=4, images_per_class=5, size=64, seed=7)
    return out


def test_cub_tree_is_complete(small_cub):
    root = small_cub / "CUB_200_2011"
    assert (small_cub / "attributes.txt").is_file()
    for name in CUB_FILES:
        assert (root / name).is_file(), name
    jpgs = sorted((root / "images").rglob("*.jpg"))
    assert len(jpgs) == 20 and all(p.parent.name[:4] in ("001.", "002.", "003.", "004.") for p in jpgs)
    for p in jpgs[:3]:
        with Image.open(p) as im:
            assert im.format == "JPEG" and im.mode == "RGB" and im.size[0] == 64
    assert len((root / "parts" / "part_click_locs.txt").read_text().splitlines()) == 20 * 15 * 3
    assert (root / "attributes" / "certainties.txt").read_text().splitlines()[3] == "4 definitely"


def test_cub_is_byte_identical_by_seed(small_cub, tmp_path):
    S.make_cub(tmp_path / "a", classes=4, images_per_class=5, size=64, seed=7)
    S.make_cub(tmp_path / "b", classes=4, images_per_class=5, size=64, seed=8)
    assert _digest(tmp_path / "a") == _digest(small_cub)
    other = _digest(tmp_path / "b")
    assert other.keys() != _digest(small_cub).keys() or other != _digest(small_cub)


def test_class_percentages_are_what_was_drawn(small_cub):
    ds = load_cub(small_cub)
    for c in range(ds.num_classes):
        np.testing.assert_allclose(ds.class_attributes[c], ds.attributes[ds.labels == c].mean(0), atol=1e-6)
    groups = attribute_groups(ds.attribute_names)
    for g, ix in groups.items():  # one value per group, unless the group's part is out of sight
        per_image = ds.attributes[:, ix].sum(1)
        assert set(per_image.tolist()) <= {0, 1}, g
        hidden = per_image == 0
        assert (ds.attribute_certainty[hidden][:, ix] == 1).all()


def test_family_members_share_the_listed_regions_and_differ_elsewhere():
    classes, pairs = S.make_bird_classes(7, seed=0, family_size=3)
    families = [(0, 1, 2), (3, 4, 5), (6,)]
    assert [(a, b) for a, b, _ in pairs] == [p for f in families for p in itertools.combinations(f, 2)]
    for a, b, shared in pairs:
        assert 4 <= len(shared) <= 6
        assert shared == dict(((x, y), s) for x, y, s in pairs)[(families[a // 3][0], families[a // 3][1])]
        for region, groups in S.REGIONS.items():
            same = [classes[a].values[g] == classes[b].values[g] for g in groups]
            if region in shared:
                assert all(same), (a, b, region)
            else:  # every group with more values than a family has members differs
                assert not any(s for g, s in zip(groups, same) if len(S._choices(g)) > 3), (a, b, region)
    assert len({c.name for c in classes}) == 7
    with pytest.raises(ValueError, match="family_size"):
        S.make_bird_classes(4, seed=0, family_size=0)


def test_keypoints_are_where_the_bird_was_drawn():
    for seed in range(60):
        rng = np.random.default_rng(seed)
        cls = S.make_bird_classes(10, seed % 7)[0][seed % 10]
        image = Image.new("RGB", (160, 120), (255, 255, 255))
        parts, visible, (x, y, w, h) = S.draw_bird(image, cls.values, rng)
        pixels = np.asarray(image)
        eyes = [PART_NAMES.index("left eye"), PART_NAMES.index("right eye")]
        assert visible[eyes].sum() <= 1  # the far eye is hidden
        for e in eyes:
            if visible[e]:
                ex, ey = parts[e]
                assert tuple(pixels[int(ey), int(ex)]) == (0, 0, 0)  # the pupil
        for p in np.flatnonzero(visible):  # every visible keypoint lies on the bird
            px, py = parts[p]
            assert x - 1 <= px <= x + w + 1 and y - 1 <= py <= y + h + 1
            assert tuple(pixels[int(py), int(px)]) != (255, 255, 255), PART_NAMES[p]


def test_facing_decides_which_side_is_visible():
    sides = set()
    for seed in range(30):
        cls = S.make_bird_classes(2, 0)[0][0]
        parts, visible, _ = S.draw_bird(Image.new("RGB", (200, 200)), cls.values, np.random.default_rng(seed))
        beak_x, tail_x = parts[PART_NAMES.index("beak"), 0], parts[PART_NAMES.index("tail"), 0]
        facing_right = beak_x > tail_x
        near = "right" if facing_right else "left"  # a bird facing right shows its right side
        assert visible[PART_NAMES.index(f"{near} eye")] and visible[PART_NAMES.index(f"{near} wing")]
        sides.add(near)
    assert sides == {"left", "right"}


def test_ade20k_is_byte_identical_by_seed(tmp_path):
    a = S.make_ade20k(tmp_path / "a", scenes=2, images_per_scene=3, size=48, seed=4, unseen_val_images=1)
    S.make_ade20k(tmp_path / "b", scenes=2, images_per_scene=3, size=48, seed=4, unseen_val_images=1)
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")
    assert len(list((a / "images" / "training").glob("*.jpg"))) == 4
    assert len(list((a / "annotations" / "validation").glob("*.png"))) == 3


def test_scene_pairs_share_characteristic_objects():
    scenes = S.make_scenes(4, seed=0)
    for a, b in ((0, 1), (2, 3)):
        top_a = set(np.argsort(scenes[a].presence)[-5:])
        assert len(top_a & set(np.flatnonzero(scenes[b].presence >= 0.5))) >= 2
    assert len(S.OBJECT_NAMES) == 150 and len(set(S.OBJECT_NAMES)) == 150


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(classes=1),
        dict(images_per_class=1),
        dict(size=16),
        dict(train_fraction=1.0),
        dict(jpeg_quality=0),
        dict(family_size=0),
    ],
)
def test_cub_bad_options(tmp_path, kwargs):
    with pytest.raises(ValueError):
        S.make_cub(tmp_path, **kwargs)


def test_refuses_to_overwrite(small_cub):
    with pytest.raises(FileExistsError, match="not empty"):
        S.make_cub(small_cub, classes=2, images_per_class=2)
    with pytest.raises(ValueError, match="object_info"):
        S.make_ade20k(small_cub, object_info="xml")


def test_command_line(tmp_path, capsys):
    assert S.main(["cub", "--out", str(tmp_path), "--classes", "2", "--images-per-class", "2", "--size", "48"]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "CUB_200_2011")
    assert load_cub(tmp_path).labels.tolist() == [0, 0, 1, 1]
    with pytest.raises(SystemExit) as e:
        S.main(["ade20k", "--out", str(tmp_path), "--scenes", "1"])
    assert e.value.code == 2 and "scenes must lie in" in capsys.readouterr().err


def test_command_line_out_that_cannot_be_created(tmp_path, capsys):
    (tmp_path / "afile").write_text("hi")
    for out in (tmp_path / "afile", tmp_path / "afile" / "sub"):
        with pytest.raises(SystemExit) as e:
            S.main(["cub", "--out", str(out), "--classes", "2", "--images-per-class", "2", "--size", "48"])
        err = capsys.readouterr().err
        assert e.value.code == 2 and "afile is a file" in err and len(err.strip().splitlines()) == 1
