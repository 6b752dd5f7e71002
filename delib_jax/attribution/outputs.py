"""The explained output: which function of the head's logits the maps attribute.

    explained_output("probs")          # softmax probabilities (B, K), as the paper
    explained_output("logits")         # the logits themselves (B, K)
    explained_output(lambda z: ...)    # any twice-differentiable row-wise function (B, K) -> (B, P)
    deliberative_output("hardness")    # [softmax(z[:, :C]), sigmoid(z[:, C])]: C classes + the difficulty score

An `Output` may carry the closed form of its second derivative along two logit tangents, D^2 fn(z)[u_l, w_m], used by
the interaction maps of the shipped heads (logits locally linear in A, so all curvature sits in fn). Outputs without
one fall back to nested forward-mode derivatives of fn, which is exact too.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import jax
import jax.numpy as jnp

from delib_jax import difficulty

Array = jax.Array
Pairwise = Callable[[Array, Array, Array], Array]


@dataclass(frozen=True)
class Output:
    """A row-wise output function logits (B, K) -> explained outputs (B, P).

    pairwise: optional closed form (z (B, K), u (B, L, K), w (B, M, K), targets (B, N)) -> (B, N, L, M) of
    D^2 fn_t(z)[u_l, w_m] for the target outputs t; None: derived by nested jvp of ``fn``."""

    name: str
    fn: Callable[[Array], Array]
    pairwise: Pairwise | None = None

    def __call__(self, z: Array) -> Array:
        """fn on logits with any leading axes (..., K) -> (..., P), as rows (R, K) -> (R, P)."""
        if z.ndim == 2:
            return self.fn(z)
        return self.fn(z.reshape(-1, z.shape[-1])).reshape(*z.shape[:-1], -1)


def _take(x: Array, targets: Array) -> Array:
    """x (B, L, P) -> (B, L, N) at the target outputs (B, N)."""
    return jnp.take_along_axis(x, targets[:, None, :], axis=2)


def _softmax_pairwise(z, u, w, targets):
    """D^2 p_t[u_l, w_m] = p_t ((u_lt - <u_l>)(w_mt - <w_m>) - sum_i p_i (u_li - <u_l>)(w_mi - <w_m>)),
    <u> = sum_i p_i u_i: one batched product (B, L, K) x (B, K, M) plus an outer product per target."""
    p = jax.nn.softmax(z, axis=-1)
    cu = u - jnp.einsum("blk,bk->bl", u, p)[..., None]
    cw = w - jnp.einsum("bmk,bk->bm", w, p)[..., None]
    gram = jnp.einsum("blk,bk,bmk->blm", cu, p, cw)  # (B, L, M)
    pt = jnp.take_along_axis(p, targets, axis=1)  # (B, N)
    return pt[:, :, None, None] * (jnp.einsum("bln,bmn->bnlm", _take(cu, targets), _take(cw, targets)) - gram[:, None])


def _log_softmax_pairwise(z, u, w, targets):
    """D^2 log p_t[u_l, w_m] = -sum_i p_i (u_li - <u_l>)(w_mi - <w_m>), the same for every target."""
    p = jax.nn.softmax(z, axis=-1)
    cu = u - jnp.einsum("blk,bk->bl", u, p)[..., None]
    cw = w - jnp.einsum("bmk,bk->bm", w, p)[..., None]
    gram = -jnp.einsum("blk,bk,bmk->blm", cu, p, cw)
    return jnp.broadcast_to(gram[:, None], (z.shape[0], targets.shape[1], *gram.shape[1:]))


def _sigmoid_pairwise(z, u, w, targets):
    """D^2 sigmoid(z_t)[u_l, w_m] = s (1 - s)(1 - 2 s) u_lt w_mt (element-wise sigmoid)."""
    s = jax.nn.sigmoid(jnp.take_along_axis(z, targets, axis=1))  # (B, N)
    curv = s * (1 - s) * (1 - 2 * s)
    return curv[:, :, None, None] * jnp.einsum("bln,bmn->bnlm", _take(u, targets), _take(w, targets))


def _zero_pairwise(z, u, w, targets):
    return jnp.zeros((z.shape[0], targets.shape[1], u.shape[1], w.shape[1]), u.dtype)


PROBS = Output("probs", lambda z: jax.nn.softmax(z, axis=-1), _softmax_pairwise)
LOGITS = Output("logits", lambda z: z, _zero_pairwise)
LOG_PROBS = Output("log_probs", lambda z: jax.nn.log_softmax(z, axis=-1), _log_softmax_pairwise)
SIGMOID = Output("sigmoid", jax.nn.sigmoid, _sigmoid_pairwise)
OUTPUTS = {o.name: o for o in (PROBS, LOGITS, LOG_PROBS, SIGMOID)}


def explained_output(spec: str | Output | Callable[[Array], Array] = "probs") -> Output:
    """An `Output` from a name ('probs', 'logits', 'log_probs', 'sigmoid'), an `Output`, or any row-wise callable
    logits (B, K) -> (B, P) (differentiated exactly by nested jvp where a closed form is needed)."""
    if isinstance(spec, Output):
        return spec
    if isinstance(spec, str):
        if spec not in OUTPUTS:
            raise ValueError(
                f"unknown output {spec!r}; choose one of {', '.join(OUTPUTS)} or pass a function of the logits"
            )
        return OUTPUTS[spec]
    if callable(spec):
        return Output(getattr(spec, "__name__", "custom"), spec)
    raise ValueError(f"output must be a name, an Output or a function of the logits, got {type(spec).__name__}")


def _deliberative_hardness(z: Array) -> Array:
    return jnp.concatenate([jax.nn.softmax(z[..., :-1], axis=-1), jax.nn.sigmoid(z[..., -1:])], axis=-1)


def _deliberative_hardness_pairwise(z, u, w, targets):
    """Softmax block on the first C logits, sigmoid on the last; an output reads one block only."""
    c = z.shape[-1] - 1
    is_score = targets == c
    cls = _softmax_pairwise(z[:, :c], u[..., :c], w[..., :c], jnp.where(is_score, 0, targets))
    hard = _sigmoid_pairwise(z[:, c:], u[..., c:], w[..., c:], jnp.zeros_like(targets))
    return jnp.where(is_score[:, :, None, None], hard, cls)


def deliberative_output(score: str = "hardness") -> Output:
    """The paper's P = C + 1 outputs: class probabilities, then the difficulty score.

    'hardness' reads logits (B, C + 1) whose last column is the hardness logit (see `split_model(...,
    hardness=True)`); 'hesitancy' / 'entropy' read the C class logits and append score(softmax(z))."""
    difficulty.check_score(score)
    if score == "hardness":
        return Output("deliberative_hardness", _deliberative_hardness, _deliberative_hardness_pairwise)
    fn = difficulty.SCORES[score]

    def outputs(z):
        p = jax.nn.softmax(z, axis=-1)
        return jnp.concatenate([p, fn(p)[..., None]], axis=-1)

    return Output(f"deliberative_{score}", outputs)


def pairwise_terms(output: Output, z: Array, u: Array, w: Array, targets: Array) -> Array:
    """D^2 fn_t(z)[u_l, w_m] (B, N, L, M) for logits z (B, K) and tangents u (B, L, K), w (B, M, K).

    The closed form when ``output`` has one; otherwise nested jvp of fn on every (l, m) pair (exact, O(L M) calls
    of the small function fn, all outputs at once)."""
    if output.pairwise is not None:
        return output.pairwise(z, u, w, targets)
    b, n_l, k = u.shape
    n_m = w.shape[1]
    zb = jnp.broadcast_to(z[:, None, None, :], (b, n_l, n_m, k))
    ub = jnp.broadcast_to(u[:, :, None, :], zb.shape)
    wb = jnp.broadcast_to(w[:, None, :, :], zb.shape)
    second = jax.jvp(lambda x: jax.jvp(output, (x,), (ub,))[1], (zb,), (wb,))[1]  # (B, L, M, P)
    return jnp.take_along_axis(jnp.moveaxis(second, -1, 1), targets[:, :, None, None], axis=1)
