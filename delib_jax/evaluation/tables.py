"""Tables (the format of the paper's Table 1) and curves of evaluation results."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from delib_jax.evaluation.metrics import COVERAGES

TABLE_COVERAGES = (0.1, 0.2, 0.3, 0.4, 0.5)


def nanmean(x, axis=None, **kw) -> np.ndarray:
    """np.nanmean that returns NaN without a warning where every value is NaN (a metric undefined at a coverage on
    every insecurity, common on small evaluations; tables show it as '-')."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(np.asarray(x, dtype=float), axis=axis, **kw)


def _nanstd(x, axis=None) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanstd(np.asarray(x, dtype=float), axis=axis)


def _at(curve: np.ndarray, coverage: float) -> float:
    return float(curve[int(np.argmin(np.abs(COVERAGES - coverage)))])


def summarize(curves: Sequence[Sequence[float]]) -> dict:
    """mean and std over runs of a metric at the table's coverages and their average (values in %)."""
    arr = 100.0 * np.asarray(curves, dtype=float)  # (runs, R)
    cols = np.stack([[_at(c, cov) for cov in TABLE_COVERAGES] for c in arr])  # (runs, 5)
    cols = np.concatenate([cols, nanmean(cols, axis=1, keepdims=True)], axis=1)
    return {"mean": nanmean(cols, axis=0).tolist(), "std": _nanstd(cols, axis=0).tolist(), "runs": len(arr)}


def markdown_table(rows: Sequence[tuple[str, dict]], *, metric: str) -> str:
    """rows: (name, summarize(...)) -> a markdown table: coverage 10% .. 50% and Avg., 'mean (std)'."""
    head = "| Methods | " + " | ".join(f"{int(c * 100)}%" for c in TABLE_COVERAGES) + " | Avg. | runs |"
    lines = [
        f"{metric} (%) at the coverage of each insecurity, mean (std) over runs",
        "",
        head,
        "|---" * (len(TABLE_COVERAGES) + 3) + "|",
    ]
    for name, s in rows:
        cells = [("–" if np.isnan(m) else f"{m:.2f} ({d:.2f})") for m, d in zip(s["mean"], s["std"])]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {s['runs']} |")
    return "\n".join(lines) + "\n"


def plot_curves(
    path: str | Path, series: Sequence[tuple[str, np.ndarray, np.ndarray]], *, xlabel: str, ylabel: str, title: str
) -> Path:
    """One PNG with a line per (label, x, y); y in [0, 1] shown in %."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.5, 4.2), dpi=120)
    ax = fig.add_subplot()
    for label, x, y in series:
        style = {"linestyle": "--", "color": "grey"} if label.lower().startswith("random") else {}
        ax.plot(100 * np.asarray(x), 100 * np.asarray(y), label=label, linewidth=1.6, **style)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    return path
