"""Where the time of an explanation goes: backbone, forward, and the attribution pieces on a fixed A.

    python -m benchmarks.breakdown --arch vgg16 --batch 2 --json

Prints one JSON line of medians (seconds, interleaved runs after a warm-up): backbone_s (images -> A), forward_s
(images -> probabilities and difficulty) with the weights as compile-time constants, forward_args_s the same with
the weights as arguments (as `make_attribute_fn` passes them), explain_s (images -> all maps, the public function,
which reduces the images for NaN/inf in the same launch and waits for the flags), explain_unchecked_s (the same
compiled function, without looking at the flags), and on a precomputed A: heads_s (the class and hardness heads'
primal), tangents_s (the class head's per-location logit tangents), maps_s (all maps from A).
"""

from __future__ import annotations

import argparse
import json
import sys

import jax
import jax.numpy as jnp
from flax import nnx

from benchmarks.attribution import _device, _median_times
from delib_jax import difficulty
from delib_jax.attribution import METHODS, Options, _compiled, make_attribute_fn
from delib_jax.attribution._core import _attribute
from delib_jax.models import ARCHS, create_model


def run(arch: str, batch: int, classes: int, size: int, method: str, repeats: int, seed: int = 0) -> dict:
    model = create_model(arch, classes, rngs=nnx.Rngs(seed))
    model.eval()
    images = jax.random.normal(jax.random.key(seed), (batch, size, size, 3), jnp.float32)
    graphdef, state = nnx.split(model)
    bb_graph, bb_state = nnx.split(model.backbone)
    c_graph, c_state = nnx.split(model.classifier)
    h_graph, h_state = nnx.split(model.hardness_head)

    @jax.jit
    def backbone(x):
        return nnx.merge(bb_graph, bb_state)(x).astype(jnp.float32)

    @jax.jit
    def forward(x):
        out = nnx.merge(graphdef, state)(x)
        return jax.nn.softmax(out.logits, -1), difficulty.score_from_outputs("hardness", out.logits, out.hardness_logit)

    @jax.jit
    def heads(a):
        return nnx.merge(c_graph, c_state)(a), nnx.merge(h_graph, h_state)(a)

    @jax.jit
    def tangents(a):
        return nnx.merge(c_graph, c_state).tangents(a, a)

    @jax.jit
    def maps(a):
        zero = jnp.zeros_like(a)
        return _attribute(nnx.merge(c_graph, c_state), nnx.merge(h_graph, h_state), a, a, zero, zero,
                          Options(method=method)).maps

    @jax.jit
    def forward_args(state, x):
        out = nnx.merge(graphdef, state)(x)
        return jax.nn.softmax(out.logits, -1), difficulty.score_from_outputs("hardness", out.logits, out.hardness_logit)

    explain = make_attribute_fn(model, method=method)
    unchecked = _compiled(graphdef, Options(method=method).check(model.num_classes))
    a = backbone(images)
    names = ["backbone_s", "forward_s", "forward_args_s", "explain_s", "explain_unchecked_s", "heads_s", "tangents_s",
             "maps_s"]
    fns = [lambda: backbone(images), lambda: forward(images), lambda: forward_args(state, images),
           lambda: explain(images), lambda: unchecked(state, images), lambda: heads(a), lambda: tangents(a),
           lambda: maps(a)]
    times = dict(zip(names, _median_times(fns, repeats)))
    return {"arch": arch, "batch": batch, "size": size, "method": method, "device": _device(), **times,
            "ratio": times["explain_s"] / times["forward_args_s"], "jax": jax.__version__}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="vgg16", choices=sorted(ARCHS))
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--classes", type=int, default=200)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--method", default="gradient_hessian", choices=METHODS)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    result = run(args.arch, args.batch, args.classes, args.size, args.method, args.repeats)
    print(json.dumps(result) if args.json else "\n".join(f"{k:>12}: {v}" for k, v in result.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
