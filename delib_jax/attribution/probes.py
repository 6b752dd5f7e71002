"""Unbiased random-sign estimate of the block-diagonal second-order term where L is too large for exact blocks.

With K probes of independent random signs s_kl in {-1, +1} per location, the direction v_k = sum_l s_kl v_l e_l and
one Hessian-vector product per probe and explained output t,

    d_kl = s_kl v_l . (H_t v_k)_l = v_l^T H_t,ll v_l + sum_{m != l} s_kl s_km v_l^T H_t,lm v_m,

whose expectation is the diagonal block term (E[s_l s_m] = 0 for l != m). The estimate is the mean over probes, its
standard error the sample standard deviation over sqrt(K); the error shrinks as 1 / sqrt(K). Cost: K N
Hessian-vector products (forward-over-reverse), independent of L.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from delib_jax.attribution.reverse import cotangents, grads_and_hvps

Array = jax.Array


def probe_diagonal(
    g: Callable[[Array], Array],
    x: Array,
    v: Array,
    targets: Array,
    *,
    probes: int,
    key: Array,
    chunk_size: int | None = None,
) -> tuple[Array, Array, Array]:
    """(first, diagonal estimate, standard error), each (B, N, L), for the target outputs of g at X along V.

    g: X (B, H, W, D) -> (B, P); x, v (B, H, W, D); targets (B, N) int; probes K >= 2; key: a jax.random key.
    first is exact ([grad g_t]_l . v_l, a by-product of the products). chunk_size bounds the probes run at once."""
    if probes < 2:
        raise ValueError(f"probes must be at least 2 (the standard error needs two), got {probes}")
    b, h, w, _ = x.shape
    cts = cotangents(targets, jax.eval_shape(g, x).shape[-1], x.dtype)
    signs = jax.random.rademacher(key, (probes, b, h, w, 1), dtype=x.dtype)

    def one(s):  # (B, H, W, 1) -> first, sample (N, B, L)
        grads, hvps = grads_and_hvps(g, x, s * v, cts)
        first = jnp.sum(grads * v, axis=-1).reshape(*grads.shape[:2], -1)
        sample = (s[..., 0] * jnp.sum(hvps * v, axis=-1)).reshape(*hvps.shape[:2], -1)
        return first, sample

    if chunk_size is None or chunk_size >= probes:
        firsts, samples = jax.vmap(one)(signs)
    else:
        firsts, samples = jax.lax.map(one, signs, batch_size=chunk_size)
    mean = jnp.mean(samples, axis=0)
    stderr = jnp.std(samples, axis=0, ddof=1) / jnp.sqrt(probes)
    return tuple(jnp.moveaxis(t, 0, 1) for t in (firsts[0], mean, stderr))
