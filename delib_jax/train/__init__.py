"""Joint training of a classifier and its hardness predictor, with checkpoints, resume and data parallelism.

    from delib_jax.train import fit
    summary = fit("runs/cub", config)       # config: delib_jax.checkpoint.RunConfig

Pieces: `losses` (hardness-weighted cross-entropy and the hardness loss), `loop` (create_train_state, train_step,
eval_step, the data-parallel mesh), `run` (fit: data, validation split, checkpoints, resume, metrics), `hardness`
(fit_hardness: a run's hardness head alone, on its frozen classifier), `cli` (the ``python -m train.cub`` /
``train.ade20k`` / ``train.hardness`` command lines).
"""

from delib_jax.train.hardness import fit_hardness
from delib_jax.train.loop import (
    TrainState,
    compile_steps,
    create_train_state,
    eval_step,
    forward,
    make_mesh,
    make_optimizer,
    shard_batch,
    train_step,
)
from delib_jax.train.losses import hardness_bce, hardness_weights, joint_loss, true_class_probability
from delib_jax.train.run import DiskFull, TrainingDiverged, evaluate, fit, load_splits, split_validation

__all__ = [
    "DiskFull", "TrainState", "TrainingDiverged", "compile_steps", "create_train_state", "eval_step", "evaluate",
    "fit", "fit_hardness", "forward", "hardness_bce",
    "hardness_weights", "joint_loss", "load_splits", "make_mesh", "make_optimizer", "shard_batch",
    "split_validation", "train_step", "true_class_probability",
]  # fmt: skip
