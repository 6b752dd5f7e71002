"""Difficulty scores (Sec. 3.3) against hand-computed values, and their safety at probabilities 0 and 1."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from delib_jax.difficulty import check_score, entropy, hardness, hesitancy, score_from_outputs


def test_hand_computed_values():
    p = jnp.array([[0.5, 0.25, 0.25], [1.0, 0.0, 0.0], [1 / 3, 1 / 3, 1 / 3]])
    np.testing.assert_allclose(hesitancy(p), [0.5, 0.0, 2 / 3], rtol=1e-6)
    # H = -(0.5 ln 0.5 + 2 * 0.25 ln 0.25) / ln 3 = 1.5 ln 2 / ln 3
    np.testing.assert_allclose(entropy(p), [1.5 * np.log(2) / np.log(3), 0.0, 1.0], rtol=1e-6)
    np.testing.assert_allclose(hardness(jnp.array([0.0, np.log(3.0)])), [0.5, 0.75], rtol=1e-6)


def test_scores_from_logits_and_names():
    z = jnp.array([[2.0, 0.0]])
    p0 = 1 / (1 + np.exp(-2.0))
    np.testing.assert_allclose(score_from_outputs("hesitancy", z), [1 - p0], rtol=1e-6)
    np.testing.assert_allclose(score_from_outputs("hardness", z, jnp.array([0.0])), [0.5])
    with pytest.raises(ValueError, match="hardness predictor"):
        score_from_outputs("hardness", z)
    with pytest.raises(ValueError, match="unknown difficulty score"):
        check_score("confidence")
    with pytest.raises(ValueError, match="at least 2"):
        entropy(jnp.ones((2, 1)))


@pytest.mark.parametrize("fn", [hesitancy, entropy])
def test_finite_derivatives_at_probabilities_zero_and_one(fn):
    p = jnp.array([1.0, 0.0, 0.0])
    g = jax.grad(fn)(p)
    h = jax.hessian(fn)(p)
    assert np.isfinite(np.asarray(g)).all() and np.isfinite(np.asarray(h)).all()
    assert float(fn(p)) == 0.0
    # through the softmax, at saturated logits
    z = jnp.array([200.0, -200.0, 0.0])
    f = lambda x: fn(jax.nn.softmax(x))
    assert np.isfinite(np.asarray(jax.hessian(f)(z))).all()


def test_hardness_saturates_without_nan():
    s = hardness(jnp.array([-1e4, 1e4]))
    np.testing.assert_array_equal(s, [0.0, 1.0])
    assert np.isfinite(np.asarray(jax.grad(lambda x: hardness(x).sum())(jnp.array([-1e4, 1e4])))).all()
