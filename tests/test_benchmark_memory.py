"""The memory benchmark's bookkeeping (`benchmarks.explain_memory`): the process tree's RSS and each process's own
peak read from /proc, and the medians over repeated runs that the growth is taken from (no job is run here)."""

import os
import subprocess
import sys
import time

import pytest

from benchmarks import explain_memory

pytestmark = pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="reads /proc (Linux)")


def test_tree_rss_counts_children_and_keeps_each_peak():
    """A child that allocates 64 MB then frees it: its VmHWM keeps the 64 MB although its RSS falls."""
    code = (
        "import time; b = bytearray(64 << 20); b[::4096] = b'x' * len(b[::4096]); del b; print(1, flush=True); "
        "time.sleep(3)"
    )
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "1"  # allocated, touched and freed
        hwm: dict[int, int] = {}
        total = explain_memory._tree_rss_kb(os.getpid(), hwm)
        assert child.pid in hwm and os.getpid() in hwm
        assert hwm[child.pid] >= 64 << 10  # kB: the freed 64 MB are still its peak
        assert total < sum(hwm.values())  # RSS now is below the peaks
    finally:
        child.kill()
        child.wait()


def test_repeated_runs_give_medians_and_their_growth(monkeypatch, tmp_path):
    """Each count measured ``repeats`` times, the counts taking turns; the growth is that of the medians."""
    peaks = iter([500.0, 520.0, 530.0, 505.0, 540.0, 510.0])  # first runs of 10, 20, then resumes: see below
    order: list[int] = []

    def fake_measure(folder, out, figures, batch, limit, layout="files"):
        n = sum(1 for _ in folder.rglob("*.png"))
        if not (out / "done").exists():  # the first run of this folder
            out.mkdir(parents=True, exist_ok=True)
            (out / "done").touch()
            order.append(n)
            return {"max_rss_mb": next(peaks), "hwm_mb": 600.0 + n, "main_hwm_mb": 400.0 + n, "wall_s": 1.0,
                    "resuming_s": None, "plan_s": None}  # fmt: skip
        return {"max_rss_mb": 400.0, "hwm_mb": 450.0, "wall_s": 1.0, "resuming_s": 2.0 + n / 10, "plan_s": 0.1}

    monkeypatch.setattr(explain_memory, "measure", fake_measure)
    monkeypatch.setattr(explain_memory.tempfile, "tempdir", str(tmp_path))
    t = time.perf_counter()
    result = explain_memory.run([10, 20], figures=False, repeats=3)
    assert time.perf_counter() - t < 60
    assert order == [10, 20, 10, 20, 10, 20]
    small, large = result["runs"]
    assert small["max_rss_mb"] == [500.0, 530.0, 540.0] and large["max_rss_mb"] == [520.0, 505.0, 510.0]
    assert small["median_max_rss_mb"] == 530.0 and large["median_max_rss_mb"] == 510.0
    assert result["growth"] == round(510 / 530 - 1, 4) and result["growth_hwm"] == round(620 / 610 - 1, 4)
    assert large["main_hwm_mb"] == [420.0] * 3 and result["growth_main_hwm"] == round(420 / 410 - 1, 4)
    assert small["resume_s"] == [3.0] * 3 and large["plan_s"] == [0.1] * 3 and result["repeats"] == 3
