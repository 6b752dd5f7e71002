"""Per-location Taylor terms by forward-over-reverse differentiation: jvp of grad, vmapped over explained outputs.

Notation as `_terms`: g: X (B, H, W, D) -> (B, P), the point X, a direction V (V = X for Eq. 2), L = H*W locations,
E_l = V masked to location l, and N explained outputs picked per image by ``targets`` (B, N). One reverse pass per
explained output gives grad g_t (B, H, W, D); its jvp along a direction W gives the Hessian-vector product H_t W. So

    first[l] = [grad g_t]_l . v_l                  N backward passes (the forward is shared)
    cross[l] = v_l . (H_t V)_l                     N Hessian-vector products: exact at any L (pixels included)
    diagonal[l] = v_l^T H_t,ll v_l = E_l . H_t E_l  N L Hessian-vector products (exact; prefer the forward order)

Cost grows with N, not with L: the order to use at pixel level. Returns terms of shape (B, N, L).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

Array = jax.Array


def cotangents(targets: Array, num_outputs: int, dtype) -> Array:
    """One-hot output cotangents (N, B, P) selecting output targets[b, n] of every image b."""
    return jnp.moveaxis(jax.nn.one_hot(targets, num_outputs, dtype=dtype), 1, 0)


def output_grads(g: Callable[[Array], Array], x: Array, cts: Array) -> Array:
    """grad of each explained output, (N, B, H, W, D): one forward, then the backward pass vmapped over N."""
    _, vjp = jax.vjp(g, x)
    return jax.vmap(lambda ct: vjp(ct)[0])(cts)


def grads_and_hvps(g: Callable[[Array], Array], x: Array, direction: Array, cts: Array) -> tuple[Array, Array]:
    """(grad g_t, H_t direction), each (N, B, H, W, D): jvp of `output_grads` along ``direction``.

    The forward pass and its tangent do not depend on the output, so they run once; the backward pass and its tangent
    are batched over the N outputs."""
    return jax.jvp(lambda y: output_grads(g, y, cts), (x,), (direction,))


def _per_location(x: Array) -> Array:
    """(..., B, H, W, D) -> (..., B, L): sum over channels."""
    return jnp.sum(x, axis=-1).reshape(*x.shape[:-3], -1)


def _location_mask(loc: Array, h: int, w: int, dtype) -> Array:
    return (jnp.arange(h * w) == loc).reshape(1, h, w, 1).astype(dtype)


def map_locations(fn: Callable[[Array], Array], n: int, chunk_size: int | None) -> Array:
    """fn over locations 0..n-1, vmapped (chunk_size at a time, sequentially across chunks): stacked on axis 0."""
    locs = jnp.arange(n)
    if chunk_size is None or chunk_size >= n:
        return jax.vmap(fn)(locs)
    return jax.lax.map(fn, locs, batch_size=chunk_size)


def reverse_terms(
    g: Callable[[Array], Array],
    x: Array,
    v: Array,
    targets: Array,
    *,
    second: str | None,
    chunk_size: int | None = None,
) -> tuple[Array, Array | None]:
    """first, second (B, N, L) of the target outputs of g at X along V (second: None, 'cross' or 'diagonal').

    g: X (B, H, W, D) -> (B, P); x, v (B, H, W, D); targets (B, N) int. Images must be independent rows of g (eval
    mode). chunk_size bounds the locations handled at once by the diagonal's per-location products."""
    b, h, w, _ = x.shape
    cts = cotangents(targets, jax.eval_shape(g, x).shape[-1], x.dtype)
    if second is None:
        first = _per_location(output_grads(g, x, cts) * v)
        return jnp.moveaxis(first, 0, 1), None
    if second == "cross":
        grads, hvps = grads_and_hvps(g, x, v, cts)
        return jnp.moveaxis(_per_location(grads * v), 0, 1), jnp.moveaxis(_per_location(hvps * v), 0, 1)
    if second != "diagonal":
        raise ValueError(f"second must be None, 'cross' or 'diagonal', got {second!r}")
    first = jnp.moveaxis(_per_location(output_grads(g, x, cts) * v), 0, 1)

    def block(loc):  # E_l . H_t E_l for every output t: (N, B)
        e = v * _location_mask(loc, h, w, v.dtype)
        _, hvps = grads_and_hvps(g, x, e, cts)
        return jnp.sum(hvps * e, axis=(-3, -2, -1))

    diag = map_locations(block, h * w, chunk_size)  # (L, N, B)
    return first, jnp.transpose(diag, (2, 1, 0))
