"""Evaluate deliberative explanations on CUB-200-2011 (part keypoints).

python -m eval.cub --checkpoint runs/cub --synthetic --out runs/cub/eval
"""

from delib_jax._entry import run  # standard library only: Ctrl-C while JAX imports is one line

if __name__ == "__main__":
    run("delib_jax.evaluation.run:main", "cub", name="python -m eval.cub")
