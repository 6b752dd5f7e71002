"""Swin Transformer (torchvision's swin_t, v1): shifted-window attention in four stages, A = the last stage's output.

A is (B, H/32, W/32, 8 C) before the final LayerNorm (7 x 7 x 768 for swin_t at 224 px); the class head is
`NormHead(place='before_pool')`: LayerNorm per location, global average pool, Linear. Everything follows
torchvision's swin_transformer.py exactly: inputs whose grid is not a multiple of the window are padded with zeros
(bottom / right) inside each attention, a window no smaller than the padded grid turns the shift off, shifted
windows mask pairs from different regions with -100, and patch merging pads odd grids and concatenates the 2 x 2
neighbours in torchvision's order (x0, x1, x2, x3).
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from delib_jax.models import _layers
from delib_jax.models.norm_heads import NormHead, layer_norm
from delib_jax.models.weights import Entry, conv_entries, linear_entries, norm_entries

Array = jax.Array


def _norm(ln: nnx.LayerNorm, x: Array) -> Array:
    return layer_norm(x, ln.scale[...], ln.bias[...], ln.epsilon)


@functools.cache
def relative_position_index(wh: int, ww: int) -> np.ndarray:
    """torchvision's relative_position_index (wh ww * wh ww,): the bias table row of each (query, key) pair."""
    coords = np.stack(np.meshgrid(np.arange(wh), np.arange(ww), indexing="ij")).reshape(2, -1)  # (2, N)
    rel = (coords[:, :, None] - coords[:, None, :]).transpose(1, 2, 0)  # (N, N, 2)
    index = (rel[..., 0] + wh - 1) * (2 * ww - 1) + rel[..., 1] + ww - 1
    index = index.reshape(-1).astype(np.int64)
    index.flags.writeable = False
    return index


@functools.cache
def shift_mask(pad_h: int, pad_w: int, window: tuple[int, int], shift: tuple[int, int]) -> np.ndarray:
    """torchvision's attention mask of shifted windows (windows, N, N): 0 within a region, -100 across regions."""
    (wh, ww), (sh, sw) = window, shift
    regions = np.zeros((pad_h, pad_w), np.float32)
    count = 0
    for h in ((0, -wh), (-wh, -sh), (-sh, None)):  # torch's slices, shift 0 included
        for w in ((0, -ww), (-ww, -sw), (-sw, None)):
            regions[h[0] : h[1], w[0] : w[1]] = count
            count += 1
    regions = regions.reshape(pad_h // wh, wh, pad_w // ww, ww).transpose(0, 2, 1, 3).reshape(-1, wh * ww)
    diff = regions[:, None, :] - regions[:, :, None]
    mask = np.where(diff != 0, np.float32(-100.0), np.float32(0.0))
    mask.flags.writeable = False
    return mask


class WindowAttention(nnx.Module):
    """torchvision's ShiftedWindowAttention (v1): multi-head attention inside (shifted) windows with a relative
    position bias. x (B, H, W, C) -> (B, H, W, C)."""

    def __init__(
        self, dim: int, num_heads: int, window: tuple[int, int], shift: tuple[int, int], *, dtype=None, rngs: nnx.Rngs
    ):
        if dim % num_heads:
            raise ValueError(f"width {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.window = tuple(window)
        self.shift = tuple(shift)
        self.qkv = nnx.Linear(dim, 3 * dim, dtype=dtype, rngs=rngs)
        self.proj = nnx.Linear(dim, dim, dtype=dtype, rngs=rngs)
        rows = (2 * self.window[0] - 1) * (2 * self.window[1] - 1)
        init = nnx.initializers.truncated_normal(0.02)
        self.relative_position_bias_table = nnx.Param(init(rngs.params(), (rows, num_heads)))

    @property
    def relative_position_index(self) -> np.ndarray:
        """The constant index torchvision keeps as a buffer (recomputed here, checked on import)."""
        return relative_position_index(*self.window)

    def bias(self) -> Array:
        """Relative position bias (heads, N, N) of one window, N = wh ww."""
        n = self.window[0] * self.window[1]
        table = self.relative_position_bias_table[...]
        # int32 rows (the table is small): a numpy int64 index met JAX's int32 indices after x64 had been on and off
        # in one process ("lax.add requires the same dtypes")
        rows = np.asarray(self.relative_position_index, np.int32)
        return jnp.take(table, rows, axis=0).reshape(n, n, -1).transpose(2, 0, 1)

    def __call__(self, x: Array) -> Array:
        b, h, w, c = x.shape
        (wh, ww), heads = self.window, self.num_heads
        pad_h, pad_w = -(-h // wh) * wh, -(-w // ww) * ww
        x = jnp.pad(x, ((0, 0), (0, pad_h - h), (0, pad_w - w), (0, 0)))
        # a window no smaller than the (padded) grid: no shift along that axis, as in torchvision
        shift = (0 if wh >= pad_h else self.shift[0], 0 if ww >= pad_w else self.shift[1])
        if sum(shift) > 0:
            x = jnp.roll(x, (-shift[0], -shift[1]), axis=(1, 2))
        nh, nw = pad_h // wh, pad_w // ww
        x = x.reshape(b, nh, wh, nw, ww, c).transpose(0, 1, 3, 2, 4, 5).reshape(b, nh * nw, wh * ww, c)
        qkv = self.qkv(x).reshape(b, nh * nw, wh * ww, 3, heads, c // heads)
        q, k, v = qkv[..., 0, :, :], qkv[..., 1, :, :], qkv[..., 2, :, :]  # (B, windows, N, heads, c)
        q = q * (c // heads) ** -0.5
        attn = jnp.einsum("bwqhc,bwkhc->bwhqk", q, k) + self.bias().astype(q.dtype)
        if sum(shift) > 0:
            attn = attn + jnp.asarray(shift_mask(pad_h, pad_w, self.window, shift), attn.dtype)[None, :, None]
        out = jnp.einsum("bwhqk,bwkhc->bwqhc", jax.nn.softmax(attn, axis=-1), v).reshape(b, nh * nw, wh * ww, c)
        x = self.proj(out)
        x = x.reshape(b, nh, nw, wh, ww, c).transpose(0, 1, 3, 2, 4, 5).reshape(b, pad_h, pad_w, c)
        if sum(shift) > 0:
            x = jnp.roll(x, shift, axis=(1, 2))
        return x[:, :h, :w]


class SwinBlock(nnx.Module):
    """torchvision's SwinTransformerBlock (eval mode): x + attn(norm1(x)), then + mlp(norm2(.)), exact GELU."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        window: tuple[int, int],
        shift: tuple[int, int],
        *,
        mlp_ratio: float = 4.0,
        eps: float = 1e-5,
        dtype=None,
        rngs: nnx.Rngs,
    ):
        hidden = int(dim * mlp_ratio)
        self.norm1 = nnx.LayerNorm(dim, epsilon=eps, rngs=rngs)
        self.attn = WindowAttention(dim, num_heads, window, shift, dtype=dtype, rngs=rngs)
        self.norm2 = nnx.LayerNorm(dim, epsilon=eps, rngs=rngs)
        self.mlp_1 = nnx.Linear(dim, hidden, dtype=dtype, rngs=rngs)
        self.mlp_2 = nnx.Linear(hidden, dim, dtype=dtype, rngs=rngs)

    def __call__(self, x: Array) -> Array:
        """(B, H, W, C) -> (B, H, W, C)."""
        x = x + self.attn(_norm(self.norm1, x))
        return x + self.mlp_2(jax.nn.gelu(self.mlp_1(_norm(self.norm2, x)), approximate=False))


class PatchMerging(nnx.Module):
    """torchvision's PatchMerging (v1): (B, H, W, C) -> (B, ceil(H/2), ceil(W/2), 2C) by concatenating each 2 x 2
    neighbourhood (x0, x1, x2, x3 order), LayerNorm over 4C and a Linear 4C -> 2C without bias."""

    def __init__(self, dim: int, *, eps: float = 1e-5, dtype=None, rngs: nnx.Rngs):
        self.norm = nnx.LayerNorm(4 * dim, epsilon=eps, rngs=rngs)
        self.reduction = nnx.Linear(4 * dim, 2 * dim, use_bias=False, dtype=dtype, rngs=rngs)

    def __call__(self, x: Array) -> Array:
        _, h, w, _ = x.shape
        x = jnp.pad(x, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)))
        x = jnp.concatenate([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], axis=-1)
        return self.reduction(_norm(self.norm, x))


class Swin(nnx.Module):
    """torchvision's SwinTransformer ``features``: images (B, H, W, 3) -> A (B, H/(p 2^(S-1)), ..., C 2^(S-1)).

    Patch embedding (conv p x p, stride p, then LayerNorm), S stages of Swin blocks (odd blocks shifted by half a
    window), patch merging between stages. Defaults: swin_t."""

    def __init__(
        self,
        *,
        patch_size: int = 4,
        embed_dim: int = 96,
        depths: Sequence[int] = (2, 2, 6, 2),
        num_heads: Sequence[int] = (3, 6, 12, 24),
        window_size: int = 7,
        mlp_ratio: float = 4.0,
        eps: float = 1e-5,
        dtype=None,
        rngs: nnx.Rngs,
    ):
        if len(depths) != len(num_heads) or not depths:
            raise ValueError(f"depths {tuple(depths)} and num_heads {tuple(num_heads)} need one entry per stage")
        window = (window_size, window_size)
        self.patch_size = patch_size
        self.embed_dim = embed_dim
        self.depths = tuple(depths)
        self.window_size = window_size
        self.patch_conv = _layers.conv(3, embed_dim, patch_size, stride=patch_size, dtype=dtype, rngs=rngs)
        self.patch_norm = nnx.LayerNorm(embed_dim, epsilon=eps, rngs=rngs)
        stages, merges = [], []
        for s, (depth, heads) in enumerate(zip(depths, num_heads)):
            dim = embed_dim * 2**s
            blocks = []
            for i in range(depth):
                shift = (0, 0) if i % 2 == 0 else (window_size // 2, window_size // 2)
                blocks.append(
                    SwinBlock(dim, heads, window, shift, mlp_ratio=mlp_ratio, eps=eps, dtype=dtype, rngs=rngs)
                )
            stages.append(nnx.List(blocks))
            if s < len(depths) - 1:
                merges.append(PatchMerging(dim, eps=eps, dtype=dtype, rngs=rngs))
        self.stages = nnx.List(stages)
        self.merges = nnx.List(merges)
        self.out_channels = embed_dim * 2 ** (len(depths) - 1)

    def stem(self, images: Array) -> Array:
        """Patch embedding: images (B, H, W, 3) -> (B, H/p, W/p, C)."""
        return _norm(self.patch_norm, self.patch_conv(images))

    def __call__(self, images: Array) -> Array:
        """A (B, H', W', D): the last stage's output, before the final LayerNorm (the class head's)."""
        x = self.stem(images)
        for s, stage in enumerate(self.stages):
            if s > 0:
                x = self.merges[s - 1](x)
            for block in stage:
                x = block(x)
        return x


def _block_entries(prefix: str, path: tuple) -> Iterator[Entry]:
    """One torchvision SwinTransformerBlock at ``prefix`` -> a `SwinBlock` at ``path``."""
    yield from norm_entries(f"{prefix}.norm1", (*path, "norm1"))
    yield from linear_entries(f"{prefix}.attn.qkv", (*path, "attn", "qkv"))
    yield from linear_entries(f"{prefix}.attn.proj", (*path, "attn", "proj"))
    yield f"{prefix}.attn.relative_position_bias_table", (*path, "attn", "relative_position_bias_table"), "copy"
    # a buffer in torchvision's state dict: a constant recomputed here, compared on import and not loaded
    yield f"{prefix}.attn.relative_position_index", (*path, "attn", "relative_position_index"), "constant"
    yield from norm_entries(f"{prefix}.norm2", (*path, "norm2"))
    yield from linear_entries(f"{prefix}.mlp.0", (*path, "mlp_1"))
    yield from linear_entries(f"{prefix}.mlp.3", (*path, "mlp_2"))


def torchvision_entries(model, backbone_root: tuple = ("backbone",)) -> list[Entry]:
    """Key map of a `DeliberativeModel` with a `Swin` backbone and a `NormHead` to torchvision's SwinTransformer:
    ``features.0`` the patch embedding, ``features.{2s+1}`` stage s, ``features.{2s+2}`` its patch merging, ``norm``
    and ``head`` the class head."""
    swin = model.backbone
    entries = list(conv_entries("features.0.0", (*backbone_root, "patch_conv")))
    entries += norm_entries("features.0.2", (*backbone_root, "patch_norm"))
    for s, depth in enumerate(swin.depths):
        for i in range(depth):
            entries += _block_entries(f"features.{2 * s + 1}.{i}", (*backbone_root, "stages", s, i))
        if s < len(swin.depths) - 1:
            merge = (*backbone_root, "merges", s)
            entries.append((f"features.{2 * s + 2}.reduction.weight", (*merge, "reduction", "kernel"), "linear"))
            entries += norm_entries(f"features.{2 * s + 2}.norm", (*merge, "norm"))
    entries += norm_entries("norm", ("classifier", "norm"))
    entries += linear_entries("head", ("classifier", "linear"))
    return entries


def swin_head(in_channels: int, out_features: int, *, rngs: nnx.Rngs) -> NormHead:
    """torchvision Swin's class head on A (B, H, W, D): LayerNorm per location (eps 1e-5), average pool, Linear."""
    head = NormHead(in_channels, out_features, place="before_pool", eps=1e-5, rngs=rngs)
    head.output_layer = ("linear",)  # the Linear ImageNet's classes live in (load_torchvision(classifier_output=False))
    return head
