"""One loader for every dataset kind, chosen by name: CUB-200-2011 and ADE20K (the release folder or a TFDS build of
it, `delib_jax.data.tfds`), class folders (`delib_jax.data.folders`) and TFDS catalog datasets
(`delib_jax.data.catalog`).

    ds = load_dataset("cub", "/data/CUB_200_2011")          # the release (or its parent)
    ds = load_dataset("cub", "/data/tfds")                   # python -m delib_jax.data.tfds build cub ... --data-dir
    ds = load_dataset("folder", "/data/pets", options={"test_fraction": 0.2})        # DIR/CLASS/*.jpg
    ds = load_dataset("tfds", "~/tensorflow_datasets", options={"name": "beans"})    # a prepared catalog dataset
    train = dataset_source("cub", ds, "train")               # the same pipelines read every kind

``options`` are how a kind reads its data (the carved splits' fractions and seed, a catalog dataset's name and
features); `ImageDataset.options` gives them back resolved, which a run records to read the same data again.
`delib_jax.data.sources` says which form a CUB / ADE20K folder holds (from its files alone); TFDS is imported only to
read a build or a catalog dataset.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from delib_jax.data.ade20k import Ade20kDataset, load_ade20k
from delib_jax.data.cub import CubDataset, load_cub
from delib_jax.data.images import SPLITS, ImageDataset
from delib_jax.data.sources import find_source

Report = Callable[[str], None] | None


def _release(dataset: str, reader: Callable) -> Callable:
    def read(path: str | Path, options: Mapping[str, Any] | None, report: Report):
        if options:
            raise ValueError(f"{dataset} takes no dataset options, got {', '.join(sorted(options))}")
        source = find_source(dataset, path)
        if report is not None:
            report(source.describe())
        if source.kind == "tfds":
            from delib_jax.data import tfds

            return tfds.load(source.build.path)
        return reader(path)

    return read


def _images(module: str) -> Callable:
    def read(path: str | Path, options: Mapping[str, Any] | None, report: Report) -> ImageDataset:
        import importlib

        ds = importlib.import_module(f"delib_jax.data.{module}").load(path, options)
        if report is not None:
            report(ds.describe())
            for line in ds.notes:
                report(line)
        return ds

    return read


@dataclasses.dataclass(frozen=True)
class DatasetKind:
    """One kind of dataset `load_dataset` reads.

    Attributes:
      name: its name ('cub', 'ade20k', 'folder', 'tfds'): `load_dataset`'s ``dataset``, a run's ``dataset``.
      title: what it is, for messages.
      read: ``read(path, options, report)`` -> the dataset.
      splits: the splits it has for explaining (``delib explain --split``), the held-out one first.
      parts: whether it has the part / object ground truth of the paper's protocols (``eval.cub`` / ``eval.ade20k``).
      needs: what ``path`` is, for messages.
    """

    name: str
    title: str
    read: Callable[[str | Path, Mapping[str, Any] | None, Report], Any]
    splits: tuple[str, ...]
    parts: bool
    needs: str

    def source(self, ds, split: str = "train", *, indices=None):
        """The pipeline `Source` of ``split`` of ``ds`` (or of its examples ``indices``)."""
        from delib_jax.data import pipeline
        from delib_jax.data.images import image_source

        make = {"cub": pipeline.cub_source, "ade20k": pipeline.ade20k_source}.get(self.name, image_source)
        return make(ds, split, indices=indices)


KINDS: dict[str, DatasetKind] = {
    k.name: k
    for k in (
        DatasetKind("cub", "CUB-200-2011", _release("cub", load_cub), ("test", "train"), True,
                    "the CUB_200_2011 folder (or its parent), or a TFDS build of it"),
        DatasetKind("ade20k", "ADE20K", _release("ade20k", load_ade20k), ("test", "train"), True,
                    "the ADEChallengeData2016 folder (or its parent), or a TFDS build of it"),
        DatasetKind("folder", "class folders", _images("folders"), ("test", "val", "train"), False,
                    "a folder of class folders (DIR/CLASS/*.jpg, or DIR/{train,val,test}/CLASS/*.jpg)"),
        DatasetKind("tfds", "a TFDS catalog dataset", _images("catalog"), ("test", "val", "train"), False,
                    "the TFDS data folder the dataset was prepared into (tfds build --data_dir)"),
    )
}  # fmt: skip


def dataset_kind(dataset: str) -> DatasetKind:
    """The `DatasetKind` named ``dataset``; ValueError naming the kinds otherwise."""
    try:
        return KINDS[dataset]
    except (KeyError, TypeError):
        raise ValueError(f"dataset must be one of {', '.join(KINDS)}, got {dataset!r}") from None


def load_dataset(
    dataset: str,
    path: str | Path,
    *,
    options: Mapping[str, Any] | None = None,
    report: Callable[[str], None] | None = None,
) -> CubDataset | Ade20kDataset | ImageDataset:
    """Read ``dataset`` (a name of `KINDS`) from ``path`` with its ``options``.

    'cub' and 'ade20k' read a release folder or a TFDS build, whichever ``path`` holds, as the same `CubDataset` /
    `Ade20kDataset` (same examples, order and indices; a build's images are read from its records). 'folder' reads
    class folders, 'tfds' the prepared catalog dataset ``options['name']`` in the TFDS data folder ``path``: both
    as an `ImageDataset`. ``report`` receives one line saying what was found (and one per note, such as the files
    left out).

    Raises:
      DatasetError: one line naming the folder or file at fault.
      ValueError: an unknown dataset kind or option.
    """
    return dataset_kind(dataset).read(path, options, report)


def dataset_source(dataset: str, ds, split: str = "train", *, indices=None):
    """The pipeline `Source` of ``split`` of ``ds``, a dataset of kind ``dataset`` (or of its examples
    ``indices``)."""
    return dataset_kind(dataset).source(ds, split, indices=indices)


def class_names(ds) -> tuple[str, ...]:
    """The class names of a loaded dataset of any kind (ADE20K's are its scenes)."""
    names = getattr(ds, "class_names", None)
    return tuple(names if names is not None else ds.scene_names)


__all__ = ["KINDS", "SPLITS", "DatasetKind", "class_names", "dataset_kind", "dataset_source", "load_dataset"]
