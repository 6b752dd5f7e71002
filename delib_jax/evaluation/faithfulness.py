"""Faithfulness of attribution maps: deletion / insertion curves and their areas, and infidelity (Yeh et al. 2019).

    curves = perturbation_curves(model.classifier, a, maps, targets, mode="deletion")   # (B, M, T + 1) at layer A
    area = curve_area(curves)                                                            # (B, M)
    infid = infidelity(model.classifier, a, maps, targets, perturbation="subset", key=key)   # (B, M)

Everything is vectorised over the B images and the M maps of each image (e.g. one per attribution method), and
over the perturbed inputs: the head runs on ``batch_size`` perturbed inputs at a time (lax.map of vmapped chunks).
X (B, H, W, D) is a layer's features (head: X -> logits) or the images themselves (head: the whole model); maps on
another grid (e.g. at A for a pixel-level curve) are upsampled bilinearly to X's H x W first. The explained output
is a function of the logits (`delib_jax.attribution.explained_output`, softmax probabilities by default).

Deletion (Petsiuk et al. 2018): replace the locations with the baseline (zeros by default: the dataset mean for
normalised images, the absence of a feature at a ReLU layer) in the order the map ranks them, most important first,
and record the explained output after each fraction k / T of the L locations; a faithful map makes it fall fast (a
small area). Insertion: start from the baseline and put the locations back in the same order (a large area).

Infidelity: E_I[(I^T phi - (f(x) - f(x - I)))^2] with per-location perturbations, so that I^T phi is the sum of the
per-location map values the perturbation touches, stated here:
  'subset'   : each location is set to the baseline with probability ``scale`` (default 0.25), I = m (x - x0):
               I^T phi = sum_l m_l phi_l;
  'gaussian' : each location's displacement from the baseline is scaled by eps_l ~ N(0, scale^2) (default 0.1),
               I = eps (x - x0): I^T phi = sum_l eps_l phi_l.
The same perturbations serve all maps of an image (paired comparison). With ``normalize`` (default) phi is first
scaled by the beta minimising the infidelity (Yeh et al. Sec. 3; captum's normalize), so maps on any scale compare.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from delib_jax.attribution.layer import pure, rebuild
from delib_jax.attribution.outputs import Output, explained_output
from delib_jax.attribution.resize import upsample_maps

Array = jax.Array
MODES = ("deletion", "insertion")
PERTURBATIONS = {"subset": 0.25, "gaussian": 0.1}


def _flat_maps(maps: Array, grid: tuple[int, int]) -> Array:
    """(B, M, h, w) -> (B, M, L) on X's grid."""
    maps = upsample_maps(maps.astype(jnp.float32), grid)
    return maps.reshape(*maps.shape[:2], -1)


def _curves(leaves, x, maps, targets, baseline, deletion, *, structure, output: Output, steps: int, batch_size: int):
    head = rebuild(structure, leaves)
    b, h, w, d = x.shape
    flat = _flat_maps(maps, (h, w))  # (B, M, L)
    m = flat.shape[1]
    order = jnp.argsort(-flat, axis=-1, stable=True)
    rank = jnp.argsort(order, axis=-1)  # 0 = the location the map ranks first
    counts = jnp.round(jnp.arange(steps + 1) * (h * w) / steps).astype(jnp.int32)  # (T + 1,)

    def one(idx):  # explained output after step t of map m of image i
        i, j, t = idx // (m * (steps + 1)), (idx // (steps + 1)) % m, idx % (steps + 1)
        chosen = (rank[i, j] < counts[t]).reshape(h, w, 1)
        xi = jnp.where(chosen == deletion, baseline[i], x[i])  # deletion: chosen ones removed; insertion: the rest
        return output(head(xi[None]))[0, targets[i, j]]

    values = jax.lax.map(one, jnp.arange(b * m * (steps + 1)), batch_size=batch_size)
    return values.reshape(b, m, steps + 1)


# the mode and (below) the perturbation kind are traced flags, so that both share one compilation
_curves_jit = jax.jit(_curves, static_argnames=("structure", "output", "steps", "batch_size"))


def _check(x, maps, targets, baseline):
    x = jnp.asarray(x)
    if x.ndim != 4:
        raise ValueError(f"x must be (B, H, W, D), got shape {x.shape}")
    maps = jnp.asarray(maps)
    if maps.ndim != 4 or maps.shape[0] != x.shape[0]:
        raise ValueError(f"maps must be (B, M, h, w) with B = {x.shape[0]}, got shape {maps.shape}")
    if not bool(jnp.isfinite(maps).all()):
        raise ValueError("maps contain NaN or inf values")
    targets = np.asarray(targets)
    if targets.ndim == 1:
        targets = np.repeat(targets[:, None], maps.shape[1], axis=1)
    if targets.shape != maps.shape[:2] or not np.issubdtype(targets.dtype, np.integer):
        raise ValueError(
            f"targets must be integer output indices (B,) or (B, M) = {maps.shape[:2]}, got "
            f"{targets.dtype} {targets.shape}"
        )
    if baseline is None:
        baseline = jnp.zeros_like(x)
    baseline = jnp.broadcast_to(jnp.asarray(baseline, x.dtype), x.shape)
    return x, maps, jnp.asarray(targets, jnp.int32), baseline


def perturbation_curves(
    head: Callable | nnx.Module,
    x: Array,
    maps: Array,
    targets: Array,
    *,
    mode: str = "deletion",
    output: str | Output | Callable = "probs",
    steps: int = 20,
    baseline: Array | float | None = None,
    batch_size: int = 64,
) -> Array:
    """Deletion or insertion curves (B, M, T + 1): the explained output ``targets`` after removing (adding) the
    fraction k / T of X's locations in the order of each map, k = 0..T.

    head: X (n, H, W, D) -> logits (n, K), a callable or NNX module (eval mode, the caller's left as it is);
    x: X (B, H, W, D); maps: (B, M, h, w), upsampled to H x W when h x w differs; targets: (B,) or (B, M) output
    indices; baseline: what a removed location becomes (B, H, W, D) or a scalar, default 0; batch_size: perturbed
    inputs per head call. Ties in a map are broken by location order."""
    if mode not in MODES:
        raise ValueError(f"mode must be 'deletion' or 'insertion', got {mode!r}")
    if steps < 1 or batch_size < 1:
        raise ValueError(f"steps and batch_size must be >= 1, got {steps} and {batch_size}")
    x, maps, targets, baseline = _check(x, maps, targets, baseline)
    structure, leaves = pure(head)
    return _curves_jit(
        leaves,
        x,
        maps,
        targets,
        baseline,
        jnp.asarray(mode == "deletion"),
        structure=structure,
        output=explained_output(output),
        steps=steps,
        batch_size=batch_size,
    )


def curve_area(curves: Array) -> Array:
    """Area under curves (..., T + 1) sampled at fractions 0, 1/T, ..., 1 (trapezoid rule) -> (...)."""
    curves = jnp.asarray(curves)
    return (jnp.sum(curves, axis=-1) - 0.5 * (curves[..., 0] + curves[..., -1])) / (curves.shape[-1] - 1)


def _infidelity(
    leaves,
    x,
    maps,
    targets,
    baseline,
    key,
    subset,
    scale,
    normalize,
    *,
    structure,
    output: Output,
    samples: int,
    batch_size: int,
):
    head = rebuild(structure, leaves)
    b, h, w, d = x.shape
    flat = _flat_maps(maps, (h, w))  # (B, M, L)
    weights = jnp.where(
        subset,
        jax.random.bernoulli(key, jnp.clip(scale, 0, 1), (b, samples, h * w)).astype(x.dtype),
        scale * jax.random.normal(key, (b, samples, h * w), x.dtype),
    )
    delta = x - baseline

    def one(idx):  # f(x - I) of sample s of image i, every output (P,)
        i, s = idx // samples, idx % samples
        return output(head((x[i] - weights[i, s].reshape(h, w, 1) * delta[i])[None]))[0]

    perturbed = jax.lax.map(one, jnp.arange(b * samples), batch_size=batch_size).reshape(b, samples, -1)
    diff = output(head(x))[:, None, :] - perturbed  # f(x) - f(x - I) (B, S, P)
    diff = jnp.take_along_axis(diff, jnp.broadcast_to(targets[:, None, :], (b, samples, targets.shape[1])), axis=2)
    explained = jnp.einsum("bsl,bml->bsm", weights, flat)  # I^T phi (B, S, M)
    beta = jnp.sum(explained * diff, axis=1) / jnp.maximum(jnp.sum(explained**2, axis=1), 1e-30)  # (B, M)
    explained = jnp.where(normalize, explained * beta[:, None, :], explained)
    return jnp.mean((explained - diff) ** 2, axis=1)


_infidelity_jit = jax.jit(_infidelity, static_argnames=("structure", "output", "samples", "batch_size"))


def infidelity(
    head: Callable | nnx.Module,
    x: Array,
    maps: Array,
    targets: Array,
    *,
    perturbation: str = "subset",
    scale: float | None = None,
    samples: int = 64,
    key: Array | None = None,
    output: str | Output | Callable = "probs",
    baseline: Array | float | None = None,
    normalize: bool = True,
    batch_size: int = 64,
) -> Array:
    """Infidelity (B, M) of each map under ``samples`` perturbations of the stated kind (module docstring).

    Arguments as `perturbation_curves`; perturbation 'subset' (scale: the probability that a location is set to the
    baseline) or 'gaussian' (scale: the standard deviation of each location's factor). Lower is more faithful."""
    if perturbation not in PERTURBATIONS:
        raise ValueError(f"perturbation must be one of {', '.join(PERTURBATIONS)}, got {perturbation!r}")
    scale = PERTURBATIONS[perturbation] if scale is None else float(scale)
    if perturbation == "subset" and not 0 < scale <= 1:
        raise ValueError(f"a subset perturbation needs a probability scale in (0, 1], got {scale}")
    if perturbation == "gaussian" and not scale > 0:
        raise ValueError(f"a gaussian perturbation needs a positive scale, got {scale}")
    if samples < 2 or batch_size < 1:
        raise ValueError(f"samples must be >= 2 and batch_size >= 1, got {samples} and {batch_size}")
    x, maps, targets, baseline = _check(x, maps, targets, baseline)
    structure, leaves = pure(head)
    key = jax.random.key(0) if key is None else key
    return _infidelity_jit(
        leaves,
        x,
        maps,
        targets,
        baseline,
        key,
        jnp.asarray(perturbation == "subset"),
        jnp.asarray(scale, x.dtype),
        jnp.asarray(normalize),
        structure=structure,
        output=explained_output(output),
        samples=samples,
        batch_size=batch_size,
    )
