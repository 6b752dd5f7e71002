"""The attribution core against independent references: brute-force Hessians in float64, Taylor identities,
integrated-gradients completeness, PyTorch autograd on the same weights, batching, jit, and bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from delib_jax.attribution import _terms, attribute, attribute_images, grad_cam, make_attribute_fn, output_functions
from delib_jax.models import PoolMLPHead, create_model
from delib_jax.models.heads import tangent_layout
from delib_jax.testing.reference import brute_force_terms

D, C = 4, 5
EQ2 = {"difficulty_channels": "signed"}  # Eq. 2 as written, what the references compute (the default is "positive")

HEADS = {
    # global average pool + hidden layer with eval-mode batch norm (ResNet / hardness-head style)
    "gap_bn": dict(hidden=(6,), batch_norm=True),
    # 2x2 max pool then adaptive average pool to a different grid (VGG-style, reduced input)
    "maxpool_adaptive": dict(hidden=(7,), pooled_size=(2, 2), pool_window=2, pool_stride=2),
    # overlapping 3x3 / stride 2 pool with padding, then adaptive pool (AlexNet-style)
    "overlap_pool": dict(hidden=(7, 6), pooled_size=(3, 3), pool_window=3, pool_stride=2, pool_padding=1),
}


def _randomise(module, seed, dtype):
    """Random parameters and batch-norm statistics (so eval-mode BN is not the identity), cast to dtype."""
    state = nnx.state(module)
    leaves, tree = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    new = [  # drawn in float32 whatever the target dtype, so float32 and float64 copies hold the same values
        (
            jax.random.uniform(k, x.shape, jnp.float32, 0.5, 1.5)
            if x.ndim == 1
            else jax.random.normal(k, x.shape, jnp.float32) * 0.7
        ).astype(dtype)
        for k, x in zip(keys, leaves)
    ]
    nnx.update(module, jax.tree.unflatten(tree, new))
    module.eval()
    return module


def _head(name, out=C, seed=0, dtype=jnp.float32, in_channels=D):
    return _randomise(PoolMLPHead(in_channels, out, rngs=nnx.Rngs(seed), **HEADS[name]), seed, dtype)


def _features(shape=(2, 4, 5, D), seed=0, dtype=np.float32):
    return jnp.asarray(np.abs(np.random.RandomState(seed).randn(*shape)).astype(dtype))


def _reference(classifier, hard, a, score, second="diagonal"):
    """Brute-force maps (B, C+1, H, W) = first + 1/2 second for every class and the difficulty output."""
    class_phi, hard_phi = output_functions(score)
    f1, s1 = brute_force_terms(lambda x: class_phi(classifier(x)), a, second)
    if hard_phi is None:
        return f1 + 0.5 * s1
    f2, s2 = brute_force_terms(lambda x: hard_phi(hard(x)), a, second)
    return np.concatenate([f1 + 0.5 * s1, f2 + 0.5 * s2], axis=1)


def _rel_err(x, ref):
    return float(np.abs(np.asarray(x) - ref).max() / max(np.abs(ref).max(), 1e-30))


@pytest.mark.parametrize("head_name", sorted(HEADS))
@pytest.mark.parametrize("score", ["hardness", "entropy", "hesitancy"])
@pytest.mark.slow  # brute-force references or many compiled variants
def test_both_paths_match_brute_force_hessians_float64(head_name, score):
    with jax.enable_x64(True):
        clf = _head(head_name, dtype=jnp.float64)
        hard = _head("gap_bn", out=1, seed=1, dtype=jnp.float64)
        a = _features(dtype=np.float64)
        ref = _reference(clf, hard, a, score)
        for path in ("fast", "generic"):
            got = attribute(clf, a, hardness_head=hard, score=score, path=path, **EQ2)
            assert got.maps.dtype == jnp.float64
            assert _rel_err(got.maps, ref) <= 1e-6, path
        # the second-order term is not negligible here, so the comparison has teeth
        assert np.abs(np.asarray(got.second_order)).max() > 1e-3 * np.abs(ref).max()


@pytest.mark.parametrize("head_name", ["maxpool_adaptive", "overlap_pool"])
@pytest.mark.slow  # brute-force references or many compiled variants
def test_both_paths_match_brute_force_float32(head_name):
    clf = _head(head_name)
    hard = _head("gap_bn", out=1, seed=1)
    a = _features()
    with jax.enable_x64(True):
        ref = _reference(
            _head(head_name, dtype=jnp.float64),
            _head("gap_bn", 1, 1, jnp.float64),
            jnp.asarray(a, jnp.float64),
            "hardness",
        )
    for path in ("fast", "generic"):
        assert _rel_err(attribute(clf, a, hardness_head=hard, path=path, **EQ2).maps, ref) <= 1e-4


@pytest.mark.parametrize("shape, pooled", [((2, 4, 6, D), (2, 3)), ((2, 4, 6, D), (2, 2)), ((1, 6, 6, D), (3, 3))])
@pytest.mark.slow  # brute-force references or many compiled variants
def test_fast_path_when_pool_windows_tile_the_features(shape, pooled):
    """VGG at 224 px: 2x2/2 windows tile A, so the fast path keeps (cell, offset) rows and reorders at the end."""
    with jax.enable_x64(True):
        clf = _randomise(
            PoolMLPHead(D, C, hidden=(7,), pooled_size=pooled, pool_window=2, pool_stride=2, rngs=nnx.Rngs(2)),
            2,
            jnp.float64,
        )
        hard = _head("gap_bn", out=1, seed=1, dtype=jnp.float64)
        a = _features(shape, seed=4, dtype=np.float64)
        ref = _reference(clf, hard, a, "hardness")
        got = attribute(clf, a, hardness_head=hard, path="fast", **EQ2)
        assert _rel_err(got.maps, ref) <= 1e-6
        assert np.abs(np.asarray(got.second_order)).max() > 1e-3 * np.abs(ref).max()


class SmoothHead(nnx.Module):
    """A head with curvature of its own: softplus and tanh between two linear maps (no fast path)."""

    def __init__(self, d, c, *, rngs):
        self.lin1 = nnx.Linear(d, 8, rngs=rngs)
        self.lin2 = nnx.Linear(8, c, rngs=rngs)
        self.out_features = c

    def __call__(self, a):
        x = jax.nn.softplus(self.lin1(a))  # per location
        x = jnp.tanh(jnp.mean(x, axis=(1, 2)))
        return self.lin2(x) * 2.0


@pytest.mark.slow  # brute-force references or many compiled variants
def test_generic_path_on_smooth_head_matches_brute_force():
    with jax.enable_x64(True):
        clf = _randomise(SmoothHead(D, C, rngs=nnx.Rngs(0)), 3, jnp.float64)
        a = _features((2, 3, 4, D), dtype=np.float64)
        for second in ("diagonal", "cross"):
            ref = _reference(clf, None, a, "entropy", second)
            got = attribute(clf, a, score="entropy", second_order=second, **EQ2)
            assert _rel_err(got.maps, ref) <= 1e-6
        with pytest.raises(ValueError, match="needs a head with exact per-location derivatives"):
            attribute(clf, a, score="entropy", path="fast")


@pytest.mark.slow  # brute-force references or many compiled variants
def test_cross_location_variant_matches_full_hessian_and_sums_to_quadratic_form():
    with jax.enable_x64(True):
        clf = _head("maxpool_adaptive", dtype=jnp.float64)
        a = _features((1, 4, 4, D), dtype=np.float64)
        ref = _reference(clf, None, a, "hesitancy", "cross")
        for path in ("fast", "generic"):
            got = attribute(clf, a, score="hesitancy", second_order="cross", path=path, **EQ2)
            assert _rel_err(got.maps, ref) <= 1e-6
        # sum over locations of a_l . (H A)_l = A^T H A = second derivative of g along A
        phi = output_functions("hesitancy")[0]
        g = lambda x: phi(clf(x))
        dd = jax.jvp(lambda x: jax.jvp(g, (x,), (a,))[1], (a,), (a,))[1]
        np.testing.assert_allclose(2 * got.second_order.sum(axis=(2, 3)), dd, rtol=1e-9, atol=1e-12)


@pytest.mark.slow  # several seconds of CPU (measured 3-24 s on the 2-core CPU)
def test_taylor_identity_on_exactly_quadratic_output():
    """For quadratic g the Taylor series stops at second order, so at every location l (E_l = a_l e_l):
    expanded at the reference point A - E_l:  first + 1/2 second = g(A) - g(A with a_l = 0)  (exactly);
    expanded at A itself (Eq. 2's derivatives): first - 1/2 second = the same difference."""
    with jax.enable_x64(True):
        rng = np.random.RandomState(0)
        a = jnp.asarray(rng.randn(2, 3, 3, D))
        q = jnp.asarray(rng.randn(3, 3 * 3 * D, 3 * 3 * D))
        lin = jnp.asarray(rng.randn(3, 3 * 3 * D))

        def g(x):  # (B, H, W, D) -> (B, 3), exactly quadratic
            f = x.reshape(x.shape[0], -1)
            return jnp.einsum("bi,pij,bj->bp", f, q, f) + f @ lin.T

        first, second = _terms.generic_terms(g, a, a, second="diagonal")
        for i in range(3):
            for j in range(3):
                loc = i * 3 + j
                zeroed = a.at[:, i, j].set(0.0)
                diff = g(a) - g(zeroed)
                np.testing.assert_allclose(first[:, :, loc] - 0.5 * second[:, :, loc], diff, rtol=1e-10)
                e = a - zeroed
                f0 = jax.jvp(g, (zeroed,), (e,))[1]
                s0 = jax.jvp(lambda x, e=e: jax.jvp(g, (x,), (e,))[1], (zeroed,), (e,))[1]
                np.testing.assert_allclose(f0 + 0.5 * s0, diff, rtol=1e-10)
        assert np.abs(np.asarray(second)).max() > 0.1  # a genuinely curved case


@pytest.mark.slow  # brute-force references or many compiled variants
def test_integrated_gradients_completeness_improves_with_steps():
    clf = _head("maxpool_adaptive")
    hard = _head("gap_bn", out=1, seed=1)
    a = _features()
    residuals = []
    for steps in (4, 32, 256):
        r = attribute(clf, a, hardness_head=hard, method="integrated_gradients", steps=steps, **EQ2)
        np.testing.assert_allclose(r.maps.sum(axis=(2, 3)) - r.residual, _delta(clf, hard, a), atol=1e-5)
        residuals.append(float(np.abs(r.residual).max()))
    assert residuals[2] < residuals[1] < residuals[0]
    # the path crosses ReLU kinks, so convergence is first order: ~1/steps
    assert residuals[2] < 1e-2 * float(np.abs(_delta(clf, hard, a)).max())
    # generic and fast agree for integrated gradients too
    r_gen = attribute(clf, a, hardness_head=hard, method="integrated_gradients", steps=8, path="generic")
    r_fast = attribute(clf, a, hardness_head=hard, method="integrated_gradients", steps=8, path="fast")
    assert _rel_err(r_gen.maps, np.asarray(r_fast.maps)) < 1e-4


def _delta(clf, hard, a):
    phi_c, phi_h = output_functions("hardness")
    return jnp.concatenate([phi_c(clf(a)) - phi_c(clf(0 * a)), phi_h(hard(a)) - phi_h(hard(0 * a))], axis=1)


@pytest.mark.slow  # brute-force references or many compiled variants
def test_integrated_gradients_quadrature_rules_and_baseline():
    clf, a = _head("gap_bn"), _features()
    base = 0.5 * a
    for rule in ("trapezoid", "midpoint", "left"):
        r = attribute(
            clf, a, score="entropy", method="integrated_gradients", steps=64, quadrature=rule, baseline=base, **EQ2
        )
        phi = output_functions("entropy")[0]
        delta = phi(clf(a)) - phi(clf(base))
        np.testing.assert_allclose(r.maps.sum(axis=(2, 3)) - r.residual, delta, atol=1e-5)
        assert float(np.abs(r.residual).max()) < 2e-2 * float(np.abs(delta).max())


@pytest.mark.slow  # brute-force references or many compiled variants
def test_against_pytorch_autograd_on_same_weights():
    torch = pytest.importorskip("torch")
    torch.set_default_dtype(torch.float64)
    try:
        with jax.enable_x64(True):
            clf = _head("maxpool_adaptive", dtype=jnp.float64)
            a = _features((2, 4, 6, D), dtype=np.float64)
            ours = attribute(clf, a, score="entropy", path="fast", **EQ2)
            w1, b1 = (np.array(clf.linears[0].kernel[...]), np.array(clf.linears[0].bias[...]))  # writable copies
            w2, b2 = (np.array(clf.linears[1].kernel[...]), np.array(clf.linears[1].bias[...]))
        net = torch.nn.Sequential(
            torch.nn.MaxPool2d(2, 2),
            torch.nn.AdaptiveAvgPool2d((2, 2)),
            torch.nn.Flatten(),
            torch.nn.Linear(4 * D, 7),
            torch.nn.ReLU(),
            torch.nn.Linear(7, C),
        )
        with torch.no_grad():  # our first kernel flattens (h, w, D); torch flattens (D, h, w)
            net[3].weight.copy_(torch.from_numpy(w1.reshape(2, 2, D, 7).transpose(3, 2, 0, 1).reshape(7, -1)))
            net[3].bias.copy_(torch.from_numpy(b1))
            net[5].weight.copy_(torch.from_numpy(w2.T))
            net[5].bias.copy_(torch.from_numpy(b2))
        from torch.func import hessian, jacrev

        def outputs(x):  # x (1, D, H, W) -> (C + 1,)
            p = torch.softmax(net(x)[0], -1)
            ent = -(p * torch.log(p)).sum() / np.log(C)
            return torch.cat([p, ent[None]])

        at = torch.from_numpy(np.asarray(a).transpose(0, 3, 1, 2).copy())
        ref = np.zeros(ours.maps.shape)
        for n in range(at.shape[0]):
            for i in range(at.shape[2]):
                for j in range(at.shape[3]):
                    v = at[n, :, i, j].clone()

                    def local(x, n=n, i=i, j=j):
                        img = at[n : n + 1].clone()
                        img[0, :, i, j] = x
                        return outputs(img)

                    ref[n, :, i, j] = (
                        (jacrev(local)(v) @ v + 0.5 * torch.einsum("d,pde,e->p", v, hessian(local)(v), v))
                        .detach()
                        .numpy()
                    )
        assert _rel_err(ours.maps, ref) <= 1e-6
    finally:
        torch.set_default_dtype(torch.float32)


@pytest.mark.slow  # brute-force references or many compiled variants
def test_batched_equals_per_image_jit_equals_eager_and_permutation():
    clf = _head("overlap_pool")
    hard = _head("gap_bn", out=1, seed=1)
    a = _features((4, 5, 6, D))
    full = attribute(clf, a, hardness_head=hard)
    tol = 1e-5 * float(np.abs(full.maps).max())
    eager = attribute(clf, a, hardness_head=hard, jit=False)
    np.testing.assert_allclose(full.maps, eager.maps, rtol=1e-5, atol=tol)
    for n in range(4):
        one = attribute(clf, a[n : n + 1], hardness_head=hard)
        np.testing.assert_allclose(one.maps[0], full.maps[n], rtol=1e-5, atol=tol)
    perm = np.array([2, 0, 3, 1])
    permuted = attribute(clf, a[perm], hardness_head=hard)
    np.testing.assert_allclose(permuted.maps, full.maps[perm], rtol=1e-5, atol=tol)


@pytest.mark.slow  # several seconds of CPU (measured 3-24 s on the 2-core CPU)
def test_options_top_n_positive_abs_and_second_order_on_difficulty():
    clf, hard, a = _head("maxpool_adaptive"), _head("gap_bn", 1, 1), _features()
    full = attribute(clf, a, hardness_head=hard)
    tol = dict(rtol=1e-5, atol=1e-6 * float(np.abs(full.maps).max()))  # float32 rounding of separately compiled runs
    top = attribute(clf, a, hardness_head=hard, top_n=2)
    order = np.argsort(-np.asarray(full.probs), axis=1)[:, :2]
    np.testing.assert_array_equal(top.classes, order)
    for n in range(a.shape[0]):
        np.testing.assert_allclose(top.maps[n, :2], full.maps[n, order[n]], **tol)
        np.testing.assert_allclose(top.maps[n, 2], full.maps[n, -1], **tol)
    pos = attribute(clf, a, hardness_head=hard, positive=True)
    np.testing.assert_allclose(pos.maps, np.maximum(full.maps, 0), **tol)
    assert (np.asarray(full.maps) < 0).any()
    ab = attribute(clf, a, hardness_head=hard, abs_second=True)
    np.testing.assert_allclose(ab.maps, full.first_order + np.abs(full.second_order), **tol)
    dm = attribute(clf, a, hardness_head=hard, second_order_on="difficulty")
    np.testing.assert_allclose(dm.class_maps, full.first_order[:, :-1], **tol)
    np.testing.assert_allclose(dm.difficulty_map, full.maps[:, -1], **tol)
    grad = attribute(clf, a, hardness_head=hard, method="gradient")
    np.testing.assert_allclose(grad.maps, full.first_order, **tol)


def test_hand_computed_gradient_maps():
    """GAP + linear head, two classes, two locations: z = W^T mean(A) + b. With p = softmax(z) and
    u_l = W^T a_l / 2 the logit tangent of location l, dp_0 = p_0 p_1 (u_l0 - u_l1)."""
    head = PoolMLPHead(2, 2, rngs=nnx.Rngs(0))
    head.linears[0].kernel[...] = jnp.array([[1.0, -1.0], [0.5, 0.0]])
    head.linears[0].bias[...] = jnp.zeros(2)
    a = jnp.array([[[[2.0, 0.0], [0.0, 4.0]]]])  # (1, 1, 2, 2): a_0 = (2, 0), a_1 = (0, 4)
    # z = W^T (1, 2) = (1*1 + 0.5*2, -1) = (2, -1); p_0 = 1 / (1 + e^-3)
    p0 = 1 / (1 + np.exp(-3.0))
    p1 = 1 - p0
    u = np.array([[1.0, -1.0], [1.0, 0.0]])  # u_0 = W^T (2,0)/2 = (1,-1); u_1 = W^T (0,4)/2 = (1, 0)
    expected_class0 = p0 * p1 * (u[:, 0] - u[:, 1])  # (2, 0) * p0 p1
    r = attribute(head, a, score="hesitancy", method="gradient", **EQ2)
    np.testing.assert_allclose(r.maps[0, 0, 0], expected_class0, rtol=1e-6)
    np.testing.assert_allclose(r.maps[0, 1, 0], -expected_class0, rtol=1e-6)
    np.testing.assert_allclose(r.maps[0, 2, 0], -expected_class0, rtol=1e-6)  # hesitancy = 1 - p_0 (p_0 is max)


@pytest.mark.slow  # several seconds of CPU (measured 3-24 s on the 2-core CPU)
def test_grad_cam_on_linear_head_is_class_weighted_activation():
    head = _head("gap_bn")
    lin = PoolMLPHead(D, C, rngs=nnx.Rngs(1))
    a = _features()
    cam = grad_cam(lin, a, jnp.array([3, 1]))
    w = np.asarray(lin.linears[0].kernel[...])
    hw = a.shape[1] * a.shape[2]
    expected = np.maximum(np.einsum("bhwd,db->bhw", np.asarray(a), w[:, [3, 1]]) / hw, 0)
    np.testing.assert_allclose(cam, expected, rtol=1e-5, atol=1e-7)
    assert grad_cam(head, a).shape == (2, 4, 5)


@pytest.mark.slow  # several seconds of CPU (measured 3-24 s on the 2-core CPU)
def test_attribute_images_equals_features_then_attribute():
    model = create_model("small", 6, hardness="network", rngs=nnx.Rngs(0))
    model.eval()
    x = jnp.asarray(np.random.RandomState(0).randn(2, 32, 32, 3), jnp.float32)
    got = attribute_images(model, x, method="gradient_hessian", top_n=3)
    a = model.features(x)
    a_s = model.hardness_features(x, a)
    ref = attribute(model.classifier, a, hardness_head=model.hardness_network.head, hardness_features=a_s, top_n=3)
    np.testing.assert_allclose(got.maps, ref.maps, rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(got.score, ref.score, rtol=1e-5)


@pytest.mark.parametrize(
    "kwargs,features,match",
    [
        ({}, np.full((1, 3, 3, D), np.nan, np.float32), "NaN or inf"),
        ({}, np.full((1, 3, 3, D), np.inf, np.float32), "NaN or inf"),
        ({}, np.ones((3, 3, D), np.float32), r"\(B, H, W, D\)"),
        ({}, np.ones((1, 3, 3, D + 1), np.float32), "channels"),
        ({"top_n": C + 1}, np.ones((1, 3, 3, D), np.float32), "top_n"),
        ({"method": "lrp"}, np.ones((1, 3, 3, D), np.float32), "unknown method"),
        ({"score": "margin"}, np.ones((1, 3, 3, D), np.float32), "unknown difficulty score"),
        ({"score": "hardness"}, np.ones((1, 3, 3, D), np.float32), "needs a hardness_head"),
        (
            {"method": "integrated_gradients", "steps": 0, "score": "entropy"},
            np.ones((1, 3, 3, D), np.float32),
            "steps",
        ),
    ],
)
def test_bad_input_gives_one_clear_error(kwargs, features, match):
    with pytest.raises(ValueError, match=match):
        attribute(_head("gap_bn"), features, **kwargs)


def test_single_class_head_is_refused():
    with pytest.raises(ValueError, match="at least 2 classes"):
        attribute(_head("gap_bn", out=1), _features(), score="entropy")


def test_mismatched_hardness_features():
    with pytest.raises(ValueError, match="share"):
        attribute(
            _head("gap_bn"), _features(), hardness_head=_head("gap_bn", 1), hardness_features=_features((2, 3, 3, D))
        )


@pytest.mark.parametrize("method", ["gradient", "gradient_hessian", "integrated_gradients"])
@pytest.mark.parametrize("score", ["hardness", "entropy"])
@pytest.mark.slow  # several seconds of CPU (measured 3-24 s on the 2-core CPU)
def test_positive_channel_difficulty_map(method, score):
    """The authors' difficulty map: sum_d a_d max(ds/da_d, 0), by hand from jax.grad; class maps unchanged."""
    clf, hard, a = _head("maxpool_adaptive"), _head("gap_bn", 1, 1), _features()
    signed = attribute(clf, a, hardness_head=hard, score=score, method=method, steps=16, **EQ2)
    pos = attribute(clf, a, hardness_head=hard, score=score, method=method, steps=16)  # the default
    tol = dict(rtol=1e-5, atol=1e-6 * float(np.abs(signed.maps).max()))
    np.testing.assert_allclose(pos.class_maps, signed.class_maps, **tol)
    if score == "hardness":
        s = lambda x: jax.nn.sigmoid(hard(x)[:, 0])
    else:
        s = lambda x: output_functions(score)[0](clf(x))[:, -1]
    if method == "integrated_gradients":
        from delib_jax.attribution import quadrature

        alphas, weights = quadrature(16, "trapezoid")
        grad = sum(w * jax.grad(lambda y: s(y).sum())(al * a) for al, w in zip(alphas, weights))
    else:
        grad = jax.grad(lambda y: s(y).sum())(a)
    expected = np.sum(np.asarray(a) * np.maximum(np.asarray(grad), 0), axis=-1)
    np.testing.assert_allclose(pos.first_order[:, -1], expected, rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(pos.second_order, signed.second_order, **tol)
    assert (np.asarray(pos.first_order[:, -1]) >= 0).all()
    assert not np.allclose(pos.first_order[:, -1], signed.first_order[:, -1])


@pytest.mark.slow  # brute-force references or many compiled variants
def test_generic_path_chunking_over_locations_changes_nothing():
    clf, hard, a = _head("overlap_pool"), _head("gap_bn", 1, 1), _features()
    whole = attribute(clf, a, hardness_head=hard, path="generic")
    chunked = attribute(clf, a, hardness_head=hard, path="generic", chunk_size=3)  # 20 locations: 7 chunks, padded
    np.testing.assert_allclose(chunked.maps, whole.maps, rtol=1e-5, atol=1e-5 * float(np.abs(whole.maps).max()))


@pytest.mark.slow  # brute-force references or many compiled variants
def test_bfloat16_backbone_keeps_float32_attribution_arithmetic():
    x = jnp.asarray(np.random.RandomState(0).randn(2, 32, 32, 3), jnp.float32)
    m32 = create_model("small", 6, rngs=nnx.Rngs(0))
    m16 = create_model("small", 6, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    r32 = attribute_images(m32, x)
    r16 = attribute_images(m16, x)
    assert r16.maps.dtype == jnp.float32 and r16.probs.dtype == jnp.float32
    # only the backbone's rounding differs: the maps agree to bfloat16 precision of A
    scale = float(np.abs(r32.maps).max())
    assert float(np.abs(r16.maps - r32.maps).max()) < 0.1 * scale


@pytest.mark.parametrize("score", ["entropy", "hesitancy"])
@pytest.mark.slow  # brute-force references or many compiled variants
def test_confident_prediction_gives_finite_maps_equal_to_float64(score):
    """Logits about (50, 0, -50): p_2 ~ 1e-44 underflows in float32; the entropy's second derivative divided by an
    underflowed p^2 (NaN maps) before the scores were taken from the logits. The true maps are ~1e-19 and below;
    float32 must get them to far better than its resolution of an O(1) map (1e-12 absolute; the float32 rounding
    noise of the top class's tangent alone was ~1e-9 before the logits were centred on the top class)."""

    def head(dtype):
        h = PoolMLPHead(D, 3, rngs=nnx.Rngs(0))
        kernel = (np.random.RandomState(0).randn(D, 3) * 0.1).astype(np.float32)  # the same weights in both
        h.linears[0].kernel.set_value(jnp.asarray(kernel, dtype))  # whole arrays: float64 ones for the reference
        h.linears[0].bias.set_value(jnp.asarray([50.0, 0.0, -50.0], dtype))
        return h

    a = _features()
    with jax.enable_x64(True):
        ref = attribute(head(jnp.float64), jnp.asarray(a, jnp.float64), score=score, difficulty_channels="signed")
    for path in ("fast", "generic"):
        got = attribute(head(jnp.float32), a, score=score, path=path, difficulty_channels="signed")
        assert np.isfinite(np.asarray(got.maps)).all(), path
        np.testing.assert_allclose(got.maps, ref.maps, rtol=1e-4, atol=1e-12)


class CountingHead(SmoothHead):
    """SmoothHead that counts how often it is traced or run eagerly (a compiled call does not run Python)."""

    calls = 0

    def __call__(self, a):
        CountingHead.calls += 1
        return super().__call__(a)


@pytest.mark.slow  # brute-force references or many compiled variants
def test_attribute_and_grad_cam_compile_once_per_head_structure():
    """Repeated calls, on other weights of the same structure too, reuse one compiled function (re-wrapping the head
    in nnx.jit on every call cost ~0.25 s of tracing with the VGG16 head)."""
    a = _features((2, 3, 4, D))
    heads = [CountingHead(D, C, rngs=nnx.Rngs(seed)) for seed in range(3)]
    for fn in (lambda h: attribute(h, a, score="entropy", path="generic").maps, lambda h: grad_cam(h, a)):
        fn(heads[0])
        before = CountingHead.calls
        results = [np.asarray(fn(h)) for h in heads]
        assert CountingHead.calls == before  # no Python run of the head: every call was the compiled one
        assert not np.allclose(results[1], results[2])  # and it used each head's own weights


def _train_mode_head():
    head = _head("gap_bn")
    head.train()  # batch statistics and dropout, as a head in the middle of training
    head.dropout.rate = 0.5
    return head


@pytest.mark.slow  # several seconds of CPU (measured 3-24 s on the 2-core CPU)
def test_heads_run_in_eval_mode_and_keep_their_own_mode():
    """attribute / grad_cam / make_attribute_fn on modules left in train mode: eval-mode results (running
    statistics, no dropout), the running statistics untouched, and the caller's modules still in train mode."""
    head, reference = _train_mode_head(), _head("gap_bn")  # same weights, eval mode
    a = _features()
    stats = np.asarray(head.norms[0].mean[...]).copy()
    for fn in (
        lambda h: attribute(h, a, score="entropy").maps,
        lambda h: grad_cam(h, a),
        lambda h: attribute(h, a, score="entropy", jit=False).maps,
        lambda h: grad_cam(h, a, "all"),
    ):
        np.testing.assert_allclose(fn(head), fn(reference), rtol=1e-5, atol=1e-7)
        assert head.norms[0].use_running_average is False and head.dropout.deterministic is False
        np.testing.assert_array_equal(head.norms[0].mean[...], stats)
    model = create_model("small", 4, rngs=nnx.Rngs(0))
    x = jnp.asarray(np.random.RandomState(0).randn(2, 32, 32, 3), jnp.float32)
    expected = make_attribute_fn(model)(x).maps
    model.train()
    np.testing.assert_allclose(make_attribute_fn(model)(x).maps, expected, rtol=1e-5, atol=1e-7)
    assert model.backbone.norms[0].use_running_average is False


@pytest.mark.slow  # brute-force references or many compiled variants
def test_grad_cam_of_every_class_in_one_call_equals_per_class_maps():
    head = _head("maxpool_adaptive")
    a = _features((3, 4, 5, D))
    every = grad_cam(head, a, "all")
    assert every.shape == (3, C, 4, 5)
    chosen = jnp.array([[4, 0], [1, 1], [2, 3]])
    some = grad_cam(head, a, chosen)
    for k in range(C):
        np.testing.assert_allclose(every[:, k], grad_cam(head, a, jnp.full(3, k)), rtol=1e-5, atol=1e-7)
    for j in range(2):
        np.testing.assert_allclose(some[:, j], grad_cam(head, a, chosen[:, j]), rtol=1e-5, atol=1e-7)
    predicted = jnp.argmax(head(a), axis=-1)
    np.testing.assert_allclose(grad_cam(head, a), grad_cam(head, a, predicted), rtol=1e-6)
    # against the definition by jax.grad, one class at a time
    for k in range(C):
        g = jax.grad(lambda x, k=k: head(x)[:, k].sum())(a)
        ref = jnp.maximum(jnp.einsum("bhwd,bd->bhw", a, g.mean(axis=(1, 2))), 0)
        np.testing.assert_allclose(every[:, k], ref, rtol=1e-5, atol=1e-7)
    for bad in (jnp.array([C, 0, 0]), jnp.array([0, 1]), "most"):
        with pytest.raises(ValueError, match="target"):
            grad_cam(head, a, bad)


@pytest.mark.slow  # brute-force references or many compiled variants
def test_float64_integrated_gradients_and_grad_cam_stay_float64():
    """Under x64: quadrature nodes and weights in float64 (float32 ones capped completeness at ~2e-8), and Grad-CAM
    of float64 features computed in float64."""
    from delib_jax.attribution import quadrature

    with jax.enable_x64(True):
        alphas, weights = quadrature(7, "midpoint")
        assert alphas.dtype == weights.dtype == np.float64
        assert quadrature(7, "midpoint", np.float32)[0].dtype == np.float32
        np.testing.assert_array_equal(alphas, (np.arange(7) + 0.5) / 7)  # the float64 values, not float32's
        clf = _head("gap_bn", dtype=jnp.float64)
        a = jnp.asarray(_features((2, 3, 3, D), dtype=np.float64))
        r = attribute(clf, a, score="hesitancy", method="integrated_gradients", steps=7, quadrature="midpoint", **EQ2)
        assert r.maps.dtype == jnp.float64
        # sum over locations = the quadrature of the directional derivative along A (zero baseline), in float64
        g = lambda x: output_functions("hesitancy")[0](clf(x))
        expected = sum(w * jax.jvp(g, (al * a,), (a,))[1] for al, w in zip((np.arange(7) + 0.5) / 7, weights))
        np.testing.assert_allclose(r.maps.sum(axis=(2, 3)), expected, rtol=1e-12, atol=1e-15)
        cam = grad_cam(_head("gap_bn", dtype=jnp.float64), a)
        assert cam.dtype == jnp.float64


def test_one_difficulty_channels_default_everywhere():
    """attribute, make_attribute_fn, explain / make_explain_fn, delib explain and the evaluation share one default
    (the authors' "positive" rule), so a map from the library is the map the commands draw and evaluate."""
    import inspect

    from delib_jax.attribution import Options
    from delib_jax.cli import build_parser
    from delib_jax.evaluation.protocol import EvalOptions
    from delib_jax.evaluation.run import build_parser as eval_parser
    from delib_jax.explanation import explain, make_explain_fn

    default = Options().difficulty_channels
    assert default == "positive"
    assert inspect.signature(make_explain_fn).parameters["difficulty_channels"].default == default
    assert "difficulty_channels" not in inspect.signature(explain).parameters  # explain passes it to make_explain_fn
    assert EvalOptions().difficulty_channels == default
    assert build_parser().parse_args(["explain", "x", "--checkpoint", "r", "--out", "o"]).difficulty_channels == default
    for dataset in ("cub", "ade20k"):
        assert eval_parser(dataset).parse_args(["--checkpoint", "r", "--out", "o"]).difficulty_channels == default
    clf, hard, a = _head("maxpool_adaptive"), _head("gap_bn", 1, 1), _features()
    np.testing.assert_array_equal(
        attribute(clf, a, hardness_head=hard).maps,
        attribute(clf, a, hardness_head=hard, difficulty_channels=default).maps,
    )


@pytest.mark.parametrize("head_name", sorted(HEADS))
@pytest.mark.slow  # brute-force references or many compiled variants
def test_tangent_layouts_give_the_same_maps(head_name):
    clf, hard = _head(head_name), _head("gap_bn", out=1, seed=1)
    a = _features()
    maps = {
        layout: attribute(clf, a, hardness_head=hard, path="fast", tangent_layout=layout).maps
        for layout in ("feature_major", "row_major")
    }
    scale = float(jnp.max(jnp.abs(maps["feature_major"])))
    np.testing.assert_allclose(maps["row_major"], maps["feature_major"], rtol=1e-5, atol=1e-6 * scale)


def test_tangent_layout_defaults_to_the_faster_one_per_backend():
    assert tangent_layout("auto", "cpu") == "feature_major"
    assert tangent_layout("auto", "gpu") == "row_major" and tangent_layout("auto", "tpu") == "row_major"
    assert tangent_layout("row_major", "cpu") == "row_major"
    with pytest.raises(ValueError, match="tangent_layout must be one of"):
        attribute(_head("gap_bn"), _features(), hardness_head=_head("gap_bn", out=1), tangent_layout="column")
