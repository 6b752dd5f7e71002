"""XLA:CPU settings applied when delib_jax is imported (before JAX starts its CPU backend).

jaxlib 0.10's default YNN (XNNPACK) fusions include fusing a max pool into the dense layer that reads it; for VGG16
that one fusion runs ~2.5x slower than the separate ops (forward, batch 2: 1.89 s against 0.72 s). Turning YNN off
altogether (this module's earlier setting) kept that gain but lost YNN's dot kernels, which XLA's own replace badly
for the transposed products of a backward pass: Grad-CAM through fc6 became 5-8x slower (1.07 s against 0.15-0.21 s).
Keeping only YNN's individual dots (``individual_dot``: no fusions around them) has both: the forward of the
separate ops and the fast backward. Measured with `benchmarks.xla_flags` (2-core CPU, shared; benchmarks/RESULTS.md).

Applied only for jaxlib 0.10.x, where the flag and its values exist (an unknown flag or value aborts XLA), and only
when XLA_FLAGS does not already choose YNN fusion types. Set XLA_FLAGS yourself to override, e.g.
``--xla_cpu_experimental_ynn_fusion_type=`` (no YNN) or any value `benchmarks.xla_flags` compares.
"""

from __future__ import annotations

import os
from importlib import metadata

YNN_FLAG = "--xla_cpu_experimental_ynn_fusion_type=individual_dot"


def _jaxlib_version() -> tuple[int, int]:
    try:
        major, minor = metadata.version("jaxlib").split(".")[:2]
        return int(major), int(minor)
    except (metadata.PackageNotFoundError, ValueError):
        return (0, 0)


def tune_cpu() -> None:
    """Keep XLA:CPU's YNN fusion to individual dots (see module docstring) unless the user chose otherwise."""
    flags = os.environ.get("XLA_FLAGS", "")
    if "ynn_fusion_type" in flags or _jaxlib_version() != (0, 10):
        return
    os.environ["XLA_FLAGS"] = f"{flags} {YNN_FLAG}".strip()


CACHE_ENV = "DELIB_COMPILATION_CACHE"


def cache_directory(choice: str | None = None) -> str | None:
    """Where command-line runs keep compiled XLA programs: ``choice`` (a folder, or 'off'), else the environment
    variable DELIB_COMPILATION_CACHE, else $XDG_CACHE_HOME/delib_jax/xla (~/.cache/delib_jax/xla); None when off."""
    value = choice if choice is not None else os.environ.get(CACHE_ENV)
    if value is not None and value.strip().lower() in ("off", "none", "0", "false", ""):
        return None
    if value is None:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        value = os.path.join(base, "delib_jax", "xla")
    return os.path.abspath(os.path.expanduser(value))


def compilation_cache(choice: str | None = None) -> str | None:
    """Turn on JAX's persistent compilation cache for a command-line run (see `cache_directory`), so that a second
    run of the same command compiles nothing; returns the folder, or None (off, or the folder cannot be created:
    compiling again is slower, never wrong)."""
    import jax

    directory = cache_directory(choice)
    if directory is None:
        return None
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError:
        return None
    jax.config.update("jax_compilation_cache_dir", directory)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    return directory
