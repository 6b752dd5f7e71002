"""The evaluation loop against the explanation job on the same images: time per batch of each.

    python -m benchmarks.evaluation --arch small --crop 128 --num-images 64 --batch 16 --json

Makes a synthetic CUB dataset and a run with random weights (or takes --checkpoint, which names its dataset), then
prints one JSON line: eval_s_per_batch (`evaluate_cub`, the paper's full row with --runs random baselines, after a
warm-up run; the ranking of the test split by difficulty is timed apart as rank_s), job_s_per_batch (the explanation
job, `delib_jax.stream.explain_files`, on the files of the same hardest images, after a warm-up) and their ratio
(the goal: <= 1.5).
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import tempfile
import time
from pathlib import Path


def _run_folder(tmp: Path, args):
    from flax import nnx

    from delib_jax.checkpoint import RunCheckpoints, RunConfig, build_model, save_run_config
    from delib_jax.data import load_cub, synthetic
    from delib_jax.data.transforms import CUB_STATS

    data = synthetic.make_cub(tmp / "data", classes=args.classes, images_per_class=args.images_per_class,
                              size=args.size, seed=0)  # fmt: skip
    names = list(load_cub(data).class_names)
    config = RunConfig(arch=args.arch, num_classes=len(names), class_names=names, dataset="cub", crop=args.crop,
                       resize=round(args.crop * 8 / 7), mean=CUB_STATS.mean, std=CUB_STATS.std, data_dir=str(data),
                       synthetic=True)  # fmt: skip
    save_run_config(tmp / "run", config)
    model = build_model(config, rngs=nnx.Rngs(0))
    _, params, rest = nnx.split(model, nnx.Param, ...)
    with RunCheckpoints(tmp / "run") as ckpt:
        ckpt.save("best", 1, params=params, model_state=rest, meta={})
    return tmp / "run"


def run(args) -> dict:
    import jax

    from delib_jax.checkpoint import load_model
    from delib_jax.data import load_cub
    from delib_jax.data.pipeline import cub_source
    from delib_jax.evaluation import protocol
    from delib_jax.stream import JobOptions, explain_files

    tmp = Path(tempfile.mkdtemp(prefix="delib-bench-eval-"))
    try:
        run_dir = Path(args.checkpoint) if args.checkpoint else _run_folder(tmp, args)
        model, config = load_model(run_dir)
        dataset = load_cub(config.data_dir)
        options = protocol.EvalOptions(num_images=args.num_images, batch_size=args.batch, runs=args.runs)
        protocol.evaluate_cub(model, config, dataset, protocol.FULL, options)  # warm-up: compilation
        test = cub_source(dataset, "test")
        t = time.perf_counter()
        chosen = protocol.hardest_images(model, config, test, "hardness", args.num_images, args.batch)
        rank_s = time.perf_counter() - t
        t = time.perf_counter()
        result = protocol.evaluate_cub(model, config, dataset, protocol.FULL, options)
        eval_s = time.perf_counter() - t
        batches = math.ceil(len(chosen) / args.batch)
        files = [dataset.image_paths[i] for i in test.indices[chosen]]
        job = JobOptions(batch_size=args.batch, progress=False, json_limit=0)
        kw = {"top_n": options.top_n, "k": options.k, "report": lambda m: None}
        explain_files(model, config, files, tmp / "warm", options=job, **kw)
        t = time.perf_counter()
        explain_files(model, config, files, tmp / "out", options=job, **kw)
        job_s = time.perf_counter() - t
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    d = jax.devices()[0]
    return {
        "arch": config.arch, "crop": config.crop, "images": len(chosen), "batch": args.batch, "runs": args.runs,
        "device": f"{d.platform} ({d.device_kind})", "insecurities": result["insecurities"],
        "eval_s": round(eval_s, 3), "rank_s": round(rank_s, 3), "eval_s_per_batch": round(eval_s / batches, 4),
        "job_s_per_batch": round(job_s / batches, 4), "ratio": round(eval_s / job_s, 3),
        "ratio_without_ranking": round((eval_s - rank_s) / job_s, 3),
    }  # fmt: skip


def main(argv=None) -> int:
    from delib_jax.models import ARCHS

    p = argparse.ArgumentParser(prog="python -m benchmarks.evaluation", description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", choices=sorted(ARCHS), default="small")
    p.add_argument("--checkpoint", help="a training run on CUB-format data (default: random weights, synthetic)")
    p.add_argument("--crop", type=int, default=128)
    p.add_argument("--size", type=int, default=160, help="synthetic image width")
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--images-per-class", type=int, default=16)
    p.add_argument("--num-images", type=int, default=64)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--json", action="store_true", help="print one JSON line only")
    args = p.parse_args(argv)
    result = run(args)
    print(json.dumps(result) if args.json else "\n".join(f"{k:>24}: {v}" for k, v in result.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
