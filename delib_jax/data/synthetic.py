"""Synthetic CUB-200-2011 and ADE20K datasets in the exact release formats, generated offline in seconds.

CUB: procedurally drawn birds. Each class fixes a value for every drawn attribute group of the 15 named parts (colours,
bill/wing/tail shapes, patterns). Classes come in families of consecutive classes (1-5, 6-10, ... by default), like
CUB's genera: a family's members share all the attributes of a few part regions and differ in the others, so the
evaluation protocol's ground-truth ambiguities are mostly these built-in ones (the README of the tree lists them).
Each image draws the bird at a random facing (left/right), rotation, scale and position over a cluttered, noisy
background; about 10% of an image's attribute values deviate from its class's, and the class-level percentages are
exactly the frequencies of what was drawn. Keypoints are the exact positions used for drawing (project convention: see
`delib_jax.data.transforms`); the far eye and wing are hidden, the far leg sometimes, and out-of-frame parts are
invisible.

ADE20K: scenes composed of objects from the 150-object vocabulary with scene-dependent frequencies (pairs of scenes
share some characteristic objects), their masks, ``sceneCategories.txt`` and ``objectInfo150.txt`` computed from the
masks; a few validation images carry a scene never seen in training.

Same seed, same bytes. Command line::

    python -m delib_jax.data.synthetic cub --out /tmp/cub        # -> /tmp/cub/CUB_200_2011, /tmp/cub/attributes.txt
    python -m delib_jax.data.synthetic ade20k --out /tmp/ade     # -> /tmp/ade/ADEChallengeData2016
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import math
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from delib_jax.data.cub import ATTRIBUTE_GROUPS, ATTRIBUTE_NAMES, CERTAINTY_NAMES, PART_NAMES

# ----------------------------------------------------------------------------------------------------------- CUB

RGB: dict[str, tuple[int, int, int]] = {
    "blue": (40, 80, 210), "brown": (115, 70, 35), "iridescent": (40, 170, 160), "purple": (120, 45, 150),
    "rufous": (175, 75, 30), "grey": (128, 128, 128), "yellow": (235, 210, 40), "olive": (120, 125, 40),
    "green": (40, 150, 60), "pink": (240, 150, 185), "orange": (245, 140, 25), "black": (25, 25, 25),
    "white": (240, 240, 240), "red": (205, 30, 30), "buff": (220, 190, 140),
}  # fmt: skip

_GROUP_VALUES = dict(ATTRIBUTE_GROUPS)
_GROUP_OFFSET = {}
_offset = 0
for _g, _v in ATTRIBUTE_GROUPS:
    _GROUP_OFFSET[_g] = _offset
    _offset += len(_v)
del _offset, _g, _v

# Part regions whose attribute groups the members of a family share wholesale.
REGIONS: dict[str, tuple[str, ...]] = {
    "beak": ("bill_shape", "bill_length", "bill_color"),
    "wing": ("wing_color", "wing_shape", "wing_pattern"),
    "back": ("back_color", "back_pattern"),
    "belly": ("belly_color", "belly_pattern"),
    "breast": ("breast_color", "breast_pattern"),
    "head": ("crown_color", "forehead_color", "head_pattern"),
    "nape": ("nape_color",),
    "throat": ("throat_color",),
    "eye": ("eye_color",),
    "leg": ("leg_color",),
    "tail": ("tail_shape", "tail_pattern", "upper_tail_color", "under_tail_color"),
}
DRAWN_GROUPS: tuple[str, ...] = tuple(g for groups in REGIONS.values() for g in groups) + ("size", "shape")
# Groups that describe no single part follow from drawn ones.
DERIVED_GROUPS = {"upperparts_color": "back_color", "underparts_color": "belly_color", "primary_color": "back_color"}
_SHAPES = ("perching-like", "upland-ground-like", "swallow-like")  # drawn body proportions
_SIZES = ("very_small_(3_-_5_in)", "small_(5_-_9_in)", "medium_(9_-_16_in)")  # drawn scale
_BIRD_NOUNS = (
    "Finch", "Warbler", "Sparrow", "Vireo", "Tanager", "Flycatcher", "Wren", "Thrush", "Bunting", "Grosbeak",
    "Oriole", "Swallow", "Kingbird", "Pipit", "Towhee", "Junco", "Shrike", "Waxwing", "Cuckoo", "Nuthatch",
)  # fmt: skip
# Which part keypoints a region's attributes need visible (certainty "not visible" otherwise).
_REGION_PARTS = {
    "beak": ("beak",), "wing": ("left wing", "right wing"), "back": ("back",), "belly": ("belly",),
    "breast": ("breast",), "head": ("crown", "forehead"), "nape": ("nape",), "throat": ("throat",),
    "eye": ("left eye", "right eye"), "leg": ("left leg", "right leg"), "tail": ("tail",),
}  # fmt: skip


@dataclasses.dataclass(frozen=True)
class BirdClass:
    """A synthetic species: ``values[group]`` is the value name of each drawn group."""

    name: str
    values: dict[str, str]


def _choices(group: str) -> tuple[str, ...]:
    if group == "shape":
        return _SHAPES
    if group == "size":
        return _SIZES
    return _GROUP_VALUES[group]


def make_bird_classes(
    num_classes: int, seed: int, *, family_size: int = 5, shared: tuple[int, int] = (4, 6)
) -> tuple[list[BirdClass], list[tuple[int, int, tuple[str, ...]]]]:
    """Class definitions, in families of ``family_size`` consecutive classes (the last one may be smaller).

    Like the genera of CUB, the members of a family share every attribute of the family's part regions (``shared``
    gives the range of their number, of the 11) and differ from each other in the rest: in every attribute group of
    a non-shared region that has enough values, so each such region looks different for every two members. Classes
    of different families are drawn independently (they match only by chance). Hard images are then mostly confused
    within a family, on the family's regions, which are the ground-truth ambiguities.

    Returns:
      ``(classes, pairs)`` with ``pairs`` a list of ``(class a, class b, shared regions)`` (0-based, a < b) for
      every two members of a family.
    """
    if family_size < 1 or not 0 <= shared[0] <= shared[1] <= len(REGIONS):
        raise ValueError(f"need family_size >= 1 and 0 <= shared[0] <= shared[1] <= {len(REGIONS)}")
    rng = np.random.default_rng([seed, 1])
    classes: list[dict[str, str]] = []
    pairs = []
    names = list(REGIONS)
    for start in range(0, num_classes, family_size):
        members = range(start, min(start + family_size, num_classes))
        family = tuple(
            sorted(rng.choice(names, size=int(rng.integers(shared[0], shared[1] + 1)), replace=False).tolist())
        )
        base = {g: str(rng.choice(_choices(g))) for g in DRAWN_GROUPS}
        for c in members:
            values = {g: str(rng.choice(_choices(g))) for g in DRAWN_GROUPS}
            for region in names:
                for g in REGIONS[region]:
                    if region in family:
                        values[g] = base[g]
                        continue
                    taken = {classes[m][g] for m in range(start, c)} | {base[g]}
                    free = [v for v in _choices(g) if v not in taken]
                    if free and values[g] in taken:
                        values[g] = str(rng.choice(free))
            classes.append(values)
        pairs += [(a, b, family) for a, b in itertools.combinations(members, 2)]
    out = []
    for c, values in enumerate(classes):
        noun = _BIRD_NOUNS[c % len(_BIRD_NOUNS)] + ("" if c < len(_BIRD_NOUNS) else f"_{c // len(_BIRD_NOUNS) + 1}")
        out.append(BirdClass(f"{c + 1:03d}.{values['wing_color'].capitalize()}_Winged_{noun}", values))
    return out, pairs


def _image_values(cls: BirdClass, rng: np.random.Generator, variation: float) -> dict[str, str]:
    """An image's attribute values: its class's, each group deviating with probability ``variation``."""
    values = dict(cls.values)
    for g in DRAWN_GROUPS:
        if g not in ("size", "shape") and rng.uniform() < variation:
            values[g] = str(rng.choice(_choices(g)))
    return values


def _ellipse(cx: float, cy: float, rx: float, ry: float, n: int = 28, a0: float = 0.0, a1: float = 2 * math.pi):
    return [(cx + rx * math.cos(t), cy + ry * math.sin(t)) for t in np.linspace(a0, a1, n)]


def _sector(cx, cy, r, deg0, deg1, inner=None, n=10):
    pts = _ellipse(cx, cy, r, r, n, math.radians(deg0), math.radians(deg1))
    return pts + [inner if inner is not None else (cx, cy)]


_TAILS = {
    "forked_tail": [(-0.4, -0.1), (-0.92, -0.2), (-0.72, 0.0), (-0.92, 0.16), (-0.4, 0.08)],
    "rounded_tail": [(-0.4, -0.1)] + _ellipse(-0.72, 0.0, 0.18, 0.13, 12, -math.pi / 2, -3 * math.pi / 2)
    + [(-0.4, 0.08)],
    "notched_tail": [(-0.4, -0.1), (-0.88, -0.14), (-0.8, 0.0), (-0.88, 0.12), (-0.4, 0.08)],
    "fan-shaped_tail": [(-0.4, -0.05), (-0.9, -0.28), (-0.97, 0.0), (-0.9, 0.26), (-0.4, 0.05)],
    "pointed_tail": [(-0.4, -0.1), (-0.98, 0.0), (-0.4, 0.08)],
    "squared_tail": [(-0.4, -0.1), (-0.88, -0.1), (-0.88, 0.08), (-0.4, 0.08)],
}  # fmt: skip
_WINGS = {
    "rounded-wings": _ellipse(-0.08, -0.02, 0.32, 0.14),
    "pointed-wings": [(0.25, -0.12), (0.12, 0.06), (-0.6, 0.05), (-0.2, -0.14)],
    "broad-wings": _ellipse(-0.05, 0.0, 0.34, 0.2),
    "tapered-wings": [(0.25, -0.1), (0.0, 0.1), (-0.45, 0.12), (-0.2, -0.1)],
    "long-wings": [(0.25, -0.12), (0.05, 0.08), (-0.78, 0.1), (-0.3, -0.1)],
}
_BILL_LENGTH = {"about_the_same_as_head": 0.22, "longer_than_head": 0.36, "shorter_than_head": 0.12}
_EYE = (0.58, -0.35)
_HEAD = (0.5, -0.32, 0.19)
_BEAK_BASE = (0.66, -0.31)


def _bill(shape: str, length: float) -> list[list[tuple[float, float]]]:
    """Beak polygons, in canonical coordinates relative to the beak base."""
    x0, y0 = _BEAK_BASE
    lx = length

    def poly(points):
        return [(x0 + u, y0 + v) for u, v in points]

    if shape == "curved_(up_or_down)":
        top = [(lx * t, -0.05 + 0.12 * t * t) for t in np.linspace(0, 1, 8)]
        bottom = [(lx * t, 0.04 + 0.1 * t * t) for t in np.linspace(1, 0, 8)]
        return [poly(top + bottom)]
    spec = {
        "dagger": [(0, -0.05), (lx, 0.0), (0, 0.05)],
        "hooked": [(0, -0.06), (lx, -0.02), (lx, 0.05), (lx * 0.8, 0.0), (0, 0.06)],
        "needle": [(0, -0.03), (lx * 1.15, 0.0), (0, 0.03)],
        "hooked_seabird": [(0, -0.045), (lx * 1.1, -0.03), (lx * 1.1, 0.06), (lx * 0.95, 0.0), (0, 0.045)],
        "spatulate": [(0, -0.035), (lx, -0.065), (lx, 0.065), (0, 0.035)],
        "all-purpose": [(0, -0.06), (lx, 0.01), (0, 0.06)],
        "cone": [(0, -0.09), (lx * 0.8, 0.0), (0, 0.09)],
    }
    if shape == "specialized":
        return [
            poly([(0, -0.05), (lx, 0.05), (lx, 0.08), (0, -0.02)]),
            poly([(0, 0.05), (lx, -0.05), (lx, -0.02), (0, 0.02)]),
        ]
    return [poly(spec[shape])]


def _contrast(color: tuple[int, int, int]) -> tuple[int, int, int]:
    return (20, 20, 20) if sum(color) > 330 else (235, 235, 235)


@dataclasses.dataclass
class _Canvas:
    """Draws canonical bird geometry (facing right, y down, body length 1) into an image and its keypoints."""

    draw: ImageDraw.ImageDraw
    cx: float
    cy: float
    scale: float
    angle: float
    mirror: bool
    jitter: np.random.Generator
    extent: list

    def point(self, u: float, v: float) -> tuple[float, float]:
        u = -u if self.mirror else u
        c, s = math.cos(self.angle), math.sin(self.angle)
        return self.cx + self.scale * (c * u - s * v), self.cy + self.scale * (s * u + c * v)

    def color(self, name_or_rgb) -> tuple[int, int, int]:
        base = RGB[name_or_rgb] if isinstance(name_or_rgb, str) else name_or_rgb
        return tuple(int(np.clip(c + self.jitter.integers(-14, 15), 0, 255)) for c in base)

    def polygon(self, points, fill, outline=None):
        pts = [self.point(u, v) for u, v in points]
        self.extent.extend(pts)
        self.draw.polygon(pts, fill=fill, outline=outline)

    def line(self, points, fill, width: float):
        pts = [self.point(u, v) for u, v in points]
        self.extent.extend(pts)
        self.draw.line(pts, fill=fill, width=max(1, int(round(width * self.scale))))

    def bar(self, points, fill, width: float):
        """A polyline of width ``width`` (canonical units) drawn as polygons, so thin parts keep their pixels."""
        for (u0, v0), (u1, v1) in itertools.pairwise(points):
            d = math.hypot(u1 - u0, v1 - v0)
            nu, nv = -(v1 - v0) / d * width / 2, (u1 - u0) / d * width / 2
            self.polygon([(u0 + nu, v0 + nv), (u1 + nu, v1 + nv), (u1 - nu, v1 - nv), (u0 - nu, v0 - nv)], fill)

    def dot(self, u, v, r, fill):
        self.polygon(_ellipse(u, v, r, r, 12), fill)


def _pattern(cv: _Canvas, pattern: str, center, radii, base_rgb, rng) -> None:
    """Spots, stripes or a second colour inside an (approximately elliptical) region."""
    (u0, v0), (ru, rv) = center, radii
    mark = _contrast(base_rgb)
    if pattern == "spotted":
        for _ in range(6):
            t, r = rng.uniform(0, 2 * math.pi), math.sqrt(rng.uniform(0, 0.6))
            cv.dot(u0 + ru * r * math.cos(t), v0 + rv * r * math.sin(t), 0.025, mark)
    elif pattern == "striped":
        for k in (-0.5, 0.0, 0.5):
            cv.line([(u0 + ru * (k - 0.15), v0 - rv * 0.7), (u0 + ru * (k + 0.15), v0 + rv * 0.7)], mark, 0.025)
    elif pattern == "multi-colored":
        cv.polygon(_ellipse(u0 - ru * 0.35, v0, ru * 0.5, rv * 0.7, 16), mark)


def _head_pattern(cv: _Canvas, pattern: str, crown_rgb, rng) -> None:
    hx, hy, r = _HEAD
    ex, ey = _EYE
    mark = _contrast(crown_rgb)
    if pattern == "spotted":
        for _ in range(5):
            t, d = rng.uniform(math.pi, 2 * math.pi), rng.uniform(0.3, 0.8)
            cv.dot(hx + r * d * math.cos(t), hy + r * d * math.sin(t), 0.018, mark)
    elif pattern == "malar":
        cv.line([(ex + 0.05, ey + 0.08), (ex - 0.1, ey + 0.14)], mark, 0.03)
    elif pattern == "crested":
        cv.polygon(
            [(hx - 0.08, hy - r * 0.85), (hx - 0.2, hy - r - 0.14), (hx + 0.05, hy - r * 0.9)], cv.color(crown_rgb)
        )
    elif pattern == "masked":
        cv.polygon(_ellipse(ex - 0.01, ey, 0.11, 0.06, 16), mark)
    elif pattern == "unique_pattern":
        cv.polygon(_ellipse(hx - 0.02, hy + 0.08, 0.07, 0.05, 12), (250, 250, 250) if mark[0] < 128 else (30, 30, 200))
    elif pattern == "eyebrow":
        cv.line([(ex - 0.09, ey - 0.07), (ex + 0.07, ey - 0.07)], mark, 0.025)
    elif pattern == "eyering":
        cv.polygon(_ellipse(ex, ey, 0.07, 0.07, 16), mark)
    elif pattern == "eyeline":
        cv.line([(ex - 0.16, ey), (ex + 0.09, ey)], mark, 0.025)
    elif pattern == "striped":
        for dx in (-0.07, 0.03):
            cv.line([(hx + dx - 0.03, hy - r * 0.95), (hx + dx + 0.03, hy - r * 0.3)], mark, 0.022)
    elif pattern == "capped":
        cv.polygon(_sector(hx, hy, r * 1.02, 195, 320, inner=(hx, hy - r * 0.35)), mark)


def _bird_keypoints(length: float, near: str) -> dict[str, tuple[float, float]]:
    """Canonical keypoints (facing right) of a bird whose ``near`` ("left"/"right") side faces the viewer."""
    far = "left" if near == "right" else "right"
    hx, hy, r = _HEAD
    return {
        "back": (-0.1, -0.18), "beak": (_BEAK_BASE[0] + 0.3 * length, _BEAK_BASE[1]), "belly": (-0.12, 0.2),
        "breast": (0.25, 0.12), "crown": (hx - 0.02, hy - r * 0.85), "forehead": (hx + r * 0.78, hy - r * 0.55),
        "right eye": _EYE, "left eye": _EYE, f"{near} leg": (0.04, 0.5), f"{far} leg": (-0.1, 0.5),
        "right wing": (-0.08, -0.01), "left wing": (-0.08, -0.01), "nape": (hx - r * 0.85, hy + r * 0.25),
        "tail": (-0.6, 0.0), "throat": (hx + r * 0.45, hy + r * 0.75),
    }  # fmt: skip


def draw_bird(
    image: Image.Image, values: dict[str, str], rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, tuple[float, float, float, float]]:
    """Draw one bird on ``image`` at a random pose.

    Returns:
      ``(parts, visible, box)``: (15, 2) float64 keypoints in `PART_NAMES` order (project convention), (15,) bool,
      and the bird's ``(x, y, w, h)`` box clipped to the image.
    """
    w, h = image.size
    size_factor = {"very_small_(3_-_5_in)": 0.8, "small_(5_-_9_in)": 0.9, "medium_(9_-_16_in)": 1.0}[values["size"]]
    scale = min(w, h) * rng.uniform(0.3, 0.42) * size_factor
    mirror = bool(rng.uniform() < 0.5)  # facing left
    cv = _Canvas(
        draw=ImageDraw.Draw(image), cx=w * rng.uniform(0.35, 0.65), cy=h * rng.uniform(0.4, 0.6), scale=scale,
        angle=math.radians(rng.uniform(-15, 15)), mirror=mirror, jitter=rng, extent=[],
    )  # fmt: skip
    aspect = {"perching-like": 1.0, "upland-ground-like": 1.15, "swallow-like": 0.85}[values["shape"]]
    length = _BILL_LENGTH[values["bill_length"]]
    far_leg = bool(rng.uniform() < 0.5)

    # perch, far leg, tail, body, belly, breast, wing, near leg, head, throat, nape, forehead, patterns, eye, beak
    perch = tuple(int(c) for c in rng.integers(60, 120, 3))
    cv.line([(-0.7, 0.62), (0.7, 0.62)], perch, 0.05)
    leg = cv.color(values["leg_color"])
    if far_leg:
        cv.bar([(-0.1, 0.22), (-0.1, 0.6), (0.0, 0.62)], tuple(int(c * 0.8) for c in leg), 0.05)
    tail = cv.color(values["upper_tail_color"])
    cv.polygon(_TAILS[values["tail_shape"]], tail)
    cv.polygon([(-0.42, 0.03), (-0.7, 0.05), (-0.7, 0.09), (-0.42, 0.1)], cv.color(values["under_tail_color"]))
    _pattern(cv, values["tail_pattern"], (-0.68, 0.0), (0.14, 0.08), tail, rng)
    back = cv.color(values["back_color"])
    cv.polygon(_ellipse(0.0, 0.0, 0.5, 0.3 * aspect), back)
    _pattern(cv, values["back_pattern"], (-0.05, -0.17), (0.25, 0.07), back, rng)
    belly = cv.color(values["belly_color"])
    cv.polygon(_ellipse(-0.12, 0.15, 0.3, 0.14 * aspect), belly)
    _pattern(cv, values["belly_pattern"], (-0.12, 0.17), (0.22, 0.08), belly, rng)
    breast = cv.color(values["breast_color"])
    cv.polygon(_ellipse(0.24, 0.09, 0.22, 0.17 * aspect), breast)
    _pattern(cv, values["breast_pattern"], (0.26, 0.1), (0.14, 0.1), breast, rng)
    wing = cv.color(values["wing_color"])
    cv.polygon(_WINGS[values["wing_shape"]], wing, outline=_contrast(wing))
    _pattern(cv, values["wing_pattern"], (-0.1, -0.01), (0.22, 0.08), wing, rng)
    cv.bar([(0.04, 0.24), (0.04, 0.6), (0.14, 0.62)], leg, 0.05)
    hx, hy, r = _HEAD
    crown = cv.color(values["crown_color"])
    cv.polygon(_ellipse(hx, hy, r, r), crown)
    cv.polygon(
        _sector(hx, hy, r, 20, 110, inner=(hx + 0.02, hy + 0.02)) + [(0.36, -0.12)], cv.color(values["throat_color"])
    )
    cv.polygon(_sector(hx, hy, r, 140, 215, inner=(hx - r * 0.45, hy)), cv.color(values["nape_color"]))
    cv.polygon(_sector(hx, hy, r, -60, -15, inner=(hx + r * 0.4, hy - r * 0.25)), cv.color(values["forehead_color"]))
    _head_pattern(cv, values["head_pattern"], crown, rng)
    cv.polygon(_ellipse(_EYE[0], _EYE[1], 0.045, 0.045, 16), cv.color(values["eye_color"]), outline=(0, 0, 0))
    cv.dot(_EYE[0], _EYE[1], 0.016, (0, 0, 0))
    bill = cv.color(values["bill_color"])
    for poly in _bill(values["bill_shape"], length):
        cv.polygon(poly, bill, outline=_contrast(bill))

    near, far = ("left", "right") if mirror else ("right", "left")  # a bird facing right shows its right side
    canonical = _bird_keypoints(length, near)
    hidden = {f"{far} eye", f"{far} wing"} | (set() if far_leg else {f"{far} leg"})
    parts = np.array([cv.point(*canonical[p]) for p in PART_NAMES], dtype=np.float64)
    visible = np.array([p not in hidden for p in PART_NAMES]) & (
        (parts[:, 0] >= 0) & (parts[:, 0] < w) & (parts[:, 1] >= 0) & (parts[:, 1] < h)
    )
    parts[~visible] = 0.0
    ext = np.asarray(cv.extent)
    x0, y0 = np.clip(ext.min(0), 0, [w, h])
    x1, y1 = np.clip(ext.max(0), 0, [w, h])
    return parts, visible, (float(x0), float(y0), float(x1 - x0), float(y1 - y0))


def _background(w: int, h: int, rng: np.random.Generator) -> Image.Image:
    """A vertical two-colour gradient with clutter: leaves, branches and blobs, some in bird colours."""
    top, bottom = rng.integers(40, 230, 3), rng.integers(40, 230, 3)
    t = np.linspace(0.0, 1.0, h)[:, None, None]
    grad = (top * (1 - t) + bottom * t) * np.ones((1, w, 1))
    image = Image.fromarray(grad.astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(image)
    palette = list(RGB.values())
    for _ in range(int(rng.integers(6, 14))):
        color = (
            palette[int(rng.integers(len(palette)))]
            if rng.uniform() < 0.4
            else tuple(int(c) for c in rng.integers(0, 256, 3))
        )
        x, y = rng.uniform(-0.1, 1.1) * w, rng.uniform(-0.1, 1.1) * h
        s = rng.uniform(0.04, 0.18) * min(w, h)
        kind = int(rng.integers(3))
        if kind == 0:
            draw.ellipse([x - s, y - s * rng.uniform(0.3, 1.0), x + s, y + s * rng.uniform(0.3, 1.0)], fill=color)
        elif kind == 1:
            draw.line(
                [x, y, x + rng.uniform(-3, 3) * s, y + rng.uniform(-1, 1) * s],
                fill=color,
                width=int(rng.integers(1, 5)),
            )
        else:
            draw.polygon(
                [(x + s * math.cos(a), y + s * math.sin(a) * 0.5) for a in rng.uniform(0, 2 * math.pi, 3)], fill=color
            )
    return image


def _finish(image: Image.Image, rng: np.random.Generator, noise: float) -> Image.Image:
    """Global brightness/contrast jitter and Gaussian pixel noise."""
    array = np.asarray(image, dtype=np.float32)
    array = (array - 128.0) * rng.uniform(0.8, 1.15) + 128.0 + rng.uniform(-20, 20)
    array += rng.normal(0.0, noise, array.shape).astype(np.float32)
    return Image.fromarray(np.clip(np.rint(array), 0, 255).astype(np.uint8), "RGB")


def _fmt(x: float) -> str:
    return f"{x:.2f}"


def _check_out(out: Path, name: str) -> Path:
    """``out/name``, refused if it holds files or cannot be created (a file in the way)."""
    target = out / name
    existing = next(p for p in [target, *target.absolute().parents] if p.exists())
    if not existing.is_dir():
        raise NotADirectoryError(f"{target} cannot be created: {existing} is a file; choose another --out")
    if target.exists() and any(target.iterdir()):
        raise FileExistsError(f"{target} already exists and is not empty: choose another --out")
    return target


def _write(path: Path, lines: Sequence[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{line}\n" for line in lines), encoding="utf-8")


def make_cub(
    out: str | Path,
    *,
    classes: int = 10,
    images_per_class: int = 48,
    size: int = 128,
    seed: int = 0,
    train_fraction: float = 0.75,
    variation: float = 0.1,
    noise: float = 8.0,
    jpeg_quality: int = 90,
    family_size: int = 5,
) -> Path:
    """Write a synthetic CUB-200-2011 release under ``out`` (``CUB_200_2011/`` and ``attributes.txt`` beside it).

    Args:
      out: parent folder (created if needed); ``out/CUB_200_2011`` must not exist or be empty.
      classes: number of species (2..999).
      images_per_class: images per species; the first ``round(train_fraction * images_per_class)`` are training.
      size: image width in pixels (heights vary in [0.75, 1] x size), at least 32.
      seed: everything is a function of the seed: same seed, same bytes.
      train_fraction: fraction of each class in the training split; each split gets at least one image.
      variation: per-image probability that an attribute group deviates from the class's value.
      noise: standard deviation of the Gaussian pixel noise.
      jpeg_quality: JPEG quality (1..95).
      family_size: classes per family (see `make_bird_classes`); 1 makes every class independent.

    Returns:
      the ``CUB_200_2011`` folder.
    """
    if not 2 <= classes <= 999:
        raise ValueError(f"classes must lie in [2, 999], got {classes}")
    if images_per_class < 2:
        raise ValueError(f"images_per_class must be >= 2 (one train, one test), got {images_per_class}")
    if size < 32:
        raise ValueError(f"size must be >= 32 pixels, got {size}")
    if not 0.0 < train_fraction < 1.0:
        raise ValueError(f"train_fraction must lie in (0, 1), got {train_fraction}")
    if not 0.0 <= variation <= 1.0 or noise < 0 or not 1 <= jpeg_quality <= 95:
        raise ValueError("variation must lie in [0, 1], noise be >= 0 and jpeg_quality lie in [1, 95]")
    if family_size < 1:
        raise ValueError(f"family_size must be >= 1, got {family_size}")
    out = Path(out)
    root = _check_out(out, "CUB_200_2011")
    species, pairs = make_bird_classes(classes, seed, family_size=family_size)
    n_train = min(max(1, round(train_fraction * images_per_class)), images_per_class - 1)

    images, labels, split, boxes, part_locs, clicks, attr_lines = [], [], [], [], [], [], []
    counts = np.zeros((classes, len(ATTRIBUTE_NAMES)))
    for c, cls in enumerate(species):
        folder = root / "images" / cls.name
        folder.mkdir(parents=True, exist_ok=True)
        for k in range(images_per_class):
            image_id = c * images_per_class + k + 1
            rng = np.random.default_rng([seed, 2, image_id])
            w, h = size, int(round(size * rng.uniform(0.75, 1.0)))
            values = _image_values(cls, rng, variation)
            canvas = _background(w, h, rng)
            parts, visible, box = draw_bird(canvas, values, rng)
            file = f"{cls.name.split('.', 1)[1]}_{k + 1:04d}_{image_id}.jpg"
            _finish(canvas, rng, noise).save(folder / file, "JPEG", quality=jpeg_quality)

            images.append(f"{image_id} {cls.name}/{file}")
            labels.append(f"{image_id} {c + 1}")
            split.append(f"{image_id} {int(k < n_train)}")
            boxes.append(f"{image_id} " + " ".join(_fmt(v) for v in box))
            for p in range(len(PART_NAMES)):
                x, y = parts[p]
                part_locs.append(f"{image_id} {p + 1} {_fmt(x)} {_fmt(y)} {int(visible[p])}")
                for _ in range(3):  # three workers' clicks
                    jx, jy = (x + rng.normal(0, 1.5), y + rng.normal(0, 1.5)) if visible[p] else (0.0, 0.0)
                    clicks.append(
                        f"{image_id} {p + 1} {_fmt(jx)} {_fmt(jy)} {int(visible[p])} {rng.uniform(0.5, 4.0):.3f}"
                    )
            present, certainty = _attribute_labels(values, dict(zip(PART_NAMES, visible)), rng)
            counts[c] += present
            for a in range(len(ATTRIBUTE_NAMES)):
                attr_lines.append(f"{image_id} {a + 1} {int(present[a])} {certainty[a]} {rng.uniform(1.0, 9.0):.3f}")

    _write(root / "images.txt", images)
    _write(root / "image_class_labels.txt", labels)
    _write(root / "train_test_split.txt", split)
    _write(root / "classes.txt", [f"{c + 1} {s.name}" for c, s in enumerate(species)])
    _write(root / "bounding_boxes.txt", boxes)
    _write(root / "parts" / "parts.txt", [f"{p + 1} {name}" for p, name in enumerate(PART_NAMES)])
    _write(root / "parts" / "part_locs.txt", part_locs)
    _write(root / "parts" / "part_click_locs.txt", clicks)
    attribute_lines = [f"{a + 1} {name}" for a, name in enumerate(ATTRIBUTE_NAMES)]
    _write(out / "attributes.txt", attribute_lines)
    _write(root / "attributes" / "image_attribute_labels.txt", attr_lines)
    _write(root / "attributes" / "certainties.txt", [f"{i + 1} {n}" for i, n in enumerate(CERTAINTY_NAMES)])
    percent = 100.0 * counts / images_per_class
    _write(
        root / "attributes" / "class_attribute_labels_continuous.txt",
        [" ".join(f"{v:.6f}" for v in row) for row in percent],
    )
    _write(root / "README", _cub_readme(classes, images_per_class, n_train, size, seed, species, pairs))
    return root


def _attribute_labels(values: dict[str, str], part_visible: dict[str, bool], rng) -> tuple[np.ndarray, list[int]]:
    """Image-level ``is_present`` (A,) and certainty ids: one value per group; "not visible" (1) for unseen parts."""
    present = np.zeros(len(ATTRIBUTE_NAMES), dtype=bool)
    certainty = [4] * len(ATTRIBUTE_NAMES)
    seen_group = {}
    for region, groups in REGIONS.items():
        seen = any(part_visible[p] for p in _REGION_PARTS[region])
        for g in groups:
            seen_group[g] = seen or seen_group.get(g, False)
    all_values = dict(values)
    for derived, source in DERIVED_GROUPS.items():
        all_values[derived] = values[source]
        seen_group[derived] = seen_group[source]
    seen_group["size"] = seen_group["shape"] = True
    for group, group_values in ATTRIBUTE_GROUPS:
        offset = _GROUP_OFFSET[group]
        seen = seen_group[group]
        sure = 4 if rng.uniform() < 0.8 else 3
        for i, v in enumerate(group_values):
            present[offset + i] = seen and all_values[group] == v
            certainty[offset + i] = sure if seen else 1
    return present, certainty


def _cub_readme(classes, images_per_class, n_train, size, seed, species, pairs) -> list[str]:
    lines = [
        "Synthetic CUB-200-2011-format dataset generated by delib_jax.data.synthetic (procedurally drawn birds).",
        f"classes={classes} images_per_class={images_per_class} train_per_class={n_train} size={size} seed={seed}",
        "Same layout and file formats as the Caltech-UCSD Birds-200-2011 release; attributes.txt lies beside",
        "CUB_200_2011/ as in the release tarball. Keypoints: pixel units, top-left image corner at (0, 0).",
        "",
        "Classes come in families whose members share every attribute of the listed part regions and differ in the",
        "others (the designed ground-truth ambiguities); class pairs:",
    ]
    lines += [f"  {species[a].name} / {species[b].name}: {', '.join(shared)}" for a, b, shared in pairs]
    return lines


# -------------------------------------------------------------------------------------------------------- ADE20K

OBJECT_NAMES: tuple[str, ...] = (
    "wall", "building, edifice", "sky", "floor, flooring", "tree", "ceiling", "road, route", "bed",
    "windowpane, window",
    "grass", "cabinet", "sidewalk, pavement", "person", "earth, ground", "door", "table", "mountain, mount", "plant",
    "curtain", "chair", "car", "water", "painting, picture", "sofa", "shelf", "house", "sea", "mirror", "rug", "field",
    "armchair", "seat", "fence", "desk", "rock, stone", "wardrobe, closet", "lamp", "bathtub", "railing", "cushion",
    "base, pedestal", "box", "column, pillar", "signboard, sign", "chest of drawers", "counter", "sand", "sink",
    "skyscraper", "fireplace", "refrigerator", "grandstand", "path", "stairs", "runway", "case, display case",
    "pool table", "pillow", "screen door", "stairway", "river", "bridge", "bookcase", "blind, screen", "coffee table",
    "toilet", "flower", "book", "hill", "bench", "countertop", "stove", "palm", "kitchen island", "computer",
    "swivel chair", "boat", "bar", "arcade machine", "hovel, hut", "bus", "towel", "light", "truck", "tower",
    "chandelier", "awning", "streetlight", "booth", "television receiver", "airplane", "dirt track", "apparel", "pole",
    "land, ground", "bannister", "escalator", "ottoman", "bottle", "buffet, counter", "poster", "stage", "van", "ship",
    "fountain", "conveyer belt", "canopy", "washer", "plaything, toy", "swimming pool", "stool", "barrel", "basket",
    "waterfall", "tent", "bag", "minibike", "cradle", "oven", "ball", "food", "step, stair", "tank", "trade name",
    "microwave", "pot", "animal", "bicycle", "lake", "dishwasher", "screen, silver screen", "blanket", "sculpture",
    "hood, exhaust hood", "sconce", "vase", "traffic light", "tray", "ashcan", "fan", "pier", "crt screen", "plate",
    "monitor", "bulletin board", "shower", "radiator", "glass", "clock", "flag",
)  # fmt: skip
assert len(OBJECT_NAMES) == 150

_INDOOR_BANDS = (("ceiling",), ("wall",), ("floor, flooring", "rug"))
_OUTDOOR_BANDS = (
    ("sky",),
    ("building, edifice", "mountain, mount", "tree", "hill", "skyscraper", "house"),
    ("road, route", "grass", "sand", "sea", "field", "earth, ground", "sidewalk, pavement", "water"),
)
_INDOOR_SCENES = ("bathroom", "bedroom", "kitchen", "living_room", "dining_room", "office", "corridor", "classroom",
                  "conference_room", "hotel_room", "art_gallery", "bar", "library")  # fmt: skip
_OUTDOOR_SCENES = ("street", "highway", "beach", "mountain_snowy", "forest_path", "parking_lot", "playground",
                   "river", "coast", "field_cultivated", "bridge", "garden", "harbor")  # fmt: skip
_STUFF = {n for band in _INDOOR_BANDS + _OUTDOOR_BANDS for n in band}


@dataclasses.dataclass(frozen=True)
class Scene:
    """A synthetic scene class: layout bands (top, middle, bottom object ids) and per-object presence probabilities."""

    name: str
    indoor: bool
    bands: tuple[int, int, int]
    presence: np.ndarray  # (150,) probability that an image of the scene contains each (non-band) object


def make_scenes(num_scenes: int, seed: int) -> list[Scene]:
    """Scene definitions; scene pairs ``(2k, 2k + 1)`` share two characteristic objects."""
    rng = np.random.default_rng([seed, 11])
    ids = {n: i for i, n in enumerate(OBJECT_NAMES)}
    things = np.array([i for i, n in enumerate(OBJECT_NAMES) if n not in _STUFF])
    names = [n for pair in zip(_INDOOR_SCENES, _OUTDOOR_SCENES) for n in pair]
    scenes = []
    for s in range(num_scenes):
        name = names[s % len(names)] + ("" if s < len(names) else f"_{s // len(names) + 1}")
        indoor = name.split("_")[0] in {n.split("_")[0] for n in _INDOOR_SCENES}
        bands = tuple(ids[str(rng.choice(b))] for b in (_INDOOR_BANDS if indoor else _OUTDOOR_BANDS))
        presence = np.zeros(len(OBJECT_NAMES))
        presence[rng.choice(things, 20, replace=False)] = 0.03  # rare objects
        presence[ids["person"]] = 0.2
        characteristic = rng.choice(things, 5, replace=False)
        if s % 2 == 1:
            characteristic[:2] = scenes[s - 1].presence.argsort()[-2:]  # shared with the partner scene
        presence[characteristic] = rng.uniform(0.5, 0.95, len(characteristic))
        scenes.append(Scene(name, bool(indoor), bands, presence))
    return scenes


def _object_colors(seed: int) -> np.ndarray:
    return np.random.default_rng([seed, 12]).integers(20, 236, (len(OBJECT_NAMES), 3))


def draw_scene(scene: Scene, w: int, h: int, colors: np.ndarray, rng: np.random.Generator, noise: float):
    """Paint one image of ``scene`` and its mask (values 0..150, 0 = other).

    Returns:
      ``(image, mask)``: a PIL RGB image and an (h, w) uint8 array.
    """
    image = Image.new("RGB", (w, h))
    mask = Image.new("L", (w, h), 0)
    di, dm = ImageDraw.Draw(image), ImageDraw.Draw(mask)

    def paint(kind: str, box, obj: int | None, color) -> None:
        value = 0 if obj is None else obj + 1
        if kind == "rect":
            di.rectangle(box, fill=color)
            dm.rectangle(box, fill=value)
        elif kind == "ellipse":
            di.ellipse(box, fill=color)
            dm.ellipse(box, fill=value)
        else:
            x0, y0, x1, y1 = box
            pts = [((x0 + x1) / 2, y0), (x1, y1), (x0, y1)]
            di.polygon(pts, fill=color)
            dm.polygon(pts, fill=value)

    def jitter(obj: int):
        return tuple(int(c) for c in np.clip(colors[obj] + rng.integers(-20, 21, 3), 0, 255))

    y1, y2 = int(h * rng.uniform(0.2, 0.4)), int(h * rng.uniform(0.55, 0.75))
    for obj, (top, bottom) in zip(scene.bands, ((0, y1), (y1, y2), (y2, h))):
        paint("rect", (0, top, w, bottom), obj, jitter(obj))
    present = np.flatnonzero(rng.uniform(size=len(OBJECT_NAMES)) < scene.presence)
    for obj in rng.permutation(present):
        for _ in range(int(rng.integers(1, 3))):
            s = min(w, h) * rng.uniform(0.1, 0.3)
            x, y = rng.uniform(0, w), rng.uniform(y1, h)
            kind = ("rect", "ellipse", "triangle")[obj % 3]
            paint(kind, (x - s, y - s * rng.uniform(0.5, 1.5), x + s, y + s * 0.5), int(obj), jitter(int(obj)))
    for _ in range(int(rng.integers(2, 6))):  # unlabelled clutter
        s = min(w, h) * rng.uniform(0.03, 0.08)
        x, y = rng.uniform(0, w), rng.uniform(0, h)
        paint("ellipse", (x - s, y - s, x + s, y + s), None, tuple(int(c) for c in rng.integers(0, 256, 3)))
    return _finish(image, rng, noise), np.asarray(mask, dtype=np.uint8)


def make_ade20k(
    out: str | Path,
    *,
    scenes: int = 8,
    images_per_scene: int = 40,
    size: int = 128,
    seed: int = 0,
    val_fraction: float = 0.25,
    unseen_val_images: int = 3,
    object_info: str = "txt",
    noise: float = 6.0,
    jpeg_quality: int = 90,
) -> Path:
    """Write a synthetic ADEChallengeData2016 release under ``out``.

    Args:
      out: parent folder (created if needed); ``out/ADEChallengeData2016`` must not exist or be empty.
      scenes: number of scene classes seen in training (2..200).
      images_per_scene: images per scene, split into training and validation by ``val_fraction``.
      size: image width in pixels (heights vary in [0.7, 1] x size), at least 32.
      seed: same seed, same bytes.
      val_fraction: fraction of each scene's images in the validation split; each split gets at least one.
      unseen_val_images: validation images of one extra scene that never occurs in training.
      object_info: write ``objectInfo150.txt`` ("txt", tab-separated) or ``objectInfo150.csv`` ("csv").
      noise: standard deviation of the Gaussian pixel noise.
      jpeg_quality: JPEG quality (1..95).

    Returns:
      the ``ADEChallengeData2016`` folder.
    """
    if not 2 <= scenes <= 200:
        raise ValueError(f"scenes must lie in [2, 200], got {scenes}")
    if images_per_scene < 2:
        raise ValueError(f"images_per_scene must be >= 2 (one train, one validation), got {images_per_scene}")
    if size < 32:
        raise ValueError(f"size must be >= 32 pixels, got {size}")
    if not 0.0 < val_fraction < 1.0 or unseen_val_images < 0:
        raise ValueError("val_fraction must lie in (0, 1) and unseen_val_images be >= 0")
    if object_info not in ("txt", "csv"):
        raise ValueError(f"object_info must be 'txt' or 'csv', got {object_info!r}")
    if noise < 0 or not 1 <= jpeg_quality <= 95:
        raise ValueError("noise must be >= 0 and jpeg_quality lie in [1, 95]")
    root = _check_out(Path(out), "ADEChallengeData2016")
    all_scenes = make_scenes(scenes + (1 if unseen_val_images else 0), seed)
    colors = _object_colors(seed)
    n_val = min(max(1, round(val_fraction * images_per_scene)), images_per_scene - 1)
    jobs = []  # (split folder, prefix, scene index)
    for s in range(scenes):
        jobs += [("training", "train", s)] * (images_per_scene - n_val) + [("validation", "val", s)] * n_val
    jobs += [("validation", "val", scenes)] * unseen_val_images
    counters = {"train": 0, "val": 0}
    pixels = np.zeros(len(OBJECT_NAMES) + 1, np.int64)
    present = {"train": np.zeros(len(OBJECT_NAMES), np.int64), "val": np.zeros(len(OBJECT_NAMES), np.int64)}
    categories = {"train": [], "val": []}
    order = np.random.default_rng([seed, 13]).permutation(len(jobs))  # interleave scenes in file order
    for j in order:
        folder, prefix, s = jobs[j]
        counters[prefix] += 1
        stem = f"ADE_{prefix}_{counters[prefix]:08d}"
        rng = np.random.default_rng([seed, 14, 0 if prefix == "train" else 1, counters[prefix]])
        w, h = size, int(round(size * rng.uniform(0.7, 1.0)))
        image, mask = draw_scene(all_scenes[s], w, h, colors, rng, noise)
        (root / "images" / folder).mkdir(parents=True, exist_ok=True)
        (root / "annotations" / folder).mkdir(parents=True, exist_ok=True)
        image.save(root / "images" / folder / f"{stem}.jpg", "JPEG", quality=jpeg_quality)
        Image.fromarray(mask, "L").save(root / "annotations" / folder / f"{stem}.png")
        counts = np.bincount(mask.ravel(), minlength=len(OBJECT_NAMES) + 1)
        pixels += counts
        present[prefix] += counts[1:] > 0
        categories[prefix].append(f"{stem} {all_scenes[s].name}")
    _write(root / "sceneCategories.txt", categories["train"] + categories["val"])
    ratio = pixels[1:] / max(1, pixels.sum())
    if object_info == "txt":
        lines = ["Idx\tRatio\tTrain\tVal\tName"]
        for k, name in enumerate(OBJECT_NAMES):
            pad = " " if k % 7 == 3 else ""  # the release has stray spaces in some fields
            lines.append(f"{k + 1}\t{ratio[k]:.4f}{pad}\t{present['train'][k]}\t{pad}{present['val'][k]}\t{name}{pad}")
        _write(root / "objectInfo150.txt", lines)
    else:
        lines = ["Idx,Ratio,Train,Val,Stuff,Name"]
        for k, name in enumerate(OBJECT_NAMES):
            stuff = int(name in _STUFF)
            lines.append(
                f"{k + 1},{ratio[k]:.4f},{present['train'][k]},{present['val'][k]},{stuff},{name.replace(', ', ';')}"
            )
        _write(root / "objectInfo150.csv", lines)
    return root


# ----------------------------------------------------------------------------------------------------------- CLI


def main(argv: Sequence[str] | None = None) -> int:
    """Command line entry point: ``python -m delib_jax.data.synthetic {cub,ade20k} --out DIR [options]``."""
    parser = argparse.ArgumentParser(
        prog="python -m delib_jax.data.synthetic",
        description="Write a small synthetic dataset in the exact CUB-200-2011 or ADEChallengeData2016 release format. "
        "Example: python -m delib_jax.data.synthetic cub --out /tmp/cub",
    )
    sub = parser.add_subparsers(dest="dataset", required=True)
    cub = sub.add_parser("cub", help="procedurally drawn birds with parts and attributes (CUB_200_2011/)")
    cub.add_argument("--out", type=Path, required=True, help="parent folder of CUB_200_2011/")
    cub.add_argument("--classes", type=int, default=10)
    cub.add_argument("--images-per-class", type=int, default=48)
    cub.add_argument("--size", type=int, default=128, help="image width in pixels")
    cub.add_argument("--seed", type=int, default=0)
    cub.add_argument("--train-fraction", type=float, default=0.75)
    cub.add_argument("--family-size", type=int, default=5, help="classes per family sharing part regions (default 5)")
    ade = sub.add_parser("ade20k", help="object-composed scenes with masks (ADEChallengeData2016/)")
    ade.add_argument("--out", type=Path, required=True, help="parent folder of ADEChallengeData2016/")
    ade.add_argument("--scenes", type=int, default=8)
    ade.add_argument("--images-per-scene", type=int, default=40)
    ade.add_argument("--size", type=int, default=128, help="image width in pixels")
    ade.add_argument("--seed", type=int, default=0)
    ade.add_argument("--unseen-val-images", type=int, default=3)
    ade.add_argument("--object-info", choices=("txt", "csv"), default="txt")
    args = parser.parse_args(argv)
    try:
        if args.dataset == "cub":
            root = make_cub(
                args.out, classes=args.classes, images_per_class=args.images_per_class, size=args.size,
                seed=args.seed, train_fraction=args.train_fraction, family_size=args.family_size,
            )  # fmt: skip
        else:
            root = make_ade20k(
                args.out, scenes=args.scenes, images_per_scene=args.images_per_scene, size=args.size,
                seed=args.seed, unseen_val_images=args.unseen_val_images, object_info=args.object_info,
            )  # fmt: skip
    except (ValueError, OSError) as e:  # bad options, --out taken or not writable
        reason = str(e)
        if isinstance(e, OSError) and e.strerror:  # raised by the file system, not by our checks
            reason = f"cannot write the dataset into --out {args.out} ({e.strerror}: {e.filename})"
        parser.exit(2, f"error: {reason}\n")
    print(root)
    return 0


if __name__ == "__main__":
    sys.exit(main())
