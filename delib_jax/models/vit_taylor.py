"""Exact per-location logit derivatives of the ViT class head (its last encoder block), without a pass per location.

Only the class token's row of the last block reaches the logits, and moving one patch token x_l changes only its own
key and value. With p the class token's attention weights (per head), o its attention output and Delta the change of
patch l's score, the output after moving x_l alone is a rank-one update of o:

    o_l(eps) = (o - p_l v_l + p_l e^Delta v_l(eps)) / (1 - p_l + p_l e^Delta),   Delta = q . (k_l(eps) - k_l) / sqrt(c)

so every location's perturbed logits are a function of one scalar eps_l, evaluated for all L locations at once as
rows: LayerNorm of the moved token, its key and value, the updated attention output, out_proj, the MLP, the final
LayerNorm and the Linear. Forward-over-forward differentiation in eps gives the exact first and second derivatives
of each location's logits (U and W of the common head interface) at the cost of a few passes over L rows of the
block's row-wise layers: no softmax over L per location, no L x L attention.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from delib_jax.models.norm_heads import layer_norm

Array = jax.Array


def _ln(module, x: Array) -> Array:
    return layer_norm(x, module.scale[...], module.bias[...], module.epsilon)


def class_head_taylor(head, a: Array, cls: Array, v: Array, *, second: str | None) -> tuple[Array, Array, Array | None]:
    """Logits z (B, K), per-location tangents U (B, L, K) along v_l e_l, and the diagonal second derivatives
    W (B, L, K) (None when ``second`` is None) of a `ViTHead` at patch grid A (B, H, W, D) with class token cls
    (B, D)."""
    if second not in (None, "diagonal"):
        raise ValueError(f"the ViT head's structured path gives the diagonal second-order term only, got {second!r}")
    b, h, w, d = a.shape
    n_loc = h * w
    block = head.block
    attn = block.attention
    n_heads = attn.num_heads
    c = d // n_heads
    x = a.reshape(b, n_loc, d)
    t = v.reshape(b, n_loc, d)
    kernel = attn.in_proj.kernel[...]
    bias = attn.in_proj.bias[...]
    y_cls = _ln(block.ln_1, cls)  # (B, D)
    q = (y_cls @ kernel[:, :d] + bias[:d]).reshape(b, n_heads, c)
    y = _ln(block.ln_1, x)  # (B, L, D)
    kv = y @ kernel[:, d:] + bias[d:]
    k = kv[..., :d].reshape(b, n_loc, n_heads, c)
    val = kv[..., d:].reshape(b, n_loc, n_heads, c)
    kv_cls = y_cls @ kernel[:, d:] + bias[d:]
    k_cls = kv_cls[:, :d].reshape(b, 1, n_heads, c)
    v_cls = kv_cls[:, d:].reshape(b, 1, n_heads, c)
    scale = jnp.sqrt(jnp.asarray(c, a.dtype))
    scores = jnp.einsum("bhc,blhc->blh", q, jnp.concatenate([k_cls, k], axis=1)) / scale  # (B, 1 + L, heads)
    p = jax.nn.softmax(scores, axis=1)
    o = jnp.einsum("blh,blhc->bhc", p, jnp.concatenate([v_cls, val], axis=1))  # (B, heads, c)
    p_l = p[:, 1:, :, None]  # (B, L, heads, 1): the patches' weights
    rest = o[:, None] - p_l * val  # (B, L, heads, c): o without patch l

    def logits(eps: Array) -> Array:
        """(B, L) -> (B, L, K): the logits with patch l moved by eps_l v_l alone, for every l."""
        moved = _ln(block.ln_1, x + eps[..., None] * t)
        kv_l = moved @ kernel[:, d:] + bias[d:]
        k_l = kv_l[..., :d].reshape(b, n_loc, n_heads, c)
        v_l = kv_l[..., d:].reshape(b, n_loc, n_heads, c)
        grow = jnp.exp(jnp.einsum("bhc,blhc->blh", q, k_l - k) / scale)[..., None]  # e^Delta
        o_l = (rest + p_l * grow * v_l) / (1.0 - p_l + p_l * grow)
        x1 = cls[:, None] + attn.out_proj(o_l.reshape(b, n_loc, d))
        x2 = x1 + block.mlp(x1)
        return head.head(_ln(head.norm, x2))

    zero = jnp.zeros((b, n_loc), a.dtype)
    one = jnp.ones((b, n_loc), a.dtype)
    if second is None:
        zs, u = jax.jvp(logits, (zero,), (one,))
        return zs[:, 0], u, None
    (zs, u), (_, w2) = jax.jvp(lambda e: jax.jvp(logits, (e,), (one,)), (zero,), (one,))
    return zs[:, 0], u, w2
