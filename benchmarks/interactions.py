"""Cost of Integrated Hessians counted in Hessian-vector products, and against path-explain where installed.

    python -m benchmarks.interactions --case cnn                       # small CNN, 32 px, full L x L at conv2 (16 x 16)
    python -m benchmarks.interactions --case cnn --size 64 --batch 8   # where the forward is not dispatch-bound
    python -m benchmarks.interactions --case resnet50 --size 224       # ResNet50, pixel level, 7 x 7 regions, top 5
    python -m benchmarks.interactions --case mlp                       # MLP, 64 features: against path-explain
    python -m benchmarks.interactions --case cnn-pe                    # CNN on 8 x 8 x 3 images: against path-explain

Prints one JSON line per case. Every time is of the batch (--batch images; 1 for resnet50, mlp, cnn-pe), compiled:
forward_s (one forward of the explained function), hvp_s (one standalone Hessian-vector product: jvp of the gradient
of one output along one direction per image), whole_s (the whole Integrated Hessians call), products = nodes x rows
x outputs (one product = one direction for each image of the batch). Three ratios:
(a) hvp_per_forward = hvp_s / forward_s, one standalone product against one forward;
(b) amortised_per_forward = (whole_s / products) / forward_s, one product's share of the whole call (which also pays
    the nodes x outputs gradients of the first-order term and the 2 nodes x outputs of IG) against one forward;
(c) whole_per_products = whole_s / (products x hvp_s), the whole call against that many standalone products.
forward_s and hvp_s are each the mean over enough calls to last ~0.2 s; every figure is the median of --repeats
interleaved rounds after a warm-up; random weights; softplus surrogate of sharpness --beta. For --case mlp and
cnn-pe also path_explain_s (PathExplainerTorch.interactions, use_expectation=False, --pe-samples samples, full
matrix) and the max error of each against a converged reference (ours at 64 nodes).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from benchmarks.attribution import _device, _median_times
from delib_jax.attribution import grid_masks, integrated_hessians, softplus_surrogate, split_model
from delib_jax.models import create_model

CASES = ("cnn", "resnet50", "mlp", "cnn-pe")


def _hvp_fn(fn, x, target: int):
    """Jitted (x, v) -> H v of output ``target`` of fn (summed over the batch: one direction per image)."""
    g = jax.grad(lambda y: jnp.sum(fn(y)[:, target]))
    return jax.jit(lambda y, v: jax.jvp(g, (y,), (v,))[1])


def _repeated(fn, seconds: float = 0.2):
    """fn wrapped to run n times per call, n chosen from one timed call so that a call lasts about ``seconds``; and
    n (the wrapped call's time / n is one call's)."""
    jax.block_until_ready(fn())
    t = time.perf_counter()
    jax.block_until_ready(fn())
    n = max(1, min(1000, int(seconds / max(time.perf_counter() - t, 1e-6))))

    def run():
        for _ in range(n):
            out = fn()
        return out

    return run, n


def _counted(fn, x, run_whole, products: int, repeats: int, target: int) -> dict:
    forward = jax.jit(lambda y: fn(y))
    hvp = _hvp_fn(fn, x, target)
    v = jax.random.normal(jax.random.key(1), x.shape, x.dtype)
    fwd_n, n_f = _repeated(lambda: forward(x))
    hvp_n, n_h = _repeated(lambda: hvp(x, v))
    f_s, h_s, whole_s = _median_times([fwd_n, hvp_n, run_whole], repeats)
    forward_s, hvp_s = f_s / n_f, h_s / n_h
    return {
        "forward_s": forward_s,
        "hvp_s": hvp_s,
        "hvp_per_forward": hvp_s / forward_s,
        "whole_s": whole_s,
        "products": products,
        "amortised_hvp_s": whole_s / products,
        "amortised_per_forward": whole_s / products / forward_s,
        "whole_per_products": whole_s / (products * hvp_s),
    }


def run_cnn(size: int, nodes: int, beta: float, repeats: int, batch: int = 1, stage: str = "conv2") -> dict:
    model = create_model("small", 10, rngs=nnx.Rngs(0))
    features, head = split_model(model, stage)
    images = jax.random.normal(jax.random.key(0), (batch, size, size, 3), jnp.float32)
    x = features(images)
    smooth = softplus_surrogate(head, beta)
    fn = lambda y: jax.nn.softmax(smooth(y), -1)
    whole = lambda: integrated_hessians(features, head, images, targets=1, beta=beta, nodes=nodes).values
    rows = x.shape[1] * x.shape[2]
    out = _counted(fn, x, whole, nodes * rows, repeats, 0)
    r = integrated_hessians(features, head, images, targets=1, beta=beta, nodes=nodes)
    return {
        "case": "cnn",
        "stage": stage,
        "size": size,
        "batch": batch,
        "grid": list(x.shape[1:3]),
        "nodes": nodes,
        "rows": rows,
        "outputs": 1,
        "shape": list(r.values.shape),
        "residual": float(jnp.abs(r.residual).max()),
        **out,
    }


def run_resnet(size: int, nodes: int, beta: float, repeats: int, top: int, grid: int, chunk: int | None) -> dict:
    model = create_model("resnet50", 200, rngs=nnx.Rngs(0))
    _, head = split_model(model, "image")
    images = jax.random.normal(jax.random.key(0), (1, size, size, 3), jnp.float32)
    masks = grid_masks((size, size), (grid, grid))
    smooth = softplus_surrogate(head, beta)
    fn = lambda y: jax.nn.softmax(smooth(y), -1)

    def whole():
        return integrated_hessians(
            None, head, images, targets=top, rows=masks, columns=masks, beta=beta, nodes=nodes, chunk_size=chunk
        ).values

    out = _counted(fn, images, whole, nodes * grid * grid * top, repeats, 0)
    return {
        "case": "resnet50",
        "size": size,
        "regions": grid * grid,
        "nodes": nodes,
        "outputs": top,
        "chunk_size": chunk,
        **out,
    }


def run_mlp(features: int, nodes: int, beta: float, repeats: int, pe_samples: int) -> dict:
    """A 2-layer softplus MLP on ``features`` inputs: ours and path-explain on the same weights, full D x D."""
    rng = np.random.RandomState(0)
    hidden, classes = 128, 10
    w = [
        rng.randn(features, hidden) / np.sqrt(features),
        rng.randn(hidden) * 0.1,
        rng.randn(hidden, classes) / np.sqrt(hidden),
        rng.randn(classes) * 0.1,
    ]
    w = [a.astype(np.float32) for a in w]
    wj = [jnp.asarray(a) for a in w]
    head = lambda x: jax.nn.relu(x.reshape(x.shape[0], -1) @ wj[0] + wj[1]) @ wj[2] + wj[3]
    x = rng.randn(1, features).astype(np.float32)
    xj = jnp.asarray(x).reshape(1, 1, features, 1)
    target = 3
    tg = jnp.asarray([[target]])

    def ours(n):
        return integrated_hessians(None, head, xj, targets=tg, output="logits", beta=beta, nodes=n)

    smooth = softplus_surrogate(head, beta)
    out = _counted(smooth, xj, lambda: ours(nodes).values, nodes * features, repeats, target)
    ref = np.asarray(ours(64).values[0, 0])
    result = {
        "case": "mlp",
        "features": features,
        "nodes": nodes,
        "rows": features,
        "outputs": 1,
        **out,
        "error": float(np.abs(np.asarray(ours(nodes).values[0, 0]) - ref).max()),
        "scale": float(np.abs(ref).max()),
    }
    from delib_jax.testing.path_explain import mlp_torch, path_explainer_torch

    explainer_cls, reason = path_explainer_torch()
    if explainer_cls is None:
        return {**result, "path_explain": reason}
    import torch

    torch.set_num_threads(max(1, torch.get_num_threads()))
    model = mlp_torch(w, beta)
    explainer = explainer_cls(model)

    def pe():
        xt = torch.from_numpy(x).requires_grad_(True)
        return (
            explainer.interactions(
                xt,
                torch.zeros(1, features),
                num_samples=pe_samples,
                use_expectation=False,
                output_indices=torch.tensor([target]),
                verbose=False,
            )
            .detach()
            .numpy()[0]
        )

    times = []
    for _ in range(max(1, repeats)):
        t = time.perf_counter()
        got = pe()
        times.append(time.perf_counter() - t)
    pe_s = float(np.median(times))
    return {
        **result,
        "path_explain_samples": pe_samples,
        "path_explain_s": pe_s,
        "path_explain_error": float(np.abs(got - ref).max()),
        "speedup": pe_s / result["whole_s"],
    }


def _time_path_explain(explainer, x, base, target: int, samples: int, repeats: int):
    """(median seconds, interactions (D, D)) of PathExplainerTorch.interactions on one flat input (1, D)."""
    import torch

    times, got = [], None
    for _ in range(max(1, repeats)):
        xt = torch.from_numpy(x).requires_grad_(True)
        t = time.perf_counter()
        got = explainer.interactions(
            xt, torch.from_numpy(base), num_samples=samples, use_expectation=False,
            output_indices=torch.tensor([target]), verbose=False,
        )  # fmt: skip
        times.append(time.perf_counter() - t)
    return float(np.median(times)), got.detach().numpy()[0]


def run_cnn_pe(size: int, nodes: int, beta: float, repeats: int, pe_samples: int) -> dict:
    """A small CNN (`delib_jax.testing.path_explain.conv_net`) on one size x size x 3 image, full (3 size^2)^2 matrix
    of one logit: ours (X = the image flattened, one location per pixel channel) and path-explain on flat inputs."""
    from delib_jax.testing.path_explain import conv_net, conv_net_torch_flat, conv_weights, path_explainer_torch

    shape, target = (size, size, 3), 3
    d = int(np.prod(shape))
    w = conv_weights(0)
    fn = conv_net(w)
    rng = np.random.RandomState(0)
    x = rng.randn(1, *shape).astype(np.float32)
    flatten = lambda im: im.reshape(im.shape[0], 1, d, 1)
    head = lambda y: fn(y.reshape(y.shape[0], *shape))
    tg = jnp.asarray([[target]])

    def ours(n):
        return integrated_hessians(flatten, head, jnp.asarray(x), targets=tg, output="logits", beta=beta, nodes=n)

    smooth = softplus_surrogate(head, beta)
    out = _counted(smooth, flatten(jnp.asarray(x)), lambda: ours(nodes).values, nodes * d, repeats, target)
    ref = np.asarray(ours(64).values[0, 0])
    result = {
        "case": "cnn-pe",
        "image": list(shape),
        "features": d,
        "nodes": nodes,
        "rows": d,
        "outputs": 1,
        **out,
        "error": float(np.abs(np.asarray(ours(nodes).values[0, 0]) - ref).max()),
        "scale": float(np.abs(ref).max()),
        "residual": float(np.abs(np.asarray(ours(nodes).residual)).max()),
    }
    explainer_cls, reason = path_explainer_torch()
    if explainer_cls is None:
        return {**result, "path_explain": reason}
    explainer = explainer_cls(conv_net_torch_flat(w, shape, beta))
    pe_s, got = _time_path_explain(explainer, x.reshape(1, d), np.zeros((1, d), np.float32), target, pe_samples, 1)
    return {
        **result,
        "path_explain_samples": pe_samples,
        "path_explain_s": pe_s,
        "path_explain_error": float(np.abs(got - ref).max()),
        "speedup": pe_s / result["whole_s"],
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.interactions", description=__doc__.splitlines()[0])
    p.add_argument("--case", choices=CASES, nargs="+", default=["cnn", "mlp"])
    p.add_argument("--size", type=int, default=None, help="image size (cnn: 32, resnet50: 224, cnn-pe: 8)")
    p.add_argument("--batch", type=int, default=1, help="cnn: images per call")
    p.add_argument("--nodes", type=int, default=8, help="Gauss nodes of the -ln t rule")
    p.add_argument("--beta", type=float, default=10.0, help="softplus sharpness of the surrogate")
    p.add_argument("--top", type=int, default=5, help="resnet50: explained classes")
    p.add_argument("--grid", type=int, default=7, help="resnet50: regions per side")
    p.add_argument("--chunk-size", type=int, default=None, help="resnet50: region rows at once")
    p.add_argument("--features", type=int, default=64, help="mlp: input features")
    p.add_argument(
        "--pe-samples", type=int, default=400, help="mlp, cnn-pe: path-explain's num_samples (sqrt per loop)"
    )
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", action="store_true", help="JSON lines only")
    args = p.parse_args(argv)
    if args.nodes < 1 or args.repeats < 1 or args.batch < 1 or (args.size is not None and args.size < 2):
        print("error: --nodes, --repeats and --batch must be positive, --size at least 2", file=sys.stderr)
        return 2
    for case in args.case:
        if case == "cnn":
            r = run_cnn(args.size or 32, args.nodes, args.beta, args.repeats, args.batch)
        elif case == "resnet50":
            r = run_resnet(args.size or 224, args.nodes, args.beta, args.repeats, args.top, args.grid, args.chunk_size)
        elif case == "cnn-pe":
            r = run_cnn_pe(args.size or 8, args.nodes, args.beta, args.repeats, args.pe_samples)
        else:
            r = run_mlp(args.features, args.nodes, args.beta, args.repeats, args.pe_samples)
        print(json.dumps({**r, "device": _device()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
