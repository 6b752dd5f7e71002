"""Ground truth and metrics of the evaluation protocol on hand-built cases."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from delib_jax.data.cub import ATTRIBUTE_NAMES, PART_NAMES
from delib_jax.evaluation import (
    ade_ambiguity_strength,
    ade_object_frequency,
    coverage_counts,
    cub_ambiguity_strength,
    mask_iou,
    pixel_ranks,
    point_precision_recall,
    random_maps,
    select_ground_truth,
)


def _class_attributes(seed=0, c=4):
    return np.random.RandomState(seed).rand(c, len(ATTRIBUTE_NAMES))


@pytest.mark.parametrize("divergence", ["kl", "js"])
def test_gamma_symmetric_in_unit_interval_and_one_for_identical(divergence):
    ca = _class_attributes()
    ca[3] = ca[1]  # classes 1 and 3 identical
    g = cub_ambiguity_strength(ca, ATTRIBUTE_NAMES, PART_NAMES, divergence=divergence)
    assert g.shape == (4, 4, 15)
    np.testing.assert_allclose(g, g.transpose(1, 0, 2), rtol=1e-12)
    np.testing.assert_allclose(g[1, 3], 1.0, rtol=1e-12)
    np.testing.assert_allclose(np.diagonal(g, axis1=0, axis2=1), 1.0, rtol=1e-12)
    assert np.all((g > 0) & (g <= 1 + 1e-12)) and g[0, 2].max() < 1


def test_gamma_by_hand_for_one_part():
    """'nape' is described by nape_color only: gamma = exp(-(KL(a||b) + KL(b||a))) of the two colour distributions."""
    groups = [n for n in ATTRIBUTE_NAMES if n.startswith("has_nape_color")]
    idx = [ATTRIBUTE_NAMES.index(n) for n in groups]
    ca = np.zeros((2, len(ATTRIBUTE_NAMES)))
    ca[0, idx[:2]] = [0.75, 0.25]
    ca[1, idx[:2]] = [0.25, 0.75]
    g = cub_ambiguity_strength(ca, ATTRIBUTE_NAMES, PART_NAMES, eps=0.0 + 1e-12)
    kl = 0.75 * np.log(3) + 0.25 * np.log(1 / 3)  # KL(a||b) = KL(b||a)
    assert g[0, 1, PART_NAMES.index("nape")] == pytest.approx(np.exp(-2 * kl), rel=1e-6)
    js = 0.5 * (0.75 * np.log(0.75 / 0.5) + 0.25 * np.log(0.25 / 0.5)) * 2
    gj = cub_ambiguity_strength(ca, ATTRIBUTE_NAMES, PART_NAMES, eps=1e-12, divergence="js")
    assert gj[0, 1, PART_NAMES.index("nape")] == pytest.approx(np.exp(-2 * js), rel=1e-6)


def test_top_fraction_selection():
    s = np.zeros((3, 3, 2))
    vals = {(0, 1, 0): 0.9, (0, 1, 1): 0.1, (0, 2, 0): 0.5, (0, 2, 1): 0.4, (1, 2, 0): 0.3, (1, 2, 1): 0.8}
    for (a, b, k), v in vals.items():
        s[a, b, k] = s[b, a, k] = v
    gt = select_ground_truth(s, 2 / 6)  # the two strongest of six triplets
    chosen = {(a, b, k) for a, b, k in zip(*np.nonzero(gt)) if a < b}
    assert chosen == {(0, 1, 0), (1, 2, 1)}
    assert np.array_equal(gt, gt.transpose(1, 0, 2))
    with pytest.raises(ValueError):
        select_ground_truth(s, 0.0)


def test_ade_frequency_and_strength():
    labels = np.array([0, 0, 1, 1])
    present = np.array([[1, 0], [1, 1], [1, 0], [0, 0]], bool)
    phi = ade_object_frequency(labels, present, 2)
    np.testing.assert_allclose(phi, [[1.0, 0.5], [0.5, 0.0]])
    g = ade_ambiguity_strength(phi)
    assert g[0, 1, 0] == pytest.approx(0.75) and g[0, 1, 1] == pytest.approx(0.25)
    assert ade_ambiguity_strength(np.array([[0.2], [0.2]]))[0, 1, 0] == 0.0


def test_ranks_and_counts():
    amap = jnp.array([[0.1, 0.9], [0.5, 0.9]])
    np.testing.assert_array_equal(pixel_ranks(amap), [[3, 0], [2, 1]])  # ties: stable order
    np.testing.assert_array_equal(coverage_counts(4, [0.01, 0.25, 0.5, 0.9]), [1, 1, 2, 4])


def test_point_precision_recall_by_hand():
    # 4x4 map whose values decrease row by row: top 4 pixels = row 0, top 8 = rows 0-1.
    amap = jnp.asarray(np.arange(16, 0, -1, dtype=np.float32).reshape(4, 4))
    points = jnp.array([[[0.5, 0.5], [3.5, 0.5], [1.5, 1.5], [2.5, 3.5]]])  # rows 0, 0, 1, 3
    visible = jnp.array([[True, True, True, True]])
    truth = jnp.array([[True, False, True, False]])
    counts = jnp.array([4, 8, 16])
    p, r, has_p, has_t = point_precision_recall(amap[None], points, visible, truth, counts)
    np.testing.assert_allclose(p[0], [1 / 2, 2 / 3, 2 / 4])
    np.testing.assert_allclose(r[0], [1 / 2, 2 / 2, 2 / 2])
    assert bool(has_t[0]) and bool(has_p[0].all())
    # an invisible keypoint never counts
    p2, _, _, _ = point_precision_recall(amap[None], points, jnp.array([[True, False, True, True]]), truth, counts)
    np.testing.assert_allclose(p2[0], [1.0, 1.0, 2 / 3])


def test_keypoint_auc_by_hand():
    from delib_jax.evaluation import metrics

    amap = jnp.zeros((4, 4)).at[0, 0].set(3.0).at[0, 1].set(2.0).at[1, 0].set(1.0)
    points = jnp.asarray([[0.5, 0.5], [1.5, 0.2], [0.9, 1.7], [3.5, 3.5]])  # (x, y) -> values 3, 2, 1, 0
    visible = jnp.asarray([True, True, True, True])
    cases = [  # ground truth -> AUC: the fraction of (ground-truth, other) keypoint pairs ordered correctly
        ([True, False, False, False], 1.0),  # 3 above 2, 1, 0
        ([False, False, False, True], 0.0),  # 0 below all
        ([True, False, False, True], 0.5),  # 3 beats 2 and 1, 0 beats neither: 2 / 4
        ([False, True, True, False], 0.5),  # 2 > 1, 2 > 0, 1 < 3, 1 > 0 vs others (3, 0): (1 + 0 + 0 + 1) / 4
    ]
    for truth, expected in cases:
        auc, defined = metrics.keypoint_auc(amap[None], points[None], visible[None], jnp.asarray([truth]))
        assert bool(defined[0]) and float(auc[0]) == pytest.approx(expected), truth
    # ties count one half; a hidden keypoint is ignored; no keypoint of one kind -> undefined
    flat = jnp.zeros((1, 4, 4))
    auc, defined = metrics.keypoint_auc(flat, points[None], visible[None], jnp.asarray([[True, False, False, False]]))
    assert float(auc[0]) == 0.5 and bool(defined[0])
    truth = jnp.asarray([[False, True, False, False]])
    auc, _ = metrics.keypoint_auc(amap[None], points[None], visible[None], truth)
    assert float(auc[0]) == pytest.approx(2 / 3)  # 2 beats 1 and 0, not 3
    auc, _ = metrics.keypoint_auc(amap[None], points[None], jnp.asarray([[True, True, False, True]]), truth)
    assert float(auc[0]) == pytest.approx(1 / 2)  # with the keypoint of value 1 hidden: beats 0, not 3
    _, defined = metrics.keypoint_auc(amap[None], points[None], visible[None], jnp.zeros((1, 4), bool))
    assert not bool(defined[0])


def test_mask_iou_by_hand():
    amap = jnp.asarray(np.arange(16, 0, -1, dtype=np.float32).reshape(4, 4))
    seg = np.zeros((4, 4), np.int32)
    seg[0, :2] = 1  # object 1: 2 pixels in the top row
    seg[2:, :] = 2  # object 2: the bottom 8 pixels
    cand = jnp.array([[True, True]])
    iou = mask_iou(amap[None], jnp.asarray(seg)[None], cand, jnp.array([2, 4, 16]))
    # top-2 = object 1 exactly; top-4: object 1 overlap 2, union 4 -> 0.5; all 16: object 2 overlap 8 -> 8/16
    np.testing.assert_allclose(iou[0], [1.0, 0.5, 0.5])
    none = mask_iou(amap[None], jnp.asarray(seg)[None], jnp.array([[False, False]]), jnp.array([4]))
    assert float(none[0, 0]) == 0.0
    # only two pixels are ambiguous: the mask stops there, whatever the coverage
    sparse = jnp.zeros((4, 4)).at[0, 0].set(2.0).at[0, 1].set(1.0)
    np.testing.assert_allclose(mask_iou(sparse[None], jnp.asarray(seg)[None], cand, jnp.array([1, 8]))[0], [0.5, 1.0])


def test_points_outside_the_ambiguous_region_are_never_inside():
    amap = jnp.zeros((4, 4)).at[0, 0].set(1.0)
    points = jnp.array([[[0.5, 0.5], [3.5, 3.5]]])
    p, r, has_p, _ = point_precision_recall(
        amap[None], points, jnp.array([[True, True]]), jnp.array([[False, True]]), jnp.array([16])
    )
    assert float(p[0, 0]) == 0.0 and float(r[0, 0]) == 0.0 and bool(has_p[0, 0])


@pytest.mark.slow  # several seconds of CPU (measured 3-24 s on the 2-core CPU)
def test_random_maps_cover_requested_sizes():
    m = random_maps(jax.random.key(0), (3, 32, 32), (4, 4))
    assert m.shape == (3, 32, 32)
    counts = coverage_counts(32 * 32)
    ranks = pixel_ranks(m[0])
    np.testing.assert_array_equal([(ranks < n).sum() for n in counts[[0, 49, 89]]], counts[[0, 49, 89]])


def test_summarize_table_columns_and_undefined_coverages_without_warnings():
    import warnings

    from delib_jax.evaluation.metrics import COVERAGES
    from delib_jax.evaluation.tables import TABLE_COVERAGES, markdown_table, summarize

    at = [int(np.argmin(np.abs(COVERAGES - c))) for c in TABLE_COVERAGES]
    runs = np.full((2, len(COVERAGES)), np.nan)
    runs[0, at] = [0.1, 0.2, 0.3, 0.4, 0.5]
    runs[1, at] = [0.3, 0.2, np.nan, 0.4, 0.5]
    runs[:, at[3]] = np.nan  # 40%: undefined in every run
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no 'Mean of empty slice'
        s = summarize(runs)
    assert s["runs"] == 2
    np.testing.assert_allclose(s["mean"][:3], [20.0, 20.0, 30.0])
    np.testing.assert_allclose(s["std"][:2], [10.0, 0.0])
    assert np.isnan(s["mean"][3]) and s["mean"][4] == pytest.approx(50.0)
    assert s["mean"][5] == pytest.approx(np.mean([np.mean([10, 20, 30, 50]), np.mean([30, 20, 50])]))
    assert "| – |" in markdown_table([("x", s)], metric="Precision")


def test_keypoint_ranks_by_counting_equal_ranks_by_sorting():
    """The counted ranks of `point_precision_recall` are the sorted ranks of `pixel_ranks`, ties included."""
    from delib_jax.evaluation.metrics import _point_ranks, pixel_ranks

    rng = np.random.default_rng(3)
    for _ in range(5):
        amap = np.round(rng.normal(size=(9, 11)), 1).astype(np.float32)  # many ties, negatives, zeros
        points = rng.uniform(-2, 13, size=(20, 2)).astype(np.float32)
        ranks = np.asarray(pixel_ranks(jnp.asarray(amap)))
        col = np.clip(np.floor(points[:, 0]).astype(int), 0, 10)
        row = np.clip(np.floor(points[:, 1]).astype(int), 0, 8)
        expected = np.where(amap[row, col] > 0, ranks[row, col], amap.size)
        np.testing.assert_array_equal(np.asarray(_point_ranks(jnp.asarray(amap), jnp.asarray(points))), expected)
