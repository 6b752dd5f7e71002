"""`python -m eval.interactions` end to end on a tiny synthetic run, and its one-line errors."""

import json

import numpy as np
import pytest

from delib_jax.evaluation.interactions_job import main


@pytest.fixture
def run_dir(small_cub_run):
    return small_cub_run  # tests/conftest.py


@pytest.mark.slow
def test_cli_writes_residuals_agreement_deletion_and_figures(run_dir, tmp_path):
    out = tmp_path / "inter"
    argv = ["--checkpoint", str(run_dir), "--synthetic", "--out", str(out), "--num-images", "2", "--pool", "4",
            "--references", "2", "--nodes", "8", "--samples", "8", "--pairs", "3"]  # fmt: skip
    assert main(argv) == 0
    r = json.loads((out / "results.json").read_text())
    assert r["images"] == 2 and len(r["deletion_top_pairs"]) == 4 and len(r["deletion_random_pairs"]) == 4
    assert r["deletion_top_pairs"][0] == pytest.approx(r["deletion_random_pairs"][0])  # nothing deleted yet
    assert np.isfinite(r["residual_integrated"]["mean"]) and r["residual_integrated"]["mean"] < 0.5
    assert set(r["agreement"]) == {"integrated_vs_expected", "integrated_vs_smoothhess", "expected_vs_smoothhess"}
    for name in ("table.md", "deletion.png", "insecurity.png"):
        assert (out / name).stat().st_size > 0
    # a second run reads the finished images back
    assert main(argv) == 0
    assert json.loads((out / "results.json").read_text())["residual_integrated"] == r["residual_integrated"]


@pytest.mark.slow
def test_bad_input_is_one_line(run_dir, tmp_path, capsys):
    assert main(["--checkpoint", str(tmp_path / "missing"), "--synthetic", "--out", str(tmp_path / "o")]) == 2
    assert main(["--checkpoint", str(run_dir), "--synthetic", "--out", str(tmp_path / "o"), "--pool", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0].startswith("error: checkpoint run directory not found")
    assert err[-1].startswith("error: --pool must be at least")
