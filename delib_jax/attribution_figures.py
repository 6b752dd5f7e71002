"""Figures of attributions: a signed overlay, and which locations one location interacts with for two classes.

    overlay = attribution_overlay(image, attr.maps[0, 0])               # (H_img, W_img, 3) uint8
    inter = model_interaction_maps(model, images)
    rows = interaction_rows(inter, (7, 7), image_index=0, location=(3, 4), outputs=(a, b))   # (2, 7, 7)
    interaction_figure(image, rows, (3, 4), names=("Least Auklet", "Parakeet Auklet")).savefig("pair.png")

Matplotlib with the Agg canvas only (no pyplot state); values are shown with a diverging colormap centred at zero,
red for positive, blue for negative, transparent where the value is small.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image


def _resize(values: np.ndarray, size: tuple[int, int], nearest: bool = False) -> np.ndarray:
    image = Image.fromarray(np.asarray(values, np.float32), mode="F")
    method = Image.Resampling.NEAREST if nearest else Image.Resampling.BILINEAR
    return np.asarray(image.resize((size[1], size[0]), method), np.float32)


def _plain(text: str) -> str:
    """A name shown as written: matplotlib would read '$...$' as mathematics."""
    return str(text).replace("$", r"\$")


def _check_image(image) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image must be (H, W, 3) uint8, got {image.dtype} {image.shape}")
    return image


def attribution_overlay(
    image: np.ndarray,
    values: np.ndarray,
    *,
    signed: bool = True,
    alpha: float = 0.7,
    scale: float | None = None,
    nearest: bool = False,
    cmap: str = "bwr",
) -> np.ndarray:
    """An attribution map (h, w) (any resolution, resized to the image) over an (H, W, 3) uint8 image.

    signed: diverging colours centred at zero, opacity growing with |value| / scale (scale: max |value| by default);
    otherwise the map rescaled to [0, 1] with ``cmap`` at uniform opacity. nearest: show cells as blocks."""
    from matplotlib import colormaps

    image = _check_image(image)
    values = np.asarray(values, np.float32)
    if values.ndim != 2:
        raise ValueError(f"values must be one map (h, w), got shape {values.shape}")
    heat = _resize(values, image.shape[:2], nearest)
    if signed:
        scale = float(np.abs(values).max()) if scale is None else float(scale)
        unit = np.clip(heat / scale, -1.0, 1.0) if scale > 0 else np.zeros_like(heat)
        colored = colormaps[cmap]((unit + 1.0) / 2.0)[..., :3] * 255.0
        weight = alpha * np.abs(unit)[..., None]
    else:
        lo, hi = float(heat.min()), float(heat.max())
        unit = (heat - lo) / (hi - lo) if hi > lo else np.zeros_like(heat)
        colored = colormaps["viridis" if cmap == "bwr" else cmap](unit)[..., :3] * 255.0
        weight = alpha
    return np.clip((1 - weight) * image + weight * colored, 0, 255).astype(np.uint8)


def interaction_rows(
    interactions, grid: tuple[int, int], *, image_index: int, location: tuple[int, int], outputs: Sequence[int]
) -> np.ndarray:
    """(len(outputs), H, W): the interactions of ``location`` (i, j) with every location, for the given output
    indices (e.g. the two classes of an insecurity), from an `Interactions` whose rows include that location."""
    h, w = grid
    i, j = location
    if h * w != interactions.values.shape[-1]:
        raise ValueError(f"grid {grid} does not hold the {interactions.values.shape[-1]} locations of the maps")
    if not (0 <= i < h and 0 <= j < w):
        raise ValueError(f"location {location} lies outside the {h} x {w} grid")
    rows = np.asarray(interactions.rows)
    found = np.flatnonzero(rows == i * w + j)
    if not len(found):
        raise ValueError(f"location {location} is not among the computed rows: pass locations=[{i * w + j}]")
    targets = np.asarray(interactions.targets)[image_index]
    index = []
    for t in outputs:
        where = np.flatnonzero(targets == t)
        if not len(where):
            raise ValueError(f"output {t} was not explained for image {image_index} (targets {targets.tolist()})")
        index.append(int(where[0]))
    values = np.asarray(interactions.values)[image_index][index, found[0]]  # (len(outputs), L)
    return values.reshape(len(index), h, w)


def interaction_figure(
    image: np.ndarray,
    rows: np.ndarray,
    location: tuple[int, int],
    *,
    names: Sequence[str] = ("class a", "class b"),
    title: str | None = None,
    shared_scale: bool = False,
    dpi: int = 100,
):
    """A matplotlib Figure: the image with the chosen grid cell outlined, then for each class its interaction
    x_l^T H_lm x_m with every location m (rows (K, H, W), one per class; each panel on its own colour scale, named
    in its title, unless ``shared_scale``)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    image = _check_image(image)
    rows = np.asarray(rows, np.float32)
    if rows.ndim != 3 or len(rows) != len(names):
        raise ValueError(f"rows must be (K, H, W) with one map per name ({len(names)}), got shape {rows.shape}")
    h, w = rows.shape[1:]
    i, j = location
    if not (0 <= i < h and 0 <= j < w):
        raise ValueError(f"location {location} lies outside the {h} x {w} grid")
    shared = float(np.abs(rows).max())
    cell_h, cell_w = image.shape[0] / h, image.shape[1] / w
    fig = Figure(figsize=(2.6 * (1 + len(rows)), 3.3), dpi=dpi)
    FigureCanvasAgg(fig)
    panels = [(image, f"location ({i}, {j})")]
    for name, row in zip(names, rows):
        scale = shared if shared_scale else float(np.abs(row).max())
        panels.append(
            (
                attribution_overlay(image, row, scale=scale, nearest=True),
                f"{_plain(name)}\nsum {float(row.sum()):.3g}, self {float(row[i, j]):.3g}\nmax |I| {scale:.2g}",
            )
        )
    for k, (shown, label) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), k + 1)
        ax.imshow(shown)
        ax.add_patch(
            Rectangle((j * cell_w - 0.5, i * cell_h - 0.5), cell_w, cell_h, fill=False, edgecolor="lime", linewidth=2)
        )
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(label, fontsize=8)
    default = "interactions x_l^T H_lm x_m of one location l with every m (red +, blue -)"
    fig.suptitle(_plain(title) if title else default, fontsize=9)
    fig.subplots_adjust(left=0.02, right=0.98, bottom=0.03, top=0.76, wspace=0.08)
    return fig


def save_interaction_figure(
    image: np.ndarray, rows: np.ndarray, location: tuple[int, int], path: str | Path, **kw
) -> Path:
    """Write `interaction_figure` to ``path`` (PNG)."""
    path = Path(path)
    interaction_figure(image, rows, location, **kw).savefig(path, format="png")
    return path


def region_interaction_figure(
    image: np.ndarray,
    region: np.ndarray,
    rows: np.ndarray,
    *,
    names: Sequence[str] = ("class a", "class b"),
    title: str | None = None,
    dpi: int = 100,
):
    """A matplotlib Figure: the image with a region (H, W) of the feature grid outlined (e.g. an insecurity's), then
    for each class the region's interaction with every location (rows (K, H, W), e.g. `integrated_hessians` with
    rows=[region]), each panel on its own colour scale named in its title."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    image = _check_image(image)
    rows = np.asarray(rows, np.float32)
    region = np.asarray(region, bool)
    if rows.ndim != 3 or len(rows) != len(names) or rows.shape[1:] != region.shape:
        raise ValueError(
            f"rows must be (K, H, W) with one map per name ({len(names)}) on the region's grid {region.shape}, "
            f"got shape {rows.shape}"
        )
    outline = _resize(region.astype(np.float32), image.shape[:2], nearest=True)
    fig = Figure(figsize=(2.6 * (1 + len(rows)), 3.3), dpi=dpi)
    FigureCanvasAgg(fig)
    panels = [(image, f"region ({int(region.sum())} of {region.size} cells)")]
    for name, row in zip(names, rows):
        scale = float(np.abs(row).max())
        inside = float(row[region].sum())
        panels.append(
            (
                attribution_overlay(image, row, scale=scale, nearest=True),
                f"{_plain(name)}\nwith the rest {float(row.sum()) - inside:.3g}, within {inside:.3g}\n"
                f"max |G| {scale:.2g}",
            )
        )
    for k, (shown, label) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), k + 1)
        ax.imshow(shown)
        ax.contour(outline, levels=[0.5], colors="lime", linewidths=2)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(label, fontsize=8)
    default = "Integrated Hessians of the region with every location (red +, blue -)"
    fig.suptitle(_plain(title) if title else default, fontsize=9)
    fig.subplots_adjust(left=0.02, right=0.98, bottom=0.03, top=0.76, wspace=0.08)
    return fig
