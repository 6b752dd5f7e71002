"""How exact the maps are on this device: fast vs generic path, and the device's default matmul precision.

    python -m benchmarks.precision --arch resnet50 --batch 4 --json

On GPUs, XLA's default float32 matmul/convolution precision may use TF32 (10-bit mantissa) arithmetic. This prints,
for random weights, the relative error (max |x - y| / max |y| over all maps) of
- fast_vs_generic: the structure-aware path against the generic nested-jvp path, both at 'highest' precision;
- default_vs_highest: the fast path at the default precision against itself at 'highest' (backbone included);
- maps_default_vs_highest: the attribution arithmetic alone (the maps from one fixed A, computed at the default
  precision), default against 'highest' precision.
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
            return _attribute(nnx.merge(c_graph, c_state), nnx.merge(h_graph, h_state), a, a, zero, zero,
                              Options(method=method, path="fast")).maps

        with jax.default_matmul_precision(precision):
            return fn(a)

    d = jax.devices()[0]
    return {
        "arch": arch, "batch": batch, "size": size, "method": method, "device": f"{d.platform} ({d.device_kind})",
        "fast_vs_generic": _rel(fast_hi, generic_hi), "default_vs_highest": _rel(fast_default, fast_hi),
        "maps_default_vs_highest": _rel(maps_from_a(None), maps_from_a("highest")),
        "jax": jax.__version__,
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="resnet50", choices=sorted(ARCHS))
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--classes", type=int, default=200)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--method", default="gradient_hessian", choices=("gradient", "gradient_hessian"))
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    result = run(args.arch, args.batch, args.classes, args.size, args.method)
    print(json.dumps(result) if args.json else "\n".join(f"{k:>20}: {v}" for k, v in result.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
