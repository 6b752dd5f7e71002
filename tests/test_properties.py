"""Property-based checks (hypothesis) of the pieces with simple invariants over many shapes and values."""

import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from delib_jax.evaluation.metrics import coverage_counts, pixel_ranks
from delib_jax.explanation import decode_mask, encode_mask

pytestmark = pytest.mark.slow  # hypothesis property runs

shapes = st.tuples(st.integers(1, 12), st.integers(1, 12))


@settings(max_examples=60, deadline=None)
@given(shapes.flatmap(lambda s: arrays(np.bool_, s)))
def test_run_length_round_trip(mask):
    rle = encode_mask(mask)
    assert sum(rle["counts"]) == mask.size
    assert all(c > 0 for c in rle["counts"][1:])  # only the leading False run may be empty
    np.testing.assert_array_equal(decode_mask(rle), mask)


@settings(max_examples=40, deadline=None)
# no subnormals: XLA:CPU flushes them to 0
@given(shapes.flatmap(lambda s: arrays(np.float32, s, elements=st.floats(-4, 4, width=32, allow_subnormal=False))))
def test_pixel_ranks_are_a_stable_descending_order(values):
    ranks = np.asarray(pixel_ranks(jnp.asarray(values))).ravel()
    assert sorted(ranks.tolist()) == list(range(values.size))  # a permutation
    order = np.argsort(ranks)
    flat = values.ravel()[order]
    assert np.all(flat[:-1] >= flat[1:])  # decreasing
    ties = flat[:-1] == flat[1:]
    assert np.all(order[:-1][ties] < order[1:][ties])  # ties keep pixel order


@given(st.integers(1, 100_000))
def test_coverage_counts_grow_and_cover_the_requested_fraction(n):
    counts = coverage_counts(n)
    assert np.all(np.diff(counts) >= 0) and counts[-1] <= n
    fractions = np.arange(1, 91) / 100
    assert np.all(counts >= fractions * n - 1e-6) and np.all(counts < fractions * n + 1)
