"""Per-location Taylor terms of explained outputs, by two exact routes.

Notation: A (B, H, W, D) the point, V (B, H, W, D) the direction (V = A for Eq. 2), L = H*W locations, E_l = V masked
to location l. For an output function g: A -> (B, P):
    first[l]  = D g(A)[E_l]           = [grad g(A)]_l . v_l
    second[l] = D^2 g(A)[E_l, E_l]    = v_l^T H_ll v_l          (diagonal block, Eq. 2)
             or D^2 g(A)[E_l, V]      = v_l . (H V)_l           (cross-location; sums to V^T H V)
Both routes return (first, second) of shape (B, P, L); second is None when not requested.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

Array = jax.Array


def generic_terms(
    g: Callable[[Array], Array], a: Array, v: Array, *, second: str | None, chunk_size: int | None = None
) -> tuple[Array, Array | None]:
    """Exact terms for ANY twice-differentiable g, by forward-over-forward jvp vmapped over locations.

    Costs about 3 L evaluations of g; the reference the structure-aware path is tested against. chunk_size bounds
    memory: locations are processed chunk_size at a time (sequentially across chunks)."""
    b, h, w, d = a.shape
    n = h * w

    def one(loc):
        e = v * (jnp.arange(n) == loc).reshape(1, h, w, 1).astype(v.dtype)

        def dg(x):
            return jax.jvp(g, (x,), (e,))[1]

        if second is None:
            return dg(a), jnp.zeros((b, 0), a.dtype)
        first, sec = jax.jvp(dg, (a,), (e if second == "diagonal" else v,))
        return first, sec

    locs = jnp.arange(n)
    if chunk_size is None or chunk_size >= n:
        first, sec = jax.vmap(one)(locs)  # (L, B, P)
    else:
        pad = (-n) % chunk_size
        chunks = jnp.concatenate([locs, jnp.zeros(pad, locs.dtype)]).reshape(-1, chunk_size)
        first, sec = jax.lax.map(jax.vmap(one), chunks)
        first = first.reshape(-1, *first.shape[2:])[:n]
        sec = sec.reshape(-1, *sec.shape[2:])[:n]
    first = jnp.moveaxis(first, 0, -1)
    return first, (None if second is None else jnp.moveaxis(sec, 0, -1))


def tangent_terms(
    phi: Callable[[Array], Array], z: Array, u: Array, *, second: str | None, w: Array | None = None
) -> tuple[Array, Array | None]:
    """Exact terms when g = phi(z(A)), from the head's logits and their per-location derivatives.

    z (B, K) logits, u (B, L, K) per-location logit tangents (z's derivative along E_l), w (B, L, K) the logits'
    second derivative D^2 z[E_l, E_l] (or [E_l, V] for 'cross'), None for a piecewise-linear head (z'' = 0). By the
    chain rule first = Dphi(z)[u_l] and second = D^2phi(z)[u_l, u_l] + Dphi(z)[w_l] (or [u_l, sum_l u_l]).
    phi acts row-wise on (..., K) -> (..., P) and is differentiated forward-over-forward: O(L K) work."""
    zb = jnp.broadcast_to(z[:, None, :], u.shape)

    def dphi(x):
        return jax.jvp(phi, (x,), (u,))[1]

    if second is None:
        first = dphi(zb)
        return jnp.moveaxis(first, -1, 1), None
    other = u if second == "diagonal" else jnp.broadcast_to(jnp.sum(u, axis=1, keepdims=True), u.shape)
    first, sec = jax.jvp(dphi, (zb,), (other,))
    if w is not None:  # the head's own curvature, seen through phi's first derivative
        sec = sec + jax.jvp(phi, (zb,), (w,))[1]
    return jnp.moveaxis(first, -1, 1), jnp.moveaxis(sec, -1, 1)
