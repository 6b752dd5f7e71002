"""Import ImageNet weights from torchvision-format state dicts (.safetensors, .npz, or .pth through torch).

Nothing is downloaded: users bring the file. Conversions: Conv (O, I, kh, kw) -> (kh, kw, I, O); Linear W -> W.T;
the first Linear after a pooled grid flattens NCHW in torch and NHWC here, so its rows are permuted; BatchNorm
weight / bias / running_mean / running_var -> scale / bias / mean / var. Kind 'constant': a buffer the model
recomputes (Swin's relative_position_index), optional in the file, compared with the model's value and not loaded.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from flax import nnx

from delib_jax.models.backbones import VGG, Bottleneck
from delib_jax.models.deliberative import DeliberativeModel

# (torch key, path of the NNX variable inside the module, conversion kind)
Entry = tuple[str, tuple, str]

# arch -> key map ``(model, backbone_root) -> entries`` of the families defined with theirs beside them (ConvNeXt,
# Swin, ViT), filled by `delib_jax.models` from its registry (ArchSpec.torchvision); the first architectures' maps
# are the functions below.
KEY_MAPS: dict[str, Callable[..., Iterable[Entry]]] = {}


def bn_entries(prefix: str, path: tuple) -> Iterator[Entry]:
    """A torch BatchNorm2d at ``prefix`` -> an nnx.BatchNorm at ``path``."""
    for t, ours in (("weight", "scale"), ("bias", "bias"), ("running_mean", "mean"), ("running_var", "var")):
        yield f"{prefix}.{t}", (*path, ours), "copy"


def conv_entries(prefix: str, path: tuple, bias: bool = True) -> Iterator[Entry]:
    """A torch Conv2d (O, I, kh, kw) -> an nnx.Conv kernel (kh, kw, I, O) (depthwise ones too: I = 1)."""
    yield f"{prefix}.weight", (*path, "kernel"), "conv"
    if bias:
        yield f"{prefix}.bias", (*path, "bias"), "copy"


def linear_entries(prefix: str, path: tuple, kind: str = "linear") -> Iterator[Entry]:
    """A torch Linear (O, I) -> an nnx.Linear kernel (I, O)."""
    yield f"{prefix}.weight", (*path, "kernel"), kind
    yield f"{prefix}.bias", (*path, "bias"), "copy"


def _vgg_entries(model: DeliberativeModel, backbone: VGG, root: tuple) -> Iterator[Entry]:
    idx, i = 0, 0
    for c in backbone.config:
        if c == "M":
            idx += 1
            continue
        yield from conv_entries(f"features.{idx}", (*root, "convs", i))
        if backbone.norms is not None:
            yield from bn_entries(f"features.{idx + 1}", (*root, "norms", i))
            idx += 3
        else:
            idx += 2
        i += 1


def _alexnet_entries(root: tuple) -> Iterator[Entry]:
    for i, idx in enumerate((0, 3, 6, 8, 10)):
        yield from conv_entries(f"features.{idx}", (*root, "convs", i))


def _resnet_entries(backbone, root: tuple) -> Iterator[Entry]:
    """Any torchvision ResNet: conv1 / bn1, then layer{s}.{i}.conv{k} / bn{k} (k to 3 in a Bottleneck, to 2 in a
    BasicBlock) and downsample.0 / .1 where a block changes shape."""
    yield from conv_entries("conv1", (*root, "conv1"), bias=False)
    yield from bn_entries("bn1", (*root, "bn1"))
    for s, stage in enumerate(backbone.layers):
        for b, block in enumerate(stage):
            p, path = f"layer{s + 1}.{b}", (*root, "layers", s, b)
            for k in (1, 2, 3) if isinstance(block, Bottleneck) else (1, 2):
                yield from conv_entries(f"{p}.conv{k}", (*path, f"conv{k}"), bias=False)
                yield from bn_entries(f"{p}.bn{k}", (*path, f"bn{k}"))
            if block.downsample_conv is not None:
                yield from conv_entries(f"{p}.downsample.0", (*path, "downsample_conv"), bias=False)
                yield from bn_entries(f"{p}.downsample.1", (*path, "downsample_bn"))


def torchvision_entries(model: DeliberativeModel, *, backbone_root: tuple = ("backbone",)) -> list[Entry]:
    """The full key map of ``model``'s backbone and class head to torchvision names."""
    arch = model.arch
    backbone = model.backbone
    if arch in KEY_MAPS:
        return list(KEY_MAPS[arch](model, backbone_root))
    if arch in ("vgg16", "vgg16_bn"):
        entries = list(_vgg_entries(model, backbone, backbone_root))
        head = [("classifier.0", "fc6"), ("classifier.3", ""), ("classifier.6", "")]
    elif arch == "alexnet":
        entries = list(_alexnet_entries(backbone_root))
        head = [("classifier.1", "fc6"), ("classifier.4", ""), ("classifier.6", "")]
    elif arch.startswith("resnet"):
        entries = list(_resnet_entries(backbone, backbone_root))
        head = [("fc", "")]
    else:
        raise ValueError(
            f"no torchvision weights exist for arch {arch!r} (only vgg16, vgg16_bn, the resnets, alexnet and the "
            "architectures registered with a key map)"
        )
    for i, (prefix, kind) in enumerate(head):
        entries += linear_entries(prefix, ("classifier", "linears", i), "linear_nchw" if kind == "fc6" else "linear")
    return entries


def output_layer(head) -> tuple:
    """Path inside a class head of its last Linear (the one ImageNet's 1,000 classes live in): a head's own
    ``output_layer`` attribute, else the last of a `PoolMLPHead`'s ``linears``."""
    path = getattr(head, "output_layer", None)
    if path is not None:
        return tuple(path)
    return ("linears", len(head.linears) - 1)


def read_state_dict(path: str | Path) -> dict[str, np.ndarray]:
    """Read a torchvision-format state dict from .safetensors, .npz or (with torch installed) .pth / .pt.

    Raises FileNotFoundError for a missing file, ValueError (one line naming the file) for an unsupported or
    unreadable one."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    suffix = path.suffix.lower()
    if suffix not in (".safetensors", ".npz", ".pth", ".pt"):
        raise ValueError(f"{path.name}: unsupported weights format {suffix!r}; use .safetensors, .npz or .pth")
    if suffix in (".pth", ".pt"):
        try:
            import torch  # noqa: F401
        except ImportError as e:
            raise ValueError(
                f"{path.name}: reading .pth needs torch; convert it to .safetensors or .npz instead"
            ) from e
    try:
        sd = _read(path, suffix)
    except Exception as e:  # each reader raises its own types (SafetensorError, BadZipFile, UnpicklingError, ...)
        reason = (str(e).strip().splitlines() or [""])[0]
        reason = reason if len(reason) <= 100 else reason[:100] + " ..."
        raise ValueError(
            f"weights file {path} is not a readable {suffix} state dict ({type(e).__name__}: {reason}): "
            "check the file (re-download or re-export it)"
        ) from None
    if not isinstance(sd, Mapping) or not all(isinstance(v, np.ndarray) for v in sd.values()):
        raise ValueError(f"weights file {path}: expected a state dict (a mapping of names to tensors)")
    # Checkpoints saved from DataParallel prefix every key with 'module.'.
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module.") :]: v for k, v in sd.items()}
    return sd


def _read(path: Path, suffix: str) -> object:
    """The contents of a weights file: a dict of numpy arrays, or whatever else a .pth file holds (checked by the
    caller)."""
    if suffix == ".safetensors":
        from safetensors.numpy import load_file

        return load_file(str(path))
    if suffix == ".npz":
        with np.load(path, allow_pickle=False) as f:
            return {k: f[k] for k in f.files}
    import warnings

    import torch

    with warnings.catch_warnings():  # a damaged file: torch's warnings would come before our one-line error
        warnings.simplefilter("ignore")
        obj = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        return obj
    return {k: v.detach().float().numpy() if v.is_floating_point() else v.numpy() for k, v in obj.items()}


def _convert(kind: str, w: np.ndarray) -> np.ndarray:
    """torch layout -> ours; arrays of unexpected rank pass through so that the shape check reports them."""
    if kind == "conv" and w.ndim == 4:
        return np.transpose(w, (2, 3, 1, 0))
    if kind.startswith("linear") and w.ndim == 2:
        return w.T
    return w


def _permute_fc6(w: np.ndarray, channels: int) -> np.ndarray:
    """torch (O, D*h*w) in NCHW order -> ours (h*w*D, O) in NHWC order."""
    out, flat = w.shape
    hw = flat // channels
    side = int(round(hw**0.5))
    return w.reshape(out, channels, side, side).transpose(2, 3, 1, 0).reshape(flat, out)


def norm_entries(prefix: str, path: tuple) -> Iterator[Entry]:
    """A torch LayerNorm (weight, bias) -> an nnx.LayerNorm (scale, bias)."""
    yield f"{prefix}.weight", (*path, "scale"), "copy"
    yield f"{prefix}.bias", (*path, "bias"), "copy"


def _variable(module: nnx.Module, path: tuple) -> nnx.Variable:
    node = module
    for p in path:
        node = node[p] if isinstance(p, int) else getattr(node, p)
    return node


def load_torchvision(
    model: DeliberativeModel,
    weights: str | Path | Mapping[str, np.ndarray],
    *,
    classifier_output: bool = True,
    hardness_network: bool = True,
) -> DeliberativeModel:
    """Load a torchvision state dict into ``model`` in place (and return it).

    classifier_output=False leaves the last class-head Linear as initialised (ImageNet's 1000 classes -> your C);
    its keys may then be present or absent. With a separate hardness network, its backbone gets the same weights.
    Batch-norm running statistics are imported as they are; the model's mode is not changed (`create_model` returns
    eval mode, in which calling the model never updates them). Raises ValueError naming every missing, unexpected
    and mis-shaped key.
    """
    sd = dict(weights) if isinstance(weights, Mapping) else read_state_dict(weights)
    entries = torchvision_entries(model)
    skip = set()
    if not classifier_output:
        last = ("classifier", *output_layer(model.classifier))
        skip = {k for k, path, _ in entries if path[: len(last)] == last}
    expected = {k for k, _, _ in entries}
    ignorable = {k for k in sd if k.endswith("num_batches_tracked")}
    optional = {k for k, _, kind in entries if kind == "constant"}  # buffers the model recomputes
    missing = sorted(k for k in expected - skip - optional if k not in sd)
    unexpected = sorted(k for k in sd if k not in expected and k not in ignorable)
    channels = model.backbone.out_channels
    updates, misshaped = [], []
    for key, path, kind in entries:
        if key in skip or key not in sd:
            continue
        var = _variable(model, path)
        target = tuple(var.shape)
        w = np.asarray(sd[key], dtype=np.float32)
        if kind == "linear_nchw" and w.ndim == 2 and w.shape[1] == target[0] and w.shape[1] % channels == 0:
            new = _permute_fc6(w, channels)
        elif kind == "reshape" and w.size == int(np.prod(target)):  # e.g. ConvNeXt's layer scale (D, 1, 1) -> (D,)
            new = w.reshape(target)
        else:
            new = _convert(kind, w)
        if new.shape != target:
            misshaped.append(f"{key}: file has {tuple(sd[key].shape)}, model needs {_torch_shape(kind, target)}")
            continue
        if kind == "constant":  # compared, not loaded (e.g. Swin's relative_position_index)
            if not np.array_equal(new, np.asarray(var, np.float32)):
                misshaped.append(f"{key}: file's values differ from the constant the model computes")
            continue
        updates.append((path, new))
    if missing or unexpected or misshaped:
        source = "" if isinstance(weights, Mapping) else f"{weights}: "
        raise ValueError(source + _report(model.arch, missing, unexpected, misshaped, classifier_output))
    for path, new in updates:
        _variable(model, path).set_value(jnp.asarray(new))
        if hardness_network and model.hardness_network is not None and path[0] == "backbone":
            _variable(model.hardness_network, path).set_value(jnp.asarray(new))
    return model


def _torch_shape(kind: str, target: tuple) -> tuple:
    if kind == "conv" and len(target) == 4:
        kh, kw, i, o = target
        return (o, i, kh, kw)
    if kind.startswith("linear") and len(target) == 2:
        return (target[1], target[0])
    return target


def _report(arch: str, missing, unexpected, misshaped, classifier_output: bool = True, limit: int = 8) -> str:
    """One line naming the mismatching keys (a CLI prints it as its error)."""

    def part(name, items):
        if not items:
            return ""
        shown = ", ".join(items[:limit]) + (f" ... ({len(items) - limit} more)" if len(items) > limit else "")
        return f"; {name} ({len(items)}): {shown}"

    hint = "is this a torchvision state dict of that architecture (--arch)?"
    if classifier_output:
        hint += " For a different number of classes pass classifier_output=False."
    return (
        f"weights do not match torchvision's {arch}"
        + part("missing keys", missing)
        + part("unexpected keys", unexpected)
        + part("mis-shaped keys", misshaped)
        + f" ({hint})"
    )
