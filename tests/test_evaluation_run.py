"""The evaluation protocol end to end on tiny synthetic datasets, the eval CLIs, and `delib demo`."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from delib_jax.checkpoint import RunConfig
from delib_jax.data import load_ade20k, load_cub, synthetic
from delib_jax.data.transforms import CUB_STATS, IMAGENET_STATS
from delib_jax.evaluation.run import main
from delib_jax.train.run import fit


def _train(tmp: Path, dataset: str) -> Path:
    if dataset == "cub":
        data = synthetic.make_cub(tmp / "data", classes=3, images_per_class=8, size=48, seed=0)
        names, stats = list(load_cub(data).class_names), CUB_STATS
    else:
        data = synthetic.make_ade20k(tmp / "data", scenes=3, images_per_scene=8, size=48, seed=0)
        names, stats = list(load_ade20k(data).scene_names), IMAGENET_STATS
    config = RunConfig(
        arch="small", num_classes=len(names), class_names=names, dataset=dataset, crop=32, resize=36,
        mean=stats.mean, std=stats.std, data_dir=str(data), synthetic=True, optimizer="adamw", lr=1e-3,
        schedule="cosine", batch_size=8, steps=2, checkpoint_every=2, val_fraction=0.2,
    )
    fit(tmp / "run", config, progress=False, num_threads=2)
    return tmp / "run"


@pytest.fixture(scope="module")
def cub_run(tmp_path_factory):
    return _train(tmp_path_factory.mktemp("cub"), "cub")


def test_eval_cub_cli_writes_tables_plots_and_resumes(cub_run, tmp_path, capsys):
    out = tmp_path / "eval"
    argv = ["--checkpoint", str(cub_run), "--synthetic", "--out", str(out), "--num-images", "4", "--runs", "2",
            "--top-n", "3", "--k", "2", "--ablation", "attributions"]
    assert main("cub", argv) == 0
    results = json.loads((out / "results.json").read_text())
    assert set(results["table"]) == {"Gradient", "Gradient w/o m^s", "Int. grad.", "Gradient-Hessian", "Random"}
    assert results["table"]["Random"]["runs"] == 2  # the first row's 2 seeds, not every row's
    first = results["results"]["Gradient"][0]
    np.testing.assert_allclose(results["table"]["Random"]["mean"][0], 100 * np.nanmean(
        [r[9] for r in first["random_precision"]]), rtol=1e-6)
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


def test_eval_random_baseline_covers_every_checkpoint(cub_run, tmp_path):
    """Two runs (here the same checkpoint twice): the method row has 2 runs, the random row 2 x --runs seeds."""
    out = tmp_path / "eval"
    argv = ["--checkpoint", str(cub_run), str(cub_run), "--synthetic", "--out", str(out), "--num-images", "3",
            "--runs", "2", "--top-n", "3", "--k", "2"]
    assert main("cub", argv) == 0
    table = json.loads((out / "results.json").read_text())["table"]
    assert table["Hardness + gradient-Hessian"]["runs"] == 2 and table["Random"]["runs"] == 4


def test_eval_ade20k_cli(tmp_path):
    run = _train(tmp_path, "ade20k")
    out = tmp_path / "eval"
    assert main("ade20k", ["--checkpoint", str(run), "--synthetic", "--out", str(out), "--num-images", "3",
                           "--runs", "1", "--top-n", "3", "--k", "2", "--fraction", "0.2"]) == 0
    results = json.loads((out / "results.json").read_text())
    iou = np.asarray(results["results"]["Hardness + gradient-Hessian"][0]["iou"], float)
    assert iou.shape == (90,) and np.all((iou >= 0) & (iou <= 1))
    assert (out / "iou.png").is_file() and (out / "ade_object_presence.npy").is_file()


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
    assert "k" in capsys.readouterr().err


def test_delib_demo_end_to_end_and_reuse(tmp_path):
    cmd = [sys.executable, "-c", "from delib_jax.cli import main; raise SystemExit(main())", "demo",
           "--out", str(tmp_path), "--epochs", "1", "--num-images", "4", "--explain-images", "2", "--crop", "64"]
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
    cmd = [sys.executable, "-c", "from delib_jax.cli import main; raise SystemExit(main())", "demo", "--out",
           str(tmp_path / "d"), *flag]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert flag[0] in done.stderr
    assert not (tmp_path / "d" / "run").exists()
