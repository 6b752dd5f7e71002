"""Difficulty scores s in [0, 1] of a prediction (Sec. 3.3 of the paper), as functions of the head outputs.

All are safe at probabilities of exactly 0 and 1 (no NaN in values, gradients or second derivatives).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp


def hesitancy(probs: jax.Array) -> jax.Array:
    """Eq. 3: s = 1 - max_y f_y. probs (..., C) -> (...)."""
    return 1.0 - jnp.max(probs, axis=-1)


def entropy(probs: jax.Array) -> jax.Array:
    """Eq. 4: s = -(1 / log C) sum_y f_y log f_y, normalised to [0, 1]. probs (..., C) -> (...).

    0 log 0 is taken as 0; the double `where` keeps the derivatives finite there too."""
    c = probs.shape[-1]
    if c < 2:
        raise ValueError(f"entropy needs at least 2 classes, got {c}")
    positive = probs > 0
    safe = jnp.where(positive, probs, 1.0)
    plogp = jnp.where(positive, safe * jnp.log(safe), 0.0)
    return -jnp.sum(plogp, axis=-1) / jnp.log(c)


def hardness(hardness_logit: jax.Array) -> jax.Array:
    """Eq. 5: s = sigmoid output of the hardness predictor. logit (...) -> (...)."""
    return jax.nn.sigmoid(hardness_logit)


SCORES: dict[str, Callable[[jax.Array], jax.Array]] = {
    "hesitancy": hesitancy,
    "entropy": entropy,
    "hardness": hardness,
}

SELF_REFERENTIAL = ("hesitancy", "entropy")  # functions of the class probabilities


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
    return SCORES[name](jax.nn.softmax(logits, axis=-1))
