"""The explanation job end to end against its stages: is the job bounded only by its slowest stage?

    python -m benchmarks.explain --arch resnet50 --images 200 --batch 32 --json
    python -m benchmarks.explain --checkpoint runs/cub --folder photos/ --batch 64 --json
    python -m benchmarks.explain --data-dir /data/tfds/delib_cub/resize256/1.0.0 --images 2000 --batch 64 --json

Generates --images JPEGs of CUB's size (500x375) in a temporary folder (or takes --folder, or the first --images
examples of a split of a CUB release or TFDS build, --data-dir), then prints one JSON
line: decode_img_s (the reader alone: decode, resize, crop, normalise into batch buffers), core_img_s (the compiled
explanation plus the compact outputs on as many device-resident batches), e2e_img_s (the whole job from files to
finished outputs, compilation excluded by a warm-up run and reported as compile_s), each the median of --rounds
interleaved rounds, ratio_to_slowest = e2e / min(decode,
core) (the goal: >= 0.85), writer_img_s (the writer stage alone: records, shards, index, on one core),
writer_shares_img_s (the readable strengths the writer computes, alone),
figures_s_per_core (figures drawn by one process),
bytes_per_image (the explanations folder), max_rss_mb (this process's peak). Random weights without --checkpoint.

    python -m benchmarks.explain --memory [--images 50 1600 10000] [--repeats 3] [--figures] [--class-folders]

measures instead the peak memory of all the job's processes at each image count, and how soon a resume starts
(`benchmarks.explain_memory`).
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def make_images(folder: Path, count: int, *, size: tuple[int, int] = (500, 375), seed: int = 0) -> list[Path]:
    """``count`` JPEG files like CUB's photos (500x375, smooth content plus texture), 16 distinct ones repeated."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    w, h = size
    blobs = []
    for _ in range(16):
        coarse = rng.integers(0, 256, (h // 25 + 1, w // 25 + 1, 3), dtype=np.uint8)
        image = Image.fromarray(coarse).resize((w, h), Image.BILINEAR)
        pixels = np.asarray(image, np.int16) + rng.integers(-20, 21, (h, w, 3))
        path = folder / "blob.jpg"
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(path, quality=90)
        blobs.append(path.read_bytes())
    files = []
    for i in range(count):
        path = folder / f"img_{i:06d}.jpg"
        path.write_bytes(blobs[i % len(blobs)])
        files.append(path)
    (folder / "blob.jpg").unlink()
    return files


def _model(arch: str, classes: int, crop: int, checkpoint: str | None):
    from flax import nnx

    from delib_jax.checkpoint import RunConfig, build_model, load_model

    if checkpoint:
        return load_model(checkpoint)
    config = RunConfig(arch=arch, num_classes=classes, class_names=[f"class {i}" for i in range(classes)],
                       crop=crop, resize=round(crop * 256 / 224), dataset="cub")  # fmt: skip
    model = build_model(config, rngs=nnx.Rngs(0))
    model.eval()
    return model, config


def _decode_rate(files, config, batch: int, workers: int) -> float:
    from delib_jax import _reader

    files = [files.payload(i) for i in range(len(files))]  # paths, or a dataset's images (a build's: their bytes)
    with _reader.Reader(batch=batch, crop=config.crop, resize=config.resize, slots=4, workers=workers) as reader:
        batches = [files[i : i + batch] for i in range(0, len(files), batch)]
        for f in reader.submit(0, batches[0]):  # start the workers
            f.result()
        t = time.perf_counter()
        pending = []
        for b, paths in enumerate(batches):
            pending.append(reader.submit(b % 4, paths))
            if len(pending) > 3:
                [f.result() for f in pending.pop(0)]
        for futures in pending:
            [f.result() for f in futures]
        return len(files) / (time.perf_counter() - t)


def _core_fn(model, batch: int, crop: int, explain_options: dict):
    """(time one pass of ``batches`` device-resident batches -> images/s, one batch's host outputs)."""
    import jax

    from delib_jax import explanation as ex
    from delib_jax.job.device import compact_fn as _compact_fn

    mesh = ex.batch_mesh()
    fn, _ = ex.make_explain_fn(model, mesh=mesh, **explain_options)
    compact = _compact_fn()
    images = jax.device_put(
        np.random.default_rng(0).standard_normal((batch, crop, crop, 3), np.float32),
        jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("batch")),
    )
    host = jax.device_get(compact(fn(images)))

    def rate(batches: int) -> float:
        t = time.perf_counter()
        out = None
        for _ in range(batches):
            out = compact(fn(images))  # dispatched back to back, as the job dispatches them
        jax.block_until_ready(out)
        return batches * batch / (time.perf_counter() - t)

    return rate, host


def _writer_rate(host: dict, names, count: int, crop: int) -> float:
    """The writer stage alone on ``count`` images (the records and shards of one batch's host outputs repeated)."""
    from delib_jax import store as st
    from delib_jax.job.writing import host_lists as _host_lists
    from delib_jax.job.writing import make_record as _record

    arrays = {k: v for k, v in host.items() if k != "finite"}
    n = len(arrays["probs"])
    with tempfile.TemporaryDirectory() as d:
        warm = st.ShardWriter(
            Path(d), 1, 256, image_size=(crop, crop), run=st.new_run_id()
        )  # first touches of memory and files
        lists = _host_lists(host, (crop, crop))
        warm.add(arrays, [_record(j, f"/w/{j}.jpg", [1, 1], lists, j, names, None) for j in range(n)])
        warm.flush()
        writer = st.ShardWriter(Path(d), 0, 256, image_size=(crop, crop), run=st.new_run_id())
        t = time.perf_counter()
        for start in range(0, count, n):
            lists = _host_lists(host, (crop, crop))
            records = [_record(start + j, f"/data/img_{start + j:06d}.jpg", [100_000, 1], lists, j, names, None)
                       for j in range(min(n, count - start))]  # fmt: skip
            writer.add(arrays, records)
        writer.flush()
        return count / (time.perf_counter() - t)


def _shares_rate(host: dict, count: int, crop: int) -> float:
    """The readable strengths alone (`delib_jax.job.writing.batch_shares`, part of the writer stage), images/s."""
    from delib_jax.job.writing import batch_shares

    n = len(host["probs"])
    batch_shares(host, (crop, crop))  # the upsampling weights, computed once
    t = time.perf_counter()
    for _ in range(0, count, n):
        batch_shares(host, (crop, crop))
    return math.ceil(count / n) * n / (time.perf_counter() - t)


def _figure_rate(host: dict, names, files, config, count: int = 8) -> float:
    """Figures drawn per second by one core (decode the source again, draw, write the PNG)."""
    from delib_jax import store as st
    from delib_jax.job.writing import render_figure as _render_figure

    arrays = {k: v for k, v in host.items() if k not in ("finite", "mask_bits")}
    arrays["masks"] = st.unpack_bits(host["mask_bits"], (config.crop, config.crop))
    settings = {"score": "hardness", "method": "gradient_hessian"}
    with tempfile.TemporaryDirectory() as d:
        e = st.explanation_from_row(arrays, 0, names, settings, str(files[0]))
        _render_figure(e, files.payload(0), config.resize, config.crop, f"{d}/warm.png", {})
        t = time.perf_counter()
        for j in range(count):
            e = st.explanation_from_row(arrays, j % len(arrays["probs"]), names, settings, str(files[j % len(files)]))
            _render_figure(e, files.payload(j % len(files)), config.resize, config.crop, f"{d}/{j}.png", {})
        return count / (time.perf_counter() - t)


def run(args) -> dict:
    import jax

    from delib_jax import _reader
    from delib_jax.job.folder import PathList
    from delib_jax.stream import JobOptions, explain_files

    model, config = _model(args.arch, args.classes, args.crop, args.checkpoint)
    workers = _reader.default_workers() if args.workers is None else args.workers
    explain_options = {"top_n": args.top_n, "max_insecurities": args.max_insecurities}
    tmp = Path(tempfile.mkdtemp(prefix="delib-bench-"))
    try:
        if args.data_dir:  # a dataset's split: a release folder, or a TFDS build read from its records
            from delib_jax.job.inputs import dataset_inputs

            files = dataset_inputs("cub", args.data_dir, args.split)[: args.images or None]
        elif args.folder:
            from delib_jax.cli import image_files

            files = image_files([args.folder], lambda m: None)[: args.images or None]
        else:
            files = PathList(make_images(tmp / "images", args.images))
        options = JobOptions(batch_size=args.batch, workers=workers, progress=False, json_limit=0,
                             figures=args.figures)  # fmt: skip
        warm = explain_files(model, config, files[: args.batch], tmp / "warm", options=options,
                             report=lambda m: None, **explain_options)  # fmt: skip
        core_rate, host = _core_fn(model, args.batch, config.crop, explain_options)
        decodes, cores, e2es = [], [], []
        for r in range(args.rounds):  # interleaved, so that machine noise hits every stage alike
            decodes.append(_decode_rate(files, config, args.batch, workers))
            cores.append(core_rate(math.ceil(len(files) / args.batch)))
            t = time.perf_counter()
            summary = explain_files(model, config, files, tmp / f"out{r}", options=options, report=lambda m: None,
                                    **explain_options)  # fmt: skip
            e2es.append(len(files) / (time.perf_counter() - t))
        decode, core, e2e = (statistics.median(v) for v in (decodes, cores, e2es))
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        explained_bytes = sum(p.stat().st_size for p in (tmp / "out0" / "explanations").iterdir())
        writer = _writer_rate(host, list(config.class_names), max(1000, len(files)), config.crop)
        shares = _shares_rate(host, max(1000, len(files)), config.crop)
        figures = _figure_rate(host, list(config.class_names), files, config)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    d = jax.devices()[0]
    return {
        "arch": config.arch, "images": len(files), "batch": args.batch, "crop": config.crop,
        "input": "files" if not args.data_dir else f"{files.form} {args.split} split",
        "classes": config.num_classes, "workers": workers, "figures": args.figures,
        "device": f"{d.platform} ({d.device_kind})", "devices": jax.local_device_count(),
        "decode_img_s": round(decode, 2), "core_img_s": round(core, 2), "e2e_img_s": round(e2e, 2),
        "ratio_to_slowest": round(e2e / min(decode, core), 3), "compile_s": round(warm.compile_s, 2),
        "rounds_e2e_img_s": [round(v, 2) for v in e2es], "rounds_core_img_s": [round(v, 2) for v in cores],
        "writer_img_s": round(writer, 1), "writer_shares_img_s": round(shares, 1),
        "figures_s_per_core": round(figures, 2),
        "bytes_per_image": round(explained_bytes / max(1, summary.explained)),
        "max_rss_mb": round(rss, 1), "explained": summary.explained,
    }  # fmt: skip


def main(argv=None) -> int:
    from delib_jax.models import ARCHS

    p = argparse.ArgumentParser(prog="python -m benchmarks.explain", description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", choices=sorted(ARCHS), default="resnet50")
    p.add_argument("--checkpoint", help="a training run (default: random weights)")
    p.add_argument("--folder", help="explain the images of this folder instead of generated JPEGs")
    p.add_argument(
        "--data-dir", help="explain a split of CUB instead: its release folder or a TFDS build (e.g. pre-resized)"
    )
    p.add_argument("--split", choices=("test", "train"), default="test", help="with --data-dir (default: test)")
    p.add_argument("--images", type=int, nargs="+", default=None,
                   help="images (default 200; with --memory: several counts, default 50 1600 10000)")  # fmt: skip
    p.add_argument("--repeats", type=int, default=1, help="with --memory: runs per image count (medians)")
    p.add_argument(
        "--figures-stub",
        action="store_true",
        help="with --memory: figures on, each written as a plain PNG instead of drawn (benchmarks/explain_memory.py)",
    )
    p.add_argument(
        "--class-folders",
        action="store_true",
        help="with --memory: the images as the test split of class folders, explained as delib explain --data-dir does",
    )
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--classes", type=int, default=200)
    p.add_argument("--crop", type=int, default=224)
    p.add_argument("--top-n", type=int, default=5)
    p.add_argument("--max-insecurities", type=int, default=4)
    p.add_argument("--workers", type=int, default=None, help="reader processes (default: cores - 1)")
    p.add_argument("--figures", action="store_true", help="draw a figure per image too")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds of decode, core and job (medians)")
    p.add_argument("--json", action="store_true", help="print one JSON line only")
    p.add_argument(
        "--memory",
        action="store_true",
        help="peak memory of the job's processes per image count instead (benchmarks/explain_memory.py)",
    )
    args = p.parse_args(argv)
    if args.memory:
        from benchmarks import explain_memory

        figures = "stub" if args.figures_stub else args.figures
        result = explain_memory.run(args.images or list(explain_memory.COUNTS), figures, repeats=args.repeats,
                                    class_folders=args.class_folders)  # fmt: skip
        print(json.dumps(result) if args.json else json.dumps(result, indent=1))
        return 0
    args.images = (args.images or [200])[0]
    result = run(args)
    print(json.dumps(result) if args.json else "\n".join(f"{k:>18}: {v}" for k, v in result.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
