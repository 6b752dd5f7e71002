"""Attribution maps for any split of any model: features(images) -> X, head(X) -> logits, explained outputs on top.

    features, head = split_model(model, "layer3")                      # or any callables / NNX modules
    attr = layer_attribution(features, head, images, targets=5, second_order="cross")
    attr.maps                                                          # (B, 5, 14, 14): top-5 classes at layer3
    attr = layer_attribution(None, model_fn, images, targets=5, second_order="cross")   # pixel level (X = images)

Locations are X's H x W grid (pixels when X is the image), channels summed per location. The terms follow Eq. 2 at X
along V = X (integrated gradients: along X - baseline from the baseline):

    maps = first + second,  first_l = [grad g_t]_l . v_l,
    second_l = 1/2 v_l^T H_ll v_l ('diagonal', exact blocks), 1/2 v_l . (H V)_l ('cross'), or the random-sign
    estimate of the diagonal ('estimate', with its standard error in ``stderr``).

Differentiation orders (all exact; ``order``): 'tangent' (shipped PoolMLPHead heads: per-location logit tangents,
cost ~ one head pass), 'forward' (forward-over-forward vmapped over locations, cost ~ L) and 'reverse' (jvp of grad
vmapped over the explained outputs, cost ~ N). 'auto' takes the tangent path where the head has one, the forward
order for exact diagonal blocks, and otherwise the cheaper of forward (L) and reverse (N).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from delib_jax.attribution import _terms
from delib_jax.attribution._core import QUADRATURE, has_taylor, quadrature
from delib_jax.attribution.outputs import Output, explained_output
from delib_jax.attribution.probes import probe_diagonal
from delib_jax.attribution.resize import upsample_maps
from delib_jax.attribution.reverse import reverse_terms
from delib_jax.models import split_leaves

Array = jax.Array
LAYER_METHODS = ("gradient", "gradient_hessian", "integrated_gradients")
SECOND_ORDERS = ("diagonal", "cross", "estimate")
ORDERS = ("auto", "tangent", "forward", "reverse")


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class LayerAttribution:
    """Maps of N explained outputs per image at X's grid (or the image's, with ``upsample=True``).

    maps: (B, N, H, W) = first_order + second_order (the latter with Eq. 2's 1/2; zero for 'gradient');
    targets: (B, N) index of each map's output; outputs: (B, P) every explained output at X;
    stderr: (B, N, H, W) standard error of an estimated second-order term, else None;
    residual: (B, N) integrated-gradients completeness residual sum(maps) - (g(X) - g(baseline)), else None."""

    maps: Array
    first_order: Array
    second_order: Array
    targets: Array
    outputs: Array
    stderr: Array | None = None
    residual: Array | None = None


@dataclass(frozen=True)
class LayerOptions:
    """Static options of `layer_attribution` (hashable: they key jit's cache)."""

    method: str = "gradient_hessian"
    second_order: str = "cross"
    order: str = "auto"
    output: Output = explained_output("probs")
    top_n: int | None = None
    probes: int = 64
    steps: int = 50
    quadrature: str = "gauss_legendre"
    chunk_size: int | None = None
    upsample: bool = False

    def check(self) -> LayerOptions:
        if self.method not in LAYER_METHODS:
            raise ValueError(f"unknown method {self.method!r}; choose one of {', '.join(LAYER_METHODS)}")
        if self.second_order not in SECOND_ORDERS:
            raise ValueError(f"second_order must be one of {', '.join(SECOND_ORDERS)}, got {self.second_order!r}")
        if self.order not in ORDERS:
            raise ValueError(f"order must be one of {', '.join(ORDERS)}, got {self.order!r}")
        if self.second_order == "estimate" and self.probes < 2:
            raise ValueError(f"probes must be at least 2, got {self.probes}")
        if self.method == "integrated_gradients":
            if self.steps < 1:
                raise ValueError(f"integrated gradients needs steps >= 1, got {self.steps}")
            if self.quadrature not in QUADRATURE:
                raise ValueError(f"quadrature must be one of {', '.join(QUADRATURE)}, got {self.quadrature!r}")
        if self.chunk_size is not None and self.chunk_size < 1:
            raise ValueError(f"chunk_size must be positive, got {self.chunk_size}")
        return self


@dataclass(frozen=True)
class _Plain:
    """A plain callable in place of a split module's structure (hashable by identity)."""

    fn: Callable

    def merge(self, leaves) -> Callable:
        return self.fn


def _identity(x):
    return x


def pure(fn: Callable | nnx.Module | None) -> tuple:
    """(structure, leaves) of a callable: NNX modules cross jit as a flat list of weights (`split_leaves`) and are
    rebuilt in eval mode inside the trace (the caller's module is left as it is); plain callables as themselves."""
    if fn is None:
        return _Plain(_identity), []
    if isinstance(fn, nnx.Module):
        return split_leaves(fn)
    if not callable(fn):
        raise ValueError(f"features and head must be callables or NNX modules, got {type(fn).__name__}")
    return _Plain(fn), []


def rebuild(structure, leaves) -> Callable:
    """The callable of `pure`'s (structure, leaves), NNX modules in eval mode."""
    fn = structure.merge(leaves)
    if isinstance(fn, nnx.Module):
        fn.eval()
    return fn


def resolve_order(order: str, head, second: str | None, num_locations: int, num_targets: int) -> str:
    """The differentiation order 'auto' stands for (see the module docstring)."""
    if order != "auto":
        if order == "tangent" and not has_taylor(head, second):
            raise ValueError(
                f"order='tangent' needs a head with logit tangents and their exact derivatives (`taylor`: "
                f"PoolMLPHead, NormHead, the ViT head), got {type(head).__name__}; use order='forward' or 'reverse'"
            )
        return order
    if has_taylor(head, second):
        return "tangent"
    if second == "diagonal":
        return "forward"
    return "reverse" if num_targets < num_locations else "forward"


def _take(terms: Array, targets: Array) -> Array:
    """(B, P, L) -> (B, N, L) at the targets (B, N)."""
    return jnp.take_along_axis(terms, targets[:, :, None], axis=1)


def first_and_second(
    head,
    output: Output,
    x: Array,
    v: Array,
    targets: Array,
    *,
    second: str | None,
    order: str,
    chunk_size: int | None = None,
) -> tuple[Array, Array | None]:
    """first, second (B, N, L) of output(head(.)) at X along V for the targets (B, N), by ``order`` (not 'auto';
    second: None, 'diagonal' or 'cross'; without Eq. 2's 1/2)."""
    g = lambda y: output(head(y))
    if order == "tangent":
        z, u, w = head.taylor(x, v, second=second)
        f, s = _terms.tangent_terms(output, z, u, second=second, w=w)
    elif order == "forward":
        f, s = _terms.generic_terms(g, x, v, second=second, chunk_size=chunk_size)
    else:
        return reverse_terms(g, x, v, targets, second=second, chunk_size=chunk_size)
    return _take(f, targets), (None if s is None else _take(s, targets))


def _targets(values: Array, top_n: int | None, given: Array | None) -> Array:
    b, p = values.shape
    if given is not None:
        return given
    if top_n is not None:
        return jax.lax.top_k(values, top_n)[1]
    return jnp.broadcast_to(jnp.arange(p), (b, p))


def _layer(f_leaves, h_leaves, images, targets, baseline, key, *, f_struct, h_struct, opts: LayerOptions):
    features, head = rebuild(f_struct, f_leaves), rebuild(h_struct, h_leaves)
    output = opts.output
    x = features(images)
    g = lambda y: output(head(y))
    values = g(x)
    targets = _targets(values, opts.top_n, targets)
    b, h, w, _ = x.shape
    n = targets.shape[1]
    stderr = residual = None
    if opts.method == "integrated_gradients":
        x0 = jnp.zeros_like(x) if baseline is None else baseline.astype(x.dtype)
        v = x - x0
        order = resolve_order(opts.order, head, None, h * w, n)
        alphas, weights = (jnp.asarray(q, x.dtype) for q in quadrature(opts.steps, opts.quadrature))

        def step(acc, aw):
            f, _ = first_and_second(
                head, output, x0 + aw[0] * v, v, targets, second=None, order=order, chunk_size=opts.chunk_size
            )
            return acc + aw[1] * f, None

        first, _ = jax.lax.scan(step, jnp.zeros((b, n, h * w), x.dtype), (alphas, weights))
        second = jnp.zeros_like(first)
        delta = jnp.take_along_axis(values - g(x0), targets, axis=1)
        residual = jnp.sum(first, axis=-1) - delta
    elif opts.method == "gradient_hessian" and opts.second_order == "estimate":
        first, second, stderr = probe_diagonal(
            g, x, x, targets, probes=opts.probes, key=key, chunk_size=opts.chunk_size
        )
        second, stderr = 0.5 * second, 0.5 * stderr
    else:
        sec = opts.second_order if opts.method == "gradient_hessian" else None
        order = resolve_order(opts.order, head, sec, h * w, n)
        first, second = first_and_second(
            head, output, x, x, targets, second=sec, order=order, chunk_size=opts.chunk_size
        )
        second = jnp.zeros_like(first) if second is None else 0.5 * second
    grid = lambda t: None if t is None else t.reshape(b, n, h, w)
    first, second, stderr = grid(first), grid(second), grid(stderr)
    if opts.upsample:
        size = images.shape[1:3]
        first, second = upsample_maps(first, size), upsample_maps(second, size)
        stderr = None if stderr is None else upsample_maps(stderr, size)
    return LayerAttribution(
        maps=first + second,
        first_order=first,
        second_order=second,
        targets=targets,
        outputs=values,
        stderr=stderr,
        residual=residual,
    )


_layer_jit = jax.jit(_layer, static_argnames=("f_struct", "h_struct", "opts"))


def _check_array(name: str, x, *, rank: int) -> Array:
    if getattr(x, "ndim", None) != rank:
        raise ValueError(f"{name} must have rank {rank}, got shape {getattr(x, 'shape', type(x).__name__)}")
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"{name} must be floating point, got dtype {x.dtype}")
    if not isinstance(x, jax.core.Tracer) and not bool(jnp.isfinite(x).all()):
        raise ValueError(f"{name} contains NaN or inf values")
    return x


def _check_targets(targets, batch: int, num_outputs: int) -> Array | None:
    """Explicit targets (B, N) as int32, checked; None stays None."""
    if targets is None:
        return None
    given = np.asarray(targets)
    if given.ndim != 2 or given.shape[0] != batch or not np.issubdtype(given.dtype, np.integer):
        raise ValueError(
            f"targets must be an int or integer indices of shape (B, N) with B = {batch}, got "
            f"{given.dtype} {given.shape}"
        )
    if given.size and (given.min() < 0 or given.max() >= num_outputs):
        raise ValueError(f"targets must lie in [0, {num_outputs}), got values {given.min()}..{given.max()}")
    return jnp.asarray(given, jnp.int32)


def make_layer_attribution_fn(
    features: Callable | nnx.Module | None,
    head: Callable | nnx.Module,
    *,
    targets: int | None = None,
    output: str | Output | Callable = "probs",
    jit: bool = True,
    **options,
) -> Callable[..., LayerAttribution]:
    """A compiled fn(images, targets=None, baseline=None, key=None) -> LayerAttribution for one split (modules split
    once; the fast way to explain many batches). Arguments as `layer_attribution`; an int ``targets`` (top N) is
    fixed here, explicit target indices (B, N) are given per call. Later changes to the modules are not seen."""
    if targets is not None and (not isinstance(targets, int) or isinstance(targets, bool)):
        raise ValueError(
            f"targets here is None or an int N (the top N outputs), got {type(targets).__name__}: give "
            "explicit indices per call"
        )
    opts = LayerOptions(output=explained_output(output), top_n=targets, **options).check()
    f_struct, f_leaves = pure(features)
    h_struct, h_leaves = pure(head)
    shapes: dict = {}
    run = _layer_jit if jit else _layer

    def shapes_for(images):  # (X's shape, number of outputs) per input shape, traced once
        spec = (images.shape, images.dtype)
        if spec not in shapes:
            x_shape = jax.eval_shape(lambda leaves, y: rebuild(f_struct, leaves)(y), f_leaves, images)
            if len(x_shape.shape) != 4:
                raise ValueError(f"features must return X of shape (B, H, W, D), got {x_shape.shape}")
            x_spec = jax.ShapeDtypeStruct(x_shape.shape, x_shape.dtype)
            out = jax.eval_shape(lambda leaves, y: opts.output(rebuild(h_struct, leaves)(y)), h_leaves, x_spec).shape
            if len(out) != 2 or out[0] != images.shape[0]:
                raise ValueError(f"output(head(X)) must have shape (B, P) = ({images.shape[0]}, P), got {out}")
            shapes[spec] = (x_shape.shape, out[1])
        return shapes[spec]

    def attribution_fn(images, targets=None, baseline=None, key=None) -> LayerAttribution:
        images = _check_array("images", images, rank=4)
        x_shape, num_outputs = shapes_for(images)
        if opts.top_n is not None:
            if not 1 <= opts.top_n <= num_outputs:
                raise ValueError(f"targets={opts.top_n} must lie between 1 and the number of outputs ({num_outputs})")
            if targets is not None:
                raise ValueError("this function explains the top-N outputs: do not pass targets too")
        given = _check_targets(targets, images.shape[0], num_outputs)
        if baseline is not None:
            if opts.method != "integrated_gradients":
                raise ValueError("a baseline is used by method='integrated_gradients' only")
            baseline = _check_array("baseline", baseline, rank=4)
            if baseline.shape != x_shape:
                raise ValueError(f"baseline {baseline.shape} must have the shape of X {x_shape}")
        if opts.method == "gradient_hessian" and opts.second_order == "estimate" and key is None:
            key = jax.random.key(0)
        return run(f_leaves, h_leaves, images, given, baseline, key, f_struct=f_struct, h_struct=h_struct, opts=opts)

    return attribution_fn


def layer_attribution(
    features: Callable | nnx.Module | None,
    head: Callable | nnx.Module,
    images: Array,
    *,
    targets: int | Array | None = None,
    output: str | Output | Callable = "probs",
    method: str = "gradient_hessian",
    second_order: str = "cross",
    order: str = "auto",
    probes: int = 64,
    key: Array | None = None,
    baseline: Array | None = None,
    steps: int = 50,
    quadrature: str = "gauss_legendre",
    chunk_size: int | None = None,
    upsample: bool = False,
    jit: bool = True,
) -> LayerAttribution:
    """Attribution maps of the explained outputs at X = features(images), for any split of any model.

    features: images (B, H_img, W_img, C) -> X (B, H, W, D), a callable or NNX module; None: X = images (pixel-level
    maps, or an X computed elsewhere). head: X -> logits (B, K). output: what is explained, a function of the logits
    (`explained_output`: 'probs' as the paper, 'logits', 'log_probs', or any callable; P outputs).
    targets: None (all P outputs), an int N (the N largest outputs of each image) or indices (B, N).
    method: 'gradient', 'gradient_hessian' (Eq. 2, ``second_order`` 'diagonal' / 'cross' / 'estimate' from
    ``probes`` random-sign probes drawn from ``key``) or 'integrated_gradients' (from ``baseline`` at X, default 0,
    ``steps`` nodes of the ``quadrature`` rule). order: 'auto', 'tangent', 'forward' or 'reverse' (module docstring).
    chunk_size: locations (or probes) processed at once, to bound memory. upsample: maps at the image's H_img x
    W_img (bilinear). NNX modules are evaluated in eval mode without changing the caller's modules. For many
    batches build the compiled function once with `make_layer_attribution_fn`.
    Returns a `LayerAttribution` (maps (B, N, H, W)).
    """
    top_n = targets if isinstance(targets, int) and not isinstance(targets, bool) else None
    fn = make_layer_attribution_fn(
        features,
        head,
        targets=top_n,
        output=output,
        jit=jit,
        method=method,
        second_order=second_order,
        order=order,
        probes=probes,
        steps=steps,
        quadrature=quadrature,
        chunk_size=chunk_size,
        upsample=upsample,
    )
    return fn(images, None if top_n is not None else targets, baseline, key)
