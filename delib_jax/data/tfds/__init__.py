"""CUB-200-2011 and ADE20K as TensorFlow Datasets builds (ArrayRecord, TensorFlow never imported).

Build once from the official release, then give the build's folder wherever a release folder is accepted::

    python -m delib_jax.data.tfds build cub --manual-dir /data/CUB_200_2011 --data-dir /data/tfds --resize
    python -m train.cub --data-dir /data/tfds --arch resnet50 --out runs/cub

In Python: ``build("cub", release, out, resize=256)``, then ``delib_jax.data.load_dataset("cub", out)`` (or `load`)
gives the folder reader's `CubDataset`, whose images the pipelines read from the build's records by random access;
``tfds.data_source("delib_cub/resize256:1.0.0", data_dir=out, split="train")`` reads the records directly.
"""

from __future__ import annotations

import contextlib
import io
import tempfile
from pathlib import Path

import tensorflow_datasets as tfds
from absl import logging

from delib_jax.data.ade20k import load_ade20k
from delib_jax.data.cub import load_cub
from delib_jax.data.sources import BUILDER_NAMES, TfdsBuild
from delib_jax.data.tfds._builders import (
    BUILDERS,
    DEFAULT_QUALITY,
    DEFAULT_RESIZE,
    VERSION,
    DelibAde20k,
    DelibCub,
    ImageConfig,
    ade20k_example,
    cub_example,
    image_config,
)
from delib_jax.data.tfds._read import TfdsRecords, load, load_ade20k_build, load_cub_build


def build_path(
    dataset: str, data_dir: str | Path, *, resize: int | None = None, quality: int = DEFAULT_QUALITY
) -> Path:
    """The version folder a build of these options goes to: ``DATA_DIR/delib_cub/resize256/1.0.0``."""
    return Path(data_dir) / BUILDER_NAMES[dataset] / image_config(resize, quality).name / VERSION


def build(
    dataset: str,
    manual_dir: str | Path,
    data_dir: str | Path,
    *,
    resize: int | None = None,
    quality: int = DEFAULT_QUALITY,
    num_threads: int | None = None,
    progress: bool = False,
) -> tuple[TfdsBuild, bool]:
    """Build ``dataset`` ('cub' or 'ade20k') from its release in ``manual_dir`` into the TFDS ``data_dir``.

    Args:
      resize: None to store the release's files as they are; N to store images whose shorter side exceeds N
        resized to N as JPEG of ``quality`` (keypoints, boxes and masks transformed with them).
      num_threads: decoding / encoding threads (default: the CPU count).
      progress: show a progress bar per split (TFDS's own bars and messages are silenced while building).

    Returns:
      ``(build, built)``: the build, and False when it was there already (then nothing is read or written).

    Raises:
      DatasetError: the release is incomplete or malformed (the message names the file and line), or an image or
        mask cannot be decoded.
    """
    config = image_config(resize, quality)
    target = build_path(dataset, data_dir, resize=resize, quality=quality)
    found = TfdsBuild(target, BUILDER_NAMES[dataset], config.name, VERSION)
    if (target / "dataset_info.json").is_file():
        return found, False
    release = load_cub(manual_dir) if dataset == "cub" else load_ade20k(manual_dir)
    cls = BUILDERS[dataset]
    known = config.name in {c.name for c in cls.BUILDER_CONFIGS}  # TFDS takes those by name only
    with tempfile.TemporaryDirectory() as downloads, _quiet_tfds():  # TFDS wants a download folder; nothing comes
        builder = cls(
            data_dir=str(data_dir), config=config.name if known else config, file_format="array_record",
            release=release, num_threads=num_threads, progress=progress,
        )  # fmt: skip
        builder.download_and_prepare(
            download_dir=downloads, download_config=tfds.download.DownloadConfig(manual_dir=str(manual_dir))
        )
    return found, True


@contextlib.contextmanager
def _quiet_tfds():
    """Without TFDS's progress bars (ours count images), its "Downloading and preparing" lines on stdout and its
    "Using custom data configuration" warning."""
    bars = getattr(tfds.core.utils.tqdm_utils, "_active", True)
    verbosity = logging.get_verbosity()
    tfds.display_progress_bar(False)
    logging.set_verbosity(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        logging.set_verbosity(verbosity)
        tfds.display_progress_bar(bars)


__all__ = [
    "BUILDERS", "DEFAULT_QUALITY", "DEFAULT_RESIZE", "VERSION", "DelibAde20k", "DelibCub", "ImageConfig",
    "TfdsRecords", "ade20k_example", "build", "build_path", "cub_example", "image_config", "load",
    "load_ade20k_build", "load_cub_build",
]  # fmt: skip
