"""Memory of the explanation job against the number of images (``python -m benchmarks.explain --memory``).

    python -m benchmarks.explain --memory --images 1000 10000 100000 [--figures] --json

For each count, writes that many small PNG files (24x24, arch "small", crop 24) into a temporary folder, runs the job
as the command does (``delib_jax.cli.image_files`` over the folder, then `explain_files`) in a child process, and
samples VmRSS of that process and all its descendants (the reader and figure workers) every 0.2 s from
/proc/PID/status: ``max_rss_mb`` is the largest sum seen (shared pages of the workers count once per process, so it
is an upper bound). Then the same job runs again on the finished folder: ``resume_s`` is the time from its start
until it reports "resuming" (the resume plan made, nothing left to do). Linux only (/proc).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

CROP = 24


def write_images(folder: Path, count: int) -> None:
    """``count`` PNG files of CROP x CROP pixels (16 distinct ones repeated), in subfolders of 10,000."""
    import io

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    blobs = []
    for _ in range(16):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (CROP, CROP, 3), dtype=np.uint8)).save(buf, format="PNG")
        blobs.append(buf.getvalue())
    for i in range(count):
        sub = folder / f"{i // 10000:03d}"
        if i % 10000 == 0:
            sub.mkdir(parents=True, exist_ok=True)
        (sub / f"img_{i:07d}.png").write_bytes(blobs[i % 16])


def child(folder: str, out: str, figures: bool, batch: int) -> int:
    """The job as ``delib explain FOLDER --out OUT`` runs it, with random weights of the small arch."""
    from flax import nnx

    from delib_jax.checkpoint import RunConfig, build_model
    from delib_jax.cli import image_files
    from delib_jax.stream import JobOptions, explain_files

    config = RunConfig(arch="small", num_classes=4, class_names=[f"class {i}" for i in range(4)], crop=CROP,
                       resize=CROP, dataset="cub")  # fmt: skip
    model = build_model(config, rngs=nnx.Rngs(0))
    model.eval()
    files = image_files([folder], print)
    print(f"listed {len(files)}", flush=True)
    options = JobOptions(batch_size=batch, figures=figures, progress=False, json_limit=0, report_limit=100)
    explain_files(model, config, files, out, options=options, report=lambda m: print(m, flush=True),
                  top_n=3, max_insecurities=2)  # fmt: skip
    print("done", flush=True)
    return 0


def _tree_rss_kb(root: int) -> int:
    """VmRSS (kB) of ``root`` and every descendant, from /proc."""
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat", "rb") as f:
                    ppid = int(f.read().rsplit(b")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(name))
    total, stack = 0, [root]
    while stack:
        pid = stack.pop()
        stack.extend(children.get(pid, []))
        try:
            with open(f"/proc/{pid}/status") as f:
                total += next((int(line.split()[1]) for line in f if line.startswith("VmRSS:")), 0)
        except OSError:
            pass
    return total


def measure(folder: Path, out: Path, figures: bool, batch: int, timeout: float) -> dict:
    """Run the child job once; its peak tree RSS, wall time, and when (if) it said "resuming"."""
    cmd = [sys.executable, "-m", "benchmarks.explain_memory", "--child", str(folder), str(out), str(int(figures)),
           str(batch)]  # fmt: skip
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peak, resumed_at, lines = [0], [None], []

    def read() -> None:
        for line in proc.stdout:
            lines.append(line.rstrip())
            if resumed_at[0] is None and line.startswith("resuming"):
                resumed_at[0] = time.perf_counter() - t0

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    while proc.poll() is None:
        peak[0] = max(peak[0], _tree_rss_kb(proc.pid))
        if time.perf_counter() - t0 > timeout:
            proc.kill()
            break
        time.sleep(0.2)
    proc.wait()
    reader.join(timeout=5)
    if proc.returncode != 0:
        raise RuntimeError(f"job failed ({proc.returncode}): " + "\n".join(lines[-20:]))
    return {"max_rss_mb": round(peak[0] / 1024, 1), "wall_s": round(time.perf_counter() - t0, 1),
            "resuming_s": None if resumed_at[0] is None else round(resumed_at[0], 2)}  # fmt: skip


def run(counts: list[int], figures: bool, batch: int = 64, timeout: float | None = None) -> dict:
    """``max_rss_mb`` and ``resume_s`` per image count, and the growth from the first count to the last; each run
    is stopped after ``timeout`` s (None: 1,500, plus 3 s a figure: figures are drawn at about 1 a second a core)."""
    rows = []
    for n in counts:
        limit = timeout if timeout is not None else 1500 + (3 * n if figures else 0)
        tmp = Path(tempfile.mkdtemp(prefix="delib-mem-"))
        try:
            write_images(tmp / "images", n)
            first = measure(tmp / "images", tmp / "out", figures, batch, limit)
            again = measure(tmp / "images", tmp / "out", figures, batch, limit)
            rows.append({"images": n, "max_rss_mb": first["max_rss_mb"], "run_s": first["wall_s"],
                         "resume_s": again["resuming_s"], "resume_max_rss_mb": again["max_rss_mb"]})  # fmt: skip
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)  # each count as it is measured
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    growth = rows[-1]["max_rss_mb"] / rows[0]["max_rss_mb"] - 1 if len(rows) > 1 else 0.0
    return {"figures": figures, "batch": batch, "crop": CROP, "arch": "small", "runs": rows,
            "growth": round(growth, 4)}  # fmt: skip


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        folder, out, figures, batch = sys.argv[2:6]
        sys.exit(child(folder, out, figures == "1", int(batch)))
    raise SystemExit("use python -m benchmarks.explain --memory")
