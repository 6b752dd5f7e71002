"""SmoothHess (Torop et al., "SmoothHess: ReLU Network Feature Interactions via Stein's Lemma", NeurIPS 2023): the
Hessian of the network convolved with a Gaussian, from gradient samples, at the granularities of `path_hessians`.

    sh = smooth_hessians(features, head, images, sigma=0.1, samples=256, targets=3)   # (B, 3, L, L) at X

For f_sigma(x) = E_z f(x + sigma z), z ~ N(0, I), Stein's lemma gives grad^2 f_sigma(x) = E[grad f(x + sigma z) z^T] /
sigma, which holds for ReLU networks (f is Lipschitz; its own Hessian is zero almost everywhere). The estimator is
its symmetrised Monte-Carlo mean over K samples, antithetic by default (grad f(x + sigma z) - grad f(x - sigma z)
over 2, which removes the sample-to-sample spread of grad f(x) z^T): unbiased, with the standard error of the mean
reported. What it explains is the SMOOTHED model f_sigma at x, not f. Reported, as `interaction_maps`, in the
quadratic form with the input: values[r, s] = (M_r v)^T grad^2 f_sigma(x) (M_s v) with v = X (or a given direction),
M_r, M_s row / column masks over X's grid. Cost: K (2 K antithetic) gradients per explained output.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from delib_jax.attribution.layer import _check_array, _targets
from delib_jax.attribution.outputs import Output
from delib_jax.attribution.path_hessians import _prepare, _project, _setup
from delib_jax.attribution.reverse import _per_location, cotangents, output_grads

Array = jax.Array


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class SmoothInteractions:
    """values: (B, N, R, S) estimate of (M_r v)^T grad^2 f_sigma (M_s v); stderr: (B, N, R, S) its standard error;
    gradient: (B, N, S) estimate of the smoothed gradient times v per column group (its first-order counterpart);
    targets: (B, N); outputs: (B, P) the explained outputs at X (of f, not f_sigma)."""

    values: Array
    stderr: Array
    gradient: Array
    targets: Array
    outputs: Array


def stein_terms(
    g: Callable[[Array], Array],
    x: Array,
    v: Array,
    targets: Array,
    rows: Array,
    cols: Array | None,
    key: Array,
    *,
    sigma: float,
    samples: int,
    antithetic: bool = True,
    chunk_size: int | None = None,
) -> tuple[Array, Array, Array]:
    """(mean, stderr) (N, B, R, S) of the Stein estimates of (M_r v)^T grad^2 g_sigma(x) (M_s v), and the smoothed
    gradient's (N, B, S), from ``samples`` Gaussian draws in chunks of ``chunk_size`` (default all at once)."""
    b, h, w, _ = x.shape
    cts = cotangents(targets, jax.eval_shape(g, x).shape[-1], x.dtype)
    rows = rows.astype(x.dtype)
    cols = None if cols is None else cols.astype(x.dtype)
    full = lambda per_loc: _project(per_loc, cols)  # (..., L) -> (..., S)
    part = lambda per_loc: jnp.einsum("...l,rl->...r", per_loc, rows)  # (..., L) -> (..., R)

    def one(k):  # per-sample estimate (N, B, R, S) and gradient (N, B, S)
        z = jax.random.normal(k, x.shape, x.dtype)
        grad = output_grads(g, x + sigma * z, cts)
        if antithetic:
            grad_minus = output_grads(g, x - sigma * z, cts)
            grad, mean_grad = (grad - grad_minus) / 2, (grad + grad_minus) / 2
        else:
            mean_grad = grad
        a, c = _per_location(grad * v), _per_location(z * v)  # (N, B, L), (B, L)
        est = part(a)[..., :, None] * full(c)[None, :, None, :] + part(c)[None, :, :, None] * full(a)[..., None, :]
        return est / (2 * sigma), full(_per_location(mean_grad * v))

    keys = jax.random.split(key, samples)
    chunk = samples if chunk_size is None else min(chunk_size, samples)
    pad = (-samples) % chunk
    valid = jnp.arange(samples + pad) < samples
    keys = jnp.concatenate([keys, keys[:pad]]).reshape(-1, chunk)
    valid = valid.reshape(-1, chunk).astype(x.dtype)

    def step(acc, kv):
        est, grad = jax.vmap(one)(kv[0])
        m = kv[1].reshape(-1, *([1] * (est.ndim - 1)))
        mg = kv[1].reshape(-1, *([1] * (grad.ndim - 1)))
        s, ss, gs = acc
        return (s + jnp.sum(m * est, 0), ss + jnp.sum(m * est**2, 0), gs + jnp.sum(mg * grad, 0)), None

    n, bb = cts.shape[:2]
    r, s_ = rows.shape[0], (h * w if cols is None else cols.shape[0])
    zero = jnp.zeros((n, bb, r, s_), x.dtype)
    (s, ss, gs), _ = jax.lax.scan(step, (zero, zero, jnp.zeros((n, bb, s_), x.dtype)), (keys, valid))
    mean = s / samples
    var = jnp.maximum(ss / samples - mean**2, 0.0) * samples / max(samples - 1, 1)
    return mean, jnp.sqrt(var / samples), gs / samples


def _smooth(f_leaves, h_leaves, images, direction, given, rows, cols, key, *, f_struct, h_struct, output, top_n, beta,
            nodes, ig_nodes, chunk_size, sigma, samples, antithetic):  # fmt: skip
    del nodes, ig_nodes
    x, g = _prepare(f_leaves, h_leaves, images, f_struct=f_struct, h_struct=h_struct, output=output, beta=beta)
    v = x if direction is None else jnp.broadcast_to(direction.astype(x.dtype), x.shape)
    values = g(x)
    targets = _targets(values, top_n, given)
    mean, se, grad = stein_terms(
        g, x, v, targets, rows, cols, key, sigma=sigma, samples=samples, antithetic=antithetic, chunk_size=chunk_size
    )
    swap = lambda a: jnp.moveaxis(a, 0, 1)
    return SmoothInteractions(values=swap(mean), stderr=swap(se), gradient=swap(grad), targets=targets, outputs=values)


_smooth_jit = jax.jit(
    _smooth,
    static_argnames=(
        "f_struct",
        "h_struct",
        "output",
        "top_n",
        "beta",
        "nodes",
        "ig_nodes",
        "chunk_size",
        "sigma",
        "samples",
        "antithetic",
    ),
)


def smooth_hessians(
    features: Callable | nnx.Module | None,
    head: Callable | nnx.Module,
    images: Array,
    *,
    sigma: float,
    samples: int = 256,
    key: Array | None = None,
    targets: int | Array | None = None,
    output: str | Output | Callable = "probs",
    direction: Array | None = None,
    rows=None,
    columns=None,
    antithetic: bool = True,
    chunk_size: int | None = None,
    jit: bool = True,
) -> SmoothInteractions:
    """SmoothHess of the explained outputs at X = features(images) (None: X = images), smoothed by N(0, sigma^2 I)
    in X, as the quadratic form with ``direction`` (default X itself) over row / column groups (`integrated_hessians`'
    rows / columns). samples: K Gaussian draws from ``key`` (default key 0); chunk_size: draws at once.
    Returns `SmoothInteractions` (values, stderr (B, N, R, S))."""
    if not sigma > 0 or not np.isfinite(sigma):
        raise ValueError(f"sigma must be a positive finite number, got {sigma}")
    if not isinstance(samples, int | np.integer) or samples < 2:
        raise ValueError(f"samples must be an integer of at least 2, got {samples}")
    f_leaves, h_leaves, images, given, rows_m, cols_m, static, x_spec = _setup(
        features, head, images, output, targets, rows, columns, None, 1, 1, chunk_size
    )
    if direction is not None:
        direction = _check_array("direction", direction, rank=len(jnp.shape(direction)))
        if direction.shape not in (x_spec.shape, x_spec.shape[1:]):
            raise ValueError(f"direction {direction.shape} must have the shape of X {x_spec.shape} or of one X")
    key = jax.random.key(0) if key is None else key
    fn = _smooth_jit if jit else _smooth
    return fn(f_leaves, h_leaves, images, direction, given, rows_m, cols_m, key, **static, sigma=float(sigma),
              samples=int(samples), antithetic=bool(antithetic))  # fmt: skip
