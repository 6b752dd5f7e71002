"""Insecurities from attribution maps (Sec. 3.1 of the paper), for a whole batch in one compiled pass.

    found = find_insecurities(attr.class_maps, attr.difficulty_map, attr.classes, image_size=(224, 224))
    found.masks      # (B, Q, H_img, W_img) bool, ranked by strength; found.valid (B, Q) marks the real ones
    found.pairs      # (B, Q, 2) class indices (a, b)

Steps, at the feature grid (H, W) of the N class maps m^c (the top-N predictions) and the difficulty map m^s:

1. Candidate classes C(i, j): the K classes of largest attribution at each location. With ``positive=True`` (the
   default) a class only enters C(i, j) where its attribution is > 0: a class that speaks against a location is not
   a candidate for it (the authors' code kept positive contributions only).
2. Candidate ambiguities A: every unordered pair {a, b}, a != b, that appears together in some C(i, j). All
   R = N(N-1)/2 pairs are computed with a fixed shape; those not in A are marked invalid.
3. Ambiguity map m^(a,b) = f(m^a, m^b, m^s) (Eq. 1), f the product by default (``combine``). With ``positive=True``
   the three maps are clamped at 0 first, so two negative attributions never multiply into a positive ambiguity.
   The map is then upsampled to the image (bilinear, ``jax.image.resize``), as in the authors' code.
4. Mask r(a, b): either the locations above a value ``threshold`` T (``m > T``, Sec. 3.1), or, with ``coverage`` r,
   the n = round(r H_img W_img) largest values: T is the n-th largest value and the mask is ``m >= T``, so it covers r
   of the image exactly unless values tie with the n-th (ties are all kept). Locations with m <= 0 never belong to a
   mask (no ambiguity there), so a mask may cover less than r when fewer locations are ambiguous.
5. Strength: the mean of the (upsampled) ambiguity map over the mask. At a fixed coverage every mask has the same
   area, so this ranks pairs by the ambiguity mass inside their region, which is what "where was the network most
   torn between a and b" means; unlike the sum over the mask under a value threshold it does not favour a large faint
   region over a small intense one, and unlike the peak value it is not decided by a single location. Units are
   those of f (attribution products); compare strengths within an image, not across models.
6. Insecurities are the valid pairs with a non-empty mask, ranked by strength (ties: the earlier pair), at most Q.

Pairs are ordered (a, b) as the maps are: for top-N maps a is the more probable class of the two.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
Combine = Callable[[Array, Array, Array], Array]

MIN_COVERAGE, MAX_COVERAGE = 0.01, 0.90


def product(m_a: Array, m_b: Array, m_s: Array) -> Array:
    """f(m^a, m^b, m^s) = m^a m^b m^s, elementwise (the paper's choice)."""
    return m_a * m_b * m_s


def geometric_mean(m_a: Array, m_b: Array, m_s: Array) -> Array:
    """f = (m^a m^b m^s)^(1/3) for non-negative maps: the same masks as the product, strengths in attribution units."""
    return jnp.cbrt(m_a * m_b * m_s)


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class Insecurities:
    """Fixed-size insecurities of a batch, ranked by strength along Q; entries with ``valid`` False are padding.

    pairs: (B, Q, 2) int32 class indices (a, b); slots: (B, Q, 2) int32 positions of a and b among the N maps;
    masks: (B, Q, H_img, W_img) bool; ambiguity: (B, Q, H, W) the ambiguity maps at feature resolution (before
    upsampling); strength: (B, Q) mean ambiguity over the mask; coverage: (B, Q) fraction of the image in the mask;
    threshold: (B, Q) the T applied; valid: (B, Q) bool; num_candidates: (B,) int32 |A|, the candidate ambiguities.
    Padding entries hold zeros (masks all False).
    """

    pairs: Array
    slots: Array
    masks: Array
    ambiguity: Array
    strength: Array
    coverage: Array
    threshold: Array
    valid: Array
    num_candidates: Array


def check_options(
    num_maps: int, *, k: int, coverage: float | None, threshold: float | None, max_insecurities: int | None
) -> tuple[float | None, float | None, int]:
    """Validate options against N maps; returns (coverage, threshold, Q) with the defaults filled in.

    Coverage and threshold are alternatives: give at most one (neither: 10% coverage)."""
    if num_maps < 2:
        raise ValueError(f"insecurities need at least 2 class maps (top_n >= 2), got {num_maps}")
    if not isinstance(k, (int, np.integer)) or not 2 <= k <= num_maps:
        raise ValueError(f"k must be an integer between 2 and the number of class maps ({num_maps}), got {k}")
    if coverage is not None and threshold is not None:
        raise ValueError("give either coverage (a fraction of the image) or threshold (a value), not both")
    if threshold is None:
        coverage = 0.1 if coverage is None else float(coverage)
        if not (MIN_COVERAGE <= coverage <= MAX_COVERAGE):
            raise ValueError(f"coverage must lie between {MIN_COVERAGE} and {MAX_COVERAGE} (1% to 90%), got {coverage}")
    else:
        threshold = float(threshold)
        if not math.isfinite(threshold):
            raise ValueError(f"threshold must be a finite number, got {threshold}")
    num_pairs = num_maps * (num_maps - 1) // 2
    if max_insecurities is None:
        q = num_pairs
    elif not isinstance(max_insecurities, (int, np.integer)) or max_insecurities < 1:
        raise ValueError(f"max_insecurities must be a positive integer or None, got {max_insecurities}")
    else:
        q = min(int(max_insecurities), num_pairs)
    return coverage, threshold, q


def pair_indices(num_maps: int) -> tuple[np.ndarray, np.ndarray]:
    """The R = N(N-1)/2 unordered pairs of map slots, (R,) first and (R,) second, first < second, row-major."""
    return tuple(np.asarray(x, np.int32) for x in np.triu_indices(num_maps, k=1))


def candidate_members(class_maps: Array, *, k: int, positive: bool = True) -> Array:
    """Membership of each map in the location's candidate set C(i, j). class_maps (B, N, H, W) -> (B, N, H, W) bool.

    The K largest attributions per location (ties: the earlier map); with ``positive`` only those > 0."""
    n = class_maps.shape[1]
    values = jnp.moveaxis(class_maps, 1, -1)  # (B, H, W, N)
    top_values, top = jax.lax.top_k(values, k)  # (B, H, W, K)
    chosen = jax.nn.one_hot(top, n, dtype=jnp.bool_)  # (B, H, W, K, N)
    if positive:
        chosen = chosen & (top_values > 0)[..., None]
    return jnp.moveaxis(jnp.any(chosen, axis=-2), -1, 1)


def candidate_pairs(class_maps: Array, *, k: int, positive: bool = True) -> Array:
    """(B, R) bool: pair r (see `pair_indices`) appears jointly in C(i, j) at some location (the set A)."""
    member = candidate_members(class_maps, k=k, positive=positive).astype(jnp.float32)  # (B, N, H, W)
    together = jnp.einsum("bahw,bchw->bac", member, member)  # (B, N, N) locations where both are candidates
    ia, ib = pair_indices(class_maps.shape[1])
    return together[:, ia, ib] > 0


def ambiguity_maps(
    class_maps: Array, difficulty_map: Array, *, combine: Combine = product, positive: bool = True
) -> Array:
    """m^(a,b) = f(m^a, m^b, m^s) for all R pairs: class_maps (B, N, H, W), difficulty_map (B, H, W) -> (B, R, H, W)."""
    if positive:
        class_maps, difficulty_map = jnp.maximum(class_maps, 0.0), jnp.maximum(difficulty_map, 0.0)
    ia, ib = pair_indices(class_maps.shape[1])
    return combine(class_maps[:, ia], class_maps[:, ib], difficulty_map[:, None])


def upsample(maps: Array, image_size: tuple[int, int]) -> Array:
    """Bilinear resize of the last two axes: (..., H, W) -> (..., H_img, W_img)."""
    return jax.image.resize(maps, (*maps.shape[:-2], *image_size), method="bilinear")


def coverage_threshold(upsampled: Array, coverage: float) -> Array:
    """T such that ``upsampled >= T`` holds at the n = round(coverage * H_img W_img) largest values (n >= 1).

    upsampled (..., H_img, W_img) -> (...)."""
    flat = upsampled.reshape(*upsampled.shape[:-2], -1)
    n = max(1, round(coverage * flat.shape[-1]))
    return jax.lax.top_k(flat, n)[0][..., n - 1]


def threshold_mask(upsampled: Array, t: Array, *, by_coverage: bool) -> Array:
    """Mask of one ambiguity map: ``m >= T`` (coverage) or ``m > T`` (value), and always ``m > 0``.

    upsampled (..., H_img, W_img), t (...) -> bool (..., H_img, W_img)."""
    t = t[..., None, None]
    above = upsampled >= t if by_coverage else upsampled > t
    return above & (upsampled > 0)


def mask_statistics(upsampled: Array, mask: Array) -> tuple[Array, Array]:
    """(strength, coverage) over the last two axes: mean of the map over the mask (0 if empty), covered fraction."""
    area = jnp.sum(mask, axis=(-2, -1))
    total = jnp.sum(jnp.where(mask, upsampled, 0.0), axis=(-2, -1))
    strength = jnp.where(area > 0, total / jnp.maximum(area, 1), 0.0)
    return strength, area / (mask.shape[-2] * mask.shape[-1])


@functools.partial(
    jax.jit,
    static_argnames=(
        "image_size",
        "k",
        "coverage",
        "threshold",
        "max_insecurities",
        "combine",
        "positive",
        "pair_chunk",
    ),
)
def _find(
    class_maps,
    difficulty_map,
    classes,
    *,
    image_size,
    k,
    coverage,
    threshold,
    max_insecurities,
    combine,
    positive,
    pair_chunk,
) -> Insecurities:
    b, n = class_maps.shape[:2]
    by_coverage = threshold is None
    candidates = candidate_pairs(class_maps, k=k, positive=positive)  # (B, R)
    amb = ambiguity_maps(class_maps, difficulty_map, combine=combine, positive=positive).astype(jnp.float32)

    def stats(pair_maps):  # (B, H, W) of one pair -> threshold, strength, covered area (B,)
        up = upsample(pair_maps, image_size)
        t = coverage_threshold(up, coverage) if by_coverage else jnp.full((b,), threshold, up.dtype)
        mask = threshold_mask(up, t, by_coverage=by_coverage)
        strength, covered = mask_statistics(up, mask)
        return t, strength, covered

    # Statistics of all R pairs, pair_chunk pairs at a time: memory stays O(B pair_chunk H_img W_img) for any N.
    _, strength, covered = jax.lax.map(stats, jnp.moveaxis(amb, 1, 0), batch_size=pair_chunk)  # (R, B) each
    usable = candidates & (covered.T > 0)  # (B, R)
    key = jnp.where(usable, strength.T, -jnp.inf)
    top_key, order = jax.lax.top_k(key, max_insecurities)  # (B, Q), ties: the earlier pair
    valid = top_key > -jnp.inf

    # Masks of the Q chosen pairs only, recomputed (cheap) so that they and their statistics agree exactly.
    chosen = jnp.take_along_axis(amb, order[:, :, None, None], axis=1)  # (B, Q, H, W)
    up = upsample(chosen, image_size)
    t = coverage_threshold(up, coverage) if by_coverage else jnp.full(order.shape, threshold, up.dtype)
    masks = threshold_mask(up, t, by_coverage=by_coverage) & valid[:, :, None, None]
    strength_q, coverage_q = mask_statistics(up, masks)
    ia, ib = pair_indices(n)
    slots = jnp.stack([jnp.asarray(ia)[order], jnp.asarray(ib)[order]], axis=-1)  # (B, Q, 2)
    pairs = jnp.take_along_axis(classes, slots.reshape(b, -1), axis=1).reshape(slots.shape)
    zero = jnp.zeros_like(strength_q)
    return Insecurities(
        pairs=jnp.where(valid[..., None], pairs, 0).astype(jnp.int32),
        slots=jnp.where(valid[..., None], slots, 0).astype(jnp.int32),
        masks=masks,
        ambiguity=jnp.where(valid[:, :, None, None], chosen, 0.0),
        strength=jnp.where(valid, strength_q, zero),
        coverage=jnp.where(valid, coverage_q, zero),
        threshold=jnp.where(valid, t, zero),
        valid=valid,
        num_candidates=jnp.sum(candidates, axis=1).astype(jnp.int32),
    )


def find_insecurities(
    class_maps: Array,
    difficulty_map: Array,
    classes: Array | None = None,
    *,
    image_size: tuple[int, int] | None = None,
    k: int = 3,
    coverage: float | None = None,
    threshold: float | None = None,
    max_insecurities: int | None = None,
    combine: Combine = product,
    positive: bool = True,
    pair_chunk: int = 16,
) -> Insecurities:
    """Insecurities (Sec. 3.1) of a batch, ranked by strength: a jit-compiled, fixed-size computation.

    Args:
      class_maps: (B, N, H, W) attribution maps of N classes (e.g. ``Attribution.class_maps``, the top-N predictions).
      difficulty_map: (B, H, W) attribution map of the difficulty score.
      classes: (B, N) class index of each map (default: 0..N-1).
      image_size: (H_img, W_img) the maps are upsampled to before thresholding (default: the feature grid).
      k: candidate classes per location, 2 <= k <= N.
      coverage: fraction of the image each mask covers, 0.01..0.90 (default 0.1 when no threshold is given).
      threshold: a value T instead of a coverage: mask = ambiguity > T.
      max_insecurities: Q, at most N(N-1)/2 (default: all pairs).
      combine: f(m_a, m_b, m_s) -> ambiguity map, elementwise over (B, R, H, W) (default: `product`).
      positive: clamp the three maps at 0 before f and require attribution > 0 for candidacy (the authors' code).
      pair_chunk: pairs processed together when ranking (memory vs speed; the result does not depend on it).

    Returns:
      `Insecurities` with Q = min(max_insecurities, N(N-1)/2) entries per image; entries with ``valid`` False are
      padding (an image without candidate ambiguities has none valid).
    """
    class_maps = jnp.asarray(class_maps)
    difficulty_map = jnp.asarray(difficulty_map)
    if class_maps.ndim != 4:
        raise ValueError(f"class_maps must have shape (B, N, H, W), got {class_maps.shape}")
    b, n, h, w = class_maps.shape
    if difficulty_map.shape != (b, h, w):
        raise ValueError(f"difficulty_map must have shape {(b, h, w)} (B, H, W), got {difficulty_map.shape}")
    classes = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (b, n)) if classes is None else jnp.asarray(classes)
    if classes.shape != (b, n):
        raise ValueError(f"classes must have shape {(b, n)} (B, N), got {classes.shape}")
    image_size = (h, w) if image_size is None else tuple(int(s) for s in image_size)
    if len(image_size) != 2 or min(image_size) < 1:
        raise ValueError(f"image_size must be (H_img, W_img) with positive sides, got {image_size}")
    if pair_chunk < 1:
        raise ValueError(f"pair_chunk must be positive, got {pair_chunk}")
    coverage, threshold, q = check_options(
        n, k=k, coverage=coverage, threshold=threshold, max_insecurities=max_insecurities
    )
    return _find(
        class_maps,
        difficulty_map,
        classes.astype(jnp.int32),
        image_size=image_size,
        k=int(k),
        coverage=coverage,
        threshold=threshold,
        max_insecurities=q,
        combine=combine,
        positive=bool(positive),
        pair_chunk=int(pair_chunk),
    )


__all__ = [
    "MAX_COVERAGE",
    "MIN_COVERAGE",
    "Insecurities",
    "ambiguity_maps",
    "candidate_members",
    "candidate_pairs",
    "check_options",
    "coverage_threshold",
    "find_insecurities",
    "geometric_mean",
    "mask_statistics",
    "pair_indices",
    "product",
    "threshold_mask",
    "upsample",
]


# ------------------------------------------------------------------------------------------------ readable strength

#: An insecurity is negligible when the less probable of its two classes has a probability below this: the model
#: does not really hesitate between them (a photo predicted at p = 0.99 leaves under 1% to every other class).
NEGLIGIBLE_PROBABILITY = 0.01


def is_negligible(p_a: float, p_b: float, *, limit: float = NEGLIGIBLE_PROBABILITY) -> bool:
    """Whether the pair of classes with probabilities p_a, p_b does not really compete: min(p_a, p_b) < ``limit``."""
    return bool(min(float(p_a), float(p_b)) < limit)


@functools.lru_cache(maxsize=16)
def upsample_weights(size: int, image_size: int) -> np.ndarray:
    """(image_size, size) float64 U with ``upsample`` along one axis = U @ x: `upsample` is linear and separable,
    so the upsampled map of (H, W) x is U_h x U_w^T. Taken from ``upsample`` itself (of the identity), cached."""
    eye = jnp.eye(size, dtype=jnp.float32)
    return np.asarray(upsample(eye[:, None, :], (1, image_size)), np.float64)[:, 0, :].T


def ambiguity_total(class_maps: np.ndarray, difficulty_map: np.ndarray, image_size: tuple[int, int]) -> np.ndarray:
    """The ambiguity of every pair of the N classes summed over the image (upsampled as the masks are): the
    denominator of the shares. class_maps (B, N, H, W), difficulty_map (B, H, W) -> (B,) float64 (maps clamped at
    0, product of Eq. 1)."""
    m = np.maximum(np.asarray(class_maps, np.float64), 0.0)
    s = np.maximum(np.asarray(difficulty_map, np.float64), 0.0)
    h, w = m.shape[-2:]
    # sum over pairs a < b of m_a m_b = ((sum m)^2 - sum m^2) / 2; the sum of its upsampling weighs each cell
    every = s * (m.sum(1) ** 2 - (m**2).sum(1)) / 2  # (B, H, W)
    return np.einsum(
        "bhw,h,w->b", every, upsample_weights(h, image_size[0]).sum(0), upsample_weights(w, image_size[1]).sum(0)
    )


def strength_shares(
    strength: np.ndarray, coverage: np.ndarray, total: np.ndarray, image_size: tuple[int, int]
) -> np.ndarray:
    """The shares when the raw strength is the mean of the pair's ambiguity (product of maps clamped at 0, the
    default of `find_insecurities`) over its mask: the region's sum is strength x area, area = coverage x pixels.
    strength, coverage (B, Q), total (B,) (`ambiguity_total`) -> (B, Q) float64 in [0, 1] (0: no ambiguity)."""
    area = np.rint(np.asarray(coverage, np.float64) * (image_size[0] * image_size[1]))
    inside = np.asarray(strength, np.float64) * area
    total = np.asarray(total, np.float64)[:, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.clip(np.where(total > 0, inside / np.where(total > 0, total, 1.0), 0.0), 0.0, 1.0)


def region_shares(
    class_maps: np.ndarray, difficulty_map: np.ndarray, slots: np.ndarray, masks: np.ndarray
) -> np.ndarray:
    """`ambiguity_shares` of a batch, in numpy (the writer stage computes it per batch from the fetched outputs).

    The sum of an upsampled map over a mask is, by linearity, the map's inner product with the mask projected back
    onto the feature grid (U_h^T M U_w): no map is upsampled. class_maps (B, N, H, W), difficulty_map (B, H, W),
    slots (B, Q, 2) positions of a and b among the N maps, masks (B, Q, H_img, W_img) bool or 0/1 -> (B, Q) float64
    in [0, 1]; an image holding no ambiguity at all gets zeros."""
    m = np.maximum(np.asarray(class_maps, np.float64), 0.0)
    s = np.maximum(np.asarray(difficulty_map, np.float64), 0.0)
    b, q = np.asarray(slots).shape[:2]
    if q == 0 or b == 0:
        return np.zeros((b, q))
    h, w = m.shape[-2:]
    size = tuple(masks.shape[-2:])
    uh, uw = upsample_weights(h, size[0]), upsample_weights(w, size[1])
    total = ambiguity_total(m, s, size)
    slots = np.asarray(slots, np.int64)
    rows = np.arange(b)[:, None]
    pair = m[rows, slots[..., 0]] * m[rows, slots[..., 1]] * s[:, None]  # (B, Q, H, W)
    flat = np.asarray(masks).reshape(b * q * size[0], size[1])
    cols = (flat @ uw.astype(np.float32)).reshape(b * q, size[0], w)  # M U_w, exact enough in float32 (0/1 sums)
    projected = np.matmul(uh.T, cols.astype(np.float64)).reshape(b, q, h, w)  # U_h^T M U_w
    inside = np.einsum("bqhw,bqhw->bq", pair, projected)
    with np.errstate(divide="ignore", invalid="ignore"):
        shares = np.where(total[:, None] > 0, inside / total[:, None], 0.0)
    return np.clip(shares, 0.0, 1.0)


def ambiguity_shares(
    class_maps: np.ndarray, difficulty_map: np.ndarray, slots: np.ndarray, masks: np.ndarray
) -> np.ndarray:
    """The share of the image's ambiguity that lies in each insecurity's region, in [0, 1] (the readable strength).

    Ambiguity is Eq. 1 with f the product of the three maps clamped at 0. The share of pair (a, b) is its ambiguity
    summed over its region divided by the ambiguity of every pair of the N classes summed over the whole image (both
    upsampled to the image as the masks were). At a fixed coverage it ranks the pairs of an image as the raw strength
    does; unlike the raw value (attribution products, 1e-13 to 1e-3) it reads the same on every image.

    class_maps (N, H, W), difficulty_map (H, W), slots (Q, 2) positions of a and b among the N maps, masks
    (Q, H_img, W_img) bool -> (Q,) float64; all zeros when the image holds no ambiguity at all (`region_shares`
    of one image).
    """
    masks = np.asarray(masks, bool)
    slots = np.asarray(slots, np.int64).reshape(-1, 2)
    if len(slots) == 0:
        return np.zeros(0)
    return region_shares(np.asarray(class_maps)[None], np.asarray(difficulty_map)[None], slots[None], masks[None])[0]
