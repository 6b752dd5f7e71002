"""Integrated Hessians against the peer, path-explain's PyTorch explainer, on the same weights, inputs, baseline and
softplus beta (a small MLP mirrored in JAX). path-explain integrates by sqrt(K) x sqrt(K) equally spaced points
(endpoints included): an O(1 / sqrt(K)) error, which the comparison estimates from two sample sizes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from delib_jax.attribution import integrated_hessians, softplus_surrogate
from delib_jax.testing.path_explain import mlp_torch, path_explainer_torch

torch = pytest.importorskip("torch")
PathExplainerTorch, REASON = path_explainer_torch()
pytestmark = pytest.mark.skipif(PathExplainerTorch is None, reason=str(REASON))

D, H, C, BETA = 6, 10, 3, 4.0


def _weights(seed=0):
    rng = np.random.RandomState(seed)
    return [rng.randn(*s).astype(np.float32) * 0.8 for s in ((D, H), (H,), (H, C), (C,))]


def _torch_model(w):
    return mlp_torch(w, BETA)


def _jax_relu_head(w):
    """X (B, 1, D, 1) -> logits: one location per input feature, the ReLU MLP (made softplus by ``beta``)."""
    w = [jnp.asarray(a) for a in w]
    return lambda x: jax.nn.relu(x.reshape(x.shape[0], D) @ w[0] + w[1]) @ w[2] + w[3]


def _path_explain(model, x, base, targets, k):
    torch.manual_seed(0)
    explainer = PathExplainerTorch(model)
    xt = torch.from_numpy(x).requires_grad_(True)
    out = explainer.interactions(
        xt, torch.from_numpy(base[None]), num_samples=k * k, use_expectation=False,
        output_indices=torch.from_numpy(targets), verbose=False,
    )  # fmt: skip
    return out.detach().numpy()


@pytest.mark.slow
def test_integrated_hessians_equal_path_explain_within_its_quadrature_error():
    w = _weights()
    rng = np.random.RandomState(1)
    x = rng.randn(4, D).astype(np.float32)
    base = (0.2 * rng.randn(D)).astype(np.float32)
    targets = np.array([0, 2, 1, 2])
    head = _jax_relu_head(w)
    ours = integrated_hessians(
        None, head, jnp.asarray(x).reshape(4, 1, D, 1), baseline=jnp.asarray(base).reshape(1, D, 1), output="logits",
        targets=jnp.asarray(targets)[:, None], beta=BETA, nodes=32,
    )  # fmt: skip
    ours_v = np.asarray(ours.values[:, 0])  # (B, D, D)
    assert np.abs(np.asarray(ours.residual)).max() < 1e-4 * np.abs(np.asarray(ours.difference)).max()
    # the surrogate is the torch model: same logits
    torch_logits = _torch_model(w)(torch.from_numpy(x)).detach().numpy()
    np.testing.assert_allclose(softplus_surrogate(head, BETA)(jnp.asarray(x)), torch_logits, rtol=1e-5, atol=1e-5)
    model = _torch_model(w)
    pe = {k: _path_explain(model, x, base, targets, k) for k in (10, 20, 40)}
    err = {k: np.abs(v - ours_v).max() for k, v in pe.items()}
    scale = np.abs(ours_v).max()
    # path-explain's error shrinks as 1 / k toward ours, and is within its own two-size estimate
    assert err[40] < 0.7 * err[20] < 0.7 * 0.7 * err[10], err
    assert err[40] <= 2.5 * np.abs(pe[40] - pe[20]).max() + 1e-5 * scale
    assert err[40] < 0.1 * scale
