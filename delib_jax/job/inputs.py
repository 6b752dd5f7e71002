"""What the job explains: files, or the examples of one split of a dataset (a release folder or a TFDS build of CUB /
ADE20K, class folders, a TFDS catalog dataset).

Both (`delib_jax.job.folder.PathList` for files, `DatasetInputs`) are sequences of source names (what the records
call ``source``) with three methods the stages use: ``fingerprint(i)`` (what resume compares, None: unreadable),
``payload(i)`` (what a reader decodes: a path, or a `StoredImage`) and ``describe(i)`` (fields added to the record:
for a dataset its name, split and example index).
"""

from __future__ import annotations

import copy
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from delib_jax._reader import StoredImage
from delib_jax.job.folder import PathList, fingerprint

# The splits any dataset kind has (`delib_jax.data.DatasetKind.splits`): "test" is CUB's test split, ADE20K's
# validation split (the held-out images); class folders and TFDS catalog datasets also have "val".
SPLITS = ("test", "val", "train")


Payload = str | StoredImage


def file_inputs(files: Iterable[str | os.PathLike]) -> PathList:
    """``files`` as a `PathList` (the job's inputs for files; kept as they are when they already are one)."""
    return files if isinstance(files, PathList) else PathList(files)


class DatasetInputs(Sequence):
    """The examples of ``split`` of a loaded dataset (`delib_jax.data.load_dataset`), in dataset order.

    Item k is the source name of the k-th example: its file for a release folder or class folders,
    ``BUILD::images/NAME`` (CUB) or ``BUILD::STEM.jpg`` (ADE20K) for a TFDS build, ``VERSION_DIR::SPLIT/KEY`` for a
    TFDS catalog dataset, whose images are read from the records by random access. Records name the dataset, the
    split and the example's index (`describe`). ``options``: the dataset's `load_dataset` options (class folders,
    TFDS catalog datasets), recorded in the manifest so that a resume reads the same split.
    """

    def __init__(self, ds, dataset: str, split: str, path: str | Path, options: dict | None = None):
        from delib_jax.data import dataset_kind, split_name

        kind = dataset_kind(dataset)
        ours = split_name(split) if kind.name in ("folder", "tfds") else split
        if ours not in kind.splits:
            raise ValueError(f"{kind.title} has no split {split!r}: split must be one of {', '.join(kind.splits)}")
        self.ds, self.dataset, self.split, self.path, self.options = ds, dataset, ours, Path(path), options
        self.records = getattr(ds, "records", None)
        if hasattr(ds, "indices"):  # an ImageDataset: its own splits
            self.indices = ds.indices(ours)
        else:
            self.indices = np.flatnonzero(np.asarray(ds.is_train, bool) == (ours == "train")).astype(np.int64)
        # a TFDS build is never rewritten in place: a rebuild writes a new dataset_info.json
        self._build_stat = fingerprint(Path(ds.root) / "dataset_info.json") if self.records is not None else None

    @property
    def form(self) -> str:
        """How the images are stored: 'release' (a release folder's files), 'files' (class folders) or 'tfds' (the
        records of a TFDS build or catalog dataset)."""
        if self.records is not None:
            return "tfds"
        return "files" if self.dataset == "folder" else "release"

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, k):
        if isinstance(k, slice):  # a view of those examples (the same dataset, split and fingerprints)
            view = copy.copy(self)
            view.indices = self.indices[k]
            return view
        return self.source(k)

    def source(self, k: int) -> str:
        """Example ``k``'s source name (what its record names it by)."""
        return str(self.ds.image_paths[int(self.indices[k])])

    def fingerprint(self, k: int) -> list[int] | None:
        if self.records is not None:
            return self._build_stat
        try:
            return fingerprint(self.source(k))
        except OSError:
            return None

    def payload(self, k: int) -> Payload:
        name = self[k]
        if self.records is None:
            return StoredImage(name)
        try:
            return StoredImage(name, self.records.encoded(int(self.indices[k]))[0])
        except Exception as e:  # noqa: BLE001 -- a damaged record: the reader reports it and skips the example
            return StoredImage(f"{name} (unreadable record: {type(e).__name__}: {e})", b"")

    def describe(self, k: int) -> dict[str, Any]:
        return {"dataset": self.dataset, "split": self.split, "index": int(self.indices[k])}

    def manifest(self) -> dict[str, Any]:
        """What the manifest records of the input: a resumed run must read the same split of the same data."""
        data = {"dataset": self.dataset, "split": self.split, "form": self.form, "path": str(self.path.resolve())}
        return data if self.options is None else {**data, "options": self.options}


def dataset_inputs(
    dataset: str, path: str | Path, split: str = "test", *, options: dict | None = None, report=None
) -> DatasetInputs:
    """The examples of ``split`` of ``dataset`` (a kind of `delib_jax.data.KINDS`: 'cub', 'ade20k', 'folder', 'tfds')
    in ``path``, read with its ``options`` as training reads it (`delib_jax.data.load_dataset`); `DatasetError` (one
    line) otherwise, ValueError for a split it does not have."""
    from delib_jax.data import load_dataset

    ds = load_dataset(dataset, path, options=options, report=report)
    return DatasetInputs(ds, dataset, split, path, getattr(ds, "options", None))


class RecordPayloads:
    """index record -> what to decode for it (its figure, its thumbnail), for a finished run described by its
    ``manifest``: a file run's source file; a dataset run's example, read from ``inputs`` (a `DatasetInputs` of the
    run's data, opened from the manifest on first need for a TFDS build)."""

    def __init__(self, manifest: dict[str, Any], inputs: DatasetInputs | None = None, report=None):
        data = manifest.get("data")
        self.data = data if isinstance(data, dict) else None
        self._inputs, self._opened, self._report = inputs, inputs is not None, report

    def __call__(self, record: dict[str, Any]) -> Payload:
        index = record.get("index")
        if self.data is None or not isinstance(index, int) or isinstance(index, bool):
            return record["source"]
        if self.data.get("form") != "tfds":
            return StoredImage(record["source"])
        if not self._opened:
            self._inputs, self._opened = manifest_inputs({"data": self.data}, report=self._report), True
        inputs = self._inputs
        if inputs is not None and inputs.records is not None:
            k = int(np.searchsorted(inputs.indices, index))
            if k < len(inputs) and int(inputs.indices[k]) == index and inputs[k] == record["source"]:
                return inputs.payload(k)
        return StoredImage(record["source"], b"")  # the build is gone or changed: unreadable, said by the reader


def check_classes(inputs: DatasetInputs, class_names: Sequence[str], model: str = "the model", *,
                  by_index: bool = False) -> str:  # fmt: skip
    """ "" when the dataset's classes are the model's (the same names in the same order); a line saying how they
    correspond when each is one of the model's by name (a subset, another order), or with ``by_index`` (a model
    imported from weights) when there are as many; else ValueError (one line):
    `delib_jax.data.class_correspondence`."""
    from delib_jax.data import class_correspondence
    from delib_jax.data import class_names as names_of

    title = getattr(inputs.ds, "title", None) or f"the {inputs.dataset} data in {inputs.path}"
    return class_correspondence(list(names_of(inputs.ds)), list(class_names), title, model, by_index=by_index)[1]


def manifest_inputs(manifest: dict[str, Any], *, report=None) -> DatasetInputs | None:
    """The `DatasetInputs` a run's manifest names (None for a run over files, or when the data is gone: said in
    one line through ``report``)."""
    data = manifest.get("data")
    if not isinstance(data, dict):
        return None
    from delib_jax.data import DatasetError

    try:
        options = data.get("options")
        return dataset_inputs(str(data["dataset"]), str(data["path"]), str(data["split"]),
                              options=options if isinstance(options, dict) else None)  # fmt: skip
    except (KeyError, OSError, ValueError, DatasetError) as e:
        if report is not None:
            report(f"the run's data ({data.get('path')}) cannot be read: {e}")
        return None


__all__ = [
    "SPLITS", "DatasetInputs", "Payload", "StoredImage", "dataset_inputs", "file_inputs",
    "RecordPayloads", "check_classes", "manifest_inputs",
]  # fmt: skip
