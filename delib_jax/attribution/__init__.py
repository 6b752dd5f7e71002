"""Attribution maps for every class and the difficulty score (Sec. 3.2 of the paper).

    attr = attribute(model.classifier, a, hardness_head=model.hardness_head, method="gradient_hessian")
    attr.maps            # (B, C + 1, H, W): every class, then the difficulty score
    attr = attribute_images(model, images)   # backbone + all maps, one compiled pass

Methods: 'gradient' ([grad g_p]_l . a_l), 'gradient_hessian' (Eq. 2: plus 1/2 a_l^T H_ll a_l, or the cross-location
1/2 a_l . (H A)_l with second_order='cross'), 'integrated_gradients' (at layer A, with a completeness residual);
`grad_cam` for the usual single-map baseline. Shipped heads take an exact structure-aware path (logit tangents
through the piecewise-linear head, then closed derivatives of the softmax / sigmoid); any other head takes the exact
generic path (forward-over-forward jvp vmapped over locations).
"""

from __future__ import annotations

import functools

from flax import nnx

from delib_jax.attribution._core import METHODS, Attribution, Options, attribute, output_functions, quadrature
from delib_jax.attribution.gradcam import grad_cam


def gradient(classifier, features, **kw) -> Attribution:
    """First-order maps [grad g_p(A)]_l . a_l for all outputs. See `attribute`."""
    return attribute(classifier, features, method="gradient", **kw)


def gradient_hessian(classifier, features, **kw) -> Attribution:
    """Second-order maps of Eq. 2 for all outputs. See `attribute`."""
    return attribute(classifier, features, method="gradient_hessian", **kw)


def integrated_gradients(classifier, features, *, steps: int = 50, **kw) -> Attribution:
    """Integrated gradients at layer A (zero baseline by default); ``residual`` checks completeness."""
    return attribute(classifier, features, method="integrated_gradients", steps=steps, **kw)


def _hardness_parts(model, images, a):
    if model.hardness_network is not None:
        return model.hardness_network.head, model.hardness_network.backbone(images).astype(a.dtype)
    return model.hardness_head, None


@functools.partial(nnx.jit, static_argnames=("opts",))
def _attribute_images(model, images, opts: Options) -> Attribution:
    from delib_jax.attribution._core import _attribute
    import jax.numpy as jnp

    a = model.backbone(images).astype(jnp.float32)
    head, a_s = _hardness_parts(model, images, a) if opts.score == "hardness" else (None, None)
    if head is not None and a_s is None:
        a_s = a
    base = jnp.zeros_like(a)
    base_s = None if a_s is None else jnp.zeros_like(a_s)
    return _attribute(model.classifier, head, a, a_s, base, base_s, opts)


def attribute_images(model, images, **options) -> Attribution:
    """Backbone forward plus all attribution maps in one jit-compiled pass. images: (B, H, W, 3) normalised.

    Options as for `attribute` (integrated gradients from the zero baseline)."""
    from delib_jax.models._layers import validate_images

    validate_images(images)
    opts = Options(**options).check(model.num_classes)
    if opts.score == "hardness" and model.hardness_kind == "none":
        raise ValueError("score='hardness' needs a model with a hardness predictor (or score='hesitancy'/'entropy')")
    model.eval()
    return _attribute_images(model, images, opts)


__all__ = [
    "METHODS", "Attribution", "Options", "attribute", "attribute_images", "grad_cam", "gradient",
    "gradient_hessian", "integrated_gradients", "output_functions", "quadrature",
]
