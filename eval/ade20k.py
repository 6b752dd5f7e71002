"""Evaluate deliberative explanations on ADE20K (object masks).

python -m eval.ade20k --checkpoint runs/ade20k --synthetic --out runs/ade20k/eval
"""

from delib_jax._entry import run  # standard library only: Ctrl-C while JAX imports is one line

if __name__ == "__main__":
    run("delib_jax.evaluation.run:main", "ade20k", name="python -m eval.ade20k")
