"""End-to-end training throughput from data on disk: the input pipeline feeding the real training loop.

    python -m benchmarks.train_input --data-dir /data/tfds --arch resnet50 --batch 64 --steps 300 --threads 16
    python -m benchmarks.train_input --data-dir /data/CUB_200_2011 --arch resnet50 --batch 64 --steps 300

Trains a fresh model (random weights) for --steps steps with `delib_jax.train.run.fit` (validation and one checkpoint
only at the end) on a CUB-format release folder or TFDS build, and prints one JSON line: the median images/s of the
training-metric windows (--log-every steps each) after the first, which includes compilation. Compare it with
``benchmarks.train`` (the step alone, data already on the device) and ``benchmarks.pipeline`` (the input alone).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import jax

from delib_jax.checkpoint import RunConfig
from delib_jax.data import DatasetError, find_source, load_dataset
from delib_jax.data.transforms import CUB_STATS
from delib_jax.models import ARCHS
from delib_jax.train.run import fit


def measure(data_dir: Path, *, arch: str, batch: int, steps: int, crop: int, threads: int, log_every: int,
            workers: int = 0) -> dict:  # fmt: skip
    """Train ``steps`` steps in a temporary run folder; the JSON record."""
    source = find_source("cub", data_dir)
    names = list(load_dataset("cub", data_dir).class_names)
    config = RunConfig(
        arch=arch, num_classes=len(names), class_names=names, dataset="cub", mean=CUB_STATS.mean, std=CUB_STATS.std,
        data_dir=str(Path(data_dir).absolute()), crop=crop, resize=round(crop * 256 / 224), batch_size=batch,
        steps=steps, checkpoint_every=steps, eval_every=steps, val_fraction=0.1, optimizer="sgd", lr=1e-3,
        momentum=0.9, weight_decay=1e-4, schedule="step",
    )  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        fit(Path(tmp) / "run", config, progress=False, num_threads=threads, num_workers=workers, log_every=log_every)
        wall = time.perf_counter() - t
        lines = (Path(tmp) / "run" / "metrics.jsonl").read_text().splitlines()
    windows = [r["images_per_s"] for r in map(json.loads, lines) if r.get("split") == "train"]
    timed = windows[1:] or windows
    return {
        "benchmark": "train_input", "arch": arch, "batch": batch, "crop": crop, "steps": steps, "threads": threads,
        "workers": workers,
        "images_per_s": round(statistics.median(timed), 1), "windows_images_per_s": [round(w, 1) for w in windows],
        "wall_s": round(wall, 1), "source": source.describe(), "device": str(jax.devices()[0]),
        "host_cpus": os.cpu_count(),
    }  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", type=Path, required=True, help="a CUB_200_2011 release folder or a TFDS build")
    p.add_argument("--arch", choices=tuple(ARCHS), default="resnet50")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--crop", type=int, default=224)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 4, help="decoding threads (default: the CPUs)")
    p.add_argument("--workers", type=int, default=0, help="decoding processes, each with --threads threads")
    p.add_argument("--log-every", type=int, default=10, help="steps per timed window")
    args = p.parse_args(argv)
    try:
        record = measure(args.data_dir, arch=args.arch, batch=args.batch, steps=args.steps, crop=args.crop,
                         threads=args.threads, log_every=args.log_every, workers=args.workers)  # fmt: skip
    except (DatasetError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(record))
    return 0


if __name__ == "__main__":
    sys.exit(main())
