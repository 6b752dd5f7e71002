"""Vision Transformers (torchvision's ViT-B/16, ViT-B/32): the last encoder block is the class head.

A is the grid of patch tokens entering the last block, (B, H/p, W/p, D) (14 x 14 x 768 for B/16 at 224 px, 7 x 7 for
B/32). The class token entering that block is not a location: it is the head's second input, held fixed while A is
attributed (`DeliberativeModel.features_and_classifier` binds it for each batch). Only the class token's row of the
last block reaches the logits, so the head is: that row's attention over [class token, patches], its MLP, the final
LayerNorm and the Linear.
"""

from __future__ import annotations

from collections.abc import Iterator

import jax
import jax.numpy as jnp
from flax import nnx

from delib_jax.models.norm_heads import layer_norm
from delib_jax.models.weights import Entry, conv_entries, linear_entries, norm_entries

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

    # the structured path gives the diagonal term of Eq. 2; second_order='cross' takes the generic path
    taylor_terms = (None, "diagonal")

    def _cls(self, a: Array) -> Array:
        cls = self.cls[...]
        if cls.shape[0] != a.shape[0]:
            raise ValueError(f"the head is bound to {cls.shape[0]} class tokens, A has batch {a.shape[0]}")
        return cls.astype(a.dtype)

    def __call__(self, a: Array) -> Array:
        return self.vit.logits(a, self._cls(a))

    def taylor(self, a: Array, v: Array, *, second: str | None = "diagonal", layout: str = "auto"):
        """Logits z (B, K), per-location logit tangents U (B, L, K) and diagonal second derivatives W (B, L, K) at A
        along v, exact, for all locations in one pass (`delib_jax.models.vit_taylor`); layout has no effect."""
        del layout
        from delib_jax.models.vit_taylor import class_head_taylor

        return class_head_taylor(self.vit, a, self._cls(a), v, second=second)


class ViT(nnx.Module):
    """torchvision's VisionTransformer up to its last encoder block: images (B, S, S, 3) -> A (B, S/p, S/p, D).

    Patch convolution, class token, position embedding and the first ``depth - 1`` encoder blocks; the last block,
    the final LayerNorm and the Linear are the class head (`ViTHead`). Defaults: ViT-B/16 at 224 px."""

    def __init__(
        self,
        *,
        image_size: int = 224,
        patch_size: int = 16,
        width: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_dim: int = 3072,
        dtype=None,
        rngs: nnx.Rngs,
    ):
        if image_size % patch_size:
            raise ValueError(f"image size {image_size} is not a multiple of the patch size {patch_size}")
        if depth < 1:
            raise ValueError(f"depth must be at least 1 (the last block is the class head's), got {depth}")
        self.image_size = image_size
        self.patch_size = patch_size
        self.width = width
        self.depth = depth
        self.num_heads = num_heads
        self.mlp_dim = mlp_dim
        self.out_channels = width
        tokens = (image_size // patch_size) ** 2 + 1
        self.conv_proj = nnx.Conv(
            3,
            width,
            (patch_size, patch_size),
            strides=(patch_size, patch_size),
            padding="VALID",
            dtype=dtype,
            rngs=rngs,
        )
        self.class_token = nnx.Param(jnp.zeros((1, 1, width)))
        self.pos_embedding = nnx.Param(nnx.initializers.normal(0.02)(rngs.params(), (1, tokens, width)))
        self.layers = nnx.List([EncoderBlock(width, num_heads, mlp_dim, rngs=rngs) for _ in range(depth - 1)])

    def tokens(self, images: Array) -> Array:
        """Tokens (B, 1 + N, D) entering the last encoder block: the class token, then the patches row by row."""
        size = self.image_size
        if tuple(images.shape[1:3]) != (size, size):
            raise ValueError(
                f"this ViT takes {size} x {size} images (its position embedding is fixed), "
                f"got {images.shape[1]} x {images.shape[2]}: resize or crop to {size}"
            )
        x = self.conv_proj(images)
        b, h, w, d = x.shape
        x = x.reshape(b, h * w, d)  # row-major, as torch flattens conv_proj's (D, h, w) output
        cls = jnp.broadcast_to(self.class_token[...].astype(x.dtype), (b, 1, d))
        x = jnp.concatenate([cls, x], axis=1) + self.pos_embedding[...]
        for block in self.layers:
            x = block(x)
        return x

    def features_and_context(self, images: Array) -> tuple[Array, Array]:
        """A (B, S/p, S/p, D), the patch tokens entering the last block as a grid, and the class token (B, D)."""
        x = self.tokens(images)
        side = self.image_size // self.patch_size
        return x[:, 1:].reshape(x.shape[0], side, side, x.shape[-1]), x[:, 0]

    def __call__(self, images: Array) -> Array:
        """A (B, S/p, S/p, D)."""
        return self.features_and_context(images)[0]


def _block_entries(prefix: str, path: tuple) -> Iterator[Entry]:
    """One torchvision EncoderBlock at ``prefix`` -> an `EncoderBlock` at ``path``."""
    yield from norm_entries(f"{prefix}.ln_1", (*path, "ln_1"))
    # MultiheadAttention's in_proj_weight (3D, D) is a Linear's weight: transposed to the kernel (D, 3D)
    yield f"{prefix}.self_attention.in_proj_weight", (*path, "attention", "in_proj", "kernel"), "linear"
    yield f"{prefix}.self_attention.in_proj_bias", (*path, "attention", "in_proj", "bias"), "copy"
    yield from linear_entries(f"{prefix}.self_attention.out_proj", (*path, "attention", "out_proj"))
    yield from norm_entries(f"{prefix}.ln_2", (*path, "ln_2"))
    yield from linear_entries(f"{prefix}.mlp.0", (*path, "mlp_1"))
    yield from linear_entries(f"{prefix}.mlp.3", (*path, "mlp_2"))


def torchvision_entries(model, backbone_root: tuple = ("backbone",)) -> list[Entry]:
    """Key map of a `DeliberativeModel` with a `ViT` backbone and `ViTHead` to torchvision's VisionTransformer: the
    last encoder layer, ``encoder.ln`` and ``heads.head`` go to the class head."""
    vit = model.backbone
    last = vit.depth - 1
    entries = list(conv_entries("conv_proj", (*backbone_root, "conv_proj")))
    entries.append(("class_token", (*backbone_root, "class_token"), "copy"))
    entries.append(("encoder.pos_embedding", (*backbone_root, "pos_embedding"), "copy"))
    for i in range(last):
        entries += _block_entries(f"encoder.layers.encoder_layer_{i}", (*backbone_root, "layers", i))
    entries += _block_entries(f"encoder.layers.encoder_layer_{last}", ("classifier", "block"))
    entries += norm_entries("encoder.ln", ("classifier", "norm"))
    entries += linear_entries("heads.head", ("classifier", "head"))
    return entries
