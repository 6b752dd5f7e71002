"""TFDS catalog datasets by name (NAME[/CONFIG][:VERSION]) from a local TFDS data folder, prepared here in ArrayRecord
format by a builder written for the tests (`delib_jax.testing.catalog`) and read back as a user's prepared catalog
dataset is: features found or named, splits mapped or carved, images by random access, one-line errors, no
TensorFlow."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from PIL import Image

from delib_jax.data import DatasetError, ImageDataset, dataset_source, load_dataset
from delib_jax.data.catalog import find_prepared, load_catalog, parse_name
from delib_jax.data.pipeline import eval_pipeline, read_example, train_pipeline
from delib_jax.job.inputs import dataset_inputs
from delib_jax.testing.catalog import jpeg, prepare

NAMES = ["circle", "square", "triangle"]


def _examples(n: int, seed: int) -> list[tuple[bytes, int]]:
    rng = np.random.default_rng(seed)
    out = []
    for k in range(n):
        pixels = rng.integers(0, 60, (20 + k % 3, 24, 3)).astype(np.uint8)
        pixels[..., k % 3] += 150
        out.append((jpeg(pixels), k % 3))
    return out


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """A TFDS data folder: tiny_shapes 1.0.0 (train, test) and 1.1.0 (train, validation, test), tiny_flowers (train
    only, two class-label features, no supervised keys), multi in two configs, and a dataset marked as TFRecord."""
    root = tmp_path_factory.mktemp("tfds")
    prepare("tiny_shapes", root, {"train": _examples(12, 0), "test": _examples(6, 1)}, NAMES)
    prepare("tiny_shapes", root, {"train": _examples(12, 0), "validation": _examples(3, 2), "test": _examples(6, 1),
                                  "extra": _examples(2, 3)}, NAMES, version="1.1.0")  # fmt: skip
    prepare("tiny_flowers", root, {"train": _examples(30, 4)}, ["daisy", "rose", "tulip"], label="species",
            extra_label="genus", image="photo", supervised=False)  # fmt: skip
    for config in ("small", "large"):
        prepare("multi", root, {"train": _examples(9, 5)}, NAMES, config=config)
    old = prepare("old_format", root, {"train": _examples(6, 6)}, NAMES)
    info = json.loads((old / "dataset_info.json").read_text())
    (old / "dataset_info.json").write_text(json.dumps({**info, "fileFormat": "tfrecord"}))
    return root


def test_read_by_name_the_newest_version(data_dir):
    lines = []
    ds = load_dataset("tfds", data_dir, options={"name": "tiny_shapes"}, report=lines.append)
    assert isinstance(ds, ImageDataset) and ds.kind == "tfds" and ds.class_names == tuple(NAMES)
    assert ds.root == data_dir / "tiny_shapes" / "1.1.0" and ds.given == ("train", "val", "test")
    assert ds.counts() == {"train": 12, "val": 3, "test": 6}
    assert lines[0] == f"data: the TFDS dataset tiny_shapes:1.1.0 in {data_dir}: 21 images of 3 classes; 12 train, " \
                       "3 val, 6 test"  # fmt: skip
    assert lines[1].endswith("its splits extra (not train, validation or test; --tfds-split maps one)")
    assert ds.options == {"name": "tiny_shapes:1.1.0", "image_feature": "image", "label_feature": "label",
                          "splits": {"train": "train", "val": "validation", "test": "test"}, "val_fraction": 0.1,
                          "test_fraction": 0.1, "seed": 0}  # fmt: skip
    # the labels and the images are the records' (TFDS shuffles the records' order: compared by the stored id)
    for index in ds.indices("val").tolist() + ds.indices("test")[:3].tolist():
        split, key = ds.image_paths[index].split("::")[1].split("/")
        expected = _examples(3 if split == "validation" else 6, 2 if split == "validation" else 1)
        image_bytes, mask = ds.records.encoded(index)
        record_id = _record_id(ds, index)
        assert mask is None and image_bytes == expected[record_id][0] and ds.labels[index] == expected[record_id][1]
        assert key.isdecimal()
    assert "tensorflow" not in sys.modules


def _record_id(ds, index: int) -> int:
    from tensorflow_datasets.proto import tf_example_pb2

    records = ds.records
    raw = records.sources[int(records.split[index])][int(records.key[index])]
    return int(tf_example_pb2.Example.FromString(raw).features.feature["id"].int64_list.value[0])


def test_a_version_a_config_and_carved_splits(data_dir):
    old = load_catalog("tiny_shapes:1.0.0", data_dir)
    assert old.given == ("train", "test") and old.counts() == {"train": 11, "val": 1, "test": 6}
    assert old.options["name"] == "tiny_shapes:1.0.0" and old.options["splits"] == {"train": "train", "test": "test"}
    large = load_dataset("tfds", data_dir, options={"name": "multi/large"})
    assert large.options["name"] == "multi/large:1.0.0" and large.counts() == {"train": 7, "val": 1, "test": 1}
    # the features of a dataset without supervised keys: its only image, a class label named
    flowers = load_catalog("tiny_flowers", data_dir, label_feature="genus", test_fraction=0.2, seed=4)
    assert flowers.options["image_feature"] == "photo" and flowers.class_names == ("daisy", "rose", "tulip")
    assert flowers.counts() == {"train": 21, "val": 3, "test": 6}
    assert [int(((flowers.labels == c) & (flowers.split == 2)).sum()) for c in range(3)] == [2, 2, 2]
    again = load_dataset("tfds", data_dir, options=flowers.options)
    np.testing.assert_array_equal(again.split, flowers.split)
    # the splits mapped by hand
    mapped = load_catalog("tiny_shapes", data_dir, splits={"train": "train", "test": "extra"})
    assert mapped.counts() == {"train": 11, "val": 1, "test": 2}


@pytest.mark.parametrize(
    "spec, options, message",
    [
        ("beans", {}, "no prepared TFDS dataset 'beans' (it holds multi, old_format, tiny_flowers, tiny_shapes): "
                      "prepare it there first (tfds build beans --data_dir"),
        ("tiny_shapes:2.0.0", {}, "version 2.0.0 is not prepared (prepared: 1.0.0, 1.1.0)"),
        ("multi", {}, "prepared in several configs (large, small): give multi/CONFIG"),
        ("multi/medium", {}, "config 'medium' is not prepared (its prepared configs: large, small)"),
        ("tiny_shapes", {"label_feature": "id"}, "feature 'id' is a Scalar, not a class-label feature (ClassLabel); "
                                                 "label would do"),
        ("tiny_shapes", {"label_feature": "colour"}, "has no feature 'colour' (--label-feature); its features:"),
        ("tiny_shapes", {"image_feature": "label"}, "feature 'label' is a ClassLabel, not an image feature"),
        ("tiny_flowers", {}, "has several class-label features, genus, species: name the one to read "
                             "with --label-feature"),
        ("old_format", {}, "prepared as tfrecord; reading by random access needs ArrayRecord"),
        ("tiny_shapes", {"splits": {"train": "train", "test": "holdout"}}, "cannot map splits 'holdout'"),
    ],
)  # fmt: skip
def test_bad_catalog_input_is_one_line(data_dir, spec, options, message):
    with pytest.raises(DatasetError) as e:
        load_dataset("tfds", data_dir, options={"name": spec, **options})
    assert message in str(e.value) and "\n" not in str(e.value)


def test_names_and_folders(tmp_path, data_dir):
    assert parse_name("cifar10/plain:3.0.2") == ("cifar10", "plain", "3.0.2")
    for bad in ("a b", "beans:1.0", "x/y/z", ""):
        with pytest.raises(ValueError, match="not a TFDS dataset name"):
            parse_name(bad)
    with pytest.raises(DatasetError, match="no such TFDS data folder"):
        find_prepared("beans", tmp_path / "nowhere")
    assert find_prepared("tiny_shapes:1.0.0", data_dir) == (data_dir / "tiny_shapes" / "1.0.0", None)
    one = tmp_path / "one"
    prepare("single", one, {"train": [(image, 0) for image, _ in _examples(6, 0)]}, ["only"])
    with pytest.raises(DatasetError, match="only one class .only.: a classifier needs at least two classes"):
        load_catalog("single", one)
    dup = tmp_path / "dup"
    prepare("cased", dup, {"train": _examples(6, 0)}, ["Rose", "rose", "tulip"])
    with pytest.raises(DatasetError, match="classes 'Rose' and 'rose' differ only in case"):
        load_catalog("cased", dup)


def test_pipelines_and_job_inputs_read_the_records(data_dir):
    ds = load_catalog("tiny_shapes", data_dir)
    test = dataset_source("tfds", ds, "test")
    assert test.records is ds.records and len(test) == 6
    batches = list(eval_pipeline(test, batch_size=4, resize=16, crop=16, normalize=False))
    assert [len(b["label"]) for b in batches] == [4, 2]
    image, _ = read_example(test, 0)
    expected = Image.open(__import__("io").BytesIO(ds.records.encoded(int(test.indices[0]))[0])).convert("RGB")
    np.testing.assert_array_equal(np.asarray(image), np.asarray(expected))
    a = list(train_pipeline(dataset_source("tfds", ds, "train"), batch_size=4, seed=1, num_epochs=1, crop=16))
    b = list(train_pipeline(dataset_source("tfds", ds, "train"), batch_size=4, seed=1, num_epochs=1, crop=16,
                            num_threads=1))  # fmt: skip
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x["image"], y["image"])
    inputs = dataset_inputs("tfds", data_dir, "val", options={"name": "tiny_shapes:1.1.0"})
    assert inputs.form == "tfds" and len(inputs) == 3 and inputs[0].startswith(f"{ds.root}::validation/")
    assert inputs.fingerprint(0) == inputs.fingerprint(2) is not None  # the version's dataset_info.json
    assert inputs.payload(0).data == ds.records.encoded(int(inputs.indices[0]))[0]
    assert inputs.manifest()["options"]["name"] == "tiny_shapes:1.1.0"


def test_tensorflow_is_never_imported(data_dir):
    script = textwrap.dedent(f"""
        import sys
        from delib_jax.data import load_dataset, dataset_source
        from delib_jax.data.pipeline import train_pipeline
        ds = load_dataset("tfds", {str(data_dir)!r}, options={{"name": "tiny_shapes"}})
        next(iter(train_pipeline(dataset_source("tfds", ds, "train"), batch_size=2, crop=16)))
        print("tensorflow" in sys.modules)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0 and done.stdout.strip() == "False", done.stderr
