"""Attribution maps for every class and the difficulty score (Sec. 3.2 of the paper).

    attr = attribute(model.classifier, a, hardness_head=model.hardness_head, method="gradient_hessian")
    attr.maps            # (B, C + 1, H, W): every class, then the difficulty score
    attr = attribute_images(model, images)   # backbone + all maps, one compiled pass

Methods: 'gradient' ([grad g_p]_l . a_l), 'gradient_hessian' (Eq. 2: plus 1/2 a_l^T H_ll a_l, or the cross-location
1/2 a_l . (H A)_l with second_order='cross'), 'integrated_gradients' (at layer A, with a completeness residual);
`grad_cam` for the usual single-map baseline (the predicted class, given classes, or every class in one pass).
Shipped heads take an exact structure-aware path (logit tangents through the piecewise-linear head, then closed
derivatives of the softmax / sigmoid); any other head takes the exact generic path (forward-over-forward jvp vmapped
over locations). Heads and models run in eval mode whatever their own mode (which is left as it is).

For research, any split of any model (`layer_attribution`, `split_model`), down to the pixels (forward-over-reverse
order), the random-sign estimate of the diagonal blocks, interaction maps between locations (`interaction_maps`,
`model_interaction_maps`), Integrated / Expected Hessians along a path (`integrated_hessians`,
`expected_hessians`), SmoothHess (`smooth_hessians`), softplus surrogates of ReLU networks (`softplus_surrogate`,
`surrogate_gap`; docs/interactions.md), the choice of the explained output (`explained_output`), SmoothGrad / VarGrad
(`noise_tunnel`) and upsampled maps (`upsample_maps`); figures in `delib_jax.attribution_figures`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from delib_jax.attribution._core import (
    METHODS,
    Attribution,
    Options,
    attribute,
    output_functions,
    quadrature,
)
from delib_jax.attribution.gradcam import grad_cam
from delib_jax.attribution.interactions import (
    Interactions,
    interaction_maps,
    make_model_interactions_fn,
    model_interaction_maps,
)
from delib_jax.attribution.layer import LayerAttribution, layer_attribution, make_layer_attribution_fn
from delib_jax.attribution.outputs import Output, deliberative_output, explained_output
from delib_jax.attribution.path_hessians import (
    PathInteractions,
    expected_hessians,
    grid_masks,
    integrated_hessians,
    log_quadrature,
)
from delib_jax.attribution.probes import probe_diagonal
from delib_jax.attribution.resize import upsample_maps
from delib_jax.attribution.reverse import reverse_terms
from delib_jax.attribution.smoothgrad import noise_tunnel
from delib_jax.attribution.smoothhess import SmoothInteractions, smooth_hessians
from delib_jax.attribution.stages import split_model, stage_names
from delib_jax.attribution.surrogate import (
    SurrogateGap,
    count_relus,
    replace_relu,
    softplus_surrogate,
    surrogate_gap,
)
from delib_jax.models import Structure, inference_model, split_leaves
from delib_jax.models._layers import check_finite as check_finite_flags
from delib_jax.models._layers import validate_images


def gradient(classifier, features, **kw) -> Attribution:
    """First-order maps [grad g_p(A)]_l . a_l for all outputs. See `attribute`."""
    return attribute(classifier, features, method="gradient", **kw)


def gradient_hessian(classifier, features, **kw) -> Attribution:
    """Second-order maps of Eq. 2 for all outputs. See `attribute`."""
    return attribute(classifier, features, method="gradient_hessian", **kw)


def integrated_gradients(classifier, features, *, steps: int = 50, **kw) -> Attribution:
    """Integrated gradients at layer A (zero baseline by default); ``residual`` checks completeness."""
    return attribute(classifier, features, method="integrated_gradients", steps=steps, **kw)


def _attribute_from_images(model, images, opts: Options) -> Attribution:
    import jax.numpy as jnp

    from delib_jax.attribution._core import _attribute

    a, classifier = model.features_and_classifier(images)
    head = a_s = None
    if opts.score == "hardness":
        if model.hardness_network is not None:
            head, a_s = model.hardness_network.head, model.hardness_network.backbone(images).astype(jnp.float32)
        else:
            head, a_s = model.hardness_head, a
    base = jnp.zeros_like(a)
    base_s = None if a_s is None else jnp.zeros_like(a_s)
    return _attribute(classifier, head, a, a_s, base, base_s, opts)


@functools.lru_cache(maxsize=32)
def _compiled(structure: Structure, opts: Options, check: bool = True) -> Callable:
    """One jitted (weight leaves, images) -> (Attribution, finite) per model structure and options, reused by repeated
    calls. With ``check`` the NaN/inf test rides in the same launch as one scalar (a full reduction, which parallelises
    better than one flag per image; the entries are named on the host only when it fails), else finite is None."""

    def run(leaves, images):
        finite = jnp.all(jnp.isfinite(images)) if check else None
        return _attribute_from_images(structure.merge(leaves), images, opts), finite

    return jax.jit(run)


def make_attribute_fn(
    model, *, precision: str | None = None, check_finite: bool = True, **options
) -> Callable[[jax.Array], Attribution]:
    """A compiled images -> Attribution function for ``model`` (split once; the fast loop for many batches).

    Images (B, H, W, 3) normalised float; options as for `attribute`. The model runs in eval mode whatever its own
    mode (left as it is), with batch norm folded into the convolutions (`delib_jax.models.inference_model`).
    precision: the backbone's compute dtype, 'float32' or 'bfloat16' (None: the model's own); A, the heads and every
    attribution step stay float32. check_finite: NaN/inf images raise a ValueError naming the batch entries (each
    call then waits for its result); False for pixels finite by construction (decoded from 8-bit files), which skips
    the test and lets calls queue up asynchronously (NaN input then gives NaN maps). Later changes to the model are
    not seen: build a new function after training further."""
    opts = Options(**options).check(model.num_classes)
    if opts.score == "hardness" and model.hardness_kind == "none":
        raise ValueError("score='hardness' needs a model with a hardness predictor (or score='hesitancy'/'entropy')")
    structure, leaves = split_leaves(inference_model(model, precision=precision))
    run = _compiled(structure, opts, bool(check_finite))

    def attribute_fn(images) -> Attribution:
        validate_images(images, finite=False)  # shape and dtype here; NaN/inf reduced inside the compiled pass
        images = jnp.asarray(images)
        attribution, finite = run(leaves, images)
        if check_finite and not bool(finite):  # rare: name the entries (per-image flags, computed only now)
            check_finite_flags(np.asarray(jnp.all(jnp.isfinite(images), axis=(1, 2, 3))))
        return attribution

    return attribute_fn


def attribute_images(model, images, **options) -> Attribution:
    """Backbone forward plus all attribution maps in one jit-compiled pass. images: (B, H, W, 3) normalised.

    Options as for `attribute` (integrated gradients from the zero baseline). For many batches, build the function
    once with `make_attribute_fn`."""
    return make_attribute_fn(model, **options)(images)


__all__ = [
    "Attribution",
    "Interactions",
    "LayerAttribution",
    "METHODS",
    "Options",
    "Output",
    "PathInteractions",
    "SmoothInteractions",
    "SurrogateGap",
    "attribute",
    "attribute_images",
    "count_relus",
    "deliberative_output",
    "expected_hessians",
    "explained_output",
    "grad_cam",
    "gradient",
    "gradient_hessian",
    "grid_masks",
    "integrated_gradients",
    "integrated_hessians",
    "interaction_maps",
    "layer_attribution",
    "log_quadrature",
    "make_attribute_fn",
    "make_layer_attribution_fn",
    "make_model_interactions_fn",
    "model_interaction_maps",
    "noise_tunnel",
    "output_functions",
    "probe_diagonal",
    "quadrature",
    "replace_relu",
    "reverse_terms",
    "smooth_hessians",
    "softplus_surrogate",
    "split_model",
    "stage_names",
    "surrogate_gap",
    "upsample_maps",
]
