"""The evaluation protocol end to end on tiny synthetic datasets, the eval CLIs, and `delib demo`."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from delib_jax import checkpoint
from delib_jax.checkpoint import RunConfig
from delib_jax.data import DatasetError, load_ade20k, load_cub, synthetic
from delib_jax.data.transforms import CUB_STATS, IMAGENET_STATS
from delib_jax.evaluation import protocol
from delib_jax.evaluation.run import main
from delib_jax.train.run import fit

pytestmark = pytest.mark.slow  # training runs, then the evaluation jobs and `delib demo` end to end


def _train(tmp: Path, dataset: str) -> Path:
    if dataset == "cub":
        data = synthetic.make_cub(tmp / "data", classes=3, images_per_class=8, size=48, seed=0)
        names, stats = list(load_cub(data).class_names), CUB_STATS
    else:
        data = synthetic.make_ade20k(tmp / "data", scenes=3, images_per_scene=8, size=48, seed=0)
        names, stats = list(load_ade20k(data).scene_names), IMAGENET_STATS
    config = RunConfig(
        arch="small",
        num_classes=len(names),
        class_names=names,
        dataset=dataset,
        crop=32,
        resize=36,
        mean=stats.mean,
        std=stats.std,
        data_dir=str(data),
        synthetic=True,
        optimizer="adamw",
        lr=1e-3,
        schedule="cosine",
        batch_size=8,
        steps=2,
        checkpoint_every=2,
        val_fraction=0.2,
    )
    fit(tmp / "run", config, progress=False, num_threads=2)
    return tmp / "run"


@pytest.fixture(scope="module")
def cub_run(tmp_path_factory):
    return _train(tmp_path_factory.mktemp("cub"), "cub")


def test_eval_cub_cli_writes_tables_plots_and_resumes(cub_run, tmp_path, capsys):
    out = tmp_path / "eval"
    argv = [
        "--checkpoint",
        str(cub_run),
        "--synthetic",
        "--out",
        str(out),
        "--num-images",
        "4",
        "--runs",
        "2",
        "--top-n",
        "3",
        "--k",
        "2",
        "--ablation",
        "attributions",
    ]
    assert main("cub", argv) == 0
    results = json.loads((out / "results.json").read_text())
    assert set(results["table"]) == {"Gradient", "Gradient w/o m^s", "Int. grad.", "Gradient-Hessian", "Random"}
    assert results["table"]["Random"]["runs"] == 2  # the first row's 2 seeds, not every row's
    first = results["results"]["Gradient"][0]
    np.testing.assert_allclose(
        results["table"]["Random"]["mean"][0], 100 * np.nanmean([r[9] for r in first["random_precision"]]), rtol=1e-6
    )
    one = results["results"]["Gradient-Hessian"][0]
    assert one["images"] == 4 and len(one["precision"]) == 90 and len(one["random_precision"]) == 2
    assert len(one["random_keypoint_auc"]) == 2
    assert set(results["keypoint_auc"]) == set(results["table"])
    assert "keypoint AUC" in capsys.readouterr().out
    assert all(v is None or 0 <= v <= 1 for v in [one["keypoint_auc"], *one["random_keypoint_auc"]])
    finite = np.asarray(one["precision"], float)
    assert np.all((finite[~np.isnan(finite)] >= 0) & (finite[~np.isnan(finite)] <= 1))
    table = (out / "table.md").read_text()
    assert "| Gradient w/o m^s |" in table and "| Random |" in table and "10%" in table
    for name in ("precision_recall.png", "precision_coverage.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # a second run reuses every finished (checkpoint, setting) result
    capsys.readouterr()
    assert main("cub", argv) == 0
    assert capsys.readouterr().err.count("reusing") == 4


def _strict_json(path: Path):
    """Parse ``path`` refusing the non-standard NaN / Infinity tokens."""

    def refuse(token):
        raise AssertionError(f"{path} holds {token}: not strict JSON")

    return json.loads(path.read_text(), parse_constant=refuse)


def test_eval_random_baseline_covers_every_checkpoint(cub_run, tmp_path):
    """Two runs (here a copy of one checkpoint): the method row has 2 runs, the random row 2 x --runs seeds."""
    copy = shutil.copytree(cub_run, tmp_path / "copy")
    out = tmp_path / "eval"
    argv = [
        "--checkpoint",
        str(cub_run),
        str(copy),
        "--synthetic",
        "--out",
        str(out),
        "--num-images",
        "3",
        "--runs",
        "2",
        "--top-n",
        "3",
        "--k",
        "2",
    ]
    assert main("cub", argv) == 0
    table = json.loads((out / "results.json").read_text())["table"]
    assert table["Hardness + gradient-Hessian"]["runs"] == 2 and table["Random"]["runs"] == 4


def test_eval_counts_a_run_given_twice_once(cub_run, tmp_path, capsys):
    out = tmp_path / "eval"
    argv = [
        "--checkpoint",
        str(cub_run),
        f"{cub_run}/",
        str(cub_run / ".." / cub_run.name),
        "--synthetic",
        "--out",
        str(out),
        "--num-images",
        "3",
        "--runs",
        "1",
        "--top-n",
        "3",
        "--k",
        "2",
    ]
    assert main("cub", argv) == 0
    table = json.loads((out / "results.json").read_text())["table"]
    assert table["Hardness + gradient-Hessian"]["runs"] == 1 and table["Random"]["runs"] == 1
    assert capsys.readouterr().err.count("counted once") == 2


def test_eval_ade20k_cli(tmp_path, capsys):
    run = _train(tmp_path, "ade20k")
    out = tmp_path / "eval"
    assert (
        main(
            "ade20k",
            [
                "--checkpoint",
                str(run),
                "--synthetic",
                "--out",
                str(out),
                "--num-images",
                "3",
                "--runs",
                "1",
                "--top-n",
                "3",
                "--k",
                "2",
                "--fraction",
                "0.2",
            ],
        )
        == 0
    )
    results = json.loads((out / "results.json").read_text())
    iou = np.asarray(results["results"]["Hardness + gradient-Hessian"][0]["iou"], float)
    assert iou.shape == (90,) and np.all((iou >= 0) & (iou <= 1))
    assert (out / "iou.png").is_file() and (out / "ade_object_presence.npy").is_file()
    assert (out / "ade_object_presence.key").is_file()
    masks = sorted((tmp_path / "data").rglob("ADE_val_*.png"))  # validation masks: a label beyond the 150 objects
    for val in masks:
        mask = np.asarray(Image.open(val)).copy()
        mask[mask.shape[0] // 2, mask.shape[1] // 2] = 200  # the centre survives the evaluation crop
        Image.fromarray(mask).save(val)
    assert (
        main(
            "ade20k",
            [
                "--checkpoint",
                str(run),
                "--synthetic",
                "--out",
                str(tmp_path / "eval2"),
                "--num-images",
                "3",
                "--runs",
                "1",
                "--top-n",
                "3",
                "--k",
                "2",
                "--fraction",
                "0.2",
            ],
        )
        == 2
    )
    err = capsys.readouterr().err
    assert any(str(m) in err for m in masks) and "exceed" in err and "Traceback" not in err


def _eval_argv(run: Path, out: Path, *extra: str) -> list[str]:
    return [
        "--checkpoint",
        str(run),
        "--synthetic",
        "--out",
        str(out),
        "--num-images",
        "3",
        "--runs",
        "1",
        "--top-n",
        "3",
        "--k",
        "2",
        *extra,
    ]


def test_eval_nan_model_is_an_error(cub_run, tmp_path, monkeypatch, capsys):
    """A diverged run (NaN parameters) is refused in one line naming the checkpoint, not tabulated as '-'."""
    load = checkpoint.load_model

    def nan_model(run_dir, **kw):
        model, config = load(run_dir, **kw)
        nnx.update(model, jax.tree.map(lambda x: jnp.full_like(x, jnp.nan), nnx.state(model, nnx.Param)))
        return model, config

    monkeypatch.setattr(checkpoint, "load_model", nan_model)
    assert main("cub", _eval_argv(cub_run, tmp_path / "eval")) == 2
    err = capsys.readouterr().err
    assert "outputs are not finite" in err and str(cub_run) in err and "Traceback" not in err
    assert not (tmp_path / "eval" / "results.json").exists()


def test_eval_without_insecurities_warns_and_writes_strict_json(cub_run, tmp_path, monkeypatch, capsys, request):
    """No insecurities: a warning naming the run and row, a note in results.json, NaN written as null (read back)."""
    found = protocol._insecurity_maps

    def none_found(*args):
        valid, pairs, maps, grid, finite = found(*args)
        return valid & False, pairs, maps, grid, finite

    monkeypatch.setattr(protocol, "_insecurity_maps", none_found)
    protocol._cub_step.cache_clear()  # compiled steps traced the real function
    request.addfinalizer(protocol._cub_step.cache_clear)  # and later tests must not reuse this one
    out = tmp_path / "eval"
    assert main("cub", _eval_argv(cub_run, out)) == 0
    err = capsys.readouterr().err
    assert "warning: no insecurities for Hardness + gradient-Hessian" in err and str(cub_run) in err
    results = _strict_json(out / "results.json")
    assert len(results["notes"]) == 1 and "table row is empty" in results["notes"][0]
    assert results["results"]["Hardness + gradient-Hessian"][0]["precision"][0] is None
    (cache,) = (out / "partial").glob("*.json")
    _strict_json(cache)
    assert main("cub", _eval_argv(cub_run, out)) == 0  # the cached nulls read back
    err = capsys.readouterr().err
    assert "reusing" in err and "warning: no insecurities" in err


def test_eval_recomputes_damaged_partial_results(cub_run, tmp_path, capsys):
    out = tmp_path / "eval"
    assert main("cub", _eval_argv(cub_run, out)) == 0
    (cache,) = (out / "partial").glob("*.json")
    good = json.loads(cache.read_text())
    for damage in (cache.read_text()[:40], "{}", json.dumps({**good, "precision": [0.5]})):
        cache.write_text(damage)
        capsys.readouterr()
        assert main("cub", _eval_argv(cub_run, out)) == 0
        err = capsys.readouterr().err
        assert f"note: {cache} is damaged" in err and "recomputing" in err and "Traceback" not in err
        assert json.loads(cache.read_text())["precision"] == good["precision"]


def test_eval_refuses_a_dataset_with_other_classes(cub_run, tmp_path, capsys):
    """Same number of classes, one named differently: refused, naming the first differing class."""
    data = shutil.copytree(Path(checkpoint.load_run_config(cub_run).data_dir).parent, tmp_path / "data")
    (classes,) = data.rglob("classes.txt")
    lines = classes.read_text().splitlines()
    lines[1] = "2 002.Another_Bird"
    classes.write_text("\n".join(lines) + "\n")
    argv = _eval_argv(cub_run, tmp_path / "eval")
    argv[argv.index("--synthetic")] = "--data-dir=" + str(data)
    assert main("cub", argv) == 2
    err = capsys.readouterr().err
    assert "class 1" in err and "002.Another_Bird" in err and "Traceback" not in err


def test_eval_out_that_cannot_be_created(cub_run, tmp_path, capsys):
    (tmp_path / "afile").write_text("hi")
    assert main("cub", _eval_argv(cub_run, tmp_path / "afile" / "sub")) == 2
    err = capsys.readouterr().err
    assert "cannot create --out" in err and "afile" in err and "Traceback" not in err


@pytest.mark.parametrize("error,status", [(KeyboardInterrupt, 130), (ValueError("corrupt checkpoint x"), 2)])
def test_eval_interrupted_or_unloadable(cub_run, tmp_path, monkeypatch, capsys, error, status):
    """Ctrl-C: exit 130 saying where finished results are kept; a checkpoint load error: one line, exit 2."""

    def fail(*args, **kw):
        raise error

    monkeypatch.setattr(checkpoint, "load_model", fail)
    out = tmp_path / "eval"
    assert main("cub", _eval_argv(cub_run, out)) == status
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("data: ")]  # data form read
    assert "Traceback" not in err and len(lines) == 1
    assert (str(out / "partial") in err) if status == 130 else "corrupt checkpoint x" in err


def _ade(tmp: Path, seed: int):
    return load_ade20k(synthetic.make_ade20k(tmp / f"ade{seed}", scenes=3, images_per_scene=4, size=48, seed=seed))


def test_ade_object_presence_cache_is_keyed_by_dataset(tmp_path, monkeypatch):
    """A cache made from one dataset is rebuilt for another with as many training images, then reused."""
    a, b = _ade(tmp_path, 0), _ade(tmp_path, 1)
    assert a.is_train.sum() == b.is_train.sum()
    cache = tmp_path / "out" / "ade_object_presence.npy"
    first = protocol.ade_object_presence(a, cache)
    notes = []
    second = protocol.ade_object_presence(b, cache, notes.append)
    assert not np.array_equal(first, second) and len(notes) == 1 and "rebuilding" in notes[0]
    np.testing.assert_array_equal(second, protocol.ade_object_presence(b))

    def unread(*args):
        raise AssertionError("the cache of the same dataset should be reused")

    monkeypatch.setattr(protocol, "_training_labels", unread)
    np.testing.assert_array_equal(protocol.ade_object_presence(b, cache), second)


@pytest.mark.parametrize(
    "damage,message",
    [("small", "mask is 10x10"), ("rgb", "one-channel"), ("label", "label 250 exceeds the 150 objects")],
)
def test_ade_training_masks_are_validated(tmp_path, damage, message):
    ds = _ade(tmp_path, 0)
    path = ds.mask_paths[int(np.flatnonzero(ds.is_train)[0])]
    with Image.open(path) as image:
        mask = image.copy()
    if damage == "small":
        mask.resize((10, 10)).save(path)
    elif damage == "rgb":
        mask.convert("RGB").save(path)
    else:
        values = np.asarray(mask).copy()
        values[0, 0] = 250
        Image.fromarray(values).save(path)
    with pytest.raises(DatasetError, match=message) as e:
        protocol.ade_object_presence(ds)
    assert str(e.value).startswith(path)


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--checkpoint", "/nonexistent/run", "--synthetic", "--out", "x"], "not found"),
        (["--checkpoint", ".", "--out", "x"], "--data-dir"),
    ],
)
def test_eval_cli_errors(argv, message, capsys):
    assert main("cub", argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_eval_cli_rejects_bad_options(cub_run, tmp_path, capsys):
    assert main("cub", ["--checkpoint", str(cub_run), "--synthetic", "--out", str(tmp_path), "--k", "7"]) == 2
    assert "--k must lie between 2 and --top-n" in capsys.readouterr().err
    # k within --top-n but above the run's 3 classes: refused before any image is ranked or explained
    argv = ["--checkpoint", str(cub_run), "--synthetic", "--out", str(tmp_path / "k"), "--top-n", "5", "--k", "4"]
    assert main("cub", argv) == 2
    err = capsys.readouterr().err
    assert "--k 4 needs at least 4 class maps" in err and "3 classes" in err and "Traceback" not in err
    assert not (tmp_path / "k" / "partial").exists() or not any((tmp_path / "k" / "partial").iterdir())


def test_delib_demo_end_to_end_and_reuse(tmp_path):
    cmd = [
        sys.executable,
        "-c",
        "from delib_jax.cli import main; raise SystemExit(main())",
        "demo",
        "--out",
        str(tmp_path),
        "--epochs",
        "1",
        "--num-images",
        "4",
        "--explain-images",
        "2",
        "--crop",
        "64",
    ]
    first = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert first.returncode == 0, first.stderr[-3000:]
    assert (tmp_path / "explain" / "index.html").is_file()
    assert (tmp_path / "eval" / "table.md").is_file()
    assert "report:" in first.stdout
    second = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "training already done" in second.stderr and "explanations already in" in second.stderr
    assert "reusing" in second.stderr


@pytest.mark.parametrize("flag", [["--crop", "500"], ["--epochs", "0"]])
def test_delib_demo_refuses_impossible_options(tmp_path, flag):
    cmd = [
        sys.executable,
        "-c",
        "from delib_jax.cli import main; raise SystemExit(main())",
        "demo",
        "--out",
        str(tmp_path / "d"),
        *flag,
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert flag[0] in done.stderr
    assert not (tmp_path / "d" / "run").exists()


def test_eval_reads_a_tfds_build_of_the_run_data_with_the_same_results(cub_run, tmp_path, capsys):
    from delib_jax.data.tfds import build

    found, _ = build("cub", checkpoint.load_run_config(cub_run).data_dir, tmp_path / "tfds", num_threads=1)
    assert main("cub", _eval_argv(cub_run, tmp_path / "folder")) == 0
    assert "release folder" in capsys.readouterr().err
    assert main("cub", _eval_argv(cub_run, tmp_path / "tfds_eval", "--data-dir", str(tmp_path / "tfds"))) == 0
    assert "data: TFDS build delib_cub/original" in capsys.readouterr().err
    a, b = (json.loads((tmp_path / d / "results.json").read_text())["results"] for d in ("folder", "tfds_eval"))
    for row in a:
        for key in ("images", "insecurities", "precision", "recall", "random_precision", "keypoint_auc"):
            assert a[row][0][key] == b[row][0][key], (row, key)


def test_delib_demo_data_dir_that_is_neither_a_release_nor_a_build(tmp_path):
    cmd = [
        sys.executable,
        "-c",
        "from delib_jax.cli import main; raise SystemExit(main())",
        "demo",
        "--out",
        str(tmp_path / "d"),
        "--data-dir",
        str(tmp_path),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "not a CUB-200-2011 release" in done.stderr and "nor a TFDS build" in done.stderr
    assert not (tmp_path / "d" / "run").exists()


def test_eval_normalising_on_the_device_gives_the_host_normalised_results(cub_run, monkeypatch):
    """The protocol reads uint8 batches and normalises them in its compiled steps: its curves equal those of the
    float32 batches normalised on the host (as the pipeline gave them before)."""
    from delib_jax.data import pipeline

    model, config = checkpoint.load_model(cub_run)
    dataset = load_cub(config.data_dir)
    options = protocol.EvalOptions(num_images=6, batch_size=4, runs=2, top_n=3, k=2)
    seen = []

    def spy(source, **kw):
        seen.append(kw["normalize"])
        return pipeline.eval_pipeline(source, **kw)

    monkeypatch.setattr(protocol, "eval_pipeline", spy)
    on_device = protocol.evaluate_cub(model, config, dataset, protocol.FULL, options)
    assert seen and not any(seen)  # every batch of the protocol came as uint8
    monkeypatch.setattr(
        protocol, "eval_pipeline", lambda source, **kw: pipeline.eval_pipeline(source, **{**kw, "normalize": True})
    )
    on_host = protocol.evaluate_cub(model, config, dataset, protocol.FULL, options)
    assert on_device["insecurities"] == on_host["insecurities"] > 0
    for key in ("precision", "recall", "random_precision"):
        np.testing.assert_allclose(
            np.asarray(on_device[key], float), np.asarray(on_host[key], float), rtol=1e-5, atol=1e-7, equal_nan=True
        )
