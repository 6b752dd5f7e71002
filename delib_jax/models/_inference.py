"""The inference copy of a model: eval-mode batch norm folded into the convolutions, and the backbone's precision.

Every compiled inference entry point (`make_predict_fn`, `delib_jax.attribution.make_attribute_fn`,
`delib_jax.explanation.make_explain_fn`) runs `inference_model(model)`, built once per function: eval-mode batch norm
is an affine map per channel, so it is folded into the convolution before it (kernel * s, (bias - mean) * s + beta
with s = gamma / sqrt(var + eps)) and the batch-norm layer becomes the identity. The compiled pass then takes half the
weight arrays as arguments and has no normalisation arithmetic left; the caller's model is never changed.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from delib_jax.models import _layers, backbones

PRECISIONS = {"float32": None, "bfloat16": jnp.bfloat16}


def _fold(conv: nnx.Conv, bn: nnx.BatchNorm) -> None:
    """Give ``conv`` (kh, kw, I, O) the kernel and bias of conv followed by eval-mode ``bn`` (fresh arrays)."""
    kernel = conv.kernel[...]
    scale = jax.lax.rsqrt(bn.var[...] + jnp.asarray(bn.epsilon, bn.var.dtype))
    if bn.scale is not None:
        scale = scale * bn.scale[...]
    bias = -bn.mean[...] if conv.bias is None else conv.bias[...] - bn.mean[...]
    bias = bias * scale
    if bn.bias is not None:
        bias = bias + bn.bias[...]
    conv.kernel = nnx.Param(kernel * scale.astype(kernel.dtype))
    conv.bias = nnx.Param(bias.astype(kernel.dtype))
    conv.use_bias = True


def _fold_backbone(backbone: nnx.Module) -> None:
    """Fold every (convolution, batch norm) pair of a shipped backbone in place (a copy: see `fold_batch_norm`)."""
    if isinstance(backbone, (backbones.VGG, backbones.SmallCNN)) and backbone.norms is not None:
        for i, (conv, bn) in enumerate(zip(backbone.convs, backbone.norms)):
            _fold(conv, bn)
            backbone.norms[i] = _layers.Identity()
    elif isinstance(backbone, backbones.ResNet):
        _fold(backbone.conv1, backbone.bn1)
        backbone.bn1 = _layers.Identity()
        for stage in backbone.layers:
            for block in stage:  # a Bottleneck has conv3 / bn3, a BasicBlock does not
                for conv, bn in (
                    ("conv1", "bn1"),
                    ("conv2", "bn2"),
                    ("conv3", "bn3"),
                    ("downsample_conv", "downsample_bn"),
                ):
                    if getattr(block, conv, None) is not None:
                        _fold(getattr(block, conv), getattr(block, bn))
                        setattr(block, bn, _layers.Identity())
    # other backbones (AlexNet, VGG16 without batch norm, ConvNeXt's layer norms, user modules) have nothing to fold


def inference_view(module: nnx.Module) -> nnx.Module:
    """``module`` in eval mode (running batch-norm statistics, no dropout), sharing its arrays; ``module`` itself
    keeps its mode. What every inference entry point runs, so that a model or head left in train mode neither
    computes with batch statistics nor has its running statistics overwritten."""
    return nnx.view(module, deterministic=True, use_running_average=True, raise_if_not_found=False)


def _backbones(model: nnx.Module) -> list[nnx.Module]:
    found = [model.backbone]
    if getattr(model, "hardness_network", None) is not None:
        found.append(model.hardness_network.backbone)
    return found


def fold_batch_norm(model: nnx.Module) -> nnx.Module:
    """An eval-mode copy of a `DeliberativeModel` whose backbone convolutions absorb their batch norms (which become
    identities). Equal to the model in eval mode within rounding; ``model`` itself (and its mode) is left unchanged."""
    copy = nnx.merge(*nnx.split(inference_view(model)))  # new module objects over the same (immutable) arrays
    for backbone in _backbones(copy):
        _fold_backbone(backbone)
    return copy


def set_precision(model: nnx.Module, precision: str) -> nnx.Module:
    """Make the backbone convolutions and batch norms (and ConvNeXt's Linears) of ``model`` (in place: pass a copy)
    compute in ``precision`` ('float32' or 'bfloat16'); parameters stay float32, A is cast back to float32 and the
    heads and every attribution step stay float32."""
    check_precision(precision)
    dtype = PRECISIONS[precision]
    for backbone in _backbones(model):
        # a backbone may name the layers that carry its arithmetic (ConvNeXt: its pointwise Linears too)
        kinds = getattr(backbone, "precision_layers", (nnx.Conv, nnx.BatchNorm))
        for _, node in nnx.iter_graph(backbone):
            if isinstance(node, kinds):
                node.dtype = dtype
    return model


def check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    return precision


def inference_model(model: nnx.Module, *, fold: bool = True, precision: str | None = None) -> nnx.Module:
    """What the compiled inference functions run: an eval-mode copy of ``model`` with batch norm folded (``fold``)
    and, with ``precision`` ('float32' or 'bfloat16'; None keeps the model's own), the backbone's compute dtype set.
    ``model`` is left as it is."""
    if precision is not None:
        check_precision(precision)
    copy = fold_batch_norm(model) if fold else nnx.merge(*nnx.split(inference_view(model)))
    return copy if precision is None else set_precision(copy, precision)
