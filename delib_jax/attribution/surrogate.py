"""Smooth surrogates of ReLU networks: the same weights, softplus(beta x) / beta in place of every ReLU.

    smooth = softplus_surrogate(model_fn, beta=10.0)        # any callable or NNX module; no weights are copied
    smooth(images)                                          # the surrogate's logits
    gap = surrogate_gap(model_fn, images, beta=10.0)         # how far they are from the model's

Below its output a ReLU network is piecewise linear, so its Hessian is zero almost everywhere and every second-order
explanation of it comes from the last softmax / sigmoid alone. Janizek et al. (JMLR 2021) explain such networks'
interactions through a surrogate with softplus in place of ReLU: what is explained is then the SURROGATE, whose
logits differ from the model's by at most ln(2) / beta per unit (less after the layers' contractions; `surrogate_gap`
measures it). The transform traces the function once (a jaxpr) and evaluates it with every ReLU -- ``jax.nn.relu``
(= ``nnx.relu``, which the shipped backbones and heads call) and every bare ``maximum(x, 0)`` -- replaced, inside jit,
vmap and differentiation alike. Max pooling over windows that tile its input (stride = window, no padding: the
2 x 2 pools of the small CNN and VGG) is evaluated as a reshape and a max: the same values, and derivatives made
of elementwise operations instead of XLA's select-and-scatter, which makes a Hessian-vector product through the
small CNN's pools cheaper (`benchmarks.interactions`); where a window's maximum is tied (measure zero for the
surrogate's smooth features) the gradient is shared among the tied inputs instead of going to the first.
Everything else is evaluated as traced.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.extend.core import Literal

Array = jax.Array
_CALLS = ("pjit", "jit", "closed_call", "core_call")


def _is_zero(v) -> bool:
    return isinstance(v, Literal) and np.ndim(v.val) == 0 and float(v.val) == 0.0


def _relu_operand(eqn) -> int | None:
    """Index of x in a ``max(x, 0)`` / ``max(0, x)`` equation, else None."""
    if eqn.primitive.name != "max":
        return None
    a, b = eqn.invars
    if _is_zero(b) and not _is_zero(a):
        return 0
    if _is_zero(a) and not _is_zero(b):
        return 1
    return None


def _inner(jaxpr):
    return getattr(jaxpr, "jaxpr", jaxpr)


def _is_relu(jaxpr) -> bool:
    """Whether a (closed) jaxpr is a single ReLU, max(x, 0), possibly wrapped in jit (how jax.nn.relu traces)."""
    jaxpr = _inner(jaxpr)
    if len(jaxpr.eqns) != 1:
        return False
    eqn = jaxpr.eqns[0]
    if eqn.primitive.name in _CALLS:
        return _is_relu(eqn.params.get("jaxpr", eqn.params.get("call_jaxpr")))
    return _relu_operand(eqn) is not None


def _tiled_max(x: Array, params) -> Array | None:
    """``reduce_window_max`` of x as a reshape and a max when its windows tile x (strides equal to the windows, no
    padding or dilation; floor mode drops the remainder as the pool does), else None."""
    win, strides = tuple(params["window_dimensions"]), tuple(params["window_strides"])
    plain = all(p == (0, 0) for p in params["padding"]) and set(params["base_dilation"]) | set(
        params["window_dilation"]) == {1}  # fmt: skip
    if win != strides or not plain or x.ndim != len(win) or any(n < w for n, w in zip(x.shape, win)):
        return None
    x = x[tuple(slice(0, n // w * w) for n, w in zip(x.shape, win))]
    split = [d for n, w in zip(x.shape, win) for d in (n // w, w)]
    return jnp.max(x.reshape(split), axis=tuple(range(1, 2 * x.ndim, 2)))


def _eval(jaxpr, consts, args, act: Callable[[Array], Array], count: list) -> list:
    """Evaluate ``jaxpr`` (like jax.core.eval_jaxpr) with ``act`` in place of every ReLU; count[0] counts them."""
    env = {}

    def read(v):
        return v.val if isinstance(v, Literal) else env[v]

    for v, x in zip(jaxpr.constvars, consts):
        env[v] = x
    for v, x in zip(jaxpr.invars, args):
        env[v] = x
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        invals = [read(v) for v in eqn.invars]
        operand = _relu_operand(eqn)
        if operand is not None:
            outs = [act(invals[operand])]
            count[0] += 1
        elif name == "custom_jvp_call" and _is_relu(eqn.params["call_jaxpr"]):
            outs = [act(invals[eqn.params["num_consts"]])]
            count[0] += 1
        elif name == "reduce_window_max" and (tiled := _tiled_max(invals[0], eqn.params)) is not None:
            outs = [tiled]
        elif name in _CALLS and ("jaxpr" in eqn.params or "call_jaxpr" in eqn.params):
            sub = eqn.params.get("jaxpr", eqn.params.get("call_jaxpr"))
            outs = _eval(_inner(sub), getattr(sub, "consts", ()), invals, act, count)
        else:
            with eqn.ctx.manager:
                outs = eqn.primitive.bind(*invals, **eqn.primitive.get_bind_params(eqn.params))
            if not eqn.primitive.multiple_results:
                outs = [outs]
        for v, x in zip(eqn.outvars, outs):
            env[v] = x
    return [read(v) for v in jaxpr.outvars]


def softplus(beta: float) -> Callable[[Array], Array]:
    """x -> softplus(beta x) / beta, the smooth ReLU of sharpness beta (-> ReLU as beta -> inf)."""
    return lambda x: jax.nn.softplus(beta * x) / beta


@dataclass(frozen=True)
class Surrogate:
    """fn with ``activation`` in place of every ReLU (a callable; hashable by fn's identity and beta)."""

    fn: Callable
    beta: float

    def __call__(self, *args):
        """fn(*args) with softplus(beta x) / beta for every ReLU; one array result (e.g. logits or X)."""
        return replace_relu(self.fn, softplus(self.beta))(*args)


def replace_relu(fn: Callable | nnx.Module, activation: Callable[[Array], Array], *, require: bool = True) -> Callable:
    """fn with ``activation`` evaluated in place of every ReLU of its trace (no weights copied; NNX modules are called
    as they are, in their own mode). With ``require``, a ValueError where fn has no ReLU to replace."""

    def wrapped(*args):
        closed = jax.make_jaxpr(lambda *a: fn(*a))(*args)  # a fresh function: never a cached trace of old weights
        count = [0]
        flat = jax.tree.leaves(args)
        outs = _eval(closed.jaxpr, closed.consts, flat, activation, count)
        if require and count[0] == 0:
            raise ValueError(f"{getattr(fn, '__name__', type(fn).__name__)} has no ReLU (jax.nn.relu / maximum(x, 0))")
        shape = jax.eval_shape(fn, *args)
        return jax.tree.unflatten(jax.tree.structure(shape), outs)

    return wrapped


def softplus_surrogate(fn: Callable | nnx.Module, beta: float) -> Surrogate:
    """fn with softplus(beta x) / beta in place of every ReLU (see the module docstring); beta > 0."""
    if not beta > 0 or not np.isfinite(beta):
        raise ValueError(f"beta must be a positive finite number, got {beta}")
    return Surrogate(fn, float(beta))


def count_relus(fn: Callable | nnx.Module, *args) -> int:
    """How many ReLU applications the surrogate replaces in fn(*args)."""
    closed = jax.make_jaxpr(lambda *a: fn(*a))(*args)
    count = [0]
    jax.eval_shape(lambda *a: _eval(closed.jaxpr, closed.consts, jax.tree.leaves(a), lambda x: x, count), *args)
    return count[0]


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class SurrogateGap:
    """How far the surrogate's logits are from the model's, per image (B,): max_abs = max_k |z~_k - z_k|,
    relative = ||z~ - z|| / ||z||, same_top1 = whether the predicted classes agree; logits, surrogate (B, K)."""

    max_abs: Array
    relative: Array
    same_top1: Array
    logits: Array
    surrogate: Array


def surrogate_gap(fn: Callable | nnx.Module, images: Array, beta: float) -> SurrogateGap:
    """The distance of the softplus surrogate's outputs to fn's on ``images`` (fn: images -> logits (B, K))."""
    if isinstance(fn, nnx.Module):
        fn.eval()
    z = jnp.asarray(fn(images))
    zs = jnp.asarray(softplus_surrogate(fn, beta)(images))
    diff = zs - z
    return SurrogateGap(
        max_abs=jnp.max(jnp.abs(diff), axis=-1),
        relative=jnp.linalg.norm(diff, axis=-1) / jnp.maximum(jnp.linalg.norm(z, axis=-1), 1e-30),
        same_top1=jnp.argmax(zs, -1) == jnp.argmax(z, -1),
        logits=z,
        surrogate=zs,
    )
