"""A whole training run: data and validation split, the loop, validation, checkpoints, resume, metrics.

    config = RunConfig(arch="small", num_classes=..., class_names=[...], data_dir="/data/CUB_200_2011", ...)
    summary = fit("runs/cub_small", config)          # new run
    summary = fit("runs/cub_small", resume=True)     # continue a killed run from its latest checkpoint

Resume is exact: every batch is a pure function of (seed, step), the dropout streams and batch statistics are part of
the checkpoint, so a run resumed from step k reaches the same state as an uninterrupted one. It loses the steps since
the last ``checkpoint_every`` save. The best checkpoint is chosen on a validation split carved from the training
split (``val_fraction``, deterministic in the seed); the test split is evaluated once, at the end, on the best model.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import math
import re
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from delib_jax._multihost import barrier
from delib_jax.checkpoint import (
    CHECKPOINT_DIR,
    CONFIG_FILE,
    METRICS_FILE,
    OPTIONED,
    CheckpointError,
    RunCheckpoints,
    RunConfig,
    _restore_error,
    load_run_config,
    quiet_orbax_leftovers,
    save_run_config,
)
from delib_jax.data import class_names, dataset_kind, load_dataset
from delib_jax.data.pipeline import Pipeline, Source, eval_pipeline, train_pipeline
from delib_jax.progress import progress_bar
from delib_jax.train.loop import (
    TrainState,
    compile_steps,
    create_train_state,
    make_mesh,
    process_share,
    replicate,
    replicated,
    shard_batch,
)


@dataclasses.dataclass(frozen=True)
class Splits:
    """Training, validation (carved from the official training split, or the dataset's own) and test sources, and
    the class names."""

    train: Source
    val: Source
    test: Source
    class_names: list[str]


def split_validation(train_indices: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split dataset indices (N,) into (train, val), val of size max(1, round(fraction N)), both sorted.

    Deterministic in ``seed``; ValueError if fewer than 2 indices.
    """
    train_indices = np.asarray(train_indices, dtype=np.int64)
    n = len(train_indices)
    if n < 2:
        raise ValueError(f"cannot carve a validation split from {n} training example(s)")
    n_val = min(max(1, round(fraction * n)), n - 1)
    perm = np.random.default_rng([seed, 0x7A1]).permutation(n)
    return np.sort(train_indices[perm[n_val:]]), np.sort(train_indices[perm[:n_val]])


def load_splits(
    dataset: str,
    data_dir: str | Path,
    *,
    val_fraction: float,
    seed: int,
    options: dict | None = None,
    report: Callable[[str], None] | None = None,
) -> Splits:
    """Read ``dataset`` (a kind of `delib_jax.data.KINDS`, with its ``options``) and split it (raises the readers'
    DatasetError; ValueError for a CUB class without training images, which the classifier could never learn).

    CUB-200-2011 and ADE20K: a validation split of ``val_fraction`` carved from the official training split (seeded);
    class folders and TFDS catalog datasets: their own train / val / test splits (given, or carved by the reader
    with the fractions and seed of ``options``). ``report``: `load_dataset`'s."""
    kind = dataset_kind(dataset)
    ds = load_dataset(dataset, data_dir, options=options, report=report)
    names = list(class_names(ds))
    if dataset == "cub":
        empty = np.flatnonzero(np.bincount(ds.labels[ds.is_train], minlength=len(names)) == 0)
        if len(empty):
            shown = ", ".join(names[i] for i in empty[:5]) + (f" ... ({len(empty)} classes)" if len(empty) > 5 else "")
            raise ValueError(
                f"{data_dir}: no training images for class {shown} (image_class_labels.txt, train_test_split.txt): "
                "give every class of classes.txt training images"
            )
    if dataset in OPTIONED:
        return Splits(kind.source(ds, "train"), kind.source(ds, "val"), kind.source(ds, "test"), names)
    train, val = split_validation(np.flatnonzero(ds.is_train), val_fraction, seed)
    return Splits(kind.source(ds, indices=train), kind.source(ds, indices=val), kind.source(ds, "test"), names)


def run_splits(config: RunConfig) -> Splits:
    """`load_splits` of the data a run's configuration names."""
    return load_splits(config.dataset, config.data_dir, val_fraction=config.val_fraction, seed=config.seed,
                       options=config.data_options)  # fmt: skip


def total_steps(config: RunConfig, steps_per_epoch: int) -> int:
    """``config.steps`` if set, else epochs x steps per epoch."""
    return config.steps if config.steps is not None else config.epochs * steps_per_epoch


def evaluate(eval_fn: Callable, state: TrainState, pipeline: Pipeline, mesh) -> dict[str, float]:
    """Accuracy, mean cross-entropy and hardness loss of ``state``'s eval-mode model over one pass of ``pipeline``.

    Batches are padded to the pipeline's batch size (one compiled shape; padding rows are masked out). With several
    processes, each pipeline yields its process's rows (`PipelineConfig.shard`), padded to its share of the batch.
    """
    b = pipeline.config.batch_size // pipeline.config.shard[1]
    totals: dict[str, Any] = {}
    for batch in pipeline.iterate():
        n = len(batch["label"])
        images = batch["image"]
        padded = {
            "image": np.concatenate([images, np.zeros((b - n, *images.shape[1:]), images.dtype)]),
            "label": np.concatenate([batch["label"], np.zeros(b - n, np.int64)]).astype(np.int32),
            "mask": np.arange(b) < n,
        }
        sums = eval_fn(state, shard_batch(padded, mesh, keys=("image", "label", "mask")))
        totals = sums if not totals else jax.tree.map(lambda a, c: a + c, totals, sums)
    t = jax.device_get(totals)
    count = max(float(t["count"]), 1.0)
    return {
        "accuracy": float(t["correct"]) / count, "loss": float(t["ce"]) / count,
        "hardness_loss": float(t["hardness_loss"]) / count, "count": int(t["count"]),
    }  # fmt: skip


class MetricsLog:
    """Append-only ``RUN_DIR/metrics.jsonl`` (process 0 only); on resume, drops records past the resumed step and the
    test record."""

    def __init__(self, path: Path, *, keep_until: int | None = None, enabled: bool = True):
        self.path, self.enabled = path, enabled
        if enabled and keep_until is not None and path.exists():
            kept = [line for line in path.read_text(errors="replace").splitlines() if _keep(line, keep_until)]
            tmp = path.with_name(path.name + ".tmp")  # written beside, then renamed: a full disk keeps the old file
            tmp.write_text("".join(f"{line}\n" for line in kept))
            tmp.replace(path)

    def write(self, record: dict) -> None:
        if self.enabled:
            with self.path.open("a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")


def _keep(line: str, until: int) -> bool:
    """Records of steps up to ``until``, except the final test record (written again when the run ends)."""
    try:
        record = json.loads(line)
        return record.get("split") != "test" and float(record.get("step", float("inf"))) <= until
    except (json.JSONDecodeError, AttributeError, TypeError, ValueError, RecursionError):
        return False


class DiskFull(OSError):
    """The disk holding the run filled up while training wrote a checkpoint or a metrics record; the message says how
    much space the checkpoints need and how to continue (the checkpoints written before are intact)."""

    def __str__(self) -> str:
        return self.strerror


# How a full disk (or quota) shows: OSError errno, or the text of orbax / tensorstore errors (ValueError with
# "RESOURCE_EXHAUSTED ... No space left on device [os_error_code='28']").
_DISK_FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
_DISK_FULL_TEXT = re.compile(r"RESOURCE_EXHAUSTED|No space left on device|Disk quota exceeded|File too large")


def is_disk_full(error: BaseException) -> bool:
    """Whether ``error`` or an exception it was raised from or during is a full disk (or quota)."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in _DISK_FULL_ERRNOS:
            return True
        if _DISK_FULL_TEXT.search(str(error)):
            return True
        error = error.__cause__ or error.__context__
    return False


def checkpoint_bytes(config: RunConfig) -> tuple[int, int]:
    """Approximate sizes in bytes of a run's latest (parameters, batch statistics, optimizer state) and best
    (parameters, batch statistics) checkpoints, from the shapes of its model (nothing is allocated)."""
    from flax import nnx

    from delib_jax.checkpoint import build_model

    model = nnx.eval_shape(lambda: build_model(config))
    _, params, rest = nnx.split(model, nnx.Param, ...)

    def size(tree) -> int:
        return sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree)
                   if not jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key))  # fmt: skip

    p, s = size(params), size(rest)
    moments = 2 if config.optimizer == "adamw" else int(config.momentum > 0)
    return p * (1 + moments) + s, p + s


def _remove_partial_saves(run_dir: Path) -> None:
    """Delete orbax's temporary folders of saves that failed (they hold partial data and take the space a retry
    needs); finished checkpoints are untouched."""
    for partial in (run_dir / CHECKPOINT_DIR).glob("*/*.orbax-checkpoint-tmp*"):
        shutil.rmtree(partial, ignore_errors=True)


def _disk_full(run_dir: Path, config: RunConfig, *, resumable: bool) -> DiskFull:
    """The one-line error for a full disk, after the partial saves are removed."""
    _remove_partial_saves(run_dir)
    latest, best = checkpoint_bytes(config)
    folder = run_dir if run_dir.exists() else run_dir.parent
    free = shutil.disk_usage(folder).free
    # a new checkpoint is written beside the previous one before that is deleted: one of each kind, plus slack for
    # metrics.jsonl and orbax's metadata
    need = int((latest + best) * 1.1) + (1 << 20)
    then = "continue with the same command plus --resume" if resumable else "run the same command again"
    return DiskFull(
        errno.ENOSPC,
        f"no space left on the disk of {run_dir.absolute()}: {_mb(free)} free, training needs about {_mb(need)} "
        f"free to write its next checkpoints (latest {_mb(latest)}, best {_mb(best)}); free some space and {then}",
    )


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n < 1e9 else f"{n / 1e9:.2f} GB"


class TrainingDiverged(ValueError):
    """The training or validation loss, or the parameters, became NaN or infinite (a learning rate too high, ...)."""


def _is_better(val: dict, best: dict | None) -> bool:
    """Higher validation accuracy, ties broken by lower validation loss; a non-finite loss is never better."""
    if not math.isfinite(val["loss"]):
        return False
    if best is None:
        return True
    return (val["accuracy"], -val["loss"]) > (best["accuracy"], -best["loss"])


def prepare_run(run_dir: Path, config: RunConfig | None, *, resume: bool, write: bool = True) -> RunConfig:
    """The run's configuration: written for a new run (unless ``write=False``: checked only), read (and checked against
    ``config``) on resume.

    Raises FileNotFoundError when resuming a run that does not exist, ValueError when starting a new run over an
    existing one or resuming with a different configuration.
    """
    if resume:
        if not (run_dir / CONFIG_FILE).is_file():
            raise FileNotFoundError(f"nothing to resume: {run_dir} holds no training run ({CONFIG_FILE} missing)")
        stored = load_run_config(run_dir)
        if config is not None and config != stored:
            diff = [
                f"{f.name}={getattr(config, f.name)!r} (run has {getattr(stored, f.name)!r})"
                for f in dataclasses.fields(RunConfig)
                if getattr(config, f.name) != getattr(stored, f.name)
            ]
            raise ValueError(f"cannot resume {run_dir} with a different configuration: {', '.join(diff)}")
        return stored
    if config is None:
        raise ValueError("a new run needs a RunConfig")
    if (run_dir / CONFIG_FILE).exists():
        raise ValueError(f"{run_dir} already holds a run: pass resume=True (--resume) or choose another output folder")
    if write and jax.process_index() == 0:
        save_run_config(run_dir, config)
    return config


def _check_finite(
    what: str,
    value: float | None,
    *,
    step: int,
    steps_per_epoch: int,
    ckpt: RunCheckpoints,
    restart: str = "start a new run with another --out",
) -> None:
    """Stop a diverged run (TrainingDiverged) rather than train on, and later select, a NaN model (value None: the
    check on ``what`` failed without a number). ``restart``: how to start again when a checkpoint was kept."""
    if value is not None and math.isfinite(value):
        return
    saved = ckpt.step("latest")
    if saved is not None:
        kept = f"the last finite checkpoint (step {saved}) is kept in {ckpt.directory}; lower --lr"
        then = restart
    else:
        kept, then = "no training checkpoint was saved yet; lower --lr", "run again"
    detail = what if value is None else f"{what} {value}"
    raise TrainingDiverged(
        f"training diverged at epoch {math.ceil(step / steps_per_epoch)} step {step} ({detail}); {kept} (or check "
        f"the data and --weights) and {then}"
    )


@jax.jit
def _all_finite(tree: Any) -> jax.Array:
    """Whether every floating-point leaf of ``tree`` is finite (one reduction on the device)."""
    leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)]
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))


def _remove_unsaved_start(run_dir: Path, existed: bool) -> None:
    """Undo a new run that failed before its first checkpoint (nothing to resume): its config.json, metrics and empty
    checkpoint folders, so that the same command can be retried; folders that held something else stay."""
    latest = run_dir / CHECKPOINT_DIR / "latest"
    if latest.is_dir() and any(p.name.isdigit() for p in latest.iterdir()):
        return
    for name in (CONFIG_FILE, METRICS_FILE):
        (run_dir / name).unlink(missing_ok=True)
    shutil.rmtree(run_dir / CHECKPOINT_DIR, ignore_errors=True)
    if not existed and run_dir.is_dir() and not any(run_dir.iterdir()):
        run_dir.rmdir()


def fit(
    run_dir: str | Path,
    config: RunConfig | None = None,
    *,
    resume: bool = False,
    progress: bool = True,
    log_every: int = 10,
    num_threads: int = 4,
    num_workers: int = 0,
    on_step: Callable[[int, TrainState], None] | None = None,
) -> dict[str, Any]:
    """Train ``config`` into ``run_dir`` (or continue the run there with ``resume=True``); returns a summary.

    Args:
      run_dir: the run directory (layout in `delib_jax.checkpoint`).
      config: the run's configuration (optional on resume, where config.json is authoritative).
      resume: continue from the latest checkpoint (from step 0 if the run was killed before its first checkpoint).
      progress: show a progress bar (loss, accuracy, images/s) on process 0; without a terminal a line every 30 s.
      log_every: steps between training-metric records (and progress-bar updates); records also end at checkpoints.
      num_threads: image decoding threads (in each decoding process, if any).
      num_workers: training-input decoding processes (`PipelineConfig.num_workers`; 0: threads only).
      on_step: called as ``on_step(step, state)`` after every step (step = steps done); may raise to stop the run
        abruptly (no save happens beyond the periodic ones).

    Returns:
      dict with steps, best_step, val_accuracy (best), test_accuracy, test_loss (best model), wall_s.

    Raises:
      TrainingDiverged: (a ValueError) a training or validation loss, or the parameters at a checkpoint, became NaN
        or infinite; the checkpoints saved before stay.
      DiskFull: (an OSError) the disk filled up; partial saves are removed, the earlier checkpoints stay, and the
        message names the space needed and the command that continues.
      ValueError, FileNotFoundError, OSError: the run cannot start (data, splits, weights, run folder). A new run that
        fails before its first checkpoint leaves nothing behind that would block starting it again.
    """
    t_start = time.perf_counter()
    run_dir = Path(run_dir)
    existed = run_dir.exists()
    config = prepare_run(run_dir, config, resume=resume, write=False)
    quiet_orbax_leftovers()  # an asynchronous save that fails is reported here once, not by orbax's threads too
    try:
        summary = _fit(run_dir, config, resume=resume, progress=progress, log_every=log_every,
                       num_threads=num_threads, num_workers=num_workers, on_step=on_step)  # fmt: skip
    except Exception as e:
        full = is_disk_full(e)
        if not resume and jax.process_index() == 0:
            _remove_unsaved_start(run_dir, existed)
        if full:
            resumable = (run_dir / CONFIG_FILE).is_file()
            raise _disk_full(run_dir, config, resumable=resumable) from None
        raise
    return {**summary, "wall_s": time.perf_counter() - t_start}


def _fit(
    run_dir: Path,
    config: RunConfig,
    *,
    resume: bool,
    progress: bool,
    log_every: int,
    num_threads: int,
    num_workers: int,
    on_step: Callable[[int, TrainState], None] | None,
) -> dict[str, Any]:
    """`fit` once the configuration is known: everything that can fail on the data or weights runs before config.json
    of a new run is written."""
    splits = run_splits(config)
    mesh = make_mesh()
    train_pipe, evals = make_pipelines(config, splits, mesh, num_threads=num_threads, num_workers=num_workers)
    n_steps = total_steps(config, train_pipe.steps_per_epoch)
    step_fn, eval_fn = compile_steps(mesh, pixel_stats=config.normalization)
    state = None
    if not resume:  # the ImageNet weights are read before anything is written
        state = create_train_state(config, total_steps=n_steps, mesh=mesh)
        barrier("delib_jax: run checked")  # every process found no run here (`fit`) before process 0 writes one
        if jax.process_index() == 0:
            prepare_run(run_dir, config, resume=False)

    def make_state(restoring: bool) -> TrainState:  # on resume
        # ImageNet weights only for a fresh start: a restored state overwrites them
        return create_train_state(config, total_steps=n_steps, mesh=mesh, load_weights=not restoring)

    done = train_loop(
        run_dir, config, mesh=mesh, train_pipe=train_pipe, evals=evals, step_fn=step_fn, eval_fn=eval_fn,
        state=state, make_state=make_state, resume=resume, progress=progress, log_every=log_every, on_step=on_step,
    )  # fmt: skip
    best, test = done["best"], done["test"]
    return {
        "steps": done["steps"], "best_step": best["step"], "val_accuracy": best["accuracy"],
        "test_accuracy": test["accuracy"], "test_loss": test["loss"],
    }  # fmt: skip


def make_pipelines(
    config: RunConfig, splits: Splits, mesh, *, num_threads: int, num_workers: int
) -> tuple[Pipeline, dict[str, Pipeline]]:
    """The training pipeline (endless, shuffled, augmented) and the 'val' and 'test' evaluation pipelines of a run,
    with its crop, resize and batch size; uint8 batches, normalised on the device by the compiled steps (a quarter of
    the bytes, less host CPU). Each process decodes its own rows of every global batch.

    Raises ValueError if the batch size is not a multiple of the devices of ``mesh``."""
    if config.batch_size % mesh.devices.size:
        raise ValueError(f"batch size {config.batch_size} is not a multiple of the {mesh.devices.size} devices")
    stats = config.normalization
    share = process_share()
    train_pipe = train_pipeline(
        splits.train, batch_size=config.batch_size, seed=config.seed, num_epochs=None, crop=config.crop, stats=stats,
        num_threads=num_threads, normalize=False, num_workers=num_workers, shard=share,
    )  # fmt: skip
    evals = {
        name: eval_pipeline(
            src,
            batch_size=config.batch_size,
            resize=config.resize,
            crop=config.crop,
            stats=stats,
            num_threads=num_threads,
            normalize=False,
            shard=share,
        )  # fmt: skip
        for name, src in (("val", splits.val), ("test", splits.test))
    }
    return train_pipe, evals


def _describe_val(done: int, val: dict, best: dict) -> str:
    return (f"step {done}: val accuracy {val['accuracy']:.4f} loss {val['loss']:.4f}"
            f" (best {best['accuracy']:.4f} at step {best['step']})")  # fmt: skip


def train_loop(
    run_dir: Path,
    config: RunConfig,
    *,
    mesh,
    train_pipe: Pipeline,
    evals: dict[str, Pipeline],
    step_fn: Callable,
    eval_fn: Callable,
    state: TrainState | None,
    make_state: Callable[[bool], TrainState],
    resume: bool,
    progress: bool,
    log_every: int,
    on_step: Callable[[int, TrainState], None] | None,
    is_better: Callable[[dict, dict | None], bool] = _is_better,
    describe_val: Callable[[int, dict, dict], str] = _describe_val,
    desc: str = "train",
    restart: str = "start a new run with another --out",
) -> dict[str, Any]:
    """The training loop of a run whose configuration and first state are ready: steps, training records, validation
    and the best checkpoint, the latest checkpoint every ``config.checkpoint_every`` steps, resume, Ctrl-C, and the
    test of the best model at the end. Checkpoints go to ``run_dir/checkpoints``, records to
    ``run_dir/metrics.jsonl``; whatever the state holds (`TrainState`: its params, model_state and opt_state) is what
    is trained, saved and restored.

    Args:
      state: the initial state of a new run (None on resume).
      make_state: ``make_state(restoring)`` -> the state to start from on resume; ``restoring`` True: only a target
        of the right structure, about to be overwritten by the latest checkpoint.
      step_fn: ``step_fn(state, sharded batch)`` -> (state, metrics with at least loss and accuracy).
      eval_fn: the eval step `evaluate` sums (`delib_jax.train.loop.eval_step`).
      is_better: ``is_better(val, best)``: whether the validation metrics ``val`` beat ``best`` (None: none yet).
      describe_val: the line shown after each validation.
      desc: the progress bar's label.
      restart: how to start again after a divergence (`TrainingDiverged`'s message).

    Returns:
      dict with steps, best (the best validation metrics and their step) and test (the best model's test metrics).
    """
    steps_per_epoch = train_pipe.steps_per_epoch
    n_steps = total_steps(config, steps_per_epoch)
    eval_every = config.eval_every or steps_per_epoch
    lead = jax.process_index() == 0

    with RunCheckpoints(run_dir) as ckpt:
        restoring = resume and ckpt.step("latest") is not None
        if state is None:
            state = make_state(restoring)
        start, best = 0, None
        if restoring:
            state, meta = restore_train_state(ckpt, state, mesh)
            start, best = int(meta["step"]), meta.get("best")
        if resume and lead:
            where = f"from step {start} of {n_steps}" if restoring else "from step 0 (no checkpoint was saved yet)"
            print(f"resuming {run_dir} {where}", file=sys.stderr, flush=True)
        best_step = ckpt.step("best")
        if best_step is not None and best_step > start:  # saved after the latest checkpoint: redone below
            ckpt.best.delete(best_step)
        log = MetricsLog(run_dir / METRICS_FILE, keep_until=start if resume else None, enabled=lead)
        bar = progress_bar(total=n_steps, initial=start, unit="step", desc=desc, disable=not progress or not lead)
        window: list[dict] = []
        t_window = time.perf_counter()
        # the iterator ends at the last step and is closed on any exit: decoding processes leave nothing behind
        batches = train_pipe.iterate(start_step=start, stop_step=n_steps)
        trained = ((state, None), start)  # one store per step: a Ctrl-C leaves the state and its step consistent
        try:
            for step, batch in enumerate(batches, start=start):
                trained = (step_fn(state, shard_batch(batch, mesh)), step + 1)
                (state, metrics), done = trained
                window.append(metrics)
                bar.update(1)
                where = dict(step=done, steps_per_epoch=steps_per_epoch, ckpt=ckpt, restart=restart)
                # windows also end at checkpoints, so a resumed run logs exactly what an uninterrupted one does
                if done % log_every == 0 or done % config.checkpoint_every == 0 or done == n_steps:
                    record = _mean(window)
                    elapsed = time.perf_counter() - t_window
                    record.update(
                        step=done, epoch=done / steps_per_epoch, images_per_s=len(window) * config.batch_size / elapsed
                    )
                    log.write({"split": "train", **record})
                    _check_finite("training loss", record["loss"], **where)
                    bar.set_postfix(loss=f"{record['loss']:.3f}", acc=f"{record['accuracy']:.3f}",
                                    img_s=f"{record['images_per_s']:.0f}")  # fmt: skip
                    window, t_window = [], time.perf_counter()
                if done % eval_every == 0 or done == n_steps:
                    val = evaluate(eval_fn, state, evals["val"], mesh)
                    log.write({"split": "val", "step": done, **val})
                    _check_finite("validation loss", val["loss"], **where)
                    if is_better(val, best):
                        best = {**val, "step": done}
                        ckpt.save("best", done, params=state.params, model_state=state.model_state, meta={"best": best})
                    if lead:
                        bar.write(describe_val(done, val, best))
                if done % config.checkpoint_every == 0 or done == n_steps:
                    if not bool(_all_finite((state.params, state.model_state))):  # never save a NaN model
                        _check_finite("non-finite parameters", None, **where)
                    ckpt.save(
                        "latest", done, params=state.params, model_state=state.model_state, opt_state=state.opt_state,
                        meta={"best": best, "epoch": done / steps_per_epoch},
                    )  # fmt: skip
                if on_step is not None:
                    on_step(done, state)
        except KeyboardInterrupt:
            _save_interrupted(ckpt, trained, best=best, steps_per_epoch=steps_per_epoch, lead=lead)
            raise
        finally:
            getattr(batches, "close", lambda: None)()
        bar.close()
        ckpt.wait()
        best_state = restore_best(ckpt, state, mesh)
        test = evaluate(eval_fn, best_state, evals["test"], mesh)
    log.write({"split": "test", "step": n_steps, "best_step": best["step"], **test})
    return {"steps": n_steps, "best": best, "test": test}


def _save_interrupted(ckpt: RunCheckpoints, trained: tuple, *, best, steps_per_epoch: int, lead: bool) -> None:
    """Ctrl-C: save the training state of the last finished step as 'latest' (unless saved already or not finite)
    and say from which step ``--resume`` continues."""
    (state, _), done = trained
    saved = ckpt.step("latest") or 0
    if done > saved and bool(_all_finite((state.params, state.model_state))):
        ckpt.save(
            "latest", done, params=state.params, model_state=state.model_state, opt_state=state.opt_state,
            meta={"best": best, "epoch": done / steps_per_epoch},
        )  # fmt: skip
        ckpt.wait()
        saved = done
    if lead:
        what = "saved" if saved == done else "not saved (parameters not finite)"
        print(f"\nstep {done} {what}: --resume continues from step {saved}", file=sys.stderr, flush=True)


def _mean(window: list[dict]) -> dict[str, float]:
    stacked = jax.device_get(window)
    return {k: float(np.mean([m[k] for m in stacked])) for k in stacked[0]}


def restore_train_state(ckpt: RunCheckpoints, like: TrainState, mesh) -> tuple[TrainState, dict]:
    """The latest checkpoint as a `TrainState` shaped (and replicated) like ``like``; also its metadata.

    Raises `CheckpointError` (one line naming the checkpoint) for damaged files or metadata."""
    try:
        r = ckpt.restore(
            "latest", params=like.params, model_state=like.model_state, opt_state=like.opt_state,
            sharding=replicated(mesh),
        )  # fmt: skip
    except FileNotFoundError:
        raise
    except Exception as e:  # orbax / tensorstore raise bare Exceptions (and RecursionError for absurd JSON)
        raise _restore_error(ckpt.directory / "latest", "latest", e) from None
    meta = r["meta"]
    problem = _meta_problem(meta, ckpt.step("latest"))
    if problem:
        raise CheckpointError(
            f"checkpoint {ckpt.directory / 'latest'} has damaged metadata ({problem}): delete that folder to resume "
            "from the start, or start a new run"
        )
    step = replicate(np.int32(meta["step"]), mesh)
    state = like.replace(step=step, params=r["params"], model_state=r["model_state"], opt_state=r["opt_state"])
    return state, meta


def _meta_problem(meta: Any, step: int | None) -> str | None:
    """What is wrong with a latest checkpoint's metadata (the JSON `fit` writes), or None."""

    def number(x) -> bool:
        return isinstance(x, (int, float)) and not isinstance(x, bool)

    if not isinstance(meta, dict):
        return f"expected a JSON object, found {type(meta).__name__}"
    if not (isinstance(meta.get("step"), int) and not isinstance(meta["step"], bool) and meta["step"] == step):
        return f"field 'step' must be the checkpoint's step {step}, got {str(meta.get('step'))[:40]}"
    best = meta.get("best")
    if best is not None:
        if not isinstance(best, dict) or not all(number(best.get(k)) for k in ("accuracy", "loss", "step")):
            return "field 'best' must hold the numbers accuracy, loss and step"
        if not (isinstance(best["step"], int) and 0 < best["step"] <= step and math.isfinite(best["loss"])
                and 0 <= best["accuracy"] <= 1):  # fmt: skip
            return "field 'best' holds values out of range"
    return None


def restore_best(ckpt: RunCheckpoints, like: TrainState, mesh) -> TrainState:
    """``like`` with the parameters and model state of the best checkpoint."""
    r = ckpt.restore("best", params=like.params, model_state=like.model_state, sharding=replicated(mesh))
    return like.replace(params=r["params"], model_state=r["model_state"])


__all__ = [
    "DiskFull", "MetricsLog", "Splits", "TrainingDiverged", "checkpoint_bytes", "evaluate", "fit", "is_disk_full",
    "load_splits", "make_pipelines", "prepare_run", "restore_best", "restore_train_state", "run_splits",
    "split_validation",
    "total_steps", "train_loop",
]  # fmt: skip
