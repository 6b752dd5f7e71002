"""delib_jax: deliberative explanations (Wang & Vasconcelos, NeurIPS 2019) in JAX / Flax NNX.

The flow, one module per step: `delib_jax.data` -> `delib_jax.train` -> `delib_jax.attribution` ->
`delib_jax.insecurity` -> `delib_jax.explanation` -> `delib_jax.evaluation` / `delib_jax.visualize` /
`delib_jax.report`; `delib_jax.stream` runs explanations over many files, `delib_jax.store` reads them back.

    from delib_jax import create_model, explain
    explanations = explain(model, images, class_names=names)   # one Explanation per image

The names below are imported on first use (PEP 562), so that ``import delib_jax`` -- which every command line does
first -- stays light, a Ctrl-C during a command's start-up can be answered cleanly (`delib_jax._entry`), and the
explanation job's reader processes, which need only the image decoder, do not pay for importing JAX.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from delib_jax import _xla

_xla.tune_cpu()  # before anything starts JAX's CPU backend

_EXPORTS = {
    "Explanation": "delib_jax.explanation", "Insecurity": "delib_jax.explanation", "explain": "delib_jax.explanation",
    "make_explain_fn": "delib_jax.explanation", "Insecurities": "delib_jax.insecurity",
    "find_insecurities": "delib_jax.insecurity", "create_model": "delib_jax.models",
    "explain_files": "delib_jax.stream", "explain_dataset": "delib_jax.stream", "load_explanations": "delib_jax.store",
}  # fmt: skip
_SUBMODULES = (
    "attribution", "checkpoint", "cli", "data", "demo", "difficulty", "evaluation", "explanation", "insecurity",
    "models", "report", "store", "stream", "testing", "train", "visualize",
)  # fmt: skip

if TYPE_CHECKING:
    from delib_jax.explanation import Explanation, Insecurity, explain, make_explain_fn
    from delib_jax.insecurity import Insecurities, find_insecurities
    from delib_jax.models import create_model
    from delib_jax.store import load_explanations
    from delib_jax.stream import explain_dataset, explain_files


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
    elif name in _SUBMODULES:
        value = importlib.import_module(f"delib_jax.{name}")
    else:
        raise AttributeError(f"module 'delib_jax' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS, *_SUBMODULES})


__all__ = [
    "Explanation", "Insecurities", "Insecurity", "create_model", "explain", "explain_dataset", "explain_files",
    "find_insecurities",
    "load_explanations", "make_explain_fn",
]  # fmt: skip
