"""Train on ADE20K scenes.

    python -m train.ade20k --data-dir /data/ADEChallengeData2016 --arch resnet50 --out runs/ade
    python -m train.ade20k --synthetic --out /tmp/run_ade20k     # quick start on synthetic scenes; --help: every flag
"""


from delib_jax.cli import exit_process
from delib_jax.train.cli import main

if __name__ == "__main__":
    exit_process(main("ade20k"))
