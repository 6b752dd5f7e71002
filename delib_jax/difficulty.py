"""Difficulty scores s in [0, 1] of a prediction (Sec. 3.3 of the paper), as functions of the head outputs.

Every score and its first and second derivatives are finite for all float32 (and float64) inputs: probabilities
anywhere in [0, 1], tiny ones included, and finite logits however confident. The attribution core differentiates
the scores of the logits (`LOGIT_SCORES`), which never divide by a probability; `entropy` of given probabilities
takes p log p with a derivative written out (log p + 1), so that its second derivative is 1/p rather than
p / p^2 (whose p^2 underflows to 0 for p below ~1e-19 in float32: NaN).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp


def hesitancy(probs: jax.Array) -> jax.Array:
    """Eq. 3: s = 1 - max_y f_y. probs (..., C) -> (...)."""
    return 1.0 - jnp.max(probs, axis=-1)


@jax.custom_jvp
def _plogp(p: jax.Array) -> jax.Array:
    """p log p elementwise; 0 for p below the smallest normal float (where p log p < 1e-36 anyway), 0 log 0 = 0."""
    keep = p >= jnp.finfo(p.dtype).tiny
    safe = jnp.where(keep, p, 1.0)
    return jnp.where(keep, safe * jnp.log(safe), 0.0)


@_plogp.defjvp
def _plogp_jvp(primals, tangents):
    (p,), (t,) = primals, tangents
    keep = p >= jnp.finfo(p.dtype).tiny
    safe = jnp.where(keep, p, 1.0)
    # d(p log p) = (log p + 1) dp; its own derivative 1/p is finite down to the smallest normal float
    return _plogp(p), jnp.where(keep, jnp.log(safe) + 1.0, 0.0) * t


def _check_classes(c: int) -> None:
    if c < 2:
        raise ValueError(f"entropy needs at least 2 classes, got {c}")


def entropy(probs: jax.Array) -> jax.Array:
    """Eq. 4: s = -(1 / log C) sum_y f_y log f_y, normalised to [0, 1]. probs (..., C) -> (...).

    0 log 0 is taken as 0 (and its derivative as 0)."""
    _check_classes(probs.shape[-1])
    return -jnp.sum(_plogp(probs), axis=-1) / jnp.log(probs.shape[-1])


def hardness(hardness_logit: jax.Array) -> jax.Array:
    """Eq. 5: s = sigmoid output of the hardness predictor. logit (...) -> (...)."""
    return jax.nn.sigmoid(hardness_logit)


def centre_logits(logits: jax.Array) -> jax.Array:
    """z - z_top (the most probable class's logit), differentiably. Functions of softmax(z) do not change, but their
    derivatives along a tangent u see u - u_top, whose top entry is exactly 0: a saturated softmax (p_top = 1 in
    float32) then keeps the tiny true values of its derivatives instead of float32 rounding noise of u_top (~1e-9).
    logits (..., C) -> (..., C)."""
    top = jnp.argmax(logits, axis=-1)[..., None]
    return logits - jnp.take_along_axis(logits, top, axis=-1)


def softmax(logits: jax.Array) -> jax.Array:
    """Class probabilities (..., C) of logits (..., C), with derivatives as accurate as `centre_logits` makes them."""
    return jax.nn.softmax(centre_logits(logits), axis=-1)


def hesitancy_from_logits(logits: jax.Array) -> jax.Array:
    """`hesitancy` of softmax(logits): 1 - p_top, the top class taken from the logits. Logits a hair apart (2.8e-13)
    give probabilities that tie in float32, where a max would split its derivative between the two (a subgradient
    float64 does not take); the logits still tell them apart. logits (..., C) -> (...)."""
    top = jnp.argmax(logits, axis=-1)[..., None]
    return 1.0 - jnp.take_along_axis(softmax(logits), top, axis=-1)[..., 0]


def entropy_from_logits(logits: jax.Array) -> jax.Array:
    """`entropy` of softmax(logits), as -sum_y p_y log p_y with log p_y = log_softmax(z)_y: log p stays finite where
    p underflows to 0, so the derivatives are products of finite numbers. logits (..., C) -> (...)."""
    _check_classes(logits.shape[-1])
    log_p = jax.nn.log_softmax(centre_logits(logits), axis=-1)
    return -jnp.sum(jnp.exp(log_p) * log_p, axis=-1) / jnp.log(logits.shape[-1])


SCORES: dict[str, Callable[[jax.Array], jax.Array]] = {
    "hesitancy": hesitancy,
    "entropy": entropy,
    "hardness": hardness,
}

SELF_REFERENTIAL = ("hesitancy", "entropy")  # functions of the class probabilities

# The self-referential scores as functions of the class logits: what attribution differentiates.
LOGIT_SCORES: dict[str, Callable[[jax.Array], jax.Array]] = {
    "hesitancy": hesitancy_from_logits,
    "entropy": entropy_from_logits,
}


def check_score(name: str) -> str:
    """Validate a difficulty-score name; returns it."""
    if name not in SCORES:
        raise ValueError(f"unknown difficulty score {name!r}; choose one of {', '.join(SCORES)}")
    return name


def score_from_outputs(name: str, logits: jax.Array, hardness_logit: jax.Array | None = None) -> jax.Array:
    """Difficulty (B,) from logits (B, C) and, for 'hardness', the hardness logit (B,)."""
    check_score(name)
    if name == "hardness":
        if hardness_logit is None:
            raise ValueError("the hardness score needs a model with a hardness predictor")
        return hardness(hardness_logit)
    return LOGIT_SCORES[name](logits)
