"""The ViT maps against PyTorch autograd on real torchvision with the same weights: torchvision's VisionTransformer
(tiny, every parameter random) split by hand at the patch tokens entering its last block, the class token held
fixed, and the per-location first and diagonal second-order terms of every class probability taken with
torch.func (forward over forward, one location at a time) in float64 -- against the structured ViT path."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from delib_jax.attribution import attribute
from delib_jax.models import DeliberativeModel, load_torchvision
from delib_jax.models.vit import ViT, ViTHead

torch = pytest.importorskip("torch")


def _torch_terms(net, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """first, second (B, C, h, w) of softmax(logits) at the patch tokens entering the last block, float64, by
    reverse over reverse: d/dt and d^2/dt^2 of probs(P + t E_l) at t = 0, output by output, location by location.

    (Not torch.func's forward over forward: through this model it gives wrong second derivatives -- e.g. -1.6e-4
    where double backward and finite differences agree on -3.0e-11 -- and the fused attention kernels have no
    derivatives of their own: the plain math attention path is used.)"""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    net = net.double()
    with torch.no_grad():
        tokens = net._process_input(torch.from_numpy(x.transpose(0, 3, 1, 2)).double())
        b = tokens.shape[0]
        tokens = torch.cat([net.class_token.expand(b, -1, -1), tokens], dim=1) + net.encoder.pos_embedding
        for layer in net.encoder.layers[:-1]:
            tokens = layer(tokens)
    cls, patches = tokens[:, :1], tokens[:, 1:]

    def probs(p):
        out = net.encoder.ln(net.encoder.layers[-1](torch.cat([cls, p], dim=1)))
        return torch.softmax(net.heads(out[:, 0]), dim=-1)

    n = patches.shape[1]
    first = np.zeros((b, net.heads.head.out_features, n))
    second = np.zeros_like(first)
    fast = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with sdpa_kernel([SDPBackend.MATH]):
            for loc in range(n):
                e = torch.zeros_like(patches)
                e[:, loc] = patches[:, loc]
                t = torch.zeros((), dtype=torch.float64, requires_grad=True)
                out = probs(patches + t * e)
                for i in range(b):
                    for c in range(out.shape[1]):
                        (g,) = torch.autograd.grad(out[i, c], t, create_graph=True, retain_graph=True)
                        (h,) = torch.autograd.grad(g, t, retain_graph=True)
                        first[i, c, loc], second[i, c, loc] = g.item(), h.item()
    finally:
        torch.backends.mha.set_fastpath_enabled(fast)
    side = int(round(n**0.5))
    return first.reshape(b, -1, side, side), second.reshape(b, -1, side, side)


@pytest.mark.slow  # torchvision and a per-location loop in torch
def test_vit_maps_equal_pytorch_autograd_on_torchvision():
    from delib_jax.testing.torchvision import state_dict_numpy, torch_tiny_vit

    net = torch_tiny_vit(num_classes=5)
    x = np.random.RandomState(0).randn(2, 32, 32, 3)
    first_ref, second_ref = _torch_terms(net, x)
    with jax.enable_x64(True):
        rngs = nnx.Rngs(0)
        backbone = ViT(image_size=32, patch_size=8, width=16, depth=3, num_heads=2, mlp_dim=24, rngs=rngs)
        model = DeliberativeModel(backbone, ViTHead(16, 5, num_heads=2, mlp_dim=24, rngs=rngs), arch="vit_b_16")
        load_torchvision(model, state_dict_numpy(net.float()))
        nnx.update(model, jax.tree.map(lambda v: v.astype(jnp.float64), nnx.state(model)))
        a, head = model.features_and_classifier(jnp.asarray(x))
        got = attribute(head, a, score="entropy", path="fast")
    ref = first_ref + 0.5 * second_ref
    maps = np.asarray(got.class_maps)
    assert np.abs(maps - ref).max() <= 1e-9 * np.abs(ref).max()
    np.testing.assert_allclose(np.asarray(got.first_order)[:, :-1], first_ref, atol=1e-10 * np.abs(first_ref).max())
    # the head's curvature is there to be matched: the second-order term is a real part of the maps
    assert np.abs(second_ref).max() > 1e-2 * np.abs(first_ref).max()
