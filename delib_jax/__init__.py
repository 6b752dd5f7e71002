"""delib_jax: deliberative explanations (Wang & Vasconcelos, NeurIPS 2019) in JAX / Flax NNX.

The flow, one module per step: `delib_jax.data` -> `delib_jax.train` -> `delib_jax.attribution` ->
`delib_jax.insecurity` -> `delib_jax.explanation` -> `delib_jax.evaluation` / `delib_jax.visualize` /
`delib_jax.report`.

    from delib_jax import create_model, explain
    explanations = explain(model, images, class_names=names)   # one Explanation per image
"""

from delib_jax import _xla

_xla.tune_cpu()  # before anything starts JAX's CPU backend

from delib_jax.explanation import Explanation, Insecurity, explain, make_explain_fn  # noqa: E402
from delib_jax.insecurity import Insecurities, find_insecurities  # noqa: E402
from delib_jax.models import create_model  # noqa: E402

__all__ = [
    "Explanation", "Insecurities", "Insecurity", "create_model", "explain", "find_insecurities", "make_explain_fn",
]
