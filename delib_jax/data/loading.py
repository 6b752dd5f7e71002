"""One loader for both forms of a dataset: the official release folder, or a TFDS build of it (`delib_jax.data.tfds`).

    ds = load_dataset("cub", "/data/CUB_200_2011")          # the release (or its parent)
    ds = load_dataset("cub", "/data/tfds")                   # python -m delib_jax.data.tfds build cub ... --data-dir
    train = cub_source(ds, "train")                          # the same pipelines read either

`delib_jax.data.sources` says which form a folder holds (from its files alone); TFDS is imported only to read a build.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from delib_jax.data.ade20k import Ade20kDataset, load_ade20k
from delib_jax.data.cub import CubDataset, load_cub
from delib_jax.data.sources import find_source


def load_dataset(
    dataset: str, path: str | Path, *, report: Callable[[str], None] | None = None
) -> CubDataset | Ade20kDataset:
    """Read ``dataset`` ('cub' or 'ade20k') from a release folder or a TFDS build, whichever ``path`` holds.

    Both give the same `CubDataset` / `Ade20kDataset` (same examples, order and indices; a TFDS build's images are
    read from its records). ``report`` receives one line saying which form was found.

    Raises:
      DatasetError: as `find_source`, or the reader's error for a missing or malformed file.
    """
    source = find_source(dataset, path)
    if report is not None:
        report(source.describe())
    if source.kind == "tfds":
        from delib_jax.data import tfds

        return tfds.load(source.build.path)
    return load_cub(path) if dataset == "cub" else load_ade20k(path)


__all__ = ["load_dataset"]
