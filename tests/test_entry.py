"""Ctrl-C at any moment of a command's start-up, JAX's imports included: one line, exit status 130, no traceback
(`delib_jax._entry`), for ``python -m train.* / eval.*``, the ``delib`` console script and
``python -m delib_jax.cli``."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CONSOLE = "import sys; from delib_jax._entry import delib; sys.exit(delib())"  # what the installed script runs

COMMANDS = {
    "train": ["-m", "train.cub", "--synthetic", "--out", "{tmp}/run"],
    "eval": ["-m", "eval.ade20k", "--checkpoint", "{tmp}/empty", "--synthetic", "--out", "{tmp}/eval"],
    "delib explain": ["-c", CONSOLE, "explain", "{tmp}/a.jpg", "--checkpoint", "{tmp}/empty", "--out", "{tmp}/ex"],
    "delib demo": ["-m", "delib_jax.cli", "demo", "--out", "{tmp}/demo"],
}
MOMENTS = (0.3, 0.6, 1.0)  # seconds after the start: Python is up, the commands are importing JAX (~1.5 s)


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_ctrl_c_during_start_up_is_one_line_and_130(command, tmp_path):
    (tmp_path / "empty").mkdir()
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    argv = [sys.executable, *(a.format(tmp=tmp_path) for a in COMMANDS[command])]
    interrupted = 0
    for moment in MOMENTS:
        proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        time.sleep(moment)
        if proc.poll() is not None:  # already finished (a fast machine): nothing to interrupt at this moment
            proc.communicate()
            continue
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
        lines = [line for line in err.splitlines() if line.strip()]
        assert proc.returncode == 130, (moment, proc.returncode, err[-2000:])
        assert "Traceback" not in err and lines and "interrupted" in lines[-1], (moment, err[-2000:])
        assert sum("interrupted" in line for line in lines) == 1, (moment, err[-2000:])
        interrupted += 1
    assert interrupted, "every run ended before its interrupt"
