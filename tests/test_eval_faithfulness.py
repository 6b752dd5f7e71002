"""`python -m eval.faithfulness` end to end on a tiny synthetic run, and its one-line errors."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from delib_jax.data import synthetic
from delib_jax.evaluation.faithfulness_job import LABELS, METHODS, main

pytestmark = pytest.mark.slow  # a training run, then the faithfulness job end to end


@pytest.fixture
def run_dir(small_cub_run):
    return small_cub_run  # tests/conftest.py


def test_cli_writes_table_curves_and_plots(run_dir, tmp_path, capsys):
    out = tmp_path / "faith"
    argv = [
        "--checkpoint",
        str(run_dir),
        "--synthetic",
        "--out",
        str(out),
        "--num-images",
        "3",
        "--steps",
        "4",
        "--samples",
        "3",
        "--ig-steps",
        "3",
        "--batch-size",
        "2",
    ]
    assert main(argv) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["images"] == 3 and set(results["levels"]) == {"A", "pixels"}
    for rows in results["levels"].values():
        assert list(rows) == list(METHODS)
        for row in rows.values():
            assert len(row["deletion_curve"]) == 5 and len(row["insertion_curve"]) == 5
            assert 0 <= row["deletion_auc"]["mean"] <= 1 and 0 <= row["insertion_auc"]["mean"] <= 1
            assert row["infidelity_subset"]["mean"] >= 0 and row["infidelity_gaussian"]["se"] >= 0
            # every curve starts at the unperturbed prediction (deletion) or the baseline (insertion), alike for all
            assert row["deletion_curve"][0] == pytest.approx(rows["random"]["deletion_curve"][0], rel=1e-5)
            assert row["insertion_curve"][-1] == pytest.approx(row["deletion_curve"][0], rel=1e-5)
            np.testing.assert_allclose(
                row["deletion_auc"]["mean"], np.trapezoid(row["deletion_curve"], dx=0.25), rtol=1e-5
            )
    table = (out / "table.md").read_text()
    for m in METHODS:
        assert f"| {LABELS[m]} |" in table
    for name in ("deletion_A.png", "insertion_A.png", "deletion_pixels.png", "insertion_pixels.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "Deletion AUC" in capsys.readouterr().out


@pytest.mark.parametrize(
    "extra, match",
    [
        ([], "give --data-dir"),
        (["--synthetic", "--methods", "lrp"], "unknown method 'lrp'"),
        (["--synthetic", "--levels", "B"], "unknown level 'B'"),
        (["--synthetic", "--num-images", "0"], "--num-images must be at least 1"),
        (["--synthetic", "--samples", "1"], "--samples must be at least 2"),
    ],
)
def test_bad_input_is_one_line_exit_2(run_dir, tmp_path, capsys, extra, match):
    assert main(["--checkpoint", str(run_dir), "--out", str(tmp_path / "o"), *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and match in err[0], err


def test_bad_folders_are_one_line(run_dir, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main(["--checkpoint", str(run_dir), "--synthetic", "--out", str(blocker / "out")]) == 2
    assert "cannot create --out" in capsys.readouterr().err
    assert main(["--checkpoint", str(tmp_path / "missing"), "--synthetic", "--out", str(tmp_path / "o")]) == 2
    assert "not found" in capsys.readouterr().err
    other = tmp_path / "other"
    synthetic.make_cub(other, classes=2, images_per_class=2, size=40, seed=1)
    assert (
        main(["--checkpoint", str(run_dir), "--data-dir", str(other / "CUB_200_2011"), "--out", str(tmp_path / "o")])
        == 2
    )
    assert "does not have the run's 3 classes" in capsys.readouterr().err


def test_entry_point_runs_as_a_module(tmp_path):
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "eval.faithfulness",
            "--checkpoint",
            str(tmp_path / "none"),
            "--synthetic",
            "--out",
            str(tmp_path / "o"),
        ],
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parents[1],
        timeout=300,
    )
    assert done.returncode == 2 and done.stderr.strip().splitlines() == [
        f"error: checkpoint run directory not found: {tmp_path / 'none'}"
    ]


def test_interrupted_run_continues_to_the_same_results(run_dir, tmp_path, monkeypatch, capsys):
    """Ctrl-C keeps the finished batches; the same command continues from them (a damaged one is computed again)
    to the results of an uninterrupted run; other options start afresh."""
    from delib_jax.evaluation import faithfulness_job as job

    argv = [
        "--checkpoint",
        str(run_dir),
        "--synthetic",
        "--num-images",
        "5",
        "--steps",
        "3",
        "--samples",
        "2",
        "--ig-steps",
        "2",
        "--batch-size",
        "2",
        "--methods",
        "gradient",
        "random",
    ]
    assert main([*argv, "--out", str(tmp_path / "straight")]) == 0
    straight = json.loads((tmp_path / "straight" / "results.json").read_text())

    real, calls = job._batch_scores, []

    def interrupt_third(*args, **kw):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args, **kw)

    out = tmp_path / "resumed"
    monkeypatch.setattr(job, "_batch_scores", interrupt_third)
    capsys.readouterr()
    assert main([*argv, "--out", str(out)]) == 130
    assert "finished batches are kept" in capsys.readouterr().err
    assert sorted(p.name for p in (out / "partial").glob("batch-*.npz")) == ["batch-00000.npz", "batch-00001.npz"]
    assert not (out / "results.json").exists()
    (out / "partial" / "batch-00001.npz").write_bytes(b"damaged")
    calls.clear()
    monkeypatch.setattr(job, "_batch_scores", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    assert main([*argv, "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert len(calls) == 2 and "resuming: 2 finished batches" in err, err  # batches 1 and 2 computed
    assert json.loads((out / "results.json").read_text())["levels"] == straight["levels"]
    calls.clear()
    assert main([*argv[:-1], "--out", str(out)]) == 0  # methods: gradient only
    assert len(calls) == 3 and "starting afresh" in capsys.readouterr().err
