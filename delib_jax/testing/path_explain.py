"""The peer implementation of Integrated Hessians: path-explain's PyTorch explainer (Janizek et al.), loaded by file.

path-explain 0.0.7's package ``__init__`` imports TensorFlow (not installed beside the CPU PyTorch build here), so
`path_explainer_torch` loads its torch module directly; None with the reason where the package is absent. Its
explainer takes 2-D inputs only: `conv_net_torch_flat` wraps a small CNN (`conv_net` in JAX, same weights) in a module
on flat (B, H * W * C) inputs, so that it computes the full pixel-channel interaction matrix of an image.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np


def path_explainer_torch():
    """(PathExplainerTorch class, None) or (None, the one-line reason it is unavailable)."""
    try:
        spec = importlib.util.find_spec("path_explain")
    except (ImportError, ValueError) as e:  # pragma: no cover - a broken install
        return None, f"path-explain not importable: {e}"
    if spec is None or not spec.submodule_search_locations:
        return None, "path-explain is not installed (pip install path-explain==0.0.7)"
    file = Path(next(iter(spec.submodule_search_locations))) / "explainers" / "path_explainer_torch.py"
    if not file.is_file():
        return None, f"path-explain has no PyTorch explainer at {file}"
    try:
        module_spec = importlib.util.spec_from_file_location("_path_explainer_torch", file)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
    except ImportError as e:
        return None, f"path-explain's PyTorch explainer does not import: {e}"
    return module.PathExplainerTorch, None


def conv_weights(seed: int = 0, widths: tuple[int, int] = (8, 16), classes: int = 10) -> list[np.ndarray]:
    """float32 weights of `conv_net`: two 3x3 convolutions (HWIO kernels, biases) and a linear layer (D, K), bias."""
    rng = np.random.RandomState(seed)
    (c1, c2), w = widths, []
    for cin, cout in ((3, c1), (c1, c2)):
        w += [rng.randn(3, 3, cin, cout) * np.sqrt(2.0 / (9 * cin)), rng.randn(cout) * 0.1]
    w += [rng.randn(c2, classes) / np.sqrt(c2), rng.randn(classes) * 0.1]
    return [a.astype(np.float32) for a in w]


def conv_net(weights: list[np.ndarray]):
    """images (B, H, W, 3) -> logits (B, K) in JAX, H and W even: conv 3x3, ReLU, 2x2 average pool, conv 3x3, ReLU,
    global mean, linear (the small CNN's pattern without batch norm; an average pool, as a max pool's gradient jumps
    where its maximum switches, which no surrogate of ReLU smooths and no Hessian-vector product sees)."""
    import jax
    import jax.numpy as jnp

    k1, b1, k2, b2, lw, lb = (jnp.asarray(a) for a in weights)

    def conv(x, k, b):
        return jax.lax.conv_general_dilated(x, k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")) + b

    def fn(x):
        y = jax.nn.relu(conv(x, k1, b1))
        b, h, w, c = y.shape
        y = y.reshape(b, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4))
        y = jax.nn.relu(conv(y, k2, b2))
        return jnp.mean(y, axis=(1, 2)) @ lw + lb

    return fn


def mlp_torch(weights: list[np.ndarray], beta: float):
    """A two-layer MLP in PyTorch from weights (D, H), (H,), (H, C), (C,) laid out as in JAX (x @ W + b), with
    Softplus(beta) between: the softplus surrogate of the same ReLU MLP, for path-explain."""
    import torch

    (d, hidden), (_, classes) = weights[0].shape, weights[2].shape
    lin1, lin2 = torch.nn.Linear(d, hidden), torch.nn.Linear(hidden, classes)
    with torch.no_grad():
        lin1.weight.copy_(torch.from_numpy(weights[0].T.copy()))
        lin1.bias.copy_(torch.from_numpy(weights[1]))
        lin2.weight.copy_(torch.from_numpy(weights[2].T.copy()))
        lin2.bias.copy_(torch.from_numpy(weights[3]))
    return torch.nn.Sequential(lin1, torch.nn.Softplus(beta=beta), lin2).eval()


def conv_net_torch_flat(weights: list[np.ndarray], shape: tuple[int, int, int], beta: float | None = None):
    """The same network in PyTorch on flat inputs (B, H * W * C) (the images' (H, W, C) row-major order), reshaped
    inside, so that path-explain's 2-D-only explainer sees every pixel channel as a feature; ReLU -> Softplus(beta)."""
    import torch

    h, w, c = shape
    k1, b1, k2, b2, lw, lb = (torch.from_numpy(np.ascontiguousarray(a)) for a in weights)

    class Flat(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = torch.nn.Conv2d(c, k1.shape[3], 3, padding=1)
            self.conv2 = torch.nn.Conv2d(k1.shape[3], k2.shape[3], 3, padding=1)
            self.linear = torch.nn.Linear(lw.shape[0], lw.shape[1])
            self.act = torch.nn.ReLU() if beta is None else torch.nn.Softplus(beta=beta)
            with torch.no_grad():
                self.conv1.weight.copy_(k1.permute(3, 2, 0, 1))  # HWIO -> OIHW
                self.conv1.bias.copy_(b1)
                self.conv2.weight.copy_(k2.permute(3, 2, 0, 1))
                self.conv2.bias.copy_(b2)
                self.linear.weight.copy_(lw.T)
                self.linear.bias.copy_(lb)

        def forward(self, x):
            y = x.reshape(x.shape[0], h, w, c).permute(0, 3, 1, 2)
            y = self.act(self.conv1(y))
            b, d, hh, ww = y.shape
            y = y.reshape(b, d, hh // 2, 2, ww // 2, 2).mean(dim=(3, 5))  # not avg_pool2d: its double backward is slow
            y = self.act(self.conv2(y))
            return self.linear(y.mean(dim=(2, 3)))

    return Flat().eval()
