"""Cost of the higher-order attributions: pixel-level second-order maps and interaction maps at A.

    python -m benchmarks.higher_order --arch resnet50 --classes 200 --size 224 --batch 1 --top 5 --json

Prints one JSON line. Pixel level (X = the images, locations = pixels, forward-over-reverse order):
pixel_first_s (gradient x input maps of the top --top classes), pixel_cross_s (the same maps plus the exact
cross-location second-order term 1/2 x_l . (H X)_l), pixel_ratio = pixel_cross_s / pixel_first_s. At A:
forward_s (jitted forward to class probabilities and the hardness score), interactions_s (images -> the exact
interaction maps (B, C + 1, L, L) of every output, from the heads' logit tangents), interactions_ratio =
interactions_s / forward_s. Medians of --repeats interleaved runs after a warm-up, one process, random weights.
"""

from __future__ import annotations

import argparse
import json
import sys

import jax
import jax.numpy as jnp
from flax import nnx

from benchmarks.attribution import _device, _median_times
from delib_jax.attribution import make_layer_attribution_fn, make_model_interactions_fn, split_model
from delib_jax.models import ARCHS, create_model, split_leaves


def run(arch: str, batch: int, classes: int, size: int, top: int, repeats: int, seed: int = 0) -> dict:
    model = create_model(arch, classes, rngs=nnx.Rngs(seed))
    model.eval()
    images = jax.random.normal(jax.random.key(seed), (batch, size, size, 3), jnp.float32)

    features, pixel_head = split_model(model, "image")
    first = make_layer_attribution_fn(None, pixel_head, targets=top, method="gradient", order="reverse")
    cross = make_layer_attribution_fn(
        None, pixel_head, targets=top, method="gradient_hessian", second_order="cross", order="reverse"
    )
    pixel_first_s, pixel_cross_s = _median_times([lambda: first(images).maps, lambda: cross(images).maps], repeats)

    structure, leaves = split_leaves(model)

    @jax.jit
    def forward(leaves, x):
        out = structure.merge(leaves)(x)
        return jax.nn.softmax(out.logits, -1), jax.nn.sigmoid(out.hardness_logit)

    interactions = make_model_interactions_fn(model)
    forward_s, interactions_s = _median_times(
        [lambda: forward(leaves, images), lambda: interactions(images).values], repeats
    )
    shape = interactions(images).values.shape
    return {
        "arch": arch,
        "batch": batch,
        "size": size,
        "classes": classes,
        "top": top,
        "device": _device(),
        "pixel_locations": size * size,
        "pixel_first_s": pixel_first_s,
        "pixel_cross_s": pixel_cross_s,
        "pixel_ratio": pixel_cross_s / pixel_first_s,
        "forward_s": forward_s,
        "interactions_s": interactions_s,
        "interactions_ratio": interactions_s / forward_s,
        "interactions_shape": list(shape),
        "repeats": repeats,
        "jax": jax.__version__,
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example: python -m benchmarks.higher_order --arch resnet50 --batch 1 --json",
    )
    p.add_argument("--arch", default="resnet50", choices=sorted(ARCHS))
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--classes", type=int, default=200)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--top", type=int, default=5, help="classes explained at pixel level (the top N)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", action="store_true", help="print only the JSON line")
    args = p.parse_args(argv)
    if min(args.batch, args.classes - 1, args.size, args.top, args.repeats) < 1 or args.top > args.classes:
        print(
            "error: --batch, --size, --repeats and --top must be >= 1, --top at most --classes, --classes >= 2",
            file=sys.stderr,
        )
        return 2
    result = run(args.arch, args.batch, args.classes, args.size, args.top, args.repeats)
    if not args.json:
        print(
            f"{args.arch} {args.size}px batch {args.batch}: pixel top-{args.top} cross / first "
            f"{result['pixel_cross_s']:.3f}s / {result['pixel_first_s']:.3f}s = {result['pixel_ratio']:.2f}; "
            f"interactions {result['interactions_shape']} / forward {result['interactions_s']:.3f}s / "
            f"{result['forward_s']:.3f}s = {result['interactions_ratio']:.2f}"
        )
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
