"""Deliberative explanations of images in one call: prediction, difficulty, attribution maps, Grad-CAM, insecurities.

    model, config = load_model("runs/cub_vgg16")
    explanations = explain(model, images, class_names=config.class_names)   # images (B, H, W, 3) normalised
    explanations[0].insecurities[0]        # the strongest: mask (H, W) bool, classes a/b with names, strength
    json.dumps(explanations[0].to_json())  # masks as run-length encoding; Explanation.from_json reads it back

A classifier of your own: its two halves, features (images -> A (B, h, w, D)) and head (A -> logits), as
``DeliberativeModel.from_split(features, head)`` or simply the pair ``(features, head)``, explained with
``score="entropy"`` or ``"hesitancy"`` unless it has a hardness predictor.

For many batches build the compiled function once with `make_explain_fn` (it also shards a batch over all local
devices). Images from files: `read_image` (any mode Pillow reads, converted to RGB) and `preprocess` (the run's
Resize + CenterCrop and normalisation).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from delib_jax import insecurity as insec
from delib_jax.attribution import Attribution, Options, attribute, grad_cam
from delib_jax.data import transforms
from delib_jax.models import Structure, inference_model, split_leaves

Array = jax.Array


def _static(**kw):
    return field(metadata={"static": True}, **kw)


# ------------------------------------------------------------------------------------------------ results


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class Insecurity:
    """One insecurity: a region of the image where the network hesitated between classes a and b.

    mask: (H_img, W_img) bool; strength: mean ambiguity over the mask, raw (attribution products, see
    `delib_jax.insecurity`; `Explanation.shares` is the readable one); coverage: fraction of the image in the mask;
    threshold: the T applied to the ambiguity map; a, b: class indices; name_a, name_b: their names.
    """

    mask: np.ndarray
    strength: float
    coverage: float
    threshold: float
    a: int = _static()
    b: int = _static()
    name_a: str = _static()
    name_b: str = _static()

    @property
    def pair(self) -> tuple[int, int]:
        return self.a, self.b

    @property
    def label(self) -> str:
        """'name_a / name_b'."""
        return f"{self.name_a} / {self.name_b}"

    def to_json(self, *, mask_path: str | None = None) -> dict[str, Any]:
        """JSON-ready dict; the mask run-length encoded (`encode_mask`), or a reference to a PNG file."""
        mask = {"png": mask_path} if mask_path is not None else encode_mask(self.mask)
        return {
            "a": self.a, "b": self.b, "name_a": self.name_a, "name_b": self.name_b,
            "strength": float(self.strength), "coverage": float(self.coverage), "threshold": float(self.threshold),
            "mask": mask,
        }  # fmt: skip

    @classmethod
    def from_json(cls, data: dict[str, Any], *, base_dir: str | Path | None = None) -> Insecurity:
        """Inverse of `to_json`; PNG mask paths are relative to ``base_dir``."""
        mask = data["mask"]
        if "png" in mask:
            mask = read_mask_png(Path(base_dir or ".") / mask["png"])
        else:
            mask = decode_mask(mask)
        return cls(
            mask=mask, strength=np.float32(data["strength"]), coverage=np.float32(data["coverage"]),
            threshold=np.float32(data["threshold"]), a=int(data["a"]), b=int(data["b"]),
            name_a=str(data["name_a"]), name_b=str(data["name_b"]),
        )  # fmt: skip


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class Explanation:
    """The deliberative explanation of one image.

    probs: (C,) class probabilities; difficulty: the difficulty score s in [0, 1]; classes: (N,) the classes with a
    map (the top-N predictions, most probable first); maps: (N + 1, H, W) attribution maps of those classes, then the
    difficulty map; grad_cam: (H, W) Grad-CAM of the prediction; insecurities: ranked by strength (read them with
    `shares`, the share of the image's ambiguity in each region, and `negligible` / `competing`).
    Static: prediction (class index), prediction_name, class_names (names of ``classes``), score ('hardness',
    'entropy' or 'hesitancy'), method (attribution method), image_size (H_img, W_img), source (file or None).
    """

    probs: np.ndarray
    difficulty: float
    classes: np.ndarray
    maps: np.ndarray
    grad_cam: np.ndarray
    insecurities: tuple[Insecurity, ...]
    prediction: int = _static()
    prediction_name: str = _static()
    class_names: tuple[str, ...] = _static()
    score: str = _static()
    method: str = _static()
    image_size: tuple[int, int] = _static()
    source: str | None = _static(default=None)

    @property
    def confidence(self) -> float:
        """Probability of the predicted class."""
        return float(self.probs[self.prediction])

    @property
    def class_maps(self) -> np.ndarray:
        """(N, H, W)."""
        return self.maps[:-1]

    @property
    def difficulty_map(self) -> np.ndarray:
        """(H, W)."""
        return self.maps[-1]

    @functools.cached_property
    def shares(self) -> tuple[float | None, ...]:
        """Per insecurity, the share of the image's ambiguity in its region, in [0, 1]: the readable strength
        (`delib_jax.insecurity.ambiguity_shares`; ``strength`` keeps the raw value). Computed once, from the maps
        (None for a pair without maps, which only a hand-made explanation has)."""
        where = {int(c): j for j, c in enumerate(self.classes)}
        mapped = [q for q in self.insecurities if q.a in where and q.b in where]  # always all, but for hand-made ones
        slots = np.asarray([[where[q.a], where[q.b]] for q in mapped], np.int64).reshape(-1, 2)
        masks = np.asarray([q.mask for q in mapped], bool).reshape(-1, *self.image_size)
        found = dict(zip(map(id, mapped), insec.ambiguity_shares(self.class_maps, self.difficulty_map, slots, masks)))
        return tuple(float(found[id(q)]) if id(q) in found else None for q in self.insecurities)

    @property
    def negligible(self) -> tuple[bool, ...]:
        """Per insecurity, whether its classes do not really compete (`delib_jax.insecurity.is_negligible`: the
        less probable of the two below `delib_jax.insecurity.NEGLIGIBLE_PROBABILITY`)."""
        return tuple(insec.is_negligible(self.probs[q.a], self.probs[q.b]) for q in self.insecurities)

    @property
    def competing(self) -> tuple[Insecurity, ...]:
        """The insecurities that are not negligible (empty: no two classes really compete in this image)."""
        return tuple(q for q, low in zip(self.insecurities, self.negligible) if not low)

    def is_finite(self) -> bool:
        """Whether every value is finite: a model with NaN/inf weights (a diverged training) gives NaN everywhere."""
        values = [self.probs, self.difficulty, self.maps, self.grad_cam]
        values += [[q.strength, q.coverage, q.threshold] for q in self.insecurities]
        return all(np.isfinite(np.asarray(v, np.float64)).all() for v in values)

    def to_json(self, *, mask_paths: Sequence[str] | None = None) -> dict[str, Any]:
        """JSON-ready dict (floats exact: float32 values survive a round trip); masks run-length encoded, or given
        as PNG paths (one per insecurity, see `write_mask_pngs`)."""
        if mask_paths is not None and len(mask_paths) != len(self.insecurities):
            raise ValueError(f"{len(mask_paths)} mask paths for {len(self.insecurities)} insecurities")
        paths = mask_paths if mask_paths is not None else [None] * len(self.insecurities)
        return {
            "source": self.source,
            "prediction": self.prediction,
            "prediction_name": self.prediction_name,
            "confidence": self.confidence,
            "difficulty": float(self.difficulty),
            "score": self.score,
            "method": self.method,
            "image_size": list(self.image_size),
            "classes": [int(c) for c in self.classes],
            "class_names": list(self.class_names),
            "probs": np.asarray(self.probs, np.float32).tolist(),
            "maps": np.asarray(self.maps, np.float32).tolist(),
            "grad_cam": np.asarray(self.grad_cam, np.float32).tolist(),
            "insecurities": [
                {**q.to_json(mask_path=p), "share": share, "negligible": low}
                for q, p, share, low in zip(self.insecurities, paths, self.shares, self.negligible)
            ],
        }

    @classmethod
    def from_json(cls, data: dict[str, Any], *, base_dir: str | Path | None = None) -> Explanation:
        """Inverse of `to_json` (``confidence`` is derived, not read)."""
        return cls(
            probs=np.asarray(data["probs"], np.float32),
            difficulty=np.float32(data["difficulty"]),
            classes=np.asarray(data["classes"], np.int32),
            maps=np.asarray(data["maps"], np.float32),
            grad_cam=np.asarray(data["grad_cam"], np.float32),
            insecurities=tuple(Insecurity.from_json(q, base_dir=base_dir) for q in data["insecurities"]),
            prediction=int(data["prediction"]),
            prediction_name=str(data["prediction_name"]),
            class_names=tuple(str(n) for n in data["class_names"]),
            score=str(data["score"]),
            method=str(data["method"]),
            image_size=tuple(int(s) for s in data["image_size"]),
            source=data.get("source"),
        )


def encode_mask(mask: np.ndarray) -> dict[str, Any]:
    """Run-length encoding of a 2-D bool mask, row-major: ``{"size": [H, W], "counts": [...]}``, counts alternating
    False / True runs and starting with a (possibly empty) False run."""
    mask = np.asarray(mask, bool)
    if mask.ndim != 2:
        raise ValueError(f"mask must be (H, W), got shape {mask.shape}")
    flat = mask.ravel()
    change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    bounds = np.concatenate([[0], change, [flat.size]])
    counts = np.diff(bounds).tolist()
    if flat.size and flat[0]:
        counts = [0, *counts]
    return {"size": [int(mask.shape[0]), int(mask.shape[1])], "counts": [int(c) for c in counts]}


def decode_mask(rle: dict[str, Any]) -> np.ndarray:
    """Inverse of `encode_mask`: (H, W) bool."""
    h, w = (int(s) for s in rle["size"])
    counts = np.asarray(rle["counts"], np.int64)
    if counts.sum() != h * w or (counts < 0).any():
        raise ValueError(f"run-length counts sum to {counts.sum()}, the mask has {h * w} pixels")
    values = np.arange(len(counts)) % 2 == 1
    return np.repeat(values, counts).reshape(h, w)


def write_mask_png(mask: np.ndarray, path: str | Path) -> Path:
    """Write a bool mask as a 1-bit PNG (atomically)."""
    image = Image.fromarray(np.asarray(mask, bool))
    return atomic_write(path, lambda f: image.save(f, format="PNG"))


def read_mask_png(path: str | Path) -> np.ndarray:
    """(H, W) bool from a mask PNG (any non-zero pixel is in the mask)."""
    with Image.open(path) as image:
        return np.asarray(image.convert("L")) > 0


def write_mask_pngs(explanation: Explanation, directory: str | Path, stem: str) -> list[str]:
    """One PNG per insecurity, ``directory/{stem}_mask{q}.png``; returns the file names (relative to directory)."""
    names = []
    for q, item in enumerate(explanation.insecurities):
        name = f"{stem}_mask{q}.png"
        write_mask_png(item.mask, Path(directory) / name)
        names.append(name)
    return names


def atomic_write(path: str | Path, write: Callable[[Any], None], *, binary: bool = True) -> Path:
    """Call ``write(file)`` on a temporary file in the same directory, then ``os.replace`` it onto ``path``:
    a crash leaves the previous file (or none), never a half-written one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # the temporary name holds at most 64 bytes of the target's name: a target of up to 255 bytes (the usual limit)
    # must not give a temporary name over it
    stem = os.fsencode(path.name)[:64].decode("utf-8", "ignore")
    fd, tmp = tempfile.mkstemp(prefix=f".{stem}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb" if binary else "w", **({} if binary else {"encoding": "utf-8"})) as f:
            write(f)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600 files: give the usual permissions of a new file
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_json(path: str | Path, data: Any) -> Path:
    """Atomically write ``data`` as indented JSON."""
    return atomic_write(path, lambda f: json.dump(data, f, indent=1, allow_nan=False), binary=False)


# ------------------------------------------------------------------------------------------------ computation


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class ExplainOutputs:
    """Device outputs of one batch: attribution (maps (B, N + 1, H, W), ...), grad_cam (B, H, W), insecurities."""

    attribution: Attribution
    grad_cam: Array
    insecurities: insec.Insecurities


@dataclass(frozen=True)
class ExplainSettings:
    """Resolved options of an explanation run (what `make_explain_fn` was built with)."""

    method: str
    score: str
    top_n: int | None
    k: int
    coverage: float | None
    threshold: float | None
    max_insecurities: int
    positive: bool

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _explain_images(model, images: Array, settings: ExplainSettings, combine, attribution_options) -> ExplainOutputs:
    a, classifier = model.features_and_classifier(images)  # A (B, H, W, D); the class head as a function of A
    head = a_s = None
    if settings.score == "hardness":
        if model.hardness_network is not None:
            head = model.hardness_network.head
            a_s = model.hardness_network.backbone(images).astype(jnp.float32)
        else:
            head, a_s = model.hardness_head, a
    attr = attribute(
        classifier, a, hardness_head=head, hardness_features=a_s, jit=False, method=settings.method,
        score=settings.score, top_n=settings.top_n, **attribution_options,
    )  # fmt: skip
    cam = grad_cam(classifier, a, jnp.argmax(attr.probs, axis=-1))
    found = insec.find_insecurities(
        attr.class_maps, attr.difficulty_map, attr.classes, image_size=images.shape[1:3], k=settings.k,
        coverage=settings.coverage, threshold=settings.threshold, max_insecurities=settings.max_insecurities,
        combine=combine, positive=settings.positive,
    )  # fmt: skip
    return ExplainOutputs(attribution=attr, grad_cam=cam, insecurities=found)


NO_HARDNESS = (
    "score='hardness' needs a model with a hardness predictor and this one has none (an imported classifier, "
    "one of your own, or a run trained with hardness='none'): use score='entropy' or 'hesitancy'"
)


def as_model(model):
    """``model`` as a `DeliberativeModel`: itself, or a ``(features, head)`` pair of NNX modules wrapped by
    `DeliberativeModel.from_split`."""
    from delib_jax.models import DeliberativeModel

    if isinstance(model, DeliberativeModel):
        return model
    if isinstance(model, tuple) and len(model) == 2:
        return DeliberativeModel.from_split(*model)
    if not all(hasattr(model, a) for a in ("features_and_classifier", "num_classes", "hardness_kind")):
        raise TypeError(
            f"expected a DeliberativeModel or a (features, head) pair of NNX modules, got {type(model).__name__}"
        )
    return model


def batch_mesh(devices: Sequence[jax.Device] | None = None) -> jax.sharding.Mesh:
    """A 1-D mesh with axis 'batch' over ``devices`` (default: all local devices)."""
    devices = list(jax.local_devices() if devices is None else devices)
    return jax.sharding.Mesh(np.asarray(devices), ("batch",))


@functools.lru_cache(maxsize=32)
def _compiled(structure: Structure, settings: ExplainSettings, combine, attribution_items: tuple,
              pixel_stats: transforms.Normalization | None = None) -> Callable:  # fmt: skip
    """One jitted (weight leaves, images) -> ExplainOutputs per model structure and settings, so that repeated
    `explain` calls reuse the compilation instead of tracing a fresh closure each time. uint8 images are normalised
    with ``pixel_stats`` inside it (on the device)."""
    options = dict(attribution_items)

    @jax.jit
    def run(leaves, images):
        images = transforms.model_input(images, pixel_stats)
        return _explain_images(structure.merge(leaves), images, settings, combine, options)

    return run


def make_explain_fn(
    model,
    *,
    method: str = "gradient_hessian",
    score: str = "hardness",
    top_n: int | None = 5,
    k: int = 3,
    coverage: float | None = None,
    threshold: float | None = None,
    max_insecurities: int | None = 4,
    positive: bool = True,
    combine: insec.Combine = insec.product,
    mesh: jax.sharding.Mesh | None = None,
    difficulty_channels: str = "positive",
    precision: str | None = None,
    pixel_stats: transforms.Normalization | None = None,
    **attribution_options,
) -> tuple[Callable[[Array], ExplainOutputs], ExplainSettings]:
    """A compiled images (B, H, W, 3) -> `ExplainOutputs` function and its resolved settings.

    Images are float, normalised, or with ``pixel_stats`` (the run's `Normalization`) also uint8 pixels, normalised
    on the device inside the compiled function (a quarter of the bytes to copy; what the explanation job sends).

    Options as for `explain`. The difficulty map defaults to the authors' rule (``difficulty_channels="positive"``:
    channels that make the prediction harder; see `delib_jax.attribution.Options`). With ``mesh`` (see
    `batch_mesh`) the parameters are replicated on its devices and each batch is padded to a multiple of the device
    count, sharded along 'batch', and the padding dropped again. The model runs in eval mode with batch norm folded
    into the convolutions (`delib_jax.models.inference_model`; the caller's model is left as it is); precision: the
    backbone's compute dtype, 'float32' or 'bfloat16' (None: the model's own), every attribution step float32.
    """
    model = as_model(model)
    c = model.num_classes
    if top_n is not None and top_n > c:
        top_n = c  # all classes: the same maps, in order of probability
    attribution_options = {**attribution_options, "difficulty_channels": difficulty_channels}
    Options(method=method, score=score, top_n=top_n, **attribution_options).check(c)
    if score == "hardness" and model.hardness_kind == "none":
        raise ValueError(NO_HARDNESS)
    n = c if top_n is None else top_n
    coverage, threshold, q = insec.check_options(
        n, k=k, coverage=coverage, threshold=threshold, max_insecurities=max_insecurities
    )
    settings = ExplainSettings(
        method=method,
        score=score,
        top_n=top_n,
        k=int(k),
        coverage=coverage,
        threshold=threshold,
        max_insecurities=q,
        positive=bool(positive),
    )
    structure, leaves = split_leaves(inference_model(model, precision=precision))
    shard = None
    if mesh is not None:
        leaves = jax.device_put(leaves, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
        shard = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("batch"))

    run = _compiled(structure, settings, combine, tuple(sorted(attribution_options.items())), pixel_stats)

    def explain_fn(images) -> ExplainOutputs:
        images = np.asarray(images) if not isinstance(images, jax.Array) else images
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"images must have shape (B, H, W, 3), normalised, got {images.shape}")
        if images.dtype == np.uint8 and pixel_stats is None:
            raise ValueError("uint8 images need pixel_stats (the run's normalisation) to be normalised on the device")
        dtype = jnp.uint8 if images.dtype == np.uint8 else jnp.float32
        b = images.shape[0]
        if shard is None:
            return run(leaves, jnp.asarray(images, dtype))
        pad = -b % mesh.size
        if pad:
            images = jnp.concatenate([jnp.asarray(images), jnp.repeat(jnp.asarray(images)[-1:], pad, axis=0)])
        out = run(leaves, jax.device_put(jnp.asarray(images, dtype), shard))
        return jax.tree.map(lambda x: x[:b], out) if pad else out

    return explain_fn, settings


def to_explanations(
    outputs: ExplainOutputs,
    settings: ExplainSettings,
    *,
    class_names: Sequence[str] | None = None,
    sources: Sequence[str | None] | None = None,
) -> list[Explanation]:
    """Split batch outputs into one `Explanation` per image (on the host), naming classes with ``class_names``."""
    out = jax.device_get(outputs)
    attr, found = out.attribution, out.insecurities
    b, c = attr.probs.shape
    names = [str(i) for i in range(c)] if class_names is None else [str(n) for n in class_names]
    if len(names) != c:
        raise ValueError(f"{len(names)} class names for {c} classes")
    sources = [None] * b if sources is None else list(sources)
    if len(sources) != b:
        raise ValueError(f"{len(sources)} sources for {b} images")
    result = []
    for i in range(b):
        items = []
        for q in np.flatnonzero(found.valid[i]):
            a, bb = (int(x) for x in found.pairs[i, q])
            items.append(Insecurity(
                mask=np.asarray(found.masks[i, q], bool), strength=np.float32(found.strength[i, q]),
                coverage=np.float32(found.coverage[i, q]), threshold=np.float32(found.threshold[i, q]),
                a=a, b=bb, name_a=names[a], name_b=names[bb],
            ))  # fmt: skip
        prediction = int(np.argmax(attr.probs[i]))
        classes = np.asarray(attr.classes[i], np.int32)
        result.append(Explanation(
            probs=np.asarray(attr.probs[i], np.float32), difficulty=np.float32(attr.score[i]), classes=classes,
            maps=np.asarray(attr.maps[i], np.float32), grad_cam=np.asarray(out.grad_cam[i], np.float32),
            insecurities=tuple(items), prediction=prediction, prediction_name=names[prediction],
            class_names=tuple(names[int(j)] for j in classes), score=settings.score, method=settings.method,
            image_size=tuple(int(s) for s in found.masks.shape[2:]), source=sources[i],
        ))  # fmt: skip
    return result


def explain(
    model,
    images: Array,
    *,
    method: str = "gradient_hessian",
    score: str = "hardness",
    top_n: int | None = 5,
    k: int = 3,
    coverage: float | None = None,
    threshold: float | None = None,
    max_insecurities: int | None = 4,
    class_names: Sequence[str] | None = None,
    sources: Sequence[str | None] | None = None,
    positive: bool = True,
    combine: insec.Combine = insec.product,
    mesh: jax.sharding.Mesh | None = None,
    **attribution_options,
) -> list[Explanation]:
    """Deliberative explanations of a batch: one `Explanation` per image.

    Args:
      model: a `DeliberativeModel` (e.g. from `delib_jax.checkpoint.load_model`), or a classifier of your own as
        ``(features, head)`` NNX modules (`DeliberativeModel.from_split`).
      images: (B, H_img, W_img, 3) float, normalised as the model was trained (see `preprocess`).
      method: attribution method, 'gradient_hessian' (Eq. 2), 'gradient' or 'integrated_gradients'.
      score: difficulty score, 'hardness' (needs a hardness predictor), 'entropy' or 'hesitancy'.
      top_n: classes with a map, the N most probable (None or > C: all C).
      k: candidate classes per location, 2 <= k <= N.
      coverage: fraction of the image each insecurity covers, 0.01..0.90 (default 0.1 unless ``threshold``).
      threshold: a value threshold on the ambiguity maps instead of a coverage.
      max_insecurities: Q, most insecurities kept per image (None: all N(N-1)/2 pairs).
      class_names: C names (default: the indices as strings).
      sources: per-image file names recorded in the explanations.
      positive: clamp negative attributions at 0 in the ambiguity maps (see `delib_jax.insecurity`).
      combine: f(m_a, m_b, m_s), the ambiguity map (default: the product of Eq. 1).
      mesh: shard the batch over a device mesh (see `batch_mesh`).
      attribution_options: further `delib_jax.attribution.Options` (second_order, abs_second, steps, ...).
    """
    model = as_model(model)
    if class_names is not None and len(class_names) != model.num_classes:  # before anything is compiled
        raise ValueError(
            f"{len(class_names)} class names for a model of {model.num_classes} classes: give the names of the run "
            "the model was trained in (delib_jax.checkpoint.load_model returns both)"
        )
    fn, settings = make_explain_fn(
        model, method=method, score=score, top_n=top_n, k=k, coverage=coverage, threshold=threshold,
        max_insecurities=max_insecurities, positive=positive, combine=combine, mesh=mesh, **attribution_options,
    )  # fmt: skip
    return to_explanations(fn(images), settings, class_names=class_names, sources=sources)


# ------------------------------------------------------------------------------------------------ image files


ImageReadError = transforms.ImageReadError
to_rgb = transforms.to_rgb


def read_image(path: str | Path) -> Image.Image:
    """Open, fully decode and convert an image file to RGB (`to_rgb`), applying its EXIF orientation: the decoder of
    the training pipelines (`delib_jax.data.transforms.read_rgb`), so explained pixels are what the model saw.

    Raises `ImageReadError` with a one-line reason for a missing, empty, corrupt, unsupported or NaN file."""
    return transforms.read_rgb(path, exif_orientation=True)


def preprocess(
    image: Image.Image, *, resize: int, crop: int, normalization: transforms.Normalization
) -> tuple[np.ndarray, np.ndarray]:
    """The evaluation transform: shorter side to ``resize``, centre crop ``crop`` (torchvision's), normalise.

    Returns (crop, crop, 3) uint8 (what the masks align with, for drawing) and (crop, crop, 3) float32 network input.
    """
    plan = transforms.eval_plan(image.width, image.height, resize=resize, crop=crop)
    pixels = transforms.apply_to_image(plan, image)
    return pixels, transforms.normalize(pixels, normalization)


__all__ = [
    "ExplainOutputs",
    "ExplainSettings",
    "Explanation",
    "NO_HARDNESS",
    "as_model",
    "ImageReadError",
    "Insecurity",
    "atomic_write",
    "batch_mesh",
    "decode_mask",
    "encode_mask",
    "explain",
    "make_explain_fn",
    "preprocess",
    "read_image",
    "read_mask_png",
    "to_explanations",
    "to_rgb",
    "write_json",
    "write_mask_png",
    "write_mask_pngs",
]  # fmt: skip
