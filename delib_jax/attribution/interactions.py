"""Interaction maps: the exact pairwise second-order terms a_l^T H_lm a_m between locations, for every output.

    inter = interaction_maps(None, model.classifier, a)          # (B, P, L, L) at A, shipped head: closed form
    inter = model_interaction_maps(model, images)                 # the C + 1 outputs of the deliberative model
    row = interaction_maps(features, head, images, targets=pair, locations=[l])   # (B, 2, 1, L): one location

I[t, l, m] = v_l^T H_t,lm v_m with H_t the Hessian of output t in X and V = X. Row sums are the cross-location term
v_l . (H_t V)_l, the diagonal is the block term v_l^T H_t,ll v_l, and the sum over l and m is V^T H_t V, twice the
second-order Taylor term of g_t(X) - g_t(0) along X. No 1/2 is applied here.

Paths (``order``): 'tangent' for heads with logit tangents (the shipped PoolMLPHead): their logits are locally linear
in X, z(X + d) = z + sum_l u_l(d_l), so I[t, l, m] = D^2 fn_t(z)[u_l, u_m] -- for softmax probabilities
p_t (c_lt c_mt - sum_i p_i c_li c_mi) with c_l = u_l - <u_l>_p, about one batched matrix product (`outputs`);
'reverse' (any head: one Hessian-vector product H_t E_r per explained output and row location r, then a dot
product at every location m; cost N R) and 'forward' (nested jvp over every (r, m) pair, all outputs at once; cost
R L). ``locations`` restricts the rows to some locations (R of them), e.g. one location at pixel level.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from delib_jax.attribution.layer import _check_array, _targets, pure, rebuild
from delib_jax.attribution.outputs import Output, deliberative_output, explained_output, pairwise_terms
from delib_jax.attribution.reverse import cotangents, grads_and_hvps

Array = jax.Array


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class Interactions:
    """values: (B, N, R, L) interaction of row location r with every location m (R = L unless rows were chosen);
    targets: (B, N) the output of each map; rows: (R,) the row locations (flat indices into the H x W grid);
    outputs: (B, P) the explained outputs at X."""

    values: Array
    targets: Array
    rows: Array
    outputs: Array

    def grid(self, shape: tuple[int, int]) -> Array:
        """values as (B, N, R, H, W)."""
        return self.values.reshape(*self.values.shape[:3], *shape)


def tangent_interactions(output: Output, z: Array, u: Array, rows: Array, targets: Array) -> Array:
    """(B, N, R, L) from logits z (B, K) and per-location logit tangents u (B, L, K) of a locally linear head."""
    return pairwise_terms(output, z, u[:, rows], u, targets)


def reverse_interactions(
    g: Callable[[Array], Array], x: Array, rows: Array, targets: Array, *, chunk_size: int | None = None
) -> Array:
    """(B, N, R, L) by one Hessian-vector product per explained output and row: (H_t E_r)_m . x_m."""
    b, h, w, _ = x.shape
    cts = cotangents(targets, jax.eval_shape(g, x).shape[-1], x.dtype)

    def row(r):  # (N, B, L)
        e = x * (jnp.arange(h * w) == r).reshape(1, h, w, 1).astype(x.dtype)
        _, hvps = grads_and_hvps(g, x, e, cts)
        return jnp.sum(hvps * x, axis=-1).reshape(*hvps.shape[:2], -1)

    values = _map_rows(row, rows, chunk_size)  # (R, N, B, L)
    return jnp.transpose(values, (2, 1, 0, 3))


def forward_interactions(
    g: Callable[[Array], Array], x: Array, rows: Array, targets: Array, *, chunk_size: int | None = None
) -> Array:
    """(B, N, R, L) by nested forward-mode derivatives D^2 g[E_r, E_m] over every (r, m) pair."""
    b, h, w, _ = x.shape
    mask = lambda i: x * (jnp.arange(h * w) == i).reshape(1, h, w, 1).astype(x.dtype)

    def row(r):  # (L, B, P)
        dg = lambda y: jax.jvp(g, (y,), (mask(r),))[1]
        return jax.vmap(lambda m: jax.jvp(dg, (x,), (mask(m),))[1])(jnp.arange(h * w))

    values = _map_rows(row, rows, chunk_size)  # (R, L, B, P)
    values = jnp.transpose(values, (2, 3, 0, 1))  # (B, P, R, L)
    return jnp.take_along_axis(values, targets[:, :, None, None], axis=1)


def _map_rows(fn, rows: Array, chunk_size: int | None) -> Array:
    if chunk_size is None or chunk_size >= rows.shape[0]:
        return jax.vmap(fn)(rows)
    return jax.lax.map(fn, rows, batch_size=chunk_size)


def _interactions(f_leaves, h_leaves, images, targets, rows, *, f_struct, h_struct, output, top_n, order, chunk_size):
    features, head = rebuild(f_struct, f_leaves), rebuild(h_struct, h_leaves)
    x = features(images)
    g = lambda y: output(head(y))
    if order == "tangent":
        z, u = head.tangents(x, x)
        values = output(z)
        targets = _targets(values, top_n, targets)
        inter = tangent_interactions(output, z, u, rows, targets)
    else:
        values = g(x)
        targets = _targets(values, top_n, targets)
        fn = reverse_interactions if order == "reverse" else forward_interactions
        inter = fn(g, x, rows, targets, chunk_size=chunk_size)
    return Interactions(values=inter, targets=targets, rows=rows, outputs=values)


_interactions_jit = jax.jit(
    _interactions, static_argnames=("f_struct", "h_struct", "output", "top_n", "order", "chunk_size")
)


def _check_rows(locations, num_locations: int) -> Array:
    if locations is None:
        return jnp.arange(num_locations)
    rows = np.asarray(locations).reshape(-1)
    if not np.issubdtype(rows.dtype, np.integer) or rows.size == 0:
        raise ValueError(f"locations must be flat integer indices into the H x W grid, got {np.asarray(locations)}")
    if rows.min() < 0 or rows.max() >= num_locations:
        raise ValueError(
            f"locations must lie in [0, {num_locations}) (flat indices into the H x W grid), got "
            f"{rows.min()}..{rows.max()}"
        )
    return jnp.asarray(rows, jnp.int32)


def _check_targets(targets, batch: int, num_outputs: int):
    """(top_n, given (B, N) or None)."""
    if targets is None:
        return None, None
    if isinstance(targets, int):
        if not 1 <= targets <= num_outputs:
            raise ValueError(f"targets={targets} must lie between 1 and the number of outputs ({num_outputs})")
        return targets, None
    given = np.asarray(targets)
    if given.ndim != 2 or given.shape[0] != batch or not np.issubdtype(given.dtype, np.integer):
        raise ValueError(
            f"targets must be an int or integer indices of shape (B, N) with B = {batch}, got "
            f"{given.dtype} {given.shape}"
        )
    if given.size and (given.min() < 0 or given.max() >= num_outputs):
        raise ValueError(f"targets must lie in [0, {num_outputs}), got values {given.min()}..{given.max()}")
    return None, jnp.asarray(given, jnp.int32)


def interaction_maps(
    features: Callable | nnx.Module | None,
    head: Callable | nnx.Module,
    images: Array,
    *,
    targets: int | Array | None = None,
    output: str | Output | Callable = "probs",
    locations: Sequence[int] | Array | None = None,
    order: str = "auto",
    chunk_size: int | None = None,
    jit: bool = True,
) -> Interactions:
    """Exact interaction maps I[t, l, m] = x_l^T H_t,lm x_m at X = features(images) (None: X = images).

    head: X (B, H, W, D) -> logits (B, K); output, targets as `layer_attribution` (targets None: all P outputs).
    locations: row locations (flat indices l = i W + j; default all L). order: 'auto' (tangent where the head has
    logit tangents, else reverse when N < L, else forward), 'tangent', 'reverse' or 'forward'. chunk_size: rows
    processed at once. Returns `Interactions` with values (B, N, R, L)."""
    out = explained_output(output)
    images = _check_array("images", images, rank=4)
    f_struct, f_leaves = pure(features)
    h_struct, h_leaves = pure(head)
    x_spec = jax.eval_shape(lambda leaves, y: rebuild(f_struct, leaves)(y), f_leaves, images)
    if len(x_spec.shape) != 4:
        raise ValueError(f"features must return X of shape (B, H, W, D), got {x_spec.shape}")
    b, h, w, _ = x_spec.shape
    num_outputs = jax.eval_shape(lambda leaves, y: out(rebuild(h_struct, leaves)(y)), h_leaves, x_spec).shape[-1]
    top_n, given = _check_targets(targets, b, num_outputs)
    rows = _check_rows(locations, h * w)
    if order not in ("auto", "tangent", "forward", "reverse"):
        raise ValueError(f"order must be 'auto', 'tangent', 'forward' or 'reverse', got {order!r}")
    head_module = rebuild(h_struct, h_leaves)
    if order == "tangent" and not hasattr(head_module, "tangents"):
        raise ValueError(
            f"order='tangent' needs a head with logit tangents (a PoolMLPHead), got "
            f"{type(head_module).__name__}; use order='reverse' or 'forward'"
        )
    if order == "auto":
        n = num_outputs if targets is None else (top_n or given.shape[1])
        order = "tangent" if hasattr(head_module, "tangents") else ("reverse" if n < h * w else "forward")
    fn = _interactions_jit if jit else _interactions
    return fn(
        f_leaves,
        h_leaves,
        images,
        given,
        rows,
        f_struct=f_struct,
        h_struct=h_struct,
        output=out,
        top_n=top_n,
        order=order,
        chunk_size=chunk_size,
    )


def _model_interactions(leaves, images, rows, *, structure, score):
    model = rebuild(structure, leaves)
    a, classifier = model.features_and_classifier(images)
    z, u = classifier.tangents(a, a)
    if score == "hardness":
        if model.hardness_network is not None:
            a_s = model.hardness_network.backbone(images).astype(jnp.float32)
            zh, uh = model.hardness_network.head.tangents(a_s, a_s)
        else:
            zh, uh = model.hardness_head.tangents(a, a)
        z, u = jnp.concatenate([z, zh], axis=-1), jnp.concatenate([u, uh], axis=-1)
    output = deliberative_output(score)
    values = output(z)
    targets = jnp.broadcast_to(jnp.arange(values.shape[-1]), values.shape)
    return Interactions(
        values=tangent_interactions(output, z, u, rows, targets), targets=targets, rows=rows, outputs=values
    )


_model_interactions_jit = jax.jit(_model_interactions, static_argnames=("structure", "score"))


def make_model_interactions_fn(
    model, *, score: str = "hardness", locations: Sequence[int] | Array | None = None
) -> Callable[[Array], Interactions]:
    """A compiled images -> `Interactions` function for a `DeliberativeModel` (split once; for many batches).
    Arguments as `model_interaction_maps`; later changes to the model are not seen."""
    deliberative_output(score)  # validates the name
    if score == "hardness" and model.hardness_kind == "none":
        raise ValueError("score='hardness' needs a model with a hardness predictor (or score='hesitancy'/'entropy')")
    heads = [model.classifier, model.hardness_head if score == "hardness" else None]
    if score == "hardness" and model.hardness_network is not None:
        heads[1] = model.hardness_network.head
    for head in heads:
        if head is not None and not hasattr(head, "tangents"):
            raise ValueError(
                f"model_interaction_maps uses the logit tangents of piecewise-linear heads; {type(head).__name__} "
                "is not one (LayerNorm, attention): use interaction_maps(None, head, a, order='reverse') with "
                "a, head = model.features_and_classifier(images)"
            )
    from delib_jax.models import split_leaves

    structure, leaves = split_leaves(model)
    grids: dict = {}

    def interactions_fn(images) -> Interactions:
        images = _check_array("images", images, rank=4)
        if images.shape not in grids:
            a = jax.eval_shape(lambda lv, y: rebuild(structure, lv).backbone(y), leaves, images).shape
            grids[images.shape] = _check_rows(locations, a[1] * a[2])
        return _model_interactions_jit(leaves, images, grids[images.shape], structure=structure, score=score)

    return interactions_fn


def model_interaction_maps(
    model, images: Array, *, score: str = "hardness", locations: Sequence[int] | Array | None = None
) -> Interactions:
    """Interaction maps at A of all P = C + 1 outputs of a `DeliberativeModel` (C class probabilities, then the
    difficulty ``score``), from the logit tangents of its heads: values (B, C + 1, R, L). For 'hardness' the
    difficulty's interactions are in the hardness predictor's own features (A, or A_s of a separate network)."""
    return make_model_interactions_fn(model, score=score, locations=locations)(images)
