"""Geometric transforms that move images, part keypoints and label masks together, exactly.

Coordinate convention (used throughout `delib_jax.data`): a keypoint ``(x, y)`` is in pixel units of its image, with the
image's top-left corner at ``(0, 0)``; pixel ``(row i, column j)`` covers ``[j, j + 1) x [i, i + 1)`` so its centre is
``(j + 0.5, i + 0.5)``. This is PIL's convention for ``resize(..., box=...)``, so the affine map used for keypoints is
exactly the one PIL samples images and masks with.

Images are read with `read_rgb` (and converted with `to_rgb`): the one decoder of the training and evaluation
pipelines and of ``delib explain``, so that a model sees the same pixels wherever a file is read.

Every transform is a `Plan`: take the source region ``box = (x0, y0, x1, y1)``, resize it to ``size = (W, H)`` and
optionally mirror it left-right. A source point maps to ``x' = (x - x0) * W / (x1 - x0)`` (then ``W - x'`` if flipped),
``y' = (y - y0) * H / (y1 - y0)``; a point that lands outside ``[0, W) x [0, H)`` becomes invisible. Mirroring also
swaps left and right parts (``flip_permutation``). Images are resampled bilinearly (with PIL's antialiasing on
downscale, as torchvision's PIL path), masks with nearest neighbour.

The factories reproduce torchvision: `eval_plan` is ``Resize(resize)`` + ``CenterCrop(crop)``, `train_plan` is
``RandomResizedCrop(crop, scale=(0.08, 1), ratio=(3/4, 4/3))`` + ``RandomHorizontalFlip()``.
"""

from __future__ import annotations

import dataclasses
import io
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps


@dataclasses.dataclass(frozen=True)
class Normalization:
    """Per-channel statistics of RGB images scaled to [0, 1]: ``(x / 255 - mean) / std``."""

    mean: tuple[float, float, float]
    std: tuple[float, float, float]


CUB_STATS = Normalization(mean=(0.4706, 0.4600, 0.4548), std=(0.2667, 0.2658, 0.2706))
"""The CUB-200-2011 statistics of the authors' code."""
IMAGENET_STATS = Normalization(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
"""ImageNet statistics (torchvision's pretrained models; the authors' ADE20K setting)."""


@dataclasses.dataclass(frozen=True)
class Plan:
    """One geometric transform: crop ``box`` (source pixels, floats), resize to ``size``, mirror if ``flip``.

    Attributes:
      box: ``(x0, y0, x1, y1)`` in source pixel coordinates.
      size: output ``(width, height)``.
      flip: mirror the output left-right.
    """

    box: tuple[float, float, float, float]
    size: tuple[int, int]
    flip: bool = False


def flip_permutation(part_names: Sequence[str]) -> np.ndarray:
    """The part order after a left-right mirror: ``"left X"`` and ``"right X"`` swap, other parts stay.

    Returns:
      (P,) int64 ``perm`` such that ``mirrored[:, k] = original[:, perm[k]]``.
    """
    names = list(part_names)
    perm = np.arange(len(names), dtype=np.int64)
    for k, name in enumerate(names):
        for a, b in (("left ", "right "), ("right ", "left ")):
            if name.startswith(a) and b + name[len(a) :] in names:
                perm[k] = names.index(b + name[len(a) :])
    return perm


def resized_size(width: int, height: int, shorter: int) -> tuple[int, int]:
    """torchvision ``Resize(shorter)``'s output ``(width, height)``: the shorter side becomes ``shorter``, the longer
    ``int(shorter * long / short)``."""
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    if width <= height:
        return shorter, int(shorter * height / width)
    return int(shorter * width / height), shorter


def resize_plan(width: int, height: int, shorter: int) -> Plan:
    """The whole image resized so that its shorter side is ``shorter`` (torchvision ``Resize(shorter)``), no crop."""
    return Plan(box=(0.0, 0.0, float(width), float(height)), size=resized_size(width, height, shorter))


def eval_plan(width: int, height: int, *, resize: int = 256, crop: int = 224) -> Plan:
    """torchvision ``Resize(resize)`` (shorter side to ``resize``) then ``CenterCrop(crop)``, as one `Plan`.

    The resized long side is ``int(resize * long / short)`` and the crop offsets ``int(round((R - crop) / 2))``, as in
    torchvision. Crops larger than the resized image are not supported (torchvision pads).
    """
    if crop > resize:
        raise ValueError(f"crop ({crop}) must not exceed resize ({resize})")
    new_w, new_h = resized_size(width, height, resize)
    left, top = int(round((new_w - crop) / 2.0)), int(round((new_h - crop) / 2.0))
    sx, sy = width / new_w, height / new_h
    return Plan(box=(left * sx, top * sy, (left + crop) * sx, (top + crop) * sy), size=(crop, crop))


def random_resized_crop_box(
    width: int,
    height: int,
    rng: np.random.Generator,
    *,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> tuple[int, int, int, int]:
    """torchvision's ``RandomResizedCrop.get_params``: 10 tries of a random area and aspect, else a centre crop.

    Returns:
      ``(left, top, w, h)`` in integer source pixels.
    """
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return left, top, w, h
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        w, h = int(round(height * max(ratio))), height
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


def train_plan(
    width: int,
    height: int,
    rng: np.random.Generator,
    *,
    crop: int = 224,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    flip_probability: float = 0.5,
) -> Plan:
    """torchvision ``RandomResizedCrop(crop)`` then ``RandomHorizontalFlip(flip_probability)``, drawn from ``rng``."""
    left, top, w, h = random_resized_crop_box(width, height, rng, scale=scale, ratio=ratio)
    flip = bool(rng.uniform() < flip_probability)
    return Plan(box=(float(left), float(top), float(left + w), float(top + h)), size=(crop, crop), flip=flip)


def apply_to_image(plan: Plan, image: Image.Image) -> np.ndarray:
    """Resample an RGB image (bilinear, antialiased on downscale).

    Returns:
      (H, W, 3) uint8 with ``(W, H) = plan.size``.
    """
    rgb = image if image.mode == "RGB" else image.convert("RGB")  # convert() would copy an RGB image
    out = rgb.resize(plan.size, Image.Resampling.BILINEAR, box=plan.box)
    if plan.flip:
        out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return np.asarray(out, dtype=np.uint8)


def apply_to_mask(plan: Plan, mask: np.ndarray) -> np.ndarray:
    """Resample a label mask with nearest neighbour (labels are never mixed).

    Args:
      mask: (h, w) integer labels in [0, 255].

    Returns:
      (H, W) uint8; output pixel ``(i, j)`` takes the source pixel containing the mapped centre of ``(i, j)``.
    """
    if mask.ndim != 2:
        raise ValueError(f"mask must be (H, W), got shape {mask.shape}")
    out = Image.fromarray(np.asarray(mask, dtype=np.uint8)).resize(plan.size, Image.Resampling.NEAREST, box=plan.box)
    if plan.flip:
        out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return np.asarray(out, dtype=np.uint8)


def apply_to_points(
    plan: Plan, points: np.ndarray, visible: np.ndarray, *, flip_perm: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Map keypoints through the plan.

    Args:
      points: (P, 2) ``(x, y)`` in source pixels.
      visible: (P,) bool.
      flip_perm: (P,) part order after a mirror (`flip_permutation`); required when ``plan.flip`` and P > 0.

    Returns:
      ``(points, visible)``: (P, 2) float32 output coordinates and (P,) bool; points outside ``[0, W) x [0, H)`` or
      invisible in the source come back invisible, with coordinates ``(0, 0)``.
    """
    points = np.asarray(points, dtype=np.float64)
    x0, y0, x1, y1 = plan.box
    w, h = plan.size
    x = (points[:, 0] - x0) * (w / (x1 - x0))
    y = (points[:, 1] - y0) * (h / (y1 - y0))
    if plan.flip:
        x = w - x
    inside = np.asarray(visible, dtype=bool) & (x >= 0) & (x < w) & (y >= 0) & (y < h)
    out = np.where(inside[:, None], np.stack([x, y], axis=-1), 0.0).astype(np.float32)
    if plan.flip and len(out):
        if flip_perm is None:
            raise ValueError("a mirrored plan needs flip_perm to swap left and right parts")
        out, inside = out[flip_perm], inside[flip_perm]
    return out, inside


def apply_to_box(plan: Plan, box: np.ndarray) -> np.ndarray:
    """Map a box ``(x, y, w, h)`` in source pixels through the plan (not clipped to the output).

    Returns:
      (4,) float32 ``(x, y, w, h)`` in output pixels; a mirrored plan mirrors the box.
    """
    x, y, w, h = np.asarray(box, dtype=np.float64)
    x0, y0, x1, y1 = plan.box
    sx, sy = plan.size[0] / (x1 - x0), plan.size[1] / (y1 - y0)
    nx, ny = (x - x0) * sx, (y - y0) * sy
    if plan.flip:
        nx = plan.size[0] - (nx + w * sx)
    return np.asarray([nx, ny, w * sx, h * sy], dtype=np.float32)


class ImageReadError(ValueError):
    """An image file that cannot be read (missing, empty, corrupt, of an unknown format, or with NaN/inf pixels)."""


_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any Pillow image to 8-bit RGB.

    16-bit grey (modes I;16*, and I, which Pillow uses for 16-bit files) is scaled by 255/65535 (Pillow's own
    conversion clips at 255 instead); float grey (F) is clipped to [0, 255] and refused (`ImageReadError`) if it holds
    NaN or infinite values; transparency (RGBA, LA, PA, P with a transparent colour) is composited over white; CMYK,
    YCbCr, 1-bit and palette images use Pillow's conversion.
    """
    mode = image.mode
    if mode in _SIXTEEN_BIT:
        grey = np.asarray(image, dtype=np.float64)
        grey = np.clip(np.rint(np.clip(grey, 0, 65535) * (255.0 / 65535.0)), 0, 255).astype(np.uint8)
        return Image.fromarray(grey).convert("RGB")
    if mode == "F":
        values = np.asarray(image, np.float64)
        if not np.isfinite(values).all():
            raise ImageReadError("float image with NaN or infinite pixel values")
        return Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8)).convert("RGB")
    if mode in ("RGBA", "LA", "PA", "La", "RGBa") or (mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.copy() if mode == "RGB" else image.convert("RGB")


def read_rgb(path: str | Path, *, exif_orientation: bool = True) -> Image.Image:
    """Open, fully decode and convert an image file to RGB (`to_rgb`); with ``exif_orientation`` turned upright as
    its EXIF orientation says (datasets pass False: their annotations are in the stored pixels' coordinates).

    Raises `ImageReadError` ("PATH: reason", one line) for a missing, empty, corrupt, unsupported or NaN file."""
    path = Path(path)
    try:
        empty = path.stat().st_size == 0
    except (OSError, ValueError) as e:  # ValueError: a name with a NUL character
        raise ImageReadError(f"{path!s:.200}: cannot read image ({getattr(e, 'strerror', None) or e})") from None
    if empty:
        raise ImageReadError(f"{path}: empty file")
    return _open_rgb(path, str(path), exif_orientation)


def decode_rgb(data: bytes, name: str, *, exif_orientation: bool = True) -> Image.Image:
    """`read_rgb` for an encoded image held in memory (e.g. a TFDS record); ``name`` stands for the file in errors."""
    if not data:
        raise ImageReadError(f"{name}: empty file")
    return _open_rgb(io.BytesIO(data), name, exif_orientation)


def _open_rgb(fp, name: str, exif_orientation: bool) -> Image.Image:
    try:
        with Image.open(fp) as image:
            image.load()
            if exif_orientation:
                image = ImageOps.exif_transpose(image)
            rgb = to_rgb(image)
            rgb.load()
            return rgb
    except ImageReadError as e:
        raise ImageReadError(f"{name}: {e}") from None
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as e:
        reason = (str(e).strip() or type(e).__name__).replace(repr(fp), repr(name))  # Pillow names a buffer by repr
        raise ImageReadError(f"{name}: cannot read image ({reason})") from None


def _affine(stats: Normalization) -> tuple[np.ndarray, np.ndarray]:
    """(3,) float32 shift and scale with ``normalized = (pixels - shift) * scale``."""
    shift = np.asarray(stats.mean, np.float32) * np.float32(255.0)
    return shift, np.float32(1.0) / (np.asarray(stats.std, np.float32) * np.float32(255.0))


def normalize(image: np.ndarray, stats: Normalization) -> np.ndarray:
    """(..., 3) uint8 -> (..., 3) float32 ``(image / 255 - mean) / std``, on the host."""
    shift, scale = _affine(stats)
    out = image.astype(np.float32)
    out -= shift
    out *= scale
    return out


def model_input(images, stats: Normalization | None):
    """What a model takes from a batch's ``images`` (B, H, W, 3): uint8 pixels are normalised here, with the same
    float32 arithmetic as `normalize` (inside ``jit`` this runs on the device: a quarter of the bytes cross to it, and
    the host's input threads skip the work); float images are taken as already normalised and returned as they are.

    ``stats`` may be None only for float images. Works on NumPy and JAX arrays (JAX is imported on first use only, so
    that decoding processes never load it)."""
    if images.dtype != np.uint8:
        return images
    if stats is None:
        raise ValueError("uint8 images need the normalisation statistics (stats) to become model input")
    import jax.numpy as jnp

    shift, scale = _affine(stats)
    return (jnp.asarray(images).astype(jnp.float32) - shift) * scale
