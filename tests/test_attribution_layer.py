"""Attributions for any split: both differentiation orders and the tangent path against float64 brute-force Hessians,
the random-sign estimate of the diagonal, integrated gradients, the explained-output choice, upsampling, SmoothGrad,
the shipped backbones split at named stages, and bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from delib_jax.attribution import (
    attribute,
    deliberative_output,
    layer_attribution,
    noise_tunnel,
    quadrature,
    split_model,
    stage_names,
    upsample_maps,
)
from delib_jax.models import PoolMLPHead, create_model
from delib_jax.testing.reference import brute_force_terms, full_hessian_terms
from delib_jax.testing.tiny import TinySmoothCNN, randomise

pytestmark = pytest.mark.slow  # float64 brute-force and full Hessians, many programs compiled per test (20-40 s each)


def _randomise(module, seed, dtype=jnp.float64, scale=0.7):
    return randomise(module, seed, dtype, scale)


def _images(shape=(2, 5, 5, 3), seed=0, dtype=np.float64):
    return jnp.asarray(np.random.RandomState(seed).randn(*shape).astype(dtype))


def _rel_err(x, ref):
    return float(np.abs(np.asarray(x) - ref).max() / max(np.abs(ref).max(), 1e-30))


def _tiny(seed=0, dtype=jnp.float64):
    return _randomise(TinySmoothCNN(rngs=nnx.Rngs(seed)), seed, dtype)


def _pick(terms, targets):
    """(B, P, H, W) -> (B, N, H, W) at targets (B, N)."""
    return np.take_along_axis(np.asarray(terms), np.asarray(targets)[:, :, None, None], axis=1)


@pytest.mark.parametrize("level", ["layer", "pixels"])
def test_both_orders_match_brute_force_hessians_float64(level):
    with jax.enable_x64(True):
        net = _tiny()
        images = _images()
        if level == "layer":
            features, head, x = net.features, net.head, net.features(images)
        else:
            features, head, x = None, net, images
        g = lambda y: jax.nn.softmax(head(y), axis=-1)
        ref = full_hessian_terms(g, x)
        if level == "layer":  # the per-block reference (jax.hessian of each location's D-vector) agrees
            f_ref, d_ref = brute_force_terms(g, x, "diagonal")
            np.testing.assert_allclose(ref["diagonal"], d_ref, rtol=1e-10, atol=1e-14)
            np.testing.assert_allclose(ref["first"], f_ref, rtol=1e-10, atol=1e-14)
        assert np.abs(ref["cross"] - ref["diagonal"]).max() > 0.1 * np.abs(ref["cross"]).max()  # cross terms matter
        targets = np.array([[2, 0], [1, 3]])
        for order in ("forward", "reverse"):
            for second in ("diagonal", "cross"):
                got = layer_attribution(features, head, images, targets=targets, second_order=second, order=order)
                assert got.maps.dtype == jnp.float64
                assert _rel_err(got.first_order, _pick(ref["first"], targets)) <= 1e-6, (order, second)
                assert _rel_err(got.second_order, 0.5 * _pick(ref[second], targets)) <= 1e-6, (order, second)
                np.testing.assert_array_equal(got.targets, targets)
        grad = layer_attribution(features, head, images, method="gradient")  # all P outputs, the cheaper order
        assert _rel_err(grad.maps, ref["first"]) <= 1e-6
        assert float(np.abs(grad.second_order).max()) == 0.0


def test_explained_output_choice_logits_and_any_function():
    with jax.enable_x64(True):
        net, images = _tiny(1), _images(seed=1)
        x = net.features(images)
        square = lambda z: jnp.concatenate([z**2, jnp.sum(jax.nn.softmax(z) ** 3, -1, keepdims=True)], axis=-1)
        cases = (
            ("logits", lambda z: z, "forward"),
            ("log_probs", jax.nn.log_softmax, "reverse"),
            (square, square, "reverse"),
        )
        for output, fn, order in cases:
            ref = full_hessian_terms(lambda y, fn=fn: fn(net.head(y)), x)
            got = layer_attribution(net.features, net.head, images, output=output, order=order)
            assert _rel_err(got.maps, ref["first"] + 0.5 * ref["cross"]) <= 1e-6
            assert got.outputs.shape == (2, ref["first"].shape[1])


def test_tangent_path_on_shipped_heads_equals_attribute_and_reverse_order():
    """layer_attribution on a PoolMLPHead (tangent path) equals `attribute`'s class maps and the generic orders."""
    with jax.enable_x64(True):
        head = _randomise(
            PoolMLPHead(4, 5, hidden=(7,), pooled_size=(2, 2), pool_window=2, pool_stride=2, rngs=nnx.Rngs(0)), 0
        )
        a = jnp.abs(_images((2, 4, 6, 4), seed=2))
        ref = attribute(head, a, score="entropy", second_order="cross")
        for order in ("auto", "tangent", "reverse", "forward"):
            got = layer_attribution(None, head, a, order=order)
            assert _rel_err(got.maps, np.asarray(ref.class_maps)) <= 1e-9, order
        top = layer_attribution(None, head, a, targets=2, second_order="diagonal")
        diag = attribute(head, a, score="entropy")
        np.testing.assert_array_equal(top.targets, np.argsort(-np.asarray(diag.probs), axis=1)[:, :2])
        assert _rel_err(top.maps, _pick(diag.class_maps, top.targets)) <= 1e-9


def test_probe_estimate_is_unbiased_and_its_error_shrinks_as_one_over_sqrt_k():
    with jax.enable_x64(True):
        net, images = _tiny(2), _images((1, 6, 6, 3), seed=3)
        x = net.features(images)
        exact = 0.5 * full_hessian_terms(lambda y: jax.nn.softmax(net.head(y), -1), x)["diagonal"]  # (1, P, H, W)
        errors, zs = {}, []
        for k in (16, 256, 4096):
            got = layer_attribution(
                net.features, net.head, images, second_order="estimate", probes=k, key=jax.random.key(7)
            )
            err = np.asarray(got.second_order) - exact
            errors[k] = float(np.sqrt(np.mean(err**2)))
            zs.append(np.abs(err) / np.asarray(got.stderr))
        gradient = layer_attribution(net.features, net.head, images, method="gradient")
        assert _rel_err(got.first_order, np.asarray(gradient.maps)) <= 1e-9  # exact first order on the way
        # 16x the probes: 4x smaller error (statistical: a tolerant band around 1/sqrt(K))
        for small, large in ((16, 256), (256, 4096)):
            assert 2.0 < errors[small] / errors[large] < 8.0, errors
        # the standard error is honest: most estimates lie within 3 standard errors of the exact blocks
        assert np.mean(np.concatenate([z.ravel() for z in zs]) < 3.0) > 0.95
        assert errors[4096] < 0.05 * np.abs(exact).max()


def test_gauss_legendre_integrated_gradients_complete_better_than_trapezoid():
    """GAP + linear head (ResNet's): the path integrand is smooth, so Gauss-Legendre converges far faster."""
    head = _randomise(PoolMLPHead(8, 6, rngs=nnx.Rngs(3)), 3, jnp.float32, scale=2.0)
    a = jnp.abs(_images((3, 5, 5, 8), seed=4, dtype=np.float32))
    res = {}
    for rule in ("trapezoid", "gauss_legendre"):
        got = layer_attribution(None, head, a, method="integrated_gradients", steps=50, quadrature=rule)
        res[rule] = float(np.abs(np.asarray(got.residual)).max())
        delta = jax.nn.softmax(head(a)) - jax.nn.softmax(head(0 * a))
        np.testing.assert_allclose(got.maps.sum(axis=(2, 3)) - got.residual, delta, atol=1e-6)
    assert res["gauss_legendre"] < 0.1 * res["trapezoid"], res
    alphas, weights = quadrature(4, "gauss_legendre")
    np.testing.assert_allclose(weights.sum(), 1.0, rtol=1e-6)
    assert np.all((alphas > 0) & (alphas < 1))
    np.testing.assert_allclose(np.sum(weights * alphas**7), 1 / 8, rtol=1e-5)  # exact to degree 2 * 4 - 1


def test_integrated_gradients_any_split_float64_against_quadrature_of_gradients():
    with jax.enable_x64(True):
        net, images = _tiny(3), _images(seed=5)
        x = net.features(images)
        base = 0.3 * x
        alphas, weights = quadrature(8, "gauss_legendre")
        g = lambda y: jax.nn.softmax(net.head(y), -1)[:, 1].sum()
        expected = sum(
            w * np.sum(np.asarray(jax.grad(g)(base + al * (x - base)) * (x - base)), -1)
            for al, w in zip(alphas.astype(np.float64), weights.astype(np.float64))
        )
        for order in ("forward", "reverse"):
            got = layer_attribution(
                net.features,
                net.head,
                images,
                method="integrated_gradients",
                steps=8,
                baseline=base,
                targets=np.array([[1], [1]]),
                order=order,
            )
            assert _rel_err(got.maps[:, 0], expected) <= 1e-6


def test_upsampled_maps_batched_per_image_and_jit():
    net = _tiny(4, jnp.float32)
    features = lambda x: jnp.tanh(net.conv2(net.features(x)))  # plain callables, split after conv2 (stride 2)
    head = lambda y: net.fc(jnp.mean(y, axis=(1, 2)))
    images = _images((2, 8, 8, 3), seed=6, dtype=np.float32)
    full = layer_attribution(features, head, images, targets=2)
    up = layer_attribution(features, head, images, targets=2, upsample=True)
    assert up.maps.shape == (2, 2, 8, 8) and full.maps.shape == (2, 2, 4, 4)
    np.testing.assert_allclose(up.maps, upsample_maps(full.maps, (8, 8)), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(up.maps, up.first_order + up.second_order, rtol=1e-6, atol=1e-8)
    tol = dict(rtol=1e-4, atol=1e-6 * float(np.abs(full.maps).max()))
    eager = layer_attribution(features, head, images, targets=2, jit=False)
    np.testing.assert_allclose(eager.maps, full.maps, **tol)
    for n in range(2):
        one = layer_attribution(features, head, images[n : n + 1], targets=full.targets[n : n + 1])
        np.testing.assert_allclose(one.maps[0], full.maps[n], **tol)


def test_chunking_locations_and_probes_changes_nothing():
    net = _tiny(8, jnp.float32)
    images = _images((2, 5, 5, 3), seed=8, dtype=np.float32)
    for kw in (dict(second_order="diagonal", order="reverse"), dict(second_order="estimate", probes=6)):
        whole = layer_attribution(net.features, net.head, images, targets=2, **kw)
        chunked = layer_attribution(net.features, net.head, images, targets=2, chunk_size=4, **kw)  # 25 / 4, 6 / 4
        np.testing.assert_allclose(chunked.maps, whole.maps, rtol=1e-5, atol=1e-6 * float(np.abs(whole.maps).max()))


def test_noise_tunnel_is_the_mean_square_and_variance_over_the_same_noisy_copies():
    net = _tiny(5, jnp.float32)
    images = _images((2, 5, 5, 3), seed=7, dtype=np.float32)
    targets = layer_attribution(net.features, net.head, images, targets=1).targets
    fn = lambda x: layer_attribution(net.features, net.head, x, targets=targets).maps
    key = jax.random.key(3)
    sigma = 0.2 * (images.max(axis=(1, 2, 3), keepdims=True) - images.min(axis=(1, 2, 3), keepdims=True))
    eps = jax.random.normal(key, (5, *images.shape), images.dtype) * sigma
    loop = np.stack([np.asarray(fn(images + e)) for e in eps])  # the slow reference: one call per sample
    for kind, ref in (("smoothgrad", loop.mean(0)), ("smoothgrad_sq", (loop**2).mean(0)), ("vargrad", loop.var(0))):
        for chunk in (None, 2):
            got = noise_tunnel(fn, images, kind=kind, samples=5, noise=0.2, key=key, chunk_size=chunk)
            np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5 * np.abs(ref).max())
    with pytest.raises(ValueError, match="kind"):
        noise_tunnel(fn, images, kind="mean")


def test_split_model_stages_compose_to_the_model():
    model = create_model("small", 5, rngs=nnx.Rngs(0))
    model.eval()
    x = _images((2, 16, 16, 3), dtype=np.float32)
    logits = model.classifier(model.backbone(x))
    names = stage_names(model)
    assert names[0] == "image" and names[-1] == "A" and "conv3" in names and "pool2" in names
    for stage in names:
        features, head = split_model(model, stage)
        np.testing.assert_allclose(head(features(x)), logits, rtol=1e-5, atol=1e-6)
    features, head = split_model(model, "A", hardness=True)
    out = head(features(x))
    np.testing.assert_allclose(out[:, -1], model.hardness_head(model.backbone(x))[:, 0], rtol=1e-5)
    np.testing.assert_allclose(features(x), model.backbone(x), rtol=1e-6)
    # the deliberative outputs at any layer: C probabilities, then the hardness score
    attr = layer_attribution(*split_model(model, "conv2", hardness=True), x, output=deliberative_output("hardness"))
    assert attr.maps.shape == (2, 6, 8, 8)
    np.testing.assert_allclose(attr.outputs[:, -1], jax.nn.sigmoid(out[:, -1]), rtol=1e-5)
    network = create_model("small", 5, hardness="network", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="split it at 'image'"):
        split_model(network, "conv2", hardness=True)
    assert split_model(network, "image", hardness=True)[1](x).shape == (2, 6)


@pytest.mark.parametrize(
    "arch, stages",
    [
        ("vgg16", {"conv1_2": (64, 224), "block4": (512, 28), "pool4": (512, 14), "A": (512, 14)}),
        ("resnet50", {"stem": (64, 56), "layer2.0": (512, 28), "layer3": (1024, 14), "A": (2048, 7)}),
        ("alexnet", {"conv1": (64, 55), "pool2": (192, 13), "conv5": (256, 13)}),
    ],
)
def test_split_model_shipped_backbones_at_named_stages_by_shape(arch, stages):
    """Full-size backbones through jax.eval_shape only: X's shape at each stage and the logits' at the end."""
    abstract = nnx.eval_shape(lambda: create_model(arch, 7, rngs=nnx.Rngs(0)))
    images = jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32)
    for stage, (channels, side) in stages.items():
        features, head = split_model(abstract, stage)
        fg, fs = nnx.split(features)
        hg, hs = nnx.split(head)
        x = jax.eval_shape(lambda s, y, fg=fg: nnx.merge(fg, s)(y), fs, images)
        assert x.shape == (1, side, side, channels), stage
        assert jax.eval_shape(lambda s, y, hg=hg: nnx.merge(hg, s)(y), hs, x).shape == (1, 7)
    with pytest.raises(ValueError, match="unknown stage 'layer9'"):
        split_model(abstract, "layer9")


class _Plain:
    def __call__(self, x):
        return x


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"targets": 9}, "between 1 and the number of outputs"),
        ({"targets": np.array([[0, 7]])}, r"must lie in \[0, 4\)"),
        ({"targets": np.array([0, 1])}, r"shape \(B, N\)"),
        ({"method": "lrp"}, "unknown method"),
        ({"second_order": "full"}, "second_order"),
        ({"order": "sideways"}, "order"),
        ({"order": "tangent"}, "needs a head with logit tangents"),
        ({"second_order": "estimate", "probes": 1}, "probes"),
        ({"method": "integrated_gradients", "quadrature": "simpson"}, "quadrature"),
        ({"output": "softmax"}, "unknown output"),
        ({"baseline": np.zeros((1, 6, 6, 4))}, "integrated_gradients. only"),
    ],
)
def test_bad_input_gives_one_clear_error(kwargs, match):
    net = _tiny(0, jnp.float32)
    with pytest.raises(ValueError, match=match):
        layer_attribution(net.features, net.head, _images((1, 6, 6, 3), dtype=np.float32), **kwargs)


def test_bad_images_and_features():
    net = _tiny(0, jnp.float32)
    with pytest.raises(ValueError, match="NaN or inf"):
        layer_attribution(net.features, net.head, np.full((1, 6, 6, 3), np.nan, np.float32))
    with pytest.raises(ValueError, match="rank 4"):
        layer_attribution(net.features, net.head, np.ones((6, 6, 3), np.float32))
    with pytest.raises(ValueError, match=r"X of shape \(B, H, W, D\)"):
        layer_attribution(lambda x: x.reshape(1, -1), net.head, np.ones((1, 6, 6, 3), np.float32))
    with pytest.raises(ValueError, match="callables or NNX modules"):
        layer_attribution(3, net.head, np.ones((1, 6, 6, 3), np.float32))
