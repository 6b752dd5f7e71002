"""Ctrl-C at any moment of a command's start-up, JAX's imports included: one line, exit status 130, no traceback
(`delib_jax._entry`), for ``python -m train.* / eval.*``, the ``delib`` console script and
``python -m delib_jax.cli``."""

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # a subprocess per command, each importing JAX

ROOT = Path(__file__).resolve().parents[1]
CONSOLE = "import sys; from delib_jax._entry import delib; sys.exit(delib())"  # what the installed script runs

COMMANDS = {
    "train": ["-m", "train.cub", "--synthetic", "--out", "{tmp}/run"],
    "eval": ["-m", "eval.ade20k", "--checkpoint", "{tmp}/empty", "--synthetic", "--out", "{tmp}/eval"],
    "delib explain": ["-c", CONSOLE, "explain", "{tmp}/a.jpg", "--checkpoint", "{tmp}/empty", "--out", "{tmp}/ex"],
    "delib demo": ["-m", "delib_jax.cli", "demo", "--out", "{tmp}/demo"],
}
FRACTIONS = (0.25, 0.5, 0.75)  # of the command's start-up time (its run until it exits or 2.5 s), at least 0.2 s


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_ctrl_c_during_start_up_is_one_line_and_130(command, tmp_path):
    (tmp_path / "empty").mkdir()
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    argv = [sys.executable, *(a.format(tmp=tmp_path) for a in COMMANDS[command])]
    start = time.perf_counter()
    try:  # how long this command takes here, up to the end of its imports and a little more
        subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, timeout=2.5)
    except subprocess.TimeoutExpired:
        pass
    span = time.perf_counter() - start
    for path in (tmp_path / "run", tmp_path / "eval", tmp_path / "ex", tmp_path / "demo"):
        shutil.rmtree(path, ignore_errors=True)
    interrupted = 0
    for moment in (max(0.2, f * span) for f in FRACTIONS):
        proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        time.sleep(moment)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
        assert "Traceback" not in err, (moment, err[-2000:])
        if "interrupted" not in err:  # it had finished its work (its error line) before the interrupt came
            assert "error" in err and proc.returncode in (2, -signal.SIGINT), (moment, proc.returncode, err[-2000:])
            continue
        lines = [line for line in err.splitlines() if line.strip()]
        assert proc.returncode == 130, (moment, proc.returncode, err[-2000:])
        assert "interrupted" in lines[-1] and sum("interrupted" in line for line in lines) == 1, (moment, err[-2000:])
        interrupted += 1
    assert interrupted, f"every run ended before its interrupt (start-up {span:.2f} s)"


POOL_THEN_IMPORT = """
import sys, time
from delib_jax import _reader

def main():
    pool = _reader.start_pool(2)
    [f.result() for f in [pool.submit(_reader._ready) for _ in range(4)]]
    print("ready", flush=True)
    import slow_module  # the interrupt comes in here: os._exit with the pool open
"""


def test_ctrl_c_inside_an_import_leaks_no_semaphores(tmp_path):
    """Ctrl-C while the main thread imports, with a process pool open (as in the job's first compile): one line,
    130, and no "leaked semaphore objects" warning once the pool's workers are gone."""
    (tmp_path / "pool_then_import.py").write_text(POOL_THEN_IMPORT)
    (tmp_path / "slow_module.py").write_text("import time\ntime.sleep(60)\n")
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": f"{tmp_path}{os.pathsep}{ROOT}"}
    code = "from delib_jax._entry import run; run('pool_then_import:main', name='test')"
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip
    assert proc.stdout.readline().strip() == "ready"
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)  # stderr closes once the workers and the resource tracker are gone
    assert proc.returncode == 130 and "test: interrupted" in err, err
    assert "leaked" not in err, err
