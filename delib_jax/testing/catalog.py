"""Small TFDS catalog datasets prepared into a local TFDS data folder, as ``tfds build NAME --file_format
array_record`` prepares a catalog dataset (ArrayRecord files, dataset_info.json, features.json), written by a builder
defined here: no download, no TensorFlow. The tests and ``benchmarks.images`` read them back by name, as a user's
prepared dataset is read (`delib_jax.data.catalog`).

    prepare("tiny_pets", data_dir, {"train": [(jpeg_bytes, 0), ...], "test": [...]}, ["cat", "dog"])
"""

from __future__ import annotations

import io
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from delib_jax.data.tfds import _quiet_tfds


def prepare(
    name: str,
    data_dir: str | Path,
    splits: dict[str, Sequence[tuple[bytes, int]]],
    class_names: Sequence[str],
    *,
    version: str = "1.0.0",
    config: str | None = None,
    label: str = "label",
    image: str = "image",
    extra_label: str | None = None,
    supervised: bool = True,
) -> Path:
    """Prepare the dataset ``name`` (``splits``: split name -> (encoded image, label) pairs) into the TFDS
    ``data_dir`` in ArrayRecord format; returns its version folder.

    Features: ``image`` (an Image), ``label`` (a ClassLabel of ``class_names``), ``id`` (a Scalar: the example's
    position), and with ``extra_label`` a second ClassLabel of the same values; ``supervised`` declares
    ``supervised_keys`` (image, label). ``config``: prepare it under that builder config."""
    import tensorflow_datasets as tfds

    features = {
        image: tfds.features.Image(shape=(None, None, 3), encoding_format="jpeg"),
        label: tfds.features.ClassLabel(names=list(class_names)),
        "id": tfds.features.Scalar(np.int64),
    }
    if extra_label:
        features[extra_label] = tfds.features.ClassLabel(names=list(class_names))

    class Builder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        VERSION = tfds.core.Version(version)
        BUILDER_CONFIGS = [tfds.core.BuilderConfig(name=config)] if config else []

        def _info(self):
            return tfds.core.DatasetInfo(
                builder=self, features=tfds.features.FeaturesDict(features),
                supervised_keys=(image, label) if supervised else None,
            )  # fmt: skip

        def _split_generators(self, dl_manager):
            return {s: self._generate_examples(examples) for s, examples in splits.items()}

        def _generate_examples(self, examples):
            for k, (data, y) in enumerate(examples):
                record = {image: data, label: int(y), "id": k}
                if extra_label:
                    record[extra_label] = int(y)
                yield k, record

    Builder.name = name
    kwargs = {"config": config} if config else {}
    with tempfile.TemporaryDirectory() as downloads, _quiet_tfds():
        builder = Builder(data_dir=str(data_dir), file_format="array_record", **kwargs)
        builder.download_and_prepare(download_dir=downloads)
    return Path(builder.data_dir)


def jpeg(pixels: np.ndarray, quality: int = 90) -> bytes:
    """``pixels`` (H, W, 3) uint8 as JPEG bytes."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()


__all__ = ["jpeg", "prepare"]
