"""Interaction maps against full float64 Hessians (every path: closed form on the shipped heads, reverse, forward),
their sums (cross term, diagonal, whole second-order Taylor term), the deliberative model's C + 1 outputs, PyTorch
autograd on the same weights, and the interaction figure."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from delib_jax.attribution import (
    Output,
    deliberative_output,
    explained_output,
    interaction_maps,
    layer_attribution,
    model_interaction_maps,
    split_model,
)
from delib_jax.attribution.outputs import pairwise_terms
from delib_jax.attribution_figures import (
    attribution_overlay,
    interaction_figure,
    interaction_rows,
    save_interaction_figure,
)
from delib_jax.models import PoolMLPHead, create_model
from delib_jax.testing.reference import full_hessian_terms
from delib_jax.testing.tiny import TinySmoothCNN, randomise

pytestmark = pytest.mark.slow  # full Hessians in float64 against the closed forms


def _images(shape, seed=0, dtype=np.float64):
    return jnp.asarray(np.random.RandomState(seed).randn(*shape).astype(dtype))


def _rel_err(x, ref):
    return float(np.abs(np.asarray(x) - ref).max() / max(np.abs(ref).max(), 1e-30))


def _tiny(seed=0):
    return randomise(TinySmoothCNN(rngs=nnx.Rngs(seed)), seed, jnp.float64)


HEADS = {
    "gap_bn": dict(hidden=(6,), batch_norm=True),
    "maxpool_adaptive": dict(hidden=(7,), pooled_size=(2, 2), pool_window=2, pool_stride=2),
    "overlap_pool": dict(hidden=(7, 6), pooled_size=(3, 3), pool_window=3, pool_stride=2, pool_padding=1),
}


def _head(name, out=5, seed=0):
    return randomise(PoolMLPHead(4, out, rngs=nnx.Rngs(seed), **HEADS[name]), seed, jnp.float64)


def test_closed_form_output_hessians_equal_jax_hessian_float64():
    """D^2 fn_t(z)[u_l, w_m] of each closed form = u_l^T (jax.hessian of fn_t at z) w_m = the nested-jvp fallback."""
    with jax.enable_x64(True):
        rng = np.random.RandomState(0)
        z, u, w = (jnp.asarray(rng.randn(*s) * 2) for s in ((2, 6), (2, 3, 6), (2, 4, 6)))
        targets = jnp.asarray([[0, 5, 2], [4, 4, 1]])
        for output in ("probs", "log_probs", "logits", "sigmoid", deliberative_output("hardness")):
            out = explained_output(output)
            hes = jax.vmap(jax.hessian(lambda row, out=out: out(row[None])[0]))(z)  # (B, P, K, K)
            ref = np.take_along_axis(
                np.asarray(jnp.einsum("blk,bpkj,bmj->bplm", u, hes, w)), np.asarray(targets)[:, :, None, None], axis=1
            )
            for form in (out, Output(out.name, out.fn)):  # closed form, then nested jvp of fn
                assert _rel_err(pairwise_terms(form, z, u, w, targets), ref) <= 1e-12, (out.name, form.pairwise)
            assert np.abs(ref).max() > 1e-3 or out.name == "logits"


@pytest.mark.parametrize("head_name", sorted(HEADS))
def test_closed_form_on_shipped_heads_matches_full_hessian_float64(head_name):
    with jax.enable_x64(True):
        head = _head(head_name)
        a = jnp.abs(_images((2, 4, 5, 4), seed=1))
        outputs = [("probs", jax.nn.softmax)]
        if head_name == "overlap_pool":  # every output function on the most involved head
            outputs += [
                ("log_probs", jax.nn.log_softmax),
                ("logits", lambda z: z),
                (lambda z: jax.nn.softmax(z) ** 2, lambda z: jax.nn.softmax(z) ** 2),
            ]
        for output, fn in outputs:
            ref = full_hessian_terms(lambda y, fn=fn: fn(head(y)), a)["interactions"]
            got = interaction_maps(None, head, a, output=output)
            assert got.values.shape == (2, 5, 20, 20)
            if output == "logits":  # piecewise-linear head: no curvature at all
                assert float(np.abs(got.values).max()) == 0.0 and np.abs(ref).max() < 1e-12
            else:
                assert _rel_err(got.values, ref) <= 1e-6, output
                assert np.abs(ref).max() > 1e-3
        if head_name == "gap_bn":
            hard = _head("gap_bn", out=1, seed=1)
            ref = full_hessian_terms(lambda y: jax.nn.sigmoid(hard(y)), a)["interactions"]
            assert _rel_err(interaction_maps(None, hard, a, output="sigmoid").values, ref) <= 1e-6


def test_generic_paths_match_full_hessian_and_sum_to_the_taylor_terms_float64():
    with jax.enable_x64(True):
        net, images = _tiny(6), _images((2, 5, 5, 3), seed=2)
        x = net.features(images)
        g = lambda y: jax.nn.softmax(net.head(y), -1)
        ref = full_hessian_terms(g, x)
        targets = np.array([[3, 1], [0, 2]])
        pick = lambda r: np.take_along_axis(r, targets[:, :, None, None], axis=1)
        for order in ("reverse", "forward"):
            got = interaction_maps(net.features, net.head, images, targets=targets, order=order)
            assert _rel_err(got.values, pick(ref["interactions"])) <= 1e-6, order
        rows = interaction_maps(net.features, net.head, images, targets=targets, locations=[7, 0], chunk_size=1)
        np.testing.assert_array_equal(rows.rows, [7, 0])
        assert _rel_err(rows.values, pick(ref["interactions"])[:, :, [7, 0]]) <= 1e-6
        # row sums: the cross-location term; diagonal: the block term; total: x^T H x, the second derivative along X
        values = np.asarray(got.values)
        cross = layer_attribution(net.features, net.head, images, targets=targets, second_order="cross")
        diag = layer_attribution(net.features, net.head, images, targets=targets, second_order="diagonal")
        b, n, h, w = cross.maps.shape
        np.testing.assert_allclose(0.5 * values.sum(-1).reshape(b, n, h, w), cross.second_order, rtol=1e-9)
        np.testing.assert_allclose(
            0.5 * np.diagonal(values, axis1=2, axis2=3).reshape(b, n, h, w), diag.second_order, rtol=1e-9
        )
        along = jax.jvp(lambda y: jax.jvp(g, (y,), (x,))[1], (x,), (x,))[1]  # d^2/dt^2 g(X + t X) at t = 0
        np.testing.assert_allclose(
            values.sum(axis=(2, 3)), np.take_along_axis(np.asarray(along), targets, 1), rtol=1e-9
        )


def test_deliberative_model_interactions_equal_the_generic_path():
    """All C + 1 outputs at A from the heads' logit tangents = the reverse order on the split model."""
    images = _images((2, 16, 16, 3), seed=3, dtype=np.float32)
    for hardness in ("head", "network"):
        model = create_model("small", 4, hardness=hardness, rngs=nnx.Rngs(1))
        fast = model_interaction_maps(model, images)
        assert fast.values.shape == (2, 5, 4, 4)
        if hardness == "head":
            features, head = split_model(model, "A", hardness=True)
            slow = interaction_maps(features, head, images, output=deliberative_output("hardness"), order="reverse")
            assert _rel_err(fast.values, np.asarray(slow.values)) <= 1e-4
            np.testing.assert_allclose(fast.outputs, slow.outputs, rtol=1e-5)
        assert float(np.abs(fast.values[:, -1]).max()) > 0  # the difficulty output has interactions too
    entropy = model_interaction_maps(model, images, score="entropy", locations=[1])
    features, head = split_model(model, "A")
    slow = interaction_maps(
        features, head, images, output=deliberative_output("entropy"), locations=[1], order="forward"
    )
    assert _rel_err(entropy.values, np.asarray(slow.values)) <= 1e-4


def _torch_twin(net: TinySmoothCNN):
    torch = pytest.importorskip("torch")
    twin = torch.nn.ModuleDict(
        {
            "conv1": torch.nn.Conv2d(3, 4, 3, padding=1),
            "conv2": torch.nn.Conv2d(4, 5, 3, stride=2, padding=1),
            "fc": torch.nn.Linear(5, 4),
        }
    ).double()
    with torch.no_grad():
        for name in ("conv1", "conv2"):
            conv = getattr(net, name)
            twin[name].weight.copy_(torch.from_numpy(np.array(conv.kernel[...]).transpose(3, 2, 0, 1)))
            twin[name].bias.copy_(torch.from_numpy(np.array(conv.bias[...])))
        twin["fc"].weight.copy_(torch.from_numpy(np.array(net.fc.kernel[...]).T))
        twin["fc"].bias.copy_(torch.from_numpy(np.array(net.fc.bias[...])))
    features = lambda img: torch.nn.functional.softplus(twin["conv1"](img))
    head = lambda a: twin["fc"](torch.tanh(twin["conv2"](a)).mean(dim=(2, 3)))
    return torch, features, head


@pytest.mark.parametrize("level", ["layer", "pixels"])
def test_against_pytorch_autograd_on_same_weights(level):
    """Gradient, cross, diagonal and interactions from torch.func (full Hessian of one image, NCHW) equal ours."""
    with jax.enable_x64(True):
        net, images = _tiny(7), _images((1, 5, 5, 3), seed=4)
        torch, t_features, t_head = _torch_twin(net)
        from torch.func import hessian, jacrev

        img = torch.from_numpy(np.asarray(images).transpose(0, 3, 1, 2).copy())
        if level == "layer":
            features, head = net.features, net.head
            x = t_features(img).detach()
            fn = lambda a: torch.softmax(t_head(a[None])[0], -1)
        else:
            features, head, x = None, net, img
            fn = lambda a: torch.softmax(t_head(t_features(a[None]))[0], -1)
        x0 = x[0]
        d, h, w = x0.shape
        jac = jacrev(fn)(x0).reshape(-1, d, h * w)  # (P, D, L)
        hes = hessian(fn)(x0).reshape(-1, d, h * w, d, h * w)  # (P, D, L, D, L)
        v = x0.reshape(d, h * w)
        ref_first = torch.einsum("pdl,dl->pl", jac, v).detach().numpy()
        ref_inter = torch.einsum("dl,pdlem,em->plm", v, hes, v).detach().numpy()
        targets = np.array([[2, 0]])
        got = layer_attribution(features, head, images, targets=targets, second_order="cross", order="reverse")
        diag = layer_attribution(features, head, images, targets=targets, second_order="diagonal")
        inter = interaction_maps(features, head, images, targets=targets)
        assert _rel_err(got.first_order.reshape(2, -1), ref_first[[2, 0]]) <= 1e-6
        assert _rel_err(got.second_order.reshape(2, -1), 0.5 * ref_inter[[2, 0]].sum(-1)) <= 1e-6
        assert (
            _rel_err(diag.second_order.reshape(2, -1), 0.5 * np.diagonal(ref_inter[[2, 0]], axis1=1, axis2=2)) <= 1e-6
        )
        assert _rel_err(inter.values[0], ref_inter[[2, 0]]) <= 1e-6


def test_interaction_figure_and_overlay(tmp_path):
    model = create_model("small", 4, rngs=nnx.Rngs(2))
    images = _images((1, 16, 16, 3), seed=5, dtype=np.float32)
    inter = model_interaction_maps(model, images, locations=[1, 2])
    rows = interaction_rows(inter, (2, 2), image_index=0, location=(1, 0), outputs=(3, 1))  # A is 2 x 2 here
    np.testing.assert_allclose(rows[0].ravel(), inter.values[0, 3, 1])
    np.testing.assert_allclose(rows[1].ravel(), inter.values[0, 1, 1])
    pixels = (np.random.RandomState(0).rand(16, 16, 3) * 255).astype(np.uint8)
    fig = interaction_figure(pixels, rows, (1, 0), names=("a $cost$ of $5", "b"))  # dollars shown, not maths
    assert len(fig.axes) == 3
    path = save_interaction_figure(pixels, rows, (1, 0), tmp_path / "pair.png", names=("a $x", "b"))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    over = attribution_overlay(pixels, np.array([[1.0, -1.0], [0.0, 0.0]]))
    assert over.shape == (16, 16, 3) and over.dtype == np.uint8
    np.testing.assert_array_equal(over[12:, :], pixels[12:, :])  # zero attribution leaves the image as it is
    assert over[0, 0, 0] > over[0, 0, 2] and over[0, 15, 2] > over[0, 15, 0]  # red positive, blue negative
    with pytest.raises(ValueError, match="not among the computed rows"):
        interaction_rows(inter, (2, 2), image_index=0, location=(1, 1), outputs=(3, 1))
    with pytest.raises(ValueError, match="grid"):
        interaction_rows(inter, (4, 4), image_index=0, location=(0, 1), outputs=(3, 1))
    with pytest.raises(ValueError, match="outside"):
        interaction_figure(pixels, rows, (5, 0))
