"""Long jobs without a terminal: a progress line every N seconds; Ctrl-C keeps finished work and says how to go on."""

import io
import re
import time

import pytest

from delib_jax.progress import LineProgress, duration, progress_bar, progress_line


def test_progress_line_reads_done_total_rate_and_time_left():
    assert progress_line("explain", 120, 300, "img", 10.0) == "explain: 120/300 img (40%), 12 img/s, 15s left"
    assert progress_line("train", 30, 100, "step", 10.0, start=20) == "train: 30/100 step (30%), 1 step/s, 1m10s left"
    assert progress_line("x", 5, 5, "img", 125.0).endswith("done in 2m05s")
    assert duration(7500) == "2h05m"


def test_line_progress_prints_every_interval_and_at_the_end():
    out = io.StringIO()
    bar = LineProgress(total=4, desc="explain", unit="img", every=0.05, file=out)
    bar.update(1)
    assert out.getvalue() == ""  # not yet: the interval has not passed
    time.sleep(0.06)
    bar.update(1)
    bar.update(1)  # within the interval: no line
    bar.close()  # the last state, once
    bar.close()
    lines = out.getvalue().splitlines()
    assert len(lines) == 2 and lines[0].startswith("explain: 2/4 img (50%)") and "left" in lines[0]
    assert re.match(r"explain: 3/4 img \(75%\), [\d.e+]+ img/s", lines[1])


def test_without_a_terminal_the_bar_is_a_line_printer(capsys):
    bar = progress_bar(range(3), desc="evaluating", unit="batch")  # capsys: stderr is no TTY
    assert isinstance(bar, LineProgress)
    assert list(bar) == [0, 1, 2]
    assert capsys.readouterr().err.strip().startswith("evaluating: 3/3 batch (100%)")
    assert not isinstance(progress_bar(total=3, disable=True), LineProgress)


# ------------------------------------------------------------------------------------------------ delib explain


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory):
    import numpy as np
    from flax import nnx
    from PIL import Image

    from delib_jax.checkpoint import RunCheckpoints, RunConfig, build_model, save_run_config

    root = tmp_path_factory.mktemp("progress")
    config = RunConfig(arch="small", num_classes=4, class_names=list("abcd"), crop=48, resize=56)
    save_run_config(root / "run", config)
    model = build_model(config, rngs=nnx.Rngs(3))
    _, params, rest = nnx.split(model, nnx.Param, ...)
    with RunCheckpoints(root / "run") as ckpt:
        ckpt.save("best", 1, params=params, model_state=rest, meta={})
    (root / "images").mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 256, (50, 50, 3), dtype=np.uint8)).save(root / "images" / f"{i}.png")
    return root


def _explain_args(root, out):
    return ["explain", str(root / "images"), "--checkpoint", str(root / "run"), "--out", str(out), "--no-figures",
            "--batch-size", "2", "--workers", "0"]  # fmt: skip


def test_delib_explain_prints_progress_lines_in_a_log(run_folder, capsys):
    from delib_jax.cli import main

    assert main(_explain_args(run_folder, run_folder / "out_log")) == 0
    err = capsys.readouterr().err
    assert re.search(r"^explain: 4/4 img \(100%\), .* img/s, done in", err, re.M), err


def test_delib_explain_interrupted_says_what_is_kept(run_folder, capsys, monkeypatch):
    from delib_jax import stream
    from delib_jax.cli import main

    real = stream.explain_files

    def interrupted_after_two(model, config, files, out, **kw):
        real(model, config, files[:2], out, **kw)  # two images finished, then Ctrl-C
        raise KeyboardInterrupt

    monkeypatch.setattr(stream, "explain_files", interrupted_after_two)
    out = run_folder / "out_int"
    assert main(_explain_args(run_folder, out)) == 130
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert (
        err
        == f"delib explain: interrupted; 2 images explained are kept in {out}: run the same command again to continue"
    )
