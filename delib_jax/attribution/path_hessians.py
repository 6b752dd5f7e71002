"""Integrated Hessians and Expected Hessians (Janizek, Sturmfels & Lee, "Explaining Explanations: Axiomatic Feature
Interactions for Deep Networks", JMLR 2021) for any split of any model, at locations, regions or given rows.

    inter = integrated_hessians(features, head, images, targets=3)              # (B, 3, L, L) at X = features(images)
    inter = integrated_hessians(None, model_fn, images, rows=grid_masks((32, 32), (4, 4)),
                                columns=grid_masks((32, 32), (4, 4)), beta=10.0)  # 16 x 16 pixel regions, softplus
    inter = expected_hessians(features, head, images, references)               # averaged over data baselines

With delta = x - x' (x' the baseline) and f an explained output (`explained_output`), for features i, j

    Gamma_ij = delta_i delta_j int_0^1 int_0^1 a b d_ij f(x' + a b delta) da db
             + [i = j] delta_i int_0^1 int_0^1 d_i f(x' + a b delta) da db.

Both double integrals are single integrals in t = a b with weight -ln t (int int h(ab) da db = int_0^1 -ln t h(t)
dt), so one Gauss rule for that weight (`log_quadrature`, exact for polynomials of degree 2 n - 1 in t) gives, at n
nodes t_k, Gamma = sum_k w_k [t_k delta_i delta_j H_ij(t_k) + [i = j] delta_i g_i(t_k)]: the gradient g and the
Hessian-vector products H (delta masked to a row) of the same n path points. Rows sum to the integrated-gradients
attribution IG_i = delta_i int_0^1 g_i(x' + t delta) dt and everything to f(x) - f(x') (completeness, Thm. in the
paper), up to the quadrature error: the result carries both residuals.

Granularities: features are grouped by masks over X's H x W grid (channels summed): rows (R, L) and columns (S, L).
Locations: one-hot rows / columns (L x L, the default); regions: the feature grid's cells (`grid_masks`) or masks
the caller gives (an insecurity's region and the rest); pixel rows: X = the images (``features`` None) with rows a
few pixels or regions and columns every pixel. Cost: n x R x N Hessian-vector products (N explained outputs), plus
n x N gradients for the first-order term and n x N for IG; vmapped, chunked over rows with ``chunk_size``. At
each node the gradient is linearised once (`jax.linearize`: one forward and one backward pass at the node) and only
its linear map runs per row direction.

In a ReLU network H is zero almost everywhere below the output: pass ``beta`` to explain the softplus surrogate
(`delib_jax.attribution.surrogate`) -- the paper's choice -- and measure its distance with `surrogate_gap`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from math import lgamma

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from delib_jax.attribution._core import quadrature
from delib_jax.attribution.interactions import _check_targets
from delib_jax.attribution.layer import _check_array, _targets, pure, rebuild
from delib_jax.attribution.outputs import Output, explained_output
from delib_jax.attribution.reverse import _per_location, cotangents, output_grads
from delib_jax.attribution.surrogate import replace_relu, softplus

Array = jax.Array


@cache
def _log_rule(n: int) -> tuple[np.ndarray, np.ndarray]:
    """Gauss nodes and weights of weight -ln t on [0, 1], float64, by the modified Chebyshev algorithm on the shifted
    Legendre moments int -ln t P*_k(t) dt = 1, (-1)^k / (k (k + 1)) (Gautschi, Orthogonal Polynomials, Sec. 2.1.7;
    stable), then Golub-Welsch."""
    m = 2 * n
    k = np.arange(m)
    mu = np.ones(m)
    mu[1:] = (-1.0) ** k[1:] / (k[1:] * (k[1:] + 1.0))
    mom = mu * np.exp([2 * lgamma(j + 1) - lgamma(2 * j + 1) for j in range(m)])  # moments of the monic P*_k
    a = np.full(m, 0.5)
    b = np.zeros(m)
    b[1:] = k[1:] ** 2 / (4.0 * (4.0 * k[1:] ** 2 - 1.0))
    alpha, beta = np.zeros(n), np.zeros(n)
    alpha[0], beta[0] = a[0] + mom[1] / mom[0], mom[0]
    sig_prev, sig = np.zeros(m), mom.copy()
    for j in range(1, n):
        new = np.zeros(m)
        ls = np.arange(j, m - j)
        new[ls] = sig[ls + 1] - (alpha[j - 1] - a[ls]) * sig[ls] - beta[j - 1] * sig_prev[ls] + b[ls] * sig[ls - 1]
        alpha[j] = a[j] + new[j + 1] / new[j] - sig[j] / sig[j - 1]
        beta[j] = new[j] / sig[j - 1]
        sig_prev, sig = sig, new
    off = np.sqrt(beta[1:])
    nodes, vecs = np.linalg.eigh(np.diag(alpha) + np.diag(off, 1) + np.diag(off, -1))
    return nodes, beta[0] * vecs[0] ** 2


def log_quadrature(nodes: int, dtype=None) -> tuple[np.ndarray, np.ndarray]:
    """Nodes t in (0, 1) and weights (summing to 1) with sum_k w_k h(t_k) ~ int_0^1 -ln t h(t) dt, exact for
    polynomials h of degree 2 nodes - 1. Computed in float64, returned in ``dtype`` (default as `quadrature`)."""
    if not isinstance(nodes, int | np.integer) or not 1 <= nodes <= 100:
        raise ValueError(f"nodes must be an integer between 1 and 100, got {nodes}")
    if dtype is None:
        dtype = np.float64 if jax.config.jax_enable_x64 else np.float32
    t, w = _log_rule(int(nodes))
    return t.astype(dtype), w.astype(dtype)


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class PathInteractions:
    """Integrated (or Expected) Hessians of N explained outputs per image.

    values: (B, N, R, S) Gamma between row group r and column group s (channels and group members summed);
    attributions: (B, N, S) integrated gradients of the column groups; targets: (B, N); outputs: (B, P) at X;
    difference: (B, N) f(x) - f(x') (mean over the baselines for Expected Hessians);
    residual: (B, N) values.sum((2, 3)) - difference, the quadrature error of the whole where rows and columns each
    cover every location once (every location, the grid's cells, a mask and its complement), else not a residual;
    row_residual: (B, N, R) values.sum(3) - IG of row group r (a completeness residual where the columns cover each
    location once);
    ig_residual: (B, N) sum of IG over locations - difference, IG's own quadrature error;
    stderr: (B, N, R, S) standard error of the mean over baselines (Expected Hessians), else None."""

    values: Array
    attributions: Array
    targets: Array
    outputs: Array
    difference: Array
    residual: Array
    row_residual: Array
    ig_residual: Array
    stderr: Array | None = None


def grid_masks(shape: tuple[int, int], grid: tuple[int, int]) -> np.ndarray:
    """(gh * gw, H, W) 0/1 masks of the cells of a gh x gw grid over an H x W image (row-major; cells as even as
    integer sizes allow, e.g. the feature grid's receptive cells at pixel level)."""
    (h, w), (gh, gw) = shape, grid
    if not (1 <= gh <= h and 1 <= gw <= w):
        raise ValueError(f"grid {grid} must lie between (1, 1) and the image's {shape}")
    rows = np.minimum(np.arange(h) * gh // h, gh - 1)
    cols = np.minimum(np.arange(w) * gw // w, gw - 1)
    cell = rows[:, None] * gw + cols[None, :]
    return (cell[None] == np.arange(gh * gw)[:, None, None]).astype(np.float32)


def group_masks(groups, h: int, w: int, name: str) -> np.ndarray | None:
    """(R, L) float masks from None (None), flat location indices (R,) (one-hot rows) or masks (R, H, W)."""
    if groups is None:
        return None
    g = np.asarray(groups)
    if np.issubdtype(g.dtype, np.integer) and g.ndim == 1:
        if g.size == 0 or g.min() < 0 or g.max() >= h * w:
            raise ValueError(f"{name} must be flat indices into the {h} x {w} grid, got {g}")
        return (g[:, None] == np.arange(h * w)[None]).astype(np.float32)
    if g.ndim != 3 or g.shape[1:] != (h, w) or not np.issubdtype(g.dtype, np.number):
        raise ValueError(
            f"{name} must be flat location indices (R,) or masks (R, {h}, {w}) over X's grid, got {g.dtype} {g.shape}"
        )
    if not np.isfinite(g).all():
        raise ValueError(f"{name} masks contain NaN or inf values")
    return g.reshape(g.shape[0], h * w).astype(np.float32)


def _map(fn: Callable, xs, chunk_size: int | None):
    n = jax.tree.leaves(xs)[0].shape[0]
    if chunk_size is None or chunk_size >= n:
        return jax.vmap(fn)(xs)
    return jax.lax.map(fn, xs, batch_size=chunk_size)


def _project(per_loc: Array, cols: Array | None) -> Array:
    """(..., L) -> (..., S) summed over each column group (identity for columns = every location)."""
    return per_loc if cols is None else jnp.einsum("...l,sl->...s", per_loc, cols)


def path_terms(
    g: Callable[[Array], Array],
    x: Array,
    base: Array,
    targets: Array,
    rows: Array,
    cols: Array | None,
    *,
    nodes: int,
    ig_nodes: int,
    chunk_size: int | None = None,
) -> tuple[Array, Array]:
    """Integrated Hessians (N, B, R, S) and per-location IG (N, B, L) of outputs ``targets`` (B, N) of g: X (B, H,
    W, D) -> (B, P) from ``base`` to ``x``; rows (R, L), cols (S, L) or None (every location)."""
    b, h, w, _ = x.shape
    cts = cotangents(targets, jax.eval_shape(g, x).shape[-1], x.dtype)
    delta = x - base
    t, wt = (jnp.asarray(v, x.dtype) for v in log_quadrature(nodes, np.float64))
    rows = rows.astype(x.dtype)
    cols = None if cols is None else cols.astype(x.dtype)

    def node(tw):  # (R, N, B, S)
        tk, wk = tw
        p = base + tk * delta
        # the forward and backward passes at p once: the gradients and the linear map v -> H(p) v of every output
        grads, hvp = jax.linearize(lambda y: output_grads(g, y, cts), p)
        first = _per_location(grads * delta)  # (N, B, L)

        def row(mask):  # (N, B, S): delta_r^T H(p) delta_s, the linear map applied to the row's direction only
            return _project(_per_location(hvp(delta * mask.reshape(1, h, w, 1)) * delta), cols)

        hess = _map(row, rows, chunk_size)
        if cols is None:
            diag = rows[:, None, None, :] * first[None]
        else:
            diag = jnp.einsum("rl,sl,nbl->rnbs", rows, cols, first)
        return wk * (tk * hess + diag)

    if chunk_size is None:
        values = jnp.sum(jax.vmap(node)((t, wt)), axis=0)
    else:
        zero = jnp.zeros(jax.eval_shape(node, (t[0], wt[0])).shape, x.dtype)
        values = jax.lax.scan(lambda acc, tw: (acc + node(tw), None), zero, (t, wt))[0]
    alphas, weights = (jnp.asarray(v, x.dtype) for v in quadrature(ig_nodes, "gauss_legendre", np.float64))
    ig_at = lambda a: _per_location(output_grads(g, base + a * delta, cts) * delta)
    if chunk_size is None:
        ig = jnp.einsum("k,knbl->nbl", weights, jax.vmap(ig_at)(alphas))
    else:
        zero = jnp.zeros(jax.eval_shape(ig_at, alphas[0]).shape, x.dtype)
        ig = jax.lax.scan(lambda acc, aw: (acc + aw[1] * ig_at(aw[0]), None), zero, (alphas, weights))[0]
    return jnp.moveaxis(values, 0, 2), ig  # (N, B, R, S)


def _prepare(f_leaves, h_leaves, images, *, f_struct, h_struct, output: Output, beta):
    features, head = rebuild(f_struct, f_leaves), rebuild(h_struct, h_leaves)
    if beta is not None:
        features = replace_relu(features, softplus(beta), require=False)
        head = replace_relu(head, softplus(beta), require=False)
    return features(images), (lambda y: output(head(y)))


def _finish(g, x, vals, ig, diff, targets, rows, cols, stderr=None) -> PathInteractions:
    values = jnp.moveaxis(vals, 0, 1)  # (B, N, R, S)
    ig = jnp.moveaxis(ig, 0, 1)  # (B, N, L)
    row_ig = jnp.einsum("bnl,rl->bnr", ig, rows.astype(ig.dtype))
    return PathInteractions(
        values=values,
        attributions=_project(ig, None if cols is None else cols.astype(ig.dtype)),
        targets=targets,
        outputs=g(x),
        difference=diff,
        residual=jnp.sum(values, axis=(2, 3)) - diff,
        row_residual=jnp.sum(values, axis=3) - row_ig,
        ig_residual=jnp.sum(ig, axis=-1) - diff,
        stderr=stderr,
    )


def _integrated(f_leaves, h_leaves, images, baseline, given, rows, cols, *, f_struct, h_struct, output, top_n, beta,
                nodes, ig_nodes, chunk_size):  # fmt: skip
    x, g = _prepare(f_leaves, h_leaves, images, f_struct=f_struct, h_struct=h_struct, output=output, beta=beta)
    base = jnp.zeros_like(x) if baseline is None else jnp.broadcast_to(baseline.astype(x.dtype), x.shape)
    values = g(x)
    targets = _targets(values, top_n, given)
    vals, ig = path_terms(g, x, base, targets, rows, cols, nodes=nodes, ig_nodes=ig_nodes, chunk_size=chunk_size)
    diff = jnp.take_along_axis(values - g(base), targets, axis=1)
    return _finish(g, x, vals, ig, diff, targets, rows, cols)


def _expected(f_leaves, h_leaves, images, references, given, rows, cols, *, f_struct, h_struct, output, top_n, beta,
              nodes, ig_nodes, chunk_size):  # fmt: skip
    x, g = _prepare(f_leaves, h_leaves, images, f_struct=f_struct, h_struct=h_struct, output=output, beta=beta)
    features = rebuild(f_struct, f_leaves)
    if beta is not None:
        features = replace_relu(features, softplus(beta), require=False)
    refs = features(references)  # (M, H, W, D): the baselines at X
    values = g(x)
    targets = _targets(values, top_n, given)

    def one(ref):
        base = jnp.broadcast_to(ref[None], x.shape)
        vals, ig = path_terms(g, x, base, targets, rows, cols, nodes=nodes, ig_nodes=ig_nodes, chunk_size=chunk_size)
        return vals, ig, jnp.take_along_axis(values - g(base), targets, axis=1)

    vals, ig, diff = jax.lax.map(one, refs)  # (M, N, B, R, S), (M, N, B, L), (M, B, N)
    m = refs.shape[0]
    stderr = jnp.std(vals, axis=0, ddof=1) / np.sqrt(m) if m > 1 else jnp.zeros_like(vals[0])
    return _finish(g, x, vals.mean(0), ig.mean(0), diff.mean(0), targets, rows, cols, jnp.moveaxis(stderr, 0, 1))


_STATIC = ("f_struct", "h_struct", "output", "top_n", "beta", "nodes", "ig_nodes", "chunk_size")
_integrated_jit = jax.jit(_integrated, static_argnames=_STATIC)
_expected_jit = jax.jit(_expected, static_argnames=_STATIC)


def _setup(features, head, images, output, targets, rows, columns, beta, nodes, ig_nodes, chunk_size):
    """Checked arguments shared by the path and smoothing methods."""
    out = explained_output(output)
    images = _check_array("images", images, rank=4)
    f_struct, f_leaves = pure(features)
    h_struct, h_leaves = pure(head)
    x_spec = jax.eval_shape(lambda lv, y: rebuild(f_struct, lv)(y), f_leaves, images)
    if len(x_spec.shape) != 4:
        raise ValueError(f"features must return X of shape (B, H, W, D), got {x_spec.shape}")
    b, h, w, _ = x_spec.shape
    num_outputs = jax.eval_shape(lambda lv, y: out(rebuild(h_struct, lv)(y)), h_leaves, x_spec).shape[-1]
    top_n, given = _check_targets(targets, b, num_outputs)
    row_masks = group_masks(rows, h, w, "rows")
    if row_masks is None:
        row_masks = np.eye(h * w, dtype=np.float32)
    col_masks = group_masks(columns, h, w, "columns")
    if beta is not None and (not beta > 0 or not np.isfinite(beta)):
        raise ValueError(f"beta must be a positive finite number, got {beta}")
    for name, n in (("nodes", nodes), ("ig_nodes", ig_nodes)):
        if not isinstance(n, int | np.integer) or not 1 <= n <= 100:
            raise ValueError(f"{name} must be an integer between 1 and 100, got {n}")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    static = dict(
        f_struct=f_struct,
        h_struct=h_struct,
        output=out,
        top_n=top_n,
        beta=None if beta is None else float(beta),
        nodes=int(nodes),
        ig_nodes=int(ig_nodes),
        chunk_size=chunk_size,
    )
    cols = None if col_masks is None else jnp.asarray(col_masks)
    return f_leaves, h_leaves, images, given, jnp.asarray(row_masks), cols, static, x_spec


def integrated_hessians(
    features: Callable | nnx.Module | None,
    head: Callable | nnx.Module,
    images: Array,
    *,
    targets: int | Array | None = None,
    output: str | Output | Callable = "probs",
    baseline: Array | None = None,
    rows=None,
    columns=None,
    beta: float | None = None,
    nodes: int = 16,
    ig_nodes: int | None = None,
    chunk_size: int | None = None,
    jit: bool = True,
) -> PathInteractions:
    """Integrated Hessians of the explained outputs at X = features(images) (None: X = images) from ``baseline``.

    head: X -> logits; output, targets as `layer_attribution` (None: every output; int N: the top N; (B, N)).
    baseline: at X, (B, H, W, D) or (H, W, D) (default 0). rows / columns: None (every location of X's grid), flat
    location indices (R,) or masks (R, H, W) (`grid_masks`); columns None: every location. beta: explain the softplus
    surrogate of sharpness beta (None: the model as it is). nodes: Gauss nodes of the -ln t rule (exact for
    polynomial paths of degree 2 nodes - 1); ig_nodes: Gauss-Legendre nodes of IG (default 2 nodes, at most 100).
    chunk_size: rows at a time (and path nodes one by one). Returns `PathInteractions` (values (B, N, R, S), with
    residuals)."""
    ig_nodes = min(2 * nodes, 100) if ig_nodes is None else ig_nodes
    f_leaves, h_leaves, images, given, rows_m, cols_m, static, x_spec = _setup(
        features, head, images, output, targets, rows, columns, beta, nodes, ig_nodes, chunk_size
    )
    if baseline is not None:
        baseline = _check_array("baseline", baseline, rank=len(jnp.shape(baseline)))
        if baseline.shape not in (x_spec.shape, x_spec.shape[1:]):
            raise ValueError(f"baseline {baseline.shape} must have the shape of X {x_spec.shape} or of one X")
    fn = _integrated_jit if jit else _integrated
    return fn(f_leaves, h_leaves, images, baseline, given, rows_m, cols_m, **static)


def expected_hessians(
    features: Callable | nnx.Module | None,
    head: Callable | nnx.Module,
    images: Array,
    references: Array,
    *,
    targets: int | Array | None = None,
    output: str | Output | Callable = "probs",
    rows=None,
    columns=None,
    beta: float | None = None,
    nodes: int = 8,
    ig_nodes: int | None = None,
    chunk_size: int | None = None,
    jit: bool = True,
) -> PathInteractions:
    """Expected Hessians: Integrated Hessians averaged over the baselines features(references) (M images drawn from
    the data, (M, H_img, W_img, C)), each path integrated by the ``nodes``-point rule (deterministic; the paper
    samples one (baseline, a, b) per evaluation instead). ``stderr``: standard error of the mean over the M
    baselines; difference: f(x) - mean f(x'). Other arguments as `integrated_hessians`."""
    ig_nodes = min(2 * nodes, 100) if ig_nodes is None else ig_nodes
    f_leaves, h_leaves, images, given, rows_m, cols_m, static, _ = _setup(
        features, head, images, output, targets, rows, columns, beta, nodes, ig_nodes, chunk_size
    )
    references = _check_array("references", references, rank=4)
    if references.shape[1:] != images.shape[1:]:
        raise ValueError(f"references {references.shape} must be images of the shape of one image {images.shape[1:]}")
    fn = _expected_jit if jit else _expected
    return fn(f_leaves, h_leaves, images, references, given, rows_m, cols_m, **static)
