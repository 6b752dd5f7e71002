"""Insecurity metrics at every coverage at once (no loop over thresholds).

A mask at coverage c holds the ceil(c N) pixels of largest ambiguity (ties broken by a stable sort), so a pixel is
inside exactly when its rank is below that count: ranking each map once answers all coverages. Pixels of ambiguity
<= 0 are never in a mask (there is no ambiguity there), so a mask can be smaller than its coverage.
CUB (points): precision = ground-truth keypoints in the mask / visible keypoints in the mask; recall = ground-truth
keypoints in the mask / visible ground-truth keypoints (Sec. 4). ADE20K (masks): IoU of the mask with the ground-truth
object of the insecurity's pair that overlaps it most.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

COVERAGES = np.round(np.arange(1, 91) / 100.0, 2)  # 1% .. 90%


def coverage_counts(num_pixels: int, coverages=COVERAGES) -> np.ndarray:
    """(R,) pixels in a mask at each coverage."""
    return np.ceil(np.asarray(coverages) * num_pixels - 1e-9).astype(np.int32)


def pixel_ranks(amap: jax.Array) -> jax.Array:
    """(H, W) -> (H, W) int32 rank of each pixel in decreasing ambiguity (0 = strongest), stable."""
    flat = amap.reshape(-1)
    order = jnp.argsort(-flat, stable=True)
    return jnp.zeros(flat.shape, jnp.int32).at[order].set(jnp.arange(flat.size, dtype=jnp.int32)).reshape(amap.shape)


def _point_ranks(amap, points):
    """(K,) rank of each keypoint's pixel in ``amap`` (H, W), as `pixel_ranks` gives it, by counting the pixels
    ranked before it (larger, or equal and earlier) instead of sorting all H W pixels: K H W comparisons that fuse
    into one reduction, several times faster than a sort per map on CPUs and GPUs alike."""
    h, w = amap.shape
    flat = amap.reshape(-1)
    col = jnp.clip(jnp.floor(points[:, 0]).astype(jnp.int32), 0, w - 1)
    row = jnp.clip(jnp.floor(points[:, 1]).astype(jnp.int32), 0, h - 1)
    index = row * w + col  # (K,)
    value = flat[index]
    before = (flat[None, :] > value[:, None]) | (
        (flat[None, :] == value[:, None]) & (jnp.arange(flat.size)[None, :] < index[:, None])
    )
    ranks = jnp.sum(before, axis=1, dtype=jnp.int32)
    return jnp.where(value > 0, ranks, amap.size)  # never inside where there is no ambiguity


@jax.jit
def point_precision_recall(amaps, points, visible, ground_truth, counts):
    """Per insecurity and coverage: precision, recall and their validity.

    amaps (Q, H, W) ambiguity maps at image resolution; points (Q, K, 2) keypoints (x, y) in that image's pixels;
    visible (Q, K) bool; ground_truth (Q, K) bool (part k is ambiguous for the insecurity's pair); counts (R,).
    Returns precision, recall (Q, R) and has_points, has_truth (Q, R) / (Q,) bool: precision is defined where the mask
    holds a visible keypoint, recall where the image shows a ground-truth keypoint."""
    ranks = jax.vmap(_point_ranks)(amaps, points)  # (Q, K)
    inside = (ranks[:, None, :] < counts[None, :, None]) & visible[:, None, :]  # (Q, R, K)
    hits = jnp.sum(inside & ground_truth[:, None, :], axis=-1)
    n_inside = jnp.sum(inside, axis=-1)
    n_truth = jnp.sum(visible & ground_truth, axis=-1)
    precision = hits / jnp.maximum(n_inside, 1)
    recall = hits / jnp.maximum(n_truth, 1)[:, None]
    return precision, recall, n_inside > 0, n_truth > 0


@jax.jit
def keypoint_auc(amaps, points, visible, ground_truth):
    """Per insecurity: the chance that a visible ground-truth keypoint has a larger ambiguity value than a visible
    other keypoint (ties count 1/2), a threshold-free check that the maps rank ambiguous parts first (0.5 = no signal).

    amaps (Q, H, W); points (Q, K, 2) (x, y) pixels; visible, ground_truth (Q, K) bool. Returns auc (Q,) and defined
    (Q,) bool (the image shows keypoints of both kinds)."""
    h, w = amaps.shape[1:]
    col = jnp.clip(jnp.floor(points[..., 0]).astype(jnp.int32), 0, w - 1)
    row = jnp.clip(jnp.floor(points[..., 1]).astype(jnp.int32), 0, h - 1)
    values = jax.vmap(lambda m, r, c: m[r, c])(amaps, row, col)  # (Q, K)
    pos, neg = visible & ground_truth, visible & ~ground_truth
    pairs = pos[:, :, None] & neg[:, None, :]  # (Q, K, K): (ground-truth keypoint, other keypoint)
    wins = (values[:, :, None] > values[:, None, :]) + 0.5 * (values[:, :, None] == values[:, None, :])
    n = jnp.sum(pairs, axis=(1, 2))
    return jnp.sum(jnp.where(pairs, wins, 0.0), axis=(1, 2)) / jnp.maximum(n, 1), n > 0


@jax.jit
def mask_iou(amaps, segmentations, candidates, counts):
    """IoU (Q, R) of each insecurity's mask with its best ground-truth object, at every coverage.

    amaps (Q, H, W); segmentations (Q, H, W) int object labels; candidates (Q, O) bool: objects ambiguous for the
    insecurity's pair (label o+1 in the segmentation <-> column o; 0 = other). The best object is the one of largest
    overlap with the mask at that coverage; IoU is 0 where no candidate object is in the image."""
    num_objects = candidates.shape[1]

    def one(amap, seg, cand):
        flat = amap.reshape(-1)
        order = jnp.argsort(-flat, stable=True)
        labels = seg.reshape(-1)[order]  # object label of pixels in decreasing ambiguity
        onehot = (labels[:, None] == jnp.arange(1, num_objects + 1)[None, :]) & cand[None, :]
        cum = jnp.cumsum(onehot, axis=0)  # (N, O) overlap of the top-n mask with each object
        area = cum[-1]
        size = jnp.minimum(counts, jnp.sum(flat > 0))  # (R,) mask sizes
        inter = jnp.where(size[:, None] > 0, cum[jnp.maximum(size - 1, 0)], 0)  # (R, O)
        union = size[:, None] + area[None, :] - inter
        iou = jnp.where(area[None, :] > 0, inter / jnp.maximum(union, 1), 0.0)
        best = jnp.argmax(jnp.where(area[None, :] > 0, inter, -1), axis=1)
        return jnp.take_along_axis(iou, best[:, None], axis=1)[:, 0]

    return jax.vmap(one)(amaps, segmentations, candidates)


def random_maps(key: jax.Array, shape: tuple[int, int, int], grid: tuple[int, int]) -> jax.Array:
    """Random ambiguity maps (Q, H, W) made like real ones: uniform noise at feature resolution, upsampled bilinearly.

    The random baseline thresholds these at the same coverages, so its regions have the same sizes."""
    q, h, w = shape
    low = jax.random.uniform(key, (q, *grid))
    return jax.image.resize(low, (q, h, w), "bilinear")
