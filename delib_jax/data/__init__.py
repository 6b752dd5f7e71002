"""Datasets: CUB-200-2011 and ADE20K readers, class folders and TFDS catalog datasets of your own,
annotation-exact transforms, input pipelines, synthetic datasets.

`load_dataset` reads every kind by name (`KINDS`): CUB / ADE20K from the release folder or a TensorFlow Datasets build
of it (``delib_jax.data.tfds``, ArrayRecord, no TensorFlow), class folders (``delib_jax.data.folders``) and prepared
TFDS catalog datasets (``delib_jax.data.catalog``) as an `ImageDataset`. ``delib_jax.data.pipeline`` (grain),
``delib_jax.data.tfds``, ``delib_jax.data.catalog`` and ``delib_jax.data.synthetic`` are imported on demand, not
from here.
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
from delib_jax.data.folders import load_folders
from delib_jax.data.images import SPLITS, ImageDataset, class_correspondence, match_classes, split_name
from delib_jax.data.loading import KINDS, DatasetKind, class_names, dataset_kind, dataset_source, load_dataset
from delib_jax.data.sources import DataSource, TfdsBuild, find_source, find_tfds_builds
from delib_jax.data.transforms import CUB_STATS, IMAGENET_STATS, Normalization, Plan

__all__ = [
    "ATTRIBUTE_GROUPS",
    "ATTRIBUTE_NAMES",
    "CUB_STATS",
    "IMAGENET_STATS",
    "KINDS",
    "PART_ATTRIBUTE_GROUPS",
    "PART_NAMES",
    "SPLITS",
    "Ade20kDataset",
    "CubDataset",
    "DataSource",
    "DatasetError",
    "DatasetKind",
    "ImageDataset",
    "Normalization",
    "ObjectInfo",
    "Plan",
    "TfdsBuild",
    "attribute_groups",
    "class_correspondence",
    "class_names",
    "dataset_kind",
    "dataset_source",
    "find_source",
    "find_tfds_builds",
    "load_ade20k",
    "load_cub",
    "load_dataset",
    "match_classes",
    "load_folders",
    "split_name",
    "read_object_info",
]  # fmt: skip
