"""Class heads with a LayerNorm: ConvNeXt's (pool, LayerNorm, Linear) and Swin's (LayerNorm per location, pool,
Linear), with exact per-location first and second logit derivatives.

These heads are not piecewise linear: the LayerNorm curves, so the logits' second derivative along a location's
direction is not zero and Eq. 2's term has a part the softmax alone does not give. Both heads are a LayerNorm of a
D-vector followed by a Linear, and a location's direction reaches the norm as one D-vector, so `taylor` takes the
norm's first and second directional derivatives row by row (forward over forward on (B, L, D) rows, O(B L D)) and
sends both through the Linear in one GEMM: no per-location pass through the head.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

Array = jax.Array

PLACES = ("after_pool", "before_pool")


def layer_norm(x: Array, scale: Array, bias: Array, eps: float) -> Array:
    """torch.nn.LayerNorm over the last axis (biased variance)."""
    mu = jnp.mean(x, axis=-1, keepdims=True)
    c = x - mu
    var = jnp.mean(c * c, axis=-1, keepdims=True)
    return c * jax.lax.rsqrt(var + eps) * scale + bias


def norm_derivatives(x: Array, t: Array, t2: Array, scale: Array, eps: float) -> tuple[Array, Array, Array]:
    """LayerNorm y(x) (without its bias), D y(x)[t] and D^2 y(x)[t, t2], row-wise over (..., D), in closed form.

    With c = x - mean(x), s = (var(x) + eps)^-1/2, n = c s and centred tangents tc, t2c:
      D n[t]         = s tc - n s^2 <c, tc> / D
      D^2 n[t, t2]   = -s^3/D (<c, t2c> tc + <c, tc> t2c + <tc, t2c> c) + 3 s^5/D^2 <c, tc><c, t2c> c
    and y = scale * n (the bias does not move)."""
    d = x.shape[-1]
    c = x - jnp.mean(x, axis=-1, keepdims=True)
    tc = t - jnp.mean(t, axis=-1, keepdims=True)
    t2c = t2 - jnp.mean(t2, axis=-1, keepdims=True)
    s = jax.lax.rsqrt(jnp.mean(c * c, axis=-1, keepdims=True) + eps)
    ct = jnp.sum(c * tc, axis=-1, keepdims=True)
    ct2 = jnp.sum(c * t2c, axis=-1, keepdims=True)
    tt2 = jnp.sum(tc * t2c, axis=-1, keepdims=True)
    s2 = s * s
    n = c * s
    dn = s * tc - n * (s2 * ct / d)
    d2n = -(s2 * s / d) * (ct2 * tc + ct * t2c + tt2 * c) + (3.0 * s2 * s2 * s / (d * d)) * (ct * ct2) * c
    return n * scale, dn * scale, d2n * scale


class NormHead(nnx.Module):
    """A (B, H, W, D) -> logits (B, K): global average pool and LayerNorm in either order, then a Linear.

    place 'after_pool': LayerNorm of the pooled vector (torchvision ConvNeXt: avgpool, LayerNorm2d, Linear);
    'before_pool': LayerNorm of each location, then the pool (torchvision Swin: norm, avgpool, Linear). Parameters:
    ``norm`` (an nnx.LayerNorm over D) and ``linear`` (D -> K)."""

    output_layer = ("linear",)  # where ImageNet's 1,000 classes live (`load_torchvision(classifier_output=False)`)

    def __init__(self, in_channels: int, out_features: int, *, place: str, eps: float = 1e-6, rngs: nnx.Rngs):
        if place not in PLACES:
            raise ValueError(f"place must be one of {', '.join(PLACES)}, got {place!r}")
        self.in_channels = in_channels
        self.out_features = out_features
        self.place = place
        self.eps = eps
        self.norm = nnx.LayerNorm(in_channels, epsilon=eps, rngs=rngs)
        self.linear = nnx.Linear(in_channels, out_features, rngs=rngs)

    def _norm(self, x: Array) -> Array:
        return layer_norm(x, self.norm.scale[...], self.norm.bias[...], self.eps)

    def __call__(self, a: Array) -> Array:
        """Logits (B, K) from A (B, H, W, D)."""
        if self.place == "after_pool":
            y = self._norm(jnp.mean(a, axis=(1, 2)))
        else:
            y = jnp.mean(self._norm(a), axis=(1, 2))
        return self.linear(y)

    def taylor(self, a: Array, v: Array, *, second: str | None = "diagonal", layout: str = "auto"):
        """Logits z (B, K), per-location logit tangents U (B, L, K) = J_z (v_l e_l), and second derivatives
        W (B, L, K) = D^2 z[v_l e_l, v_l e_l] ('diagonal') or D^2 z[v_l e_l, V] ('cross'); W is None when
        ``second`` is None. Exact; layout is accepted for the common head interface and has no effect."""
        del layout
        b, h, w, d = a.shape
        n_loc = h * w
        scale = self.norm.scale[...]
        if self.place == "after_pool":
            p = jnp.mean(a, axis=(1, 2))  # (B, D): every location reaches the norm through the mean
            t = v.reshape(b, n_loc, d) / n_loc
            t2 = t if second != "cross" else jnp.broadcast_to(jnp.mean(v, axis=(1, 2))[:, None], t.shape)
            y, dy, d2y = norm_derivatives(jnp.broadcast_to(p[:, None], t.shape), t, t2, scale, self.eps)
            y = y[:, 0]
        else:  # the norm acts on each location alone: z is a sum over locations, so D^2 z[E_l, V] = D^2 z[E_l, E_l]
            x = a.reshape(b, n_loc, d)
            t = v.reshape(b, n_loc, d)
            y, dy, d2y = norm_derivatives(x, t, t, scale, self.eps)
            y, dy, d2y = jnp.mean(y, axis=1), dy / n_loc, d2y / n_loc
        kernel = self.linear.kernel[...]
        z = (y + self.norm.bias[...]) @ kernel + self.linear.bias[...]
        if second is None:
            return z, dy @ kernel, None
        both = jnp.concatenate([dy, d2y], axis=1) @ kernel  # one GEMM for both derivatives: (B, 2L, K)
        return z, both[:, :n_loc], both[:, n_loc:]
