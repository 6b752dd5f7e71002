"""Grad-CAM (Selvaraju et al.) at the explained layer: the single-map baseline the paper compares against."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


@nnx.jit
def _grad_cam(classifier, a, target):
    def chosen_logits(x):
        z = classifier(x)
        return jnp.sum(jnp.take_along_axis(z, target[:, None], axis=1))

    grads = jax.grad(chosen_logits)(a)  # (B, H, W, D); images are independent in eval mode
    weights = jnp.mean(grads, axis=(1, 2))  # (B, D)
    return jax.nn.relu(jnp.einsum("bhwd,bd->bhw", a, weights))


def grad_cam(classifier: nnx.Module, features: jax.Array, target: jax.Array | None = None) -> jax.Array:
    """Grad-CAM map (B, H, W) of class ``target`` (B,) -- the predicted class by default -- from A (B, H, W, D).

    Channel weights are the spatial mean of d logit / dA; the map is ReLU(sum_d w_d A_d)."""
    a = jnp.asarray(features, jnp.float32)
    if a.ndim != 4:
        raise ValueError(f"features must have shape (B, H, W, D), got {a.shape}")
    classifier.eval()
    if target is None:
        target = jnp.argmax(classifier(a), axis=-1)
    target = jnp.asarray(target, jnp.int32).reshape(a.shape[0])
    return _grad_cam(classifier, a, target)
