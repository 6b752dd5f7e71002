"""`python -m eval.faithfulness`: which attribution is more faithful to a trained model, at layer A and at the pixels.

For test images of the run's dataset (a seeded sample of ``num_images``), the maps of each method explain the
predicted class's softmax probability at A; each map then orders A's locations (and, upsampled, the pixels) for the
deletion and insertion curves, and is scored by infidelity under the two stated perturbations
(`delib_jax.evaluation.faithfulness`). Methods: gradient (x input), gradient-Hessian with the diagonal blocks (Eq. 2)
and with the cross-location term, integrated gradients (Gauss-Legendre nodes), Grad-CAM, and uniform random maps
(the random-order baseline). Writes OUT/results.json (means, standard errors, mean curves), OUT/table.md and one plot
per curve and level.

Each finished batch's per-image scores are kept in OUT/partial/ (with the run, data and options they belong to), so
that an interrupted or killed command continues where it stopped when run again; other options start afresh.

Exit status: 0 done, 2 bad input (one line on stderr), 130 interrupted (finished batches kept).
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from delib_jax.attribution import grad_cam, layer_attribution, split_model
from delib_jax.evaluation.faithfulness import curve_area, infidelity, perturbation_curves
from delib_jax.progress import progress_bar

METHODS = ("gradient", "gradient_hessian", "gradient_hessian_cross", "integrated_gradients", "grad_cam", "random")
LABELS = {
    "gradient": "Gradient",
    "gradient_hessian": "Gradient-Hessian (diagonal)",
    "gradient_hessian_cross": "Gradient-Hessian (cross)",
    "integrated_gradients": "Int. grad.",
    "grad_cam": "Grad-CAM",
    "random": "Random",
}
LEVELS = ("A", "pixels")
METRICS = ("deletion_auc", "insertion_auc", "infidelity_subset", "infidelity_gaussian")


class UsageError(Exception):
    """A problem with the command line or its inputs: one message, exit code 2."""


@dataclass(frozen=True)
class FaithfulnessOptions:
    """What to compare and how finely."""

    methods: tuple[str, ...] = METHODS
    levels: tuple[str, ...] = LEVELS
    num_images: int = 32
    steps: int = 20  # curve points: fractions 0, 1/steps, ..., 1 of the locations
    samples: int = 32  # infidelity perturbations per image
    ig_steps: int = 50
    batch_size: int = 8
    seed: int = 0

    def check(self) -> FaithfulnessOptions:
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown or not self.methods:
            raise ValueError(
                f"unknown method {unknown[0]!r}; choose from {', '.join(METHODS)}"
                if unknown
                else "give at least one method"
            )
        bad = [lv for lv in self.levels if lv not in LEVELS]
        if bad or not self.levels:
            raise ValueError(
                f"unknown level {bad[0]!r}; choose from {', '.join(LEVELS)}" if bad else "give at least one level"
            )
        for name, low in (("num_images", 1), ("steps", 1), ("samples", 2), ("ig_steps", 1), ("batch_size", 1)):
            if getattr(self, name) < low:
                raise ValueError(f"--{name.replace('_', '-')} must be at least {low}, got {getattr(self, name)}")
        return self


def method_maps(
    model,
    a: jax.Array,
    targets: jax.Array,
    methods: Sequence[str],
    *,
    key: jax.Array,
    ig_steps: int = 50,
    classifier=None,
) -> jax.Array:
    """(B, M, H, W) maps of the predicted classes ``targets`` (B,) at A (B, H, W, D), one per method. classifier:
    the class head as a function of A for this batch (`DeliberativeModel.features_and_classifier`; default the
    model's own, for heads that read A only)."""
    classifier = model.classifier if classifier is None else classifier
    t = targets[:, None]
    maps = []
    for m in methods:
        if m == "gradient":
            r = layer_attribution(None, classifier, a, targets=t, method="gradient").maps[:, 0]
        elif m in ("gradient_hessian", "gradient_hessian_cross"):
            second = "cross" if m.endswith("cross") else "diagonal"
            r = layer_attribution(None, classifier, a, targets=t, second_order=second).maps[:, 0]
        elif m == "integrated_gradients":
            r = layer_attribution(None, classifier, a, targets=t, method="integrated_gradients", steps=ig_steps).maps[
                :, 0
            ]
        elif m == "grad_cam":
            r = grad_cam(classifier, a, targets)
        else:
            r = jax.random.uniform(key, a.shape[:3])
        maps.append(r)
    return jnp.stack(maps, axis=1)


def _scores(head, x, maps, targets, options: FaithfulnessOptions, key) -> dict[str, np.ndarray]:
    """Per image and map: curves (B, M, T + 1) and the four metrics (B, M) of one level."""
    out = {}
    for mode in ("deletion", "insertion"):
        curves = perturbation_curves(
            head, x, maps, targets, mode=mode, steps=options.steps, batch_size=options.batch_size * 8
        )
        out[f"{mode}_curve"] = np.asarray(curves)
        out[f"{mode}_auc"] = np.asarray(curve_area(curves))
    for perturbation in ("subset", "gaussian"):
        out[f"infidelity_{perturbation}"] = np.asarray(
            infidelity(
                head,
                x,
                maps,
                targets,
                perturbation=perturbation,
                samples=options.samples,
                key=key,
                batch_size=options.batch_size * 8,
            )
        )
    return out


def evaluate_batches(
    model, batches, options: FaithfulnessOptions, *, total: int | None = None, partial: Path | None = None
) -> dict:
    """{level: {metric or curve name: (N, M[, T + 1]) per image}} over image batches (B, H, W, 3) normalised.

    With ``partial`` (a folder) each batch's scores are saved there as ``batch-IIIII.npz`` once computed, and read
    back instead of computed when present: the same results whether or not a run was interrupted (the random keys
    advance per batch either way)."""
    options = options.check()
    _, pixel_head = split_model(model, "image")
    forward = jax.jit(
        lambda x: (lambda a, ctx: (a, ctx, model.bind_classifier(ctx)(a)))(*model.features_and_context(x))
    )
    key = jax.random.key(options.seed)
    results: dict[str, dict[str, list]] = {level: {} for level in options.levels}
    for i, images in enumerate(progress_bar(batches, desc="faithfulness", total=total, unit="batch", leave=False)):
        key, k_maps, k_a, k_px = jax.random.split(key, 4)
        saved = None if partial is None else _load_batch(partial / f"batch-{i:05d}.npz", options.levels)
        if saved is None:
            saved = _batch_scores(model, pixel_head, forward, images, options, k_maps, k_a, k_px)
            if partial is not None:
                _save_batch(partial / f"batch-{i:05d}.npz", saved)
        for level, scores in saved.items():
            for name, values in scores.items():
                results[level].setdefault(name, []).append(values)
    return {level: {k: np.concatenate(v) for k, v in r.items()} for level, r in results.items()}


def _batch_scores(model, pixel_head, forward, images, options: FaithfulnessOptions, k_maps, k_a, k_px) -> dict:
    """{level: {name: per-image values}} of one batch."""
    images = jnp.asarray(images)
    a, context, logits = forward(images)
    classifier = model.bind_classifier(context)
    if not bool(jnp.isfinite(logits).all()):
        raise ValueError("the model's outputs are not finite (NaN or inf logits; a diverged training run)")
    targets = jnp.argmax(logits, axis=-1)
    maps = method_maps(model, a, targets, options.methods, key=k_maps, ig_steps=options.ig_steps, classifier=classifier)
    per_map = np.repeat(np.asarray(targets)[:, None], maps.shape[1], axis=1)
    out = {}
    for level in options.levels:
        head, x, k = (classifier, a, k_a) if level == "A" else (pixel_head, images, k_px)
        out[level] = _scores(head, x, maps, per_map, options, k)
    return out


def _save_batch(path: Path, scores: dict) -> None:
    """One batch's scores, written whole or not at all (a temporary file renamed)."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        np.savez(f, **{f"{level}/{name}": v for level, s in scores.items() for name, v in s.items()})
    tmp.replace(path)


def _load_batch(path: Path, levels: Sequence[str]) -> dict | None:
    """The saved scores of one batch, or None if absent or unreadable (then computed again)."""
    if not path.is_file():
        return None
    try:
        with np.load(path) as z:
            out: dict[str, dict] = {level: {} for level in levels}
            for name in z.files:
                level, metric = name.split("/", 1)
                out[level][metric] = z[name]
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        return None
    return out if all(out.values()) else None


def _partial_folder(out: Path, identity: dict, progress: Callable[[str], None]) -> Path:
    """OUT/partial for ``identity`` (run, data, options): kept if it was made for the same, else emptied."""
    partial = out / "partial"
    manifest = partial / "manifest.json"
    identity = json.loads(json.dumps(identity))  # as it reads back (tuples become lists)
    try:
        same = json.loads(manifest.read_text()) == identity
    except (OSError, ValueError):
        same = False
    if not same:
        if partial.is_dir():
            progress(f"{partial} holds batches of another run, dataset or options: starting afresh")
            shutil.rmtree(partial)
        partial.mkdir(parents=True)
        _write_json(manifest, identity)
    else:
        done = len(list(partial.glob("batch-*.npz")))
        if done:
            progress(f"resuming: {done} finished batches in {partial}")
    return partial


def summarize(per_image: dict, methods: Sequence[str]) -> dict:
    """{level: {method: {metric: {mean, se}, deletion_curve, insertion_curve}}}: means and standard errors over
    images."""
    out = {}
    for level, values in per_image.items():
        n = len(values["deletion_auc"])
        out[level] = {}
        for j, m in enumerate(methods):
            row = {}
            for metric in METRICS:
                v = values[metric][:, j]
                row[metric] = {
                    "mean": float(np.mean(v)),
                    "se": float(np.std(v, ddof=1) / math.sqrt(n)) if n > 1 else None,
                }
            for curve in ("deletion_curve", "insertion_curve"):
                row[curve] = np.mean(values[curve][:, j], axis=0).tolist()
            out[level][m] = row
    return out


def markdown_table(summary: dict, images: int) -> str:
    """One table per level: methods x (deletion AUC, insertion AUC, infidelity subset / gaussian), mean (s.e.)."""
    lines = [
        f"Faithfulness on {images} test images (explained output: the predicted class's probability); "
        "mean (standard error) over images",
        "",
    ]
    for level, rows in summary.items():
        where = "layer A (locations of the feature grid)" if level == "A" else "the pixels (maps upsampled)"
        lines += [
            f"At {where}:",
            "",
            "| Method | Deletion AUC (lower better) | Insertion AUC (higher better) | Infidelity, subsets "
            "(lower better) | Infidelity, gaussian (lower better) |",
            "|---|---|---|---|---|",
        ]
        for m, row in rows.items():
            cells = []
            for metric in METRICS:
                mean, se = row[metric]["mean"], row[metric]["se"]
                cells.append(f"{mean:.4g}" + ("" if se is None else f" ({se:.2g})"))
            lines.append(f"| {LABELS[m]} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def _plot(path: Path, rows: dict, curve: str, steps: int, level: str) -> Path:
    from delib_jax.evaluation.tables import plot_curves

    x = np.linspace(0.0, 1.0, steps + 1)
    series = [(LABELS[m], x, np.asarray(row[curve])) for m, row in rows.items()]
    mode = curve.split("_")[0]
    where = "A's locations" if level == "A" else "pixels"
    return plot_curves(
        path,
        series,
        xlabel=f"{where} {'removed' if mode == 'deletion' else 'inserted'} (%)",
        ylabel="probability of the predicted class (%)",
        title=f"{mode.capitalize()} at {level}",
    )


def _weights_stamp(checkpoint: Path) -> list:
    """Sizes and modification times of the run's checkpoint files: retrained weights start the partial results
    afresh."""
    files = sorted(p for p in Path(checkpoint, "checkpoints").rglob("*") if p.is_file())
    return [[str(p.relative_to(checkpoint)), p.stat().st_size, p.stat().st_mtime_ns] for p in files]


def _write_json(path: Path, data) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, allow_nan=False))
    tmp.replace(path)


def _test_images(config, data_dir: Path, options: FaithfulnessOptions):
    """(number of images, iterator of normalised image batches) of a seeded sample of the test split of the run's
    data (read with its recorded options: class folders and TFDS catalog datasets give the same test split as in
    training)."""
    from delib_jax.data import class_names, dataset_kind, load_dataset
    from delib_jax.data.pipeline import eval_pipeline

    if config.dataset is None:  # an imported run: no dataset of its own, a folder of images
        return _folder_images(config, data_dir, options)
    kind = dataset_kind(config.dataset)  # CUB / ADE20K (release or TFDS build), class folders, a TFDS catalog dataset
    ds = load_dataset(config.dataset, data_dir, options=config.data_options)
    make = kind.source
    names = class_names(ds)
    if list(names) != list(config.class_names):
        raise UsageError(
            f"the dataset at {data_dir} does not have the run's {config.num_classes} classes in its "
            "order: evaluate on the dataset the run was trained on"
        )
    test = make(ds, "test")
    n = min(options.num_images, len(test))
    chosen = np.sort(np.random.default_rng(options.seed).choice(len(test), n, replace=False))
    source = make(ds, indices=test.indices[chosen])
    pipe = eval_pipeline(
        source, batch_size=options.batch_size, resize=config.resize, crop=config.crop, stats=config.normalization
    )
    return n, (batch["image"] for batch in pipe)


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")


def _folder_images(config, folder: Path, options: FaithfulnessOptions):
    """(number of images, iterator of normalised batches) of a seeded sample of the image files under ``folder``
    (recursively), preprocessed as the run says: the test images of a run imported from weights, which has no
    dataset of its own (faithfulness needs no labels: every map explains the predicted class)."""
    from delib_jax.explanation import ImageReadError, preprocess, read_image

    if not folder.is_dir():
        raise UsageError(f"--data-dir {folder} is not a folder of images")
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise UsageError(
            f"no images ({', '.join(IMAGE_SUFFIXES)}) under {folder}: a run imported from weights is evaluated on a "
            "folder of your images"
        )
    n = min(options.num_images, len(files))
    chosen = [files[i] for i in np.sort(np.random.default_rng(options.seed).choice(len(files), n, replace=False))]

    def batches():
        for start in range(0, n, options.batch_size):
            images = []
            for f in chosen[start : start + options.batch_size]:
                try:
                    image = read_image(f)
                except ImageReadError as e:
                    raise UsageError(f"{e}: remove or fix it, then run the same command again") from None
                images.append(preprocess(image, resize=config.resize, crop=config.crop,
                                         normalization=config.normalization)[1])  # fmt: skip
            yield np.stack(images)

    return n, batches()


def data_and_out(checkpoint: Path, data_dir: Path | None, out: Path, *, synthetic: bool) -> Path:
    """The run's test data folder (``data_dir``, or with ``synthetic`` the synthetic dataset the run was trained on)
    and the output folder created; `UsageError` (one line) otherwise."""
    from delib_jax.checkpoint import load_run_config

    if data_dir is None:
        if not synthetic:
            raise UsageError(
                "give --data-dir with the run's dataset, or --synthetic for the synthetic dataset the "
                "run was trained on"
            )
        config = load_run_config(checkpoint)
        if not config.synthetic or not config.data_dir:
            raise UsageError(f"{checkpoint} was not trained on a synthetic dataset: give --data-dir")
        data_dir = Path(config.data_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"cannot create --out {out}: {e.strerror or e}; choose another folder") from None
    return data_dir


def run(
    checkpoint: Path,
    data_dir: Path | None,
    out: Path,
    options: FaithfulnessOptions,
    *,
    synthetic: bool = False,
    progress: Callable[[str], None] = print,
) -> dict:
    """Evaluate one run; write OUT/results.json, OUT/table.md and the curve plots; return the summary."""
    from delib_jax.checkpoint import load_model

    options = options.check()
    data_dir = data_and_out(checkpoint, data_dir, out, synthetic=synthetic)
    model, config = load_model(checkpoint)
    n, batches = _test_images(config, data_dir, options)
    identity = {
        "checkpoint": str(Path(checkpoint).absolute()),
        "weights": _weights_stamp(checkpoint),
        "data_dir": str(Path(data_dir).absolute()),
        "images": n,
        "options": asdict(options),
    }
    partial = _partial_folder(out, identity, progress)
    progress(f"explaining {n} test images of {data_dir} with {', '.join(options.methods)}")
    per_image = evaluate_batches(model, batches, options, total=math.ceil(n / options.batch_size), partial=partial)
    summary = summarize(per_image, options.methods)
    (out / "table.md").write_text(markdown_table(summary, n))
    plots = [
        _plot(out / f"{curve.split('_')[0]}_{level}.png", rows, curve, options.steps, level).name
        for level, rows in summary.items()
        for curve in ("deletion_curve", "insertion_curve")
    ]
    result = {
        "checkpoint": str(checkpoint),
        "data_dir": str(data_dir),
        "images": n,
        "options": asdict(options),
        "explained_output": "softmax probability of the predicted class",
        "levels": summary,
        "plots": plots,
    }
    _write_json(out / "results.json", result)
    return result


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m eval.faithfulness",
        description="Compare attribution methods by faithfulness (deletion / insertion curves and their areas, "
        "infidelity) at layer A and at the pixels, against random maps; writes results.json, table.md "
        "and plots.",
        epilog="example: python -m eval.faithfulness --checkpoint runs/cub --synthetic --out runs/cub/faithfulness",
    )
    p.add_argument("--checkpoint", required=True, metavar="RUN_DIR", help="a trained run directory")
    p.add_argument(
        "--data-dir",
        help="the run's dataset folder (CUB_200_2011 / ADEChallengeData2016 or a TFDS build, its class folders, the "
        "TFDS data folder of its catalog dataset), or for a run imported with delib import a folder of your images",
    )
    p.add_argument("--synthetic", action="store_true", help="use the synthetic dataset the run was trained on")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument(
        "--methods",
        nargs="+",
        default=list(METHODS),
        metavar="METHOD",
        help=f"attribution methods to compare (default all: {' '.join(METHODS)})",
    )
    p.add_argument(
        "--levels",
        nargs="+",
        default=list(LEVELS),
        metavar="LEVEL",
        help="where locations are removed / inserted: A (the feature grid) and/or pixels (default both)",
    )
    p.add_argument("--num-images", type=int, default=32, help="test images, a seeded sample (default 32)")
    p.add_argument("--steps", type=int, default=20, help="curve points beyond the start (default 20)")
    p.add_argument("--samples", type=int, default=32, help="infidelity perturbations per image (default 32)")
    p.add_argument("--ig-steps", type=int, default=50, help="integrated-gradients nodes (default 50)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry: one clear line (exit 2) for bad input, never a traceback; 130 after Ctrl-C."""
    args = build_parser().parse_args(argv)
    from delib_jax.data import DatasetError

    try:
        if not Path(args.checkpoint).is_dir():
            raise UsageError(f"checkpoint run directory not found: {args.checkpoint}")
        options = FaithfulnessOptions(
            methods=tuple(dict.fromkeys(args.methods)),
            levels=tuple(dict.fromkeys(args.levels)),
            num_images=args.num_images,
            steps=args.steps,
            samples=args.samples,
            ig_steps=args.ig_steps,
            batch_size=args.batch_size,
            seed=args.seed,
        )
        options.check()
        summary = run(
            Path(args.checkpoint),
            Path(args.data_dir) if args.data_dir else None,
            Path(args.out),
            options,
            synthetic=args.synthetic,
            progress=lambda m: print(m, file=sys.stderr),
        )
    except (UsageError, ValueError, OSError, DatasetError) as e:  # incl. load_model's errors for corrupt runs
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            f"\ninterrupted: finished batches are kept in {Path(args.out) / 'partial'}; the same command continues",
            file=sys.stderr,
        )
        return 130
    print((Path(args.out) / "table.md").read_text())
    print(f"wrote {args.out}/results.json, table.md and {', '.join(summary['plots'])}")
    return 0
