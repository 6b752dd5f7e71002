"""`python -m eval.interactions`: Integrated Hessians, Expected Hessians and SmoothHess of a trained model at layer A,
for the hardest test images, with their completeness residuals, their agreement and a deletion test.

For each image (the ``num_images`` hardest by the difficulty score among a seeded sample of ``pool`` test images),
the interactions between A's locations of the predicted class's probability are computed by Integrated Hessians (zero
baseline) and Expected Hessians (baselines: other sampled test images), both on the softplus surrogate of sharpness
``beta`` (its distance to the model's logits is reported), and by SmoothHess (the model itself, smoothed by N(0,
(sigma std(A))^2)). Written: completeness residuals (relative to f(x) - f(x')); agreement (Pearson correlation of
the off-diagonal entries between methods); deletion curves that set A to zero on the locations of the k most
positively interacting pairs (Integrated Hessians), against k random pairs, with the measured interaction of a pair
f(x) - f(x without l) - f(x without m) + f(x without l, m) on the model; and a figure of the first image's
insecurity region's interactions with the rest for its two classes. OUT/results.json, OUT/table.md, PNGs.

Each finished image is kept in OUT/partial/ (for the same run, data and options), so that a killed command continues.
Exit status: 0 done, 2 bad input (one line on stderr), 130 interrupted.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from delib_jax.attribution import (
    expected_hessians,
    integrated_hessians,
    smooth_hessians,
    split_model,
    surrogate_gap,
)
from delib_jax.evaluation.faithfulness_job import (
    UsageError,
    _load_batch,
    _partial_folder,
    _save_batch,
    _test_images,
    _weights_stamp,
    _write_json,
    data_and_out,
)

METHODS = ("integrated", "expected", "smoothhess")


@dataclass(frozen=True)
class InteractionOptions:
    """What to compute and how finely."""

    num_images: int = 4
    pool: int = 16
    nodes: int = 16
    references: int = 4
    beta: float = 10.0
    sigma: float = 0.1
    samples: int = 128
    pairs: int = 8
    seed: int = 0

    def check(self) -> InteractionOptions:
        for name, low in (("num_images", 1), ("nodes", 1), ("references", 1), ("samples", 2), ("pairs", 1)):
            if getattr(self, name) < low:
                raise ValueError(f"--{name.replace('_', '-')} must be at least {low}, got {getattr(self, name)}")
        if self.pool < self.num_images + self.references:
            raise ValueError(
                f"--pool must be at least --num-images + --references ({self.num_images + self.references})"
            )
        if not self.beta > 0 or not self.sigma > 0:
            raise ValueError("--beta and --sigma must be positive")
        return self


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a - a.mean(), b - b.mean()
    den = math.sqrt(float((a * a).sum() * (b * b).sum()))
    return float((a * b).sum() / den) if den > 0 else float("nan")


def deletion(head, x: np.ndarray, target: int, pairs: np.ndarray) -> np.ndarray:
    """(K + 1,) probability of ``target`` as A (1, H, W, D) is zeroed on the locations of the first k pairs (K, 2)."""
    h, w = x.shape[1:3]
    masks = np.ones((len(pairs) + 1, h * w), np.float32)
    for k, (i, j) in enumerate(pairs):
        masks[k + 1 :, [i, j]] = 0
    xs = jnp.asarray(x) * jnp.asarray(masks).reshape(-1, h, w, 1)
    return np.asarray(jax.nn.softmax(head(xs), -1)[:, target])


def measured_interactions(head, x: np.ndarray, target: int, pairs: np.ndarray) -> np.ndarray:
    """(K,) f(x) - f(x \\ l) - f(x \\ m) + f(x \\ l, m) of each pair on the model (f: ``target``'s probability)."""
    h, w = x.shape[1:3]
    masks = np.ones((len(pairs), 4, h * w), np.float32)
    for k, (i, j) in enumerate(pairs):
        masks[k, 1, i] = masks[k, 2, j] = 0
        masks[k, 3, [i, j]] = 0
    xs = jnp.asarray(x) * jnp.asarray(masks).reshape(-1, h, w, 1)
    p = np.asarray(jax.nn.softmax(head(xs), -1)[:, target]).reshape(-1, 4)
    return p[:, 0] - p[:, 1] - p[:, 2] + p[:, 3]


def image_scores(model, images, index: int, refs, options: InteractionOptions, key) -> dict:
    """The per-image results (arrays) of image ``index`` of ``images`` (B, H, W, 3)."""
    features, head = split_model(model, "A")
    image = images[index : index + 1]
    x = np.asarray(features(image))
    h, w = x.shape[1:3]
    kw = dict(targets=2, beta=options.beta, nodes=options.nodes)
    ih = integrated_hessians(features, head, image, **kw)
    eh = expected_hessians(features, head, image, refs, **kw)
    sigma = options.sigma * float(np.std(x))
    sh = smooth_hessians(features, head, image, sigma=sigma, samples=options.samples, key=key, targets=ih.targets)
    _, pixel_head = split_model(model, "image")
    gap = surrogate_gap(pixel_head, image, options.beta)
    values = {m: np.asarray(r.values[0, 0]) for m, r in zip(METHODS, (ih, eh, sh))}
    off = ~np.eye(h * w, dtype=bool)
    agreement = [
        _pearson(values[a][off], values[b][off])
        for a, b in ((0, 1), (0, 2), (1, 2))
        for a, b in [(METHODS[a], METHODS[b])]
    ]
    target = int(ih.targets[0, 0])
    upper = np.triu_indices(h * w, 1)
    strength = values["integrated"][upper] + values["integrated"].T[upper]
    k = min(options.pairs, len(strength))
    top = np.stack(upper, 1)[np.argsort(-strength)[:k]]
    rng = np.random.default_rng(options.seed + index)
    random = np.stack(upper, 1)[rng.choice(len(strength), k, replace=False)]
    region_rows = integrated_hessians(
        features,
        head,
        image,
        targets=ih.targets,
        beta=options.beta,
        nodes=options.nodes,
        rows=_region(values["integrated"], h, w)[None],
    )
    sh_scale = np.abs(values["smoothhess"]).mean() + 1e-12
    scale = lambda r: np.abs(np.asarray(r.difference[0])).max() + 1e-12
    return {
        "residual": np.array(
            [float(np.abs(ih.residual[0]).max() / scale(ih)), float(np.abs(eh.residual[0]).max() / scale(eh))]
        ),
        "row_residual": np.array([float(np.abs(ih.row_residual[0]).max() / scale(ih))]),
        "agreement": np.array(agreement),
        "surrogate_gap": np.array([float(gap.max_abs[0]), float(gap.relative[0]), float(gap.same_top1[0])]),
        "smoothhess_rel_stderr": np.array([float(np.asarray(sh.stderr[0, 0]).mean() / sh_scale)]),
        "deletion_top": deletion(head, x, target, top),
        "deletion_random": deletion(head, x, target, random),
        "measured_top": measured_interactions(head, x, target, top),
        "measured_random": measured_interactions(head, x, target, random),
        "region": _region(values["integrated"], h, w),
        "region_rows": np.asarray(region_rows.values[0, :, 0]).reshape(2, h, w),
        "targets": np.asarray(ih.targets[0]),
    }


def _region(gamma: np.ndarray, h: int, w: int) -> np.ndarray:
    """(H, W) float mask: the locations whose rows of |Gamma| are largest (a quarter of the grid, at least one) -- the
    region the figure shows against the rest."""
    strength = np.abs(gamma).sum(1)
    k = max(1, (h * w) // 4)
    mask = np.zeros(h * w, np.float32)
    mask[np.argsort(-strength)[:k]] = 1
    return mask.reshape(h, w)


def run(
    checkpoint: Path,
    data_dir: Path | None,
    out: Path,
    options: InteractionOptions,
    *,
    synthetic: bool = False,
    progress: Callable[[str], None] = print,
) -> dict:
    """Evaluate one run; write OUT/results.json, OUT/table.md, OUT/deletion.png and OUT/insecurity.png."""
    from delib_jax.checkpoint import load_model

    options = options.check()
    data_dir = data_and_out(checkpoint, data_dir, out, synthetic=synthetic)
    model, config = load_model(checkpoint)
    sample = argparse.Namespace(num_images=options.pool, batch_size=options.pool, seed=options.seed)
    n, batches = _test_images(config, data_dir, sample)
    pool = jnp.concatenate([jnp.asarray(b) for b in batches])
    if n < options.num_images + options.references:
        raise UsageError(f"the test split has {n} images: fewer than --num-images + --references")
    features, head = split_model(model, "A")
    probs = jax.nn.softmax(head(features(pool)), -1)
    hardness = -np.sort(np.asarray(probs), -1)[:, -1]  # least confident first (the difficulty the model shows)
    order = np.argsort(-hardness)
    chosen, refs = order[: options.num_images], pool[np.sort(order[::-1][: options.references])]
    identity = {
        "checkpoint": str(Path(checkpoint).absolute()),
        "weights": _weights_stamp(checkpoint),
        "data_dir": str(Path(data_dir).absolute()),
        "options": asdict(options),
    }
    partial = _partial_folder(out, identity, progress)
    images = pool[np.asarray(chosen)]
    progress(f"interactions of the {len(chosen)} hardest of {n} sampled test images at A")
    key = jax.random.key(options.seed)
    per_image = []
    for i in range(len(chosen)):
        key, k = jax.random.split(key)
        saved = _load_batch(partial / f"batch-{i:05d}.npz", ["image"])
        if saved is None:
            saved = {"image": image_scores(model, images, i, refs, options, k)}
            _save_batch(partial / f"batch-{i:05d}.npz", saved)
        per_image.append(saved["image"])
    result = summarize(per_image, options, config, n)
    (out / "table.md").write_text(markdown_table(result))
    _plot_deletion(out / "deletion.png", result)
    _figure(out / "insecurity.png", images[0], per_image[0], config, data_stats=config.normalization)
    result["plots"] = ["deletion.png", "insecurity.png"]
    _write_json(out / "results.json", result)
    return result


def _mean_se(v: np.ndarray) -> dict:
    v = np.asarray(v, np.float64)
    return {"mean": float(np.nanmean(v)), "se": float(np.nanstd(v, ddof=1) / math.sqrt(len(v))) if len(v) > 1 else None}


def summarize(per_image: list[dict], options: InteractionOptions, config, pool: int) -> dict:
    stack = lambda name: np.stack([p[name] for p in per_image])
    agreement = stack("agreement")
    return {
        "images": len(per_image),
        "pool": pool,
        "options": asdict(options),
        "explained_output": "softmax probability of the predicted class, at layer A",
        "residual_integrated": _mean_se(stack("residual")[:, 0]),
        "residual_expected": _mean_se(stack("residual")[:, 1]),
        "row_residual_integrated": _mean_se(stack("row_residual")[:, 0]),
        "agreement": {
            "integrated_vs_expected": _mean_se(agreement[:, 0]),
            "integrated_vs_smoothhess": _mean_se(agreement[:, 1]),
            "expected_vs_smoothhess": _mean_se(agreement[:, 2]),
        },
        "surrogate_max_abs_logit_gap": _mean_se(stack("surrogate_gap")[:, 0]),
        "surrogate_relative_logit_gap": _mean_se(stack("surrogate_gap")[:, 1]),
        "surrogate_same_top1": float(stack("surrogate_gap")[:, 2].mean()),
        "smoothhess_relative_stderr": _mean_se(stack("smoothhess_rel_stderr")[:, 0]),
        "deletion_top_pairs": np.mean(stack("deletion_top"), 0).tolist(),
        "deletion_random_pairs": np.mean(stack("deletion_random"), 0).tolist(),
        "measured_interaction_top_pairs": _mean_se(stack("measured_top").mean(1)),
        "measured_interaction_random_pairs": _mean_se(stack("measured_random").mean(1)),
    }


def markdown_table(r: dict) -> str:
    f = lambda d: f"{d['mean']:.3g}" + ("" if d["se"] is None else f" ({d['se']:.2g})")
    a = r["agreement"]
    lines = [
        f"Interactions at A of the predicted class's probability, {r['images']} hardest of {r['pool']} test images; "
        "mean (standard error) over images",
        "",
        "| Quantity | Value |",
        "|---|---|",
        f"| Integrated Hessians: total residual / |f(x) - f(x')| | {f(r['residual_integrated'])} |",
        f"| Integrated Hessians: max row residual / |f(x) - f(x')| | {f(r['row_residual_integrated'])} |",
        f"| Expected Hessians: total residual / |f(x) - E f(x')| | {f(r['residual_expected'])} |",
        f"| Agreement (Pearson, off-diagonal) IH vs EH | {f(a['integrated_vs_expected'])} |",
        f"| Agreement IH vs SmoothHess | {f(a['integrated_vs_smoothhess'])} |",
        f"| Agreement EH vs SmoothHess | {f(a['expected_vs_smoothhess'])} |",
        f"| Surrogate: max abs logit gap | {f(r['surrogate_max_abs_logit_gap'])} |",
        f"| Surrogate: same top-1 class | {r['surrogate_same_top1']:.3g} |",
        f"| SmoothHess: mean stderr / mean abs value | {f(r['smoothhess_relative_stderr'])} |",
        f"| Measured pair interaction, top IH pairs | {f(r['measured_interaction_top_pairs'])} |",
        f"| Measured pair interaction, random pairs | {f(r['measured_interaction_random_pairs'])} |",
        "",
    ]
    return "\n".join(lines)


def _plot_deletion(path: Path, r: dict) -> Path:
    from delib_jax.evaluation.tables import plot_curves

    k = np.arange(len(r["deletion_top_pairs"]))
    series = [
        ("most interacting pairs (IH)", k, np.asarray(r["deletion_top_pairs"])),
        ("random pairs", k, np.asarray(r["deletion_random_pairs"])),
    ]
    return plot_curves(
        path,
        series,
        xlabel="pairs of A's locations zeroed",
        ylabel="probability of the predicted class",
        title="Deletion of interacting pairs",
    )


def _figure(path: Path, image, scores: dict, config, data_stats) -> Path:
    from delib_jax.attribution_figures import region_interaction_figure

    mean, std = np.asarray(data_stats.mean), np.asarray(data_stats.std)
    shown = np.clip((np.asarray(image) * std + mean) * 255, 0, 255).astype(np.uint8)
    names = [config.class_names[int(t)] for t in scores["targets"]]
    fig = region_interaction_figure(shown, scores["region"] > 0, scores["region_rows"], names=names)
    fig.savefig(path, format="png")
    return path


def build_parser() -> argparse.ArgumentParser:
    d = InteractionOptions()
    p = argparse.ArgumentParser(
        prog="python -m eval.interactions",
        description="Integrated / Expected Hessians and SmoothHess at layer A for the hardest test images: "
        "completeness residuals, agreement, deletion of interacting pairs; results.json, table.md, figures.",
        epilog="example: python -m eval.interactions --checkpoint runs/cub --synthetic --out runs/cub/interactions",
    )
    p.add_argument("--checkpoint", required=True, metavar="RUN_DIR", help="a trained run directory")
    p.add_argument("--data-dir", help="the run's dataset folder")
    p.add_argument("--synthetic", action="store_true", help="use the synthetic dataset the run was trained on")
    p.add_argument("--out", required=True, help="output folder")
    for name, kind, help_ in (
        ("num_images", int, "hardest test images explained"),
        ("pool", int, "test images sampled (the hardest are explained, the easiest are the EH baselines)"),
        ("nodes", int, "Gauss nodes of the -ln t rule"),
        ("references", int, "Expected Hessians baselines"),
        ("beta", float, "softplus sharpness of the surrogate"),
        ("sigma", float, "SmoothHess noise, in units of A's standard deviation"),
        ("samples", int, "SmoothHess gradient samples"),
        ("pairs", int, "pairs deleted"),
        ("seed", int, "sampling seed"),
    ):
        p.add_argument(
            f"--{name.replace('_', '-')}", type=kind, default=getattr(d, name), help=f"{help_} (default %(default)s)"
        )
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry: one clear line (exit 2) for bad input, never a traceback; 130 after Ctrl-C."""
    args = build_parser().parse_args(argv)
    from delib_jax.data import DatasetError

    try:
        if not Path(args.checkpoint).is_dir():
            raise UsageError(f"checkpoint run directory not found: {args.checkpoint}")
        options = InteractionOptions(**{k: getattr(args, k) for k in asdict(InteractionOptions())}).check()
        run(
            Path(args.checkpoint),
            Path(args.data_dir) if args.data_dir else None,
            Path(args.out),
            options,
            synthetic=args.synthetic,
            progress=lambda m: print(m, file=sys.stderr),
        )
    except (UsageError, ValueError, OSError, DatasetError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\ninterrupted: finished images are kept in {Path(args.out) / 'partial'}", file=sys.stderr)
        return 130
    print((Path(args.out) / "table.md").read_text())
    print(f"wrote {args.out}/results.json, table.md, deletion.png and insecurity.png")
    return 0
