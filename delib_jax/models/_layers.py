"""Array-level building blocks shared by the backbones and heads (NHWC throughout)."""

from __future__ import annotations

from functools import cache

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

# torchvision initialises convolutions with kaiming_normal_(mode="fan_out", nonlinearity="relu").
conv_init = nnx.initializers.variance_scaling(2.0, "fan_out", "normal")


def conv(
    in_features: int,
    out_features: int,
    kernel: int,
    *,
    stride: int = 1,
    padding: int = 0,
    bias: bool = True,
    dtype=None,
    rngs: nnx.Rngs,
) -> nnx.Conv:
    """A torch-style Conv2d: explicit symmetric padding, kernel stored (kh, kw, I, O)."""
    return nnx.Conv(
        in_features,
        out_features,
        (kernel, kernel),
        strides=(stride, stride),
        padding=((padding, padding), (padding, padding)),
        use_bias=bias,
        kernel_init=conv_init,
        dtype=dtype,
        rngs=rngs,
    )


def batch_norm(features: int, *, dtype=None, rngs: nnx.Rngs) -> nnx.BatchNorm:
    """A torch-style BatchNorm2d (eps 1e-5, running-average momentum 0.1)."""
    return nnx.BatchNorm(features, epsilon=1e-5, momentum=0.9, dtype=dtype, rngs=rngs)


def max_pool(x: jax.Array, window: int, stride: int, padding: int = 0) -> jax.Array:
    """torch.nn.MaxPool2d (floor mode; padding counts as -inf). x: (B, H, W, D)."""
    return nnx.max_pool(x, (window, window), strides=(stride, stride), padding=((padding, padding), (padding, padding)))


def pool_output_size(size: int, window: int, stride: int, padding: int) -> int:
    """Spatial output size of a floor-mode pooling window."""
    return (size + 2 * padding - window) // stride + 1


@cache
def adaptive_pool_matrix(size_in: int, size_out: int) -> np.ndarray:
    """(size_out, size_in) averaging matrix of torch's AdaptiveAvgPool along one axis."""
    m = np.zeros((size_out, size_in), np.float32)
    for i in range(size_out):
        start = (i * size_in) // size_out
        end = -((-(i + 1) * size_in) // size_out)  # ceil
        m[i, start:end] = 1.0 / (end - start)
    return m


def adaptive_avg_pool(x: jax.Array, out_hw: tuple[int, int]) -> jax.Array:
    """torch.nn.AdaptiveAvgPool2d(out_hw). x: (B, H, W, D) -> (B, h, w, D)."""
    _, h, w, _ = x.shape
    if (h, w) == tuple(out_hw):
        return x
    ph = jnp.asarray(adaptive_pool_matrix(h, out_hw[0]), x.dtype)
    pw = jnp.asarray(adaptive_pool_matrix(w, out_hw[1]), x.dtype)
    return jnp.einsum("ih,jw,bhwd->bijd", ph, pw, x)


def flatten(x: jax.Array) -> jax.Array:
    """(B, h, w, D) -> (B, h*w*D) in NHWC order (the torch NCHW order is handled at weight import)."""
    return x.reshape(x.shape[0], -1)


def validate_images(images, *, channels: int = 3, finite: bool = True) -> None:
    """Raise one clear ValueError for images that cannot be a (B, H, W, C) float batch.

    Shape and dtype are always checked; finiteness (unless ``finite=False``, for callers that reduce it inside their
    own compiled pass and call `check_finite`) only when the values are concrete (outside jit)."""
    shape = getattr(images, "shape", None)
    dtype = getattr(images, "dtype", None)
    if shape is None or dtype is None:
        raise ValueError(f"images must be an array of shape (B, H, W, {channels}), got {type(images).__name__}")
    if len(shape) != 4:
        raise ValueError(
            f"images must have rank 4 (B, H, W, {channels}), got shape {tuple(shape)}; "
            "add a batch axis with images[None] for a single image"
        )
    if shape[-1] != channels:
        hint = " (channels-first input? use NHWC: images.transpose(0, 2, 3, 1))" if shape[1] == channels else ""
        raise ValueError(f"images must have {channels} channels in the last axis, got shape {tuple(shape)}{hint}")
    if not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(
            f"images must be floating point and normalised, got dtype {dtype}; "
            "convert with delib_jax.data.transforms (uint8 -> float32, mean/std normalisation)"
        )
    if isinstance(images, jax.core.Tracer) or not finite:
        return
    if isinstance(images, jax.Array):  # reduce on the device: only a flag per image comes back, not the batch
        with jax.ensure_compile_time_eval():  # concrete input, possibly inside someone's trace: compute it now
            finite = np.asarray(jnp.all(jnp.isfinite(images), axis=(1, 2, 3)))
    else:
        finite = np.isfinite(np.asarray(images, dtype=np.float32)).all(axis=(1, 2, 3))
    check_finite(finite)


def check_finite(finite) -> None:
    """Raise the ValueError for NaN/inf images from per-image flags (B,) (True = all values finite)."""
    finite = np.asarray(finite)
    if not finite.all():
        bad = [int(i) for i in np.flatnonzero(~finite)[:5]]
        raise ValueError(f"images contain NaN or inf values (batch entries {bad})")


class Identity(nnx.Module):
    """x -> x: what a batch norm becomes once folded into the convolution before it."""

    def __call__(self, x: jax.Array) -> jax.Array:
        return x
