"""Evaluate deliberative explanations on CUB-200-2011 (part keypoints).

    python -m eval.cub --checkpoint runs/cub --synthetic --out runs/cub/eval
"""

from delib_jax.cli import exit_process
from delib_jax.evaluation.run import main

if __name__ == "__main__":
    exit_process(main("cub"))
