"""`python -m eval.cub` / `python -m eval.ade20k`: run the protocol for trained runs, write tables and curves.

Each (checkpoint, setting) result is saved under OUT/partial/ as soon as it is done, so a killed evaluation resumes
where it stopped. Runs: every --checkpoint is one run (e.g. one training seed); the method rows are mean (std) over
them, the random baseline over --runs seeds of each.

Exit status: 0 done (warnings on stderr, e.g. a row without insecurities), 2 bad input (one line on stderr: missing or
corrupt run, dataset that does not match the run, a model with non-finite outputs, an --out that cannot be created),
130 interrupted (finished results stay in OUT/partial/; the same command resumes).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from delib_jax.evaluation.metrics import COVERAGES
from delib_jax.evaluation.protocol import ABLATIONS, FULL, EvalOptions, NonFiniteOutputs, Setting

DATASETS = {"cub": "CUB_200_2011", "ade20k": "ADEChallengeData2016"}


class UsageError(Exception):
    """A problem with the command line or its inputs: one message, exit code 2."""


def build_parser(dataset: str) -> argparse.ArgumentParser:
    metric = "precision/recall of part keypoints" if dataset == "cub" else "IoU with object masks"
    p = argparse.ArgumentParser(
        prog=f"python -m eval.{dataset}",
        description=f"Evaluate deliberative explanations on {DATASETS[dataset]} ({metric} at coverage 1%..90%), "
        "against a random baseline; writes results.json, table.md and plots.",
        epilog=f"example: python -m eval.{dataset} --checkpoint runs/{dataset} --synthetic --out runs/{dataset}/eval",
    )
    p.add_argument(
        "--checkpoint",
        nargs="+",
        required=True,
        metavar="RUN_DIR",
        help="trained run directories (each one run; give several seeds for mean (std))",
    )
    p.add_argument("--data-dir", help=f"the dataset folder ({DATASETS[dataset]} or its parent), or a TFDS build of it")
    p.add_argument("--synthetic", action="store_true", help="use the synthetic dataset the run was trained on")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument(
        "--ablation",
        choices=["scores", "attributions", "archs"],
        help="the paper's grids: difficulty scores, attribution functions, or one row per checkpoint",
    )
    p.add_argument("--runs", type=int, default=3, help="random-baseline seeds (default 3)")
    p.add_argument("--num-images", type=int, default=100, help="hardest test images explained (default 100)")
    p.add_argument("--top-n", type=int, default=5)
    p.add_argument("--k", type=int, default=3)
    p.add_argument("--fraction", type=float, help="ground-truth fraction (default 0.2 CUB, 0.01 ADE20K)")
    if dataset == "cub":
        p.add_argument(
            "--divergence",
            choices=["kl", "js"],
            default="kl",
            help="attribute similarity: symmetric KL (paper) or 2x Jensen-Shannon (authors' code)",
        )
    p.add_argument(
        "--difficulty-channels",
        choices=["positive", "signed"],
        default="positive",
        help="difficulty map from channels that increase difficulty (authors', default) or all",
    )
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    return p


def _key(run_dir: Path, setting: Setting, options: EvalOptions, data_dir: Path) -> str:
    text = json.dumps([str(run_dir.resolve()), setting.__dict__, options.__dict__, str(data_dir)], sort_keys=True)
    return hashlib.sha1(text.encode()).hexdigest()[:16]


def _load_dataset(dataset: str, data_dir: Path, progress=None):
    from delib_jax.data import load_dataset

    return load_dataset(dataset, data_dir, report=progress)


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def _strict(value):
    """``value`` with every non-finite float replaced by None (JSON null): results files stay strict JSON."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _strict(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_strict(v) for v in value]
    return value


def _write_json(path: Path, data, *, indent: int | None = None) -> None:
    """Write strict JSON (NaN as null) atomically."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(_strict(data), indent=indent, allow_nan=False))
    tmp.replace(path)


def unique_runs(checkpoints: Sequence[Path]) -> list[Path]:
    """The checkpoints without repeats of the same resolved directory (a run given twice is one run, not two seeds);
    each repeat is reported on stderr."""
    seen: dict[Path, Path] = {}
    for c in checkpoints:
        key = Path(c).resolve()
        if key in seen:
            _warn(f"--checkpoint {c} names the same run as {seen[key]} ({key}): counted once, not as two seeds")
        else:
            seen[key] = Path(c)
    return list(seen.values())


def _check_classes(ckpt: Path, class_names: Sequence[str], names: Sequence[str], data_dir: Path) -> None:
    """UsageError unless the dataset's classes (CUB classes / ADE20K scenes) are the run's, in the same order."""
    if len(class_names) != len(names):
        raise UsageError(
            f"{ckpt} has {len(class_names)} classes but the dataset at {data_dir} has {len(names)}: "
            "evaluate on the dataset the run was trained on"
        )
    for i, (trained, found) in enumerate(zip(class_names, names)):
        if trained != found:
            raise UsageError(
                f"{ckpt} was trained on other classes than the dataset at {data_dir}: class {i} is "
                f"{trained!r} in the run but {found!r} in the dataset"
            )


def _cache_problem(result, metric: str) -> str | None:
    """Why a cached result cannot be used (None: it can)."""
    if not isinstance(result, dict):
        return f"expected a JSON object, found {type(result).__name__}"
    curves = [metric, f"random_{metric}"] + (["recall", "random_recall"] if metric == "precision" else [])
    missing = [k for k in [*curves, "insecurities", "images"] if k not in result]
    if missing:
        return f"missing {', '.join(missing)}"
    if not all(isinstance(result[k], int) and result[k] >= 0 for k in ("insecurities", "images")):
        return "insecurities and images must be counts"
    for k in curves:
        try:
            shape = np.asarray(result[k], float).shape
        except (TypeError, ValueError):
            shape = ()
        if shape[-1:] != (len(COVERAGES),) or len(shape) != (2 if k.startswith("random_") else 1):
            return f"{k} is not a curve of {len(COVERAGES)} coverages"
    return None


def _read_cached(path: Path, metric: str) -> dict | None:
    """A finished result from OUT/partial/, or None (with a note naming the file) when the file is damaged (e.g. a
    write cut short), so that the result is recomputed."""
    try:
        result = json.loads(path.read_text())
        problem = _cache_problem(result, metric)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        problem = f"not readable JSON: {e}"
    except RecursionError:
        problem = "JSON nested too deeply"
    if problem is None:
        return result
    print(f"note: {path} is damaged ({problem}); recomputing it", file=sys.stderr)
    return None


def _no_insecurities(ckpt: Path, row: str, result: dict) -> str:
    return (
        f"no insecurities for {row} of {ckpt} in its {result['images']} hardest test images (no two top classes "
        "have positive attribution at one location; common for an undertrained model): that table row is empty"
    )


def evaluate(
    dataset: str,
    checkpoints: Sequence[Path],
    data_dir: Path | None,
    out: Path,
    *,
    ablation: str | None = None,
    options: EvalOptions | None = None,
    progress=print,
) -> dict:
    """Evaluate every (checkpoint, row) pair; write OUT/results.json, OUT/table.md and plots; return the results."""
    from delib_jax.checkpoint import load_model, load_run_config
    from delib_jax.evaluation import protocol
    from delib_jax.evaluation.tables import markdown_table, nanmean, plot_curves, summarize

    options = (options or EvalOptions()).check()
    checkpoints = unique_runs(checkpoints)
    configs = [load_run_config(c) for c in checkpoints]
    if data_dir is None:
        data_dir = Path(configs[0].data_dir) if configs[0].data_dir else None
        if data_dir is None:
            raise UsageError("give --data-dir (the run does not record its dataset)")
    for c, cfg in zip(checkpoints, configs):
        check_protocol(dataset, c, cfg)
    ds = _load_dataset(dataset, data_dir, progress)
    names = ds.class_names if dataset == "cub" else ds.scene_names
    for c, cfg in zip(checkpoints, configs):
        _check_classes(c, cfg.class_names, names, data_dir)
        if options.k > min(options.top_n, cfg.num_classes):
            raise UsageError(
                f"--k {options.k} needs at least {options.k} class maps, but {c} has "
                f"{cfg.num_classes} classes: lower --k"
            )
    settings = ABLATIONS.get(ablation, [FULL]) if ablation != "archs" else [FULL]
    partial = out / "partial"
    try:
        partial.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"cannot create --out {out}: {e.strerror or e}; choose another folder") from None
    truth = None
    if dataset == "ade20k":
        truth = protocol.ade_ground_truth(ds, options, cache=out / "ade_object_presence.npy", progress=progress)
    metric = "precision" if dataset == "cub" else "iou"
    results: dict[str, list[dict]] = {}
    baseline: list[dict] = []  # per checkpoint, its first row's result (carrying the random baseline)
    notes: list[str] = []
    for ckpt, cfg in zip(checkpoints, configs):
        model = None
        for setting in settings:
            row = f"{cfg.arch}" if ablation == "archs" else setting.name
            cache = partial / f"{_key(ckpt, setting, options, data_dir)}.json"
            result = _read_cached(cache, metric) if cache.is_file() else None
            if result is not None:
                progress(f"reusing {row} for {ckpt} ({cache.name})")
            else:
                if model is None:
                    model, _ = load_model(ckpt)
                if setting.score == "hardness" and model.hardness_kind == "none":
                    raise UsageError(f"{ckpt} has no hardness predictor; use --ablation scores without hardness")
                try:
                    if dataset == "cub":
                        result = protocol.evaluate_cub(model, cfg, ds, setting, options)
                    else:
                        result = protocol.evaluate_ade20k(model, cfg, ds, setting, options, truth)
                except NonFiniteOutputs as e:
                    raise UsageError(f"{ckpt} ({row}): {e}") from None
                result["checkpoint"] = str(ckpt)
                _write_json(cache, result)
            if result["insecurities"] == 0:
                notes.append(_no_insecurities(ckpt, row, result))
                _warn(notes[-1])
            results.setdefault(row, []).append(result)
            if setting == settings[0]:
                baseline.append(result)
    rows = [(name, summarize([r[metric] for r in rs])) for name, rs in results.items()]
    # one random baseline: every checkpoint's --runs seeds, on the insecurities of its first row
    random_runs = [c for r in baseline for c in r[f"random_{metric}"]]
    rows.append(("Random", summarize(random_runs)))
    label = "Precision" if dataset == "cub" else "IoU"
    table = markdown_table(rows, metric=label)
    (out / "table.md").write_text(table)
    plots = []
    if dataset == "cub":
        pr = [
            (n, nanmean([r["recall"] for r in rs], 0), nanmean([r["precision"] for r in rs], 0))
            for n, rs in results.items()
        ]
        pr.append(("Random", nanmean([c for r in baseline for c in r["random_recall"]], 0), nanmean(random_runs, 0)))
        plots.append(
            plot_curves(
                out / "precision_recall.png",
                pr,
                xlabel="recall (%)",
                ylabel="precision (%)",
                title="Insecurities vs part ambiguity (coverage 1%..90%)",
            )
        )
        cov = [(n, COVERAGES, y) for n, _, y in pr]
        plots.append(
            plot_curves(
                out / "precision_coverage.png",
                cov,
                xlabel="coverage (%)",
                ylabel="precision (%)",
                title="Precision by coverage",
            )
        )
    else:
        iou = [(n, COVERAGES, nanmean([r["iou"] for r in rs], 0)) for n, rs in results.items()]
        iou.append(("Random", COVERAGES, nanmean(random_runs, 0)))
        plots.append(
            plot_curves(
                out / "iou.png", iou, xlabel="coverage (%)", ylabel="IoU (%)", title="Insecurities vs ambiguous objects"
            )
        )
    summary = {
        "dataset": dataset,
        "data_dir": str(data_dir),
        "ablation": ablation,
        "options": options.__dict__,
        "table": {n: s for n, s in rows},
        "results": results,
        "plots": [p.name for p in plots],
        "notes": notes,
    }
    if dataset == "cub":  # mean keypoint AUC per row (0.5: the maps do not rank ambiguous parts first)

        def mean(values):
            values = [v for v in values if v is not None]
            return float(np.mean(values)) if values else None

        summary["keypoint_auc"] = {n: mean([r.get("keypoint_auc") for r in rs]) for n, rs in results.items()}
        summary["keypoint_auc"]["Random"] = mean([v for r in baseline for v in r.get("random_keypoint_auc", [])])
    _write_json(out / "results.json", summary, indent=1)
    return summary


GROUND_TRUTH = {"cub": "CUB-200-2011's part keypoints", "ade20k": "ADE20K's object masks"}


def check_protocol(dataset: str, checkpoint: Path, config) -> None:
    """`UsageError` (one line) unless the run was trained on ``dataset``: the paper's protocols score insecurities
    against CUB-200-2011's parts or ADE20K's objects, which no other data has."""
    if config.dataset == dataset:
        return
    from delib_jax.data import KINDS

    kind = KINDS.get(config.dataset)
    what = "imported from weights, with no dataset" if kind is None else f"trained on {kind.title}"
    raise UsageError(
        f"{checkpoint} was {what}: eval.{dataset}'s protocol needs {GROUND_TRUTH[dataset]}, so it evaluates runs "
        f"trained on that dataset only; python -m eval.faithfulness compares attributions on any dataset"
    )


def main(dataset: str, argv: Sequence[str] | None = None) -> int:
    """Command-line entry: one clear message (exit 2) for bad input, never a traceback."""
    parser = build_parser(dataset)
    args = parser.parse_args(argv)
    from delib_jax.data import DatasetError

    try:
        for c in args.checkpoint:
            if not Path(c).is_dir():
                raise UsageError(f"checkpoint run directory not found: {c}")
            if Path(c, "config.json").is_file():  # another dataset's run: said before asking for the data
                from delib_jax.checkpoint import load_run_config

                check_protocol(dataset, Path(c), load_run_config(c))
        if args.data_dir is None and not args.synthetic:
            raise UsageError(
                f"give --data-dir with the {DATASETS[dataset]} folder, or --synthetic to evaluate on "
                "the synthetic dataset the run was trained on"
            )
        if args.num_images < 1 or args.runs < 1 or args.batch_size < 1:
            raise UsageError("--num-images, --runs and --batch-size must be >= 1")
        options = EvalOptions(
            num_images=args.num_images,
            top_n=args.top_n,
            k=args.k,
            fraction=args.fraction,
            divergence=getattr(args, "divergence", "kl"),
            runs=args.runs,
            batch_size=args.batch_size,
            difficulty_channels=args.difficulty_channels,
            seed=args.seed,
        )
        options.check()
        summary = evaluate(
            dataset,
            [Path(c) for c in args.checkpoint],
            Path(args.data_dir) if args.data_dir else None,
            Path(args.out),
            ablation=args.ablation,
            options=options,
            progress=lambda m: print(m, file=sys.stderr),
        )
    except (UsageError, ValueError, OSError, DatasetError) as e:  # incl. load_model's errors for corrupt runs
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            f"\ninterrupted: finished results are kept in {Path(args.out) / 'partial'}; the same command resumes",
            file=sys.stderr,
        )
        return 130
    print((Path(args.out) / "table.md").read_text())
    if "keypoint_auc" in summary:
        aucs = ", ".join(f"{n} {'n/a' if v is None else f'{v:.3f}'}" for n, v in summary["keypoint_auc"].items())
        print(f"keypoint AUC (ground-truth ambiguous keypoints ranked above others; 0.5 = chance): {aucs}")
    print(f"wrote {args.out}/results.json, table.md and {', '.join(summary['plots'])}")
    return 0
