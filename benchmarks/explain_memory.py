"""Memory of the explanation job against the number of images (``python -m benchmarks.explain --memory``).

    python -m benchmarks.explain --memory --images 1000 10000 100000 [--figures] [--repeats 3] --json
    python -m benchmarks.explain --memory --repeats 3 --json    # 50, 1,600 and 10,000 images

For each count, writes that many small PNG files (24x24, arch "small", crop 24) into a temporary folder, runs the job
as the command does (``delib_jax.cli.image_files`` over the folder, then `explain_files`) in a child process, and
samples VmRSS of that process and all its descendants (the reader and figure workers) every 0.2 s from
/proc/PID/status: ``max_rss_mb`` is the largest sum seen (shared pages of the workers count once per process, so it
is an upper bound). ``hwm_mb`` adds up each process's own peak (VmHWM, kept by the kernel, so no peak between two
samples is missed; an upper bound of the simultaneous peak); ``main_hwm_mb`` is the main process's part of it (the
device step and the writer thread; the rest: the reader processes and multiprocessing's resource tracker). Then the
same job runs again on the finished folder: ``resume_s`` is the time from its start until it reports "resuming" (the
resume plan made, nothing left to do), and ``plan_s`` the part of it spent listing the folder and making the plan
(the rest is the start-up every run pays).
With ``repeats`` each count is measured that many times, the counts taking turns, and the medians give the
growth: the peak moves by a few percent from run to run. Linux only (/proc).

``--class-folders`` (issue 31) lays the same files out as a class-folder dataset instead, ``DIR/test/class_NN``
(100 classes; ``DIR/train`` holds 2 images a class, which the dataset needs), and runs the job as ``delib explain
--checkpoint RUN --data-dir DIR --split test`` runs it on a run trained on those folders (`explain_dataset`: the
dataset listed and split, the classes checked, records naming the dataset, split and example); its resume lists
and splits the dataset again and decodes nothing it finished.

``--figures-stub`` runs the job with figures on, but each figure worker writes the decoded image as a PNG instead of
drawing the figure with matplotlib (about 1 figure a second on a 2-core CPU: 100,000 figures would take a day).
It measures everything the job keeps for figures (the hand-over to the pool, the records waiting for their figures,
the pages' look-up of figures) at 100,000 images; the drawing process itself is measured with real figures at
smaller counts (``--figures``).
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
COUNTS = (50, 1600, 10000)  # the default counts: one batch, past the first thousand images (issue 33), and more
CLASSES = 100  # class folders of --class-folders


def write_images(folder: Path, count: int, class_folders: bool = False) -> None:
    """``count`` PNG files of CROP x CROP pixels (16 distinct ones repeated), in subfolders of 10,000; with
    ``class_folders`` as ``folder/test/class_NN`` (`CLASSES` classes, taking turns) plus 2 images a class in
    ``folder/train``."""
    import io

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    blobs = []
    for _ in range(16):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (CROP, CROP, 3), dtype=np.uint8)).save(buf, format="PNG")
        blobs.append(buf.getvalue())
    if class_folders:
        for split, n in (("test", count), ("train", 2 * CLASSES)):
            for k in range(CLASSES):
                (folder / split / f"class_{k:02d}").mkdir(parents=True, exist_ok=True)
            for i in range(n):
                (folder / split / f"class_{i % CLASSES:02d}" / f"img_{i:07d}.png").write_bytes(blobs[i % 16])
        return
    for i in range(count):
        sub = folder / f"{i // 10000:03d}"
        if i % 10000 == 0:
            sub.mkdir(parents=True, exist_ok=True)
        (sub / f"img_{i:07d}.png").write_bytes(blobs[i % 16])


def stub_figure(explanation, source, resize: int, crop: int, path: str, examples) -> None:
    """A figure worker's stand-in (``--figures-stub``): decodes the source as the real one does and writes it as
    the figure's PNG, without matplotlib."""
    from PIL import Image

    from delib_jax import _reader

    pixels, report = _reader.decode(source, resize=resize, crop=crop)
    if pixels is None:
        raise OSError(report.error)
    Image.fromarray(pixels).save(path, format="PNG")


def child(folder: str, out: str, figures: str, batch: int, layout: str = "files") -> int:
    """The job as ``delib explain FOLDER --out OUT`` runs it (``layout`` "folders": as ``delib explain --data-dir
    FOLDER --split test`` runs it on a run trained on those class folders), with random weights of the small arch;
    ``figures``: "0" (none), "1" (drawn), "stub" (`stub_figure`)."""
    from delib_jax import _malloc

    _malloc.bound_heap()  # as the command does before it loads the model
    from flax import nnx

    from delib_jax.checkpoint import RunConfig, build_model
    from delib_jax.cli import image_files
    from delib_jax.stream import JobOptions, explain_dataset, explain_files

    if layout == "folders":
        from delib_jax.data import load_dataset

        ds = load_dataset("folder", folder)  # as training recorded it: the classes and the split's options
        names = list(ds.class_names)
        config = RunConfig(arch="small", num_classes=len(names), class_names=names, crop=CROP, resize=CROP,
                           dataset="folder", data_dir=folder, data_options=ds.options)  # fmt: skip
        del ds
    else:
        config = RunConfig(arch="small", num_classes=4, class_names=[f"class {i}" for i in range(4)], crop=CROP,
                           resize=CROP, dataset="cub")  # fmt: skip
    model = build_model(config, rngs=nnx.Rngs(0))
    model.eval()
    t = time.perf_counter()
    if layout != "folders":
        files = image_files([folder], print)
        print(f"listed {len(files)}", flush=True)

    def report(message: str) -> None:
        if message.startswith("resuming"):
            print(f"plan_s {time.perf_counter() - t:.3f}", flush=True)  # listing and resume plan
        print(message, flush=True)

    if figures == "stub":
        from benchmarks.explain_memory import stub_figure  # by its module's name: the figure workers import it
        from delib_jax.job import writing

        writing.render_figure = stub_figure
    options = JobOptions(batch_size=batch, figures=figures != "0", progress=False, json_limit=0, report_limit=100)
    if layout == "folders":
        explain_dataset(model, config, folder, out, split="test", options=options, report=report, top_n=3,
                        max_insecurities=2)  # fmt: skip
    else:
        explain_files(model, config, files, out, options=options, report=report, top_n=3, max_insecurities=2)
    print("done", flush=True)
    return 0


def _tree_rss_kb(root: int, hwm: dict[int, int] | None = None) -> int:
    """VmRSS (kB) of ``root`` and every descendant, from /proc; ``hwm`` gets each one's VmHWM (its own peak)."""
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
                fields = dict(line.split(":", 1) for line in f if line.startswith(("VmRSS:", "VmHWM:")))
            total += int(fields.get("VmRSS", "0 kB").split()[0])
            if hwm is not None:
                hwm[pid] = max(hwm.get(pid, 0), int(fields.get("VmHWM", "0 kB").split()[0]))
        except OSError:
            pass
    return total


def measure(folder: Path, out: Path, figures: bool | str, batch: int, timeout: float, layout: str = "files") -> dict:
    """Run the child job once; its peak tree RSS, wall time, and when (if) it said "resuming"."""
    mode = figures if isinstance(figures, str) else str(int(figures))
    cmd = [sys.executable, "-m", "benchmarks.explain_memory", "--child", str(folder), str(out), mode, str(batch),
           layout]  # fmt: skip
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peak, resumed_at, lines, hwm = [0], [None], [], {}

    def read() -> None:
        for line in proc.stdout:
            lines.append(line.rstrip())
            if resumed_at[0] is None and line.startswith("resuming"):
                resumed_at[0] = time.perf_counter() - t0

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    while proc.poll() is None:
        peak[0] = max(peak[0], _tree_rss_kb(proc.pid, hwm))
        if time.perf_counter() - t0 > timeout:
            proc.kill()
            break
        time.sleep(0.2)
    proc.wait()
    reader.join(timeout=5)
    if proc.returncode != 0:
        raise RuntimeError(f"job failed ({proc.returncode}): " + "\n".join(lines[-20:]))
    plan = next((float(x.split()[1]) for x in lines if x.startswith("plan_s ")), None)
    return {"max_rss_mb": round(peak[0] / 1024, 1), "hwm_mb": round(sum(hwm.values()) / 1024, 1),
            "main_hwm_mb": round(hwm.get(proc.pid, 0) / 1024, 1),
            "wall_s": round(time.perf_counter() - t0, 1),
            "resuming_s": None if resumed_at[0] is None else round(resumed_at[0], 2), "plan_s": plan}  # fmt: skip


def run(counts: list[int], figures: bool | str, batch: int = 64, timeout: float | None = None,
        repeats: int = 1, class_folders: bool = False) -> dict:  # fmt: skip
    """``max_rss_mb``, ``hwm_mb``, ``resume_s`` and ``plan_s`` per image count (each a list over ``repeats`` runs,
    the counts taking turns), and the growth of the median peaks from the first count to the last; each run is
    stopped after ``timeout`` s (None: 1,500, plus 3 s a figure: figures are drawn at about 1 a second a core);
    ``class_folders``: the images as the test split of a class-folder dataset, explained by split."""
    layout = "folders" if class_folders else "files"
    import statistics

    keys = ("max_rss_mb", "hwm_mb", "main_hwm_mb", "run_s", "resume_s", "plan_s", "resume_max_rss_mb")
    runs: dict[int, dict[str, list]] = {n: {k: [] for k in keys} for n in counts}
    for _ in range(repeats):
        for n in counts:
            limit = timeout if timeout is not None else 1500 + (3 * n if figures is True else 0)
            tmp = Path(tempfile.mkdtemp(prefix="delib-mem-"))
            try:
                write_images(tmp / "images", n, class_folders)
                first = measure(tmp / "images", tmp / "out", figures, batch, limit, layout)
                again = measure(tmp / "images", tmp / "out", figures, batch, limit, layout)
                row = {"max_rss_mb": first["max_rss_mb"], "hwm_mb": first["hwm_mb"],
                       "main_hwm_mb": first["main_hwm_mb"], "run_s": first["wall_s"],
                       "resume_s": again["resuming_s"], "plan_s": again["plan_s"],
                       "resume_max_rss_mb": again["max_rss_mb"]}  # fmt: skip
                for k in keys:
                    runs[n][k].append(row[k])
                print(json.dumps({"images": n, **row}), file=sys.stderr, flush=True)  # each run as it is measured
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    rows = [{"images": n, **runs[n], "median_max_rss_mb": statistics.median(runs[n]["max_rss_mb"]),
             "median_hwm_mb": statistics.median(runs[n]["hwm_mb"]),
             "median_main_hwm_mb": statistics.median(runs[n]["main_hwm_mb"])} for n in counts]  # fmt: skip

    def growth(key: str) -> float:
        return round(rows[-1][key] / rows[0][key] - 1, 4) if len(rows) > 1 else 0.0

    return {"figures": figures, "batch": batch, "crop": CROP, "arch": "small", "repeats": repeats, "layout": layout,
            "runs": rows,
            "growth": growth("median_max_rss_mb"), "growth_hwm": growth("median_hwm_mb"),
            "growth_main_hwm": growth("median_main_hwm_mb")}  # fmt: skip


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        folder, out, figures, batch, layout = sys.argv[2:7]
        sys.exit(child(folder, out, figures, int(batch), layout))
    raise SystemExit("use python -m benchmarks.explain --memory")
