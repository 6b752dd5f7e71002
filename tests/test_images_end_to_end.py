"""Your own images end to end: ``python -m train.images`` on class folders and on a TFDS catalog dataset (a few
steps, killed and resumed), ``python -m train.hardness`` on them, ``delib explain --data-dir`` of a split (records
naming the dataset, split and example; killed and resumed without decoding the finished images again; the pages),
``eval.faithfulness`` on the run's test split, and the paper's protocols refused in one line."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import delib_jax
from delib_jax import store as st
from delib_jax.checkpoint import load_model, load_run_config
from delib_jax.cli import main as delib
from delib_jax.data import load_dataset
from delib_jax.train.cli import hardness_main
from delib_jax.train.cli import main as train

pytestmark = pytest.mark.slow  # training, explaining and evaluating small runs end to end

SMALL = ["--arch", "small", "--crop", "32", "--batch-size", "4", "--checkpoint-every", "2", "--no-progress"]
CLASSES = ("red fox", "Blue_jay", "grün")


def _pixels(c: int, k: int) -> np.ndarray:
    rng = np.random.default_rng(100 * c + k)
    pixels = rng.integers(0, 80, (36 + k % 5, 44, 3)).astype(np.uint8)
    pixels[..., c] += 150
    return pixels


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("e2e") / "birds"
    for c, name in enumerate(CLASSES):
        for k in range(12):
            path = root / name / ("jpeg" if k % 2 else "") / f"{k:02d}.{'jpg' if k % 2 else 'png'}"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(_pixels(c, k)).save(path)
    (root / "LICENSE.txt").write_text("not an image")
    return root


def _run(fn, argv, capsys) -> tuple[int, str]:
    code = fn([str(a) for a in argv])
    return code, capsys.readouterr().err


def _one_error(code: int, err: str, message: str) -> None:
    lines = [line for line in err.splitlines() if "error" in line]
    assert code == 2 and len(lines) == 1 and message in lines[0] and "Traceback" not in err, err


class _Killed(Exception):
    pass


def test_class_folders_train_explain_evaluate(folders, tmp_path, capsys):
    run = tmp_path / "run"
    # training, interrupted after its checkpoint of step 2, then continued with --resume
    from delib_jax.train import cli
    from delib_jax.train.run import fit

    args = cli.build_parser("images").parse_args([*map(str, ["--data-dir", folders, "--out", run, "--steps", "4"]),
                                                   *SMALL])  # fmt: skip
    config = cli.make_config("images", args)
    assert capsys.readouterr().err.count("LICENSE.txt") == 1  # the file left out, said once

    def kill(step, state):
        if step == 3:
            raise _Killed

    with pytest.raises(_Killed):
        fit(run, config, progress=False, num_threads=2, on_step=kill)
    code, err = _run(lambda a: train("images", a), ["--out", run, "--resume", "--no-progress"], capsys)
    assert code == 0 and "resuming" in err and "from step 2 of 4" in err, err
    stored = load_run_config(run)
    assert stored == config and stored.dataset == "folder" and stored.class_names == sorted(CLASSES)
    assert stored.data_options == {"val_fraction": 0.1, "test_fraction": 0.1, "seed": 0}
    assert stored.mean == delib_jax.data.IMAGENET_STATS.mean
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["split"] == "test" and records[-1]["count"] == 4  # round(0.1 * 36) test images
    # --resume with the other command, or other data: one line
    code, err = _run(lambda a: train("cub", a), ["--out", run, "--resume"], capsys)
    _one_error(code, err, "continue it with python -m train.images")
    code, err = _run(lambda a: train("images", a), ["--out", run, "--resume", "--test-fraction", "0.3"], capsys)
    _one_error(code, err, "--test-fraction 0.3 (the run has 0.1)")

    # the hardness head trained again on the run's class folders (its recorded splits)
    code, err = _run(hardness_main, ["--checkpoint", run, "--retrain", "--steps", "2", "--no-progress"], capsys)
    assert code == 0, err
    assert load_run_config(run / "hardness_training").data_options == stored.data_options

    # explaining the test split, with figures and pages; the class examples from the training split
    out = tmp_path / "explained"
    base = ["explain", "--checkpoint", run, "--workers", "0", "--batch-size", "2", "--top-n", "3", "--k", "2"]
    code, err = _run(delib, [*base, "--data-dir", folders, "--split", "test", "--out", out], capsys)
    assert code == 0 and "4 test images of folder (files in" in err and "class examples: 3 classes" in err, err
    ds = load_dataset("folder", folders, options=stored.data_options)
    test = ds.indices("test")
    rows = list(st.read_records(out))
    assert [r["index"] for r in rows] == test.tolist() and {r["split"] for r in rows} == {"test"}
    assert {r["dataset"] for r in rows} == {"folder"} and [r["source"] for r in rows] == [ds.image_paths[i]
                                                                                            for i in test]  # fmt: skip
    assert (out / "index.html").is_file() and len(list((out / "figures").glob("*.png"))) == 4
    examples = json.loads((run / "class_examples" / "examples.json").read_text())
    assert sorted(examples["files"]) == ["0", "1", "2"]
    # a split it does not have, and the val split
    code, err = _run(delib, [*base, "--data-dir", folders, "--split", "holdout", "--out", tmp_path / "never"], capsys)
    _one_error(code, err, "class folders has no split 'holdout': split must be one of test, val, train")
    assert not (tmp_path / "never").exists()

    # faithfulness on a sample of the run's test split; the part-based protocols refused in one line
    faith = tmp_path / "faith"
    argv = ["--checkpoint", run, "--data-dir", folders, "--out", faith, "--num-images", "3", "--methods", "gradient",
            "random", "--levels", "A", "--steps", "4", "--samples", "4"]  # fmt: skip
    from delib_jax.evaluation.faithfulness_job import main as faithfulness

    code, err = _run(faithfulness, argv, capsys)
    assert code == 0, err
    result = json.loads((faith / "results.json").read_text())
    assert result["images"] == 3 and set(result["levels"]["A"]) == {"gradient", "random"}
    from delib_jax.evaluation.run import main as protocol

    for dataset, ground in (("cub", "part keypoints"), ("ade20k", "object masks")):
        code, err = _run(lambda a, d=dataset: protocol(d, a), ["--checkpoint", run, "--out", tmp_path / "e"], capsys)
        _one_error(code, err, f"was trained on class folders: eval.{dataset}'s protocol needs")
        assert ground in err and not (tmp_path / "e").exists()


KILLER = textwrap.dedent("""
    import os, signal, sys
    from pathlib import Path
    from delib_jax import store as st
    from delib_jax.checkpoint import load_model
    from delib_jax.stream import JobOptions, explain_dataset

    run, data, out = sys.argv[1:4]
    flush, calls = st.ShardWriter.flush, [0]

    def dying_flush(self, **kw):
        calls[0] += 1
        if calls[0] > 2:
            os.kill(os.getpid(), signal.SIGKILL)
        return flush(self, **kw)

    st.ShardWriter.flush = dying_flush
    model, config = load_model(run)
    explain_dataset(model, config, data, Path(out), split="train", options=JobOptions(batch_size=2, workers=0,
                    shard_size=2, progress=False), report=lambda m: None, top_n=3, k=2)
""")


def test_a_killed_explanation_resumes_without_decoding_again(folders, tmp_path, monkeypatch):
    """Killed after two shards of the training split; the same call finishes it, decoding only the images left,
    and gives what an uninterrupted job gives."""
    from delib_jax import _reader, report
    from delib_jax.checkpoint import RunConfig
    from delib_jax.stream import JobOptions, explain_dataset

    ds = load_dataset("folder", folders)
    run = tmp_path / "run"
    config = RunConfig(arch="small", num_classes=3, class_names=list(ds.class_names), dataset="folder", crop=32,
                       resize=36, data_dir=str(folders), data_options=ds.options)  # fmt: skip
    _save_random_run(run, config)
    script = tmp_path / "killer.py"
    script.write_text(KILLER)
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, str(script), str(run), str(folders), str(out)], capture_output=True,
                          text=True, timeout=300, check=False, env={**os.environ, "JAX_PLATFORMS": "cpu"})  # fmt: skip
    assert done.returncode == -signal.SIGKILL, done.stderr
    before = list(st.read_records(out))
    assert len(before) == 4
    decoded, pages = [], []  # images decoded to be explained; for the pages' thumbnails (the hardest images)
    read_rgb, thumbnail = _reader.transforms.read_rgb, report.write_thumbnail

    def counted(path, **kw):
        (pages if getattr(counted, "thumbnail", False) else decoded).append(str(path))
        return read_rgb(path, **kw)

    def counted_thumbnail(*a, **kw):
        counted.thumbnail = True
        try:
            return thumbnail(*a, **kw)
        finally:
            counted.thumbnail = False

    monkeypatch.setattr(_reader.transforms, "read_rgb", counted)
    monkeypatch.setattr(report, "write_thumbnail", counted_thumbnail)
    model, config = load_model(run)
    options = JobOptions(batch_size=2, workers=0, shard_size=2, progress=False)
    summary = explain_dataset(model, config, folders, out, split="train", options=options, report=lambda m: None,
                              top_n=3, k=2)  # fmt: skip
    train = ds.indices("train")
    assert summary.resumed == 4 and summary.explained == len(train) - 4
    assert sorted(decoded) == sorted(ds.image_paths[i] for i in train[4:])  # the finished ones not read again
    assert pages
    monkeypatch.undo()
    reference = tmp_path / "reference"
    explain_dataset(model, config, folders, reference, split="train", options=options, report=lambda m: None,
                    top_n=3, k=2)  # fmt: skip
    resumed = list(delib_jax.load_explanations(out))
    expected = list(delib_jax.load_explanations(reference))
    assert [e.source for e in resumed] == [e.source for e in expected] == [ds.image_paths[i] for i in train]
    for a, b in zip(resumed, expected):
        np.testing.assert_array_equal(a.maps, b.maps)
        assert a.prediction == b.prediction


def _save_random_run(run: Path, config) -> None:
    from flax import nnx

    from delib_jax.checkpoint import RunCheckpoints, build_model, save_run_config

    model = build_model(config, rngs=nnx.Rngs(3))
    model.eval()
    save_run_config(run, config)
    _, params, rest = nnx.split(model, nnx.Param, ...)
    with RunCheckpoints(run) as ckpt:
        ckpt.save("best", 1, params=params, model_state=rest, meta={})


def test_a_tfds_catalog_dataset_trains_and_explains(tmp_path, capsys):
    from delib_jax.testing.catalog import jpeg, prepare

    data = tmp_path / "tensorflow_datasets"
    examples = {split: [(jpeg(_pixels(k % 3, k)), k % 3) for k in range(n)] for split, n in
                (("train", 18), ("test", 6), ("extra", 3))}  # fmt: skip
    prepare("tiny_birds", data, examples, list(CLASSES))
    run = tmp_path / "run"
    argv = ["--tfds", "tiny_birds", "--tfds-data-dir", data, "--out", run, "--steps", "2", *SMALL]
    code, err = _run(lambda a: train("images", a), argv, capsys)
    assert code == 0 and "18 train, 0 val" not in err and "2 val (carved)" in err, err
    assert "its splits extra (not train, validation or test; --tfds-split maps one)" in err
    # its other split taken as the test split, from the command line; bad mappings are one line
    mapped = tmp_path / "mapped"
    base = ["--tfds", "tiny_birds", "--tfds-data-dir", data, "--out", mapped, "--steps", "2", *SMALL]
    twice = "--tfds-split names test twice: give each of train, val and test once"
    for extra, message in [(["test"], "'test' is not OURS=THEIRS"), (["tests=extra"], "'tests=extra' is not OURS"),
                           (["train=train", "test=nope"], "cannot map splits 'nope'"),
                           (["test=extra", "testing=test"], twice)]:  # fmt: skip
        flags = [x for pair in extra for x in ("--tfds-split", pair)]
        code, err = _run(lambda a: train("images", a), [*base, *flags], capsys)
        _one_error(code, err, message)
        assert not mapped.exists()
    flags = ["--tfds-split", "train=train", "--tfds-split", "test=extra"]
    code, err = _run(lambda a: train("images", a), [*base, *flags], capsys)
    assert code == 0 and "16 train, 2 val (carved), 3 test" in err and "its splits test (not mapped)" in err, err
    assert load_run_config(mapped).data_options["splits"] == {"train": "train", "test": "extra"}
    config = load_run_config(run)
    assert config.dataset == "tfds" and config.data_dir == str(data) and config.class_names == list(CLASSES)
    assert config.data_options["name"] == "tiny_birds:1.0.0" and config.data_options["label_feature"] == "label"
    # the hardness head read from the same records
    code, err = _run(hardness_main, ["--checkpoint", run, "--retrain", "--steps", "2", "--no-progress"], capsys)
    assert code == 0, err
    # explained from the records: the figures and the pages' thumbnails too
    out = tmp_path / "explained"
    code, err = _run(delib, ["explain", "--checkpoint", run, "--data-dir", data, "--split", "val", "--out", out,
                             "--workers", "0", "--top-n", "3", "--k", "2", "--no-examples"], capsys)  # fmt: skip
    assert code == 0 and "2 val images of tfds (tfds in" in err, err
    rows = list(st.read_records(out))
    assert len(rows) == 2 and all("::train/" in r["source"] and r["dataset"] == "tfds" for r in rows)
    assert len(list((out / "thumbs").glob("*"))) == 2 and len(list((out / "figures").glob("*.png"))) == 2
    manifest = st.read_manifest(out)
    assert manifest["data"]["options"] == config.data_options
    # the run's own catalog dataset named with --tfds: read with the run's options (the same carved split)
    code, err = _run(delib, ["explain", "--checkpoint", run, "--data-dir", data, "--tfds", "tiny_birds", "--split",
                             "val", "--out", tmp_path / "named", "--workers", "0", "--top-n", "3", "--k", "2",
                             "--no-figures"], capsys)  # fmt: skip
    assert code == 0, err
    assert [r["source"] for r in st.read_records(tmp_path / "named")] == [r["source"] for r in rows]
    # a data folder without the dataset: one line, nothing written
    code, err = _run(delib, ["explain", "--checkpoint", run, "--data-dir", tmp_path, "--out", tmp_path / "never"],
                     capsys)  # fmt: skip
    _one_error(code, err, "no prepared TFDS dataset 'tiny_birds'")
    assert not (tmp_path / "never").exists()
    model, _ = load_model(run)
    assert model.hardness_kind == "head"


def test_the_hardness_head_of_an_imported_run_from_class_folders(folders, tmp_path, capsys):
    """A run imported from weights (no dataset, no hardness predictor) gets its head from class folders whose
    classes it has; data it cannot read is one line, with nothing written."""
    from delib_jax.checkpoint import RunConfig
    from delib_jax.train.hardness import HARDNESS_DIR

    ds = load_dataset("folder", folders)
    run = tmp_path / "imported"
    config = RunConfig(arch="small", num_classes=3, class_names=list(ds.class_names), dataset=None, hardness="none",
                       crop=32, resize=36, imported_from=str(tmp_path / "weights.pth"), batch_size=4,
                       checkpoint_every=2)  # fmt: skip
    _save_random_run(run, config)
    for argv, message in [
        ([], "records no dataset (an imported run): give --dataset cub, ade20k or folder"),
        (["--tfds", "nope", "--tfds-data-dir", tmp_path], "no prepared TFDS dataset 'nope'"),
        (["--dataset", "folder", "--data-dir", tmp_path / "nowhere"], "does not exist"),
        (["--tfds", "nope", "--data-dir", folders], "--tfds NAME names the data: drop --data-dir"),
        (["--dataset", "folder", "--data-dir", folders, "--tfds-split", "test=extra"], "--tfds-split goes with --tfds"),
    ]:
        code, err = _run(hardness_main, ["--checkpoint", run, "--steps", "2", *argv], capsys)
        _one_error(code, err, message)
        assert not (run / HARDNESS_DIR).exists() and load_run_config(run) == config
    code, err = _run(hardness_main, ["--checkpoint", run, "--dataset", "folder", "--data-dir", folders, "--steps", "2",
                                     "--no-progress"], capsys)  # fmt: skip
    assert code == 0, err
    assert load_run_config(run).hardness == "head"
    trained = load_run_config(run / HARDNESS_DIR)
    assert trained.dataset == "folder" and trained.data_options == ds.options


def test_an_imported_classifier_explains_a_split_of_class_folders_of_its_classes(folders, tmp_path, capsys):
    """A classifier imported from weights knows more classes than the folders hold: --dataset folder reads them,
    the folders' classes matched to its own by name (said in one line), records naming the split and example;
    the same command resumes. Folders it cannot match are one line, nothing written; as many classes as it has,
    named otherwise (ImageNet's WordNet IDs), match by index for an imported run only."""
    from delib_jax.checkpoint import RunConfig

    model_names = ["tench", "Red Fox", "grün", "blue jay", "goldfish"]  # the folders': red fox, Blue_jay, grün
    run = tmp_path / "imported"
    config = RunConfig(arch="small", num_classes=5, class_names=model_names, dataset=None, hardness="none", crop=32,
                       resize=36, imported_from=str(tmp_path / "weights.pth"))  # fmt: skip
    _save_random_run(run, config)
    out = tmp_path / "out"
    argv = ["explain", "--checkpoint", run, "--data-dir", folders, "--dataset", "folder", "--split", "test", "--out",
            out, "--workers", "0", "--no-figures", "--top-n", "3", "--k", "2"]  # fmt: skip
    code, err = _run(delib, argv, capsys)
    assert code == 0, err
    assert f"the 3 classes of the class folders in {folders} are matched by name to those of the model of {run} " \
           "(5 classes); 'Blue_jay' is 'blue jay'" in err  # fmt: skip
    ds = load_dataset("folder", folders)
    rows = list(st.read_records(out))
    assert [r["index"] for r in rows] == ds.indices("test").tolist() and {r["split"] for r in rows} == {"test"}
    assert all(r["dataset"] == "folder" for r in rows)
    assert st.read_manifest(out)["data"]["options"] == ds.options
    code, err = _run(delib, argv, capsys)
    assert code == 0 and f"resuming: {len(rows)} images already explained" in err, err
    # with figures: class examples from the folders' training split, under the model's class indices
    code, err = _run(delib, [*argv[:9], "--out", tmp_path / "figures", *argv[11:-5], "--top-n", "3", "--k", "2"],
                     capsys)  # fmt: skip
    assert code == 0 and "class examples: 3 classes, kept in" in err, err
    chosen = json.loads((run / "class_examples" / "examples.json").read_text())["files"]
    assert sorted(map(int, chosen)) == [1, 2, 3]  # red fox, grün, blue jay; not tench or goldfish
    assert len(list((tmp_path / "figures" / "figures").glob("*.png"))) == len(rows)

    for extra, message in [
        ([], "names no dataset: say what"),
        (["--dataset", "folder", "--tfds", "x"], "give --dataset or --tfds NAME, not both"),
    ]:
        code, err = _run(delib, [*argv[:5], *extra, "--out", tmp_path / "never"], capsys)
        _one_error(code, err, message)
    code, err = _run(delib, ["explain", "--checkpoint", run, "--dataset", "folder", "--out", tmp_path / "never",
                             "photo.jpg"], capsys)  # fmt: skip
    _one_error(code, err, "--dataset says what --data-dir holds")
    other = RunConfig(**{**config.__dict__, "class_names": ["tench", "goldfish", "red fox", "carp", "eel"]})
    _save_random_run(tmp_path / "other", other)
    code, err = _run(delib, [*argv[:2], tmp_path / "other", *argv[3:9], "--out", tmp_path / "never"], capsys)
    _one_error(code, err, "has 3 classes and the model of")
    assert " has 5; class 'Blue_jay' is not one of the model's 5 classes" in err
    assert not (tmp_path / "never").exists()

    wnids = RunConfig(**{**config.__dict__, "num_classes": 3, "class_names": ["n01", "n02", "n03"]})
    _save_random_run(tmp_path / "wnids", wnids)
    code, err = _run(delib, [*argv[:2], tmp_path / "wnids", *argv[3:9], "--out", tmp_path / "by_index",
                             *argv[11:]], capsys)  # fmt: skip
    assert code == 0 and "labels are matched by index" in err, err
    trained = RunConfig(**{**wnids.__dict__, "imported_from": None, "dataset": "folder"})
    _save_random_run(tmp_path / "trained", trained)
    code, err = _run(delib, [*argv[:2], tmp_path / "trained", *argv[3:9], "--out", tmp_path / "never"], capsys)
    _one_error(code, err, "are not those of the model of")
    assert not (tmp_path / "never").exists()
    # the same from Python: explain_dataset(..., dataset="folder")
    from delib_jax.stream import JobOptions, explain_dataset

    model, config = load_model(run)
    said = []
    with pytest.raises(ValueError, match="the run names no dataset"):
        explain_dataset(model, config, folders, tmp_path / "never", split="val")
    summary = explain_dataset(model, config, folders, tmp_path / "val", split="val", dataset="folder",
                              options=JobOptions(workers=0, figures=False, progress=False), report=said.append,
                              top_n=3, k=2, score="entropy")  # fmt: skip
    assert summary.explained == len(ds.indices("val")) > 0 and "matched by name" in said[0]
    assert not (tmp_path / "never").exists()
