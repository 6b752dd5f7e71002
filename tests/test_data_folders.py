"""Class folders (DIR/CLASS/*.jpg, DIR/{train,val,test}/CLASS/*.jpg) read as an `ImageDataset`: classes, labels,
seeded stratified splits that depend only on the files' names, files left out and said once, one-line errors for bad
input with nothing written, the pipelines and the explanation job's inputs."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from delib_jax.data import DatasetError, ImageDataset, dataset_source, load_dataset, load_folders
from delib_jax.data.images import carve, quotas
from delib_jax.data.pipeline import eval_pipeline, read_example, train_pipeline
from delib_jax.job.inputs import DatasetInputs, dataset_inputs


def _image(path: Path, value: int, size=(24, 20), fmt: str | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.full((size[1], size[0], 3), value % 256, np.uint8)
    pixels[: size[1] // 2, :, value % 3] = 255
    Image.fromarray(pixels).save(path, format=fmt)


def _classes(root: Path, counts: dict[str, int], ext: str = ".png") -> None:
    for j, (name, n) in enumerate(counts.items()):
        (root / name).mkdir(parents=True, exist_ok=True)
        for k in range(n):
            _image(root / name / f"img {k:02d}{ext}", 20 * j + k)


@pytest.fixture
def odd(tmp_path):
    """Odd names, a nested subfolder, non-images, a hidden file, a class with one image, an empty class."""
    root = tmp_path / "odd"
    _classes(root, {"Dog ü ☃": 9, "cat": 12, "a b (c)": 1, "empty": 0})
    _image(root / "cat" / "deeper" / "more" / "x.webp", 7, fmt="WEBP")
    _image(root / "cat" / "upper.JPG", 8, fmt="JPEG")
    (root / "cat" / "notes.txt").write_text("not an image")
    (root / "cat" / "labels.csv").write_text("a,b")
    (root / "README.md").write_text("beside the classes")
    (root / ".DS_Store").write_bytes(b"\0")
    (root / "cat" / ".hidden.png").write_bytes(b"\0")
    return root


def test_class_folders_are_read_with_their_splits_carved(odd):
    lines = []
    ds = load_dataset("folder", odd, report=lines.append)
    assert isinstance(ds, ImageDataset) and ds.kind == "folder"
    assert ds.class_names == ("Dog ü ☃", "a b (c)", "cat")  # sorted folder names; the empty class left out
    assert len(ds) == 9 + 1 + 14 and np.bincount(ds.labels).tolist() == [9, 1, 14]
    names = [Path(p).relative_to(odd).as_posix() for p in ds.image_paths]
    assert "cat/deeper/more/x.webp" in names and "cat/upper.JPG" in names and not any(".hidden" in n for n in names)
    # the lines said: what was read, then the files left out once (not images, outside the class folders)
    assert lines[0].startswith(f"data: the class folders in {odd}: 24 images of 3 classes; ")
    assert "(carved)" in lines[0] and len(lines) == 2
    assert "3 files that are not images" in lines[1] and "README.md" in lines[1] and "cat/notes.txt" in lines[1]
    assert "1 class folders without images (empty)" in lines[1]
    # stratified: round(0.1 * 24) = 2 images each for val and test, shared by class size; the class of one image
    # keeps it for training
    counts = ds.counts()
    assert counts == {"train": 20, "val": 2, "test": 2}
    assert ds.split[ds.labels == 1].tolist() == [0]
    for c in (0, 2):
        assert (ds.split[ds.labels == c] == 0).sum() >= 7
    assert ds.options == {"val_fraction": 0.1, "test_fraction": 0.1, "seed": 0}
    assert ds.given == ("train",)
    # read again with the options a run records: the same dataset
    again = load_dataset("folder", odd, options=ds.options)
    assert list(again.image_paths) == list(ds.image_paths)
    np.testing.assert_array_equal(again.split, ds.split)
    other = load_folders(odd, seed=1)
    assert not np.array_equal(other.split, ds.split) and other.counts() == counts


def test_the_split_depends_on_the_names_only(tmp_path):
    """The same files, created in another order under another root, split alike; a file added moves few."""
    a, b = tmp_path / "a", tmp_path / "b"
    _classes(a, {"x": 30, "y": 20, "z": 10})
    _classes(b, {"z": 10, "y": 20, "x": 30})
    da, db = load_folders(a, test_fraction=0.2), load_folders(b, test_fraction=0.2)
    rel = lambda ds, root: [Path(p).relative_to(root).as_posix() for p in ds.image_paths]
    assert rel(da, a) == rel(db, b)
    np.testing.assert_array_equal(da.split, db.split)
    assert da.counts() == {"train": 42, "val": 6, "test": 12}
    # stratified: each class's share of test is its share of the images
    assert [int(((da.labels == c) & (da.split == 2)).sum()) for c in range(3)] == [6, 4, 2]
    _image(a / "x" / "img 99.png", 1)
    grown = load_folders(a, test_fraction=0.2)
    before = dict(zip(rel(da, a), da.split.tolist()))
    after = dict(zip(rel(grown, a), grown.split.tolist()))
    moved = sum(before[n] != after[n] for n in before)
    assert moved <= 2


def test_quotas_and_carve():
    assert quotas(np.array([9, 1, 14]), 0.1).tolist() == [1, 0, 1]
    assert quotas(np.array([5, 5, 5]), 0.1).sum() == 2
    assert quotas(np.array([]), 0.5).tolist() == []
    names = [f"n{i}" for i in range(8)]
    split = carve(np.zeros(8, np.int8), np.array([0] * 4 + [1] * 4), names, missing=("val", "test"),
                  val_fraction=0.25, test_fraction=0.25, seed=0)  # fmt: skip
    assert np.bincount(split, minlength=3).tolist() == [4, 2, 2]
    given = carve(np.array([0, 0, 0, 2, 2], np.int8), np.array([0, 0, 1, 0, 1]), names[:5], missing=("val",),
                  val_fraction=0.5, test_fraction=0.5, seed=0)  # fmt: skip
    # test given, val carved: of class 0's two training images one goes to val; class 1 keeps its only one
    assert given[3:].tolist() == [2, 2] and sorted(given[:2].tolist()) == [0, 1] and given[2] == 0


def test_given_splits_are_kept_and_missing_ones_carved(tmp_path):
    root = tmp_path / "given"
    _classes(root / "train", {"cat": 10, "dog": 10})
    _classes(root / "Validation", {"cat": 2, "dog": 3})
    _classes(root / "test", {"cat": 4, "dog": 1, "owl": 0})
    ds = load_folders(root)
    assert ds.given == ("train", "val", "test") and ds.counts() == {"train": 20, "val": 5, "test": 5}
    assert ds.class_names == ("cat", "dog")
    assert all(Path(p).relative_to(root).parts[0] == "Validation" for p in np.asarray(ds.image_paths)[ds.split == 1])
    np.testing.assert_array_equal(ds.indices("validation"), ds.indices("val"))
    shutil.rmtree(root / "Validation")
    (root / "readme.txt").write_text("beside the split folders")
    lines = []
    ds = load_dataset("folder", root, options={"val_fraction": 0.2}, report=lines.append)
    assert ds.given == ("train", "test") and ds.counts() == {"train": 16, "val": 4, "test": 5}
    assert "1 val (carved)" not in lines[0] and "4 val (carved)" in lines[0] and "readme.txt" in lines[1]


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda r: _classes(r, {"only": 3}), "only one class (only): a classifier needs at least two classes"),
        (lambda r: (_classes(r, {"a": 0, "b": 0}), (r / "a" / "x.txt").write_text("")), "no images (looked for"),
        (lambda r: _classes(r, {"Cat": 2, "cat": 2, "dog": 2}), "classes 'Cat' and 'cat' differ only in case"),
        (lambda r: (_classes(r / "train", {"a": 2, "b": 2}), _classes(r / "test", {"c": 1})),
         "class 'c' has no training images"),
        (lambda r: (_classes(r / "train", {"a": 2}), _classes(r / "b", {"x": 1})),
         "holds split folders (train) beside other folders (b)"),
        (lambda r: _classes(r / "val", {"a": 2, "b": 2}), "no train/ folder"),
        (lambda r: None, "not a folder"),
    ],
)  # fmt: skip
def test_bad_class_folders_are_one_line(tmp_path, make, message):
    root = tmp_path / "data"
    make(root)
    with pytest.raises(DatasetError) as e:
        load_dataset("folder", root)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_bad_input_stops_training_in_one_line_writing_nothing(tmp_path, capsys):
    from delib_jax.train.cli import main

    good = tmp_path / "good"
    _classes(good, {"a": 4, "b": 4})
    one = tmp_path / "one"
    _classes(one, {"a": 4})
    cases = [
        (["--data-dir", one], "only one class"),
        (["--data-dir", tmp_path / "nowhere"], "does not exist"),
        (["--data-dir", good, "--tfds", "beans"], "not both"),
        (["--data-dir", good, "--label-feature", "label"], "goes with --tfds"),
        (["--data-dir", good, "--test-fraction", "1.5"], "--test-fraction must lie in (0, 1)"),
        ([], "no dataset given"),
    ]
    for extra, message in cases:
        out = tmp_path / "run"
        code = main("images", ["--arch", "small", "--crop", "32", "--out", str(out), *map(str, extra)])
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if line.startswith("error")]
        assert code == 2 and len(lines) == 1 and message in lines[0], err
        assert not out.exists()


def test_pipelines_read_the_files(odd):
    ds = load_folders(odd)
    train = dataset_source("folder", ds, "train")
    assert len(train) == ds.counts()["train"] and train.records is None
    pipe = eval_pipeline(dataset_source("folder", ds, "test"), batch_size=4, resize=16, crop=16, normalize=False)
    (batch,) = list(pipe)
    assert batch["image"].shape == (2, 16, 16, 3) and batch["image"].dtype == np.uint8
    np.testing.assert_array_equal(batch["label"], ds.labels[ds.indices("test")])
    image, _ = read_example(train, 0)
    assert image.size == (24, 20) and image.mode == "RGB"
    a = list(train_pipeline(train, batch_size=4, seed=3, num_epochs=1, crop=16).iterate())
    b = list(train_pipeline(train, batch_size=4, seed=3, num_epochs=1, crop=16, num_threads=1).iterate())
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x["image"], y["image"])


def test_the_job_inputs_of_a_split(odd, tmp_path):
    inputs = dataset_inputs("folder", odd, "validation", options={"seed": 1})
    assert isinstance(inputs, DatasetInputs) and inputs.split == "val" and inputs.form == "files"
    ds = inputs.ds
    assert [inputs[k] for k in range(len(inputs))] == [ds.image_paths[i] for i in ds.indices("val")]
    assert inputs.describe(0) == {"dataset": "folder", "split": "val", "index": int(ds.indices("val")[0])}
    assert inputs.manifest()["options"] == {"val_fraction": 0.1, "test_fraction": 0.1, "seed": 1}
    assert inputs.fingerprint(0) == [os.stat(inputs[0]).st_size, os.stat(inputs[0]).st_mtime_ns]
    with pytest.raises(ValueError, match="class folders has no split 'extra': split must be one of test, val, train"):
        dataset_inputs("folder", odd, "extra")
    with pytest.raises(DatasetError, match="no split 'extra'; its splits are train, val, test"):
        ds.indices("extra")


def test_listing_opens_no_image(tmp_path):
    """Listing and splitting take names only: 3,000 files of invalid bytes are listed (in well under a second here;
    100,000 files in benchmarks/RESULTS.md)."""
    root = tmp_path / "many"
    for c in range(30):
        folder = root / f"class{c:02d}"
        folder.mkdir(parents=True)
        for k in range(100):
            (folder / f"{k:05d}.jpg").write_bytes(b"not decoded when listed")
    t = time.perf_counter()
    ds = load_folders(root)
    took = time.perf_counter() - t
    assert len(ds) == 3000 and ds.counts() == {"train": 2400, "val": 300, "test": 300}
    assert took < 5, took
    with pytest.raises(DatasetError, match="cannot decode|cannot identify|cannot read"):
        read_example(dataset_source("folder", ds, "train"), 0)


def test_the_images_benchmark(capsys):
    """``python -m benchmarks.images``: the CUB reader, its images as class folders and as a catalog dataset, in
    turns; and the listing of many files."""
    import json

    from benchmarks import images

    argv = ["--synthetic", "--size", "40", "--images-per-class", "2", "--batch", "2", "--steps", "1", "--rounds", "2",
            "--crop", "32", "--threads", "2"]  # fmt: skip
    assert images.main(argv) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    assert [r["source"] for r in records] == ["cub", "folder", "tfds"]
    assert records[0]["ratio_to_cub"] == 1.0 and all(r["images_per_cpu_s"] > 0 for r in records)
    assert {r["train_images"] for r in records} == {10}  # the same images from each source
    assert images.main(["--listing", "500", "--classes", "5", "--rounds", "1"]) == 0
    listed = json.loads(capsys.readouterr().out.strip())
    assert listed["files"] == 500 and listed["splits"] == {"train": 400, "val": 50, "test": 50}
