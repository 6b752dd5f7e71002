"""Figures of deliberative explanations, in the spirit of the paper's Fig. 1 and 3 (matplotlib, Agg, no pyplot state).

    save_figure(explanation, pixels, "out/bird.png", examples={17: "train/017/a.jpg", ...})

The input with its prediction and difficulty, the top-N class probabilities, Grad-CAM of the prediction, the
difficulty attribution map, then each insecurity that is not negligible: the image dimmed outside the insecurity's
region, the region outlined, titled with its class pair, its share of the image's ambiguity and its coverage. When
``examples`` (class index or name -> image path or (H, W, 3) uint8) has some, a second row shows under each
insecurity an example image of class a and of class b (and the top classes and difficulty map move there).
"""

from __future__ import annotations

import io
import textwrap
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from PIL import Image

from delib_jax.explanation import Explanation, Insecurity, atomic_write, read_image
from delib_jax.insecurity import NEGLIGIBLE_PROBABILITY

ExampleImage = str | Path | np.ndarray
COLORS = ("#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6", "#9a6324")


def resize_map(values: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of a float map (H, W) to ``size`` = (H_img, W_img)."""
    image = Image.fromarray(np.asarray(values, np.float32), mode="F")
    return np.asarray(image.resize((size[1], size[0]), Image.Resampling.BILINEAR), np.float32)


def _unit(values: np.ndarray) -> np.ndarray:
    lo, hi = float(np.min(values)), float(np.max(values))
    return np.zeros_like(values) if hi <= lo else (values - lo) / (hi - lo)


def heatmap_overlay(image: np.ndarray, heat: np.ndarray, *, alpha: float = 0.5, cmap: str = "viridis") -> np.ndarray:
    """A heat map (H, W) (any resolution, rescaled to [0, 1]) blended over an (H_img, W_img, 3) uint8 image, in a
    perceptually uniform colour map (viridis: brightness grows with the value, also in grey)."""
    from matplotlib import colormaps

    heat = _unit(resize_map(heat, image.shape[:2]))
    colored = colormaps[cmap](heat)[..., :3] * 255.0
    return np.clip((1 - alpha) * image + alpha * colored, 0, 255).astype(np.uint8)


def mask_overlay(image: np.ndarray, mask: np.ndarray, *, dim: float = 0.3) -> np.ndarray:
    """The image with everything outside ``mask`` (H_img, W_img) darkened to ``dim`` of its brightness."""
    keep = np.asarray(mask, bool)[..., None]
    return np.where(keep, image, (image * dim)).astype(np.uint8)


def load_example(example: ExampleImage, size: int = 160) -> np.ndarray:
    """An example image as a square (size, size, 3) uint8 thumbnail (centre crop)."""
    if isinstance(example, np.ndarray):
        image = Image.fromarray(np.asarray(example, np.uint8))
    else:
        image = read_image(example)
    side = min(image.size)
    left, top = (image.width - side) // 2, (image.height - side) // 2
    image = image.crop((left, top, left + side, top + side)).resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(image.convert("RGB"), np.uint8)


def find_example(examples: Mapping | None, index: int, name: str) -> ExampleImage | None:
    """``examples[index]``, else ``examples[name]``, else None."""
    if not examples:
        return None
    if index in examples:
        return examples[index]
    return examples.get(name)


def printable(text) -> str:
    """``str(text)`` made writable as UTF-8: lone surrogates -- the undecodable bytes of a file name as
    ``os.fsdecode`` returns them, or any other -- become U+FFFD. Everything else is kept."""
    text = str(text)
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return "".join("\ufffd" if 0xD800 <= ord(ch) <= 0xDFFF else ch for ch in text)


# Text is drawn as given: no mathtext ('$...$' in a class name) and no LaTeX, whatever the user's matplotlibrc says.
_PLAIN_TEXT = {"text.parse_math": False, "text.usetex": False}


def words(name) -> str:
    """A class name as words: '_' read as a space (CUB's 'Scissor_tailed_Flycatcher'), printable."""
    return " ".join(printable(name).replace("_", " ").split())


def wrap_name(name, width: int = 22) -> str:
    """A class name on lines of about ``width`` characters, broken only between words (a single word longer than
    ``width`` stays whole unless it is longer than twice that, which no word of a language is)."""
    text = words(name)
    lines = textwrap.wrap(text, width, break_long_words=False, break_on_hyphens=True)
    lines = [part for line in lines for part in (textwrap.wrap(line, 2 * width) if len(line) > 2 * width else [line])]
    return "\n".join(lines) or text


def _title(q: int, item: Insecurity, share: float | None) -> str:
    strength = "" if share is None else f"{share:.0%} of the ambiguity · "
    return f"{q + 1}. {wrap_name(item.name_a)}\nvs {wrap_name(item.name_b)}\n{strength}covers {item.coverage:.0%}"


def _show(ax, image, title=None, color=None):
    ax.imshow(image)
    ax.set_xticks([])
    ax.set_yticks([])
    if color is not None:
        for spine in ax.spines.values():
            spine.set_edgecolor(color)
            spine.set_linewidth(3)
    if title:
        ax.set_title(title, fontsize=8, color=color or "black")


def explanation_figure(
    explanation: Explanation,
    image: np.ndarray,
    *,
    examples: Mapping | None = None,
    max_insecurities: int | None = None,
    dpi: int = 100,
):
    """The figure (a matplotlib ``Figure``, Agg canvas) of one explanation.

    image: (H_img, W_img, 3) uint8, the network input before normalisation (what the masks align with).
    examples: class index or name -> example image (path or uint8 array), for the examples of classes a and b.
    Only the insecurities that are not negligible (`Explanation.competing`) are drawn; an image without any says that
    nothing competes. Names wrap between words and every text lies inside the canvas (constrained layout); maps use
    the perceptually uniform viridis colour map. Names are drawn as plain text, whatever they hold ('$' signs,
    backslashes, undecodable bytes).
    """
    import matplotlib

    with matplotlib.rc_context(_PLAIN_TEXT):
        return _figure(explanation, image, examples=examples, max_insecurities=max_insecurities, dpi=dpi)


def _bars(ax, e: Explanation) -> None:
    """The top-N class probabilities, names wrapped between words (the layout makes room for them)."""
    probs = e.probs[e.classes]
    ax.barh(np.arange(len(probs))[::-1], probs, color="#4363d8")
    ax.set_yticks(np.arange(len(probs))[::-1], [wrap_name(n, 18) for n in e.class_names], fontsize=7)
    ax.set_xlim(0, 1)
    ax.tick_params(axis="x", labelsize=7)
    ax.set_title("top classes", fontsize=8)


def _figure(explanation: Explanation, image: np.ndarray, *, examples, max_insecurities, dpi):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    image = np.asarray(image, np.uint8)
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image must be (H, W, 3) uint8, got shape {image.shape}")
    if tuple(image.shape[:2]) != tuple(explanation.image_size):
        raise ValueError(f"image is {image.shape[:2]}, the explanation was computed at {explanation.image_size}")
    e = explanation
    shares = dict(zip(map(id, e.insecurities), e.shares))
    quiet = len(e.insecurities) - len(e.competing)
    items = list(e.competing[:max_insecurities])
    pairs = [[find_example(examples, q.a, q.name_a), find_example(examples, q.b, q.name_b)] for q in items]
    with_examples = any(x is not None for pair in pairs for x in pair)
    # Without examples one row: input, top classes, Grad-CAM, difficulty, then the insecurities. With examples two:
    # input, Grad-CAM and the insecurities above; top classes, difficulty and each insecurity's examples below.
    panels = max(1, len(items))
    cols = 2 + panels if with_examples else 4 + panels
    titles = [_title(q, item, shares.get(id(item))) for q, item in enumerate(items)]
    lines = max([t.count("\n") + 1 for t in titles] + [wrap_name(e.prediction_name).count("\n") + 2])
    row = 2.5 + 0.22 * lines  # an image panel and its title, in inches
    height = row + 2.4 if with_examples else row
    fig = Figure(figsize=(2.3 * cols, height), dpi=dpi, layout="constrained")
    FigureCanvasAgg(fig)
    ratios = (row, 2.4) if with_examples else None
    grid = fig.add_gridspec(2 if with_examples else 1, cols, height_ratios=ratios)
    top = 2 if with_examples else 4
    _show(
        fig.add_subplot(grid[0, 0]),
        image,
        f"{wrap_name(e.prediction_name)}\np = {e.confidence:.2f} · {printable(e.score)} {float(e.difficulty):.2f}",
    )
    bars = fig.add_subplot(grid[1, 0] if with_examples else grid[0, 1])
    _bars(bars, e)
    _show(fig.add_subplot(grid[0, 1 if with_examples else 2]), heatmap_overlay(image, e.grad_cam),
          "Grad-CAM\nof the prediction")  # fmt: skip
    _show(
        fig.add_subplot(grid[1, 1] if with_examples else grid[0, 3]),
        heatmap_overlay(image, np.maximum(e.difficulty_map, 0)),
        f"difficulty attribution\n({printable(e.method)})",
    )
    if not items:
        ax = fig.add_subplot(grid[0, top])
        ax.axis("off")
        if e.insecurities:
            text = (f"nothing competes:\nin every pair one class\nhas p < {NEGLIGIBLE_PROBABILITY:.0%}\n"
                    f"({quiet} negligible\ninsecurities)")  # fmt: skip
        else:
            text = "no insecurity:\nno two classes compete\nwhere the image is difficult"
        ax.text(0.5, 0.5, text, ha="center", va="center", fontsize=8)
    for q, (item, pair) in enumerate(zip(items, pairs)):
        color = COLORS[q % len(COLORS)]
        ax = fig.add_subplot(grid[0, top + q])
        _show(ax, mask_overlay(image, item.mask), titles[q], color)
        if item.mask.any():
            ax.contour(item.mask.astype(np.float32), levels=[0.5], colors=[color], linewidths=1.2)
        if with_examples and any(p is not None for p in pair):
            sub = grid[1, top + q].subgridspec(1, 2)
            for j, (example, name) in enumerate(zip(pair, (item.name_a, item.name_b))):
                ax = fig.add_subplot(sub[0, j])
                if example is None:
                    ax.axis("off")
                    continue
                _show(ax, load_example(example), wrap_name(name, 12), color)
    if quiet and items:
        fig.suptitle(f"{quiet} negligible insecurities not drawn (a class with p < {NEGLIGIBLE_PROBABILITY:.0%})",
                     fontsize=7, color="#777")  # fmt: skip
    _settle(fig)
    return fig


SNAP = 64  # axes are fixed at multiples of 1/SNAP of a pixel


def _settle(fig) -> None:
    """Lay the figure out once (constrained layout), then fix every axes where the layout put it, rounded to 1/SNAP
    of a pixel, and turn the layout engine off: a figure is a pure function of its inputs. (The layout solver's
    answer varies in its last bits from one process to another, about 1e-15 of the figure; that moved the
    anti-aliased edges of the insecurities' outlines by one colour level in some pixels, so that two runs of the
    same command drew different PNG files.)"""
    engine = fig.get_layout_engine()
    if engine is None:
        return
    engine.execute(fig)
    width, height = fig.bbox.width, fig.bbox.height
    for ax in fig.axes:
        x0, y0, x1, y1 = ax.get_position(original=True).extents
        x0, x1 = (round(v * width * SNAP) / (width * SNAP) for v in (x0, x1))
        y0, y1 = (round(v * height * SNAP) / (height * SNAP) for v in (y0, y1))
        ax.set_position((x0, y0, x1 - x0, y1 - y0), which="both")
    fig.set_layout_engine("none")


def figure_png(explanation: Explanation, image: np.ndarray, **kw) -> bytes:
    """The figure as PNG bytes."""
    import matplotlib

    fig = explanation_figure(explanation, image, **kw)
    buffer = io.BytesIO()
    with matplotlib.rc_context(_PLAIN_TEXT):
        fig.savefig(buffer, format="png")
    return buffer.getvalue()


def figure_name(index: int, source: str | Path | None, *, max_bytes: int = 100) -> str:
    """A file name for the figure of image ``index``: ``{index:05d}_{stem}.png``, the stem of ``source`` reduced to
    ASCII letters, digits, '-', '_' and '.' and cut so that the name stays within ``max_bytes`` bytes (any name a
    file system holds works: long, non-Latin, undecodable bytes)."""
    stem = Path(str(source)).stem if source else "image"
    safe = "".join(ch if ch.isascii() and (ch.isalnum() or ch in "-_.") else "_" for ch in stem)
    head = f"{index:05d}_"
    return head + safe[: max(0, max_bytes - len(head) - 4)] + ".png"


def save_figure(explanation: Explanation, image: np.ndarray, path: str | Path, **kw) -> Path:
    """Write the figure to ``path`` as PNG (atomically); options as `explanation_figure`."""
    data = figure_png(explanation, image, **kw)
    return atomic_write(path, lambda f: f.write(data))


__all__ = [
    "explanation_figure", "figure_name", "figure_png", "find_example", "heatmap_overlay", "load_example",
    "mask_overlay", "printable", "resize_map", "save_figure", "words", "wrap_name",
]  # fmt: skip
