"""Integrated / Expected Hessians and SmoothHess of a trained model at layer A for its hardest test images.

python -m eval.interactions --checkpoint runs/cub --synthetic --out runs/cub/interactions
"""

from delib_jax.cli import exit_process
from delib_jax.evaluation.interactions_job import main

if __name__ == "__main__":
    exit_process(main())
