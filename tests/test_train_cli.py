"""``python -m train.cub`` / ``train.ade20k``: clear one-line errors with exit status 2, and a one-step smoke run."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from delib_jax.data.synthetic import make_cub
from delib_jax.train.cli import main

ROOT = Path(__file__).resolve().parents[1]


def _run(*args, timeout=300, cache: Path | None = None):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    if cache is not None:  # a persistent compilation cache shared by the subprocesses of one test
        env.update(JAX_COMPILATION_CACHE_DIR=str(cache), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    return subprocess.run(
        [sys.executable, "-m", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )


@pytest.mark.slow
def test_without_data_dir_says_how_to_point_at_cub():
    out = _run("train.cub")
    assert out.returncode == 2
    assert "Traceback" not in out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    assert "--data-dir" in lines[0] and "CUB_200_2011" in lines[0] and "--synthetic" in lines[0]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--data-dir", "{tmp}/nowhere", "--out", "{tmp}/run"], "does not exist"),
        (["--synthetic", "--out", "{tmp}/run", "--resume"], "nothing to resume"),
        (["--synthetic", "--out", "{tmp}/run", "--weights", "{tmp}/missing.safetensors"], "no such file"),
        (["--synthetic", "--out", "{tmp}/run", "--batch-size", "0"], "--batch-size must be >= 1"),
        (["--synthetic"], "--out"),
        (["--data-dir", "{tmp}"], "--out"),
        (["--data-dir", "{tmp}", "--out", "{tmp}/run"], "not a CUB-200-2011 release"),
        (["--synthetic", "--out", "{tmp}/run", "--momentum", "nan"], "--momentum must lie in [0, 1), got nan"),
        (["--synthetic", "--out", "{tmp}/run", "--weight-decay", "-1"], "--weight-decay must be finite and >= 0"),
        (["--synthetic", "--out", "{tmp}/run", "--lr", "inf"], "--lr must be positive and finite"),
        (["--synthetic", "--out", "{tmp}/run", "--crop", "4"], "--crop 4 is too small for --arch small"),
        (["--synthetic", "--out", "{tmp}/run", "--arch", "vgg16", "--crop", "16"], "use --crop 32 or more"),
        (["--synthetic", "--out", "{tmp}/afile"], "--out {tmp}/afile is a file"),
        (["--synthetic", "--out", "{tmp}/afile/sub"], "cannot be created: {tmp}/afile is a file"),
        (["--synthetic", "--out", "/proc/delib_x"], "--out /proc/delib_x cannot be created"),
    ],
)
def test_clear_errors(argv, message, tmp_path, capsys):
    (tmp_path / "afile").write_text("hi")
    assert main("cub", [a.format(tmp=tmp_path) for a in argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message.format(tmp=tmp_path) in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "run").exists() and not (tmp_path / "synthetic_data").exists()


def test_bad_flags_exit_2(capsys):
    with pytest.raises(SystemExit) as e:
        main("cub", ["--arch", "resnet9"])
    assert e.value.code == 2
    assert "invalid choice: 'resnet9'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main("ade20k", ["--epochs", "2", "--steps", "3"])
    assert e.value.code == 2


def test_ade20k_without_data_dir(capsys):
    assert main("ade20k", []) == 2
    err = capsys.readouterr().err
    assert "ADEChallengeData2016" in err and "--synthetic" in err


@pytest.mark.slow
def test_one_step_synthetic_run_end_to_end(tmp_path):
    data = tmp_path / "data"
    make_cub(data, classes=3, images_per_class=8, size=48)  # a tiny synthetic release already present: reused
    run = tmp_path / "run"
    common = ["--synthetic", "--data-dir", str(data), "--out", str(run), "--no-progress", "--threads", "2"]
    out = _run(
        "train.cub",
        *common,
        "--steps",
        "1",
        "--batch-size",
        "4",
        "--crop",
        "32",
        "--checkpoint-every",
        "1",
        cache=tmp_path / "jax_cache",
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "done: 1 steps" in out.stdout and "test accuracy" in out.stdout
    config = json.loads((run / "config.json").read_text())
    assert config["arch"] == "small" and config["num_classes"] == 3 and config["crop"] == 32 and config["synthetic"]
    assert config["resize"] == 37  # --crop alone keeps the 224/256 crop/resize ratio
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["split"] for r in records] == ["train", "val", "test"]
    assert (run / "checkpoints" / "latest" / "1").is_dir() and (run / "checkpoints" / "best" / "1").is_dir()
    # the finished run: --resume has nothing left to do, a new run over it is refused, conflicting flags too
    again = _run("train.cub", "--out", str(run), "--resume", "--no-progress", cache=tmp_path / "jax_cache")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "done: 1 steps" in again.stdout
    assert main("cub", common + ["--steps", "1"]) == 2
    assert main("cub", ["--out", str(run), "--resume", "--lr", "0.1"]) == 2


@pytest.mark.slow
def test_a_bad_weights_file_is_the_first_and_only_line(tmp_path):
    """The error comes before anything else the command would print (the dataset's line, torch's warnings)."""
    make_cub(tmp_path / "data", classes=3, images_per_class=4, size=40)
    (tmp_path / "bad.pth").write_bytes(b"this is not a torch file")
    out = _run("train.cub", "--data-dir", str(tmp_path / "data"), "--out", str(tmp_path / "run"), "--arch", "small",
               "--steps", "1", "--batch-size", "4", "--weights", str(tmp_path / "bad.pth"))  # fmt: skip
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2 and len(lines) == 1, out.stderr
    assert lines[0].startswith("error: weights file") and "bad.pth" in lines[0]
