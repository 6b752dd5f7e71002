"""Slow, obviously-correct references for the attribution core (tests only).

Each location's gradient and DxD Hessian block come from jax.jacobian / jax.hessian of the output as a function of
that location's activation vector alone; the cross-location variant uses the full Hessian of each image.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np


def brute_force_terms(g: Callable, a: np.ndarray, second: str = "diagonal") -> tuple[np.ndarray, np.ndarray]:
    """first, second (B, P, H, W) of g: (1, H, W, D) -> (1, P) at A (B, H, W, D), direction A.

    first = grad_l . a_l; second = a_l^T H_ll a_l (diagonal) or a_l . (H A)_l (cross), without the 1/2."""
    a = jnp.asarray(a)
    b, h, w, d = a.shape

    def local(x, img, i, j):
        return g(img.at[i, j].set(x)[None])[0]

    jac = jax.jit(jax.jacobian(local))
    hes = jax.jit(jax.hessian(local))
    full_hessian = jax.jit(jax.hessian(lambda x: g(x[None])[0]))
    firsts, seconds = [], []
    for n in range(b):
        img = a[n]
        if second == "cross":
            hv = jnp.einsum("phwdijk,ijk->phwd", full_hessian(img), img)  # (H A) per output
        f_img = np.zeros((g(img[None]).shape[-1], h, w))
        s_img = np.zeros_like(f_img)
        for i in range(h):
            for j in range(w):
                v = img[i, j]
                f_img[:, i, j] = jac(v, img, i, j) @ v
                if second == "cross":
                    s_img[:, i, j] = hv[:, i, j] @ v
                else:
                    s_img[:, i, j] = jnp.einsum("d,pde,e->p", v, hes(v, img, i, j), v)
        firsts.append(f_img)
        seconds.append(s_img)
    return np.stack(firsts), np.stack(seconds)


def full_hessian_terms(g: Callable, a: np.ndarray) -> dict[str, np.ndarray]:
    """Every term from the full Jacobian and Hessian of g: (1, H, W, D) -> (1, P) of each image at A (small inputs).

    first, diagonal, cross: (B, P, H, W) as `brute_force_terms` (no 1/2); interactions: (B, P, L, L) with
    interactions[p, l, m] = a_l^T H_lm a_m."""
    a = jnp.asarray(a)
    b, h, w, d = a.shape
    jacobian = jax.jit(jax.jacobian(lambda x: g(x[None])[0]))
    hessian = jax.jit(jax.hessian(lambda x: g(x[None])[0]))
    out = {"first": [], "interactions": []}
    for n in range(b):
        v = a[n].reshape(h * w, d)
        jac = jacobian(a[n]).reshape(-1, h * w, d)  # (P, L, D)
        hes = hessian(a[n]).reshape(-1, h * w, d, h * w, d)  # (P, L, D, L, D)
        out["first"].append(np.asarray(jnp.einsum("pld,ld->pl", jac, v)).reshape(-1, h, w))
        out["interactions"].append(np.asarray(jnp.einsum("ld,pldme,me->plm", v, hes, v)))
    inter = np.stack(out["interactions"])
    return {
        "first": np.stack(out["first"]),
        "diagonal": np.diagonal(inter, axis1=2, axis2=3).reshape(b, -1, h, w),
        "cross": inter.sum(axis=3).reshape(b, -1, h, w),
        "interactions": inter,
    }
