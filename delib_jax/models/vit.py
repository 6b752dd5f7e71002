"""Vision Transformers (torchvision's ViT-B/16, ViT-B/32): the last encoder block is the class head.

A is the grid of patch tokens entering the last block, (B, H/p, W/p, D) (14 x 14 x 768 for B/16 at 224 px, 7 x 7 for
B/32). The class token entering that block is not a location: it is the head's second input, held fixed while A is
attributed (`DeliberativeModel.features_and_classifier` binds it for each batch). Only the class token's row of the
last block reaches the logits, so the head is: that row's attention over [class token, patches], its MLP, the final
LayerNorm and the Linear.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from delib_jax.models.norm_heads import layer_norm

Array = jax.Array


def _norm(ln: nnx.LayerNorm, x: Array) -> Array:
    return layer_norm(x, ln.scale[...], ln.bias[...], ln.epsilon)


class Attention(nnx.Module):
    """torch.nn.MultiheadAttention (batch first, self-attention): one in_proj D -> 3D, heads, out_proj D -> D."""

    def __init__(self, dim: int, num_heads: int, *, rngs: nnx.Rngs):
        if dim % num_heads:
            raise ValueError(f"width {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.in_proj = nnx.Linear(dim, 3 * dim, rngs=rngs)
        self.out_proj = nnx.Linear(dim, dim, rngs=rngs)

    def heads(self, x: Array) -> tuple[Array, Array, Array]:
        """q, k, v (B, N, heads, D / heads) of tokens x (B, N, D)."""
        b, n, d = x.shape
        qkv = self.in_proj(x).reshape(b, n, 3, self.num_heads, d // self.num_heads)
        return qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]

    def __call__(self, x: Array) -> Array:
        b, n, d = x.shape
        q, k, v = self.heads(x)
        scores = jnp.einsum("bqhc,bkhc->bhqk", q, k) / jnp.sqrt(jnp.asarray(d // self.num_heads, x.dtype))
        out = jnp.einsum("bhqk,bkhc->bqhc", jax.nn.softmax(scores, axis=-1), v)
        return self.out_proj(out.reshape(b, n, d))


class EncoderBlock(nnx.Module):
    """torchvision's EncoderBlock (eval mode): x + attention(ln_1(x)), then + mlp(ln_2(.)) with an exact GELU."""

    def __init__(self, dim: int, num_heads: int, mlp_dim: int, *, eps: float = 1e-6, rngs: nnx.Rngs):
        self.ln_1 = nnx.LayerNorm(dim, epsilon=eps, rngs=rngs)
        self.attention = Attention(dim, num_heads, rngs=rngs)
        self.ln_2 = nnx.LayerNorm(dim, epsilon=eps, rngs=rngs)
        self.mlp_1 = nnx.Linear(dim, mlp_dim, rngs=rngs)
        self.mlp_2 = nnx.Linear(mlp_dim, dim, rngs=rngs)

    def mlp(self, x: Array) -> Array:
        return self.mlp_2(jax.nn.gelu(self.mlp_1(_norm(self.ln_2, x)), approximate=False))

    def __call__(self, x: Array) -> Array:
        """Tokens (B, N, D) -> (B, N, D)."""
        x = x + self.attention(_norm(self.ln_1, x))
        return x + self.mlp(x)


class ViTHead(nnx.Module):
    """The last encoder block, the final LayerNorm and the Linear: (A, class token) -> logits (B, K).

    Call it through `bind` (the class token of a batch): ``head.bind(cls)(a)``; `DeliberativeModel` does so."""

    output_layer = ("head",)

    def __init__(self, dim: int, out_features: int, *, num_heads: int, mlp_dim: int, rngs: nnx.Rngs):
        self.in_channels = dim
        self.out_features = out_features
        self.block = EncoderBlock(dim, num_heads, mlp_dim, rngs=rngs)
        self.norm = nnx.LayerNorm(dim, epsilon=1e-6, rngs=rngs)
        self.head = nnx.Linear(dim, out_features, rngs=rngs)

    def logits(self, a: Array, cls: Array) -> Array:
        """Logits (B, K) from the patch grid A (B, H, W, D) and the class token cls (B, D) entering the block."""
        b, h, w, d = a.shape
        tokens = jnp.concatenate([cls[:, None, :], a.reshape(b, h * w, d)], axis=1)
        x = self.block.ln_1  # only the class token's row reaches the logits: its query against every key
        y = _norm(x, tokens)
        q, k, v = self.block.attention.heads(y)
        scale = jnp.sqrt(jnp.asarray(d // self.block.attention.num_heads, a.dtype))
        scores = jnp.einsum("bhc,bkhc->bhk", q[:, 0], k) / scale
        out = jnp.einsum("bhk,bkhc->bhc", jax.nn.softmax(scores, axis=-1), v).reshape(b, d)
        x1 = cls + self.block.attention.out_proj(out)
        x2 = x1 + self.block.mlp(x1)
        return self.head(_norm(self.norm, x2))

    def bind(self, cls: Array) -> BoundViTHead:
        """This head with the class token (B, D) of one batch: a function of A alone."""
        return BoundViTHead(self, cls)

    def __call__(self, a: Array) -> Array:
        raise ValueError(
            "the ViT class head also reads the class token entering its last block: call it as "
            "model.features_and_classifier(images)[1](a), or head.bind(cls)(a)"
        )


class BoundViTHead(nnx.Module):
    """A ViT head with one batch's class token: A (B, H, W, D) -> logits (B, K)."""

    def __init__(self, head: ViTHead, cls: Array):
        self.vit = head
        self.cls = nnx.Variable(jnp.asarray(cls))
        self.in_channels = head.in_channels
        self.out_features = head.out_features

    def __call__(self, a: Array) -> Array:
        cls = self.cls[...]
        if cls.shape[0] != a.shape[0]:
            raise ValueError(f"the head is bound to {cls.shape[0]} class tokens, A has batch {a.shape[0]}")
        return self.vit.logits(a, cls.astype(a.dtype))
