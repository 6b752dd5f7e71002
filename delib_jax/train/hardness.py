"""Train the hardness head of an existing run alone, on its frozen classifier (``python -m train.hardness``).

    summary = fit_hardness("runs/cub", dataset="cub", data_dir="/data/CUB_200_2011", steps=2000)
    summary = fit_hardness("runs/cub", resume=True)      # continue after a kill or Ctrl-C

A run imported from torchvision weights has no hardness predictor (``hardness`` 'none'); `fit_hardness` adds a
hardness head on A (`delib_jax.models.hardness_head`) and trains it with the hardness term of the joint loss
(`delib_jax.train.losses`: binary cross-entropy of s towards 1 - p, p the frozen classifier's probability of the true
class), reading A and the logits from the eval-mode classifier without gradients. Only the head's parameters are
optimised; the backbone and the class head are never written, so the run's logits stay bit for bit what they were.
A run that has a head already gets a new one in its place (``retrain=True``); a separate hardness network is out of
scope.

The training runs in ``RUN/hardness_training/`` (its own config.json: the run's configuration with the head's
training hyper-parameters and data; checkpoints of the head alone, latest every ``checkpoint_every`` steps and best by
validation hardness loss; metrics.jsonl), through the same loop as joint training (`delib_jax.train.run.train_loop`:
progress, checkpoints, resume, Ctrl-C). The run itself is untouched until the training ends; then the best head is
committed: the run's 'best' and 'latest' checkpoints are written again, at their steps, with the head beside their
classifier (the optimizer state of 'latest' gains fresh moments for the head, so ``train.cub --resume`` still
continues the run), into a staged copy of ``RUN/checkpoints`` that is swapped with the live one in one rename
(Linux ``renameat2(RENAME_EXCHANGE)``), and then config.json is replaced (atomically) with ``hardness`` 'head'.
A kill at any moment leaves the run loadable: as before (a checkpoint that holds a head config.json does not name
yet loads as the classifier it holds, `delib_jax.checkpoint.load_model`), or with its new head; ``resume=True``
finishes an interrupted commit. Afterwards ``RUN/hardness_training/`` keeps its config.json and metrics.jsonl as
the record of how the head was trained.
"""

from __future__ import annotations

import ctypes
import dataclasses
import errno
import json
import math
import os
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
from flax import nnx

from delib_jax.checkpoint import (
    CHECKPOINT_DIR,
    CONFIG_FILE,
    METRICS_FILE,
    OPTIONED,
    RunCheckpoints,
    RunConfig,
    build_model,
    load_model,
    load_run_config,
    quiet_orbax_leftovers,
    save_run_config,
)
from delib_jax.data import class_correspondence
from delib_jax.models import DeliberativeModel, hardness_head
from delib_jax.train.loop import (
    HEAD_PARAMS,
    HEAD_REST,
    HeadTrainState,
    compile_steps,
    create_head_train_state,
    create_train_state,
    make_mesh,
    make_optimizer,
)
from delib_jax.train.run import (
    Splits,
    _disk_full,
    _remove_unsaved_start,
    is_disk_full,
    make_pipelines,
    prepare_run,
    run_splits,
    total_steps,
    train_loop,
)

HARDNESS_DIR = "hardness_training"  # RUN/hardness_training: the head's training, then its record
COMMIT_DIR = "commit"  # RUN/hardness_training/commit/checkpoints: the run's checkpoints with the new head, staged
STAGED_MARK = "staged_by_train_hardness"  # in the staged checkpoints folder: tells which side of the swap it is on

# The head's training: AdamW with warm-up and cosine decay (a small head on fixed features), the run's batch size,
# checkpoint interval, crop, statistics, seed and validation split.
HEAD_DEFAULTS = dict(optimizer="adamw", lr=1e-3, weight_decay=1e-4, schedule="cosine", warmup_steps=20, epochs=10)
HEAD_FLAGS = ("lr", "batch_size", "epochs", "steps", "checkpoint_every", "eval_every")


def check_run(run_dir: str | Path, *, retrain: bool = False, resume: bool = False) -> RunConfig:
    """The configuration of the run whose hardness head is to be trained, after checking that it can be.

    Raises (one line each): FileNotFoundError for a missing run, config.json or checkpoint, or nothing to resume;
    ValueError for a run with a separate hardness network, a run with a head already (without ``retrain``), an
    unfinished hardness training (without ``resume``), or a corrupt config.json.
    """
    run_dir = Path(run_dir)
    config = load_run_config(run_dir)
    work = run_dir / HARDNESS_DIR
    unfinished = (work / CHECKPOINT_DIR).is_dir()
    if config.hardness == "network":
        raise ValueError(
            f"{run_dir} has a separate hardness network (hardness 'network'): training it alone is not supported; "
            "train.hardness trains a hardness head on A"
        )
    if resume:
        if not (work / CONFIG_FILE).is_file():
            raise FileNotFoundError(
                f"nothing to resume: {run_dir} holds no hardness training ({work}); drop --resume to start one"
            )
        return config
    if unfinished:
        raise ValueError(
            f"{run_dir} holds an unfinished hardness training ({work}): add --resume to continue it, or delete that "
            "folder to start over"
        )
    if config.hardness == "head" and not retrain:
        raise ValueError(f"{run_dir} has a hardness head already: add --retrain to train a new one in its place")
    best = run_dir / CHECKPOINT_DIR / "best"
    if not (best.is_dir() and any(p.name.isdigit() for p in best.iterdir())):
        raise FileNotFoundError(
            f"{run_dir} has no checkpoint yet ({best} holds none): finish its training first (python -m "
            f"train.{config.dataset or 'cub'} --out {run_dir} --resume)"
        )
    return config


def hardness_config(
    run_config: RunConfig,
    *,
    dataset: str,
    data_dir: str | Path,
    synthetic: bool = False,
    data_options: dict | None = None,
    **given: Any,
) -> RunConfig:
    """The configuration of a head's training (``RUN/hardness_training/config.json``): the run's, with a hardness
    head, the data given (``data_options``: how class folders or a TFDS catalog dataset are read, resolved) and the
    training hyper-parameters ``given`` (`HEAD_FLAGS`; None: `HEAD_DEFAULTS`, the run's batch size and checkpoint
    interval, a validation per epoch)."""
    unknown = set(given) - set(HEAD_FLAGS)
    if unknown:
        raise TypeError(f"unknown hardness training options: {', '.join(sorted(unknown))}")
    base = {
        **HEAD_DEFAULTS, "batch_size": run_config.batch_size, "checkpoint_every": run_config.checkpoint_every,
        "eval_every": None, "steps": None,
    }  # fmt: skip
    merged = {**base, **{k: v for k, v in given.items() if v is not None}}
    return dataclasses.replace(
        run_config, hardness="head", dataset=dataset, data_dir=str(Path(data_dir).absolute()),
        synthetic=bool(synthetic), data_options=data_options, **merged,
    )  # fmt: skip


def fit_hardness(
    run_dir: str | Path,
    *,
    dataset: str | None = None,
    data_dir: str | Path | None = None,
    synthetic: bool = False,
    data_options: dict | None = None,
    retrain: bool = False,
    resume: bool = False,
    progress: bool = True,
    log_every: int = 10,
    num_threads: int = 4,
    num_workers: int = 0,
    on_step: Callable[[int, HeadTrainState], None] | None = None,
    **options: Any,
) -> dict[str, Any]:
    """Train a hardness head on the frozen classifier of the run ``run_dir`` and commit it to the run.

    Args:
      run_dir: the run (config.json and a 'best' checkpoint); its classifier is never changed.
      dataset, data_dir, synthetic: the data (default: the run's dataset and folder); its classes are the run's,
        or matched to them (`relabel`). Ignored on resume (the training's config.json is authoritative).
      data_options: how class folders ('folder') or a TFDS catalog dataset ('tfds', its name required) are read
        (`delib_jax.data.load_dataset`; default: the run's when it is its data, else the run's validation fraction
        and seed).
      retrain: replace the head of a run that has one (else ValueError).
      resume: continue the training in ``RUN/hardness_training`` from its latest checkpoint, or finish its commit.
      options: lr, batch_size, epochs, steps, checkpoint_every, eval_every (`hardness_config`).
      progress, log_every, num_threads, num_workers, on_step: as `delib_jax.train.run.fit`.

    Returns:
      dict with steps, best_step, val_hardness_loss (best), test_hardness_loss and test_accuracy (of the committed
      model), wall_s.

    Raises:
      FileNotFoundError, ValueError: `check_run`'s errors; a dataset with another number of classes than the run;
        the data's own errors (`delib_jax.data.DatasetError`, a ValueError). Nothing is written before they are.
      TrainingDiverged, DiskFull: as `fit` (the head's last finite checkpoint stays; the run is untouched).
    """
    t_start = time.perf_counter()
    run_dir = Path(run_dir)
    work = run_dir / HARDNESS_DIR
    run_config = check_run(run_dir, retrain=retrain, resume=resume)
    if resume:
        finished = _finished_summary(work)  # None until the training's test record is written
        if finished is not None and not (work / CHECKPOINT_DIR).is_dir():  # committed already: nothing left to do
            return {**finished, "wall_s": time.perf_counter() - t_start}
        if finished is not None and _finish_interrupted_commit(run_dir, run_config):
            return {**finished, "wall_s": time.perf_counter() - t_start}
        config = prepare_run(work, None, resume=True)
    else:
        dataset = dataset or run_config.dataset
        if dataset is None:
            raise ValueError(f"{run_dir} records no dataset (an imported run): give the dataset (--dataset cub, "
                             "ade20k or folder, or --tfds NAME)")  # fmt: skip
        if data_dir is None:
            if dataset != run_config.dataset or run_config.data_dir is None:
                raise ValueError(f"no data given for {run_dir}: give the {dataset} folder (--data-dir)")
            data_dir, synthetic = run_config.data_dir, synthetic or run_config.synthetic
        data_options = _data_options(run_config, dataset, data_dir, data_options)
        config = hardness_config(run_config, dataset=dataset, data_dir=data_dir, synthetic=synthetic,
                                 data_options=data_options, **options)  # fmt: skip
    existed = work.exists()
    quiet_orbax_leftovers()
    try:
        summary = _fit_hardness(run_dir, run_config, config, resume=resume, progress=progress, log_every=log_every,
                                num_threads=num_threads, num_workers=num_workers, on_step=on_step)  # fmt: skip
    except Exception as e:
        full = is_disk_full(e)
        if not resume:
            _remove_unsaved_start(work, existed)
        if full:
            raise _disk_full(work, config, resumable=(work / CONFIG_FILE).is_file()) from None
        raise
    return {**summary, "wall_s": time.perf_counter() - t_start}


def _data_options(run_config: RunConfig, dataset: str, data_dir: str | Path, given: dict | None) -> dict | None:
    """The resolved `load_dataset` options of the head's data: None for CUB / ADE20K; for class folders and TFDS
    catalog datasets ``given`` over the run's own (its data) or its validation fraction and seed, read once to
    resolve them (a catalog dataset's version and features) and to check the data before anything is written."""
    if dataset not in OPTIONED:
        if given:
            raise ValueError(f"{dataset} takes no dataset options, got {', '.join(sorted(given))}")
        return None
    from delib_jax.data import load_dataset

    same = dataset == run_config.dataset and Path(data_dir).absolute() == Path(run_config.data_dir or "").absolute()
    base = dict(run_config.data_options or {}) if same else {"val_fraction": run_config.val_fraction,
                                                              "seed": run_config.seed}  # fmt: skip
    if given and "name" in given and base.get("name") and given["name"] != base["name"]:
        base = {k: v for k, v in base.items() if k in ("val_fraction", "test_fraction", "seed")}
    ds = load_dataset(dataset, data_dir, options={**base, **(given or {})})
    return ds.options


def relabel(splits: Splits, model_names: Sequence[str], title: str, run_dir: Path) -> tuple[Splits, str]:
    """``splits`` with labels that are the classifier's class indices, and a line to say how they were matched ("" when
    the classes are the classifier's): `delib_jax.data.class_correspondence` (by name, else by index where the
    counts agree, else ValueError)."""
    mapping, note = class_correspondence(splits.class_names, model_names, title, f"the classifier of {run_dir}")
    if mapping is None:
        return splits, note
    moved = {f: dataclasses.replace(getattr(splits, f), labels=mapping[getattr(splits, f).labels])
             for f in ("train", "val", "test")}  # fmt: skip
    return dataclasses.replace(splits, **moved, class_names=[str(model_names[k]) for k in mapping]), note


def _fit_hardness(
    run_dir: Path,
    run_config: RunConfig,
    config: RunConfig,
    *,
    resume: bool,
    progress: bool,
    log_every: int,
    num_threads: int,
    num_workers: int,
    on_step: Callable | None,
) -> dict[str, Any]:
    """`fit_hardness` once both configurations are known: the data, the class count and the classifier are checked
    before the training's config.json is written."""
    work = run_dir / HARDNESS_DIR
    splits = run_splits(config)
    splits, note = relabel(splits, run_config.class_names, f"{config.data_dir} ({config.dataset})", run_dir)
    if note and not resume:
        print(f"note: {note}", file=sys.stderr)
    mesh = make_mesh()
    train_pipe, evals = make_pipelines(config, splits, mesh, num_threads=num_threads, num_workers=num_workers)
    n_steps = total_steps(config, train_pipe.steps_per_epoch)
    step_fn, eval_fn = compile_steps(mesh, pixel_stats=config.normalization, head_only=True)

    def make_state(restoring: bool = False) -> HeadTrainState:  # noqa: ARG001 -- the head is small: always built
        return create_head_train_state(head_model(run_dir, config), config, total_steps=n_steps, mesh=mesh)

    state = None
    if not resume:
        state = make_state()  # the run's classifier read before anything is written
        for name in (CONFIG_FILE, METRICS_FILE):  # the record of an earlier head's training (retrain)
            (work / name).unlink(missing_ok=True)
        prepare_run(work, config, resume=False)
    done = train_loop(
        work, config, mesh=mesh, train_pipe=train_pipe, evals=evals, step_fn=step_fn, eval_fn=eval_fn, state=state,
        make_state=make_state, resume=resume, progress=progress, log_every=log_every, on_step=on_step,
        is_better=_lower_hardness_loss, describe_val=_describe_val, desc="hardness",
        restart=f"delete {work} and start again",
    )  # fmt: skip
    commit(run_dir, run_config, config)
    best, test = done["best"], done["test"]
    return {
        "steps": done["steps"], "best_step": best["step"], "val_hardness_loss": best["hardness_loss"],
        "test_hardness_loss": test["hardness_loss"], "test_accuracy": test["accuracy"],
    }  # fmt: skip


def head_model(run_dir: Path, config: RunConfig) -> DeliberativeModel:
    """The run's best classifier (eval mode) with a freshly initialised hardness head of ``config`` (seed
    ``config.seed``) in place of the one it had, if any."""
    model, _ = load_model(run_dir, which="best")
    in_channels = nnx.eval_shape(lambda: build_model(config)).hardness_head.in_channels
    head = hardness_head(in_channels, hidden=config.hardness_hidden, rngs=nnx.Rngs(config.seed))
    model = DeliberativeModel(model.backbone, model.classifier, arch=model.arch, hardness_head=head)
    model.eval()
    return model


def _lower_hardness_loss(val: dict, best: dict | None) -> bool:
    """The head with the lower validation hardness loss is better (the classifier's accuracy does not change)."""
    if not math.isfinite(val["hardness_loss"]):
        return False
    return best is None or val["hardness_loss"] < best["hardness_loss"]


def _describe_val(done: int, val: dict, best: dict) -> str:
    return (f"step {done}: val hardness loss {val['hardness_loss']:.4f} (best {best['hardness_loss']:.4f} at step "
            f"{best['step']}; classifier accuracy {val['accuracy']:.4f})")  # fmt: skip


# ---------------------------------------------------------------------------------------------------- commit


def commit(run_dir: Path, run_config: RunConfig, config: RunConfig) -> None:
    """Put the best head of ``RUN/hardness_training`` into the run: its checkpoints (staged, then swapped in), then
    config.json (``hardness`` 'head'); then remove the training's checkpoints. Safe to repeat after a kill."""
    work = run_dir / HARDNESS_DIR
    live, staged = run_dir / CHECKPOINT_DIR, work / COMMIT_DIR / CHECKPOINT_DIR
    if not _swapped(live, staged):
        shutil.rmtree(work / COMMIT_DIR, ignore_errors=True)
        _stage(run_dir, run_config, config, work / COMMIT_DIR)
        (staged / STAGED_MARK).write_text("the run's checkpoints with a new hardness head (python -m train.hardness)\n")
        _exchange(live, staged)
    _finish(run_dir, run_config)


def _swapped(live: Path, staged: Path) -> bool:
    """Whether the staged checkpoints are the live ones already (a swap by two renames cut between them is
    completed here)."""
    if not live.exists() and (staged / STAGED_MARK).is_file():
        staged.rename(live)
    return (live / STAGED_MARK).is_file()


def _finish(run_dir: Path, run_config: RunConfig) -> None:
    """After the swap: config.json says 'head' (one atomic replace), then the staging and the head's training
    checkpoints go (its config.json and metrics.jsonl stay as the record)."""
    save_run_config(run_dir, dataclasses.replace(run_config, hardness="head"))
    work = run_dir / HARDNESS_DIR
    (run_dir / CHECKPOINT_DIR / STAGED_MARK).unlink(missing_ok=True)
    shutil.rmtree(work / COMMIT_DIR, ignore_errors=True)
    shutil.rmtree(work / CHECKPOINT_DIR, ignore_errors=True)


def _finish_interrupted_commit(run_dir: Path, run_config: RunConfig) -> bool:
    """On resume: finish a commit a kill cut short after its swap (True), else leave everything as it is (False)."""
    work = run_dir / HARDNESS_DIR
    if not _swapped(run_dir / CHECKPOINT_DIR, work / COMMIT_DIR / CHECKPOINT_DIR):
        return False
    _finish(run_dir, run_config)
    print(f"finished committing the hardness head to {run_dir}", file=sys.stderr)
    return True


def _stage(run_dir: Path, run_config: RunConfig, config: RunConfig, root: Path) -> None:
    """Write the run's 'best' and 'latest' checkpoints (those it has) again into ``root/checkpoints``, at their steps
    and with their metadata, with the best trained head beside the classifier: every array of the run's checkpoint
    as it is, the head's from the training's best checkpoint, and fresh optimizer moments for the head in 'latest'
    (when it holds an optimizer state; the step count stays the run's)."""
    new_config = dataclasses.replace(run_config, hardness="head")
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    # the structures: the run's checkpoint as it is, the head alone, and the whole new run (shapes only)
    _, old_params, old_rest = nnx.split(nnx.eval_shape(lambda: build_model(run_config)), nnx.Param, ...)
    _, head_params, head_rest, _ = nnx.split(nnx.eval_shape(lambda: build_model(config)), HEAD_PARAMS, HEAD_REST, ...)
    template = jax.eval_shape(lambda: create_train_state(new_config, total_steps=1, load_weights=False))
    tx = make_optimizer(run_config, 1)  # the run's optimizer (its state's structure does not depend on the steps)
    with RunCheckpoints(run_dir / HARDNESS_DIR, create=False, async_save=False) as trained:
        head = trained.restore("best", params=head_params, model_state=head_rest, sharding=device)
    head_opt = tx.init(head["params"])  # fresh moments (zeros) for the new head
    with RunCheckpoints(run_dir, create=False, async_save=False) as old, RunCheckpoints(root, async_save=False) as new:
        for which in ("best", "latest"):
            step = old.step(which)
            if step is None:  # an imported run has no 'latest'
                continue
            with_opt = which == "latest" and (old.directory / which / str(step) / "opt_state").is_dir()
            r = old.restore(
                which, params=old_params, model_state=old_rest, sharding=device,
                opt_state=jax.eval_shape(tx.init, old_params) if with_opt else None,
            )  # fmt: skip
            new.save(
                which, step, meta=r["meta"],
                params=_graft(template.params, _flat(r["params"]), _flat(head["params"])),
                model_state=_graft(template.model_state, _flat(r["model_state"]), _flat(head["model_state"])),
                opt_state=_graft(template.opt_state, _flat(r["opt_state"]), _flat(head_opt)) if with_opt else None,
            )  # fmt: skip


def _key_names(path) -> list[str]:
    return [str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path]


def _flat(tree: Any) -> dict[tuple[str, ...], Any]:
    """{path: leaf} of ``tree``, paths as tuples of key names."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {tuple(_key_names(p)): x for p, x in flat}


def _graft(template: Any, run: dict, head: dict) -> Any:
    """``template``'s structure (shapes only) filled leaf by leaf: a hardness head's leaves from ``head``, every
    other leaf from ``run`` (flat {path: leaf} dicts, `_flat`), of the template's shape and dtype; ValueError if the
    leaf is missing."""

    def pick(path, like):
        key = tuple(_key_names(path))
        for flat in (head,) if "hardness_head" in key else (run,):
            if key in flat:
                x = flat[key]
                if tuple(x.shape) != tuple(like.shape) or x.dtype != like.dtype:
                    raise ValueError(f"cannot add the hardness head: {'/'.join(key)} is {x.dtype}{tuple(x.shape)} "
                                     f"in the run, {like.dtype}{tuple(like.shape)} in its model")  # fmt: skip
                return x
        raise ValueError(f"cannot add the hardness head: the run's checkpoint has no {'/'.join(key)}")

    return jax.tree_util.tree_map_with_path(pick, template)


_RENAME_EXCHANGE = 2  # linux/fs.h
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> None:
    """Swap the directories ``a`` and ``b`` in one step (Linux ``renameat2`` with RENAME_EXCHANGE). Where that is
    not available, two renames: ``a`` aside into ``b``'s folder, then ``b`` to ``a`` (a kill between them leaves
    ``a`` missing until `commit` or ``--resume`` completes the swap, `_swapped`)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        renameat2 = None
    if renameat2 is not None:
        if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
            return
        err = ctypes.get_errno()
        if err not in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EPERM):
            raise OSError(err, os.strerror(err), str(a), None, str(b))
    aside = b.parent / "previous"
    shutil.rmtree(aside, ignore_errors=True)
    a.rename(aside)
    b.rename(a)
    aside.rename(b)


def _finished_summary(work: Path) -> dict[str, Any] | None:
    """The summary of a finished head's training, from its metrics.jsonl; None without its test record."""
    records = []
    path = work / METRICS_FILE
    if path.is_file():
        for line in path.read_text(errors="replace").splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    test = next((r for r in reversed(records) if isinstance(r, dict) and r.get("split") == "test"), None)
    if test is None:
        return None
    best_step = test.get("best_step")
    val = next((r for r in records if isinstance(r, dict) and r.get("split") == "val" and r.get("step") == best_step),
               {})  # fmt: skip
    nan = float("nan")
    return {
        "steps": test.get("step", 0), "best_step": best_step, "val_hardness_loss": val.get("hardness_loss", nan),
        "test_hardness_loss": test.get("hardness_loss", nan), "test_accuracy": test.get("accuracy", nan),
        "already_done": True,
    }  # fmt: skip


__all__ = [
    "COMMIT_DIR", "HARDNESS_DIR", "HEAD_DEFAULTS", "HEAD_FLAGS", "check_run", "commit", "fit_hardness",
    "hardness_config", "head_model",
]  # fmt: skip
