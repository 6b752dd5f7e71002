"""Datasets as the explanation job's input (`delib explain --data-dir`, `explain_dataset`): a split of a release
folder or of a TFDS build explained as the evaluation pipeline sees it, records naming dataset, split and index, the
same resume and safety as for files, figures and thumbnails read from a build's records."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from flax import nnx

import delib_jax
from delib_jax import store as st
from delib_jax.checkpoint import RunCheckpoints, RunConfig, build_model, save_run_config
from delib_jax.cli import main
from delib_jax.data import load_cub
from delib_jax.data.pipeline import cub_source, eval_pipeline
from delib_jax.data.synthetic import make_ade20k, make_cub
from delib_jax.job.inputs import dataset_inputs
from delib_jax.stream import JobError, JobOptions, explain_dataset

pytestmark = pytest.mark.slow  # the job end to end on generated datasets and a TFDS build of one

OPTIONS = {"top_n": 3, "k": 2, "max_insecurities": 2}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A synthetic CUB release, a TFDS build of it, a saved run whose classes are the release's."""
    from delib_jax.data.tfds import build, build_path

    root = tmp_path_factory.mktemp("dataset")
    make_cub(root / "release", classes=3, images_per_class=4, size=48, seed=1, train_fraction=0.5)
    build("cub", root / "release", root / "tfds", resize=None, num_threads=2)
    ds = load_cub(root / "release")
    config = RunConfig(arch="small", num_classes=3, class_names=list(ds.class_names), crop=32, resize=40,
                       dataset="cub")  # fmt: skip
    model = build_model(config, rngs=nnx.Rngs(3))
    model.eval()
    save_run_config(root / "run", config)
    _, params, rest = nnx.split(model, nnx.Param, ...)
    with RunCheckpoints(root / "run") as ckpt:
        ckpt.save("best", 1, params=params, model_state=rest, meta={})
    return {"root": root, "release": root / "release", "build": build_path("cub", root / "tfds"), "ds": ds,
            "config": config, "model": model}  # fmt: skip


def _job(data, where, out, **kw):
    split = kw.pop("split", "test")
    options = JobOptions(**{"batch_size": 4, "workers": 0, "progress": False, **kw})
    return explain_dataset(data["model"], data["config"], where, out, split=split, options=options,
                           report=lambda m: None, **OPTIONS)  # fmt: skip


def _same(a, b):
    assert a.prediction == b.prediction
    for field in ("probs", "maps", "grad_cam", "classes"):
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field))
    assert [q.pair for q in a.insecurities] == [q.pair for q in b.insecurities]
    for qa, qb in zip(a.insecurities, b.insecurities):
        np.testing.assert_array_equal(qa.mask, qb.mask)


def test_a_split_is_explained_as_the_evaluation_pipeline_sees_it(data, tmp_path):
    """Records name dataset, split and index, in dataset order; the maps are those of `explain` on the evaluation
    pipeline's batches of the same split (no EXIF turn, the same resize and crop), bit for bit."""
    ds, config = data["ds"], data["config"]
    summary = _job(data, data["release"], tmp_path / "out", workers=1)
    test = np.flatnonzero(~ds.is_train)
    assert summary.explained == len(test) == 6 and not summary.skipped
    records = list(st.read_records(tmp_path / "out"))
    assert [(r["dataset"], r["split"], r["index"]) for r in records] == [("cub", "test", int(i)) for i in test]
    assert [r["source"] for r in records] == [ds.image_paths[i] for i in test]
    manifest = st.read_manifest(tmp_path / "out")
    assert manifest["data"] == {"dataset": "cub", "split": "test", "form": "release",
                                "path": str(data["release"].resolve())}  # fmt: skip
    pipe = eval_pipeline(cub_source(ds, "test"), batch_size=len(test), resize=config.resize, crop=config.crop,
                         stats=config.normalization, num_threads=1)  # fmt: skip
    batch = next(iter(pipe))
    assert np.array_equal(batch["index"], test)
    direct = delib_jax.explain(data["model"], batch["image"], class_names=config.class_names, **OPTIONS)
    streamed = list(delib_jax.load_explanations(tmp_path / "out"))
    assert [e.source for e in streamed] == [r["source"] for r in records]
    for a, b in zip(streamed, direct):
        _same(a, b)
    # the train split is the other six
    summary = _job(data, data["release"], tmp_path / "train", split="train")
    assert [r["index"] for r in st.read_records(tmp_path / "train")] == np.flatnonzero(ds.is_train).tolist()


def test_a_tfds_build_gives_the_release_explanations_and_its_pictures(data, tmp_path):
    """The build's images are decoded from its records (bytes, no files): the same maps as the release, and the
    figures, thumbnails and pages drawn from them; `delib figures` draws a --no-figures run's figures later."""
    _job(data, data["release"], tmp_path / "release")
    summary = _job(data, data["build"], tmp_path / "tfds", figures=True, figure_workers=1)
    assert summary.explained == 6 and not summary.skipped
    records = list(st.read_records(tmp_path / "tfds"))
    assert all(r["source"].startswith(f"{data['build']}::images/") for r in records)
    assert [r["index"] for r in records] == [r["index"] for r in st.read_records(tmp_path / "release")]
    for a, b in zip(delib_jax.load_explanations(tmp_path / "tfds"), delib_jax.load_explanations(tmp_path / "release")):
        _same(a, b)
    assert all((tmp_path / "tfds" / r["figure"]).stat().st_size > 1000 for r in records)
    assert len(list((tmp_path / "tfds" / "thumbs").glob("*.jpg"))) == 6
    page = (tmp_path / "tfds" / "index.html").read_text()
    assert page.count("thumbs/") >= 6 and "no figure" not in page
    # figures later, from the build's records
    _job(data, data["build"], tmp_path / "later", figures=False)
    assert not (tmp_path / "later" / "figures").exists() or not any((tmp_path / "later" / "figures").iterdir())
    assert main(["figures", str(tmp_path / "later"), "--no-examples", "--workers", "0", "--no-progress"]) == 0
    assert len(list((tmp_path / "later" / "figures").glob("*.png"))) == 6


def test_resume_refusals_and_unreadable_examples(data, tmp_path):
    ds = data["ds"]
    release = tmp_path / "release"
    shutil.copytree(data["release"], release)
    out = tmp_path / "out"
    summary = _job(data, release, out, shard_size=2)
    assert summary.explained == 6
    again = _job(data, release, out)
    assert again.explained == 0 and again.resumed == 6  # nothing redone
    # an example replaced under the same name is explained again (its file's fingerprint), the rest kept
    moved = release / Path(ds.image_paths[int(np.flatnonzero(~ds.is_train)[1])]).relative_to(data["release"])
    moved.write_bytes(moved.read_bytes() + b"\0")
    again = _job(data, release, out)
    assert (again.explained, again.resumed) == (1, 5)
    # another split into the same folder is refused, nothing changed
    with pytest.raises(JobError, match="differing: data.split"):
        _job(data, release, out, split="train")
    # a missing image is a skip record with its reason, naming the example
    moved.unlink()
    again = _job(data, release, tmp_path / "missing")
    assert again.explained == 5 and len(again.skipped) == 1
    skipped = [r for r in st.read_records(tmp_path / "missing", skipped=True) if "skipped" in r]
    assert skipped[0]["index"] == int(np.flatnonzero(~ds.is_train)[1]) and skipped[0]["split"] == "test"
    # a dataset whose classes are not the model's: one line, nothing written
    other = tmp_path / "other"
    make_cub(other, classes=4, images_per_class=2, size=48, seed=2)
    with pytest.raises(ValueError, match="has 4 classes and the model has 3; class '.*' is not one of the model's 3"):
        _job(data, other, tmp_path / "never")
    assert not (tmp_path / "never").exists()
    with pytest.raises(ValueError, match="split must be one of"):
        dataset_inputs("cub", release, "validation")


def _cli(argv, capsys):
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err


def test_delib_explain_data_dir(data, capsys, tmp_path):
    run, out = data["root"] / "run", tmp_path / "out"
    base = ["explain", "--checkpoint", run, "--no-figures", "--workers", "0", "--batch-size", "4"]
    code, err = _cli([*base, "--data-dir", data["build"], "--split", "test", "--out", out], capsys)
    assert code == 0, err
    assert "6 test images of cub (tfds in" in err and "explained 6 of 6 images" in err
    assert {r["split"] for r in st.read_records(out)} == {"test"}
    # mistakes: one line each, exit 2, nothing written
    make_ade20k(tmp_path / "ade", scenes=3, images_per_scene=2, size=48, seed=1)
    image = data["ds"].image_paths[0]
    for extra, message in [
        ([image, "--data-dir", data["release"]], "not both"),
        ([], "or --data-dir DIR"),
        (["--data-dir", tmp_path / "nowhere"], "does not exist"),
        (["--data-dir", tmp_path / "ade"], "not a CUB-200-2011 release"),
    ]:
        code, err = _cli([*base, *extra, "--out", tmp_path / "never"], capsys)
        lines = [line for line in err.splitlines() if "error" in line]
        assert code == 2 and len(lines) == 1 and message in lines[0] and "Traceback" not in err, err
        assert not (tmp_path / "never").exists()
    code, err = _cli([*base, "--data-dir", data["release"], "--split", "validation", "--out", tmp_path / "never"],
                     capsys)  # fmt: skip
    lines = [line for line in err.splitlines() if "error" in line]
    assert code == 2 and len(lines) == 1 and "no split 'validation': split must be one of test, train" in lines[0], err
    assert not (tmp_path / "never").exists()
    # the report's thumbnails come from the build's records; --json describes the examples
    out2 = tmp_path / "json"
    code, err = _cli([*base, "--data-dir", data["build"], "--json", "--out", out2], capsys)
    assert code == 0, err
    images = json.loads((out2 / "insecurities.json").read_text())["images"]
    assert len(images) == 6 and all("::images/" in i["source"] for i in images)


def test_the_job_benchmark_reads_a_dataset(data, capsys):
    """`python -m benchmarks.explain --data-dir` (what `benchmarks/gpu.sh explain-data` times on a TFDS build)."""
    from benchmarks import explain

    argv = ["--arch", "small", "--crop", "32", "--classes", "3", "--data-dir", str(data["build"]), "--images", "5",
            "--batch", "4", "--workers", "0", "--rounds", "1", "--json"]  # fmt: skip
    assert explain.main(argv) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["input"] == "tfds test split" and out["images"] == out["explained"] == 5
    assert out["decode_img_s"] > 0 and out["bytes_per_image"] > 0


def test_ade20k_test_split_is_its_validation_images(tmp_path):
    """ADE20K's held-out split (validation) is --split test; its scene names are the classes checked."""
    from delib_jax.data import load_ade20k
    from delib_jax.job.inputs import check_classes

    make_ade20k(tmp_path / "ade", scenes=3, images_per_scene=4, size=48, seed=1)
    ds = load_ade20k(tmp_path / "ade")
    inputs = dataset_inputs("ade20k", tmp_path / "ade", "test")
    assert list(inputs.indices) == np.flatnonzero(~ds.is_train).tolist() and len(inputs) > 0
    assert [inputs[k] for k in range(len(inputs))] == [ds.image_paths[i] for i in inputs.indices]
    check_classes(inputs, list(ds.scene_names))
    with pytest.raises(ValueError, match="are not those of the model: class '.*' is not one of the model's 3 classes"):
        check_classes(inputs, ["other", *ds.scene_names[1:]])
    assert inputs.describe(0) == {"dataset": "ade20k", "split": "test", "index": int(inputs.indices[0])}
    assert inputs.fingerprint(0) == [Path(inputs[0]).stat().st_size, Path(inputs[0]).stat().st_mtime_ns]
