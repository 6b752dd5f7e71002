"""`python -m eval.interactions` end to end on a tiny synthetic run, and its one-line errors."""

import json

import numpy as np
import pytest

from delib_jax.checkpoint import RunConfig
from delib_jax.data import load_cub, synthetic
from delib_jax.data.transforms import CUB_STATS
from delib_jax.evaluation.interactions_job import main
from delib_jax.train.run import fit


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("interactions")
    data = synthetic.make_cub(tmp / "data", classes=3, images_per_class=6, size=40, seed=0)
    config = RunConfig(
        arch="small",
        num_classes=3,
        class_names=list(load_cub(data).class_names),
        dataset="cub",
        crop=32,
        resize=36,
        mean=CUB_STATS.mean,
        std=CUB_STATS.std,
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
