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
import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from delib_jax.attribution import make_attribute_fn
from delib_jax.checkpoint import RunConfig
from delib_jax.data._text import fail
from delib_jax.data.pipeline import ade20k_source, cub_source, eval_pipeline, read_mask
from delib_jax.evaluation import ground_truth as gt
from delib_jax.evaluation.metrics import (
    COVERAGES,
    coverage_counts,
    keypoint_auc,
    mask_iou,
    point_precision_recall,
    random_maps,
)
from delib_jax.insecurity import find_insecurities, product, upsample


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
    "scores": [Setting("Hesitancy score", score="hesitancy"), Setting("Entropy score", score="entropy"),
               Setting("Hardness score")],
    "attributions": [Setting("Gradient", method="gradient"),
                     Setting("Gradient w/o m^s", method="gradient", use_difficulty=False),
                     Setting("Int. grad.", method="integrated_gradients"), Setting("Gradient-Hessian")],
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

    @property
    def mean(self) -> np.ndarray:
        return np.divide(self.total, self.count, out=np.full(len(COVERAGES), np.nan), where=self.count > 0)


def _attribute_fn(model, setting: Setting, options: EvalOptions, num_classes: int):
    top_n = min(options.top_n, num_classes)
    extra = {"steps": options.ig_steps} if setting.method == "integrated_gradients" else {}
    return make_attribute_fn(model, method=setting.method, score=setting.score, top_n=top_n,
                             difficulty_channels=options.difficulty_channels, **extra)


def hardest_images(model, config: RunConfig, source, score: str, num_images: int, batch_size: int) -> np.ndarray:
    """Positions (in ``source``) of the ``num_images`` test images of largest difficulty ``score``, hardest first."""
    from delib_jax import difficulty
    from delib_jax.models import make_predict_fn

    predict = make_predict_fn(model)
    pipe = eval_pipeline(source, batch_size=batch_size, resize=config.resize, crop=config.crop,
                         stats=config.normalization)
    scores = []
    for batch in tqdm(pipe, desc=f"ranking test images by {score}", leave=False, unit="batch"):
        out = predict(jnp.asarray(batch["image"]))
        outputs = [out.logits] + ([] if out.hardness_logit is None else [out.hardness_logit])
        if not all(bool(jnp.isfinite(o).all()) for o in outputs):
            raise NonFiniteOutputs("the model's outputs are not finite (NaN or inf logits on the test images; a "
                                   "diverged training run): retrain it, e.g. with a lower --lr")
        scores.append(np.asarray(difficulty.score_from_outputs(score, out.logits, out.hardness_logit)))
    scores = np.concatenate(scores)
    return np.argsort(-scores, kind="stable")[: min(num_images, len(scores))]


def _insecurity_maps(fn, setting: Setting, options: EvalOptions, images: np.ndarray):
    """Valid insecurities of a batch: (image index (M,), pairs (M, 2), ambiguity maps (M, H, W), grid (h, w))."""
    attr = fn(jnp.asarray(images))
    if not bool(jnp.isfinite(attr.class_maps).all() & jnp.isfinite(attr.difficulty_map).all()):
        raise NonFiniteOutputs(f"the {setting.method} attribution maps are not finite (NaN or inf; the model's "
                               "gradients overflow): retrain it, e.g. with a lower --lr")
    size = images.shape[1:3]
    found = find_insecurities(attr.class_maps, attr.difficulty_map, attr.classes, image_size=size, k=options.k,
                              coverage=0.1, combine=setting.combine)
    valid = np.asarray(found.valid)
    b_idx, q_idx = np.nonzero(valid)
    maps = np.asarray(upsample(found.ambiguity, size))[b_idx, q_idx]
    return b_idx, np.asarray(found.pairs)[b_idx, q_idx], maps, found.ambiguity.shape[-2:]


def _explained_batches(model, config: RunConfig, dataset, make_source, setting: Setting, options: EvalOptions,
                       check: Callable[[dict], None] | None = None):
    """(number of images, iterator of (batch, image index (M,), pairs (M, 2), maps (M, H, W), grid)) over the
    hardest test images, each batch with its valid insecurities; ``check(batch)`` sees every batch first."""
    test = make_source(dataset, "test")
    chosen = hardest_images(model, config, test, setting.score, options.num_images, options.batch_size)
    source = make_source(dataset, indices=test.indices[chosen])
    pipe = eval_pipeline(source, batch_size=options.batch_size, resize=config.resize, crop=config.crop,
                         stats=config.normalization)
    fn = _attribute_fn(model, setting, options, config.num_classes)

    def batches():
        for batch in tqdm(pipe, desc=f"evaluating {setting.name}", leave=False, unit="batch"):
            if check is not None:
                check(batch)
            b_idx, pairs, maps, grid = _insecurity_maps(fn, setting, options, batch["image"])
            if len(b_idx):
                yield batch, b_idx, pairs, maps, grid

    return len(chosen), batches()


def evaluate_cub(model, config: RunConfig, dataset, setting: Setting, options: EvalOptions,
                 truth: np.ndarray | None = None) -> dict:
    """Precision and recall curves of one setting on CUB-format data (and the random baseline)."""
    options = options.check()
    if truth is None:
        strength = gt.cub_ambiguity_strength(dataset.class_attributes, dataset.attribute_names, dataset.part_names,
                                             divergence=options.divergence)
        truth = gt.select_ground_truth(strength, options.fraction or 0.2)
    n_images, batches = _explained_batches(model, config, dataset, cub_source, setting, options)
    counts = jnp.asarray(coverage_counts(config.crop * config.crop))
    prec, rec = Curves(), Curves()
    rand = [(Curves(), Curves()) for _ in range(options.runs)]
    auc = np.zeros((1 + options.runs, 2))  # (sum, count) of keypoint AUCs: the method, then each random run
    key = jax.random.key(options.seed)
    n_ins = 0

    def add_auc(row, amaps, points, visible, labels):
        values, defined = map(np.asarray, keypoint_auc(amaps, points, visible, labels))
        auc[row] += (values[defined].sum(), defined.sum())

    for batch, b_idx, pairs, maps, grid in batches:
        n_ins += len(b_idx)
        points = jnp.asarray(batch["parts"][b_idx])
        visible = jnp.asarray(batch["part_visible"][b_idx])
        labels = jnp.asarray(truth[pairs[:, 0], pairs[:, 1]])  # (M, K): part k ambiguous for (a, b)
        p, r, has_p, has_t = map(np.asarray, point_precision_recall(jnp.asarray(maps), points, visible, labels, counts))
        prec.add(p, has_p)
        rec.add(r, np.broadcast_to(has_t[:, None], r.shape))
        add_auc(0, jnp.asarray(maps), points, visible, labels)
        for run, (rp, rr) in enumerate(rand):
            key, sub = jax.random.split(key)
            noise = random_maps(sub, maps.shape, tuple(grid))
            p, r, has_p, has_t = map(np.asarray, point_precision_recall(noise, points, visible, labels, counts))
            rp.add(p, has_p)
            rr.add(r, np.broadcast_to(has_t[:, None], r.shape))
            add_auc(1 + run, noise, points, visible, labels)
    mean_auc = [float(s / n) if n else None for s, n in auc]
    return {
        "setting": dataclasses.asdict(setting), "metric": "precision", "images": n_images,
        "insecurities": n_ins, "coverage": COVERAGES.tolist(),
        "precision": prec.mean.tolist(), "recall": rec.mean.tolist(),
        "random_precision": [c[0].mean.tolist() for c in rand], "random_recall": [c[1].mean.tolist() for c in rand],
        "keypoint_auc": mean_auc[0], "random_keypoint_auc": mean_auc[1:],
        "ground_truth_fraction": options.fraction or 0.2, "divergence": options.divergence,
    }


def _training_labels(dataset, i: int, num_objects: int) -> np.ndarray:
    """The object labels in the mask of dataset example ``i``, checked as the training pipeline checks masks (one
    channel, the size of its image) and against the object vocabulary (labels 0..num_objects); `DatasetError` naming
    the file."""
    values = np.unique(read_mask(dataset, i))
    if values[-1] > num_objects:
        raise fail(dataset.mask_paths[i], f"label {values[-1]} exceeds the {num_objects} objects of the object list "
                              "(objectInfo150): fix the mask or the object list")
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


def ade_object_presence(dataset, cache: Path | None = None,
                        progress: Callable[[str], None] | None = None) -> np.ndarray:
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
    for row, i in enumerate(tqdm(train, desc="object frequencies (training masks)", leave=False, unit="mask")):
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


def ade_ground_truth(dataset, options: EvalOptions, cache: Path | None = None,
                     progress: Callable[[str], None] | None = None) -> np.ndarray:
    """(C, C, O) bool ground truth of ADE20K-format data (phi from the training split)."""
    present = ade_object_presence(dataset, cache, progress)
    phi = gt.ade_object_frequency(dataset.labels[dataset.is_train], present, len(dataset.scene_names))
    return gt.select_ground_truth(gt.ade_ambiguity_strength(phi), options.fraction or 0.01)


def evaluate_ade20k(model, config: RunConfig, dataset, setting: Setting, options: EvalOptions,
                    truth: np.ndarray) -> dict:
    """IoU curve of one setting on ADE20K-format data (and the random baseline)."""
    options = options.check()
    num_objects = truth.shape[-1]

    def check_labels(batch):
        above = np.flatnonzero(batch["mask"].max(axis=(1, 2)) > num_objects)
        if len(above):
            raise fail(dataset.mask_paths[batch["index"][above[0]]],
                       f"labels exceed the {num_objects} objects of the object list (objectInfo150): fix the mask")

    n_images, batches = _explained_batches(model, config, dataset, ade20k_source, setting, options, check_labels)
    counts = jnp.asarray(coverage_counts(config.crop * config.crop))
    iou = Curves()
    rand = [Curves() for _ in range(options.runs)]
    key = jax.random.key(options.seed)
    n_ins = 0
    for batch, b_idx, pairs, maps, grid in batches:
        n_ins += len(b_idx)
        seg = jnp.asarray(batch["mask"][b_idx].astype(np.int32))
        cand = jnp.asarray(truth[pairs[:, 0], pairs[:, 1]])
        values = np.asarray(mask_iou(jnp.asarray(maps), seg, cand, counts))
        iou.add(values, np.ones_like(values, bool))
        for curves in rand:
            key, sub = jax.random.split(key)
            values = np.asarray(mask_iou(random_maps(sub, maps.shape, tuple(grid)), seg, cand, counts))
            curves.add(values, np.ones_like(values, bool))
    return {
        "setting": dataclasses.asdict(setting), "metric": "iou", "images": n_images, "insecurities": n_ins,
        "coverage": COVERAGES.tolist(), "iou": iou.mean.tolist(), "random_iou": [c.mean.tolist() for c in rand],
        "ground_truth_fraction": options.fraction or 0.01,
    }
