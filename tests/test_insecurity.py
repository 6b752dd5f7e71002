"""Insecurities (Sec. 3.1): planted maps with known pairs, masks and ranking; thresholds; empty cases; batching."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from delib_jax.insecurity import (
    candidate_pairs,
    coverage_threshold,
    find_insecurities,
    geometric_mean,
    pair_indices,
)

H = W = 4
LEFT = np.zeros((H, W), bool)
LEFT[:, :2] = True
X = np.zeros((H, W), bool)  # top-left block: classes 0 and 1 compete here
X[:2, :2] = True
Y = np.zeros((H, W), bool)  # bottom-left block: classes 1 and 2 compete here
Y[2:, :2] = True
RIGHT = ~LEFT


def planted():
    """3 classes on a 4x4 grid, difficulty 1 on the left half, 0 on the right.

    At X the maps are (2, 1, 0.5): C = {0, 1} for K=2; at Y (0.5, 1, 3): C = {1, 2}; on the right (5, 4, 0): C = {0, 1}
    but the difficulty is 0 there. So A = {(0, 1), (1, 2)}; (0, 2) never shares a candidate set although its product is
    non-zero (X: 2*0.5 = 1, Y: 0.5*3 = 1.5). Ambiguity (0, 1): 2 on X, 0.5 on Y, 0 on the right;
    (1, 2): 0.5 on X, 3 on Y.
    Strength (mean over the 25% mask): (1, 2) -> 3 on Y, then (0, 1) -> 2 on X.
    """
    m0 = 2.0 * X + 0.5 * Y + 5.0 * RIGHT
    m1 = 1.0 * X + 1.0 * Y + 4.0 * RIGHT
    m2 = 0.5 * X + 3.0 * Y
    class_maps = np.stack([m0, m1, m2])[None].astype(np.float32)  # (1, 3, H, W)
    difficulty = LEFT[None].astype(np.float32)  # (1, H, W)
    return class_maps, difficulty


@pytest.mark.parametrize("option", [{"coverage": 0.25}, {"threshold": 1.0}])
def test_planted_pairs_masks_and_ranking(option):
    class_maps, difficulty = planted()
    classes = np.array([[7, 3, 9]])  # the maps' class indices (e.g. the top-3 predictions)
    out = find_insecurities(class_maps, difficulty, classes, k=2, **option)
    assert out.masks.shape == (1, 3, H, W)  # Q = N(N-1)/2 = 3 slots
    np.testing.assert_array_equal(out.valid, [[True, True, False]])
    np.testing.assert_array_equal(out.pairs[0, :2], [[3, 9], [7, 3]])  # (1, 2) first, then (0, 1)
    np.testing.assert_array_equal(out.slots[0, :2], [[1, 2], [0, 1]])
    np.testing.assert_array_equal(out.masks[0, 0], Y)
    np.testing.assert_array_equal(out.masks[0, 1], X)
    assert not out.masks[0, 2].any()
    np.testing.assert_allclose(out.strength[0], [3.0, 2.0, 0.0])
    np.testing.assert_allclose(out.coverage[0], [0.25, 0.25, 0.0])
    np.testing.assert_array_equal(out.num_candidates, [2])
    # feature-resolution ambiguity maps of the chosen pairs
    np.testing.assert_allclose(out.ambiguity[0, 0], 0.5 * X + 3.0 * Y)
    np.testing.assert_allclose(out.ambiguity[0, 1], 2.0 * X + 0.5 * Y)


@pytest.mark.slow  # several seconds of CPU (measured 3-24 s on the 2-core CPU)
def test_candidates_with_k3_include_every_pair_present():
    class_maps, _ = planted()
    np.testing.assert_array_equal(candidate_pairs(class_maps, k=2), [[True, False, True]])  # (0,1), (0,2), (1,2)
    np.testing.assert_array_equal(candidate_pairs(class_maps, k=3), [[True, True, True]])
    # a class with zero attribution is no candidate (positive=True), but is with positive=False
    np.testing.assert_array_equal(candidate_pairs(class_maps[:, :, :, 2:], k=3), [[True, False, False]])
    np.testing.assert_array_equal(candidate_pairs(class_maps[:, :, :, 2:], k=3, positive=False), [[True, True, True]])


def test_max_insecurities_keeps_the_strongest():
    class_maps, difficulty = planted()
    out = find_insecurities(class_maps, difficulty, k=2, coverage=0.25, max_insecurities=1)
    np.testing.assert_array_equal(out.pairs, [[[1, 2]]])
    np.testing.assert_array_equal(out.masks[0, 0], Y)


def test_upsampling_places_masks_on_the_image():
    class_maps, difficulty = planted()
    out = find_insecurities(class_maps, difficulty, k=2, threshold=2.5, image_size=(16, 16))
    assert out.masks.shape == (1, 3, 16, 16)
    assert out.valid[0].tolist() == [True, False, False]  # only (1, 2) exceeds 2.5 anywhere
    mask = np.asarray(out.masks[0, 0])
    # the centre of block Y (rows 8-15, cols 0-7 at 4x upsampling) is inside, the other three quadrants outside
    assert mask[10:16, 0:5].all()
    assert not mask[:7].any() and not mask[:, 8:].any()


@pytest.mark.slow  # several seconds of CPU (measured 3-24 s on the 2-core CPU)
def test_coverage_gives_the_requested_fraction():
    rng = np.random.default_rng(0)
    class_maps = rng.uniform(0.1, 1.0, (2, 4, 7, 7)).astype(np.float32)
    difficulty = rng.uniform(0.1, 1.0, (2, 7, 7)).astype(np.float32)
    for r in (0.01, 0.1, 0.37, 0.9):
        out = find_insecurities(class_maps, difficulty, k=3, coverage=r, image_size=(50, 60))
        n = round(r * 50 * 60)
        valid = np.asarray(out.valid)
        assert valid.sum() >= 2
        for i, q in zip(*np.nonzero(valid)):
            a, b = np.asarray(out.slots[i, q])
            up = np.asarray(jax.image.resize(class_maps[i, a] * class_maps[i, b] * difficulty[i], (50, 60), "bilinear"))
            nth = np.sort(up.ravel())[::-1][n - 1]
            mask = np.asarray(out.masks[i, q])
            # exactly the n largest values, plus those tied with the n-th (bilinear resizing replicates the border
            # samples, so a maximum on the edge of the grid makes a plateau of equal values)
            np.testing.assert_array_equal(mask, up >= nth)
            assert n <= mask.sum() <= n + (up == nth).sum() - 1
            np.testing.assert_allclose(out.coverage[i, q], mask.mean(), rtol=1e-6)
            np.testing.assert_allclose(out.strength[i, q], up[mask].mean(), rtol=1e-5)
        # most masks have no ties at all: the requested fraction exactly
        areas = np.asarray(out.masks).sum(axis=(-2, -1))[valid]
        assert (areas == n).mean() >= 0.5


def test_coverage_with_ties_keeps_the_tied_values():
    flat = jnp.array([[5.0, 3.0, 3.0, 3.0, 1.0, 0.0, 0.0, 0.0]]).reshape(1, 2, 4)
    t = coverage_threshold(flat, 0.25)  # n = 2: the 2nd largest is 3, tied three times
    assert float(t[0]) == 3.0
    class_maps = jnp.stack([flat[0], flat[0]])[None]  # two identical maps, difficulty 1
    out = find_insecurities(class_maps, jnp.ones((1, 2, 4)), k=2, coverage=0.25, combine=lambda a, b, s: a * s)
    assert int(out.masks[0, 0].sum()) == 4  # the top value plus the three tied ones
    np.testing.assert_allclose(out.coverage[0, 0], 0.5)


@pytest.mark.parametrize(
    "maps",
    [
        lambda: (np.zeros((1, 5, 6, 6), np.float32), np.ones((1, 6, 6), np.float32)),  # all class maps zero
        lambda: (np.ones((1, 5, 6, 6), np.float32), np.zeros((1, 6, 6), np.float32)),  # nothing is difficult
        lambda: (-np.ones((1, 5, 6, 6), np.float32), np.ones((1, 6, 6), np.float32)),  # only negative evidence
    ],
)
def test_no_ambiguity_gives_no_insecurity(maps):
    class_maps, difficulty = maps()
    out = find_insecurities(class_maps, difficulty, k=3, coverage=0.1, image_size=(12, 12))
    assert out.masks.shape == (1, 10, 12, 12)
    assert not np.asarray(out.valid).any()
    assert not np.asarray(out.masks).any()
    np.testing.assert_array_equal(out.strength, 0.0)


def test_negative_maps_clamped_by_default_raw_on_request():
    # two classes with negative attribution everywhere except one location: their product is positive everywhere
    class_maps = -np.ones((1, 2, 3, 3), np.float32)
    class_maps[0, :, 1, 1] = 1.0
    difficulty = np.ones((1, 3, 3), np.float32)
    clamped = find_insecurities(class_maps, difficulty, k=2, threshold=0.5)
    np.testing.assert_array_equal(clamped.masks[0, 0], np.eye(3, dtype=bool) & np.eye(3, dtype=bool)[::-1])
    raw = find_insecurities(class_maps, difficulty, k=2, threshold=0.5, positive=False)
    assert raw.masks[0, 0].all()


def test_pluggable_combine():
    class_maps, difficulty = planted()
    out = find_insecurities(class_maps, difficulty, k=2, threshold=1.0, combine=geometric_mean)
    # the cube root keeps the order: (1, 2) strongest, masks as with the product at threshold 1
    np.testing.assert_array_equal(out.pairs[0, :2], [[1, 2], [0, 1]])
    np.testing.assert_allclose(out.strength[0, 0], 3.0 ** (1 / 3), rtol=1e-6)
    minimum = find_insecurities(
        class_maps, difficulty, k=2, threshold=0.6, combine=lambda a, b, s: jnp.minimum(a, b) * s
    )
    # (0, 1): min(2, 1) = 1 on X; (1, 2): min(1, 3) = 1 on Y -- a tie, ranked by pair order
    np.testing.assert_array_equal(minimum.pairs[0, :2], [[0, 1], [1, 2]])
    np.testing.assert_array_equal(minimum.masks[0, 0], X)
    np.testing.assert_array_equal(minimum.masks[0, 1], Y)
    np.testing.assert_allclose(minimum.strength[0, :2], [1.0, 1.0])


@pytest.mark.slow  # several seconds of CPU (measured 3-24 s on the 2-core CPU)
def test_batched_equals_per_image_and_chunking_does_not_matter():
    rng = np.random.default_rng(1)
    class_maps = rng.normal(size=(3, 5, 6, 6)).astype(np.float32)
    difficulty = rng.normal(size=(3, 6, 6)).astype(np.float32)
    classes = np.stack([rng.permutation(20)[:5] for _ in range(3)])
    kw = {"k": 3, "coverage": 0.2, "image_size": (24, 24), "max_insecurities": 4}
    batch = find_insecurities(class_maps, difficulty, classes, **kw)
    chunked = find_insecurities(class_maps, difficulty, classes, pair_chunk=3, **kw)
    for name in ("pairs", "masks", "valid", "strength", "coverage"):
        np.testing.assert_array_equal(getattr(batch, name), getattr(chunked, name))
    for i in range(3):
        one = find_insecurities(class_maps[i : i + 1], difficulty[i : i + 1], classes[i : i + 1], **kw)
        for name in ("pairs", "masks", "valid"):
            np.testing.assert_array_equal(getattr(one, name)[0], getattr(batch, name)[i])
        np.testing.assert_allclose(one.strength[0], batch.strength[i], rtol=1e-6)
    # ranked: strengths of valid entries never increase
    s = np.where(batch.valid, batch.strength, -np.inf)
    assert (np.diff(s, axis=1)[np.asarray(batch.valid)[:, 1:]] <= 0).all()


def test_runs_under_an_outer_jit():
    class_maps, difficulty = planted()
    f = jax.jit(lambda m, s: find_insecurities(m, s, k=2, coverage=0.25).pairs)
    np.testing.assert_array_equal(f(class_maps, difficulty)[0, :2], [[1, 2], [0, 1]])


def test_pair_indices():
    ia, ib = pair_indices(4)
    assert list(zip(ia.tolist(), ib.tolist())) == [(0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3)]


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"k": 1}, "k must be"),
        ({"k": 4}, "k must be"),
        ({"coverage": 0.005}, "coverage"),
        ({"coverage": 0.95}, "coverage"),
        ({"coverage": 0.1, "threshold": 1.0}, "not both"),
        ({"max_insecurities": 0}, "max_insecurities"),
        ({"threshold": float("nan")}, "threshold"),
    ],
)
def test_bad_options(kw, match):
    class_maps, difficulty = planted()
    with pytest.raises(ValueError, match=match):
        find_insecurities(class_maps, difficulty, **kw)
