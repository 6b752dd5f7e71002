"""TFDS builds (ArrayRecord, no TensorFlow) of the synthetic releases read back exactly as the folder readers read the
releases; the resized builds move keypoints, boxes and masks with the images; source detection; the build command."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from delib_jax.data import DatasetError, find_source, load_ade20k, load_cub, load_dataset
from delib_jax.data import transforms as T
from delib_jax.data.pipeline import ade20k_source, cub_source, eval_pipeline, read_example, train_pipeline
from delib_jax.data.synthetic import make_ade20k, make_cub
from delib_jax.data.tfds import build, build_path
from delib_jax.data.tfds.__main__ import main
from delib_jax.evaluation import protocol

pytestmark = pytest.mark.slow  # TFDS builds of the generated datasets, written and read back

ROOT = Path(__file__).resolve().parents[1]
RESIZE = 32  # below the synthetic images' shorter sides (48 x 0.7..1): every image is resized

CUB_ARRAYS = ("image_ids", "labels", "is_train", "boxes", "parts", "part_visible", "attributes",
              "attribute_certainty", "class_attributes")  # fmt: skip
CUB_NAMES = ("class_names", "part_names", "attribute_names", "certainty_names")


@pytest.fixture(scope="module")
def cub(tmp_path_factory):
    """(release dataset, original build, resized build); both builds in one TFDS data directory."""
    tmp = tmp_path_factory.mktemp("cub")
    make_cub(tmp / "release", classes=3, images_per_class=4, size=48, seed=1, train_fraction=0.5)
    for resize in (None, RESIZE):
        build("cub", tmp / "release", tmp / "tfds", resize=resize, num_threads=2)
    return (load_cub(tmp / "release"), load_dataset("cub", build_path("cub", tmp / "tfds")),
            load_dataset("cub", build_path("cub", tmp / "tfds", resize=RESIZE)))  # fmt: skip


@pytest.fixture(scope="module")
def ade(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ade")
    make_ade20k(tmp / "release", scenes=3, images_per_scene=4, size=48, seed=1, unseen_val_images=1)
    for resize in (None, RESIZE):
        build("ade20k", tmp / "release", tmp / "tfds", resize=resize, num_threads=2)
    return (load_ade20k(tmp / "release"), load_dataset("ade20k", build_path("ade20k", tmp / "tfds")),
            load_dataset("ade20k", build_path("ade20k", tmp / "tfds", resize=RESIZE)))  # fmt: skip


def _same_batches(a, b) -> None:
    a, b = list(a), list(b)
    assert len(a) == len(b) > 0
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)
            assert x[k].dtype == y[k].dtype


def test_cub_build_yields_what_the_folder_reader_yields(cub):
    folder, built, _ = cub
    assert built.records is not None and folder.records is None and len(built) == len(folder) == 12
    for name in CUB_ARRAYS:
        x, y = getattr(folder, name), getattr(built, name)
        assert x.dtype == y.dtype and x.shape == y.shape, name
        np.testing.assert_array_equal(x, y, err_msg=name)
    for name in CUB_NAMES:
        assert getattr(folder, name) == getattr(built, name), name
    assert [Path(p).name for p in folder.image_paths] == [Path(p).name for p in built.image_paths]
    a, b = cub_source(folder, "all"), cub_source(built, "all")
    for position in range(len(a)):  # pixels, byte-exact decoding of the stored release files
        ia, ib = read_example(a, position)[0], read_example(b, position)[0]
        np.testing.assert_array_equal(np.asarray(ia), np.asarray(ib))
    # the same seed gives the same training batches (augmentation, order, keypoints) from either source
    kw = dict(batch_size=4, seed=3, num_epochs=2, crop=32, drop_remainder=False)
    _same_batches(train_pipeline(cub_source(folder), num_threads=1, **kw),
                  train_pipeline(cub_source(built), num_threads=3, **kw))  # fmt: skip


def test_ade20k_build_yields_what_the_folder_reader_yields(ade):
    folder, built, _ = ade
    assert folder.stems == built.stems and folder.scene_names == built.scene_names
    assert folder.dropped_val_stems == built.dropped_val_stems and len(built.dropped_val_stems) == 1
    for name in ("labels", "is_train"):
        np.testing.assert_array_equal(getattr(folder, name), getattr(built, name))
        assert getattr(folder, name).dtype == getattr(built, name).dtype
    assert folder.objects.names == built.objects.names
    for name in ("ratio", "train_count", "val_count"):
        x, y = getattr(folder.objects, name), getattr(built.objects, name)
        assert x.dtype == y.dtype
        np.testing.assert_array_equal(x, y)
    a, b = ade20k_source(folder, "all"), ade20k_source(built, "all")
    for position in range(len(a)):
        (ia, ma), (ib, mb) = read_example(a, position), read_example(b, position)
        np.testing.assert_array_equal(np.asarray(ia), np.asarray(ib))
        np.testing.assert_array_equal(ma, mb)
    _same_batches(eval_pipeline(ade20k_source(folder, "test"), batch_size=3, resize=40, crop=32),
                  eval_pipeline(ade20k_source(built, "test"), batch_size=3, resize=40, crop=32))  # fmt: skip
    # the evaluation's object statistics read the build's masks (records, not files)
    np.testing.assert_array_equal(protocol.ade_object_presence(folder), protocol.ade_object_presence(built))


def test_encoded_bytes_from_the_raw_records_equal_the_parsed_records(cub, ade):
    """The pipeline takes the image (and mask) bytes straight from the serialized records; TFDS's own parsing of the
    whole record gives the same bytes, for every example of every build."""
    from delib_jax.data.tfds import TfdsRecords

    for built, masks in ((cub[1], False), (cub[2], False), (ade[1], True), (ade[2], True)):
        fast = built.records
        parsed = TfdsRecords(fast.sources, fast.split, fast.key)  # raw=None: TFDS parses every feature
        assert fast.raw is not None
        for i in range(len(fast)):
            image, mask = fast.encoded(i)
            assert isinstance(image, bytes) and len(image) > 100
            assert (image, mask) == parsed.encoded(i)
            assert (mask is not None) == masks


def test_resized_cub_build_moves_boxes_and_keypoints_with_the_image(cub):
    folder, _, small = cub
    np.testing.assert_array_equal(folder.labels, small.labels)
    np.testing.assert_array_equal(folder.attributes, small.attributes)
    a, b = cub_source(folder, "all"), cub_source(small, "all")
    for i in range(len(folder)):
        image, _ = read_example(a, i)
        plan = T.resize_plan(*image.size, RESIZE)
        stored, _ = read_example(b, i)
        assert stored.size == plan.size and min(stored.size) == RESIZE
        points, visible = T.apply_to_points(plan, folder.parts[i], folder.part_visible[i])
        np.testing.assert_array_equal(small.parts[i], points)
        np.testing.assert_array_equal(small.part_visible[i], visible)
        np.testing.assert_array_equal(small.boxes[i], T.apply_to_box(plan, folder.boxes[i]))
        # pixels: the resampled image after a JPEG round trip (quality 90, noisy synthetic images)
        diff = np.abs(np.asarray(stored, np.float64) - T.apply_to_image(plan, image).astype(np.float64))
        assert diff.mean() < 8.0, diff.mean()
    assert small.part_visible.sum() > 0


def test_resized_ade20k_build_moves_masks_with_the_image(ade):
    folder, _, small = ade
    a, b = ade20k_source(folder, "all"), ade20k_source(small, "all")
    for i in range(len(folder)):
        image, mask = read_example(a, i)
        plan = T.resize_plan(*image.size, RESIZE)
        stored, stored_mask = read_example(b, i)
        assert stored.size == plan.size
        np.testing.assert_array_equal(stored_mask, T.apply_to_mask(plan, mask))


def test_find_source_says_which_form_it_found(cub, ade, tmp_path):
    folder, built, small = cub
    data_dir = built.root.parents[2]
    release = find_source("cub", folder.root.parent)
    assert release.kind == "release" and release.path == folder.root and "release folder" in release.describe()
    for path in (built.root, built.root.parent):  # the version folder, the config folder
        found = find_source("cub", path)
        assert found.kind == "tfds" and found.path == built.root and "delib_cub/original" in found.describe()
    with pytest.raises(DatasetError, match="holds 2 TFDS builds of CUB-200-2011"):
        find_source("cub", data_dir)  # original and resize32: which one is the caller's choice
    with pytest.raises(DatasetError, match="TFDS build of ADE20K .*not of CUB-200-2011"):
        find_source("cub", ade[1].root)
    with pytest.raises(DatasetError, match="not a CUB-200-2011 release.*nor a TFDS build"):
        find_source("cub", tmp_path)
    lines = []
    load_dataset("cub", small.root, report=lines.append)
    assert lines == [f"data: TFDS build delib_cub/resize{RESIZE} 1.0.0 (ArrayRecord) of CUB-200-2011 at {small.root}"]


def test_load_splits_and_run_config_accept_a_build(cub):
    from delib_jax.train.run import load_splits

    folder, built, _ = cub
    a = load_splits("cub", folder.root, val_fraction=0.25, seed=0)
    b = load_splits("cub", built.root, val_fraction=0.25, seed=0)
    assert a.class_names == b.class_names
    for name in ("train", "val", "test"):
        np.testing.assert_array_equal(getattr(a, name).indices, getattr(b, name).indices)
        np.testing.assert_array_equal(getattr(a, name).labels, getattr(b, name).labels)


def _copy_release(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


@pytest.mark.parametrize(
    "damage, message",
    [
        ("empty", "not a CUB-200-2011 release: no images.txt"),
        ("part_locs", "part_locs.txt: file not found"),
        ("image", "cannot read image"),
        ("ade", "not a CUB-200-2011 release"),
    ],
)
def test_build_command_names_what_is_wrong_with_the_release(cub, ade, tmp_path, capsys, damage, message):
    release = tmp_path / "release"
    if damage == "empty":
        release.mkdir()
    elif damage == "ade":
        release = ade[0].root
    else:
        root = _copy_release(cub[0].root, release / "CUB_200_2011")
        shutil.copy(cub[0].root.parent / "attributes.txt", release / "attributes.txt")
        if damage == "part_locs":
            (root / "parts" / "part_locs.txt").unlink()
        else:
            Path(load_cub(release).image_paths[5]).write_bytes(b"not a jpeg")
    argv = ["build", "cub", "--manual-dir", str(release), "--data-dir", str(tmp_path / "out"), "--resize", "--threads"]
    argv.append("1")
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()  # progress (a corrupt image is found while building), then
    assert err[-1].startswith("error: ") and message in err[-1], err  # one line naming the file
    assert "Traceback" not in "".join(err) and sum(line.startswith("error") for line in err) == 1
    assert not list((tmp_path / "out").rglob("dataset_info.json"))  # nothing half-built is left to be read


def test_build_command_builds_and_reuses(cub, tmp_path, capsys):
    release = cub[0].root.parent
    argv = ["build", "cub", "--manual-dir", str(release), "--data-dir", str(tmp_path), "--resize", "40"]
    assert main(argv + ["--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert f"--data-dir {tmp_path}" in out and (tmp_path / "delib_cub" / "resize40" / "1.0.0").is_dir()
    assert main(argv) == 0
    assert "already built" in capsys.readouterr().err
    assert main(["build", "cub", "--manual-dir", str(tmp_path / "nowhere"), "--data-dir", str(tmp_path)]) == 2
    assert "--manual-dir" in capsys.readouterr().err


NO_TENSORFLOW = """
import sys
from pathlib import Path
import numpy as np
from delib_jax.data import load_dataset
from delib_jax.data.pipeline import ade20k_source, cub_source, train_pipeline
from delib_jax.data.synthetic import make_ade20k, make_cub
from delib_jax.data.tfds import build, build_path

tmp = Path(sys.argv[1])
make_cub(tmp / "cub", classes=2, images_per_class=2, size=40)
make_ade20k(tmp / "ade", scenes=2, images_per_scene=2, size=40, unseen_val_images=0)
for dataset, release, make in (("cub", tmp / "cub", cub_source), ("ade20k", tmp / "ade", ade20k_source)):
    for resize in (None, 32):
        build(dataset, release, tmp / "tfds", resize=resize, num_threads=2)
        ds = load_dataset(dataset, build_path(dataset, tmp / "tfds", resize=resize))
        batch = next(iter(train_pipeline(make(ds, "all"), batch_size=2, crop=32)))
        assert np.isfinite(batch["image"]).all()
loaded = sorted(m for m in sys.modules if m == "tensorflow" or m.startswith("tensorflow."))
print("tensorflow_datasets" in sys.modules, loaded)
"""


def test_tensorflow_is_never_imported(tmp_path):
    """Build and read both datasets in a fresh interpreter where a package named tensorflow can be imported (a stand-in
    that records its import): it must stay unimported."""
    fake = tmp_path / "fake" / "tensorflow"
    fake.mkdir(parents=True)
    marker = tmp_path / "imported"
    fake.joinpath("__init__.py").write_text(f"open({str(marker)!r}, 'w').write('imported')\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path / "fake"), str(ROOT)]), "JAX_PLATFORMS": "cpu"}
    script = tmp_path / "script.py"
    script.write_text(textwrap.dedent(NO_TENSORFLOW))
    out = subprocess.run([sys.executable, str(script), str(tmp_path)], env=env, capture_output=True, text=True,
                         timeout=300, cwd=tmp_path)  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == "True []", out.stdout
    assert not marker.exists()


def test_build_command_in_a_subprocess_exits_2_without_traceback(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    argv = ["build", "ade20k", "--manual-dir", str(tmp_path), "--data-dir", str(tmp_path / "out")]
    out = subprocess.run([sys.executable, "-m", "delib_jax.data.tfds", *argv], env=env, capture_output=True, text=True,
                         timeout=120)  # fmt: skip
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.strip().splitlines() == [
        f"error: {tmp_path}: not an ADEChallengeData2016 release: no sceneCategories.txt and images/ here or below"
    ]


def test_train_command_reads_a_build_and_says_so(cub, capsys):
    from delib_jax.train.cli import build_parser, make_config

    folder, built, _ = cub
    args = build_parser("cub").parse_args(["--data-dir", str(built.root.parent), "--out", "unused", "--arch", "small"])
    config = make_config("cub", args)
    assert config.class_names == list(folder.class_names) and config.data_dir == str(built.root.parent.absolute())
    assert f"data: TFDS build delib_cub/original 1.0.0 (ArrayRecord) of CUB-200-2011 at {built.root}" in (
        capsys.readouterr().err
    )


def test_build_command_refuses_quality_without_resize(cub, tmp_path, capsys):
    argv = ["build", "cub", "--manual-dir", str(cub[0].root), "--data-dir", str(tmp_path), "--quality", "80"]
    assert main(argv) == 2
    assert "give it with --resize" in capsys.readouterr().err and not list(tmp_path.iterdir())
