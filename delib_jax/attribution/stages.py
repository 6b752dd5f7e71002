"""Split a shipped model at a named stage: features(images) -> X and head(X) -> logits, as NNX modules.

    features, head = split_model(model, "layer3")          # ResNet50: X (B, 14, 14, 1024) at 224 px
    features, head = split_model(model, "block4")          # VGG16: the ReLU after conv4_3, X (B, 28, 28, 512)
    features, head = split_model(model, "image")           # pixel level: X = the images, head = the whole model
    features, head = split_model(model, "A", hardness=True)   # head -> (B, C + 1): class logits, hardness logit

Stage names (`stage_names(model)` lists them in order): every backbone has 'image' (X = the images) and 'A' (the
explained layer, the backbone's output). VGG: conv{b}_{i} (after its ReLU), block{b} (= the last conv of block b),
pool{b}; ResNet: stem (after the max pool), layer{s}.{i} (block i of stage s), layer{s}; ConvNeXt: stem (after its
LayerNorm), stage{s}.{i} (block i of stage s, from stage1.0 like ResNet's layer1.0), stage{s} (its last block; the
downsampling before a stage is not a stage of its own); AlexNet and the small CNN: conv{i} (after its ReLU) and
pool{i}. The two modules share the model's parameters (no copy); the model is put in eval mode, the only mode
attributions are defined in.

Swin: stem (the patch embedding, after its LayerNorm), stage{s}.{i}, stage{s} (the patch merging before a stage is
not a stage of its own). ViT: 'image' only: its class head also reads the class token entering the last block, so no
X inside the network gives the logits alone (for A use ``model.features_and_classifier``).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from delib_jax.models import _layers, backbones
from delib_jax.models.convnext import ConvNeXt
from delib_jax.models.swin import Swin

Step = Callable[[jax.Array], jax.Array]


def _vgg_steps(net: backbones.VGG) -> list[tuple[tuple[str, ...], Step]]:
    steps, block, conv_in_block, i = [], 1, 0, 0
    config = net.config
    for pos, c in enumerate(config):
        if c == "M":
            steps.append(((f"pool{block}",), lambda x: _layers.max_pool(x, 2, 2)))
            block, conv_in_block = block + 1, 0
            continue
        conv_in_block += 1
        names = (f"conv{block}_{conv_in_block}",)
        if pos + 1 == len(config) or config[pos + 1] == "M":
            names += (f"block{block}",)

        def step(x, i=i):
            x = net.convs[i](x)
            if net.norms is not None:
                x = net.norms[i](x)
            return jax.nn.relu(x)

        steps.append((names, step))
        i += 1
    return steps


def _resnet_steps(net: backbones.ResNet) -> list[tuple[tuple[str, ...], Step]]:
    steps = [((), lambda x: jax.nn.relu(net.bn1(net.conv1(x)))), (("stem",), lambda x: _layers.max_pool(x, 3, 2, 1))]
    for s, stage in enumerate(net.layers):
        for i, block in enumerate(stage):
            names = (f"layer{s + 1}.{i}",) + ((f"layer{s + 1}",) if i == len(stage) - 1 else ())
            steps.append((names, block))
    return steps


def _convnext_steps(net: ConvNeXt) -> list[tuple[tuple[str, ...], Step]]:
    steps = [(("stem",), net.stem)]
    for s, stage in enumerate(net.stages):
        if s > 0:
            steps.append(((), net.downsamples[s - 1]))
        for i, block in enumerate(stage):
            names = (f"stage{s + 1}.{i}",) + ((f"stage{s + 1}",) if i == len(stage) - 1 else ())
            steps.append((names, block))
    return steps


def _swin_steps(net: Swin) -> list[tuple[tuple[str, ...], Step]]:
    steps = [(("stem",), net.stem)]
    for s, stage in enumerate(net.stages):
        if s > 0:
            steps.append(((), net.merges[s - 1]))
        for i, block in enumerate(stage):
            names = (f"stage{s + 1}.{i}",) + ((f"stage{s + 1}",) if i == len(stage) - 1 else ())
            steps.append((names, block))
    return steps


def _alexnet_steps(net: backbones.AlexNet) -> list[tuple[tuple[str, ...], Step]]:
    steps = []
    for i, conv in enumerate(net.convs):
        steps.append(((f"conv{i + 1}",), lambda x, conv=conv: jax.nn.relu(conv(x))))
        if i < 2:
            steps.append(((f"pool{i + 1}",), lambda x: _layers.max_pool(x, 3, 2)))
    return steps


def _small_steps(net: backbones.SmallCNN) -> list[tuple[tuple[str, ...], Step]]:
    steps = []
    for i, (conv, bn) in enumerate(zip(net.convs, net.norms)):
        steps.append(((f"conv{i + 1}",), lambda x, conv=conv, bn=bn: jax.nn.relu(bn(conv(x)))))
        if i < net.pools:
            steps.append(((f"pool{i + 1}",), lambda x: _layers.max_pool(x, 2, 2)))
    return steps


_STEPS = {
    backbones.VGG: _vgg_steps,
    backbones.ResNet: _resnet_steps,
    ConvNeXt: _convnext_steps,
    backbones.AlexNet: _alexnet_steps,
    backbones.SmallCNN: _small_steps,
    Swin: _swin_steps,
}


def _has_context(backbone: nnx.Module) -> bool:
    """Whether the class head reads more than A (ViT: the class token), given by ``features_and_context``."""
    return hasattr(backbone, "features_and_context")


def _steps(backbone: nnx.Module) -> list[tuple[tuple[str, ...], Step]]:
    for kind, steps in _STEPS.items():
        if isinstance(backbone, kind):
            return steps(backbone)
    raise ValueError(
        f"split_model knows the shipped backbones (VGG, ResNet, ConvNeXt, AlexNet, SmallCNN), not "
        f"{type(backbone).__name__}: pass your own features and head callables instead"
    )


def stage_names(model) -> tuple[str, ...]:
    """The stage names of ``model``'s backbone in network order ('image' first, 'A' last; a ViT: 'image' only)."""
    if _has_context(model.backbone):
        return ("image",)
    names = [n for names, _ in _steps(model.backbone) for n in names]
    return ("image", *names, "A")


def _stage_index(backbone: nnx.Module, stage: str) -> int:
    """Number of backbone steps that produce X at ``stage``."""
    if stage == "image":
        return 0
    if _has_context(backbone):
        raise ValueError(
            f"split_model splits a {type(backbone).__name__} only at 'image', not {stage!r}: its class head also "
            "reads the class token entering its last block, so no X alone gives the logits; for A use "
            "model.features_and_classifier(images) (A and the head bound to the batch's class token)"
        )
    steps = _steps(backbone)
    if stage == "A":
        return len(steps)
    for i, (names, _) in enumerate(steps):
        if stage in names:
            return i + 1
    known = ", ".join(["image", *(n for names, _ in steps for n in names), "A"])
    raise ValueError(f"unknown stage {stage!r} for {type(backbone).__name__}; choose one of {known}")


def _run(backbone: nnx.Module, x: jax.Array, start: int, stop: int | None) -> jax.Array:
    if start == stop:
        return x
    for _, step in _steps(backbone)[start:stop]:
        x = step(x)
    return x


class StageFeatures(nnx.Module):
    """images (B, H, W, 3) -> X, the backbone run up to a stage."""

    def __init__(self, backbone: nnx.Module, stop: int):
        self.backbone = backbone
        self.stop = stop

    def __call__(self, images: jax.Array) -> jax.Array:
        return _run(self.backbone, images, 0, self.stop)


class StageHead(nnx.Module):
    """X -> logits (B, C) (and the hardness logit as column C when built with one): the rest of the backbone, then
    the class head (and the hardness predictor)."""

    def __init__(
        self, backbone: nnx.Module, start: int, classifier: nnx.Module, *, hardness_head=None, hardness_network=None
    ):
        self.backbone = backbone
        self.start = start
        self.classifier = classifier
        self.hardness_head = hardness_head
        self.hardness_network = hardness_network

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.start == 0 and _has_context(self.backbone):  # a ViT from the pixels: its head bound to this batch
            a, context = self.backbone.features_and_context(x)
            a = a.astype(jnp.float32)
            z = self.classifier.bind(context)(a)
        else:
            a = _run(self.backbone, x, self.start, None).astype(jnp.float32)
            z = self.classifier(a)
        if self.hardness_head is not None:
            z = jnp.concatenate([z, self.hardness_head(a)], axis=-1)
        elif self.hardness_network is not None:  # only at the image: its own backbone reads the pixels
            z = jnp.concatenate(
                [z, self.hardness_network.head(self.hardness_network.backbone(x).astype(jnp.float32))], axis=-1
            )
        return z


def split_model(model, stage: str = "A", *, hardness: bool = False) -> tuple[StageFeatures, StageHead]:
    """(features, head) of a `DeliberativeModel` split at ``stage``: features(images) -> X (B, H', W', D'),
    head(X) -> logits (B, C), or (B, C + 1) with the hardness logit last when ``hardness`` (explain them with
    `deliberative_output('hardness')`). A separate hardness network reads its own features, so with
    hardness=True it can only be split at 'image'."""
    stop = _stage_index(model.backbone, stage)
    kwargs = {}
    if hardness:
        if model.hardness_head is not None:
            kwargs["hardness_head"] = model.hardness_head
        elif model.hardness_network is not None:
            if stage != "image":
                raise ValueError(
                    "this model's hardness predictor is a separate network with its own features: "
                    "split it at 'image', or use hardness=False"
                )
            kwargs["hardness_network"] = model.hardness_network
        else:
            raise ValueError("hardness=True needs a model with a hardness predictor (created with hardness='none')")
    model.eval()
    return StageFeatures(model.backbone, stop), StageHead(model.backbone, stop, model.classifier, **kwargs)
