"""Compare attribution methods by faithfulness (deletion / insertion curves, infidelity) at layer A and the pixels.

python -m eval.faithfulness --checkpoint runs/cub --synthetic --out runs/cub/faithfulness
"""

from delib_jax.cli import exit_process
from delib_jax.evaluation.faithfulness_job import main

if __name__ == "__main__":
    exit_process(main())
