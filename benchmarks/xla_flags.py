"""XLA:CPU's YNN fusion settings compared on the operations this project runs (`delib_jax._xla` picks one).

    python -m benchmarks.xla_flags --rounds 2                     # VGG16 / ResNet50 at 224 px, batch 2
    python -m benchmarks.xla_flags --arch small --size 32 --rounds 1 --repeats 1   # a quick smoke run

XLA reads its flags when the CPU backend starts, so every setting runs in its own process; the settings take turns
(round-robin, --rounds times) so that machine noise hits them alike, and each process reports medians of --repeats
calls after a warm-up. Timed per setting, with random weights: the forward pass of --arch (`make_predict_fn`), all
attribution maps (`make_attribute_fn`, gradient-Hessian, hardness), Grad-CAM of the predicted class (one backward
pass through the class head: fc6 for VGG16) and of --cam-classes classes in one call, and the --arch2 forward.
Prints one JSON line per setting with the medians over rounds.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

# name -> the value of --xla_cpu_experimental_ynn_fusion_type (None: jaxlib's default, no flag)
SETTINGS = {
    "jaxlib default": None,
    "none (empty list)": "",
    "-reduce": "-reduce",
    "individual_dot": "individual_dot",
}
FLAG = "--xla_cpu_experimental_ynn_fusion_type="


def _median_call(fn, repeats: int) -> float:
    import jax

    jax.block_until_ready(fn())  # compile
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def child(args: argparse.Namespace) -> dict:
    """Time the operations under the XLA_FLAGS this process was started with."""
    import jax

    jax.devices()  # start the CPU backend before delib_jax is imported: its own tuning must not change the setting
    import jax.numpy as jnp
    from flax import nnx

    from delib_jax.attribution import grad_cam, make_attribute_fn
    from delib_jax.models import create_model, make_predict_fn

    images = jax.random.normal(jax.random.key(0), (args.batch, args.size, args.size, 3), jnp.float32)
    out = {}
    model = create_model(args.arch, args.classes, rngs=nnx.Rngs(0))
    predict = make_predict_fn(model)
    explain = make_attribute_fn(model)
    a = predict(images).features
    k = min(args.cam_classes, args.classes)
    classes = jnp.broadcast_to(jnp.arange(k), (args.batch, k))
    out[f"{args.arch}_forward_s"] = _median_call(lambda: predict(images).logits, args.repeats)
    out[f"{args.arch}_explain_s"] = _median_call(lambda: explain(images).maps, args.repeats)
    out[f"{args.arch}_grad_cam_s"] = _median_call(lambda: grad_cam(model.classifier, a), args.repeats)
    out[f"{args.arch}_grad_cam_{k}_classes_s"] = _median_call(
        lambda: grad_cam(model.classifier, a, classes), args.repeats
    )
    if args.arch2:
        predict2 = make_predict_fn(create_model(args.arch2, args.classes, rngs=nnx.Rngs(0)))
        out[f"{args.arch2}_forward_s"] = _median_call(lambda: predict2(images).logits, args.repeats)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example: python -m benchmarks.xla_flags --rounds 2",
    )
    p.add_argument("--arch", default="vgg16")
    p.add_argument("--arch2", default="resnet50", help="a second architecture whose forward pass is timed ('' none)")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--classes", type=int, default=200)
    p.add_argument("--cam-classes", type=int, default=10)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--settings", default=",".join(SETTINGS), help="comma-separated names of SETTINGS")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(args)))
        return 0
    names = [n for n in args.settings.split(",") if n]
    unknown = [n for n in names if n not in SETTINGS]
    if unknown:
        p.error(f"unknown settings {unknown}; choose from {list(SETTINGS)}")
    base_flags = " ".join(f for f in os.environ.get("XLA_FLAGS", "").split() if "ynn_fusion_type" not in f)
    results: dict[str, list[dict]] = {n: [] for n in names}
    forwarded = [
        "--arch",
        args.arch,
        "--arch2",
        args.arch2,
        "--batch",
        str(args.batch),
        "--size",
        str(args.size),
        "--classes",
        str(args.classes),
        "--cam-classes",
        str(args.cam_classes),
        "--repeats",
        str(args.repeats),
    ]
    for _ in range(args.rounds):
        for name in names:
            value = SETTINGS[name]
            flags = base_flags if value is None else f"{base_flags} {FLAG}{value}".strip()
            env = {**os.environ, "XLA_FLAGS": flags}
            done = subprocess.run(
                [sys.executable, "-m", "benchmarks.xla_flags", "--child", *forwarded],
                env=env,
                capture_output=True,
                text=True,
                check=False,
            )
            if done.returncode != 0:
                print(done.stderr[-2000:], file=sys.stderr)
                return 1
            results[name].append(json.loads(done.stdout.strip().splitlines()[-1]))
    for name, runs in results.items():
        medians = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        print(
            json.dumps(
                {
                    "setting": name,
                    "flag": None if SETTINGS[name] is None else FLAG + SETTINGS[name],
                    "rounds": len(runs),
                    "batch": args.batch,
                    "size": args.size,
                    **medians,
                }
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
