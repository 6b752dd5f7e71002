"""Train on CUB-200-2011: ``python -m train.cub --data-dir /data/CUB_200_2011 --arch resnet50 --out runs/cub``.

Quick start on synthetic birds: ``python -m train.cub --synthetic --out /tmp/run_cub`` (``--help`` for every flag).
"""


from delib_jax.cli import exit_process
from delib_jax.train.cli import main

if __name__ == "__main__":
    exit_process(main("cub"))
