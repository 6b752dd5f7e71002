"""Evaluate deliberative explanations on ADE20K (object masks).

    python -m eval.ade20k --checkpoint runs/ade20k --synthetic --out runs/ade20k/eval
"""

from delib_jax.cli import exit_process
from delib_jax.evaluation.run import main

if __name__ == "__main__":
    exit_process(main("ade20k"))
