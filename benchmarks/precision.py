"""How exact the maps are on this device: fast vs generic path, and the device's default matmul precision.

    python -m benchmarks.precision --arch resnet50 --batch 4 --json

On GPUs, XLA's default float32 matmul/convolution precision may use TF32 (10-bit mantissa) arithmetic. This prints,
for random weights, the relative error (max |x - y| / max |y| over all maps) of
- fast_vs_generic: the structure-aware path against the generic nested-jvp path, both at 'highest' precision;
- default_vs_highest: the fast path at the default precision against itself at 'highest' (backbone included);
- maps_default_vs_highest: the attribution arithmetic alone (the maps from one fixed A, computed at the default
  precision), default against 'highest' precision.

With ``--bfloat16`` it instead compares the bfloat16 backbone (``precision="bfloat16"``, heads and attribution in
float32) against the float32 model on synthetic birds (`delib_jax.data.synthetic`), through `make_explain_fn`:
bf16_vs_f32 (max |maps difference| / max |maps|, all top-N maps and the difficulty map), bf16_probs_max_abs,
predictions_changed, and over the insecurities (top 5 classes, 4 insecurities of 10%): pairs_changed (images whose
ranked pairs differ), mask_iou_mean / mask_iou_min (IoU of the masks of the pairs both found).
"""

from __future__ import annotations

import argparse
import json
import sys

import jax
import jax.numpy as jnp
from flax import nnx

from delib_jax.attribution import Options, make_attribute_fn
from delib_jax.attribution._core import _attribute
from delib_jax.models import ARCHS, create_model


def _rel(x: jax.Array, y: jax.Array) -> float:
    return float(jnp.max(jnp.abs(x - y)) / jnp.max(jnp.abs(y)))


def run(arch: str, batch: int, classes: int, size: int, method: str, seed: int = 0) -> dict:
    model = create_model(arch, classes, rngs=nnx.Rngs(seed))
    images = jax.random.normal(jax.random.key(seed), (batch, size, size, 3), jnp.float32)

    def maps(path: str, precision: str | None) -> jax.Array:
        with jax.default_matmul_precision(precision):
            return make_attribute_fn(model, method=method, path=path)(images).maps

    fast_hi, generic_hi = maps("fast", "highest"), maps("generic", "highest")
    fast_default = maps("fast", None)
    a = nnx.jit(lambda m, x: m.backbone(x))(model, images)
    c_graph, c_state = nnx.split(model.classifier)
    h_graph, h_state = nnx.split(model.hardness_head)

    def maps_from_a(precision: str | None) -> jax.Array:
        @jax.jit
        def fn(a):
            zero = jnp.zeros_like(a)
            return _attribute(
                nnx.merge(c_graph, c_state),
                nnx.merge(h_graph, h_state),
                a,
                a,
                zero,
                zero,
                Options(method=method, path="fast"),
            ).maps

        with jax.default_matmul_precision(precision):
            return fn(a)

    d = jax.devices()[0]
    return {
        "arch": arch,
        "batch": batch,
        "size": size,
        "method": method,
        "device": f"{d.platform} ({d.device_kind})",
        "fast_vs_generic": _rel(fast_hi, generic_hi),
        "default_vs_highest": _rel(fast_default, fast_hi),
        "maps_default_vs_highest": _rel(maps_from_a(None), maps_from_a("highest")),
        "jax": jax.__version__,
    }


def synthetic_birds(count: int, size: int, seed: int = 0) -> jax.Array:
    """(count, size, size, 3) normalised synthetic bird images (the synthetic test set's drawing, in memory)."""
    import numpy as np

    from delib_jax.data import synthetic, transforms

    classes, _ = synthetic.make_bird_classes(10, seed)
    rng = np.random.default_rng(seed)
    out = []
    for i in range(count):
        image = synthetic._background(size, size, rng)
        synthetic.draw_bird(image, synthetic._image_values(classes[i % len(classes)], rng, 0.1), rng)
        pixels = np.asarray(image.convert("RGB"), np.uint8)
        out.append(transforms.normalize(pixels, transforms.IMAGENET_STATS))
    return jnp.asarray(np.stack(out), jnp.float32)


def run_bfloat16(arch: str, batch: int, classes: int, size: int, method: str, seed: int = 0) -> dict:
    import numpy as np

    from delib_jax.explanation import make_explain_fn

    model = create_model(arch, classes, rngs=nnx.Rngs(seed))
    images = synthetic_birds(batch, size, seed)
    kw = dict(method=method, top_n=5, max_insecurities=4, coverage=0.1)
    ref = jax.device_get(make_explain_fn(model, **kw)[0](images))
    got = jax.device_get(make_explain_fn(model, precision="bfloat16", **kw)[0](images))
    r, g = ref.insecurities, got.insecurities
    changed, ious = 0, []
    for i in range(batch):
        pairs_r = [tuple(p) for p, v in zip(r.pairs[i].tolist(), r.valid[i]) if v]
        pairs_g = [tuple(p) for p, v in zip(g.pairs[i].tolist(), g.valid[i]) if v]
        changed += pairs_r != pairs_g
        for q, pair in enumerate(pairs_r):
            if pair in pairs_g:
                m_r, m_g = np.asarray(r.masks[i, q], bool), np.asarray(g.masks[i, pairs_g.index(pair)], bool)
                ious.append(float((m_r & m_g).sum() / max((m_r | m_g).sum(), 1)))
    d = jax.devices()[0]
    return {
        "arch": arch,
        "batch": batch,
        "size": size,
        "method": method,
        "device": f"{d.platform} ({d.device_kind})",
        "images": "synthetic birds",
        "bf16_vs_f32": _rel(got.attribution.maps, ref.attribution.maps),
        "bf16_probs_max_abs": float(jnp.max(jnp.abs(got.attribution.probs - ref.attribution.probs))),
        "predictions_changed": int(np.sum(np.argmax(ref.attribution.probs, -1) != np.argmax(got.attribution.probs, 1))),
        "pairs_changed": changed,
        "mask_iou_mean": float(np.mean(ious)) if ious else None,
        "mask_iou_min": float(np.min(ious)) if ious else None,
        "jax": jax.__version__,
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="resnet50", choices=sorted(ARCHS))
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--classes", type=int, default=200)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--method", default="gradient_hessian", choices=("gradient", "gradient_hessian"))
    p.add_argument("--bfloat16", action="store_true", help="bfloat16 backbone against float32 on synthetic birds")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    fn = run_bfloat16 if args.bfloat16 else run
    result = fn(args.arch, args.batch, args.classes, args.size, args.method, args.seed)
    print(json.dumps(result) if args.json else "\n".join(f"{k:>20}: {v}" for k, v in result.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
