"""The compiled device step: the explanation and its compact outputs, dispatched without waiting for them."""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@functools.lru_cache(maxsize=1)
def compact_fn():
    """A jitted ExplainOutputs -> dict of what the store keeps: masks packed to bits on the device (8x less to
    fetch), the ambiguity maps and first/second-order terms left there, a per-image finiteness flag."""
    import jax
    import jax.numpy as jnp

    def pack(masks):  # (B, Q, H, W) bool -> (B, Q, ceil(H W / 8)) uint8, np.packbits order
        flat = masks.reshape(*masks.shape[:2], -1)
        flat = jnp.pad(flat, ((0, 0), (0, 0), (0, -flat.shape[-1] % 8)))
        bits = flat.reshape(*flat.shape[:2], -1, 8).astype(jnp.uint8)
        return jnp.sum(bits << jnp.arange(7, -1, -1, dtype=jnp.uint8), axis=-1, dtype=jnp.uint8)

    def compact(outputs):
        attr, found = outputs.attribution, outputs.insecurities
        values = [attr.probs, attr.score[:, None], attr.maps, outputs.grad_cam, found.strength, found.coverage]
        finite = jnp.stack([jnp.all(jnp.isfinite(v.reshape(v.shape[0], -1)), axis=1) for v in values]).all(0)
        return {
            "probs": attr.probs, "difficulty": attr.score, "classes": attr.classes.astype(jnp.int32),
            "maps": attr.maps, "grad_cam": outputs.grad_cam, "pairs": found.pairs, "strength": found.strength,
            "coverage": found.coverage, "threshold": found.threshold, "valid": found.valid,
            "mask_bits": pack(found.masks), "finite": finite,
        }  # fmt: skip

    return jax.jit(compact)


@dataclass
class DeviceStep:
    """``step(images)``: (B, crop, crop, 3) uint8 pixels -> the compact outputs as device arrays, dispatched and
    not waited for (the next batch is read while this one computes). ``compile_s``: the first call's time, in
    which tracing and compiling happen."""

    explain_fn: Callable[[Any], Any]
    compact: Callable[[Any], dict] = field(default_factory=compact_fn)
    compile_s: float = 0.0
    calls: int = 0

    def __call__(self, images) -> dict:
        t = time.perf_counter()
        outputs = self.compact(self.explain_fn(images))
        if self.calls == 0:
            self.compile_s = time.perf_counter() - t
        self.calls += 1
        return outputs
