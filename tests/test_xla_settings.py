"""The XLA:CPU tuning applied on import: only for the jaxlib it was measured on, never over the user's choice."""

import os
import re

from delib_jax import _xla


def test_flag_added_for_jaxlib_0_10(monkeypatch):
    monkeypatch.setattr(_xla, "_jaxlib_version", lambda: (0, 10))
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=2")
    _xla.tune_cpu()
    import os

    assert os.environ["XLA_FLAGS"] == "--xla_force_host_platform_device_count=2 " + _xla.YNN_FLAG


def test_user_choice_and_other_versions_left_alone(monkeypatch):
    import os

    monkeypatch.setattr(_xla, "_jaxlib_version", lambda: (0, 10))
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_experimental_ynn_fusion_type=dot")
    _xla.tune_cpu()
    assert os.environ["XLA_FLAGS"] == "--xla_cpu_experimental_ynn_fusion_type=dot"
    monkeypatch.setattr(_xla, "_jaxlib_version", lambda: (0, 11))
    monkeypatch.delenv("XLA_FLAGS")
    _xla.tune_cpu()
    assert "XLA_FLAGS" not in os.environ


def _ynn_fusion_bodies(hlo: str) -> list[str]:
    """The computations that XLA:CPU runs as YNN fusions in an optimised HLO module's text."""
    bodies = {block.strip().split(" ", 1)[0]: block for block in hlo.split("\n\n") if block.strip().startswith("%")}
    return [bodies[name] for name in re.findall(r"calls=(%[\w.\-]+)[^\n]*__ynn_fusion", hlo)]


def test_the_setting_keeps_ynn_dots_but_not_the_pool_fusion():
    """In this process (delib_jax imported under conftest's XLA_FLAGS): dense layers, forward and backward, run as
    YNN dots (XLA's own kernels were 5-8x slower for the transposed products of a backward pass), while a max pool
    is not fused into the dense layer that reads it (that fusion made VGG16's forward ~2.5x slower)."""
    import jax
    import jax.numpy as jnp
    import pytest

    if _xla._jaxlib_version() != (0, 10) or _xla.YNN_FLAG not in os.environ.get("XLA_FLAGS", ""):
        pytest.skip("the setting applies to jaxlib 0.10 without a user choice")

    def head(x, w):  # VGG16's fc6 (narrower): 2x2 max pool of A (14 x 14 x 512), flatten, dense
        pooled = jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")
        return jnp.sum(pooled.reshape(x.shape[0], -1) @ w)

    # shapes only: compiled, never run (jaxlib's default fuses the pool into this dot at these sizes, not at tiny ones)
    x, w = jax.ShapeDtypeStruct((2, 14, 14, 512), jnp.float32), jax.ShapeDtypeStruct((7 * 7 * 512, 256), jnp.float32)
    forward = _ynn_fusion_bodies(jax.jit(head).lower(x, w).compile().as_text())
    backward = _ynn_fusion_bodies(jax.jit(jax.grad(head)).lower(x, w).compile().as_text())
    assert forward and backward, "the dense layer's dots do not run in YNN"
    assert all("dot(" in body and "reduce-window(" not in body for body in forward + backward)
