"""Input pipeline throughput (images/s) of the training pipeline: decode, RandomResizedCrop + flip, normalise, batch.

    python -m benchmarks.pipeline --synthetic --batch 64          # generated CUB-format data in a temporary folder
    python -m benchmarks.pipeline --cub /data/CUB_200_2011        # a real release

Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

from delib_jax.data import load_cub
from delib_jax.data.pipeline import cub_source, train_pipeline
from delib_jax.data.synthetic import make_cub


def measure(root: Path, *, batch: int, steps: int, warmup: int, threads: int, prefetch: int, crop: int) -> dict:
    """Time ``steps`` training batches after ``warmup`` batches; returns the JSON record."""
    ds = load_cub(root)
    pipeline = train_pipeline(
        cub_source(ds, "train"), batch_size=batch, num_epochs=None, crop=crop, num_threads=threads, prefetch=prefetch
    )
    it = pipeline.iterate()
    for _ in range(warmup):
        next(it)
    start = time.perf_counter()
    for _ in range(steps):
        next(it)
    seconds = time.perf_counter() - start
    return {
        "benchmark": "pipeline", "images_per_s": round(batch * steps / seconds, 1), "batch": batch, "steps": steps,
        "threads": threads, "prefetch": prefetch, "crop": crop, "cpus": os.cpu_count(), "data": str(root),
    }  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    data = parser.add_mutually_exclusive_group(required=True)
    data.add_argument("--synthetic", action="store_true", help="generate a default synthetic CUB (about 5 s)")
    data.add_argument("--cub", type=Path, help="a CUB_200_2011 folder or its parent")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=4)
    parser.add_argument("--prefetch", type=int, default=4)
    parser.add_argument("--crop", type=int, default=224)
    args = parser.parse_args(argv)
    opts = dict(batch=args.batch, steps=args.steps, warmup=args.warmup, threads=args.threads, prefetch=args.prefetch,
                crop=args.crop)  # fmt: skip
    if args.synthetic:
        with tempfile.TemporaryDirectory() as tmp:
            record = measure(make_cub(tmp), **opts)
            record["data"] = "synthetic-cub (128 px)"
    else:
        record = measure(args.cub, **opts)
    print(json.dumps(record))


if __name__ == "__main__":
    main()
