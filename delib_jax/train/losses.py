"""Losses for jointly training a classifier and its hardness predictor (the paper's ref. [46], Wang & Vasconcelos,
"Towards Realistic Predictors", ECCV 2018).

Notation: B examples, C classes; ``logits`` (B, C), ``hardness_logit`` z (B,) with hardness s = sigmoid(z) in [0, 1]
(1 = hard); p (B,) the classifier's softmax probability of the true class.

Classifier loss (hardness-weighted cross-entropy)::

    L_cls = mean_i  w_i * CE_i,   w_i = sg(s_i) / mean_j sg(s_j)      (normalize=True, the default)
                                  w_i = sg(s_i)                       (normalize=False, the authors' code)

Hardness loss (the ECCV repository's choice; the NeurIPS code's ``1 - p - s + 2ps`` with class-balancing is not used)::

    L_hard = mean_i  -[ sg(p_i) log(1 - s_i) + (1 - sg(p_i)) log s_i ]

which is binary cross-entropy with target 1 - p, so its minimiser is s = 1 - p: the predictor estimates the
classifier's probability of missing the true class. It is a proper scoring rule (calibrated, smooth gradients) and
needs none of the linear loss's ad-hoc constants (the 0.55 clamp for correct samples, the press=5 class weights).

Where the gradients flow (``sg`` = stop-gradient):
- ``sg(s)`` in L_cls: the classifier is trained to do well on what the predictor finds hard; without it the
  predictor would lower every s_i to shrink the classifier's loss, a trivial solution.
- ``sg(p)`` in L_hard: the predictor learns the classifier's hardness; without it the hardness loss would push the
  classifier's probabilities towards the predictor's guesses.
- For a hardness *head* on A, the head reads ``sg(A)`` (see `delib_jax.train.loop.forward`): A, the tensor the
  explanations attribute to, is the classifier's own representation, trained by L_cls only. For a separate hardness
  *network* the two parameter sets are disjoint anyway.
With these, the total ``L_cls + L_hard`` has disjoint gradients for the two predictors, so one optimizer over the
sum is the same as two optimizers with the same hyper-parameters, one per loss.

The normalised weights keep the relative emphasis on hard examples but not the absolute scale: with raw weights the
classifier's gradient shrinks with the mean predicted hardness, which goes to ~0 as the training set is fitted,
silently annealing the learning rate the schedule prescribes.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def true_class_probability(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Softmax probability of each example's label: logits (B, C), labels (B,) -> (B,)."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return jnp.exp(jnp.take_along_axis(logp, labels[:, None].astype(jnp.int32), axis=-1)[:, 0])


def hardness_bce(hardness_logit: jax.Array, p_true: jax.Array) -> jax.Array:
    """Per-example hardness loss -[p log(1 - s) + (1 - p) log s], s = sigmoid(z): z (B,), p (B,) -> (B,).

    Computed from the logit (log s = log_sigmoid(z), log(1 - s) = log_sigmoid(-z)) so it is finite for any z.
    """
    z = hardness_logit.astype(jnp.float32)
    return -(p_true * jax.nn.log_sigmoid(-z) + (1.0 - p_true) * jax.nn.log_sigmoid(z))


def hardness_weights(hardness_logit: jax.Array, *, normalize: bool = True) -> jax.Array:
    """Classifier loss weights sg(s) (B,), divided by their batch mean when ``normalize``."""
    s = jax.lax.stop_gradient(jax.nn.sigmoid(hardness_logit.astype(jnp.float32)))
    return s / jnp.maximum(jnp.mean(s), 1e-6) if normalize else s


def joint_loss(
    logits: jax.Array,
    hardness_logit: jax.Array | None,
    labels: jax.Array,
    *,
    normalize: bool = True,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """L_cls + L_hard (module docstring) for logits (B, C), hardness logit (B,) or None, integer labels (B,).

    Without a hardness predictor (None) this is the plain mean cross-entropy.

    Returns:
      the scalar loss and metrics: loss, cls_loss, hardness_loss, accuracy, ce (unweighted mean cross-entropy),
      hardness (mean s).
    """
    ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)  # (B,)
    accuracy = jnp.mean((jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32))
    if hardness_logit is None:
        loss = jnp.mean(ce)
        zero = jnp.zeros((), jnp.float32)
        return loss, dict(loss=loss, cls_loss=loss, hardness_loss=zero, accuracy=accuracy, ce=loss, hardness=zero)
    cls_loss = jnp.mean(hardness_weights(hardness_logit, normalize=normalize) * ce)
    p = jax.lax.stop_gradient(true_class_probability(logits, labels))
    hard_loss = jnp.mean(hardness_bce(hardness_logit, p))
    loss = cls_loss + hard_loss
    metrics = dict(
        loss=loss, cls_loss=cls_loss, hardness_loss=hard_loss, accuracy=accuracy, ce=jnp.mean(ce),
        hardness=jnp.mean(jax.nn.sigmoid(hardness_logit.astype(jnp.float32))),
    )  # fmt: skip
    return loss, metrics


__all__ = ["hardness_bce", "hardness_weights", "joint_loss", "true_class_probability"]
