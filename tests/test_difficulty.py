"""Difficulty scores (Sec. 3.3) against hand-computed values, and their safety at probabilities 0 and 1."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from delib_jax.attribution import output_functions
from delib_jax.difficulty import (
    LOGIT_SCORES,
    check_score,
    entropy,
    entropy_from_logits,
    hardness,
    hesitancy,
    score_from_outputs,
)


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


def _finite(*xs):
    return all(np.isfinite(np.asarray(x)).all() for x in xs)


@functools.partial(jax.jit, static_argnums=0)
def _prob_derivatives(fn, p):
    return fn(p), jax.grad(fn)(p), jax.hessian(fn)(p)


@functools.partial(jax.jit, static_argnums=0)
def _output_derivatives(score, x, u, v):
    """Value, Jacobian, Hessian, and D phi(x)[u], D^2 phi(x)[u, v] by forward-over-forward jvp (as the attribution
    core takes them) of the outputs phi that attribution differentiates for ``score``."""
    class_phi, hard_phi = output_functions(score)
    phi = class_phi if score != "hardness" else hard_phi
    first, second = jax.jvp(lambda y: jax.jvp(phi, (y,), (u,))[1], (x,), (v,))
    return phi(x), jax.jacobian(phi)(x), jax.hessian(phi)(x), first, second


# Probabilities anywhere in [0, 1] as float32 holds them: 0, subnormals, ~1e-19 (where p^2 underflows), 1.
probabilities = st.integers(2, 4).flatmap(
    lambda c: arrays(np.float32, c, elements=st.floats(0, 1, width=32, allow_subnormal=True))
)


@settings(max_examples=100, deadline=None)
@given(probabilities)
@example(np.array([1.0, 1e-20, 0.0], np.float32))
@example(np.array([1.0, 1e-38, 1e-45], np.float32))
@pytest.mark.slow  # hypothesis property runs of Hessians
def test_scores_of_probabilities_have_finite_first_and_second_derivatives(p):
    for fn in (hesitancy, entropy):
        assert _finite(*_prob_derivatives(fn, jnp.asarray(p))), fn.__name__


# Logits so far apart that the smaller probabilities underflow to 0 (gaps of 100 and more), and everything between.
logit_vectors = st.integers(2, 4).flatmap(lambda c: arrays(np.float32, c, elements=st.floats(-1e3, 1e3, width=32)))


@settings(max_examples=100, deadline=None)
@given(logit_vectors)
@example(np.array([50.0, 0.0, -50.0], np.float32))  # p_2 ~ 1e-44: the audit's NaN case
@example(np.array([20.0, 0.0, -1e3], np.float32))
@example(np.array([2.841797e-13, 0.0], np.float32))  # probabilities tie in float32, not in float64 (hypothesis)
@example(np.array([-7.6e-44, 0.0], np.float32))  # a subnormal logit: 0 to XLA's float32 (hypothesis)
@pytest.mark.slow  # hypothesis property runs of Hessians
def test_attributed_outputs_have_finite_derivatives_for_any_logits(z):
    """What attribution differentiates: [softmax(z), s(z)] for each score (and the hardness sigmoid): first and
    second derivatives finite, and equal to float64's on the logits as float32 arithmetic sees them (XLA flushes
    subnormal float32 values to zero: a subnormal logit ties with 0 there, and hesitancy's top class of a tie is the
    first, in float64 too)."""
    rng = np.random.RandomState(0)
    u, v = (rng.randn(*z.shape).astype(np.float32) for _ in range(2))
    seen = np.where(np.abs(z) < np.finfo(np.float32).tiny, np.float32(0), z)
    for score in ("hesitancy", "entropy", "hardness"):
        args = (z, u, v) if score != "hardness" else (z[:1], u[:1], v[:1])
        got = _output_derivatives(score, *map(jnp.asarray, args))
        assert _finite(*got), score
        ref_args = (seen, u, v) if score != "hardness" else (seen[:1], u[:1], v[:1])
        with jax.enable_x64(True):
            ref = _output_derivatives(score, *(jnp.asarray(t, jnp.float64) for t in ref_args))
        for g, r in zip(got, ref):
            np.testing.assert_allclose(g, r, rtol=1e-3, atol=1e-5 * max(1.0, float(np.abs(r).max())))


def test_logit_scores_equal_the_scores_of_the_softmax():
    z = jnp.asarray(np.random.RandomState(1).randn(4, 7).astype(np.float32) * 3)
    p = jax.nn.softmax(z, axis=-1)
    for name, fn in LOGIT_SCORES.items():
        np.testing.assert_allclose(fn(z), {"hesitancy": hesitancy, "entropy": entropy}[name](p), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(score_from_outputs("entropy", z), entropy_from_logits(z), rtol=1e-6)
