"""Where the time of an explanation goes: backbone, forward, and the attribution pieces on a fixed A.

    python -m benchmarks.breakdown --arch vgg16 --batch 2 --json

Prints one JSON line of medians (seconds, interleaved runs after a warm-up):
- backbone_s (images -> A); forward_s (images -> probabilities and difficulty) with the weights as compile-time
  constants; forward_args_s the same with the weights as arguments (a flat list of arrays, as `make_attribute_fn`
  passes them, batch norm folded into the convolutions: `delib_jax.models.inference_model`); forward_unfolded_args_s
  the same without folding (batch norm as separate layers, twice the weight arrays); forward_state_s with the nested
  nnx.State as the argument instead (the cost of crossing jit with it);
- explain_s (images -> all maps, the public function, which reduces the images for NaN/inf in the same launch and
  waits for the flag); explain_unchecked_s (the same compiled function, without looking at the flag);
  explain_no_check_s (make_attribute_fn(check_finite=False): no reduction, no wait);
  explain_two_stage_s (a jitted backbone, then a jitted maps-from-A: two launches instead of one);
- on a precomputed A: heads_s (the class and hardness heads' primal), tangents_s (the class head's per-location
  logit tangents, this backend's default layout), tangents_feature_major_s / tangents_row_major_s (each layout
  forced), maps_s (all maps from A);
- gemm_feature_major_s / gemm_row_major_s: the widest hidden Linear of the class head applied to B x H*W tangent
  rows in the two layouts (W^T T with T (features, rows) as the head does it, or T W with T (rows, features)),
  each followed by its ReLU mask, to see which layout this device prefers;
- forward_flops / explain_flops: XLA's own count for the two compiled programs; flops_ratio is the ratio the
  explanation would reach if every operation ran at the forward's arithmetic efficiency.
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
from delib_jax.models import ARCHS, create_model, inference_model, split_leaves


def _flops(jitted, *args) -> float:
    cost = jitted.lower(*args).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost.get("flops", float("nan")))


def run(
    arch: str,
    batch: int,
    classes: int,
    size: int,
    method: str,
    repeats: int,
    seed: int = 0,
    difficulty_channels: str = Options.difficulty_channels,
) -> dict:
    model = create_model(arch, classes, rngs=nnx.Rngs(seed))
    model.eval()
    images = jax.random.normal(jax.random.key(seed), (batch, size, size, 3), jnp.float32)
    graphdef, state = nnx.split(model)
    structure, leaves = split_leaves(inference_model(model))  # what make_attribute_fn runs: batch norm folded
    unfolded, unfolded_leaves = split_leaves(model)
    bb, bb_leaves = split_leaves(model.backbone)
    c_graph, c_state = nnx.split(model.classifier)
    h_graph, h_state = nnx.split(model.hardness_head)
    heads_struct, heads_leaves = split_leaves(nnx.List([model.classifier, model.hardness_head]))
    opts = Options(method=method, difficulty_channels=difficulty_channels).check(model.num_classes)

    def probs_and_score(out):
        return jax.nn.softmax(out.logits, -1), difficulty.score_from_outputs("hardness", out.logits, out.hardness_logit)

    backbone = jax.jit(lambda x: nnx.merge(*nnx.split(model.backbone))(x).astype(jnp.float32))
    forward = jax.jit(lambda x: probs_and_score(nnx.merge(graphdef, state)(x)))
    forward_args = jax.jit(lambda leaves, x: probs_and_score(structure.merge(leaves)(x)))
    forward_unfolded = jax.jit(lambda leaves, x: probs_and_score(unfolded.merge(leaves)(x)))
    forward_state = jax.jit(lambda state, x: probs_and_score(nnx.merge(graphdef, state)(x)))
    heads = jax.jit(lambda a: (nnx.merge(c_graph, c_state)(a), nnx.merge(h_graph, h_state)(a)))
    tangents = jax.jit(lambda a: nnx.merge(c_graph, c_state).tangents(a, a))
    tangents_fm = jax.jit(lambda a: nnx.merge(c_graph, c_state).tangents(a, a, layout="feature_major"))
    tangents_rm = jax.jit(lambda a: nnx.merge(c_graph, c_state).tangents(a, a, layout="row_major"))

    def maps_from(heads_module, a):
        zero = jnp.zeros_like(a)
        return _attribute(heads_module[0], heads_module[1], a, a, zero, zero, opts).maps

    maps = jax.jit(lambda a: maps_from(nnx.merge(*nnx.split(nnx.List([model.classifier, model.hardness_head]))), a))
    backbone_args = jax.jit(lambda leaves, x: bb.merge(leaves)(x).astype(jnp.float32))
    maps_args = jax.jit(lambda leaves, a: maps_from(heads_struct.merge(leaves), a))

    explain = make_attribute_fn(model, method=method, difficulty_channels=difficulty_channels)
    unchecked = _compiled(structure, opts)
    no_check = make_attribute_fn(model, method=method, difficulty_channels=difficulty_channels, check_finite=False)
    a = backbone(images)

    # The widest hidden Linear applied to every location's tangent, in both layouts (random tangents, real weights).
    widest = max(model.classifier.linears[1:] or model.classifier.linears[:1], key=lambda lin: lin.kernel.size)
    kernel = widest.kernel[...]
    rows = batch * a.shape[1] * a.shape[2]
    t_fm = jax.random.normal(jax.random.key(1), (kernel.shape[0], rows), jnp.float32)
    t_rm = t_fm.T + 0.0
    mask = (jax.random.normal(jax.random.key(2), (kernel.shape[1],)) > 0).astype(jnp.float32)
    gemm_fm = jax.jit(lambda w, t: jax.lax.dot_general(w, t, (((0,), (0,)), ((), ()))) * mask[:, None])
    gemm_rm = jax.jit(lambda w, t: (t @ w) * mask[None, :])

    names = [
        "backbone_s",
        "forward_s",
        "forward_args_s",
        "forward_unfolded_args_s",
        "forward_state_s",
        "explain_s",
        "explain_unchecked_s",
        "explain_no_check_s",
        "explain_two_stage_s",
        "heads_s",
        "tangents_s",
        "tangents_feature_major_s",
        "tangents_row_major_s",
        "maps_s",
        "gemm_feature_major_s",
        "gemm_row_major_s",
    ]
    fns = [
        lambda: backbone(images),
        lambda: forward(images),
        lambda: forward_args(leaves, images),
        lambda: forward_unfolded(unfolded_leaves, images),
        lambda: forward_state(state, images),
        lambda: explain(images),
        lambda: unchecked(leaves, images),
        lambda: no_check(images),
        lambda: maps_args(heads_leaves, backbone_args(bb_leaves, images)),
        lambda: heads(a),
        lambda: tangents(a),
        lambda: tangents_fm(a),
        lambda: tangents_rm(a),
        lambda: maps(a),
        lambda: gemm_fm(kernel, t_fm),
        lambda: gemm_rm(kernel, t_rm),
    ]
    times = dict(zip(names, _median_times(fns, repeats)))
    forward_flops = _flops(forward_args, leaves, images)
    explain_flops = _flops(unchecked, leaves, images)
    return {
        "arch": arch,
        "batch": batch,
        "size": size,
        "method": method,
        "device": _device(),
        **times,
        "ratio": times["explain_s"] / times["forward_args_s"],
        "weight_arrays": len(leaves),
        "weight_arrays_unfolded": len(unfolded_leaves),
        "gemm_shape": [rows, int(kernel.shape[0]), int(kernel.shape[1])],
        "forward_flops": forward_flops,
        "explain_flops": explain_flops,
        "flops_ratio": explain_flops / forward_flops,
        "jax": jax.__version__,
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="vgg16", choices=sorted(ARCHS))
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--classes", type=int, default=200)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--method", default="gradient_hessian", choices=METHODS)
    p.add_argument(
        "--difficulty-channels",
        default=Options.difficulty_channels,
        choices=("positive", "signed"),
        help="difficulty map's first-order rule (default: the library's; 'signed' before 2026-11-28)",
    )
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    result = run(
        args.arch,
        args.batch,
        args.classes,
        args.size,
        args.method,
        args.repeats,
        difficulty_channels=args.difficulty_channels,
    )
    print(json.dumps(result) if args.json else "\n".join(f"{k:>22}: {v}" for k, v in result.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
