"""Input pipelines (no TensorFlow): parallel decoding, augmentation and prefetching with ``grain``.

A pipeline is a pure function of ``(source, config, step)``: batch ``step`` holds the examples at positions
``[j * B, (j + 1) * B)`` of epoch ``e``'s order (``e, j = divmod(step, steps_per_epoch)``; the order is a permutation
drawn from ``(seed, e)`` when shuffling), and each example's augmentation is drawn from ``(seed, e, dataset index)``.
So the same seed gives the same batches in the same order whatever the number of threads, and
``pipeline.iterate(start_step=s)`` resumes exactly where a run that had consumed ``s`` batches stopped. With
``shard=(k, n)`` a pipeline yields only rows ``[k B / n, (k + 1) B / n)`` of each of those batches: the n processes of
a multi-process run each decode their own rows of the same global batches.

The examples' images (and masks) are files, or the records of a TFDS build (`delib_jax.data.load_dataset` reads
either form; ``Source.records``): the same batches either way, for the same examples and seed.

Example::

    ds = load_cub("/data/CUB_200_2011")
    train = train_pipeline(cub_source(ds, "train"), batch_size=64, seed=0, num_epochs=None)
    for step, batch in enumerate(train.iterate(start_step=restored_step), start=restored_step):
        ...  # batch["image"]: (64, 224, 224, 3) float32, NHWC, normalised

With ``normalize=False`` the images stay (B, H, W, 3) uint8 pixels and the consumer normalises them on the device
(`transforms.model_input` inside its compiled step, as training and evaluation do): a quarter of the bytes to batch and
copy, and about a millisecond less host CPU per 224 px image, which is most of what a pre-resized source leaves.
"""

from __future__ import annotations

import dataclasses
import io
import math
from collections.abc import Iterator
from typing import Any, Literal

import grain
import numpy as np
from PIL import Image

from delib_jax.data import transforms
from delib_jax.data._text import DatasetError, fail
from delib_jax.data.ade20k import Ade20kDataset
from delib_jax.data.cub import CubDataset
from delib_jax.data.transforms import CUB_STATS, IMAGENET_STATS, Normalization

Split = Literal["train", "test", "all"]


@dataclasses.dataclass(frozen=True)
class Source:
    """The N examples a pipeline reads, with the annotations that move with the image.

    Attributes:
      image_paths: N image files.
      labels: (N,) int64 class ids.
      indices: (N,) int64 index of each example in its dataset (returned as ``batch["index"]``).
      parts: (N, P, 2) float32 keypoints ``(x, y)`` in source pixels, or None.
      part_visible: (N, P) bool, or None.
      part_names: P part names (left/right pairs are swapped by flips), or None.
      mask_paths: N one-channel label PNGs (values 0..255), or None.
      name: what the examples are, for messages ("the CUB test split of ROOT").
      why_empty: the likely cause should there be no examples (said with "has no examples").
      records: where the encoded images (and masks) are read from when they are not files: an object whose
        ``encoded(i)`` returns ``(image bytes, mask bytes or None)`` of dataset index ``i`` (a TFDS build,
        `delib_jax.data.tfds.TfdsRecords`); None to read ``image_paths`` / ``mask_paths`` from disk.
    """

    image_paths: tuple[str, ...]
    labels: np.ndarray
    indices: np.ndarray
    parts: np.ndarray | None = None
    part_visible: np.ndarray | None = None
    part_names: tuple[str, ...] | None = None
    mask_paths: tuple[str, ...] | None = None
    name: str = "the source"
    why_empty: str = ""
    records: Any = None

    def __len__(self) -> int:
        return len(self.image_paths)


def _split_indices(is_train: np.ndarray, split: Split) -> np.ndarray:
    if split == "train":
        return np.flatnonzero(is_train)
    if split == "test":
        return np.flatnonzero(~is_train)
    if split == "all":
        return np.arange(len(is_train))
    raise ValueError(f"split must be 'train', 'test' or 'all', got {split!r}")


def _names(
    dataset: str, root, split: Split, indices: np.ndarray | None, why: dict[str, str], test: str = "test"
) -> dict[str, str]:
    """``name`` and ``why_empty`` of a `Source`: which split of which dataset, and why it could be empty."""
    if indices is not None:
        return {"name": f"the selected {dataset} images of {root}", "why_empty": "no image index was given"}
    label = {"train": "training", "test": test, "all": "complete"}[split]
    return {"name": f"the {dataset} {label} split of {root}", "why_empty": why.get(split, "the dataset lists no image")}


def cub_source(ds: CubDataset, split: Split = "train", *, indices: np.ndarray | None = None) -> Source:
    """The CUB examples of ``split`` (official split) or of explicit dataset ``indices``, with their parts."""
    ix = _split_indices(ds.is_train, split) if indices is None else np.asarray(indices, dtype=np.int64)
    why = {
        "train": "train_test_split.txt marks no image as a training image, is_training_image 1",
        "test": "train_test_split.txt marks no image as a test image, is_training_image 0",
    }
    return Source(
        image_paths=tuple(ds.image_paths[i] for i in ix),
        labels=ds.labels[ix],
        indices=ix,
        parts=ds.parts[ix],
        part_visible=ds.part_visible[ix],
        part_names=ds.part_names,
        records=getattr(ds, "records", None),
        **_names("CUB", getattr(ds, "root", "the dataset"), split, indices, why),
    )


def ade20k_source(ds: Ade20kDataset, split: Split = "train", *, indices: np.ndarray | None = None) -> Source:
    """The ADE20K examples of ``split`` ("test" = validation) or of explicit ``indices``: scene labels and masks."""
    ix = _split_indices(ds.is_train, split) if indices is None else np.asarray(indices, dtype=np.int64)
    dropped = getattr(ds, "num_dropped_val", 0)
    why = {
        "train": "images/training holds no image listed in sceneCategories.txt",
        "test": f"{dropped} validation images were dropped because their scene never occurs in training"
        if dropped
        else "images/validation holds no image listed in sceneCategories.txt",
    }
    return Source(
        image_paths=tuple(ds.image_paths[i] for i in ix),
        labels=ds.labels[ix],
        indices=ix,
        mask_paths=tuple(ds.mask_paths[i] for i in ix),
        records=getattr(ds, "records", None),
        **_names("ADE20K", getattr(ds, "root", "the dataset"), split, indices, why, test="validation"),
    )


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
    """How to batch and augment.

    Attributes:
      batch_size: B.
      train: augment with RandomResizedCrop(crop) + horizontal flip; otherwise Resize(resize) + CenterCrop(crop).
      crop: output side.
      resize: shorter side before the centre crop (evaluation only).
      stats: normalisation statistics.
      seed: shuffling and augmentation seed.
      shuffle: reshuffle every epoch (default: ``train``).
      num_epochs: epochs to run, None for endless.
      drop_remainder: drop each epoch's last partial batch.
      num_threads: decoding threads (each decodes whole batches), in each worker process if there are any.
      prefetch: batches decoded ahead (at least ``num_threads``, so that every thread has one to work on).
      num_workers: decoding processes (grain's ``mp_prefetch``, started with 'spawn'), each with ``num_threads``
        threads; 0: threads of this process only. Threads share one interpreter lock, and the Python part of each
        example (about 0.45 ms of a pre-resized image's 1.45 ms on the 2-core development CPU) caps one process
        near 2,200 images/s however many cores it has; processes lift that cap at the price of a start-up (~2 s) and
        of copying batches between processes. The batches are the same either way.
      normalize: images as float32 normalised with ``stats`` on the host; False: uint8 pixels, to be normalised on the
        device (`transforms.model_input`).
      shard: (k, n): this pipeline yields rows [k B / n, (k + 1) B / n) of each batch of B (process k of n, each
        decoding only its rows of the global batch); B must be a multiple of n. A partial last batch leaves fewer
        rows, perhaps none, to the last shards.
    """

    batch_size: int
    train: bool
    crop: int = 224
    resize: int = 256
    stats: Normalization = CUB_STATS
    seed: int = 0
    shuffle: bool | None = None
    num_epochs: int | None = 1
    drop_remainder: bool = False
    num_threads: int = 4
    prefetch: int = 4
    normalize: bool = True
    num_workers: int = 0
    shard: tuple[int, int] = (0, 1)

    def __post_init__(self):
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.num_epochs is not None and self.num_epochs < 1:
            raise ValueError(f"num_epochs must be >= 1 or None, got {self.num_epochs}")
        if self.num_threads < 1 or self.prefetch < 1:
            raise ValueError("num_threads and prefetch must be >= 1")
        if self.num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {self.num_workers}")
        if not self.train and self.crop > self.resize:
            raise ValueError(f"crop ({self.crop}) must not exceed resize ({self.resize})")
        k, n = self.shard
        if not 0 <= k < n or self.batch_size % n:
            raise ValueError(f"shard {k} of {n} is not a shard of batches of {self.batch_size}")


def decode_image(path: str) -> Image.Image:
    """Open and fully decode an image file to RGB exactly as ``delib explain`` does (`transforms.read_rgb`: 16-bit
    scaled, alpha over white), without EXIF rotation (annotations are in stored pixels); `DatasetError` naming the
    file if it is missing, corrupt or holds NaN pixels."""
    try:
        return transforms.read_rgb(path, exif_orientation=False)
    except transforms.ImageReadError as e:
        raise DatasetError(str(e)) from None


def decode_image_bytes(data: bytes, name: str) -> Image.Image:
    """`decode_image` for an encoded image in memory (a TFDS record); ``name`` stands for the file in errors."""
    try:
        return transforms.decode_rgb(data, name, exif_orientation=False)
    except transforms.ImageReadError as e:
        raise DatasetError(str(e)) from None


def decode_mask(path: str | bytes, size: tuple[int, int], *, name: str | None = None) -> np.ndarray:
    """Read a one-channel label PNG (a file, or its bytes named ``name``) of image size ``size = (W, H)`` as (H, W)
    uint8."""
    if isinstance(path, bytes):
        path, fp = name or "mask", io.BytesIO(path)
    else:
        fp = path
    try:
        with Image.open(fp) as image:
            image.load()
            if image.mode not in ("L", "P", "I", "I;16"):
                raise ValueError(f"expected a one-channel mask, found mode {image.mode}")
            mask = np.asarray(image)
    except (OSError, SyntaxError, ValueError) as e:
        raise fail(path, f"cannot decode mask ({e})") from None
    if (mask.shape[1], mask.shape[0]) != size:
        raise fail(path, f"mask is {mask.shape[1]}x{mask.shape[0]}, its image is {size[0]}x{size[1]}")
    if mask.max(initial=0) > 255:
        raise fail(path, "mask values exceed 255")
    return mask.astype(np.uint8)


def read_mask(ds: Ade20kDataset, index: int) -> np.ndarray:
    """The (H, W) uint8 mask of dataset example ``index`` (from its file or the dataset's records), checked against
    its image's size as the pipeline checks it; `DatasetError` naming the file."""
    records = getattr(ds, "records", None)
    image, mask = (ds.image_paths[index], ds.mask_paths[index]) if records is None else records.encoded(index)
    try:
        with Image.open(image if records is None else io.BytesIO(image)) as im:
            size = im.size
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise fail(ds.image_paths[index], f"cannot read image ({e})") from None
    return decode_mask(mask, size, name=ds.mask_paths[index])


def load_example(source: Source, position: int, config: PipelineConfig, rng: np.random.Generator | None) -> dict:
    """Decode and transform one example.

    Returns:
      dict with image (H, W, 3) float32 (uint8 without ``config.normalize``), label (), index (), and parts (P, 2) /
      part_visible (P,) / mask (H, W) uint8 where the source has them.
    """
    image, mask = read_example(source, position)
    w, h = image.size
    if config.train:
        plan = transforms.train_plan(w, h, rng, crop=config.crop)
    else:
        plan = transforms.eval_plan(w, h, resize=config.resize, crop=config.crop)
    pixels = transforms.apply_to_image(plan, image)
    out = {
        "image": transforms.normalize(pixels, config.stats) if config.normalize else pixels,
        "label": np.int64(source.labels[position]),
        "index": np.int64(source.indices[position]),
    }
    if source.parts is not None:
        perm = transforms.flip_permutation(source.part_names or ())
        out["parts"], out["part_visible"] = transforms.apply_to_points(
            plan, source.parts[position], source.part_visible[position], flip_perm=perm
        )
    if mask is not None:
        out["mask"] = transforms.apply_to_mask(plan, mask)
    return out


def read_example(source: Source, position: int) -> tuple[Image.Image, np.ndarray | None]:
    """The decoded RGB image of example ``position`` and its (H, W) uint8 mask (None without masks), read from its
    files or from ``source.records``."""
    if source.records is None:
        image = decode_image(source.image_paths[position])
        if source.mask_paths is None:
            return image, None
        return image, decode_mask(source.mask_paths[position], image.size)
    image_bytes, mask_bytes = source.records.encoded(int(source.indices[position]))
    image = decode_image_bytes(image_bytes, source.image_paths[position])
    if source.mask_paths is None or mask_bytes is None:
        return image, None
    return image, decode_mask(mask_bytes, image.size, name=source.mask_paths[position])


class Pipeline:
    """Deterministic, resumable batches of a `Source`: ``dict`` of NumPy arrays.

    Keys: image (B, H, W, 3) float32 normalised (uint8 pixels without ``config.normalize``), label (B,) int64, index
    (B,) int64 dataset index, and where the source has them parts (B, P, 2) float32, part_visible (B, P) bool, mask
    (B, H, W) uint8. The last batch of an epoch may be smaller unless ``drop_remainder``.
    """

    def __init__(self, source: Source, config: PipelineConfig):
        if len(source) == 0:
            why = f" ({source.why_empty})" if source.why_empty else ""
            raise ValueError(f"{source.name} has no examples{why}")
        self.source = source
        self.config = config
        n, b = len(source), config.batch_size
        self.steps_per_epoch = n // b if config.drop_remainder else math.ceil(n / b)
        if self.steps_per_epoch == 0:
            raise ValueError(f"batch_size {b} with drop_remainder leaves no batch of {n} examples")

    @property
    def num_steps(self) -> int | None:
        """Total batches, None if endless."""
        return None if self.config.num_epochs is None else self.config.num_epochs * self.steps_per_epoch

    def __len__(self) -> int:
        if self.num_steps is None:
            raise TypeError("an endless pipeline (num_epochs=None) has no length")
        return self.num_steps

    def position(self, step: int) -> tuple[int, int]:
        """``(epoch, batch within epoch)`` of global batch ``step``."""
        return divmod(step, self.steps_per_epoch)

    def epoch_order(self, epoch: int) -> np.ndarray:
        """(N,) source positions in the order of ``epoch``."""
        n = len(self.source)
        shuffle = self.config.train if self.config.shuffle is None else self.config.shuffle
        if not shuffle:
            return np.arange(n)
        return np.random.default_rng([self.config.seed, epoch, 0x5EED]).permutation(n)

    def batch(self, step: int) -> dict[str, np.ndarray]:
        """Batch number ``step`` (random access; what `iterate` yields at that step)."""
        if step < 0 or (self.num_steps is not None and step >= self.num_steps):
            raise IndexError(f"step {step} outside [0, {self.num_steps})")
        epoch, j = self.position(step)
        b = self.config.batch_size
        k, n = self.config.shard
        positions = self.epoch_order(epoch)[j * b : (j + 1) * b][k * b // n : (k + 1) * b // n]
        if len(positions) == 0:
            return self._empty_batch()
        examples = [
            load_example(
                self.source,
                int(p),
                self.config,
                np.random.default_rng([self.config.seed, epoch, int(self.source.indices[p])])
                if self.config.train
                else None,
            )
            for p in positions
        ]
        return {k: np.stack([e[k] for e in examples]) for k in examples[0]}

    def _empty_batch(self) -> dict[str, np.ndarray]:
        """A batch of no rows with the keys, dtypes and trailing shapes of this pipeline's batches (a shard's share
        of a partial last batch can be empty)."""
        c, src = self.config.crop, self.source
        out = {
            "image": np.zeros((0, c, c, 3), np.float32 if self.config.normalize else np.uint8),
            "label": np.zeros(0, np.int64),
            "index": np.zeros(0, np.int64),
        }
        if src.parts is not None:
            out["parts"] = np.zeros((0, *src.parts.shape[1:]), np.float32)
            out["part_visible"] = np.zeros((0, src.parts.shape[1]), bool)
        if src.mask_paths is not None:
            out["mask"] = np.zeros((0, c, c), np.uint8)
        return out

    def iterate(self, *, start_step: int = 0, stop_step: int | None = None) -> Iterator[dict[str, np.ndarray]]:
        """Batches ``start_step, start_step + 1, ...`` (up to ``stop_step`` exclusive, else to the end), decoded by
        ``num_threads`` threads (in each of ``num_workers`` processes, if any), ``max(prefetch, num_threads)``
        batches ahead."""
        stop = self.num_steps if self.num_steps is not None else 2**62
        if stop_step is not None:
            if not 0 <= stop_step <= stop:
                raise ValueError(f"stop_step {stop_step} outside [0, {stop}]")
            stop = stop_step
        if not 0 <= start_step <= stop:
            raise ValueError(f"start_step {start_step} outside [0, {stop}]")
        if start_step == stop:
            return iter(())
        dataset = grain.MapDataset.range(start_step, stop).map(self.batch)
        # grain runs at most prefetch_buffer_size elements at once: a smaller buffer would idle the other threads
        ahead = max(self.config.prefetch, self.config.num_threads)
        options = grain.ReadOptions(num_threads=self.config.num_threads, prefetch_buffer_size=ahead)
        batches = dataset.to_iter_dataset(options)
        if self.config.num_workers:  # worker k computes batches k, k + W, ...; they come back in order
            _prepare_grain_workers()
            workers = self.config.num_workers
            mp = grain.MultiprocessingOptions(num_workers=workers, per_worker_buffer_size=max(1, -(-ahead // workers)))
            batches = batches.mp_prefetch(mp, worker_init_fn=_ignore_interrupts)
        return iter(batches)

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return self.iterate()


def _ignore_interrupts(worker: int, workers: int) -> None:
    """Decoding processes ignore Ctrl-C (a terminal sends it to the whole process group): the caller stops them, and
    an interrupt must print one line, not a traceback per process."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _prepare_grain_workers() -> None:
    """What grain's process workers need from this process (seen with grain 0.2 on Python 3.11).

    Its workers read grain's absl flags, which a program that never parsed absl flags (any but ``absl.app``
    programs) has not: they are marked parsed at their defaults (google/grain#1355). And at exit, Python's resource
    tracker counts the shared memory of the batches the workers had prepared beyond the last one as "leaked" and
    warns, although it removes them itself: the tracker is started (if it is not running yet) with that warning off.
    """
    import sys
    from multiprocessing import resource_tracker

    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()
    saved = list(sys.warnoptions)  # the tracker process takes this process's -W options
    sys.warnoptions.append("ignore:resource_tracker:UserWarning")
    try:
        resource_tracker.ensure_running()
    finally:
        sys.warnoptions[:] = saved


def train_pipeline(
    source: Source,
    *,
    batch_size: int,
    seed: int = 0,
    num_epochs: int | None = None,
    crop: int = 224,
    stats: Normalization = CUB_STATS,
    drop_remainder: bool = True,
    num_threads: int = 4,
    prefetch: int = 4,
    normalize: bool = True,
    num_workers: int = 0,
    shard: tuple[int, int] = (0, 1),
) -> Pipeline:
    """Training batches: reshuffled each epoch, RandomResizedCrop(crop) + horizontal flip (uint8 pixels unless
    ``normalize``); ``shard`` (k, n): only rows [k B / n, (k + 1) B / n) of each batch (`PipelineConfig.shard`)."""
    config = PipelineConfig(
        batch_size=batch_size, train=True, crop=crop, stats=stats, seed=seed, num_epochs=num_epochs,
        drop_remainder=drop_remainder, num_threads=num_threads, prefetch=prefetch, normalize=normalize,
        num_workers=num_workers, shard=shard,
    )  # fmt: skip
    return Pipeline(source, config)


def eval_pipeline(
    source: Source,
    *,
    batch_size: int,
    resize: int = 256,
    crop: int = 224,
    stats: Normalization = CUB_STATS,
    num_threads: int = 4,
    prefetch: int = 4,
    normalize: bool = True,
    num_workers: int = 0,
    shard: tuple[int, int] = (0, 1),
) -> Pipeline:
    """Evaluation batches: one epoch in source order, Resize(resize) + CenterCrop(crop), last batch kept (uint8
    pixels unless ``normalize``); ``shard`` (k, n): only rows [k B / n, (k + 1) B / n) of each batch."""
    config = PipelineConfig(
        batch_size=batch_size, train=False, resize=resize, crop=crop, stats=stats, num_epochs=1,
        drop_remainder=False, num_threads=num_threads, prefetch=prefetch, normalize=normalize,
        num_workers=num_workers, shard=shard,
    )  # fmt: skip
    return Pipeline(source, config)


__all__ = [
    "CUB_STATS", "IMAGENET_STATS", "Pipeline", "PipelineConfig", "Source", "ade20k_source", "cub_source",
    "decode_image", "decode_image_bytes", "decode_mask", "eval_pipeline", "load_example", "read_example",
    "read_mask", "train_pipeline",
]  # fmt: skip
