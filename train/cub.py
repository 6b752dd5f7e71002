"""Train on CUB-200-2011: ``python -m train.cub --data-dir /data/CUB_200_2011 --arch resnet50 --out runs/cub``.

Quick start on synthetic birds: ``python -m train.cub --synthetic --out /tmp/run_cub`` (``--help`` for every flag).
"""

from delib_jax._entry import run  # standard library only: Ctrl-C while JAX imports is one line

if __name__ == "__main__":
    run("delib_jax.train.cli:main", "cub", name="python -m train.cub")
