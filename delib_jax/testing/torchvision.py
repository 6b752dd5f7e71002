"""Real torchvision beside the CPU build of torch, for the tests that prove our imports equal its models.

PyPI's torchvision wheel is built for CUDA torch: beside the CPU torch its C++ operators do not register and
``import torchvision`` fails in ``_meta_registrations`` ("operator torchvision::nms does not exist"). Its model
definitions are pure Python, so defining the two operator schemas that module registers fakes for lets the import
through; detection operators stay unavailable, classification models build with ``weights=None``.
"""

from __future__ import annotations

import functools

import numpy as np


@functools.cache
def torchvision():
    """The torchvision module (raises ImportError where torch or torchvision is not installed)."""
    import torch

    try:
        import torchvision as tv

        return tv
    except RuntimeError:  # the operator schemas are missing: define them (once per process) and import again
        pass
    global _LIBRARY
    _LIBRARY = torch.library.Library("torchvision", "DEF")  # kept alive: the schemas live as long as the library
    for op in ("nms", "qnms"):
        _LIBRARY.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    import sys

    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[name]  # a half-finished first import
    import torchvision as tv

    return tv


_LIBRARY = None


def build(arch: str, *, num_classes: int = 1000, seed: int = 0, randomise_batch_norm: bool = True):
    """torchvision's ``arch`` with random weights (``weights=None``) in eval mode; batch-norm running statistics
    randomised so that importing them is tested too."""
    import torch

    tv = torchvision()
    torch.manual_seed(seed)
    model = getattr(tv.models, arch)(weights=None, num_classes=num_classes)
    if randomise_batch_norm:
        rng = np.random.RandomState(seed)
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(torch.from_numpy(rng.randn(m.num_features).astype(np.float32) * 0.1))
                m.running_var.copy_(torch.from_numpy(rng.uniform(0.5, 1.5, m.num_features).astype(np.float32)))
    return model.eval()


def state_dict_numpy(model) -> dict[str, np.ndarray]:
    """A torch module's state dict as float32 / integer numpy arrays (what `load_torchvision` reads)."""
    return {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}


def logits(model, images_nhwc: np.ndarray) -> np.ndarray:
    """The torch model's logits on NHWC float32 images."""
    import torch

    with torch.no_grad():
        return model(torch.from_numpy(np.ascontiguousarray(images_nhwc.transpose(0, 3, 1, 2)))).numpy()


def randomise(model, seed: int = 0):
    """Noise on every floating parameter of a torch model, so that a mis-mapped one shows: LayerNorm weights and
    biases, biases, class token, position embedding, relative position bias table (scale 0.2-0.5), weight matrices
    (half their fan-in scale; torchvision starts ViT's head at zero)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if "class_token" in name or "pos_embedding" in name or "relative_position_bias_table" in name:
                p.add_(0.5 * noise)
            elif p.ndim == 1:
                p.add_(0.2 * noise)
            else:
                p.add_(noise * 0.5 / np.sqrt(p[0].numel()))
    return model.eval()


def torch_tiny_vit(num_classes: int = 5):
    """torchvision's VisionTransformer at a tiny size (32 px, patch 8: a 4 x 4 grid; 3 blocks of width 16, 2 heads),
    every parameter randomised: the reference for `delib_jax.models.vit.ViT(image_size=32, patch_size=8, width=16,
    depth=3, num_heads=2, mlp_dim=24)`."""
    import torch

    torch.manual_seed(0)
    net = torchvision().models.VisionTransformer(
        image_size=32, patch_size=8, num_layers=3, num_heads=2, hidden_dim=16, mlp_dim=24, num_classes=num_classes
    )
    return randomise(net)
