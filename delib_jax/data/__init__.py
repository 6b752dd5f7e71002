"""Datasets: CUB-200-2011 and ADE20K readers, annotation-exact transforms, input pipelines, synthetic datasets.

``delib_jax.data.pipeline`` (grain) and ``delib_jax.data.synthetic`` are imported on demand, not from here.
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
    "DatasetError",
    "Normalization",
    "ObjectInfo",
    "Plan",
    "attribute_groups",
    "load_ade20k",
    "load_cub",
    "read_object_info",
]  # fmt: skip
