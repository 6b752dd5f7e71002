"""Cost of all attribution maps relative to a forward pass, and against a per-output loop.

    python -m benchmarks.attribution --arch vgg16 --batch 2 --classes 200 --json

Prints one JSON line: forward_s (jitted forward to class probabilities and difficulty), explain_s (forward plus the
maps of every class and the difficulty score), ratio = explain_s / forward_s, loop_s (the original-style baseline:
a python loop over outputs, each a jitted gradient plus Hessian-vector product at A; timed on --loop-outputs outputs
and scaled to all of them, as the JSON says) and speedup = loop_s / explain_s; loop_full_s / speedup_full: the same
loop when each output starts from the images (the original code's style); loop_exact_s / speedup_exact: the loop
that computes what we compute (one gradient/HVP per output and location). Medians of --repeats runs after a
warm-up, all in one process, random weights.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time

import jax
import jax.numpy as jnp
from flax import nnx

from delib_jax import difficulty
from delib_jax.attribution import METHODS, Options, make_attribute_fn
from delib_jax.attribution._core import output_functions
from delib_jax.models import ARCHS, create_model, inference_model, split_leaves


def _median_times(fns, repeats: int) -> list[float]:
    """Median wall time of each function, runs interleaved so that machine noise hits all of them alike."""
    for fn in fns:
        jax.block_until_ready(fn())  # warm-up (compilation)
    times = [[] for _ in fns]
    for _ in range(repeats):
        for fn, ts in zip(fns, times):
            t = time.perf_counter()
            jax.block_until_ready(fn())
            ts.append(time.perf_counter() - t)
    return [statistics.median(ts) for ts in times]


def _device() -> str:
    d = jax.devices()[0]
    if d.platform == "cpu":
        return f"cpu ({platform.processor() or platform.machine()}, {jax.local_device_count()} device)"
    return f"{d.platform} ({d.device_kind})"


def run(
    arch: str,
    batch: int,
    method: str,
    classes: int,
    size: int,
    score: str,
    repeats: int,
    loop_outputs: int,
    seed: int = 0,
    difficulty_channels: str = Options.difficulty_channels,
    precision: str = "float32",
    generic_path: bool = False,
    chunk_size: int | None = None,
) -> dict:
    model = create_model(arch, classes, rngs=nnx.Rngs(seed))
    model.eval()
    images = jax.random.normal(jax.random.key(seed), (batch, size, size, 3), jnp.float32)
    opts = Options(method=method, score=score, difficulty_channels=difficulty_channels)

    # the forward as make_predict_fn runs it: batch norm folded, the weights crossing jit as arguments
    structure, leaves = split_leaves(inference_model(model, precision=precision))

    @jax.jit
    def forward(leaves, x):
        out = structure.merge(leaves)(x)
        return jax.nn.softmax(out.logits, -1), difficulty.score_from_outputs(score, out.logits, out.hardness_logit)

    explain = make_attribute_fn(model, precision=precision, **vars(opts))
    fns = [lambda: forward(leaves, images), lambda: explain(images)]
    if generic_path:  # the same maps by one nested jvp of the head per location (what the heads' structure saves)
        explain_generic = make_attribute_fn(
            model, precision=precision, **{**vars(opts), "path": "generic", "chunk_size": chunk_size}
        )
        fns.append(lambda: explain_generic(images))
    times = _median_times(fns, repeats)  # interleaved in one loop: machine noise hits every variant alike
    forward_s, explain_s = times[:2]
    generic = {}
    if generic_path:
        generic = {
            "generic_s": times[2],
            "ratio_generic": times[2] / forward_s,
            "structure_gain": times[2] / explain_s,
            "generic_note": "path='generic': forward-over-forward jvp of the whole head vmapped over locations",
        }

    # Original-style baseline: one jitted gradient + Hessian-vector product per output, at A (the class head as a
    # function of A for this batch: ViT's is bound to its class token).
    a, context = nnx.jit(lambda m, x: m.features_and_context(x))(model, images)
    graph_c, state_c = nnx.split(model.bind_classifier(context))
    graph_h, state_h = nnx.split(model.hardness_head)
    class_phi, hard_phi = output_functions(score)

    def output(a, p):
        z = nnx.merge(graph_c, state_c)(a)
        outs = class_phi(z)
        if hard_phi is not None:
            outs = jnp.concatenate([outs, hard_phi(nnx.merge(graph_h, state_h)(a))], axis=-1)
        return jnp.sum(outs[:, p])

    @jax.jit
    def grad_hvp(a, p):
        grad_fn = jax.grad(output)
        g, hv = jax.jvp(lambda x: grad_fn(x, p), (a,), (a,))
        return jnp.sum(g * a, -1) + 0.5 * jnp.sum(hv * a, -1)

    num_outputs = classes + 1
    k = min(loop_outputs, num_outputs)

    def loop():
        return [grad_hvp(a, p) for p in range(k)]

    # The same quantity as ours (Eq. 2 with exact diagonal blocks) needs one Hessian-vector product per output AND
    # location (the authors' code needed one per output, location and channel): timed on a few pairs, scaled.
    h, w = a.shape[1:3]

    @jax.jit
    def grad_hvp_at(a, p, loc):
        e = a * (jnp.arange(h * w) == loc).reshape(1, h, w, 1)
        grad_fn = jax.grad(output)
        g, hv = jax.jvp(lambda x: grad_fn(x, p), (a,), (e,))
        return jnp.sum(g * e) + 0.5 * jnp.sum(hv * e)

    def loop_exact():
        return [grad_hvp_at(a, p, loc) for p, loc in zip(range(k), range(0, h * w, max(1, h * w // k)))]

    # The original style: every output starts again from the image (the backbone forward is redone per output).
    backbone_graph, backbone_state = nnx.split(model.backbone)

    @jax.jit
    def full_grad_hvp(x, p):
        a = nnx.merge(backbone_graph, backbone_state)(x).astype(jnp.float32)  # A; ViT's class token as bound above
        return grad_hvp(a, p)

    def loop_full():
        return [full_grad_hvp(images, p) for p in range(k)]

    loop_part, exact_part, full_part = _median_times([loop, loop_exact, loop_full], max(1, repeats // 2))
    loop_s = forward_s + loop_part * num_outputs / k
    loop_exact_s = forward_s + exact_part * num_outputs * h * w / k
    loop_full_s = full_part * num_outputs / k
    return {
        "arch": arch,
        "batch": batch,
        "size": size,
        "method": method,
        "score": score,
        "difficulty_channels": difficulty_channels,
        "precision": precision,
        "device": _device(),
        "num_outputs": num_outputs,
        "forward_s": forward_s,
        "explain_s": explain_s,
        "ratio": explain_s / forward_s,
        "images_per_s": batch / explain_s,
        "loop_s": loop_s,
        "loop_timed_outputs": k,
        "loop_note": f"forward + per-output loop timed on {k} of {num_outputs} outputs, scaled linearly",
        "speedup": loop_s / explain_s,
        "loop_exact_s": loop_exact_s,
        "loop_exact_note": f"forward + one gradient/HVP per (output, location) for the exact diagonal blocks, timed on "
        f"{k} pairs, scaled to {num_outputs} x {h * w}",
        "speedup_exact": loop_exact_s / explain_s,
        "loop_full_s": loop_full_s,
        "loop_full_note": f"original style: per output a jitted forward from the images + gradient + HVP at A, timed "
        f"on {k} outputs, scaled to {num_outputs}",
        "speedup_full": loop_full_s / explain_s,
        **generic,
        "repeats": repeats,
        "jax": jax.__version__,
        "matmul_precision": jax.config.jax_default_matmul_precision or "default",
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example: python -m benchmarks.attribution --arch resnet50 --batch 2 --json",
    )
    p.add_argument("--arch", default="resnet50", choices=sorted(ARCHS))
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--method", default="gradient_hessian", choices=METHODS)
    p.add_argument("--classes", type=int, default=200)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--score", default="hardness", choices=sorted(difficulty.SCORES))
    p.add_argument(
        "--difficulty-channels",
        default=Options.difficulty_channels,
        choices=("positive", "signed"),
        help="difficulty map's first-order rule (default: the library's; 'signed' before 2026-11-28)",
    )
    p.add_argument("--precision", default="float32", choices=("float32", "bfloat16"), help="the backbone's arithmetic")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--loop-outputs", type=int, default=8, help="outputs timed in the per-output loop baseline")
    p.add_argument(
        "--generic", action="store_true", help="also time the generic path (one nested jvp of the head per location)"
    )
    p.add_argument("--chunk-size", type=int, default=None, help="locations at once in the generic path (memory)")
    p.add_argument("--json", action="store_true", help="print one JSON line only")
    args = p.parse_args(argv)
    if args.batch < 1 or args.classes < 2 or args.repeats < 1 or args.size < 32:
        p.error("need --batch >= 1, --classes >= 2, --repeats >= 1 and --size >= 32")
    result = run(
        args.arch,
        args.batch,
        args.method,
        args.classes,
        args.size,
        args.score,
        args.repeats,
        args.loop_outputs,
        difficulty_channels=args.difficulty_channels,
        precision=args.precision,
        generic_path=args.generic,
        chunk_size=args.chunk_size,
    )
    if args.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key:>20}: {value:.4g}" if isinstance(value, float) else f"{key:>20}: {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
