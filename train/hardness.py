"""Train the hardness head of a run alone, on its frozen classifier: ``python -m train.hardness --checkpoint runs/cub
--data-dir /data/CUB_200_2011`` (a run imported without a hardness predictor; ``--retrain`` replaces one).

Continue after a kill or Ctrl-C with ``--resume`` (``--help`` for every flag).
"""

from delib_jax._entry import run  # standard library only: Ctrl-C while JAX imports is one line

if __name__ == "__main__":
    run("delib_jax.train.cli:hardness_main", name="python -m train.hardness")
