"""Attribution maps for every class and the difficulty score, in one compiled pass.

Outputs explained (Sec. 3.3): P = C class probabilities f_p = softmax(z)_p, then one difficulty score, either a
function of the same softmax (hesitancy, entropy) or the sigmoid of the hardness predictor on its own features A_s
(A itself for the jointly trained head). Outputs are grouped by the head they read, so each head's tangents are
computed once for all of its outputs.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from delib_jax import difficulty
from delib_jax.attribution import _terms
from delib_jax.models import Structure, inference_view, split_leaves
from delib_jax.models.heads import TANGENT_LAYOUTS

Array = jax.Array

METHODS = ("gradient", "gradient_hessian", "integrated_gradients")
QUADRATURE = ("trapezoid", "midpoint", "left", "gauss_legendre")


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class Attribution:
    """Per-location attribution maps of one batch.

    maps: (B, P, H, W), P = N class maps (in the order of ``classes``) then the difficulty map last;
    first_order, second_order: the two terms before the options combined them (second_order zero for 'gradient');
    classes: (B, N) class index of each class map (all C, or the top-N predictions); probs: (B, C); score: (B,);
    residual: (B, P) integrated-gradients completeness residual sum(maps) - (g(A) - g(baseline)), else None.
    """

    maps: Array
    first_order: Array
    second_order: Array
    classes: Array
    probs: Array
    score: Array
    residual: Array | None = None

    @property
    def class_maps(self) -> Array:
        """(B, N, H, W)."""
        return self.maps[:, :-1]

    @property
    def difficulty_map(self) -> Array:
        """(B, H, W)."""
        return self.maps[:, -1]


@dataclass(frozen=True)
class Options:
    """Static configuration of an attribution pass (hashable, so it keys jit's cache)."""

    method: str = "gradient_hessian"
    score: str = "hardness"
    second_order: str = "diagonal"  # or "cross"
    second_order_on: str = "all"  # or "difficulty" (the authors' code)
    positive: bool = False  # keep positive contributions only
    abs_second: bool = False  # |second-order term| (the authors' code on CUB)
    top_n: int | None = None
    path: str = "auto"  # "fast" (structure-aware), "generic" (nested jvp over locations) or "auto"
    chunk_size: int | None = None  # locations per chunk in the generic path
    steps: int = 50  # integrated gradients
    quadrature: str = "trapezoid"
    # first-order term of the difficulty map: "positive" sum_d a_d max(ds/da_d, 0), the authors' rule and the
    # default of every entry point (attribute, make_attribute_fn, explain, delib explain, the evaluation): channels
    # that make the prediction harder, even where evidence that makes it easier outweighs them (without it the
    # hardness map is negative on the object itself); or "signed" sum_d a_d ds/da_d, Eq. 2 as written.
    difficulty_channels: str = "positive"
    # the fast path's tangent GEMM layout: "auto" (feature-major on the CPU, row-major on GPUs, where each was
    # measured faster), "feature_major" or "row_major"; the maps are the same
    tangent_layout: str = "auto"

    def check(self, num_classes: int) -> Options:
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        difficulty.check_score(self.score)
        if self.second_order not in ("diagonal", "cross"):
            raise ValueError(f"second_order must be 'diagonal' or 'cross', got {self.second_order!r}")
        if self.second_order_on not in ("all", "difficulty"):
            raise ValueError(f"second_order_on must be 'all' or 'difficulty', got {self.second_order_on!r}")
        if self.path not in ("auto", "fast", "generic"):
            raise ValueError(f"path must be 'auto', 'fast' or 'generic', got {self.path!r}")
        if num_classes < 2:
            raise ValueError(f"attribution needs at least 2 classes, the class head has {num_classes}")
        if self.top_n is not None and not 1 <= self.top_n <= num_classes:
            raise ValueError(f"top_n must be between 1 and the number of classes ({num_classes}), got {self.top_n}")
        if self.method == "integrated_gradients":
            if self.steps < 1:
                raise ValueError(f"integrated gradients needs steps >= 1, got {self.steps}")
            if self.quadrature not in QUADRATURE:
                raise ValueError(f"quadrature must be one of {', '.join(QUADRATURE)}, got {self.quadrature!r}")
        if self.difficulty_channels not in ("signed", "positive"):
            raise ValueError(f"difficulty_channels must be 'signed' or 'positive', got {self.difficulty_channels!r}")
        if self.tangent_layout not in TANGENT_LAYOUTS:
            raise ValueError(f"tangent_layout must be one of {', '.join(TANGENT_LAYOUTS)}, got {self.tangent_layout!r}")
        if self.chunk_size is not None and self.chunk_size < 1:
            raise ValueError(f"chunk_size must be positive, got {self.chunk_size}")
        return self


def output_functions(score: str) -> tuple[Callable[[Array], Array], Callable[[Array], Array] | None]:
    """Row-wise output functions: (class-head logits -> its outputs, hardness logit -> [s] or None).

    For self-referential scores the class head's outputs are [softmax(z), score(z)] (C + 1), the score taken from
    the logits (`delib_jax.difficulty.LOGIT_SCORES`: derivatives finite at any confidence)."""
    if score == "hardness":
        return difficulty.softmax, (lambda h: jax.nn.sigmoid(h))
    fn = difficulty.LOGIT_SCORES[score]

    def phi(z):
        return jnp.concatenate([difficulty.softmax(z), fn(z)[..., None]], axis=-1)

    return phi, None


def quadrature(steps: int, rule: str, dtype=None) -> tuple[np.ndarray, np.ndarray]:
    """Points alpha in [0, 1] and weights summing to 1 for integrating along the straight path, (steps [+ 1],) each.

    Computed in float64 and returned in ``dtype``: by default float64 when JAX runs with x64 enabled, else float32
    (float32 nodes limited float64 integrated gradients to ~2e-8)."""
    if dtype is None:
        dtype = np.float64 if jax.config.jax_enable_x64 else np.float32
    if rule == "trapezoid":
        alphas = np.linspace(0.0, 1.0, steps + 1)
        weights = np.full(steps + 1, 1.0 / steps)
        weights[[0, -1]] *= 0.5
    elif rule == "midpoint":
        alphas = (np.arange(steps) + 0.5) / steps
        weights = np.full(steps, 1.0 / steps)
    elif rule == "gauss_legendre":  # exact for polynomials of degree 2 steps - 1 along the path
        nodes, w = np.polynomial.legendre.leggauss(steps)
        alphas, weights = (nodes + 1.0) / 2.0, w / 2.0
    else:  # left Riemann sum
        alphas = np.arange(steps) / steps
        weights = np.full(steps, 1.0 / steps)
    return alphas.astype(dtype), weights.astype(dtype)


def _group_terms(head, phi, a, v, opts: Options, second: str | None):
    """(first, second, z): terms of shape (B, P_g, L) for the outputs phi(head(.)) at point a along v, and the head's
    logits z = head(a) where the fast path computed them on the way (None otherwise)."""
    fast = has_taylor(head, second) and opts.path != "generic"
    if opts.path == "fast" and not fast:
        raise ValueError(
            f"path='fast' needs a head with exact per-location derivatives (`taylor`; second_order={second!r}), "
            f"got {type(head).__name__}; use path='generic'"
        )
    if fast:
        z, u, w = head.taylor(a, v, second=second, layout=opts.tangent_layout)
        return (*_terms.tangent_terms(phi, z, u, second=second, w=w), z)
    return (*_terms.generic_terms(lambda x: phi(head(x)), a, v, second=second, chunk_size=opts.chunk_size), None)


def has_taylor(head, second: str | None = "diagonal") -> bool:
    """Whether ``head`` gives its logits' exact per-location derivatives itself (``taylor(a, v, second=, layout=)``
    -> (z, U, W)), for the ``second`` term asked ('diagonal', 'cross' or None); heads that give only some terms list
    those they give in ``taylor_terms``. Other heads take the generic path."""
    if not callable(getattr(head, "taylor", None)):
        return False
    return second in getattr(head, "taylor_terms", (None, "diagonal", "cross"))


def _groups(classifier, hardness_head, a, a_s, opts: Options, base=None, base_s=None):
    """[(head, output function, features it reads, baseline)] -- one entry per head."""
    class_phi, hard_phi = output_functions(opts.score)
    groups = [(classifier, class_phi, a, base)]
    if hard_phi is not None:
        groups.append((hardness_head, hard_phi, a_s, base_s))
    return groups


def _taylor(classifier, hardness_head, a, a_s, opts: Options):
    """first, second (B, C+1, L) for 'gradient' / 'gradient_hessian' at A along A (Eq. 2), and each head's logits
    where the fast path computed them (else None)."""
    second = opts.second_order if opts.method == "gradient_hessian" else None
    firsts, seconds, logits = [], [], []
    for head, phi, x, _ in _groups(classifier, hardness_head, a, a_s, opts):
        f, s, z = _terms_or_zero(head, phi, x, x, opts, second)
        firsts.append(f)
        seconds.append(s)
        logits.append(z)
    first = jnp.concatenate(firsts, axis=1)
    if opts.difficulty_channels == "positive":
        head, phi, x, _ = _groups(classifier, hardness_head, a, a_s, opts)[-1]
        grad = _difficulty_grad(head, phi, x)
        first = first.at[:, -1].set(_positive_channels(x, grad))
    return first, jnp.concatenate(seconds, axis=1), None, logits


def _difficulty_grad(head, phi, x):
    """d s / dA (B, H, W, D) of the difficulty output (the last output of its group), by one backward pass."""
    return jax.grad(lambda y: jnp.sum(phi(head(y))[:, -1]))(x)


def _positive_channels(direction, grad):
    """(B, L) sum over channels of direction * max(grad, 0)."""
    b, h, w, _ = direction.shape
    return jnp.sum(direction * jnp.maximum(grad, 0.0), axis=-1).reshape(b, h * w)


def _terms_or_zero(head, phi, a, v, opts, second):
    f, s, z = _group_terms(head, phi, a, v, opts, second)
    return f, (jnp.zeros_like(f) if s is None else 0.5 * s), z


def _integrated(classifier, hardness_head, a, a_s, base, base_s, opts: Options):
    """Integrated gradients per location: (A - A0)_l . mean_alpha grad g(A0 + alpha (A - A0))_l, and the residual."""
    alphas, weights = quadrature(opts.steps, opts.quadrature, a.dtype)
    firsts, residuals = [], []
    groups = _groups(classifier, hardness_head, a, a_s, opts, base, base_s)
    for i, (head, phi, x, x0) in enumerate(groups):
        delta = x - x0

        def step(acc, aw, head=head, phi=phi, x0=x0, delta=delta):
            alpha, weight = aw
            f, _, _ = _group_terms(head, phi, x0 + alpha * delta, delta, opts, None)
            return acc + weight * f, None

        p_out = jax.eval_shape(lambda y, head=head, phi=phi: phi(head(y)), x).shape[-1]
        zero = jnp.zeros((a.shape[0], p_out, a.shape[1] * a.shape[2]), x.dtype)
        total, _ = jax.lax.scan(step, zero, (jnp.asarray(alphas), jnp.asarray(weights)))
        if opts.difficulty_channels == "positive" and i == len(groups) - 1:  # the group holding the difficulty

            def grad_step(acc, aw, head=head, phi=phi, x0=x0, delta=delta):
                return acc + aw[1] * _difficulty_grad(head, phi, x0 + aw[0] * delta), None

            avg, _ = jax.lax.scan(grad_step, jnp.zeros_like(x), (jnp.asarray(alphas), jnp.asarray(weights)))
            total = total.at[:, -1].set(_positive_channels(delta, avg))
        firsts.append(total)
        residuals.append(jnp.sum(total, axis=-1) - (phi(head(x)) - phi(head(x0))))
    first = jnp.concatenate(firsts, axis=1)
    return first, jnp.zeros_like(first), jnp.concatenate(residuals, axis=1)


def _combine(first, second, opts: Options):
    if opts.abs_second:
        second = jnp.abs(second)
    if opts.second_order_on == "difficulty":
        second = second.at[:, :-1].set(0.0)
    maps = first + second
    if opts.positive:
        maps = jnp.maximum(maps, 0.0)
    return maps, second


def _attribute(classifier, hardness_head, a, a_s, base, base_s, opts: Options) -> Attribution:
    b, h, w, _ = a.shape
    head_logits = [None, None]
    if opts.method == "integrated_gradients":
        first, second, residual = _integrated(classifier, hardness_head, a, a_s, base, base_s, opts)
    else:  # the fast path computes the logits on the way; reuse them (for VGG this saves a second read of fc6)
        first, second, residual, found = _taylor(classifier, hardness_head, a, a_s, opts)
        head_logits[: len(found)] = found
    logits = classifier(a) if head_logits[0] is None else head_logits[0]
    probs = jax.nn.softmax(logits, axis=-1)
    hard_logit = None
    if hardness_head is not None:
        hard_logit = (hardness_head(a_s) if head_logits[1] is None else head_logits[1])[:, 0]
    score = difficulty.score_from_outputs(opts.score, logits, hard_logit)
    maps, second = _combine(first, second, opts)
    c = probs.shape[-1]
    if opts.top_n is None:
        classes = jnp.broadcast_to(jnp.arange(c), (b, c))
    else:
        classes = jax.lax.top_k(probs, opts.top_n)[1]
    index = jnp.concatenate([classes, jnp.full((b, 1), c)], axis=1)  # difficulty is output C

    def pick(x):
        if opts.top_n is None:  # every output, already in order: no gather
            return x.reshape(b, -1, h, w)
        return jnp.take_along_axis(x, index[:, :, None], axis=1).reshape(b, -1, h, w)

    if residual is not None and opts.top_n is not None:
        residual = jnp.take_along_axis(residual, index, axis=1)
    return Attribution(
        maps=pick(maps),
        first_order=pick(first),
        second_order=pick(second),
        classes=classes,
        probs=probs,
        score=score,
        residual=residual,
    )


@functools.lru_cache(maxsize=64)
def _compiled_heads(classifier: Structure, hardness: Structure | None, opts: Options) -> Callable:
    """One jitted (class-head leaves, hardness-head leaves, A, A_s, baselines) -> Attribution per head structures and
    options: `attribute` reuses it for every call on heads of the same structure (re-tracing a head for each call
    cost ~0.25 s with the VGG16 head)."""

    def run(classifier_leaves, hardness_leaves, a, a_s, base, base_s):
        head = None if hardness is None else hardness.merge(hardness_leaves)
        return _attribute(classifier.merge(classifier_leaves), head, a, a_s, base, base_s, opts)

    return jax.jit(run)


def _check_features(name: str, x, channels: int | None) -> jax.Array:
    """A (B, H, W, D) feature tensor as float32 (float64 kept under x64): one clear ValueError otherwise."""
    if getattr(x, "ndim", None) != 4:
        raise ValueError(f"{name} must have shape (B, H, W, D), got {getattr(x, 'shape', type(x).__name__)}")
    if channels is not None and x.shape[-1] != channels:
        raise ValueError(f"{name} has {x.shape[-1]} channels but the head expects {channels}")
    if not isinstance(x, jax.core.Tracer) and not np.isfinite(np.asarray(x, np.float32)).all():
        raise ValueError(f"{name} contains NaN or inf values")
    x = jnp.asarray(x)
    return x if jax.config.jax_enable_x64 and x.dtype == jnp.float64 else x.astype(jnp.float32)


def attribute(
    classifier: nnx.Module,
    features: Array,
    *,
    hardness_head: nnx.Module | None = None,
    hardness_features: Array | None = None,
    baseline: Array | None = None,
    hardness_baseline: Array | None = None,
    jit: bool = True,
    **options,
) -> Attribution:
    """Attribution maps (B, P, H, W) of every class and the difficulty score at the feature tensor A.

    classifier: class head A -> logits (B, C) (any NNX module; a PoolMLPHead gets the fast exact path).
    features: A (B, H, W, D). hardness_head / hardness_features: the hardness predictor and the tensor it reads
    (A_s; defaults to A) -- needed for score='hardness'. baseline(s): integrated-gradients start (default zeros).
    options: see `Options` (method, score, second_order, second_order_on, positive, abs_second, top_n, path,
    chunk_size, steps, quadrature, difficulty_channels). The heads run in eval mode (running batch-norm statistics,
    no dropout) whatever their own mode, which is left as it is. Arithmetic is float32 (float64 for float64 features
    under x64). With jit=True the compiled pass is cached by the heads' structure and the options, so repeated calls
    (other weights or features of the same shapes included) do not compile again.
    """
    opts = Options(**options)
    classifier = inference_view(classifier)
    a = _check_features("features", features, getattr(classifier, "in_channels", None))
    opts = opts.check(_num_classes(classifier, a))
    a_s = None
    if opts.score == "hardness":
        if hardness_head is None:
            raise ValueError("score='hardness' needs a hardness_head (or choose score='hesitancy' or 'entropy')")
        hardness_head = inference_view(hardness_head)
        a_s = (
            a
            if hardness_features is None
            else _check_features(
                "hardness_features", hardness_features, getattr(hardness_head, "in_channels", None)
            ).astype(a.dtype)
        )
        if a_s.shape[:3] != a.shape[:3]:
            raise ValueError(f"hardness_features {a_s.shape} must share (B, H, W) with features {a.shape}")
    else:
        hardness_head = None
    base = base_s = None
    if opts.method == "integrated_gradients":
        base = jnp.zeros_like(a) if baseline is None else _check_features("baseline", baseline, a.shape[-1])
        if base.shape != a.shape:
            raise ValueError(f"baseline {base.shape} must have the shape of features {a.shape}")
        base = base.astype(a.dtype)
        if a_s is not None:
            base_s = (
                jnp.zeros_like(a_s)
                if hardness_baseline is None
                else _check_features("hardness_baseline", hardness_baseline, a_s.shape[-1]).astype(a_s.dtype)
            )
    if not jit:
        return _attribute(classifier, hardness_head, a, a_s, base, base_s, opts)
    classifier_structure, classifier_leaves = split_leaves(classifier)
    hardness_structure, hardness_leaves = (None, []) if hardness_head is None else split_leaves(hardness_head)
    run = _compiled_heads(classifier_structure, hardness_structure, opts)
    return run(classifier_leaves, hardness_leaves, a, a_s, base, base_s)


def _num_classes(classifier, a) -> int:
    c = getattr(classifier, "out_features", None)
    if c is None:
        c = jax.eval_shape(classifier, jax.ShapeDtypeStruct((1, *a.shape[1:]), a.dtype)).shape[-1]
    return int(c)
