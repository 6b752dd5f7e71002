"""Faithfulness metrics against slow per-input references, hand-derived cases on a linear head, and bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from delib_jax.evaluation.faithfulness import curve_area, infidelity, perturbation_curves
from delib_jax.models import PoolMLPHead
from delib_jax.testing.tiny import randomise

D, C = 3, 4


def _x(shape=(2, 3, 4, D), seed=0):
    return jnp.asarray(np.abs(np.random.RandomState(seed).randn(*shape)).astype(np.float32))


def _maps(b, m, h, w, seed=1):
    return jnp.asarray(np.random.RandomState(seed).randn(b, m, h, w).astype(np.float32))


@pytest.mark.slow  # several seconds of CPU (measured 3-24 s on the 2-core CPU)
def test_curves_equal_a_loop_over_images_maps_and_steps():
    head = randomise(PoolMLPHead(D, C, hidden=(5,), rngs=nnx.Rngs(0)), 0)
    x, maps = _x(), _maps(2, 3, 3, 4)
    targets = np.array([[0, 1, 2], [3, 3, 0]])
    base = 0.5 * x
    for mode in ("deletion", "insertion"):
        got = np.asarray(perturbation_curves(head, x, maps, targets, mode=mode, steps=4, baseline=base, batch_size=5))
        assert got.shape == (2, 3, 5)
        for i in range(2):
            for j in range(3):
                order = np.argsort(-np.asarray(maps[i, j]).ravel(), kind="stable")
                for t, n in enumerate(np.round(np.arange(5) * 12 / 4).astype(int)):
                    chosen = np.zeros(12, bool)
                    chosen[order[:n]] = True
                    chosen = chosen.reshape(3, 4, 1)
                    xi = np.where(chosen, base[i], x[i]) if mode == "deletion" else np.where(chosen, x[i], base[i])
                    ref = jax.nn.softmax(head(jnp.asarray(xi)[None]))[0, targets[i, j]]
                    np.testing.assert_allclose(got[i, j, t], ref, rtol=1e-5, atol=1e-7)
    full = jax.nn.softmax(head(x))
    np.testing.assert_allclose(got[:, :, -1], np.take_along_axis(np.asarray(full), targets, 1), rtol=1e-5)


@pytest.mark.slow  # several seconds of CPU (measured 3-24 s on the 2-core CPU)
def test_linear_head_gradient_times_input_is_the_ideal_deletion_order_and_has_zero_infidelity():
    """Logit of a GAP + linear head: z_t = sum_l w_t . x_l / L + b, so c_l = w_t . x_l / L (gradient x input) is each
    location's exact contribution: deleting in its order lowers z fastest, and f(x) - f(x - I) = I^T c exactly."""
    head = randomise(PoolMLPHead(D, C, rngs=nnx.Rngs(1)), 1)
    x = jnp.asarray(np.random.RandomState(2).randn(3, 4, 4, D).astype(np.float32))
    w = np.asarray(head.linears[0].kernel[...])
    targets = np.array([1, 0, 2])
    exact = np.einsum("bhwd,db->bhw", np.asarray(x), w[:, targets]) / 16.0
    maps = jnp.stack([jnp.asarray(exact), _maps(3, 1, 4, 4, seed=3)[:, 0], -jnp.asarray(exact)], axis=1)
    curves = perturbation_curves(head, x, maps, targets, output="logits", steps=16)
    z = np.asarray(head(x))[np.arange(3), targets]
    drops = np.cumsum(-np.sort(-exact.reshape(3, -1), axis=1), axis=1)
    np.testing.assert_allclose(curves[:, 0, 1:], z[:, None] - drops, rtol=1e-4, atol=1e-5)  # hand-derived
    area = np.asarray(curve_area(curves))
    assert np.all(area[:, 0] <= area[:, 1]) and np.all(area[:, 1] <= area[:, 2])  # ideal < random < reversed
    insertion = np.asarray(
        curve_area(perturbation_curves(head, x, maps, targets, output="logits", steps=16, mode="insertion"))
    )
    assert np.all(insertion[:, 0] >= insertion[:, 1]) and np.all(insertion[:, 1] >= insertion[:, 2])
    for perturbation in ("subset", "gaussian"):
        infid = np.asarray(
            infidelity(head, x, maps, targets, output="logits", perturbation=perturbation, normalize=False, samples=32)
        )
        assert np.all(infid[:, 0] < 1e-9 * max(1.0, float(np.abs(exact).max()) ** 2)), perturbation
        assert np.all(infid[:, 1] > 1e-4) and np.all(infid[:, 2] > 1e-4)


@pytest.mark.slow  # several seconds of CPU (measured 3-24 s on the 2-core CPU)
def test_infidelity_equals_its_definition_over_the_same_perturbations():
    head = randomise(PoolMLPHead(D, C, hidden=(5,), rngs=nnx.Rngs(2)), 2)
    x, maps = _x((2, 3, 3, D), seed=4), _maps(2, 2, 3, 3, seed=5)
    targets = np.array([[1, 2], [0, 0]])
    key = jax.random.key(9)
    for perturbation, scale in (("subset", 0.3), ("gaussian", 0.2)):
        if perturbation == "subset":
            weights = np.asarray(jax.random.bernoulli(key, scale, (2, 16, 9)).astype(jnp.float32))
        else:
            weights = scale * np.asarray(jax.random.normal(key, (2, 16, 9), jnp.float32))
        probs = np.asarray(jax.nn.softmax(head(x)))
        pert = np.asarray(x)[:, None] * (1 - weights.reshape(2, 16, 3, 3, 1))  # baseline 0: x - I = x - m x
        diff = probs[:, None] - np.asarray(jax.nn.softmax(head(jnp.asarray(pert.reshape(32, 3, 3, D))))).reshape(
            2, 16, -1
        )  # f(x) - f(x - I): (B, S, P)
        for normalize in (False, True):
            got = infidelity(
                head,
                x,
                maps,
                targets,
                perturbation=perturbation,
                scale=scale,
                samples=16,
                key=key,
                normalize=normalize,
                batch_size=7,
            )
            for i in range(2):
                for j in range(2):
                    a = np.array([np.sum(weights[i, s] * np.asarray(maps[i, j]).ravel()) for s in range(16)])
                    d = diff[i, :, targets[i, j]]
                    if normalize:
                        a = a * np.sum(a * d) / np.sum(a * a)
                    np.testing.assert_allclose(got[i, j], np.mean((a - d) ** 2), rtol=1e-4, atol=1e-9)


@pytest.mark.slow  # several seconds of CPU (measured 3-24 s on the 2-core CPU)
def test_maps_on_a_coarser_grid_are_upsampled_and_areas():
    head = randomise(PoolMLPHead(D, C, rngs=nnx.Rngs(3)), 3)
    x, coarse = _x((1, 4, 4, D), seed=6), _maps(1, 2, 2, 2, seed=7)
    fine = jax.image.resize(coarse, (1, 2, 4, 4), method="bilinear")
    np.testing.assert_allclose(
        perturbation_curves(head, x, coarse, np.array([1])),
        perturbation_curves(head, x, fine, np.array([1])),
        rtol=1e-6,
    )
    np.testing.assert_allclose(curve_area(jnp.full((2, 5), 0.3)), [0.3, 0.3], rtol=1e-6)
    np.testing.assert_allclose(curve_area(jnp.linspace(0, 1, 11)), 0.5, rtol=1e-6)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda h, x, m: perturbation_curves(h, x, m, np.array([0]), mode="erase"), "mode"),
        (lambda h, x, m: perturbation_curves(h, x, m, np.array([0]), steps=0), "steps"),
        (lambda h, x, m: perturbation_curves(h, x[0], m, np.array([0])), r"\(B, H, W, D\)"),
        (lambda h, x, m: perturbation_curves(h, x, m[0], np.array([0])), r"\(B, M, h, w\)"),
        (lambda h, x, m: perturbation_curves(h, x, m * np.nan, np.array([0])), "NaN"),
        (lambda h, x, m: perturbation_curves(h, x, m, np.array([0.5])), "integer"),
        (lambda h, x, m: infidelity(h, x, m, np.array([0]), perturbation="blur"), "perturbation"),
        (lambda h, x, m: infidelity(h, x, m, np.array([0]), scale=1.5), r"\(0, 1\]"),
        (lambda h, x, m: infidelity(h, x, m, np.array([0]), samples=1), "samples"),
    ],
)
def test_bad_input_gives_one_clear_error(call, match):
    head = PoolMLPHead(D, C, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=match):
        call(head, _x((1, 2, 2, D)), _maps(1, 1, 2, 2))
