"""`python -m eval.cub` / `python -m eval.ade20k`: run the protocol for trained runs, write tables and curves.

Each (checkpoint, setting) result is saved under OUT/partial/ as soon as it is done, so a killed evaluation resumes
where it stopped. Runs: every --checkpoint is one run (e.g. one training seed); the method rows are mean (std) over
them, the random baseline over --runs seeds of each.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from delib_jax.evaluation.metrics import COVERAGES
from delib_jax.evaluation.protocol import ABLATIONS, FULL, EvalOptions, Setting

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
    p.add_argument("--checkpoint", nargs="+", required=True, metavar="RUN_DIR",
                   help="trained run directories (each one run; give several seeds for mean (std))")
    p.add_argument("--data-dir", help=f"the dataset folder ({DATASETS[dataset]} or its parent)")
    p.add_argument("--synthetic", action="store_true", help="use the synthetic dataset the run was trained on")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--ablation", choices=["scores", "attributions", "archs"],
                   help="the paper's grids: difficulty scores, attribution functions, or one row per checkpoint")
    p.add_argument("--runs", type=int, default=3, help="random-baseline seeds (default 3)")
    p.add_argument("--num-images", type=int, default=100, help="hardest test images explained (default 100)")
    p.add_argument("--top-n", type=int, default=5)
    p.add_argument("--k", type=int, default=3)
    p.add_argument("--fraction", type=float, help="ground-truth fraction (default 0.2 CUB, 0.01 ADE20K)")
    if dataset == "cub":
        p.add_argument("--divergence", choices=["kl", "js"], default="kl",
                       help="attribute similarity: symmetric KL (paper) or 2x Jensen-Shannon (authors' code)")
    p.add_argument("--difficulty-channels", choices=["positive", "signed"], default="positive",
                   help="difficulty map from channels that increase difficulty (authors', default) or all")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    return p


def _key(run_dir: Path, setting: Setting, options: EvalOptions, data_dir: Path) -> str:
    text = json.dumps([str(run_dir.resolve()), setting.__dict__, options.__dict__, str(data_dir)], sort_keys=True)
    return hashlib.sha1(text.encode()).hexdigest()[:16]


def _load_dataset(dataset: str, data_dir: Path):
    from delib_jax.data import load_ade20k, load_cub

    return load_cub(data_dir) if dataset == "cub" else load_ade20k(data_dir)


def evaluate(dataset: str, checkpoints: Sequence[Path], data_dir: Path | None, out: Path, *,
             ablation: str | None = None, options: EvalOptions | None = None, progress=print) -> dict:
    """Evaluate every (checkpoint, row) pair; write OUT/results.json, OUT/table.md and plots; return the results."""
    from delib_jax.checkpoint import load_model, load_run_config
    from delib_jax.evaluation import protocol
    from delib_jax.evaluation.tables import markdown_table, nanmean, plot_curves, summarize

    options = (options or EvalOptions()).check()
    configs = [load_run_config(c) for c in checkpoints]
    if data_dir is None:
        data_dir = Path(configs[0].data_dir) if configs[0].data_dir else None
        if data_dir is None:
            raise UsageError("give --data-dir (the run does not record its dataset)")
    for c, cfg in zip(checkpoints, configs):
        if cfg.dataset != dataset:
            raise UsageError(f"{c} was trained on {cfg.dataset}, not {dataset}")
    ds = _load_dataset(dataset, data_dir)
    settings = ABLATIONS.get(ablation, [FULL]) if ablation != "archs" else [FULL]
    out.mkdir(parents=True, exist_ok=True)
    partial = out / "partial"
    partial.mkdir(exist_ok=True)
    truth = None
    if dataset == "ade20k":
        truth = protocol.ade_ground_truth(ds, options, cache=out / "ade_object_presence.npy")
    results: dict[str, list[dict]] = {}
    baseline: list[dict] = []  # per checkpoint, its first row's result (carrying the random baseline)
    for ckpt, cfg in zip(checkpoints, configs):
        if cfg.num_classes != (ds.num_classes if hasattr(ds, "num_classes") else len(ds.scene_names)):
            raise UsageError(
                f"{ckpt} has {cfg.num_classes} classes but the dataset at {data_dir} has a different count")
        model = None
        for setting in settings:
            row = f"{cfg.arch}" if ablation == "archs" else setting.name
            cache = partial / f"{_key(ckpt, setting, options, data_dir)}.json"
            if cache.is_file():
                result = json.loads(cache.read_text())
                progress(f"reusing {row} for {ckpt} ({cache.name})")
            else:
                if model is None:
                    model, _ = load_model(ckpt)
                if setting.score == "hardness" and model.hardness_kind == "none":
                    raise UsageError(f"{ckpt} has no hardness predictor; use --ablation scores without hardness")
                if dataset == "cub":
                    result = protocol.evaluate_cub(model, cfg, ds, setting, options)
                else:
                    result = protocol.evaluate_ade20k(model, cfg, ds, setting, options, truth)
                result["checkpoint"] = str(ckpt)
                tmp = cache.with_suffix(".tmp")
                tmp.write_text(json.dumps(result))
                tmp.replace(cache)
            results.setdefault(row, []).append(result)
            if setting == settings[0]:
                baseline.append(result)
    metric = "precision" if dataset == "cub" else "iou"
    rows = [(name, summarize([r[metric] for r in rs])) for name, rs in results.items()]
    # one random baseline: every checkpoint's --runs seeds, on the insecurities of its first row
    random_runs = [c for r in baseline for c in r[f"random_{metric}"]]
    rows.append(("Random", summarize(random_runs)))
    label = "Precision" if dataset == "cub" else "IoU"
    table = markdown_table(rows, metric=label)
    (out / "table.md").write_text(table)
    plots = []
    if dataset == "cub":
        pr = [(n, nanmean([r["recall"] for r in rs], 0), nanmean([r["precision"] for r in rs], 0))
              for n, rs in results.items()]
        pr.append(("Random", nanmean([c for r in baseline for c in r["random_recall"]], 0),
                   nanmean(random_runs, 0)))
        plots.append(plot_curves(out / "precision_recall.png", pr, xlabel="recall (%)", ylabel="precision (%)",
                                 title="Insecurities vs part ambiguity (coverage 1%..90%)"))
        cov = [(n, COVERAGES, y) for n, _, y in pr]
        plots.append(plot_curves(out / "precision_coverage.png", cov, xlabel="coverage (%)",
                                 ylabel="precision (%)", title="Precision by coverage"))
    else:
        iou = [(n, COVERAGES, nanmean([r["iou"] for r in rs], 0)) for n, rs in results.items()]
        iou.append(("Random", COVERAGES, nanmean(random_runs, 0)))
        plots.append(plot_curves(out / "iou.png", iou, xlabel="coverage (%)", ylabel="IoU (%)",
                                 title="Insecurities vs ambiguous objects"))
    summary = {"dataset": dataset, "data_dir": str(data_dir), "ablation": ablation, "options": options.__dict__,
               "table": {n: s for n, s in rows}, "results": results, "plots": [p.name for p in plots]}
    if dataset == "cub":  # mean keypoint AUC per row (0.5: the maps do not rank ambiguous parts first)
        def mean(values):
            values = [v for v in values if v is not None]
            return float(np.mean(values)) if values else None

        summary["keypoint_auc"] = {n: mean([r.get("keypoint_auc") for r in rs]) for n, rs in results.items()}
        summary["keypoint_auc"]["Random"] = mean([v for r in baseline for v in r.get("random_keypoint_auc", [])])
    tmp = out / "results.json.tmp"
    tmp.write_text(json.dumps(summary, indent=1))
    tmp.replace(out / "results.json")
    return summary


def main(dataset: str, argv: Sequence[str] | None = None) -> int:
    """Command-line entry: one clear message (exit 2) for bad input, never a traceback."""
    parser = build_parser(dataset)
    args = parser.parse_args(argv)
    from delib_jax.data import DatasetError

    try:
        for c in args.checkpoint:
            if not Path(c).is_dir():
                raise UsageError(f"checkpoint run directory not found: {c}")
        if args.data_dir is None and not args.synthetic:
            raise UsageError(f"give --data-dir with the {DATASETS[dataset]} folder, or --synthetic to evaluate on "
                             "the synthetic dataset the run was trained on")
        if args.num_images < 1 or args.runs < 1 or args.batch_size < 1:
            raise UsageError("--num-images, --runs and --batch-size must be >= 1")
        options = EvalOptions(
            num_images=args.num_images, top_n=args.top_n, k=args.k, fraction=args.fraction,
            divergence=getattr(args, "divergence", "kl"), runs=args.runs, batch_size=args.batch_size,
            difficulty_channels=args.difficulty_channels, seed=args.seed,
        )
        options.check()
        summary = evaluate(dataset, [Path(c) for c in args.checkpoint],
                           Path(args.data_dir) if args.data_dir else None, Path(args.out), ablation=args.ablation,
                           options=options, progress=lambda m: print(m, file=sys.stderr))
    except (UsageError, ValueError, FileNotFoundError, DatasetError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print((Path(args.out) / "table.md").read_text())
    if "keypoint_auc" in summary:
        aucs = ", ".join(f"{n} {'n/a' if v is None else f'{v:.3f}'}" for n, v in summary["keypoint_auc"].items())
        print(f"keypoint AUC (ground-truth ambiguous keypoints ranked above others; 0.5 = chance): {aucs}")
    print(f"wrote {args.out}/results.json, table.md and {', '.join(summary['plots'])}")
    return 0
