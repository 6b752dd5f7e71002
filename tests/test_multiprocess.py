"""Several processes for real: two local processes joined by ``jax.distributed`` (Gloo, XLA's CPU collectives).

Training: two processes with the same global batch reach the parameters of one process (float32 tolerance), and a
two-process run killed (SIGKILL, both processes) after a checkpoint and resumed ends exactly where an uninterrupted
one does. Explanation: the union of two processes' outputs in one folder equals a one-process run, record for record.
Small on purpose: 4 synthetic species, 8 images each of 64 px, the small CNN at 32 px, 4 steps.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

from delib_jax._command import UsageError
from delib_jax._multihost import init_distributed
from delib_jax.checkpoint import load_model
from delib_jax.data import load_cub
from delib_jax.data.synthetic import make_cub
from delib_jax.store import load_explanations, read_records

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT = 600  # seconds for any one command (the shared 2-core development machine is slow when loaded)
# SGD: AdamW's normalised steps turn the float32 noise of a zero gradient (a convolution bias before batch norm)
# into steps of the learning rate's size, so that one and two processes part by more than rounding there.
TRAIN = ["--arch", "small", "--steps", "4", "--batch-size", "8", "--crop", "32", "--checkpoint-every", "2",
         "--optimizer", "sgd", "--lr", "0.05", "--no-progress", "--threads", "2"]  # fmt: skip


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _env(cache: Path | None = None) -> dict[str, str]:
    """One CPU device per process; ``cache``: a persistent compilation cache shared by the commands of these tests
    (compiling is most of a short run's time; process 0 writes it, every process reads it)."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=1",
           "DELIB_COMPILATION_CACHE": str(cache) if cache else "off"}  # fmt: skip
    if cache is not None:
        env.update(JAX_COMPILATION_CACHE_DIR=str(cache), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    return env


def _multihost(n: int) -> list[list[str]]:
    """The flags of ``n`` processes joined at a free local port."""
    address = f"localhost:{_free_port()}"
    return [["--coordinator-address", address, "--num-processes", str(n), "--process-id", str(i)] for i in range(n)]


def _start(argv: list[str], cache: Path | None = None) -> subprocess.Popen:
    env = _env(cache)
    return subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish(procs: list[subprocess.Popen], timeout: float = TIMEOUT) -> list[str]:
    """Wait for ``procs`` (all of them within ``timeout``) and return their outputs; any still running are killed."""
    deadline = time.monotonic() + timeout
    outputs = []
    try:
        for p in procs:
            outputs.append(p.communicate(timeout=max(1.0, deadline - time.monotonic()))[0])
    finally:
        _kill(procs)
    return outputs


def _kill(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.communicate()


def _run_all(commands: list[list[str]], cache: Path | None = None) -> list[str]:
    """Run the commands at once; assert that each exits 0."""
    procs = [_start(c, cache) for c in commands]
    outputs = _finish(procs)
    for p, out in zip(procs, outputs):
        assert p.returncode == 0, out
    return outputs


def _train(data: Path, out: Path, extra: list[str] = ()) -> list[str]:
    return [sys.executable, "-m", "train.cub", "--data-dir", str(data), "--out", str(out), *TRAIN, *extra]


def _explain(run: Path, images: Path | list[str], out: Path, extra: list[str] = ()) -> list[str]:
    inputs = [str(images)] if isinstance(images, Path) else images
    return [sys.executable, "-m", "delib_jax.cli", "explain", *inputs, "--checkpoint", str(run), "--out", str(out),
            "--no-figures", "--json", "--workers", "0", "--batch-size", "4", *extra]  # fmt: skip


def _state(run: Path) -> list[np.ndarray]:
    """Every array of the run's latest checkpoint (parameters, batch statistics; keys as their raw data)."""
    model, _ = load_model(run, which="latest")
    leaves = jax.tree.leaves(nnx.state(model))
    return [np.asarray(jax.random.key_data(x) if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key) else x)
            for x in leaves]  # fmt: skip


def _metrics(run: Path) -> list[dict]:
    """metrics.jsonl without the timings."""
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k != "images_per_s"} for line in lines]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Synthetic data; the same training run by one process and by two (started together)."""
    root = tmp_path_factory.mktemp("multiprocess")
    make_cub(root / "data", classes=4, images_per_class=8, size=64)
    one, two = root / "one", root / "two"
    flags = _multihost(2)
    _run_all([_train(root / "data", one), *(_train(root / "data", two, f) for f in flags)], root / "cache")
    return root


@pytest.mark.slow
def test_two_training_processes_reach_the_parameters_of_one(runs):
    one, two = _state(runs / "one"), _state(runs / "two")
    assert len(one) == len(two)
    for a, b in zip(one, two):
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6)
    m1, m2 = _metrics(runs / "one"), _metrics(runs / "two")
    assert [(m["split"], m["step"]) for m in m1] == [(m["split"], m["step"]) for m in m2]
    for a, b in zip(m1, m2):  # training metrics, validation (2 images: all in process 0's rows) and test
        for k in a:
            if isinstance(a[k], float):
                assert b[k] == pytest.approx(a[k], rel=1e-4, abs=1e-5), (a, b)
    # one metrics file and one configuration, by process 0; the checkpoints of both processes together
    assert sorted(p.name for p in (runs / "two").iterdir()) == sorted(p.name for p in (runs / "one").iterdir())
    assert [p.name for p in (runs / "two" / "checkpoints" / "latest").iterdir()] == ["4"]


# Training with a pause: at step PAUSE, once that step's checkpoints are on disk, the process says so in READY and
# waits to be killed.
_PAUSED = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    import delib_jax.train.run as run
    from delib_jax.train.cli import main
    pause, ready, argv = int(sys.argv[1]), Path(sys.argv[2]), sys.argv[3:]
    fit = run.fit

    def paused(run_dir, *args, **kwargs):
        def on_step(step, state):
            if step == pause:
                while not all((Path(run_dir) / "checkpoints" / w / str(step)).is_dir() for w in ("latest", "best")):
                    time.sleep(0.05)
                ready.write_text("checkpointed")
                time.sleep(3600)
        return fit(run_dir, *args, on_step=on_step, **kwargs)

    run.fit = paused
    sys.exit(main("cub", argv))
    """
)


@pytest.mark.slow
def test_two_training_processes_resume_after_both_are_killed(runs, tmp_path):
    killed = tmp_path / "killed"
    ready = [tmp_path / f"ready{i}" for i in range(2)]
    procs = []
    try:
        for flags, r in zip(_multihost(2), ready):
            argv = _train(runs / "data", killed, flags)[3:]
            procs.append(_start([sys.executable, "-c", _PAUSED, "2", str(r), *argv], runs / "cache"))
        deadline = time.monotonic() + TIMEOUT
        while not all(r.exists() for r in ready):
            assert time.monotonic() < deadline, "the processes did not reach step 2"
            assert all(p.poll() is None for p in procs), [p.communicate()[0] for p in procs if p.poll() is not None]
            time.sleep(0.1)
        for p in procs:
            p.send_signal(signal.SIGKILL)
        for p in procs:
            p.wait(timeout=60)
            assert p.returncode == -signal.SIGKILL
    finally:
        _kill(procs)
    assert [p.name for p in (killed / "checkpoints" / "latest").iterdir()] == ["2"]
    assert max(m["step"] for m in _metrics(killed)) == 2

    _run_all([_train(runs / "data", killed, ["--resume", *f]) for f in _multihost(2)], runs / "cache")
    for a, b in zip(_state(runs / "two"), _state(killed), strict=True):
        np.testing.assert_array_equal(a, b)
    assert _metrics(killed) == _metrics(runs / "two")


@pytest.mark.slow
@pytest.mark.parametrize("inputs", ["folder", "dataset"])
def test_two_explaining_processes_write_what_one_does(runs, tmp_path, inputs):
    """Over a folder of files, and over a dataset's test split (--data-dir): the union of the two processes'
    outputs is the one-process run, record for record."""
    if inputs == "folder":
        images, count = runs / "data" / "CUB_200_2011" / "images", 32
    else:
        images, count = (
            ["--data-dir", str(runs / "data"), "--split", "test"],
            int((~load_cub(runs / "data").is_train).sum()),
        )
    one, two = tmp_path / "one", tmp_path / "two"
    _run_all([_explain(runs / "one", images, one)], runs / "cache")  # compiles once for all three processes
    outputs = _run_all([_explain(runs / "one", images, two, f) for f in _multihost(2)], runs / "cache")
    assert f"process 1 of 2: explained {count // 2} of {count // 2} images" in outputs[1]
    assert sorted(p.name for p in (two / "explanations").glob("index-*.jsonl")) == ["index-00000.jsonl",
                                                                                     "index-00001.jsonl"]  # fmt: skip

    def records(out: Path) -> dict[str, dict]:  # where a record's arrays lie (shard, row, its digest) differs by design
        place = ("shard", "row", "digest")
        return {r["source"]: {k: v for k, v in r.items() if k not in place} for r in read_records(out)}

    r1, r2 = records(one), records(two)
    assert len(r1) == count and r1 == r2
    assert (
        inputs == "folder"
        or sorted(r["index"] for r in r1.values()) == np.flatnonzero(~load_cub(runs / "data").is_train).tolist()
    )
    e1 = {e.source: e for e in load_explanations(one)}
    e2 = {e.source: e for e in load_explanations(two)}
    assert e1.keys() == e2.keys()
    for source, a in e1.items():
        b = e2[source]
        assert (a.prediction, a.class_names, len(a.insecurities)) == (b.prediction, b.class_names, len(b.insecurities))
        for field in ("probs", "difficulty", "classes", "maps", "grad_cam"):
            np.testing.assert_array_equal(getattr(a, field), getattr(b, field))
        for p, q in zip(a.insecurities, b.insecurities):
            assert (p.a, p.b, p.strength, p.coverage) == (q.a, q.b, q.strength, q.coverage)
            np.testing.assert_array_equal(p.mask, q.mask)
    # one report, by process 0, of every process's images
    report = json.loads((two / "insecurities.json").read_text())
    assert sorted(i["source"] for i in report["images"]) == sorted(r1)


def _flags(address=None, n=None, i=None) -> argparse.Namespace:
    return argparse.Namespace(coordinator_address=address, num_processes=n, process_id=i)


@pytest.mark.parametrize(
    "flags, message",
    [
        (_flags("localhost:1234", 2), "all of --coordinator-address"),
        (_flags(None, 2, 0), "all of --coordinator-address"),
        (_flags("localhost:1234", 0, 0), "--num-processes must be at least 1"),
        (_flags("localhost:1234", 2, 2), r"--process-id must lie in 0 \.\. 1"),
        (_flags("localhost", 2, 0), "HOST:PORT"),
    ],
)
def test_incomplete_or_inconsistent_flags_are_one_line(flags, message):
    with pytest.raises(UsageError, match=message):
        init_distributed(flags)


def test_no_flags_no_distributed_runtime():
    assert init_distributed(_flags()) is False


@pytest.mark.slow
def test_explain_refuses_incomplete_flags_in_one_line(tmp_path):
    (tmp_path / "run").mkdir()
    out = subprocess.run(
        [*_explain(tmp_path / "run", tmp_path, tmp_path / "out"), "--num-processes", "2", "--process-id", "0"],
        cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == 2, out.stderr
    assert out.stderr.strip().splitlines() == [
        "delib explain: error: several processes need all of --coordinator-address, --num-processes and --process-id"
    ]
