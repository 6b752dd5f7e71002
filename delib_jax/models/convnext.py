"""torchvision's ConvNeXt (tiny, small, base) as an NNX backbone, and its torchvision key map.

A is the last stage's output before the final norm, (B, H/32, W/32, dims[-1]): 7 x 7 x 768 for ConvNeXt-T at 224 px.
The final LayerNorm belongs to the class head (`delib_jax.models.norm_heads.NormHead`, place 'after_pool': global
average pool, LayerNorm, Linear, as torchvision's avgpool and classifier). Eval mode only: stochastic depth is the
identity, and there is no batch norm.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from delib_jax.models.norm_heads import NormHead, layer_norm
from delib_jax.models.weights import Entry, conv_entries, linear_entries, norm_entries

Array = jax.Array

# torchvision's block settings: (blocks per stage, channels per stage)
CONFIGS = {
    "convnext_tiny": ((3, 3, 9, 3), (96, 192, 384, 768)),
    "convnext_small": ((3, 3, 27, 3), (96, 192, 384, 768)),
    "convnext_base": ((3, 3, 27, 3), (128, 256, 512, 1024)),
}

EPS = 1e-6
# torchvision initialises every Conv2d and Linear with trunc_normal_(std=0.02) and zero biases.
_init = nnx.initializers.truncated_normal(stddev=0.02)


def _conv(i: int, o: int, kernel: int, *, stride: int = 1, padding: int = 0, groups: int = 1, dtype, rngs) -> nnx.Conv:
    """A torch Conv2d with bias: kernel (k, k, i / groups, o)."""
    return nnx.Conv(
        i,
        o,
        (kernel, kernel),
        strides=(stride, stride),
        padding=((padding, padding), (padding, padding)),
        feature_group_count=groups,
        kernel_init=_init,
        dtype=dtype,
        rngs=rngs,
    )


def _norm(ln: nnx.LayerNorm, x: Array) -> Array:
    """torch's LayerNorm (and LayerNorm2d: NHWC here) over the channels (two-pass variance)."""
    return layer_norm(x, ln.scale[...], ln.bias[...], ln.epsilon)


class CNBlock(nnx.Module):
    """x + gamma * Linear(GELU(Linear(LayerNorm(dwconv7x7(x))))): (B, H, W, D) -> (B, H, W, D)."""

    def __init__(self, dim: int, *, layer_scale: float = 1e-6, dtype=None, rngs: nnx.Rngs):
        self.dwconv = _conv(dim, dim, 7, padding=3, groups=dim, dtype=dtype, rngs=rngs)
        self.norm = nnx.LayerNorm(dim, epsilon=EPS, rngs=rngs)
        self.fc1 = nnx.Linear(dim, 4 * dim, kernel_init=_init, dtype=dtype, rngs=rngs)
        self.fc2 = nnx.Linear(4 * dim, dim, kernel_init=_init, dtype=dtype, rngs=rngs)
        self.layer_scale = nnx.Param(jnp.full((dim,), layer_scale, jnp.float32))

    def __call__(self, x: Array) -> Array:
        y = _norm(self.norm, self.dwconv(x))
        y = self.fc2(jax.nn.gelu(self.fc1(y), approximate=False))
        return x + self.layer_scale[...] * y


class Downsample(nnx.Module):
    """LayerNorm over the channels, then a 2x2 stride-2 convolution: (B, H, W, D) -> (B, H/2, W/2, D')."""

    def __init__(self, in_channels: int, out_channels: int, *, dtype=None, rngs: nnx.Rngs):
        self.norm = nnx.LayerNorm(in_channels, epsilon=EPS, rngs=rngs)
        self.conv = _conv(in_channels, out_channels, 2, stride=2, dtype=dtype, rngs=rngs)

    def __call__(self, x: Array) -> Array:
        return self.conv(_norm(self.norm, x))


class ConvNeXt(nnx.Module):
    """torchvision ConvNeXt ``features``: stem (4x4 stride-4 conv, LayerNorm), then the stages of `CNBlock`s with a
    `Downsample` between two stages. images (B, H, W, 3) -> A (B, H/2^(len(dims)+1), ..., dims[-1])."""

    # the layers `set_precision` runs in bfloat16: the pointwise convolutions are Linears (most of the arithmetic)
    precision_layers = (nnx.Conv, nnx.BatchNorm, nnx.Linear)

    def __init__(
        self,
        depths: Sequence[int] = CONFIGS["convnext_tiny"][0],
        dims: Sequence[int] = CONFIGS["convnext_tiny"][1],
        *,
        layer_scale: float = 1e-6,
        dtype=None,
        rngs: nnx.Rngs,
    ):
        if len(depths) != len(dims) or not depths:
            raise ValueError(f"depths and dims need one entry per stage, got {tuple(depths)} and {tuple(dims)}")
        self.depths, self.dims = tuple(depths), tuple(dims)
        self.stem_conv = _conv(3, dims[0], 4, stride=4, dtype=dtype, rngs=rngs)
        self.stem_norm = nnx.LayerNorm(dims[0], epsilon=EPS, rngs=rngs)
        self.stages = nnx.List(
            [
                nnx.List([CNBlock(d, layer_scale=layer_scale, dtype=dtype, rngs=rngs) for _ in range(n)])
                for n, d in zip(depths, dims)
            ]
        )
        self.downsamples = nnx.List(
            [Downsample(dims[s], dims[s + 1], dtype=dtype, rngs=rngs) for s in range(len(dims) - 1)]
        )
        self.out_channels = dims[-1]

    def stem(self, x: Array) -> Array:
        """images (B, H, W, 3) -> (B, H/4, W/4, dims[0])."""
        return _norm(self.stem_norm, self.stem_conv(x))

    def __call__(self, x: Array) -> Array:
        x = self.stem(x)
        for s, stage in enumerate(self.stages):
            if s > 0:
                x = self.downsamples[s - 1](x)
            for block in stage:
                x = block(x)
        return x


def convnext(name: str, *, dtype=None, rngs: nnx.Rngs) -> ConvNeXt:
    """torchvision's ``name`` backbone ('convnext_tiny', 'convnext_small', 'convnext_base')."""
    if name not in CONFIGS:
        raise ValueError(f"unknown ConvNeXt {name!r}; choose one of {', '.join(CONFIGS)}")
    depths, dims = CONFIGS[name]
    return ConvNeXt(depths, dims, dtype=dtype, rngs=rngs)


def class_head(in_channels: int, out_features: int, *, rngs: nnx.Rngs) -> NormHead:
    """torchvision's ConvNeXt classifier: global average pool, LayerNorm (eps 1e-6), Linear; A -> logits (B, C)."""
    return NormHead(in_channels, out_features, place="after_pool", eps=EPS, rngs=rngs)


def _module(model: nnx.Module, path: tuple) -> nnx.Module:
    for p in path:
        model = model[p] if isinstance(p, int) else getattr(model, p)
    return model


def torchvision_entries(model: nnx.Module, backbone_root: tuple = ("backbone",)) -> Iterator[Entry]:
    """The key map of a `DeliberativeModel` with a `ConvNeXt` backbone (at ``backbone_root``) and a `NormHead` class
    head to torchvision's ConvNeXt names (features.{0 stem, 1 3 5 7 stages, 2 4 6 downsampling}, classifier)."""
    net = _module(model, backbone_root)
    yield from conv_entries("features.0.0", (*backbone_root, "stem_conv"))
    yield from norm_entries("features.0.1", (*backbone_root, "stem_norm"))
    for s, stage in enumerate(net.stages):
        if s > 0:
            p, path = f"features.{2 * s}", (*backbone_root, "downsamples", s - 1)
            yield from norm_entries(f"{p}.0", (*path, "norm"))
            yield from conv_entries(f"{p}.1", (*path, "conv"))
        for i in range(len(stage)):
            p, path = f"features.{2 * s + 1}.{i}", (*backbone_root, "stages", s, i)
            yield from conv_entries(f"{p}.block.0", (*path, "dwconv"))
            yield from norm_entries(f"{p}.block.2", (*path, "norm"))
            yield from linear_entries(f"{p}.block.3", (*path, "fc1"))
            yield from linear_entries(f"{p}.block.5", (*path, "fc2"))
            yield f"{p}.layer_scale", (*path, "layer_scale"), "reshape"  # torch (D, 1, 1) -> (D,)
    yield from norm_entries("classifier.0", ("classifier", "norm"))
    yield from linear_entries("classifier.2", ("classifier", "linear"))
