"""XLA:CPU settings applied when delib_jax is imported (before JAX starts its CPU backend).

jaxlib 0.10 fuses a max pool followed by several dense layers into one "YNN" fusion that runs ~2-3x slower than
the separate ops: VGG16's forward pass at batch 2 took 2.75 s with it and 1.03 s without (2-core CPU, measured with
benchmarks). Turned off only for jaxlib 0.10.x, where the flag exists (an unknown flag aborts XLA), and only when
XLA_FLAGS does not already choose YNN fusion types. Set XLA_FLAGS yourself to override.
"""

from __future__ import annotations

import os
from importlib import metadata

YNN_FLAG = "--xla_cpu_experimental_ynn_fusion_type="


def _jaxlib_version() -> tuple[int, int]:
    try:
        major, minor = metadata.version("jaxlib").split(".")[:2]
        return int(major), int(minor)
    except (metadata.PackageNotFoundError, ValueError):
        return (0, 0)


def tune_cpu() -> None:
    """Disable XLA:CPU's YNN fusion (see module docstring) unless the user chose otherwise."""
    flags = os.environ.get("XLA_FLAGS", "")
    if "ynn_fusion_type" in flags or _jaxlib_version() != (0, 10):
        return
    os.environ["XLA_FLAGS"] = f"{flags} {YNN_FLAG}".strip()
