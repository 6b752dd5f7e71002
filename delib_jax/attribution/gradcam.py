"""Grad-CAM (Selvaraju et al.) at the explained layer: the single-map baseline the paper compares against."""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from delib_jax.models import Structure, inference_view, split_leaves

Array = jax.Array


def _cam(head: nnx.Module, a: Array, target: Array | None, everything: bool) -> Array:
    """Maps (B, K, H, W) of the classes ``target`` (B, K) (None: the prediction; ``everything``: all C classes).

    The channel weights of class k are mean_l d z_k / d a_l = (1 / HW) d z_k / d eps at eps = 0, where eps (B, D)
    shifts every location of A alike: one forward and one vjp per class, vmapped over the K classes (no loop)."""
    b, h, w, d = a.shape
    z, vjp = jax.vjp(lambda eps: head(a + eps[:, None, None, :]), jnp.zeros((b, d), a.dtype))
    c = z.shape[-1]
    if everything:
        target = jnp.broadcast_to(jnp.arange(c), (b, c))
    elif target is None:
        target = jnp.argmax(z, axis=-1)[:, None]
    cotangents = jax.nn.one_hot(target, c, dtype=z.dtype)  # (B, K, C)
    weights = jax.vmap(lambda ct: vjp(ct)[0], in_axes=1, out_axes=1)(cotangents) / (h * w)  # (B, K, D)
    return jax.nn.relu(jnp.einsum("bhwd,bkd->bkhw", a, weights))


@functools.lru_cache(maxsize=32)
def _compiled(structure: Structure, mode: str) -> Callable:
    """One jitted (head leaves, A, target) -> maps (B, K, H, W) per head structure and target mode, reused by every
    call (`grad_cam` re-traced the head on each call before: ~0.25 s with the VGG16 head)."""
    return jax.jit(lambda leaves, a, target: _cam(structure.merge(leaves), a, target, mode == "all"))


def grad_cam(classifier: nnx.Module, features: Array, target: Array | str | None = None) -> Array:
    """Grad-CAM maps of A (B, H, W, D): ReLU(sum_d w_d A_d), w_d the spatial mean of d logit / dA_d.

    target: None (the predicted class) or class indices (B,) -> maps (B, H, W); class indices (B, K), or "all"
    (every class, K = C) -> maps (B, K, H, W), all classes of all images in one vectorised pass (memory grows with
    B K H W D). The head runs in eval mode whatever its own mode (left as it is); float64 features stay float64
    under x64, others are computed in float32. Compiled once per head structure and target kind.
    """
    a = jnp.asarray(features)
    if a.ndim != 4:
        raise ValueError(f"features must have shape (B, H, W, D), got {a.shape}")
    a = a if jax.config.jax_enable_x64 and a.dtype == jnp.float64 else a.astype(jnp.float32)
    head = inference_view(classifier)
    structure, leaves = split_leaves(head)
    b = a.shape[0]
    if isinstance(target, str):
        if target != "all":
            raise ValueError(f"target must be None, class indices (B,) or (B, K), or 'all', got {target!r}")
        return _compiled(structure, "all")(leaves, a, None)
    if target is None:
        return _compiled(structure, "predicted")(leaves, a, None)[:, 0]
    classes = jnp.asarray(target)
    if classes.ndim not in (1, 2) or classes.shape[0] != b or not jnp.issubdtype(classes.dtype, jnp.integer):
        raise ValueError(
            f"target must hold integer class indices of shape ({b},) or ({b}, K), got {classes.dtype} {classes.shape}"
        )
    if not isinstance(classes, jax.core.Tracer):
        c = getattr(head, "out_features", None)
        bad = np.asarray(classes) < 0 if c is None else (np.asarray(classes) < 0) | (np.asarray(classes) >= c)
        if bad.any():
            raise ValueError(f"target holds class indices outside [0, {c}): {np.asarray(classes)[bad][:5].tolist()}")
    maps = _compiled(structure, "given")(leaves, a, classes.reshape(b, -1).astype(jnp.int32))
    return maps[:, 0] if classes.ndim == 1 else maps
