"""Integrated Hessians of an image's pixel channels against path-explain's PyTorch explainer on the same small CNN
(same weights, input, baseline and softplus beta): its explainer takes 2-D inputs only, so the torch network takes
flat (B, H * W * C) inputs and reshapes inside (`conv_net_torch_flat`); ours sees X = the image flattened to one
location per pixel channel, so both compute the full (H W C) x (H W C) matrix."""

import jax.numpy as jnp
import numpy as np
import pytest

from delib_jax.attribution import integrated_hessians, softplus_surrogate
from delib_jax.testing.path_explain import conv_net, conv_net_torch_flat, conv_weights, path_explainer_torch

torch = pytest.importorskip("torch")
PathExplainerTorch, REASON = path_explainer_torch()
pytestmark = pytest.mark.skipif(PathExplainerTorch is None, reason=str(REASON))

SHAPE, BETA, TARGET = (2, 2, 3), 4.0, 2  # path-explain's cost grows as D k^3: a tiny image
D = int(np.prod(SHAPE))


def _ours(fn, x, base, nodes):
    """Full D x D Integrated Hessians of logit TARGET, X = the image as (B, 1, D, 1)."""
    b = x.shape[0]
    return integrated_hessians(
        lambda im: im.reshape(im.shape[0], 1, D, 1), lambda y: fn(y.reshape(y.shape[0], *SHAPE)),
        jnp.asarray(x), baseline=jnp.asarray(base).reshape(1, D, 1), output="logits",
        targets=jnp.full((b, 1), TARGET), beta=BETA, nodes=nodes,
    )  # fmt: skip


def _path_explain(model, x, base, k):
    explainer = PathExplainerTorch(model)
    xt = torch.from_numpy(x.reshape(x.shape[0], D)).requires_grad_(True)
    out = explainer.interactions(
        xt, torch.from_numpy(base.reshape(1, D)), num_samples=k * k, use_expectation=False,
        output_indices=torch.full((x.shape[0],), TARGET), verbose=False,
    )  # fmt: skip
    return out.detach().numpy()


def test_flat_torch_network_is_the_jax_surrogate_on_the_same_weights():
    w = conv_weights(0)
    x = np.random.RandomState(1).randn(3, *SHAPE).astype(np.float32)
    fn = conv_net(w)
    for beta in (None, BETA):
        got = conv_net_torch_flat(w, SHAPE, beta)(torch.from_numpy(x.reshape(3, D))).detach().numpy()
        want = fn(jnp.asarray(x)) if beta is None else softplus_surrogate(fn, beta)(jnp.asarray(x))
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_integrated_hessians_of_an_image_equal_path_explain_within_its_quadrature_error():
    w = conv_weights(0)
    rng = np.random.RandomState(2)
    x = rng.randn(1, *SHAPE).astype(np.float32)
    base = (0.2 * rng.randn(*SHAPE)).astype(np.float32)
    fn = conv_net(w)
    ours = _ours(fn, x, base, 32)
    ours_v = np.asarray(ours.values[0, 0])  # (D, D)
    assert ours_v.shape == (D, D)
    assert abs(float(ours.residual[0, 0])) < 1e-4 * abs(float(ours.difference[0, 0]))
    model = conv_net_torch_flat(w, SHAPE, BETA)
    pe = {k: _path_explain(model, x, base, k)[0] for k in (4, 8)}
    err = {k: np.abs(v - ours_v).max() for k, v in pe.items()}
    scale = np.abs(ours_v).max()
    # path-explain's error shrinks as 1 / k toward ours, and is within its own two-size estimate
    assert err[8] < 0.7 * err[4], err
    assert err[8] <= 2.5 * np.abs(pe[8] - pe[4]).max() + 1e-5 * scale
    assert err[8] < 0.2 * scale
