"""`delib demo --out DIR`: the whole flow on the synthetic birds, in one command.

data (synthetic CUB) -> train (small CNN + jointly trained hardness head) -> explain the hardest test images
(figures + HTML report) -> evaluate against the part/attribute ground truth (table + curves). Every stage leaves its
result in DIR and is skipped when a later run finds it done (training resumes from its last checkpoint).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from delib_jax._command import Command, UsageError, check_out_dir, make_out_dir

DESCRIPTION = (
    "Run the whole project on the synthetic birds: generate the data, train, explain the hardest test images, "
    "evaluate against the ground truth, and write the HTML report and tables. A second run reuses what is done.\n\n"
    "example: delib demo --out demo"
)


def _configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (created; reused by a second run)")
    p.add_argument("--epochs", type=int, default=20, help="training epochs (default: 20)")
    p.add_argument("--num-images", type=int, default=60, help="hardest test images evaluated (default: 60)")
    p.add_argument("--explain-images", type=int, default=12, help="hardest test images drawn (default: 12)")
    p.add_argument(
        "--crop",
        type=int,
        default=128,
        help="training/evaluation crop in pixels, resized from crop * 8/7 (default: 128, a 16x16 feature "
        "grid; coarser grids separate the birds' parts less well: 96 px runs ~2x faster)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--data-dir",
        metavar="DIR",
        help="train on this CUB-format data instead of generating the synthetic birds: a CUB_200_2011 "
        "release folder or a TFDS build of it (python -m delib_jax.data.tfds build cub)",
    )


def _stage(name: str) -> float:
    print(f"\n== {name}", file=sys.stderr, flush=True)
    return time.perf_counter()


def _training_done(run_dir: Path) -> bool:
    """Whether OUT/run/metrics.jsonl holds the test result; a damaged file is a `UsageError` naming it."""
    metrics = run_dir / "metrics.jsonl"
    if not metrics.is_file():
        return False
    text = metrics.read_text(encoding="utf-8", errors="replace")
    lines = text.splitlines()
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except RecursionError:
            raise UsageError(f"{metrics}:{number}: JSON nested too deeply; delete {run_dir} to train again") from None
        except json.JSONDecodeError as e:
            if number == len(lines) and not text.endswith("\n"):
                continue  # torn: the line being written when training was killed (the resumed run drops it)
            raise UsageError(f"{metrics}:{number}: not JSON ({e.msg}); delete {run_dir} to train again") from None
        if not isinstance(record, dict):
            raise UsageError(f"{metrics}:{number}: not a metrics record; delete {run_dir} to train again")
        if record.get("split") == "test":
            return True
    return False


def _check_data_dir(data_dir: Path) -> None:
    """OUT/data must be empty, absent or the synthetic CUB that an earlier demo generated."""
    from delib_jax.train.cli import DATASETS

    if (data_dir / DATASETS["cub"]["folder"] / "images.txt").is_file():
        return
    if data_dir.exists() and (not data_dir.is_dir() or any(data_dir.iterdir())):
        raise UsageError(
            f"{data_dir} holds other files, not the synthetic birds of an earlier demo: remove {data_dir} or choose "
            "another --out"
        )


def train_stage(out: Path, epochs: int, seed: int, crop: int = 128, data_dir: Path | None = None) -> Path:
    """Generate the data (unless ``data_dir`` is given: a CUB release or TFDS build) and train the small CNN into
    OUT/run (resuming an interrupted run)."""
    from delib_jax.checkpoint import RunConfig
    from delib_jax.data import load_dataset
    from delib_jax.data.transforms import CUB_STATS
    from delib_jax.train.cli import SMALL_DEFAULTS, ensure_synthetic
    from delib_jax.train.run import fit

    synthetic = data_dir is None
    if synthetic:
        _check_data_dir(out / "data")
        data_dir = ensure_synthetic("cub", out / "data")
    run_dir = out / "run"
    if _training_done(run_dir):
        print(f"training already done in {run_dir}", file=sys.stderr)
        return run_dir
    names = list(load_dataset("cub", data_dir, report=lambda line: print(line, file=sys.stderr)).class_names)
    config = RunConfig(
        **{**SMALL_DEFAULTS, "epochs": epochs, "crop": crop, "resize": round(crop * 8 / 7)}, arch="small",
        num_classes=len(names), class_names=names, hardness="head", dataset="cub", mean=CUB_STATS.mean,
        std=CUB_STATS.std, seed=seed,
        data_dir=str(Path(data_dir).absolute()), synthetic=synthetic,
    )  # fmt: skip
    resume = (run_dir / "config.json").is_file()
    summary = fit(run_dir, None if resume else config, resume=resume)
    print(
        f"test accuracy {summary['test_accuracy']:.3f} (best validation step {summary['best_step']})", file=sys.stderr
    )
    return run_dir


def explain_stage(run_dir: Path, out: Path, count: int) -> Path:
    """Explain the ``count`` hardest test images with the explanation job (`delib_jax.stream.explain_files`):
    OUT/explain/index.html, a figure per image, the compact store and insecurities.json."""
    import numpy as np

    from delib_jax import explanation as ex
    from delib_jax.checkpoint import load_model
    from delib_jax.data import load_dataset
    from delib_jax.data.pipeline import cub_source, eval_pipeline, read_example
    from delib_jax.evaluation.protocol import hardest_images
    from delib_jax.report import write_report
    from delib_jax.stream import JobOptions, explain_files
    from delib_jax.visualize import figure_name, save_figure

    target = out / "explain"
    if (target / "index.html").is_file():
        print(f"explanations already in {target}", file=sys.stderr)
        return target
    model, config = load_model(run_dir)
    ds = load_dataset("cub", config.data_dir)
    test = cub_source(ds, "test")
    chosen = hardest_images(model, config, test, "hardness", count, 32)
    first = {c: int(np.flatnonzero((ds.labels == c) & ds.is_train)[0]) for c in range(config.num_classes)}
    if ds.records is None:  # a release folder: its files go through the explanation job
        files = [ds.image_paths[i] for i in test.indices[chosen]]
        examples = {c: ds.image_paths[i] for c, i in first.items()}
        options = JobOptions(batch_size=32, figures=True, json=True)
        explain_files(model, config, files, target, options=options, model_id={"checkpoint": str(run_dir)},
                      examples=examples, report=lambda m: print(f"   {m}", file=sys.stderr),
                      method="gradient_hessian", score="hardness", top_n=5, k=3, coverage=0.1)  # fmt: skip
        return target
    # a TFDS build's images are records, not files: explain the decoded batch in memory
    examples = {c: np.asarray(read_example(cub_source(ds, indices=[i]), 0)[0]) for c, i in first.items()}
    source = cub_source(ds, indices=test.indices[chosen])
    batch = next(
        iter(
            eval_pipeline(
                source, batch_size=len(chosen), resize=config.resize, crop=config.crop, stats=config.normalization
            )
        )
    )
    explanations = ex.explain(
        model,
        batch["image"],
        class_names=config.class_names,
        sources=[source.image_paths[i] for i in range(len(chosen))],
    )
    target.mkdir(parents=True, exist_ok=True)
    mean, std = np.asarray(config.mean), np.asarray(config.std)
    records, figures = [], []
    for i, e in enumerate(explanations):
        pixels = np.clip(batch["image"][i] * std + mean, 0, 1)
        figure = figure_name(i, e.source)
        save_figure(e, (pixels * 255).astype(np.uint8), target / figure, examples=examples)
        records.append({**e.to_json(), "figure": figure})
        figures.append(figure)
    ex.write_json(target / "insecurities.json", {"checkpoint": str(run_dir), "images": records})
    write_report(
        target,
        records,
        figures,
        title="Deliberative explanations: hardest synthetic test birds",
        settings={"method": "gradient_hessian", "score": "hardness", "top_n": 5, "k": 3, "coverage": 0.1},
    )
    return target


def run(args: argparse.Namespace) -> int:
    from delib_jax.data import DatasetError
    from delib_jax.train import cli as train_cli

    try:
        return _run(args)
    except (ValueError, OSError, DatasetError, train_cli.UsageError) as e:
        raise UsageError(str(e)) from None


def _run(args: argparse.Namespace) -> int:
    from delib_jax.evaluation.protocol import EvalOptions
    from delib_jax.evaluation.run import evaluate

    if args.epochs < 1 or args.num_images < 1 or args.explain_images < 1:
        raise UsageError("--epochs, --num-images and --explain-images must be >= 1")
    if not 32 <= args.crop <= (128 if args.data_dir is None else 1024):
        raise UsageError(f"--crop must lie in [32, 128] (the synthetic images are 128 px wide), got {args.crop}")
    check_out_dir(args.out)
    out = make_out_dir(args.out)
    t0 = _stage("1/3 data + training (small CNN, jointly trained hardness head)")
    run_dir = train_stage(out, args.epochs, args.seed, args.crop, Path(args.data_dir) if args.data_dir else None)
    print(f"   {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    t1 = _stage("2/3 explaining the hardest test images")
    report = explain_stage(run_dir, out, args.explain_images)
    print(f"   {time.perf_counter() - t1:.0f} s", file=sys.stderr)
    t2 = _stage("3/3 evaluating insecurities against the part-attribute ground truth")
    options = EvalOptions(num_images=args.num_images, runs=3, batch_size=32, seed=args.seed)
    evaluate("cub", [run_dir], None, out / "eval", options=options, progress=lambda m: print(m, file=sys.stderr))
    print(f"   {time.perf_counter() - t2:.0f} s", file=sys.stderr)
    print((out / "eval" / "table.md").read_text())
    print(
        f"report:  {report / 'index.html'}\ntables:  {out / 'eval' / 'table.md'}\n"
        f"curves:  {out / 'eval' / 'precision_recall.png'}\nmodel:   {run_dir}\n"
        f"total:   {time.perf_counter() - t0:.0f} s"
    )
    return 0


COMMAND = Command("demo", "the whole flow on the synthetic birds", DESCRIPTION, _configure, run)
