"""Input pipeline throughput (images/s) of the training pipeline: decode, RandomResizedCrop + flip, batch.

The batches are uint8 pixels, as training and evaluation read them (they normalise on the device);
--host-normalize times the float32 batches normalised on the host instead (the library's default for other callers).

    python -m benchmarks.pipeline --synthetic --batch 64                  # generated CUB-format data (128 px wide)
    python -m benchmarks.pipeline --data-dir /data/CUB_200_2011           # a release folder, or a TFDS build of it
    python -m benchmarks.pipeline --compare --synthetic --size 500        # release folder vs its TFDS builds
    python -m benchmarks.pipeline --compare --data-dir /data/CUB_200_2011 --tfds-dir /data/tfds

--compare builds the TFDS forms of the release (the release's files, and pre-resized to --resize) into --tfds-dir
(default: a temporary folder; an existing build is reused), then times the sources in turn, --rounds times, each
round --steps batches of a fresh iterator at new steps (so a source's prefetching never runs while another is timed).
Prints one JSON line per source: the median images/s over rounds, and the median over rounds of its ratio to the
folder reader in the same round; the same per second of the process's CPU time (images_per_cpu_s, all threads),
which the other jobs of a shared machine disturb less than wall-clock time.
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

from delib_jax.data import DatasetError, load_dataset
from delib_jax.data.pipeline import Pipeline, cub_source, train_pipeline
from delib_jax.data.synthetic import make_cub


def _pipeline(data: Path, *, batch: int, threads: int, prefetch: int, crop: int, normalize: bool,
              workers: int = 0) -> Pipeline:  # fmt: skip
    ds = load_dataset("cub", data, report=lambda line: print(line, file=sys.stderr))
    return train_pipeline(
        cub_source(ds, "train"), batch_size=batch, num_epochs=None, crop=crop, num_threads=threads, prefetch=prefetch,
        normalize=normalize, num_workers=workers,
    )  # fmt: skip


def images_per_s(pipeline: Pipeline, start: int, steps: int) -> tuple[float, float | None]:
    """Images per second of wall-clock time and per second of this process's CPU time (all threads; what other jobs
    on a shared machine change least; None with worker processes, whose CPU time it does not see) over batches
    ``[start, start + steps)``, from a fresh iterator. With W worker processes the clock starts once each has
    delivered its first batch (their start-up, ~2 s each, is paid once per run, not per batch): it times the last
    ``steps - W`` batches."""
    workers = pipeline.config.num_workers
    if steps <= workers:
        raise ValueError(f"--steps ({steps}) must exceed --workers ({workers}): the first batch of each is not timed")
    t, cpu = time.perf_counter(), time.process_time()
    images = pipeline.config.batch_size * (steps - workers)
    for i, _ in enumerate(pipeline.iterate(start_step=start, stop_step=start + steps)):
        if i + 1 == workers:
            t = time.perf_counter()
    wall = images / (time.perf_counter() - t)
    return wall, None if workers else images / (time.process_time() - cpu)


def _images(pipeline: Pipeline) -> str:
    return "float32 (normalised on the host)" if pipeline.config.normalize else "uint8 (normalised on the device)"


def measure(root: Path, *, batch: int, steps: int, warmup: int, threads: int, prefetch: int, crop: int,
            normalize: bool = False, workers: int = 0) -> dict:  # fmt: skip
    """Time ``steps`` training batches after ``warmup`` batches; returns the JSON record."""
    pipeline = _pipeline(root, batch=batch, threads=threads, prefetch=prefetch, crop=crop, normalize=normalize,
                         workers=workers)  # fmt: skip
    if warmup and not workers:  # (a warm-up would not warm fresh worker processes)
        images_per_s(pipeline, 0, warmup)
    wall, cpu = images_per_s(pipeline, warmup, steps)
    return {
        "benchmark": "pipeline", "images_per_s": round(wall, 1), "images_per_cpu_s": cpu and round(cpu, 1),
        "batch": batch,
        "steps": steps, "threads": threads, "workers": workers, "prefetch": prefetch, "crop": crop,
        "images": _images(pipeline),
        "cpus": os.cpu_count(), "data": str(root),
    }  # fmt: skip


def compare(sources: dict[str, Path], *, batch: int, steps: int, warmup: int, rounds: int, threads: int,
            prefetch: int, crop: int, normalize: bool = False, workers: int = 0) -> list[dict]:  # fmt: skip
    """Interleaved rounds over ``sources`` (the first is the reference); one record per source."""
    pipes = {n: _pipeline(p, batch=batch, threads=threads, prefetch=prefetch, crop=crop, normalize=normalize,
                          workers=workers) for n, p in sources.items()}  # fmt: skip
    for p in pipes.values() if not workers else ():
        images_per_s(p, 0, max(warmup, 1))
    speeds: dict[str, list[float]] = {n: [] for n in pipes}
    cpu_speeds: dict[str, list[float]] = {n: [] for n in pipes}
    for r in range(rounds):
        for name, p in pipes.items():
            wall, cpu = images_per_s(p, max(warmup, 1) + r * steps, steps)
            speeds[name].append(wall)
            cpu_speeds[name].append(cpu)
    reference = next(iter(pipes))

    def ratio(values: dict[str, list[float]], name: str) -> float:
        return round(statistics.median([v / ref for v, ref in zip(values[name], values[reference])]), 3)

    records = []
    for name, values in speeds.items():
        records.append({
            "benchmark": "pipeline", "source": name, "images_per_s": round(statistics.median(values), 1),
            "ratio_to_folder": ratio(speeds, name),
            "images_per_cpu_s": None if workers else round(statistics.median(cpu_speeds[name]), 1),
            "cpu_ratio_to_folder": None if workers else ratio(cpu_speeds, name),
            "rounds_images_per_s": [round(v, 1) for v in values],
            "batch": batch, "steps": steps, "rounds": rounds, "threads": threads, "workers": workers,
            "prefetch": prefetch, "crop": crop,
            "images": _images(pipes[name]), "cpus": os.cpu_count(), "train_images": len(pipes[name].source),
            "data": str(sources[name]),
        })  # fmt: skip
    return records


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    data = parser.add_mutually_exclusive_group(required=True)
    data.add_argument("--synthetic", action="store_true", help="generate a synthetic CUB in a temporary folder")
    data.add_argument("--data-dir", "--cub", type=Path, help="a CUB_200_2011 folder (or its parent), or a TFDS build")
    parser.add_argument("--compare", action="store_true", help="the release folder against its TFDS builds")
    parser.add_argument("--resize", type=int, default=256, help="--compare: shorter side of the resized build")
    parser.add_argument("--tfds-dir", type=Path, help="--compare: where the TFDS builds go (default: a temporary one)")
    parser.add_argument("--size", type=int, default=128, help="--synthetic: image width in pixels (CUB's are ~500)")
    parser.add_argument("--images-per-class", type=int, default=48, help="--synthetic: images of each of 10 classes")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5, help="--compare: interleaved rounds")
    parser.add_argument("--threads", type=int, default=4, help="decoding threads (in each --workers process)")
    parser.add_argument("--workers", type=int, default=0, help="decoding processes (default 0: threads only)")
    parser.add_argument("--prefetch", type=int, default=4)
    parser.add_argument("--crop", type=int, default=224)
    parser.add_argument(
        "--host-normalize",
        action="store_true",
        help="float32 batches normalised on the host (default: uint8, as training reads them)",
    )
    args = parser.parse_args(argv)
    if args.workers and args.steps <= args.workers:
        parser.error(
            f"--steps ({args.steps}) must exceed --workers ({args.workers}): each worker's first batch is not timed"
        )
    try:
        return run(args)
    except DatasetError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def run(args: argparse.Namespace) -> int:
    opts = dict(batch=args.batch, steps=args.steps, warmup=args.warmup, threads=args.threads, prefetch=args.prefetch,
                crop=args.crop, normalize=args.host_normalize, workers=args.workers)  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        root = args.data_dir
        if args.synthetic:
            t = time.perf_counter()
            root = make_cub(Path(tmp) / "release", size=args.size, images_per_class=args.images_per_class).parent
            print(f"synthetic CUB ({args.size} px wide) generated in {time.perf_counter() - t:.0f} s", file=sys.stderr)
        if not args.compare:
            record = measure(root, **opts)
            if args.synthetic:
                record["data"] = f"synthetic-cub ({args.size} px)"
            print(json.dumps(record))
            return 0
        from delib_jax.data.tfds import build

        tfds_dir = args.tfds_dir or Path(tmp) / "tfds"
        sources = {"folder": root}
        for resize in (None, args.resize):
            t = time.perf_counter()
            found, built = build("cub", root, tfds_dir, resize=resize)
            took = f"built in {time.perf_counter() - t:.0f} s" if built else "reused"
            print(f"{found} {took}: {found.path}", file=sys.stderr)
            sources["tfds-" + found.config] = found.path
        for record in compare(sources, rounds=args.rounds, **opts):
            if args.synthetic:
                record["data"] = f"synthetic-cub ({args.size} px): {record['data']}"
            print(json.dumps(record))
    return 0


if __name__ == "__main__":
    sys.exit(main())
