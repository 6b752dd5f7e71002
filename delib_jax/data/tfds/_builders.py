"""TFDS builders of CUB-200-2011 and ADE20K that carry what the project uses, written as ArrayRecord, no TensorFlow.

Each builder reads the official release from its manual directory with the project's own readers
(`delib_jax.data.load_cub`, `delib_jax.data.load_ade20k`: the same files, the same quirks, the same errors), checks
that every image (and mask) decodes, and writes one record per example. TensorFlow is never imported: the image
features receive encoded bytes (TFDS only encodes NumPy images through TensorFlow) and the records are ArrayRecord.

Configs: ``original`` keeps each release file's bytes (the pixels the folder reader decodes, exactly); ``resizeN``
stores images whose shorter side exceeds N resized to a shorter side of N (bilinear, antialiased: torchvision's
``Resize(N)``) as JPEG of quality 90 (``resizeN_qQ`` for another quality), with keypoints, boxes and masks carried
through the same `delib_jax.data.transforms.Plan` (masks by nearest neighbour). Smaller images are kept as they are.

Every record holds ``index``, the example's position in the folder reader's dataset, so a build read back
(`delib_jax.data.tfds.load`) lists the examples in the same order with the same indices.
"""

from __future__ import annotations

import collections
import dataclasses
import io
import os
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image
from tqdm.auto import tqdm

from delib_jax.data import transforms
from delib_jax.data._text import DatasetError
from delib_jax.data.ade20k import Ade20kDataset, load_ade20k
from delib_jax.data.cub import CubDataset, load_cub
from delib_jax.data.pipeline import decode_image_bytes, decode_mask

VERSION = "1.0.0"
DEFAULT_RESIZE = 256
DEFAULT_QUALITY = 90


@dataclasses.dataclass(eq=False)
class ImageConfig(tfds.core.BuilderConfig):
    """How images are stored: ``resize`` None keeps the release's bytes; N stores shorter sides above N resized to N,
    as JPEG of ``quality``."""

    resize: int | None = None
    quality: int = DEFAULT_QUALITY


def image_config(resize: int | None = None, quality: int = DEFAULT_QUALITY) -> ImageConfig:
    """The config named ``original``, ``resize{N}`` or ``resize{N}_q{quality}`` (quality other than 90)."""
    if resize is None:
        return ImageConfig(name="original", description="the release's image (and mask) files, byte for byte")
    if resize < 1 or not 1 <= quality <= 100:
        raise ValueError(f"resize must be >= 1 and quality lie in [1, 100], got {resize} and {quality}")
    name = f"resize{resize}" + ("" if quality == DEFAULT_QUALITY else f"_q{quality}")
    return ImageConfig(
        name=name, resize=resize, quality=quality,
        description=f"shorter sides above {resize} px resized to {resize} px (bilinear, antialiased), JPEG quality "
        f"{quality}; keypoints, boxes and masks transformed with them",
    )  # fmt: skip


def _read_bytes(path: str, what: str = "image") -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise DatasetError(f"{path}: cannot read {what} ({e.strerror or e})") from None


def _shrink(config: ImageConfig, width: int, height: int) -> transforms.Plan | None:
    """The build-time resize of a ``width`` x ``height`` image, None to keep it as it is."""
    if config.resize is None or min(width, height) <= config.resize:
        return None
    return transforms.resize_plan(width, height, config.resize)


def _jpeg(pixels: np.ndarray, quality: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()


def _png(mask: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(mask, "L").save(buffer, "PNG")
    return buffer.getvalue()


def _ordered_map(fn: Callable, items: Iterable, threads: int) -> Iterator:
    """``map(fn, items)`` computed by ``threads`` threads (Pillow decodes and encodes without the GIL), in order."""
    if threads <= 1:
        yield from map(fn, items)
        return
    with ThreadPoolExecutor(threads) as pool:
        pending: collections.deque = collections.deque()
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) >= 2 * threads:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


_IMAGE_DOC = (
    "encoded image: the release's file (config original) or a JPEG resized to the config's shorter side; decode it "
    "with delib_jax.data.pipeline.decode_image_bytes (grey, 16-bit and transparent images are converted as the "
    "project converts them)"
)
_INDEX_DOC = "position of the example in the folder reader's dataset (delib_jax.data.load_cub / load_ade20k)"
_SIZE_DOC = "(width, height) of the release's image; pixel coordinates below are in the stored image"


class _ReleaseBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """What both builders share: configs, manual directory, threads, the release read once."""

    VERSION = tfds.core.Version(VERSION)
    BUILDER_CONFIGS = [image_config(None), image_config(DEFAULT_RESIZE)]
    DEFAULT_BUILDER_CONFIG_NAME = "original"

    def __init__(self, *, release=None, num_threads: int | None = None, progress: bool = False, **kwargs):
        """``release``: the dataset already read from the manual directory (else read when preparing);
        ``num_threads``: decoding / encoding threads (default: the CPU count); ``progress``: a bar per split."""
        self._release = release
        self._num_threads = num_threads or os.cpu_count() or 1
        self._progress = progress
        super().__init__(**kwargs)

    def _load(self, dl_manager):
        if self._release is None:
            self._release = self._read_release(dl_manager.manual_dir)
        return self._release

    def _generate_examples(
        self, convert: Callable[[int], dict], indices: np.ndarray, split: str = ""
    ) -> Iterator[tuple[int, dict]]:
        """``(key, record)`` of each dataset index, the key being the index (records are written in key order)."""
        examples = _ordered_map(convert, indices.tolist(), self._num_threads)
        bar = tqdm(total=len(indices), desc=f"{self.name}/{self.builder_config.name} {split}", unit="image",
                   disable=not self._progress)  # fmt: skip
        with bar:
            for i, example in zip(indices.tolist(), examples):
                yield i, example
                bar.update()


class DelibCub(_ReleaseBuilder):
    """CUB-200-2011 (Wah et al. 2011) with everything delib_jax uses: class, box, 15 part keypoints with visibility,
    312 image-level attributes with certainty, the official train/test split."""

    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Download CUB_200_2011.tgz (https://www.vision.caltech.edu/datasets/cub_200_2011/), extract it and give "
        "the CUB_200_2011 folder (or its parent, which holds attributes.txt) as the manual directory."
    )

    def _info(self) -> tfds.core.DatasetInfo:
        f = tfds.features
        return tfds.core.DatasetInfo(
            builder=self,
            description=self.__doc__,
            features=f.FeaturesDict(
                {
                    "image": f.Image(shape=(None, None, 3), encoding_format="jpeg", doc=_IMAGE_DOC),
                    "label": f.ClassLabel(doc="species (classes.txt order)"),
                    "index": f.Scalar(np.int64, doc=_INDEX_DOC),
                    "image_id": f.Scalar(np.int64, doc="the release's 1-based image id"),
                    "file_name": f.Text(doc="path under images/ (images.txt)"),
                    "original_size": f.Tensor(shape=(2,), dtype=np.int64, doc=_SIZE_DOC),
                    "bbox": f.Tensor(shape=(4,), dtype=np.float32, doc="(x, y, w, h) in pixels"),
                    "parts": f.Tensor(
                        shape=(None, 2),
                        dtype=np.float32,
                        doc="(P, 2) keypoints (x, y) in pixels, top-left corner (0, 0); (0, 0) if invisible",
                    ),
                    "part_visible": f.Tensor(shape=(None,), dtype=np.bool_, doc="(P,)"),
                    "attributes": f.Tensor(shape=(None,), dtype=np.bool_, doc="(A,) image-level is_present"),
                    "attribute_certainty": f.Tensor(shape=(None,), dtype=np.int64, doc="(A,) certainty id, 1-based"),
                }
            ),
            supervised_keys=("image", "label"),
            homepage="https://www.vision.caltech.edu/datasets/cub_200_2011/",
            metadata=tfds.core.MetadataDict(),
            disable_shuffling=True,
        )

    @staticmethod
    def _read_release(path) -> CubDataset:
        return load_cub(Path(path))

    def _split_generators(self, dl_manager):
        ds = self._load(dl_manager)
        self.info.features["label"].names = list(ds.class_names)
        self.info.metadata.update({
            "part_names": list(ds.part_names),
            "attribute_names": list(ds.attribute_names),
            "certainty_names": list(ds.certainty_names),
            "class_attributes": ds.class_attributes.tolist(),
            "release": str(ds.root),
            "resize": self.builder_config.resize,
            "quality": self.builder_config.quality,
        })  # fmt: skip
        convert = lambda i: cub_example(ds, i, self.builder_config)
        splits = {"train": np.flatnonzero(ds.is_train), "test": np.flatnonzero(~ds.is_train)}
        return {name: self._generate_examples(convert, ix, name) for name, ix in splits.items() if len(ix)}


class DelibAde20k(_ReleaseBuilder):
    """ADE20K SceneParsing (ADEChallengeData2016) for scene classification: image, scene label (the scenes of the
    training split; validation images of other scenes are dropped, as delib_jax does), 150-object mask, split."""

    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Download ADEChallengeData2016.zip (http://sceneparsing.csail.mit.edu/) and sceneCategories.txt, extract them "
        "and give the ADEChallengeData2016 folder (or its parent) as the manual directory."
    )

    def _info(self) -> tfds.core.DatasetInfo:
        f = tfds.features
        return tfds.core.DatasetInfo(
            builder=self,
            description=self.__doc__,
            features=f.FeaturesDict(
                {
                    "image": f.Image(shape=(None, None, 3), encoding_format="jpeg", doc=_IMAGE_DOC),
                    "mask": f.Image(
                        shape=(None, None, 1),
                        encoding_format="png",
                        doc="one-channel PNG, 0 = other, k = object k of objectInfo150 (1-based); the "
                        "release's file (original) or resized by nearest neighbour",
                    ),
                    "label": f.ClassLabel(doc="scene (sorted scene names of the training split)"),
                    "index": f.Scalar(np.int64, doc=_INDEX_DOC),
                    "file_name": f.Text(doc="file stem, e.g. ADE_train_00000001"),
                    "original_size": f.Tensor(shape=(2,), dtype=np.int64, doc=_SIZE_DOC),
                }
            ),
            supervised_keys=("image", "label"),
            homepage="http://sceneparsing.csail.mit.edu/",
            metadata=tfds.core.MetadataDict(),
            disable_shuffling=True,
        )

    @staticmethod
    def _read_release(path) -> Ade20kDataset:
        return load_ade20k(Path(path))

    def _split_generators(self, dl_manager):
        ds = self._load(dl_manager)
        self.info.features["label"].names = list(ds.scene_names)
        objects = ds.objects
        self.info.metadata.update({
            "object_names": list(objects.names),
            "object_ratio": objects.ratio.tolist(),
            "object_train_count": objects.train_count.tolist(),
            "object_val_count": objects.val_count.tolist(),
            "dropped_val_stems": list(ds.dropped_val_stems),
            "release": str(ds.root),
            "resize": self.builder_config.resize,
            "quality": self.builder_config.quality,
        })  # fmt: skip
        convert = lambda i: ade20k_example(ds, i, self.builder_config)
        splits = {"train": np.flatnonzero(ds.is_train), "validation": np.flatnonzero(~ds.is_train)}
        return {name: self._generate_examples(convert, ix, name) for name, ix in splits.items() if len(ix)}


def cub_example(ds: CubDataset, i: int, config: ImageConfig) -> dict:
    """The record of CUB example ``i``: the image decoded once (a corrupt file is a `DatasetError` now, not in
    training), resized by the config with its box and keypoints."""
    path = ds.image_paths[i]
    data = _read_bytes(path)
    image = decode_image_bytes(data, path)
    w, h = image.size
    box, parts, visible = ds.boxes[i], ds.parts[i], ds.part_visible[i]
    plan = _shrink(config, w, h)
    if plan is not None:
        data = _jpeg(transforms.apply_to_image(plan, image), config.quality)
        parts, visible = transforms.apply_to_points(plan, parts, visible)
        box = transforms.apply_to_box(plan, box)
    return {
        "image": data, "label": int(ds.labels[i]), "index": i, "image_id": int(ds.image_ids[i]),
        "file_name": Path(path).relative_to(Path(ds.root) / "images").as_posix(), "original_size": np.asarray([w, h]),
        "bbox": np.asarray(box, np.float32), "parts": np.asarray(parts, np.float32).reshape(-1, 2),
        "part_visible": np.asarray(visible, bool), "attributes": ds.attributes[i],
        "attribute_certainty": ds.attribute_certainty[i],
    }  # fmt: skip


def ade20k_example(ds: Ade20kDataset, i: int, config: ImageConfig) -> dict:
    """The record of ADE20K example ``i``: image and mask checked as the pipeline checks them (one channel, the size
    of the image), resized by the config (the mask by nearest neighbour)."""
    path, mask_path = ds.image_paths[i], ds.mask_paths[i]
    data, mask_data = _read_bytes(path), _read_bytes(mask_path, "mask")
    image = decode_image_bytes(data, path)
    mask = decode_mask(mask_data, image.size, name=mask_path)
    w, h = image.size
    plan = _shrink(config, w, h)
    if plan is not None:
        data = _jpeg(transforms.apply_to_image(plan, image), config.quality)
        mask_data = _png(transforms.apply_to_mask(plan, mask))
    return {
        "image": data, "mask": mask_data, "label": int(ds.labels[i]), "index": i, "file_name": ds.stems[i],
        "original_size": np.asarray([w, h]),
    }  # fmt: skip


BUILDERS: dict[str, type[_ReleaseBuilder]] = {"cub": DelibCub, "ade20k": DelibAde20k}
