"""Command lines ``python -m train.cub``, ``python -m train.ade20k`` and ``python -m train.images`` (class folders or
a TFDS catalog dataset): flags -> `RunConfig` -> `fit`; and ``python -m train.hardness``: a run's hardness head
alone -> `delib_jax.train.hardness.fit_hardness`.

Exit status: 0 done, 2 the run could not start or continue as asked (bad flags, missing data, nothing to resume,
missing weights file, ...) or diverged (NaN loss): one line on stderr; 130 interrupted (resume with ``--resume``).
"""

from __future__ import annotations

import argparse
import math
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

from delib_jax._command import UsageError
from delib_jax._multihost import add_flags, init_distributed
from delib_jax.models import ARCHS

DATASETS = {
    "cub": dict(
        title="CUB-200-2011", folder="CUB_200_2011", synthetic="synthetic birds (10 species)",
        url="https://www.vision.caltech.edu/datasets/cub_200_2011/",
    ),
    "ade20k": dict(
        title="ADE20K scene parsing", folder="ADEChallengeData2016", synthetic="synthetic scenes (8 scene classes)",
        url="http://sceneparsing.csail.mit.edu/",
    ),
}  # fmt: skip

# Defaults by architecture family: the authors' recipe for the ImageNet backbones; for the small CNN (tests, synthetic
# data) AdamW with warm-up + cosine, which trains from scratch in a few minutes on two CPU cores, at the synthetic
# birds' full 128 px (a 16x16 feature grid: coarser grids separate the parts less well), as `delib demo` does.
LARGE_DEFAULTS = dict(
    optimizer="sgd", lr=1e-3, momentum=0.9, weight_decay=1e-4, schedule="step", warmup_steps=0, batch_size=64,
    epochs=60, crop=224, resize=256, checkpoint_every=500,
)  # fmt: skip
SMALL_DEFAULTS = dict(
    optimizer="adamw", lr=3e-3, momentum=0.9, weight_decay=1e-4, schedule="cosine", warmup_steps=20, batch_size=32,
    epochs=20, crop=128, resize=146, checkpoint_every=50,
)  # fmt: skip
TRAINING_FLAGS = (
    "arch", "hardness", "optimizer", "lr", "momentum", "weight_decay", "schedule", "warmup_steps", "batch_size",
    "epochs", "steps", "crop", "resize", "checkpoint_every", "eval_every", "val_fraction", "seed", "weights",
)  # fmt: skip


IMAGES = "images"  # python -m train.images: class folders ('folder') or a TFDS catalog dataset ('tfds')


def build_parser(dataset: str) -> argparse.ArgumentParser:
    if dataset == IMAGES:
        p = argparse.ArgumentParser(
            prog="python -m train.images",
            description=(
                "Train a classifier jointly with its hardness predictor on your own labelled images: class folders "
                "(DIR/CLASS/*.jpg, or DIR/{train,val,test}/CLASS/*.jpg) or a TensorFlow Datasets catalog dataset "
                "prepared in a local TFDS data folder; checkpoints (latest and best by validation), metrics.jsonl and "
                "config.json (with the class names and the splits) go to --out.\n"
                "Example: python -m train.images --data-dir /data/pets --arch resnet50 --weights "
                "resnet50.safetensors --out runs/pets\n"
                "Example: python -m train.images --tfds beans --tfds-data-dir ~/tensorflow_datasets --out runs/beans"
            ),
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        data = p.add_argument_group("data and run")
        data.add_argument(
            "--data-dir",
            type=Path,
            help="a folder of class folders (DIR/CLASS/*.jpg), or of split "
            "folders of class folders (DIR/train/CLASS/*.jpg, val, test)",
        )
        _add_tfds_flags(data)
        data.add_argument("--test-fraction", type=float,
                          help="where the data gives no test split: each class's share carved for test (default "
                               "0.1; seeded by --seed, recorded in the run)")  # fmt: skip
        data.set_defaults(synthetic=False)
    else:
        info = DATASETS[dataset]
        p = argparse.ArgumentParser(
            prog=f"python -m train.{dataset}",
            description=(
                f"Train a classifier jointly with its hardness predictor on {info['title']}; checkpoints (latest and "
                "best by validation), metrics.jsonl and config.json go to --out.\n"
                f"Example: python -m train.{dataset} --data-dir /data/{info['folder']} --arch resnet50 "
                f"--weights resnet50.safetensors --out runs/{dataset}_resnet50\n"
                f"Quick start: python -m train.{dataset} --synthetic --out /tmp/run_{dataset}"
            ),
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        data = p.add_argument_group("data and run")
        data.add_argument(
            "--data-dir",
            type=Path,
            help=f"the {info['folder']} folder (or its parent), or a TFDS build "
            "of it (python -m delib_jax.data.tfds build)",
        )
        data.add_argument("--synthetic", action="store_true",
                          help=f"train on {info['synthetic']}, generated into --data-dir (default "
                               "OUT/synthetic_data) if absent")  # fmt: skip
    data.add_argument("--out", type=Path, help="run directory (required)")
    data.add_argument("--resume", action="store_true", help="continue the run in --out from its latest checkpoint")
    data.add_argument(
        "--threads", type=int, default=4, help="image decoding threads (default 4; in each --workers process if any)"
    )
    data.add_argument(
        "--workers",
        type=int,
        default=0,
        help="image decoding processes for the training input (default 0: threads only); on many "
        "cores, processes escape the interpreter lock that caps threads near 2,200 images/s",
    )
    data.add_argument("--no-progress", action="store_true", help="no progress bar")
    model = p.add_argument_group("model")
    model.add_argument("--arch", choices=tuple(ARCHS), help="backbone (default: small with --synthetic, else resnet50)")
    model.add_argument("--hardness", choices=("head", "network", "none"),
                       help="hardness predictor: a head on A (default), a separate network, or none")  # fmt: skip
    model.add_argument(
        "--weights", type=Path, help="torchvision ImageNet weights (.safetensors/.npz/.pth) to start from"
    )
    opt = p.add_argument_group("optimisation (defaults: the authors' recipe; AdamW + cosine for --arch small)")
    length = opt.add_mutually_exclusive_group()
    length.add_argument("--epochs", type=int, help="training epochs (default 60; 20 for small)")
    length.add_argument("--steps", type=int, help="training steps (instead of --epochs)")
    opt.add_argument("--batch-size", type=int, help="global batch size, split over all devices (default 64; 32 small)")
    opt.add_argument("--lr", type=float, help="peak learning rate (default 1e-3 SGD; 3e-3 AdamW for small)")
    opt.add_argument("--optimizer", choices=("sgd", "adamw"))
    opt.add_argument("--schedule", choices=("step", "cosine"), help="step: x0.1 at 2/3; cosine: warm-up + cosine")
    opt.add_argument("--warmup-steps", type=int)
    opt.add_argument("--momentum", type=float)
    opt.add_argument("--weight-decay", type=float)
    opt.add_argument("--crop", type=int, help="input side (default 224; 128 for small)")
    opt.add_argument(
        "--resize",
        type=int,
        help="test-time shorter side before the centre crop (default 256; 146 "
        "small; crop * 256/224 when only --crop is given)",
    )
    opt.add_argument("--seed", type=int, help="initialisation, validation split, shuffling, augmentation (default 0)")
    opt.add_argument("--val-fraction", type=float, help="training images held out for validation (default 0.1)")
    opt.add_argument("--checkpoint-every", type=int, help="steps between checkpoints (default 500; 50 for small)")
    opt.add_argument("--eval-every", type=int, help="steps between validations (default: every epoch)")
    add_flags(
        p,
        "each process decodes its own rows of every global batch (--batch-size is the total over all processes), "
        "process 0 writes config.json and metrics.jsonl, all write the checkpoints together: give every process "
        "the same --data-dir and --out, on storage they share",
    )
    return p


def missing_data_message(dataset: str) -> str:
    if dataset not in DATASETS:  # train.images, or its kinds of data ('folder', 'tfds')
        return ("no dataset given: point --data-dir at a folder of class folders (DIR/CLASS/*.jpg), or give --tfds "
                "NAME of a TFDS catalog dataset prepared in --tfds-data-dir")  # fmt: skip
    info = DATASETS[dataset]
    return (
        f"no dataset given: point --data-dir at the {info['folder']} folder of {info['title']} (download: "
        f"{info['url']}), e.g. --data-dir /data/{info['folder']}, or pass --synthetic to train on the "
        f"{info['synthetic']} generated on the fly."
    )


def _positive(args: argparse.Namespace) -> None:
    for name in ("epochs", "steps", "batch_size", "crop", "resize", "checkpoint_every", "eval_every", "threads"):
        v = getattr(args, name)
        if v is not None and v < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {v}")
    for name in ("warmup_steps", "seed", "workers"):
        v = getattr(args, name)
        if v is not None and v < 0:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 0, got {v}")
    if args.lr is not None and not (args.lr > 0 and math.isfinite(args.lr)):
        raise UsageError(f"--lr must be positive and finite, got {args.lr}")
    for name in ("val_fraction", "test_fraction"):
        v = getattr(args, name, None)
        if v is not None and not 0 < v < 1:  # False for NaN
            raise UsageError(f"--{name.replace('_', '-')} must lie in (0, 1), got {v}")
    if args.momentum is not None and not 0 <= args.momentum < 1:  # False for NaN
        raise UsageError(f"--momentum must lie in [0, 1), got {args.momentum}")
    if args.weight_decay is not None and not (args.weight_decay >= 0 and math.isfinite(args.weight_decay)):
        raise UsageError(f"--weight-decay must be finite and >= 0, got {args.weight_decay}")


def _check_crop(args: argparse.Namespace) -> None:
    """--crop at least the architecture's minimum (a smaller input leaves an empty feature grid: NaN losses)."""
    from delib_jax.checkpoint import crop_fits, min_crop

    arch = args.arch or ("small" if args.synthetic else "resnet50")
    if args.crop is not None and not crop_fits(arch, args.crop):
        raise UsageError(
            f"--crop {args.crop} is too small for --arch {arch} (its feature grid would be empty): use --crop "
            f"{min_crop(arch)} or more"
        )


def _check_out(out: Path) -> None:
    """--out must be a folder that exists or can be created (tried, then removed: the run creates it when it starts)."""
    if out.exists():
        if not out.is_dir():
            raise UsageError(f"--out {out} is a file: choose a folder")
        return
    parent = out.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise UsageError(f"--out {out} cannot be created: {parent} is a file")
    try:
        out.mkdir(parents=True)
    except OSError as e:
        raise UsageError(f"--out {out} cannot be created ({e.strerror or e}): choose another folder") from None
    out.rmdir()


def ensure_synthetic(dataset: str, data_dir: Path) -> Path:
    """Generate the default synthetic dataset into ``data_dir`` unless it is there (atomic: built beside, renamed)."""
    from delib_jax.data import synthetic

    folder = DATASETS[dataset]["folder"]
    marker = "images.txt" if dataset == "cub" else "sceneCategories.txt"
    if (data_dir / folder / marker).is_file():
        return data_dir
    if _holds_other_data(dataset, data_dir):
        raise UsageError(f"{data_dir} exists but holds no synthetic {folder}: choose an empty or new --data-dir")
    partial = data_dir.with_name(data_dir.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    print(f"generating the synthetic dataset into {data_dir} ...", file=sys.stderr)
    (synthetic.make_cub if dataset == "cub" else synthetic.make_ade20k)(partial)
    if data_dir.exists():
        data_dir.rmdir()
    data_dir.parent.mkdir(parents=True, exist_ok=True)
    partial.rename(data_dir)
    return data_dir


def _synthetic_once(dataset: str, data_dir: Path) -> Path:
    """`ensure_synthetic` by process 0 while the other processes (if any) wait; they check the folder as process 0
    does, so that a folder it refuses stops them too."""
    import jax

    from delib_jax._multihost import barrier

    if jax.process_index() == 0:
        ensure_synthetic(dataset, data_dir)
    elif _holds_other_data(dataset, data_dir):
        raise UsageError(f"{data_dir} exists but holds no synthetic {DATASETS[dataset]['folder']}: choose an empty or "
                         "new --data-dir")  # fmt: skip
    barrier("delib_jax: synthetic data ready")
    return data_dir


def _holds_other_data(dataset: str, data_dir: Path) -> bool:
    """Whether ``data_dir`` holds something other than the synthetic dataset (which `ensure_synthetic` refuses)."""
    marker = "images.txt" if dataset == "cub" else "sceneCategories.txt"
    if (data_dir / DATASETS[dataset]["folder"] / marker).is_file():
        return False
    return data_dir.exists() and any(data_dir.iterdir())


def images_data(args: argparse.Namespace) -> tuple[str, Path, dict]:
    """``python -m train.images``'s data: (kind 'folder' or 'tfds', path, `load_dataset` options) from the flags."""
    if args.tfds and args.data_dir is not None:
        raise UsageError("give --data-dir (class folders) or --tfds NAME (a TFDS catalog dataset), not both")
    given = [
        f for f in ("tfds_data_dir", "image_feature", "label_feature", "tfds_split") if getattr(args, f) is not None
    ]
    if given and not args.tfds:
        raise UsageError(f"--{given[0].replace('_', '-')} goes with --tfds NAME (a TFDS catalog dataset)")
    options = {"val_fraction": 0.1 if args.val_fraction is None else args.val_fraction,
               "test_fraction": 0.1 if args.test_fraction is None else args.test_fraction,
               "seed": args.seed or 0}  # fmt: skip
    if not args.tfds:
        return "folder", Path(args.data_dir), options
    from delib_jax.data.catalog import default_data_dir

    return "tfds", args.tfds_data_dir or default_data_dir(), {"name": args.tfds, **_tfds_features(args), **options}


def _add_tfds_flags(group) -> None:
    """--tfds, --tfds-data-dir, --image-feature, --label-feature and --tfds-split: a TFDS catalog dataset as the
    data, instead of --data-dir (read by `images_data`, `_tfds_features`)."""
    group.add_argument("--tfds", metavar="NAME[:VERSION]",
                       help="a TFDS catalog dataset (NAME[/CONFIG][:VERSION]), prepared in --tfds-data-dir in "
                            "ArrayRecord format (tfds build NAME --file_format array_record), instead of --data-dir; "
                            "nothing is downloaded")  # fmt: skip
    group.add_argument(
        "--tfds-data-dir", type=Path, help="the TFDS data folder (default: $TFDS_DATA_DIR or ~/tensorflow_datasets)"
    )
    group.add_argument("--image-feature", help="with --tfds: the image feature (default: found from the dataset)")
    group.add_argument("--label-feature", help="with --tfds: the class-label feature (default: found from the dataset)")
    group.add_argument("--tfds-split", action="append", metavar="OURS=THEIRS",
                       help="with --tfds: take the dataset's split THEIRS as train, val or test (repeat for each; "
                            "default: its splits by name, the rest left out)")  # fmt: skip


def _tfds_splits(args: argparse.Namespace) -> dict[str, str] | None:
    """``--tfds-split OURS=THEIRS`` (repeated) -> {ours: theirs}, ours one of train, val, test; `UsageError` (one
    line) otherwise; None when not given."""
    from delib_jax.data import split_name

    if not args.tfds_split:
        return None
    splits: dict[str, str] = {}
    for text in args.tfds_split:
        ours, eq, theirs = text.partition("=")
        ours = split_name(ours.strip())
        if not eq or not theirs.strip() or ours is None:
            raise UsageError(f"--tfds-split {text!r} is not OURS=THEIRS with OURS train, val or test (e.g. test=extra)")
        if ours in splits:
            raise UsageError(f"--tfds-split names {ours} twice: give each of train, val and test once")
        splits[ours] = theirs.strip()
    return splits


def _tfds_features(args: argparse.Namespace) -> dict:
    """--image-feature, --label-feature and --tfds-split as `load_dataset` options (those given)."""
    out = {k: getattr(args, k) for k in ("image_feature", "label_feature") if getattr(args, k) is not None}
    splits = _tfds_splits(args)
    return out if splits is None else {**out, "splits": splits}


def _check_images_resume(args: argparse.Namespace, stored) -> None:
    """``train.images --resume``: the data flags given must name the run's data."""
    options = stored.data_options or {}
    conflicts = []
    from delib_jax.data.catalog import names_same

    if args.tfds is not None and (stored.dataset != "tfds" or not names_same(args.tfds, options.get("name", ""))):
        conflicts.append(f"--tfds {args.tfds} (the run has {options.get('name') or 'class folders'})")
    if args.tfds_data_dir is not None and Path(args.tfds_data_dir).expanduser().absolute() != Path(stored.data_dir):
        conflicts.append(f"--tfds-data-dir {args.tfds_data_dir} (the run has {stored.data_dir})")
    for name in ("test_fraction", "image_feature", "label_feature"):
        v = getattr(args, name)
        if v is not None and v != options.get(name):
            conflicts.append(f"--{name.replace('_', '-')} {v} (the run has {options.get(name)})")
    splits = _tfds_splits(args)
    if splits is not None and splits != options.get("splits"):
        given = " ".join(f"{k}={v}" for k, v in splits.items())
        conflicts.append(f"--tfds-split {given} (the run has {options.get('splits')})")
    if conflicts:
        raise UsageError("--resume continues the run as configured; drop or fix " + ", ".join(conflicts))


def make_config(dataset: str, args: argparse.Namespace):
    """A new run's `RunConfig` from the flags (dataset read for its class names; for ``train.images`` also its
    splits, recorded in ``data_options``)."""
    from delib_jax.checkpoint import RunConfig
    from delib_jax.data import IMAGENET_STATS, class_names, load_dataset
    from delib_jax.data.transforms import CUB_STATS

    arch = args.arch or ("small" if args.synthetic else "resnet50")
    defaults = SMALL_DEFAULTS if arch == "small" else LARGE_DEFAULTS
    given = {k: getattr(args, k) for k in TRAINING_FLAGS if getattr(args, k) is not None}
    merged = {**defaults, "hardness": "head", "seed": 0, "val_fraction": 0.1, **given, "arch": arch}
    if "steps" in given:
        merged.pop("epochs", None)
    if "crop" in given and "resize" not in given:  # keep the crop/resize ratio of 224/256
        merged["resize"] = round(merged["crop"] * 256 / 224)
    kind, path, options = images_data(args) if dataset == IMAGES else (dataset, Path(args.data_dir), None)
    ds = load_dataset(kind, path, options=options, report=lambda line: print(line, file=sys.stderr))
    names = list(class_names(ds))
    stats = CUB_STATS if dataset == "cub" else IMAGENET_STATS
    weights = str(Path(args.weights).absolute()) if args.weights else None
    return RunConfig(
        num_classes=len(names), class_names=names, dataset=kind, mean=stats.mean, std=stats.std,
        data_dir=str(Path(path).expanduser().absolute()), synthetic=bool(args.synthetic),
        data_options=getattr(ds, "options", None), **{**merged, "weights": weights},
    )  # fmt: skip


def check_resume_flags(args: argparse.Namespace, stored, names: Sequence[str] = TRAINING_FLAGS) -> None:
    """Flags given with --resume (``names``, and --data-dir, --dataset) must agree with the run's configuration."""
    conflicts = []
    for name in names:
        v = getattr(args, name)
        if v is None:
            continue
        if name == "weights":
            v = str(Path(v).absolute())
        if v != getattr(stored, name):
            conflicts.append(f"--{name.replace('_', '-')} {v} (the run has {getattr(stored, name)})")
    if args.data_dir is not None and Path(args.data_dir).absolute() != Path(stored.data_dir):
        conflicts.append(f"--data-dir {args.data_dir} (the run has {stored.data_dir})")
    if getattr(args, "dataset", None) is not None and args.dataset != stored.dataset:
        conflicts.append(f"--dataset {args.dataset} (the run has {stored.dataset})")
    if conflicts:
        raise UsageError("--resume continues the run as configured; drop or fix " + ", ".join(conflicts))


def _check_command(dataset: str, stored, out: Path) -> None:
    """``--resume`` with the command that trained the run (train.images for class folders and TFDS catalog data)."""
    command = IMAGES if stored.dataset in ("folder", "tfds") else stored.dataset
    if command != dataset:
        raise UsageError(f"{out} was trained on {stored.dataset} data: continue it with python -m "
                         f"train.{command} --out {out} --resume")  # fmt: skip


def run(dataset: str, argv: Sequence[str] | None) -> int:
    args = build_parser(dataset).parse_args(argv)
    _positive(args)
    if not args.resume:
        _check_crop(args)
    if not args.resume and not args.synthetic and args.data_dir is None and not getattr(args, "tfds", None):
        raise UsageError(missing_data_message(dataset))
    if args.out is None:
        raise UsageError("--out RUN_DIR is required (where config.json, checkpoints/ and metrics.jsonl go)")
    _check_out(args.out)
    if args.weights is not None and not Path(args.weights).is_file():
        raise UsageError(f"--weights {args.weights}: no such file")
    from delib_jax.checkpoint import load_run_config
    from delib_jax.train.run import fit

    if args.resume:
        if not (args.out / "config.json").is_file():
            raise UsageError(f"nothing to resume: {args.out} holds no training run (no config.json); drop --resume "
                             "to start one")  # fmt: skip
        stored = load_run_config(args.out)
        _check_command(dataset, stored, args.out)
        check_resume_flags(args, stored)
        if dataset == IMAGES:
            _check_images_resume(args, stored)
        init_distributed(args)
        if stored.synthetic:
            _synthetic_once(dataset, Path(stored.data_dir))
        summary = fit(
            args.out, resume=True, progress=not args.no_progress, num_threads=args.threads, num_workers=args.workers
        )
    else:
        if (args.out / "config.json").exists():
            raise UsageError(f"{args.out} already holds a run: add --resume to continue it or choose another --out")
        if args.weights is not None:  # a bad file: its one-line error before anything else is printed or made
            from delib_jax.models import read_state_dict

            read_state_dict(args.weights)
        if args.data_dir is not None and not args.synthetic and not Path(args.data_dir).exists():
            raise UsageError(f"--data-dir {args.data_dir} does not exist. " + missing_data_message(dataset))
        init_distributed(args)
        if args.synthetic:
            args.data_dir = _synthetic_once(dataset, args.data_dir or args.out / "synthetic_data")
        config = make_config(dataset, args)
        summary = fit(
            args.out, config, progress=not args.no_progress, num_threads=args.threads, num_workers=args.workers
        )
    print(
        f"done: {summary['steps']} steps in {summary['wall_s']:.0f} s; best validation accuracy "
        f"{summary['val_accuracy']:.4f} (step {summary['best_step']}); test accuracy {summary['test_accuracy']:.4f}; "
        f"run in {args.out}"
    )
    return 0


def main(dataset: str, argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit status (errors as one line on stderr, no traceback)."""
    from delib_jax.data import DatasetError

    try:
        return run(dataset, argv)
    except (UsageError, DatasetError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # e.g. --out on a read-only or special file system
        print(f"error: {e.filename}: {e.strerror}" if e.filename and e.strerror else f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted: continue with the same command plus --resume", file=sys.stderr)
        return 130


# ---------------------------------------------------------------------------------------- python -m train.hardness


def build_hardness_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m train.hardness",
        description=(
            "Train the hardness head of a run alone, on its frozen classifier (a run imported without one, or "
            "--retrain to replace one); the classifier's weights and logits stay exactly as they are. The training "
            "runs in RUN/hardness_training (checkpoints, metrics.jsonl); at the end the best head goes into the run's "
            "checkpoints and config.json says hardness 'head'.\n"
            "Example: python -m train.hardness --checkpoint runs/cub --data-dir /data/CUB_200_2011\n"
            "Continue after a kill or Ctrl-C: python -m train.hardness --checkpoint runs/cub --resume"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    run = p.add_argument_group("run and data")
    run.add_argument("--checkpoint", type=Path, metavar="RUN_DIR", help="the run: config.json, checkpoints/ (required)")
    run.add_argument(
        "--data-dir", type=Path, help="the release folder (or its parent) or a TFDS build (default: the run's)"
    )
    run.add_argument("--dataset", choices=(*DATASETS, "folder"),
                     help="cub, ade20k, or folder (class folders in --data-dir); default: the run's (required for an "
                          "imported run)")  # fmt: skip
    _add_tfds_flags(run)
    run.add_argument("--synthetic", action="store_true",
                     help="the synthetic dataset, generated into --data-dir (default: the run's synthetic data, "
                          "else RUN/synthetic_data) if absent")  # fmt: skip
    run.add_argument("--retrain", action="store_true", help="replace the hardness head of a run that has one")
    run.add_argument("--resume", action="store_true", help="continue the head's training from its latest checkpoint")
    run.add_argument("--threads", type=int, default=4, help="image decoding threads (default 4)")
    run.add_argument("--workers", type=int, default=0, help="image decoding processes (default 0: threads only)")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    opt = p.add_argument_group("optimisation (AdamW, warm-up + cosine, on the head's parameters only)")
    length = opt.add_mutually_exclusive_group()
    length.add_argument("--epochs", type=int, help="training epochs (default 10)")
    length.add_argument("--steps", type=int, help="training steps (instead of --epochs)")
    opt.add_argument("--lr", type=float, help="peak learning rate (default 1e-3)")
    opt.add_argument("--batch-size", type=int, help="batch size (default: the run's)")
    opt.add_argument("--checkpoint-every", type=int, help="steps between checkpoints (default: the run's)")
    opt.add_argument("--eval-every", type=int, help="steps between validations (default: every epoch)")
    return p


def run_hardness(argv: Sequence[str] | None) -> int:
    args = build_hardness_parser().parse_args(argv)
    for name in ("epochs", "steps", "batch_size", "checkpoint_every", "eval_every", "threads"):
        v = getattr(args, name)
        if v is not None and v < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {v}")
    if args.workers < 0:
        raise UsageError(f"--workers must be >= 0, got {args.workers}")
    if args.lr is not None and not (args.lr > 0 and math.isfinite(args.lr)):
        raise UsageError(f"--lr must be positive and finite, got {args.lr}")
    if args.checkpoint is None:
        raise UsageError("--checkpoint RUN_DIR is required (the run whose hardness head to train)")
    from delib_jax.checkpoint import load_run_config
    from delib_jax.train.hardness import HARDNESS_DIR, HEAD_FLAGS, check_run, fit_hardness

    run_dir = args.checkpoint
    run_config = check_run(run_dir, retrain=args.retrain, resume=args.resume)
    common = dict(progress=not args.no_progress, num_threads=args.threads, num_workers=args.workers)
    if args.resume:
        stored = load_run_config(run_dir / HARDNESS_DIR)
        check_resume_flags(args, stored, names=HEAD_FLAGS)
        if stored.synthetic:
            _synthetic_if_absent(stored.dataset, Path(stored.data_dir))
        summary = fit_hardness(run_dir, resume=True, **common)
    else:
        data_options = _hardness_tfds(args)
        dataset = "tfds" if data_options else args.dataset or run_config.dataset
        if dataset is None:
            raise UsageError(f"{run_dir} records no dataset (an imported run): give --dataset cub, ade20k or folder "
                             "and --data-dir, or --tfds NAME")  # fmt: skip
        if args.synthetic and dataset not in DATASETS:
            raise UsageError(f"--synthetic generates cub or ade20k data, not {dataset}")
        data_dir, synthetic = args.data_dir, args.synthetic
        if data_options:
            from delib_jax.data.catalog import default_data_dir

            data_dir = args.tfds_data_dir or default_data_dir()
        if data_dir is None and dataset == run_config.dataset and run_config.data_dir is not None:
            if not synthetic or run_config.synthetic:
                data_dir, synthetic = Path(run_config.data_dir), synthetic or run_config.synthetic
        if synthetic:
            data_dir = _synthetic_if_absent(dataset, data_dir or run_dir / "synthetic_data")
        elif data_dir is None:
            raise UsageError(missing_data_message(dataset))
        elif not Path(data_dir).exists():
            raise UsageError(f"--data-dir {data_dir} does not exist. " + missing_data_message(dataset))
        options = {name: getattr(args, name) for name in HEAD_FLAGS}
        summary = fit_hardness(run_dir, dataset=dataset, data_dir=data_dir, synthetic=synthetic, retrain=args.retrain,
                               data_options=data_options, **options, **common)  # fmt: skip
    if summary.get("already_done"):
        print(f"nothing to resume: the hardness head of {run_dir} was trained and committed already")
    print(
        f"done: {summary['steps']} steps in {summary['wall_s']:.0f} s; best validation hardness loss "
        f"{summary['val_hardness_loss']:.4f} (step {summary['best_step']}); test hardness loss "
        f"{summary['test_hardness_loss']:.4f}; {run_dir} has its hardness head (config.json: hardness 'head')"
    )
    return 0


def _hardness_tfds(args: argparse.Namespace) -> dict | None:
    """``train.hardness --tfds NAME``: the catalog dataset's `load_dataset` options (None without --tfds)."""
    given = [
        f for f in ("tfds_data_dir", "image_feature", "label_feature", "tfds_split") if getattr(args, f) is not None
    ]
    if not args.tfds:
        if given:
            raise UsageError(f"--{given[0].replace('_', '-')} goes with --tfds NAME (a TFDS catalog dataset)")
        return None
    if args.data_dir is not None or args.dataset is not None or args.synthetic:
        raise UsageError("--tfds NAME names the data: drop --data-dir, --dataset and --synthetic")
    return {"name": args.tfds, **_tfds_features(args)}


def _synthetic_if_absent(dataset: str, data_dir: Path) -> Path:
    """The synthetic dataset generated into ``data_dir`` (`ensure_synthetic`) unless the folder holds something
    already (a run's synthetic data: the release folder or its parent; the dataset's reader checks it)."""
    if data_dir.is_dir() and any(data_dir.iterdir()):
        return data_dir
    return ensure_synthetic(dataset, data_dir)


def hardness_main(argv: Sequence[str] | None = None) -> int:
    """``python -m train.hardness``; returns the exit status (errors as one line on stderr, no traceback)."""
    from delib_jax.data import DatasetError

    try:
        return run_hardness(argv)
    except (UsageError, DatasetError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"error: {e.filename}: {e.strerror}" if e.filename and e.strerror else f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted: continue with the same command plus --resume", file=sys.stderr)
        return 130
