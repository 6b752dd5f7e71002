"""delib_jax: deliberative explanations (Wang & Vasconcelos, NeurIPS 2019) in JAX / Flax NNX.

The flow, one module per step: `delib_jax.data` -> `delib_jax.train` -> `delib_jax.attribution` ->
`delib_jax.insecurity` -> `delib_jax.explanation` -> `delib_jax.evaluation` / `delib_jax.visualize` /
`delib_jax.report`; `delib_jax.stream` runs explanations over many files, `delib_jax.store` reads them back.

    from delib_jax import create_model, explain
    explanations = explain(model, images, class_names=names)   # one Explanation per image

The public names below are imported on first use (PEP 562), so that a process that needs only the image decoder
(the explanation job's reader processes) does not pay for importing JAX.
"""

import importlib

from delib_jax import _xla

_xla.tune_cpu()  # before anything starts JAX's CPU backend

_EXPORTS = {
    "Explanation": "delib_jax.explanation",
    "Insecurity": "delib_jax.explanation",
    "explain": "delib_jax.explanation",
    "make_explain_fn": "delib_jax.explanation",
    "Insecurities": "delib_jax.insecurity",
    "find_insecurities": "delib_jax.insecurity",
    "create_model": "delib_jax.models",
    "explain_files": "delib_jax.stream",
    "load_explanations": "delib_jax.store",
}


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'delib_jax' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])


__all__ = sorted(_EXPORTS)
