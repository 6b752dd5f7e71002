"""Backbones: images (B, H, W, 3) -> the explained feature tensor A (B, H', W', D).

Each stops at the layer the paper explains: VGG16(-BN) the ReLU after conv5_3 (14x14x512 at 224), the ResNets the
output of layer4 (7x7x512 for ResNet18 / 34, 7x7x2048 for ResNet50 / 101 / 152), AlexNet the last conv ReLU
(13x13x256), the small CNN its last conv ReLU (ConvNeXt: `delib_jax.models.convnext`). Layer structure and sizes
follow torchvision exactly so that its state dicts import one to one (see `delib_jax.models.weights`).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
from flax import nnx

from delib_jax.models import _layers

VGG16_CONFIG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)


class VGG(nnx.Module):
    """torchvision VGG ``features`` without the last max pool (which belongs to the class head)."""

    def __init__(self, config: Sequence = VGG16_CONFIG, *, batch_norm: bool = False, dtype=None, rngs: nnx.Rngs):
        self.config = tuple(config)
        channels = [c for c in self.config if c != "M"]
        ins = [3, *channels[:-1]]
        self.convs = nnx.List([_layers.conv(i, o, 3, padding=1, dtype=dtype, rngs=rngs) for i, o in zip(ins, channels)])
        self.norms = nnx.List([_layers.batch_norm(o, dtype=dtype, rngs=rngs) for o in channels]) if batch_norm else None
        self.out_channels = channels[-1]

    def __call__(self, x: jax.Array) -> jax.Array:
        i = 0
        for c in self.config:
            if c == "M":
                x = _layers.max_pool(x, 2, 2)
                continue
            x = self.convs[i](x)
            if self.norms is not None:
                x = self.norms[i](x)
            x = jax.nn.relu(x)
            i += 1
        return x


class AlexNet(nnx.Module):
    """torchvision AlexNet ``features`` without the last max pool."""

    def __init__(self, *, dtype=None, rngs: nnx.Rngs):
        spec = [(3, 64, 11, 4, 2), (64, 192, 5, 1, 2), (192, 384, 3, 1, 1), (384, 256, 3, 1, 1), (256, 256, 3, 1, 1)]
        self.convs = nnx.List(
            [_layers.conv(i, o, k, stride=s, padding=p, dtype=dtype, rngs=rngs) for i, o, k, s, p in spec]
        )
        self.out_channels = 256

    def __call__(self, x: jax.Array) -> jax.Array:
        for i, conv in enumerate(self.convs):
            x = jax.nn.relu(conv(x))
            if i < 2:
                x = _layers.max_pool(x, 3, 2)
        return x


class BasicBlock(nnx.Module):
    """ResNet18 / 34 block: two 3x3 convolutions with batch norm, the stride on the first."""

    expansion = 1

    def __init__(self, in_channels: int, width: int, stride: int, *, dtype=None, rngs: nnx.Rngs):
        self.conv1 = _layers.conv(in_channels, width, 3, stride=stride, padding=1, bias=False, dtype=dtype, rngs=rngs)
        self.bn1 = _layers.batch_norm(width, dtype=dtype, rngs=rngs)
        self.conv2 = _layers.conv(width, width, 3, padding=1, bias=False, dtype=dtype, rngs=rngs)
        self.bn2 = _layers.batch_norm(width, dtype=dtype, rngs=rngs)
        if stride != 1 or in_channels != width:
            self.downsample_conv = _layers.conv(
                in_channels, width, 1, stride=stride, bias=False, dtype=dtype, rngs=rngs
            )
            self.downsample_bn = _layers.batch_norm(width, dtype=dtype, rngs=rngs)
        else:
            self.downsample_conv = self.downsample_bn = None

    def __call__(self, x: jax.Array) -> jax.Array:
        """(B, H, W, in_channels) -> (B, H / stride, W / stride, width)."""
        y = jax.nn.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        shortcut = x if self.downsample_conv is None else self.downsample_bn(self.downsample_conv(x))
        return jax.nn.relu(y + shortcut)


class Bottleneck(nnx.Module):
    """ResNet v1.5 bottleneck: the stride sits on the 3x3 convolution."""

    expansion = 4

    def __init__(self, in_channels: int, width: int, stride: int, *, dtype=None, rngs: nnx.Rngs):
        out = width * self.expansion
        self.conv1 = _layers.conv(in_channels, width, 1, bias=False, dtype=dtype, rngs=rngs)
        self.bn1 = _layers.batch_norm(width, dtype=dtype, rngs=rngs)
        self.conv2 = _layers.conv(width, width, 3, stride=stride, padding=1, bias=False, dtype=dtype, rngs=rngs)
        self.bn2 = _layers.batch_norm(width, dtype=dtype, rngs=rngs)
        self.conv3 = _layers.conv(width, out, 1, bias=False, dtype=dtype, rngs=rngs)
        self.bn3 = _layers.batch_norm(out, dtype=dtype, rngs=rngs)
        if stride != 1 or in_channels != out:
            self.downsample_conv = _layers.conv(in_channels, out, 1, stride=stride, bias=False, dtype=dtype, rngs=rngs)
            self.downsample_bn = _layers.batch_norm(out, dtype=dtype, rngs=rngs)
        else:
            self.downsample_conv = self.downsample_bn = None

    def __call__(self, x: jax.Array) -> jax.Array:
        y = jax.nn.relu(self.bn1(self.conv1(x)))
        y = jax.nn.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        shortcut = x if self.downsample_conv is None else self.downsample_bn(self.downsample_conv(x))
        return jax.nn.relu(y + shortcut)


RESNETS = {
    "resnet18": (BasicBlock, (2, 2, 2, 2)),
    "resnet34": (BasicBlock, (3, 4, 6, 3)),
    "resnet50": (Bottleneck, (3, 4, 6, 3)),
    "resnet101": (Bottleneck, (3, 4, 23, 3)),
    "resnet152": (Bottleneck, (3, 8, 36, 3)),
}


class ResNet(nnx.Module):
    """torchvision ResNet trunk (conv1 ... layer4), without the global pool and fc (the class head).

    blocks: the number of blocks per stage; block: `Bottleneck` (ResNet50 / 101 / 152) or `BasicBlock` (18 / 34)."""

    def __init__(
        self,
        blocks: Sequence[int] = (3, 4, 6, 3),
        *,
        block: type[BasicBlock | Bottleneck] = Bottleneck,
        dtype=None,
        rngs: nnx.Rngs,
    ):
        if block not in (BasicBlock, Bottleneck):
            raise ValueError(f"block must be BasicBlock or Bottleneck, got {block!r}")
        self.conv1 = _layers.conv(3, 64, 7, stride=2, padding=3, bias=False, dtype=dtype, rngs=rngs)
        self.bn1 = _layers.batch_norm(64, dtype=dtype, rngs=rngs)
        layers, channels = [], 64
        for stage, (n, width) in enumerate(zip(blocks, (64, 128, 256, 512))):
            stage_blocks = []
            for i in range(n):
                stride = 2 if (i == 0 and stage > 0) else 1
                stage_blocks.append(block(channels, width, stride, dtype=dtype, rngs=rngs))
                channels = width * block.expansion
            layers.append(nnx.List(stage_blocks))
        self.layers = nnx.List(layers)
        self.out_channels = channels

    def __call__(self, x: jax.Array) -> jax.Array:
        x = jax.nn.relu(self.bn1(self.conv1(x)))
        x = _layers.max_pool(x, 3, 2, 1)
        for stage in self.layers:
            for block in stage:
                x = block(x)
        return x


def resnet(name: str, *, dtype=None, rngs: nnx.Rngs) -> ResNet:
    """torchvision's ``name`` trunk ('resnet18', 'resnet34', 'resnet50', 'resnet101', 'resnet152')."""
    if name not in RESNETS:
        raise ValueError(f"unknown ResNet {name!r}; choose one of {', '.join(RESNETS)}")
    block, blocks = RESNETS[name]
    return ResNet(blocks, block=block, dtype=dtype, rngs=rngs)


class SmallCNN(nnx.Module):
    """A small conv-BN-ReLU network for tests and the synthetic datasets; a 2x2 max pool follows each of the first
    ``pools`` convolutions, so A is at stride 2**pools (default: after all but the last)."""

    def __init__(
        self, widths: Sequence[int] = (32, 64, 128, 128), *, pools: int | None = None, dtype=None, rngs: nnx.Rngs
    ):
        ins = [3, *widths[:-1]]
        self.convs = nnx.List([_layers.conv(i, o, 3, padding=1, dtype=dtype, rngs=rngs) for i, o in zip(ins, widths)])
        self.norms = nnx.List([_layers.batch_norm(o, dtype=dtype, rngs=rngs) for o in widths])
        self.pools = len(widths) - 1 if pools is None else pools
        self.out_channels = widths[-1]

    def __call__(self, x: jax.Array) -> jax.Array:
        for i, (conv, bn) in enumerate(zip(self.convs, self.norms)):
            x = jax.nn.relu(bn(conv(x)))
            if i < self.pools:
                x = _layers.max_pool(x, 2, 2)
        return x
