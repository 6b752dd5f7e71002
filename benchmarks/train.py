"""Training-step throughput, and the cost of joint hardness training relative to a plain forward+backward step.

    python -m benchmarks.train --arch small --batch 32 --size 64
    python -m benchmarks.train --arch resnet50 --batch 8 --size 224

Times, in one process and interleaved (joint, plain, joint, plain, ...) after warm-up:
- joint: `delib_jax.train.train_step` (classifier + hardness predictor, both losses, optimizer update);
- plain: forward + backward of the same backbone and class head with plain cross-entropy (no hardness predictor,
  no optimizer update).
Prints one JSON line: medians in seconds, images/s of the joint step and ratio = joint / plain.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import numpy as np
import optax
from flax import nnx

from delib_jax.checkpoint import RunConfig, build_model
from delib_jax.models import ARCHS
from delib_jax.train.loop import compile_steps, create_train_state, make_mesh, shard_batch


def plain_step_fn(config: RunConfig):
    """A compiled (params, rest, batch) -> grads: forward + backward of backbone and class head, mean cross-entropy."""
    model = build_model(RunConfig(**{**config.to_json(), "hardness": "none"}))
    model.train()
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def grads(params, rest, batch):
        def loss(params):
            m = nnx.merge(graphdef, params, rest, copy=True)
            logits = m.classifier(m.features(batch["image"]))
            return optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()

        return jax.grad(loss)(params)

    return jax.jit(grads), params, rest


def measure(arch: str, *, batch: int, size: int, hardness: str, repeats: int, warmup: int) -> dict:
    config = RunConfig(
        arch=arch, num_classes=200, class_names=[str(i) for i in range(200)], hardness=hardness, crop=size,
        resize=size, batch_size=batch, steps=1000,
    )  # fmt: skip
    mesh = make_mesh()
    state = create_train_state(config, total_steps=1000, mesh=mesh)
    step_fn, _ = compile_steps(mesh)
    plain, params, rest = plain_step_fn(config)
    rng = np.random.default_rng(0)
    host = {"image": rng.normal(size=(batch, size, size, 3)).astype(np.float32), "label": rng.integers(0, 200, batch)}
    data = shard_batch(host, mesh)
    params, rest = jax.device_put((params, rest), jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))

    def joint_once():
        nonlocal state
        state, metrics = step_fn(state, data)
        jax.block_until_ready(metrics)

    def plain_once():
        jax.block_until_ready(plain(params, rest, data))

    for _ in range(warmup):
        joint_once()
        plain_once()
    times = {"joint": [], "plain": []}
    for _ in range(repeats):
        for name, fn in (("joint", joint_once), ("plain", plain_once)):
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    joint, plain_s = statistics.median(times["joint"]), statistics.median(times["plain"])
    return {
        "benchmark": "train", "arch": arch, "hardness": hardness, "batch": batch, "size": size,
        "images_per_s": round(batch / joint, 2), "joint_step_s": round(joint, 5), "plain_fwd_bwd_s": round(plain_s, 5),
        "ratio": round(joint / plain_s, 3), "repeats": repeats, "devices": jax.device_count(),
        "device": jax.devices()[0].device_kind,
    }  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--arch", choices=tuple(ARCHS), default="small")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, help="input side (default: the architecture's, 224 or 128 for small)")
    parser.add_argument("--hardness", choices=("head", "network"), default="head")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args(argv)
    size = args.size or ARCHS[args.arch].default_size
    record = measure(args.arch, batch=args.batch, size=size, hardness=args.hardness, repeats=args.repeats,
                     warmup=args.warmup)  # fmt: skip
    print(json.dumps(record))


if __name__ == "__main__":
    main()
