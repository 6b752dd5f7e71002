"""The evaluation protocol runner (Sec. 4 and 5 of the paper): hardest test images -> insecurities -> metrics.

For one trained model and one setting (difficulty score, attribution method, with or without m^s):
1. rank the test images by the setting's difficulty score and keep the ``num_images`` hardest;
2. explain them (top-N maps, K candidates per location) and take every candidate ambiguity (a, b) as an insecurity,
   with its ambiguity map upsampled to the network input;
3. score each insecurity at every coverage from 1% to 90% against the ground truth: CUB precision / recall of part
   keypoints carried exactly through the evaluation transform, ADE20K IoU with the best ground-truth object;
4. do the same for random maps of the same size on the same pairs (the random baseline), ``runs`` seeds.
A curve is the mean over insecurities where the metric is defined (see `delib_jax.evaluation.metrics`).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from delib_jax.attribution import Options, _attribute_from_images
from delib_jax.checkpoint import RunConfig
from delib_jax.data._text import fail
from delib_jax.data.pipeline import ade20k_source, cub_source, eval_pipeline, read_mask
from delib_jax.data.transforms import Normalization, model_input
from delib_jax.evaluation import ground_truth as gt
from delib_jax.evaluation.metrics import (
    COVERAGES,
    coverage_counts,
    keypoint_auc,
    mask_iou,
    point_precision_recall,
    random_maps,
)
from delib_jax.insecurity import ambiguity_maps, candidate_pairs, pair_indices, product, upsample
from delib_jax.models import Structure, inference_view, split_leaves
from delib_jax.progress import progress_bar


class NonFiniteOutputs(ValueError):
    """The model produced NaN or inf (a diverged training run): its explanations and metrics would be garbage."""


def _without_difficulty(m_a, m_b, m_s):
    """f(m^a, m^b, m^s) = m^a m^b: the paper's 'gradient w/o m^s' ablation."""
    return m_a * m_b


@dataclass(frozen=True)
class Setting:
    """One row of a results table: which difficulty score and attribution make the insecurities."""

    name: str
    method: str = "gradient_hessian"
    score: str = "hardness"
    use_difficulty: bool = True

    @property
    def combine(self) -> Callable:
        return product if self.use_difficulty else _without_difficulty


FULL = Setting("Hardness + gradient-Hessian")
ABLATIONS: dict[str, list[Setting]] = {
    "scores": [
        Setting("Hesitancy score", score="hesitancy"),
        Setting("Entropy score", score="entropy"),
        Setting("Hardness score"),
    ],
    "attributions": [
        Setting("Gradient", method="gradient"),
        Setting("Gradient w/o m^s", method="gradient", use_difficulty=False),
        Setting("Int. grad.", method="integrated_gradients"),
        Setting("Gradient-Hessian"),
    ],
}


@dataclass(frozen=True)
class EvalOptions:
    """Protocol parameters (the paper's defaults)."""

    num_images: int = 100
    top_n: int = 5
    k: int = 3
    fraction: float | None = None  # ground-truth fraction: 0.2 (CUB) / 0.01 (ADE20K) when None
    divergence: str = "kl"  # CUB similarity: 'kl' (paper) or 'js' (authors' code)
    runs: int = 3  # random-baseline seeds
    batch_size: int = 16
    ig_steps: int = 50
    difficulty_channels: str = "positive"  # the authors' difficulty map (see attribution.Options)
    seed: int = 0

    def check(self) -> EvalOptions:
        if self.num_images < 1:
            raise ValueError(f"num_images must be >= 1, got {self.num_images}")
        if not 2 <= self.k <= self.top_n:
            raise ValueError(f"--k must lie between 2 and --top-n, got --k {self.k} with --top-n {self.top_n}")
        if self.fraction is not None and not 0 < self.fraction <= 1:
            raise ValueError(f"fraction must be in (0, 1], got {self.fraction}")
        if self.runs < 1 or self.batch_size < 1:
            raise ValueError("runs and batch_size must be >= 1")
        return self


@dataclass
class Curves:
    """Per-coverage sums of one metric over insecurities: mean = total / count where count > 0."""

    total: np.ndarray = field(default_factory=lambda: np.zeros(len(COVERAGES)))
    count: np.ndarray = field(default_factory=lambda: np.zeros(len(COVERAGES)))

    def add(self, values: np.ndarray, defined: np.ndarray) -> None:
        """values, defined (Q, R)."""
        self.total += np.where(defined, values, 0.0).sum(axis=0)
        self.count += defined.sum(axis=0)

    def add_sums(self, total: np.ndarray, count: np.ndarray) -> None:
        """Per-coverage sums (R,) already reduced over insecurities (on the device)."""
        self.total += np.asarray(total, np.float64)
        self.count += np.asarray(count, np.float64)

    @property
    def mean(self) -> np.ndarray:
        return np.divide(self.total, self.count, out=np.full(len(COVERAGES), np.nan), where=self.count > 0)


def _options(setting: Setting, options: EvalOptions, num_classes: int) -> Options:
    top_n = min(options.top_n, num_classes)
    extra = {"steps": options.ig_steps} if setting.method == "integrated_gradients" else {}
    return Options(
        method=setting.method,
        score=setting.score,
        top_n=top_n,
        difficulty_channels=options.difficulty_channels,
        **extra,
    ).check(num_classes)


def _padded(batch: dict, size: int) -> tuple[dict, np.ndarray]:
    """The batch with its last row repeated up to ``size`` rows (one compiled shape for the last, short batch) and
    the (size,) bool mask of its real rows."""
    n = len(batch["image"])
    rows = np.arange(size) < n
    if n == size:
        return batch, rows
    pad = {
        k: np.concatenate([v, np.repeat(v[-1:], size - n, axis=0)])
        for k, v in batch.items()
        if isinstance(v, np.ndarray) and v.ndim and len(v) == n
    }
    return {**batch, **pad}, rows


@functools.lru_cache(maxsize=16)
def _rank_step(structure: Structure, score: str, stats: Normalization) -> Callable:
    """One compiled forward of uint8 images (B, H, W, 3), normalised with ``stats`` on the device -> (difficulty
    scores (B,), all outputs finite) per model structure and score."""
    from delib_jax import difficulty

    def step(leaves, images):
        out = structure.merge(leaves)(model_input(images, stats))
        outputs = [out.logits] + ([] if out.hardness_logit is None else [out.hardness_logit])
        finite = jnp.all(jnp.stack([jnp.isfinite(o).all() for o in outputs]))
        return difficulty.score_from_outputs(score, out.logits, out.hardness_logit), finite

    return jax.jit(step)


def hardest_images(model, config: RunConfig, source, score: str, num_images: int, batch_size: int) -> np.ndarray:
    """Positions (in ``source``) of the ``num_images`` test images of largest difficulty ``score``, hardest first."""
    structure, leaves = split_leaves(inference_view(model))  # eval mode; the caller's model keeps its own
    step = _rank_step(structure, score, config.normalization)
    pipe = eval_pipeline(
        source,
        batch_size=batch_size,
        resize=config.resize,
        crop=config.crop,
        stats=config.normalization,
        normalize=False,
    )
    scores, flags, rows = [], [], []
    for batch in progress_bar(pipe, desc=f"ranking test images by {score}", leave=False, unit="batch"):
        batch, real = _padded(batch, batch_size)
        s, finite = step(leaves, jnp.asarray(batch["image"]))  # dispatched; read back once at the end
        scores.append(s)
        flags.append(finite)
        rows.append(real)
    if not all(bool(f) for f in flags):
        raise NonFiniteOutputs(
            "the model's outputs are not finite (NaN or inf logits on the test images; a "
            "diverged training run): retrain it, e.g. with a lower --lr"
        )
    scores = np.concatenate([np.asarray(s)[r] for s, r in zip(scores, rows)])
    return np.argsort(-scores, kind="stable")[: min(num_images, len(scores))]


def _masked_sums(values, defined, weight):
    """Sums over insecurities of ``values`` (M, R) where ``defined`` (M, R) and ``weight`` (M,): (total, count)."""
    ok = defined & weight[:, None]
    return jnp.sum(jnp.where(ok, values, 0.0), axis=0), jnp.sum(ok, axis=0)


def _insecurity_maps(model, images, rows, setting: Setting, opts: Options, k: int):
    """All candidate insecurities of a batch at fixed shapes: valid (B, R) (a real row's candidate ambiguity, as
    `find_insecurities` keeps it with every pair), pairs (B, R, 2), ambiguity maps upsampled to the image
    (B, R, H, W), the feature grid, and finiteness of the maps.

    No masks or thresholds: the protocol scores each map at every coverage itself. A candidate pair is kept when its
    upsampled map has a positive pixel (exactly when its mask at any coverage is non-empty)."""
    attr = _attribute_from_images(model, images, opts)
    finite = jnp.isfinite(attr.class_maps).all() & jnp.isfinite(attr.difficulty_map).all()
    amb = ambiguity_maps(attr.class_maps, attr.difficulty_map, combine=setting.combine).astype(jnp.float32)
    up = upsample(amb, images.shape[1:3])  # (B, R, H, W)
    valid = candidate_pairs(attr.class_maps, k=k) & (jnp.max(up, axis=(-2, -1)) > 0) & rows[:, None]
    ia, ib = pair_indices(attr.class_maps.shape[1])
    pairs = jnp.stack([attr.classes[:, ia], attr.classes[:, ib]], axis=-1)  # (B, R, 2)
    return valid, pairs, up, amb.shape[-2:], finite


@functools.lru_cache(maxsize=16)
def _cub_step(
    structure: Structure, setting: Setting, opts: Options, k: int, runs: int, stats: Normalization
) -> Callable:
    """One compiled batch of the CUB protocol: uint8 images normalised with ``stats`` -> maps -> insecurities ->
    precision / recall / keypoint-AUC sums at every coverage, for the method and ``runs`` random baselines; only these
    small sums leave the device."""

    def step(leaves, images, parts, visible, rows, truth, counts, key):
        valid, pairs, amaps, grid, finite = _insecurity_maps(
            structure.merge(leaves), model_input(images, stats), rows, setting, opts, k
        )
        b, q = valid.shape
        maps = amaps.reshape(b * q, *amaps.shape[2:])  # (M, H, W), M = B Q
        points = jnp.repeat(parts, q, axis=0)  # (M, K, 2): each insecurity's image keypoints
        seen = jnp.repeat(visible, q, axis=0)
        labels = truth[pairs[..., 0], pairs[..., 1]].reshape(b * q, -1)  # (M, K): part ambiguous for (a, b)
        weight = valid.reshape(-1)

        def sums(m):
            p, r, has_p, has_t = point_precision_recall(m, points, seen, labels, counts)
            auc, defined = keypoint_auc(m, points, seen, labels)
            ok = defined & weight
            recall = _masked_sums(r, jnp.broadcast_to(has_t[:, None], r.shape), weight)
            return (*_masked_sums(p, has_p, weight), *recall, jnp.sum(jnp.where(ok, auc, 0.0)), jnp.sum(ok))

        keys = jax.random.split(key, runs)
        random = [sums(random_maps(keys[i], maps.shape, tuple(grid))) for i in range(runs)]
        return {"method": sums(maps), "random": random, "insecurities": jnp.sum(weight), "finite": finite}

    return jax.jit(step)


def _check_maps(results: list[dict], setting: Setting) -> list[dict]:
    results = jax.device_get(results)
    if not all(bool(r["finite"]) for r in results):
        raise NonFiniteOutputs(
            f"the {setting.method} attribution maps are not finite (NaN or inf; the model's "
            "gradients overflow): retrain it, e.g. with a lower --lr"
        )
    return results


def _hardest_batches(model, config: RunConfig, dataset, make_source, setting: Setting, options: EvalOptions):
    """(number of images, padded batches of the hardest test images with their real-row masks)."""
    test = make_source(dataset, "test")
    chosen = hardest_images(model, config, test, setting.score, options.num_images, options.batch_size)
    source = make_source(dataset, indices=test.indices[chosen])
    pipe = eval_pipeline(
        source,
        batch_size=options.batch_size,
        resize=config.resize,
        crop=config.crop,
        stats=config.normalization,
        normalize=False,
    )  # uint8: normalised by the compiled step
    batches = (
        _padded(batch, options.batch_size)
        for batch in progress_bar(pipe, desc=f"evaluating {setting.name}", leave=False, unit="batch")
    )
    return len(chosen), batches


def _protocol_sums(
    model,
    config: RunConfig,
    dataset,
    make_source,
    setting: Setting,
    options: EvalOptions,
    make_step: Callable,
    truth: np.ndarray,
    inputs: Callable[[dict], tuple],
) -> tuple[int, list[dict]]:
    """The compiled protocol step (``make_step``: `_cub_step` or `_ade_step`) over the padded batches of the hardest
    test images; ``inputs(batch)`` gives the step's per-batch arrays. Returns (images, per-batch sums on the host)."""
    structure, leaves = split_leaves(inference_view(model))  # eval mode; the caller's model keeps its own
    step = make_step(
        structure,
        setting,
        _options(setting, options, config.num_classes),
        options.k,
        options.runs,
        config.normalization,
    )
    n_images, batches = _hardest_batches(model, config, dataset, make_source, setting, options)
    counts = jnp.asarray(coverage_counts(config.crop * config.crop))
    truth = jnp.asarray(truth)
    key = jax.random.key(options.seed)
    results = []
    for batch, rows in batches:
        key, sub = jax.random.split(key)
        arrays = [jnp.asarray(x) for x in inputs(batch)]
        results.append(step(leaves, *arrays, jnp.asarray(rows), truth, counts, sub))  # dispatched, not waited for
    return n_images, _check_maps(results, setting)


def evaluate_cub(
    model, config: RunConfig, dataset, setting: Setting, options: EvalOptions, truth: np.ndarray | None = None
) -> dict:
    """Precision and recall curves of one setting on CUB-format data (and the random baseline).

    Each batch is one compiled step with fixed shapes (the last batch padded): insecurities, their metrics and the
    random baselines are computed on the device and only per-coverage sums come back, once, at the end."""
    options = options.check()
    if truth is None:
        strength = gt.cub_ambiguity_strength(
            dataset.class_attributes, dataset.attribute_names, dataset.part_names, divergence=options.divergence
        )
        truth = gt.select_ground_truth(strength, options.fraction or 0.2)
    n_images, results = _protocol_sums(
        model, config, dataset, cub_source, setting, options, _cub_step, truth,
        lambda batch: (batch["image"], batch["parts"], batch["part_visible"]),
    )  # fmt: skip
    prec, rec = Curves(), Curves()
    rand = [(Curves(), Curves()) for _ in range(options.runs)]
    auc = np.zeros((1 + options.runs, 2))  # (sum, count) of keypoint AUCs: the method, then each random run
    for r in results:
        for row, (sums, (p, rr)) in enumerate(zip([r["method"], *r["random"]], [(prec, rec), *rand])):
            p.add_sums(sums[0], sums[1])
            rr.add_sums(sums[2], sums[3])
            auc[row] += (sums[4], sums[5])
    n_ins = int(sum(int(r["insecurities"]) for r in results))
    mean_auc = [float(s / n) if n else None for s, n in auc]
    return {
        "setting": dataclasses.asdict(setting),
        "metric": "precision",
        "images": n_images,
        "insecurities": n_ins,
        "coverage": COVERAGES.tolist(),
        "precision": prec.mean.tolist(),
        "recall": rec.mean.tolist(),
        "random_precision": [c[0].mean.tolist() for c in rand],
        "random_recall": [c[1].mean.tolist() for c in rand],
        "keypoint_auc": mean_auc[0],
        "random_keypoint_auc": mean_auc[1:],
        "ground_truth_fraction": options.fraction or 0.2,
        "divergence": options.divergence,
    }


def _training_labels(dataset, i: int, num_objects: int) -> np.ndarray:
    """The object labels in the mask of dataset example ``i``, checked as the training pipeline checks masks (one
    channel, the size of its image) and against the object vocabulary (labels 0..num_objects); `DatasetError` naming
    the file."""
    values = np.unique(read_mask(dataset, i))
    if values[-1] > num_objects:
        raise fail(
            dataset.mask_paths[i],
            f"label {values[-1]} exceeds the {num_objects} objects of the object list "
            "(objectInfo150): fix the mask or the object list",
        )
    return values


def _presence_key(dataset) -> str:
    """Identifies what the object presence is read from: the resolved dataset folder, its training images and the
    object count (so that another dataset never reuses the cache)."""
    train = [dataset.stems[i] for i in np.flatnonzero(dataset.is_train)]
    text = json.dumps([str(Path(dataset.root).resolve()), len(dataset.objects.names), train])
    return hashlib.sha1(text.encode()).hexdigest()


def _cached_presence(cache: Path, key: str, shape: tuple[int, int]) -> np.ndarray | None:
    """The cached object presence if ``cache`` holds one made from the same dataset (its key file matches)."""
    key_file = cache.with_suffix(".key")
    try:
        if key_file.read_text().strip() != key:
            return None
        present = np.load(cache)
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    return present if present.shape == shape and present.dtype == bool else None


def ade_object_presence(
    dataset, cache: Path | None = None, progress: Callable[[str], None] | None = None
) -> np.ndarray:
    """(N_train, O) bool: which of the objects each training image contains.

    Read once and cached as ``cache`` (.npy) with the dataset's key beside it (``cache`` with suffix .key); a cache of
    another dataset (or a damaged one) is rebuilt."""
    num_objects = len(dataset.objects.names)
    train = np.flatnonzero(dataset.is_train)
    key = _presence_key(dataset)
    if cache is not None and cache.is_file():
        present = _cached_presence(cache, key, (len(train), num_objects))
        if present is not None:
            return present
        if progress is not None:
            progress(f"rebuilding {cache}: it was made from another dataset (or is damaged)")
    present = np.zeros((len(train), num_objects), bool)
    for row, i in enumerate(progress_bar(train, desc="object frequencies (training masks)", leave=False, unit="mask")):
        values = _training_labels(dataset, i, num_objects)
        values = values[values >= 1]
        present[row, values - 1] = True
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        cache.with_suffix(".key").unlink(missing_ok=True)
        with open(cache, "wb") as f:  # np.save(path) would append .npy to another suffix
            np.save(f, present)
        cache.with_suffix(".key").write_text(key + "\n")
    return present


def ade_ground_truth(
    dataset, options: EvalOptions, cache: Path | None = None, progress: Callable[[str], None] | None = None
) -> np.ndarray:
    """(C, C, O) bool ground truth of ADE20K-format data (phi from the training split)."""
    present = ade_object_presence(dataset, cache, progress)
    phi = gt.ade_object_frequency(dataset.labels[dataset.is_train], present, len(dataset.scene_names))
    return gt.select_ground_truth(gt.ade_ambiguity_strength(phi), options.fraction or 0.01)


@functools.lru_cache(maxsize=16)
def _ade_step(
    structure: Structure, setting: Setting, opts: Options, k: int, runs: int, stats: Normalization
) -> Callable:
    """One compiled batch of the ADE20K protocol (uint8 images normalised with ``stats``): IoU sums at every coverage
    for the method and ``runs`` random baselines (insecurities taken 16 at a time: each ranks every pixel against 150
    objects)."""

    def step(leaves, images, segmentation, rows, truth, counts, key):
        valid, pairs, amaps, grid, finite = _insecurity_maps(
            structure.merge(leaves), model_input(images, stats), rows, setting, opts, k
        )
        b, q = valid.shape
        maps = amaps.reshape(b * q, *amaps.shape[2:])
        seg = jnp.repeat(segmentation, q, axis=0)  # (M, H, W)
        cand = truth[pairs[..., 0], pairs[..., 1]].reshape(b * q, -1)  # (M, O)
        weight = valid.reshape(-1)

        def sums(m):
            iou = jax.lax.map(
                lambda x: mask_iou(x[0][None], x[1][None], x[2][None], counts)[0], (m, seg, cand), batch_size=16
            )  # (M, R)
            return _masked_sums(iou, jnp.ones(iou.shape, bool), weight)

        keys = jax.random.split(key, runs)
        random = [sums(random_maps(keys[i], maps.shape, tuple(grid))) for i in range(runs)]
        return {"method": sums(maps), "random": random, "insecurities": jnp.sum(weight), "finite": finite}

    return jax.jit(step)


def evaluate_ade20k(
    model, config: RunConfig, dataset, setting: Setting, options: EvalOptions, truth: np.ndarray
) -> dict:
    """IoU curve of one setting on ADE20K-format data (and the random baseline); compiled per batch as
    `evaluate_cub`."""
    options = options.check()
    num_objects = truth.shape[-1]

    def check_labels(batch):
        above = np.flatnonzero(batch["mask"].max(axis=(1, 2)) > num_objects)
        if len(above):
            raise fail(
                dataset.mask_paths[batch["index"][above[0]]],
                f"labels exceed the {num_objects} objects of the object list (objectInfo150): fix the mask",
            )
        return batch["image"], batch["mask"].astype(np.int32)

    n_images, results = _protocol_sums(model, config, dataset, ade20k_source, setting, options, _ade_step, truth,
                                       check_labels)  # fmt: skip
    iou = Curves()
    rand = [Curves() for _ in range(options.runs)]
    for r in results:
        for sums, curves in zip([r["method"], *r["random"]], [iou, *rand]):
            curves.add_sums(*sums)
    n_ins = int(sum(int(r["insecurities"]) for r in results))
    return {
        "setting": dataclasses.asdict(setting),
        "metric": "iou",
        "images": n_images,
        "insecurities": n_ins,
        "coverage": COVERAGES.tolist(),
        "iou": iou.mean.tolist(),
        "random_iou": [c.mean.tolist() for c in rand],
        "ground_truth_fraction": options.fraction or 0.01,
    }
