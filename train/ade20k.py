"""Train on ADE20K scenes.

python -m train.ade20k --data-dir /data/ADEChallengeData2016 --arch resnet50 --out runs/ade
python -m train.ade20k --synthetic --out /tmp/run_ade20k     # quick start on synthetic scenes; --help: every flag
"""

from delib_jax._entry import run  # standard library only: Ctrl-C while JAX imports is one line

if __name__ == "__main__":
    run("delib_jax.train.cli:main", "ade20k", name="python -m train.ade20k")
