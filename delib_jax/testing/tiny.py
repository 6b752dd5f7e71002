"""Tiny models for the attribution tests: small enough for full Hessians, with curvature of their own."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


class TinySmoothCNN(nnx.Module):
    """conv 3x3 -> softplus (= X, ``features``) -> conv 3x3 stride 2 -> tanh -> global mean -> linear (``head``)."""

    def __init__(self, classes: int = 4, *, rngs: nnx.Rngs):
        self.conv1 = nnx.Conv(3, 4, (3, 3), padding=((1, 1), (1, 1)), rngs=rngs)
        self.conv2 = nnx.Conv(4, 5, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)), rngs=rngs)
        self.fc = nnx.Linear(5, classes, rngs=rngs)

    def features(self, x: jax.Array) -> jax.Array:
        return jax.nn.softplus(self.conv1(x))

    def head(self, a: jax.Array) -> jax.Array:
        return self.fc(jnp.mean(jnp.tanh(self.conv2(a)), axis=(1, 2)))

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.head(self.features(x))


def randomise(module: nnx.Module, seed: int, dtype=jnp.float32, scale: float = 0.7) -> nnx.Module:
    """Random parameters and batch-norm statistics (so eval-mode BN is not the identity), drawn in float32 and cast
    to ``dtype`` (float32 and float64 copies hold the same values); the module is put in eval mode."""
    state = nnx.state(module)
    leaves, tree = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    new = [
        (
            jax.random.uniform(k, x.shape, jnp.float32, 0.5, 1.5)
            if x.ndim == 1
            else jax.random.normal(k, x.shape, jnp.float32) * scale
        ).astype(dtype)
        for k, x in zip(keys, leaves)
    ]
    nnx.update(module, jax.tree.unflatten(tree, new))
    module.eval()
    return module
