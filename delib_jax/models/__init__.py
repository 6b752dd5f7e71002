"""Flax NNX models for deliberative explanations.

    model = create_model("vgg16", num_classes=200)            # hardness head on A, jointly trained; eval mode
    out = predict(model, images)                              # jit-compiled, eval-mode batch norm
    a = model.features(images); logits = model.classifier(a)  # the pieces the explanation needs

Models are created in eval mode (running batch-norm statistics, no dropout): calling one never changes its weights or
statistics. Training switches a copy to train mode (`delib_jax.train`); the inference functions here and in
`delib_jax.attribution` run an eval-mode view (`inference_view`) whatever the caller's mode, and leave it as it was.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import jax
import jax.numpy as jnp
from flax import nnx

from delib_jax.models import backbones, convnext, weights
from delib_jax.models._inference import PRECISIONS, fold_batch_norm, inference_model, inference_view, set_precision
from delib_jax.models.deliberative import DeliberativeModel, HardnessNetwork, Outputs
from delib_jax.models.heads import PoolMLPHead, hardness_head
from delib_jax.models.swin import Swin, swin_head
from delib_jax.models.swin import torchvision_entries as swin_entries
from delib_jax.models.vit import ViT, ViTHead
from delib_jax.models.vit import torchvision_entries as vit_entries
from delib_jax.models.weights import load_torchvision, read_state_dict


@dataclass(frozen=True)
class ArchSpec:
    """How to build one architecture: backbone factory and class-head factory (given D and C), the input size it is
    explained at, and for the families imported from torchvision: their key map and their weights' preprocessing.

    torchvision: ``entries(model, backbone_root) -> [(torch key, path of our variable, conversion)]`` for the
    backbone and class head (None: the map in `delib_jax.models.weights` for the first architectures).
    resize, crop: the shorter side and centre crop torchvision's ImageNet weights were evaluated with.
    fixed_size: the architecture accepts only ``default_size`` inputs (ViT's position embedding)."""

    backbone: Callable[..., nnx.Module]
    head: Callable[..., nnx.Module]
    default_size: int  # the input size the architecture is explained at
    torchvision: Callable[..., Iterable] | None = None
    resize: int = 256
    crop: int = 224
    fixed_size: bool = False


def _vgg_head(d, c, *, rngs):
    return PoolMLPHead(
        d,
        c,
        hidden=(4096, 4096),
        pooled_size=(7, 7),
        pool_window=2,
        pool_stride=2,
        dropout=0.5,
        dropout_before=(1, 2),
        rngs=rngs,
    )


def _alexnet_head(d, c, *, rngs):
    return PoolMLPHead(
        d,
        c,
        hidden=(4096, 4096),
        pooled_size=(6, 6),
        pool_window=3,
        pool_stride=2,
        dropout=0.5,
        dropout_before=(0, 1),
        rngs=rngs,
    )


def _linear_head(d, c, *, rngs):
    return PoolMLPHead(d, c, rngs=rngs)


def _vit_b(patch: int) -> ArchSpec:
    """torchvision's ViT-B/``patch`` (width 768, 12 heads, MLP 3072, 12 layers) at 224 px only."""

    def head(d, c, *, rngs):
        return ViTHead(d, c, num_heads=12, mlp_dim=3072, rngs=rngs)

    return ArchSpec(lambda **kw: ViT(patch_size=patch, **kw), head, 224, torchvision=vit_entries, fixed_size=True)


ARCHS: dict[str, ArchSpec] = {
    "vgg16": ArchSpec(lambda **kw: backbones.VGG(batch_norm=False, **kw), _vgg_head, 224),
    "vgg16_bn": ArchSpec(lambda **kw: backbones.VGG(batch_norm=True, **kw), _vgg_head, 224),
    "resnet50": ArchSpec(lambda **kw: backbones.ResNet((3, 4, 6, 3), **kw), _linear_head, 224),
    # torchvision's IMAGENET1K_V1 weights: resize the shorter side (bilinear, antialiased) then centre-crop 224
    "resnet18": ArchSpec(functools.partial(backbones.resnet, "resnet18"), _linear_head, 224, resize=256),
    "resnet34": ArchSpec(functools.partial(backbones.resnet, "resnet34"), _linear_head, 224, resize=256),
    "resnet101": ArchSpec(functools.partial(backbones.resnet, "resnet101"), _linear_head, 224, resize=256),
    "resnet152": ArchSpec(functools.partial(backbones.resnet, "resnet152"), _linear_head, 224, resize=256),
    **{
        arch: ArchSpec(
            functools.partial(convnext.convnext, arch),
            convnext.class_head,
            224,
            torchvision=convnext.torchvision_entries,
            resize=resize,
        )
        for arch, resize in (("convnext_tiny", 236), ("convnext_small", 230), ("convnext_base", 232))
    },
    "alexnet": ArchSpec(lambda **kw: backbones.AlexNet(**kw), _alexnet_head, 224),
    "small": ArchSpec(lambda **kw: backbones.SmallCNN(**kw), _linear_head, 128),
    # torchvision IMAGENET1K_V1 weights: ViT-B resize 256 (bilinear) crop 224; swin_t resize 232 (bicubic) crop 224
    "vit_b_16": _vit_b(16),
    "vit_b_32": _vit_b(32),
    "swin_t": ArchSpec(lambda **kw: Swin(**kw), swin_head, 224, torchvision=swin_entries, resize=232, crop=224),
}

weights.KEY_MAPS.update({name: spec.torchvision for name, spec in ARCHS.items() if spec.torchvision is not None})


def create_model(
    arch: str,
    num_classes: int,
    *,
    hardness: str = "head",
    hardness_hidden: int = 512,
    dtype=None,
    rngs: nnx.Rngs | None = None,
) -> DeliberativeModel:
    """Build ``arch`` with a ``num_classes`` class head and a hardness predictor.

    hardness: 'head' (default; a jointly trained head on A), 'network' (a separate backbone of the same
    architecture with its own head, as in the authors' code) or 'none'. dtype: compute dtype of the backbone
    (e.g. jnp.bfloat16); heads and parameters stay float32.

    The model is returned in eval mode, ready for inference: batch norm uses (and never updates) its running
    statistics, so imported ImageNet statistics (`load_torchvision`) stay as they are. ``model.train()`` switches to
    batch statistics and dropout, for training only.
    """
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; choose one of {', '.join(ARCHS)}")
    if hardness not in ("head", "network", "none"):
        raise ValueError(f"hardness must be 'head', 'network' or 'none', got {hardness!r}")
    if num_classes < 2:
        raise ValueError(f"num_classes must be at least 2, got {num_classes}")
    rngs = rngs if rngs is not None else nnx.Rngs(0)
    spec = ARCHS[arch]
    backbone = spec.backbone(dtype=dtype, rngs=rngs)
    d = backbone.out_channels
    classifier = spec.head(d, num_classes, rngs=rngs)
    kwargs = {}
    if hardness == "head":
        kwargs["hardness_head"] = hardness_head(d, hidden=hardness_hidden, rngs=rngs)
    elif hardness == "network":
        kwargs["hardness_network"] = HardnessNetwork(
            spec.backbone(dtype=dtype, rngs=rngs), hardness_head(d, hidden=hardness_hidden, rngs=rngs)
        )
    model = DeliberativeModel(backbone, classifier, arch=arch, **kwargs)
    model.eval()
    return model


def count_params(model: nnx.Module) -> int:
    """Number of trainable parameters (nnx.Param leaves; batch-norm running statistics excluded, as in torch)."""
    return sum(int(x.size) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


@dataclass(frozen=True)
class Structure:
    """The static half of a split module (hashable, so it can key a compilation cache); `merge` rebuilds the module
    from its weight leaves inside a traced function."""

    graphdef: nnx.GraphDef
    treedef: jax.tree_util.PyTreeDef

    def merge(self, leaves: Sequence[jax.Array]) -> nnx.Module:
        return nnx.merge(self.graphdef, jax.tree.unflatten(self.treedef, leaves))


def split_leaves(model: nnx.Module) -> tuple[Structure, list[jax.Array]]:
    """(structure, flat list of weight arrays) for passing a model to a jitted function.

    A flat list of arrays crosses the jit boundary ~4x faster than the nested nnx.State (ResNet50, 275 leaves:
    0.16 ms against 0.75 ms per call on the 2-core CPU), which matters on an accelerator, where host time per call
    adds to every batch."""
    graphdef, state = nnx.split(model)
    leaves, treedef = jax.tree.flatten(state)
    return Structure(graphdef, treedef), leaves


@functools.lru_cache(maxsize=32)
def _compiled_forward(structure: Structure) -> Callable:
    """One jitted (weight leaves, images) -> Outputs per model structure, reused by every call."""
    return jax.jit(lambda leaves, x: structure.merge(leaves)(x))


def make_predict_fn(model: DeliberativeModel, *, precision: str | None = None) -> Callable[[jax.Array], Outputs]:
    """A compiled eval-mode forward pass images (B, H, W, 3) -> Outputs for ``model`` (split once, batch norm folded
    into the convolutions: `inference_model`; the model's own mode is left as it is). precision: the backbone's
    compute dtype, 'float32' or 'bfloat16' (None: the model's own)."""
    structure, leaves = split_leaves(inference_model(model, precision=precision))
    run = _compiled_forward(structure)
    return lambda images: run(leaves, images)


def predict(model: DeliberativeModel, images: jax.Array) -> Outputs:
    """Jit-compiled eval-mode forward pass: images (B, H, W, 3) -> Outputs (logits, hardness logit, A).

    Runs the model with its running batch-norm statistics and no dropout, whatever its mode (which is left as it
    is), and checks the images first. The compiled function is shared by models of one structure."""
    from delib_jax.models._layers import validate_images

    validate_images(images)
    return make_predict_fn(model)(jnp.asarray(images))


__all__ = [
    "ARCHS",
    "ArchSpec",
    "DeliberativeModel",
    "HardnessNetwork",
    "Outputs",
    "PRECISIONS",
    "PoolMLPHead",
    "Structure",
    "count_params",
    "create_model",
    "fold_batch_norm",
    "hardness_head",
    "inference_model",
    "inference_view",
    "load_torchvision",
    "set_precision",
    "make_predict_fn",
    "predict",
    "read_state_dict",
    "split_leaves",
]
