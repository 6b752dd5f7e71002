"""Insecurity ground truth of the evaluation protocol (Sec. 4 and 5.1 of the paper).

CUB: the semantic descriptor phi_c^k of part k under class c is, for each attribute group describing the part, the
class's distribution over the group's values (class_attribute_labels_continuous.txt, normalised per group). The
ambiguity strength of (a, b, k) is gamma averaged over the part's groups, with
    gamma = exp(-(KL(phi_a || phi_b) + KL(phi_b || phi_a)))        (the paper, default), or
    gamma = exp(-2 JS(phi_a, phi_b))                                (the authors' code, divergence="js").
ADE20K: phi_c^k is the fraction of class c's training images that contain object k, zeroed below 0.3, and
gamma = (phi_a + phi_b) / 2. Ground truth = the strongest fraction of (a < b, part) triplets (20% CUB, 1% ADE20K).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from delib_jax.data.cub import PART_ATTRIBUTE_GROUPS, attribute_groups

EPS = 1e-4  # smoothing of attribute distributions: KL is infinite where one class never shows a value


def _group_distributions(class_attributes: np.ndarray, index: np.ndarray, eps: float) -> np.ndarray:
    """(C, V) distribution over one group's V values per class, smoothed by eps."""
    x = np.clip(np.asarray(class_attributes, np.float64)[:, index], 0.0, None) + eps
    return x / x.sum(axis=1, keepdims=True)


def _symmetric_kl(p: np.ndarray) -> np.ndarray:
    """(C, C) KL(p_a || p_b) + KL(p_b || p_a) for rows of p (C, V)."""
    logp = np.log(p)
    cross = p @ logp.T  # sum_v p_a log p_b
    self_term = np.sum(p * logp, axis=1)
    kl = self_term[:, None] - cross  # KL(a || b)
    return kl + kl.T


def _jensen_shannon(p: np.ndarray) -> np.ndarray:
    """(C, C) Jensen-Shannon divergence (natural log) between rows of p (C, V)."""
    m = 0.5 * (p[:, None, :] + p[None, :, :])
    logm = np.log(m)
    kl_am = np.sum(p[:, None, :] * (np.log(p)[:, None, :] - logm), axis=-1)
    return 0.5 * (kl_am + kl_am.T)


def cub_ambiguity_strength(
    class_attributes: np.ndarray,
    attribute_names: Sequence[str],
    part_names: Sequence[str],
    *,
    divergence: str = "kl",
    part_groups: Mapping[str, Sequence[str]] = PART_ATTRIBUTE_GROUPS,
    eps: float = EPS,
) -> np.ndarray:
    """gamma (C, C, K) for every class pair and part; symmetric in (a, b), 1 where distributions are identical."""
    if divergence not in ("kl", "js"):
        raise ValueError(f"divergence must be 'kl' (the paper) or 'js' (the authors' code), got {divergence!r}")
    groups = attribute_groups(attribute_names)
    c = np.asarray(class_attributes).shape[0]
    out = np.zeros((c, c, len(part_names)))
    for k, part in enumerate(part_names):
        names = part_groups.get(part, ())
        missing = [g for g in names if g not in groups]
        if missing or not names:
            raise ValueError(f"part {part!r}: attribute groups {missing or names} not found in the attribute names")
        sims = []
        for g in names:
            p = _group_distributions(class_attributes, groups[g], eps)
            div = _symmetric_kl(p) if divergence == "kl" else 2.0 * _jensen_shannon(p)
            sims.append(np.exp(-np.maximum(div, 0.0)))
        out[:, :, k] = np.mean(sims, axis=0)
    return out


def ade_object_frequency(labels: np.ndarray, present: np.ndarray, num_classes: int) -> np.ndarray:
    """phi (C, O): fraction of each class's images that contain each object. labels (N,), present (N, O) bool."""
    labels = np.asarray(labels)
    present = np.asarray(present, bool)
    counts = np.zeros((num_classes, present.shape[1]))
    np.add.at(counts, labels, present)
    n = np.bincount(labels, minlength=num_classes)[:, None]
    return np.divide(counts, n, out=np.zeros_like(counts), where=n > 0)


def ade_ambiguity_strength(phi: np.ndarray, *, min_frequency: float = 0.3) -> np.ndarray:
    """gamma (C, C, O) = (phi_a + phi_b) / 2 with phi < min_frequency set to 0 (the paper's ADE20K rule)."""
    phi = np.where(np.asarray(phi) >= min_frequency, phi, 0.0)
    return 0.5 * (phi[:, None, :] + phi[None, :, :])


def select_ground_truth(strength: np.ndarray, fraction: float) -> np.ndarray:
    """Boolean (C, C, K), symmetric: the strongest ``fraction`` of (a < b, part) triplets (ties at the cut included).

    Only triplets of positive strength can be selected."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    c = strength.shape[0]
    iu = np.triu_indices(c, k=1)
    values = strength[iu]  # (pairs, K)
    flat = np.sort(values.ravel())[::-1]
    n = max(1, int(round(fraction * flat.size)))
    cut = flat[n - 1]
    chosen = (values >= cut) & (values > 0)
    out = np.zeros(strength.shape, bool)
    out[iu] = chosen
    out[(iu[1], iu[0])] = chosen
    return out
