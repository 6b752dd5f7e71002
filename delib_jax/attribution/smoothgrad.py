"""SmoothGrad, SmoothGrad^2 and VarGrad over any attribution method, vectorised over the noise samples.

    targets = layer_attribution(features, head, images, targets=5).targets        # fix the explained outputs first
    smooth = noise_tunnel(lambda x: layer_attribution(features, head, x, targets=targets).maps, images,
                          kind="smoothgrad", samples=16, noise=0.15)

For S noisy copies x_s = x + eps_s, eps_s ~ N(0, sigma^2), sigma = noise (max(x) - min(x)) per image (Smilkov et al.
2017): 'smoothgrad' is the mean of the maps, 'smoothgrad_sq' the mean of their squares, 'vargrad' their variance
(Adebayo et al. 2018). The method runs under jax.vmap over the samples (``chunk_size`` at a time with lax.map),
not a Python loop. Fix the targets from the clean images, or each noisy copy may explain other outputs.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

Array = jax.Array
KINDS = ("smoothgrad", "smoothgrad_sq", "vargrad")


def noise_tunnel(
    fn: Callable[[Array], Array],
    images: Array,
    *,
    kind: str = "smoothgrad",
    samples: int = 16,
    noise: float = 0.15,
    key: Array | None = None,
    chunk_size: int | None = None,
) -> Array:
    """The ``kind`` aggregate of fn over ``samples`` noisy copies of images (B, H, W, C).

    fn: images -> maps (any array or pytree of arrays; e.g. (B, N, H', W')); returns the same structure.
    noise: the noise's standard deviation as a fraction of each image's value range."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
    if samples < 1 or (kind == "vargrad" and samples < 2):
        raise ValueError(f"samples must be at least {2 if kind == 'vargrad' else 1}, got {samples}")
    if not noise >= 0:
        raise ValueError(f"noise must be a non-negative fraction of the value range, got {noise}")
    images = jnp.asarray(images)
    key = jax.random.key(0) if key is None else key
    axes = tuple(range(1, images.ndim))
    sigma = noise * (jnp.max(images, axis=axes, keepdims=True) - jnp.min(images, axis=axes, keepdims=True))
    eps = jax.random.normal(key, (samples, *images.shape), images.dtype) * sigma
    noisy = lambda e: fn(images + e)
    if chunk_size is None or chunk_size >= samples:
        maps = jax.vmap(noisy)(eps)
    else:
        maps = jax.lax.map(noisy, eps, batch_size=chunk_size)
    if kind == "smoothgrad":
        return jax.tree.map(lambda m: jnp.mean(m, axis=0), maps)
    if kind == "smoothgrad_sq":
        return jax.tree.map(lambda m: jnp.mean(jnp.square(m), axis=0), maps)
    return jax.tree.map(lambda m: jnp.var(m, axis=0), maps)
