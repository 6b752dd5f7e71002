"""Integrated / Expected Hessians against brute-force float64 double integrals of jax.hessian, the -ln t Gauss rule,
completeness, softplus surrogates of ReLU networks, and SmoothHess against closed-form Gaussian-smoothed Hessians."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from delib_jax.attribution import (
    count_relus,
    expected_hessians,
    grid_masks,
    integrated_hessians,
    log_quadrature,
    smooth_hessians,
    softplus_surrogate,
    split_model,
    surrogate_gap,
)
from delib_jax.models import create_model
from delib_jax.testing.tiny import TinySmoothCNN, randomise


def _tiny(seed=0, dtype=jnp.float64):
    return randomise(TinySmoothCNN(rngs=nnx.Rngs(seed)), seed, dtype, scale=0.5)


def _images(shape, seed=0, dtype=np.float64):
    return jnp.asarray(np.random.RandomState(seed).randn(*shape).astype(dtype))


def _rel(x, ref):
    return float(np.abs(np.asarray(x) - np.asarray(ref)).max() / max(np.abs(np.asarray(ref)).max(), 1e-30))


def brute_force(fn, xs, bases, grid=20):
    """Full Gamma (B, P, D, D) of every output of fn (one X (H, W, C) -> (P,)) for each image, by a grid x grid
    Gauss-Legendre rule in (a, b) over the smooth integrand a b delta_i delta_j H_ij + [i = j] delta_i g_i at
    x' + a b delta, with jax.hessian (one compiled pass)."""
    nodes, weights = np.polynomial.legendre.leggauss(grid)
    a, w = (nodes + 1) / 2, weights / 2
    ab = jnp.asarray(np.outer(a, a).reshape(-1))
    wab = jnp.asarray(np.outer(w, w).reshape(-1))
    shape = xs.shape[1:]
    f = lambda v: fn(v.reshape(shape))

    def one(x, base):
        d = (x - base).reshape(-1)
        pts = base.reshape(-1)[None] + ab[:, None] * d[None]
        hess, grads = jax.vmap(lambda p: (jax.hessian(f)(p), jax.jacobian(f)(p)))(pts)  # (G, P, D, D), (G, P, D)
        second = jnp.einsum("g,g,gpij->pij", wab, ab, hess) * jnp.outer(d, d)
        return second + jax.vmap(jnp.diag)(d * jnp.einsum("g,gpi->pi", wab, grads))

    return jax.jit(jax.vmap(one))(xs, bases)


def _group(gamma, shape, masks):
    """Gamma (D, D) over X (H, W, C) -> (R, R) summed over channels and the masks (R, H, W)."""
    h, w, c = shape
    m = jnp.asarray(masks).reshape(masks.shape[0], h * w)
    g = gamma.reshape(h * w, c, h * w, c).sum((1, 3))
    return m @ g @ m.T


def test_log_quadrature_is_the_gauss_rule_of_the_log_weight():
    """Exact (float64) on t^k, k < 2n, whose -ln t moments are 1 / (k + 1)^2; geometric convergence on exp(t)."""
    for n in (1, 3, 8, 20, 40):
        t, w = log_quadrature(n, np.float64)
        assert np.all((t > 0) & (t < 1)) and np.all(w > 0)
        k = np.arange(2 * n)
        np.testing.assert_allclose((w[None] * t[None] ** k[:, None]).sum(1), 1.0 / (k + 1.0) ** 2, rtol=1e-12)
        # a rule with n nodes is not exact one degree higher
        assert abs((w * t ** (2 * n)).sum() - 1.0 / (2 * n + 1) ** 2) > 1e-300
    exact = sum(1.0 / (math.factorial(k) * (k + 1) ** 2) for k in range(40))  # int_0^1 -ln t e^t dt
    errors = [abs((w * np.exp(t)).sum() - exact) for t, w in (log_quadrature(n, np.float64) for n in (2, 4, 8))]
    assert errors[0] > 1e-5 and errors[1] < 1e-8 and errors[2] < 1e-14
    with pytest.raises(ValueError, match="nodes"):
        log_quadrature(0)


@pytest.mark.slow
def test_integrated_hessians_equal_brute_force_double_integral_float64():
    """Locations (L x L), caller masks and pixel rows, each to 1e-6 relative of the (a, b)-grid reference."""
    with jax.enable_x64(True):
        model = _tiny()
        images = _images((2, 4, 4, 3))
        x = model.features(images)
        base = 0.3 * _images(x.shape, seed=1)
        inter = integrated_hessians(model.features, model.head, images, baseline=base, targets=2, nodes=32)
        assert inter.values.shape == (2, 2, 16, 16)
        gammas = brute_force(lambda v: jax.nn.softmax(model.head(v[None]))[0], x, base)  # (B, P, D, D)
        eye = np.eye(16).reshape(16, 4, 4)
        for b in range(2):
            for n in range(2):
                ref = _group(gammas[b, int(inter.targets[b, n])], (4, 4, 4), eye)
                assert _rel(inter.values[b, n], ref) < 1e-6
        # caller masks: a region against the rest
        region = np.zeros((4, 4), np.float32)
        region[1:3, :2] = 1
        masks = np.stack([region, 1 - region])
        regions = integrated_hessians(
            model.features, model.head, images, baseline=base, targets=2, rows=masks, columns=masks, nodes=32
        )
        for b in range(2):
            ref = _group(gammas[b, int(regions.targets[b, 1])], (4, 4, 4), masks)
            assert _rel(regions.values[b, 1], ref) < 1e-6
        # pixel level: X = the images, two pixel rows against every pixel
        pix = integrated_hessians(None, model, 0.5 * images, targets=1, rows=[0, 9], nodes=40)
        gammas = brute_force(lambda v: jax.nn.softmax(model(v[None]))[0], 0.5 * images, jnp.zeros_like(images), 28)
        assert np.abs(np.asarray(pix.row_residual)).max() < 1e-9  # columns: every pixel
        assert pix.values.shape == (2, 1, 2, 16)
        for b in range(2):
            ref = gammas[b, int(pix.targets[b, 0])].reshape(16, 3, 16, 3).sum((1, 3))[jnp.asarray([0, 9])]
            assert _rel(pix.values[b, 0], ref) < 1e-6


@pytest.mark.slow
def test_completeness_rows_sum_to_integrated_gradients_and_total_to_the_difference():
    with jax.enable_x64(True):
        model = _tiny(3)
        images = _images((2, 6, 6, 3), seed=3)
        inter = integrated_hessians(model.features, model.head, images, output="log_probs", nodes=48, ig_nodes=48)
        scale = np.abs(np.asarray(inter.difference)).max()
        assert np.abs(np.asarray(inter.residual)).max() < 1e-10 * max(scale, 1)
        assert np.abs(np.asarray(inter.row_residual)).max() < 1e-10 * max(scale, 1)
        assert np.abs(np.asarray(inter.ig_residual)).max() < 1e-10 * max(scale, 1)
        np.testing.assert_allclose(inter.values.sum(3), inter.attributions, atol=1e-10 * max(scale, 1))
        # few nodes: the residual reports the quadrature error it makes (it is not forced to zero)
        coarse = integrated_hessians(model.features, model.head, images, output="log_probs", nodes=1, ig_nodes=1)
        assert np.abs(np.asarray(coarse.residual)).max() > 1e-6
        # the residual of the total is what the values' error against the converged ones is, in sum
        np.testing.assert_allclose(
            coarse.values.sum((2, 3)) - inter.values.sum((2, 3)), coarse.residual - inter.residual, atol=1e-12
        )


@pytest.mark.slow
def test_float32_within_the_stated_residual_and_chunking_is_exact():
    with jax.enable_x64(True):
        model64 = _tiny(1)  # float64 parameters holding model32's values (drawn in float32)
    model32 = _tiny(1, jnp.float32)
    images = _images((2, 4, 4, 3), seed=1, dtype=np.float32)
    with jax.enable_x64(True):
        ref = integrated_hessians(
            model64.features, model64.head, jnp.asarray(np.asarray(images), jnp.float64), targets=3
        )
        ref_residual = np.abs(np.asarray(ref.residual)).max()
    got = integrated_hessians(model32.features, model32.head, images, targets=3)
    chunked = integrated_hessians(model32.features, model32.head, images, targets=3, chunk_size=5)
    assert got.values.dtype == jnp.float32
    scale = np.abs(np.asarray(ref.values)).max()
    assert _rel(got.values, ref.values) < 1e-4
    # float32 adds rounding to the quadrature error the float64 residual states, no more
    assert np.abs(np.asarray(got.residual)).max() < ref_residual + 1e-5 * max(scale, 1)
    np.testing.assert_allclose(chunked.values, got.values, rtol=1e-5, atol=1e-6 * scale)


@pytest.mark.slow
def test_expected_hessians_average_integrated_hessians_over_data_baselines():
    with jax.enable_x64(True):
        model = _tiny(2)
        images = _images((2, 4, 4, 3), seed=2)
        refs = _images((3, 4, 4, 3), seed=5)
        masks = grid_masks((4, 4), (2, 2))
        exp = expected_hessians(
            model.features, model.head, images, refs, targets=2, rows=masks, columns=masks, nodes=16
        )
        singles = [
            integrated_hessians(
                model.features,
                model.head,
                images,
                baseline=model.features(refs[m : m + 1])[0],
                targets=exp.targets,
                rows=masks,
                columns=masks,
                nodes=16,
            )
            for m in range(3)
        ]
        stack = np.stack([np.asarray(s.values) for s in singles])
        np.testing.assert_allclose(exp.values, stack.mean(0), rtol=1e-10, atol=1e-14)
        np.testing.assert_allclose(exp.stderr, stack.std(0, ddof=1) / np.sqrt(3), rtol=1e-8, atol=1e-14)
        fx = jax.nn.softmax(model(images))
        fr = jax.nn.softmax(model(refs)).mean(0)
        diff = np.take_along_axis(np.asarray(fx - fr[None]), np.asarray(exp.targets), 1)
        np.testing.assert_allclose(exp.difference, diff, rtol=1e-10)
        # the residual is the mean of the paths' quadrature residuals
        np.testing.assert_allclose(exp.residual, np.mean([s.residual for s in singles], 0), atol=1e-12)


def test_grid_masks_partition_the_image():
    m = grid_masks((7, 10), (3, 4))
    assert m.shape == (12, 7, 10)
    np.testing.assert_array_equal(m.sum(0), 1)
    assert m.sum((1, 2)).min() >= 2
    with pytest.raises(ValueError, match="grid"):
        grid_masks((4, 4), (5, 1))


@pytest.mark.slow
def test_bad_arguments_raise_one_clear_error():
    model = _tiny(0, jnp.float32)
    images = _images((1, 4, 4, 3), dtype=np.float32)
    with pytest.raises(ValueError, match="rows"):
        integrated_hessians(model.features, model.head, images, rows=[16])
    with pytest.raises(ValueError, match="columns"):
        integrated_hessians(model.features, model.head, images, columns=np.ones((2, 3, 3)))
    with pytest.raises(ValueError, match="beta"):
        integrated_hessians(model.features, model.head, images, beta=0.0)
    with pytest.raises(ValueError, match="nodes"):
        integrated_hessians(model.features, model.head, images, nodes=0)
    with pytest.raises(ValueError, match="baseline"):
        integrated_hessians(model.features, model.head, images, baseline=jnp.zeros((3, 3, 5)))
    with pytest.raises(ValueError, match="references"):
        expected_hessians(model.features, model.head, images, jnp.zeros((2, 5, 5, 3)))
    with pytest.raises(ValueError, match="sigma"):
        smooth_hessians(model.features, model.head, images, sigma=-1.0)


# ---- softplus surrogates


class _ReluMLP(nnx.Module):
    def __init__(self, act, *, rngs):
        self.l1 = nnx.Linear(6, 8, rngs=rngs)
        self.l2 = nnx.Linear(8, 3, rngs=rngs)
        self.act = act

    def __call__(self, x):
        return self.l2(self.act(self.l1(x.reshape(x.shape[0], -1))))


def test_softplus_surrogate_is_the_softplus_network_on_the_same_weights():
    model = _ReluMLP(nnx.relu, rngs=nnx.Rngs(0))
    x = _images((4, 1, 2, 3), dtype=np.float32)
    beta = 3.0
    twin = _ReluMLP(lambda v: jax.nn.softplus(beta * v) / beta, rngs=nnx.Rngs(0))
    smooth = softplus_surrogate(model, beta)
    np.testing.assert_allclose(smooth(x), twin(x), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(jax.jit(smooth)(x), twin(x), rtol=1e-6, atol=1e-6)
    g = lambda f: jax.grad(lambda v: f(v)[:, 1].sum())(x)
    np.testing.assert_allclose(g(smooth), g(twin), rtol=1e-5, atol=1e-6)
    # no copy: the surrogate reads the module's weights as they are now
    model.l2.bias[...] = model.l2.bias[...] + 1.0
    np.testing.assert_allclose(smooth(x), twin(x) + 1.0, rtol=1e-6, atol=1e-5)
    with pytest.raises(ValueError, match="no ReLU"):
        softplus_surrogate(jnp.tanh, 2.0)(x)
    with pytest.raises(ValueError, match="beta"):
        softplus_surrogate(model, -1.0)


@pytest.mark.slow
def test_surrogate_of_a_shipped_backbone_converges_to_the_model():
    model = create_model("small", 5)
    features, head = split_model(model, "image")
    x = _images((2, 32, 32, 3), dtype=np.float32)
    assert count_relus(head, x) >= 4  # the backbone's ReLUs (and the head's, if any)
    gaps = [float(surrogate_gap(head, x, beta).max_abs.max()) for beta in (1.0, 10.0, 100.0)]
    assert gaps[0] > gaps[1] > gaps[2] > 0
    assert gaps[2] < 2e-2 and gaps[1] < 10 * gaps[2] * 10
    # integrated Hessians of the surrogate: the ReLU network itself has no curvature below the softmax
    feats, tail = split_model(model, "conv2")
    small = x[:1, :16, :16]  # an 8 x 8 grid at conv2
    smooth = integrated_hessians(feats, tail, small, targets=1, output="logits", beta=5.0, nodes=4)
    plain = integrated_hessians(feats, tail, small, targets=1, output="logits", nodes=4)
    off = ~np.eye(smooth.values.shape[-1], dtype=bool)
    assert np.abs(np.asarray(plain.values[0, 0])[off]).max() < 1e-5 * np.abs(np.asarray(smooth.values)).max()
    assert np.abs(np.asarray(smooth.values[0, 0])[off]).max() > 1e-4 * np.abs(np.asarray(smooth.values)).max()


# ---- SmoothHess


def _cosine_head(a, c):
    """X (B, 2, 2, 3) -> [cos(a . x), sum_i c_i cos(x_i)]: Gaussian smoothing multiplies each by a known factor."""

    def head(x):
        f = x.reshape(x.shape[0], -1)
        return jnp.stack([jnp.cos(f @ a), jnp.cos(f) @ c], -1)

    return head


def _smoothed_quadratic_form(x, a, c, sigma, masks):
    f = x.reshape(x.shape[0], -1)
    h0 = -jnp.einsum("i,j,b->bij", a, a, jnp.cos(f @ a)) * jnp.exp(-(sigma**2) * (a @ a) / 2)
    h1 = jax.vmap(jnp.diag)(-c * jnp.cos(f) * jnp.exp(-(sigma**2) / 2))
    q = jnp.einsum("bi,bnij,bj->bnij", f, jnp.stack([h0, h1], 1), f)  # (B, 2, 12, 12)
    q = q.reshape(x.shape[0], 2, 4, 3, 4, 3).sum((3, 5)).reshape(x.shape[0], 2, 4, 4)
    m = jnp.asarray(masks).reshape(masks.shape[0], 4)
    return jnp.einsum("rl,bnlm,sm->bnrs", m, q, m)


@pytest.mark.slow
def test_smoothhess_converges_to_the_closed_form_smoothed_hessian_as_one_over_sqrt_k():
    with jax.enable_x64(True):
        rng = np.random.RandomState(0)
        a, c = jnp.asarray(rng.randn(12) * 0.7), jnp.asarray(rng.randn(12))
        x = jnp.asarray(rng.randn(2, 2, 2, 3))
        sigma = 0.5
        masks = np.stack([np.eye(4)[[0, 3]].sum(0).reshape(2, 2), np.eye(4)[[1, 2]].sum(0).reshape(2, 2)])
        head = _cosine_head(a, c)  # one module: one compilation per shape, not one per call
        for rows, m in ((None, np.eye(4).reshape(4, 2, 2)), (masks, masks)):
            truth = np.asarray(_smoothed_quadratic_form(x, a, c, sigma, m))
            errors, z = {}, []
            for k in (64, 1024):
                runs = [
                    smooth_hessians(
                        None,
                        head,
                        x,
                        sigma=sigma,
                        samples=k,
                        output="logits",
                        key=jax.random.key(s),
                        rows=rows,
                        columns=rows,
                        chunk_size=256,
                    )  # fmt: skip
                    for s in range(6)
                ]
                errors[k] = np.sqrt(np.mean([(np.asarray(r.values) - truth) ** 2 for r in runs]))
                z += [np.abs(np.asarray(r.values) - truth) / np.asarray(r.stderr) for r in runs]
            ratio = errors[64] / errors[1024]  # sqrt(16) = 4 for an unbiased estimator with a 1 / sqrt(K) error
            assert 2.5 < ratio < 6.5, ratio
            assert np.mean(np.concatenate([v.ravel() for v in z]) < 3) > 0.97  # the stderr covers the error


@pytest.mark.slow
def test_smoothhess_plain_and_antithetic_estimators_agree_and_grow_no_bias():
    with jax.enable_x64(True):
        rng = np.random.RandomState(1)
        a, c = jnp.asarray(rng.randn(12) * 0.5), jnp.asarray(rng.randn(12))
        x = jnp.asarray(rng.randn(1, 2, 2, 3))
        truth = np.asarray(_smoothed_quadratic_form(x, a, c, 0.3, np.eye(4).reshape(4, 2, 2)))
        for anti in (True, False):
            r = smooth_hessians(None, _cosine_head(a, c), x, sigma=0.3, samples=4000, output="logits", antithetic=anti)
            assert np.mean(np.abs(np.asarray(r.values) - truth) < 4 * np.asarray(r.stderr) + 1e-12) > 0.95
        # a ReLU network: Hessian zero almost everywhere, its smoothed Hessian is not
        model = _ReluMLP(nnx.relu, rngs=nnx.Rngs(0))
        sh = smooth_hessians(None, model, jnp.asarray(rng.randn(1, 1, 2, 3)), sigma=0.5, samples=512, output="logits")
        assert np.abs(np.asarray(sh.values)).max() > 5 * np.asarray(sh.stderr).max()


def _primitives(jaxpr) -> list[str]:
    """Every primitive's name in a jaxpr, nested calls included."""
    names = []
    for eqn in jaxpr.eqns:
        names.append(eqn.primitive.name)
        for key in ("jaxpr", "call_jaxpr"):
            if key in eqn.params:
                names += _primitives(getattr(eqn.params[key], "jaxpr", eqn.params[key]))
    return names


def test_tiled_max_pools_of_the_surrogate_as_reshapes_same_values_gradients_and_products():
    """Max pools whose windows tile their input (2 x 2 stride 2, an odd size dropping its last row and column) are
    evaluated as a reshape and a max: the surrogate's values, gradients and Hessian-vector products equal those of
    the softplus network with XLA's pools (float64, no ties), and no select-and-scatter is left for them; an
    overlapping pool (3 x 3 stride 2 padded) stays as it was."""
    from flax import nnx as _nnx

    rng = np.random.RandomState(0)
    w1, w2 = jnp.asarray(rng.randn(3, 3, 3, 4)), jnp.asarray(rng.randn(3, 3, 4, 5))

    def net(act):
        def f(x):  # (B, 9, 9, 3) -> (B, 5)
            y = act(jax.lax.conv_general_dilated(x, w1, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")))
            y = _nnx.max_pool(y, (2, 2), strides=(2, 2))  # tiles 8 of the 9 rows and columns
            y = act(jax.lax.conv_general_dilated(y, w2, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")))
            y = _nnx.max_pool(y, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))  # overlapping: kept
            return y.mean((1, 2))

        return f

    beta = 4.0
    smooth = softplus_surrogate(net(jax.nn.relu), beta)
    twin = net(lambda v: jax.nn.softplus(beta * v) / beta)
    x = _images((2, 9, 9, 3))
    v = _images((2, 9, 9, 3), seed=1)
    np.testing.assert_allclose(smooth(x), twin(x), rtol=1e-12, atol=1e-12)
    grad = lambda f: jax.grad(lambda y: f(y)[:, 2].sum())
    hvp = lambda f: jax.jvp(grad(f), (x,), (v,))[1]
    np.testing.assert_allclose(grad(smooth)(x), grad(twin)(x), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(hvp(smooth), hvp(twin), rtol=1e-10, atol=1e-12)
    assert float(jnp.abs(hvp(twin)).max()) > 1e-3  # a product that is not zero
    product = lambda f: _primitives(jax.make_jaxpr(lambda y: jax.jvp(grad(f), (y,), (v,))[1])(x).jaxpr)
    traced, reference = product(smooth), product(twin)
    assert reference.count("reduce_window_max") == 2 and traced.count("reduce_window_max") == 1  # the overlapping one
    assert 0 < traced.count("select_and_scatter_add") < reference.count("select_and_scatter_add")
