"""Datasets: CUB-200-2011 and ADE20K readers, annotation-exact transforms, input pipelines, synthetic datasets.

`load_dataset` reads either form of a dataset: the release folder, or a TensorFlow Datasets build of it
(``delib_jax.data.tfds``, ArrayRecord, no TensorFlow). ``delib_jax.data.pipeline`` (grain), ``delib_jax.data.tfds``
and ``delib_jax.data.synthetic`` are imported on demand, not from here.
"""

from delib_jax.data._text import DatasetError
from delib_jax.data.ade20k import Ade20kDataset, ObjectInfo, load_ade20k, read_object_info
from delib_jax.data.cub import (
    ATTRIBUTE_GROUPS,
    ATTRIBUTE_NAMES,
    PART_ATTRIBUTE_GROUPS,
    PART_NAMES,
    CubDataset,
    attribute_groups,
    load_cub,
)
from delib_jax.data.loading import load_dataset
from delib_jax.data.sources import DataSource, TfdsBuild, find_source, find_tfds_builds
from delib_jax.data.transforms import CUB_STATS, IMAGENET_STATS, Normalization, Plan

__all__ = [
    "ATTRIBUTE_GROUPS",
    "ATTRIBUTE_NAMES",
    "CUB_STATS",
    "IMAGENET_STATS",
    "PART_ATTRIBUTE_GROUPS",
    "PART_NAMES",
    "Ade20kDataset",
    "CubDataset",
    "DataSource",
    "DatasetError",
    "Normalization",
    "ObjectInfo",
    "Plan",
    "TfdsBuild",
    "attribute_groups",
    "find_source",
    "find_tfds_builds",
    "load_ade20k",
    "load_cub",
    "load_dataset",
    "read_object_info",
]  # fmt: skip
