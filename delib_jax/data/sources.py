"""Which form of a dataset a folder holds: the official release folder, or a TFDS build of it (`delib_jax.data.tfds`).

Detection only looks at files (``images.txt`` / ``sceneCategories.txt`` of a release, ``dataset_info.json`` of a
build) and imports no TFDS; `delib_jax.data.loading.load_dataset` reads what was found. The TFDS package imports this
module (the build names and `TfdsBuild`), never the reverse.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Literal

from delib_jax.data._text import DatasetError, fail
from delib_jax.data.ade20k import find_ade20k_root
from delib_jax.data.cub import find_cub_root

BUILDER_NAMES: dict[str, str] = {"cub": "delib_cub", "ade20k": "delib_ade20k"}
TITLES: dict[str, str] = {"cub": "CUB-200-2011", "ade20k": "ADE20K (ADEChallengeData2016)"}


@dataclasses.dataclass(frozen=True)
class TfdsBuild:
    """One prepared TFDS dataset: ``path`` is its version folder (``DATA_DIR/delib_cub/resize256/1.0.0``)."""

    path: Path
    name: str
    config: str
    version: str

    @property
    def dataset(self) -> str | None:
        """'cub' or 'ade20k' for delib_jax's builders, else None."""
        return next((d for d, n in BUILDER_NAMES.items() if n == self.name), None)

    def __str__(self) -> str:
        return f"{self.name}/{self.config} {self.version}"


@dataclasses.dataclass(frozen=True)
class DataSource:
    """What a data folder holds: a ``release`` (``path`` its root) or a ``tfds`` build (``build``)."""

    dataset: str
    kind: Literal["release", "tfds"]
    path: Path
    build: TfdsBuild | None = None

    def describe(self) -> str:
        """One line saying which form was found, for the command lines to print."""
        if self.kind == "tfds":
            return f"data: TFDS build {self.build} (ArrayRecord) of {TITLES[self.dataset]} at {self.path}"
        return f"data: {TITLES[self.dataset]} release folder {self.path}"


def _build_at(info: Path) -> TfdsBuild | None:
    try:
        meta = json.loads(info.read_text(encoding="utf-8"))
        return TfdsBuild(info.parent, str(meta["name"]), str(meta.get("configName", "")), str(meta["version"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def find_tfds_builds(path: str | Path) -> list[TfdsBuild]:
    """The TFDS builds of delib_jax's builders at ``path``: a version folder, a config folder, a builder folder or the
    TFDS data directory holding them (the ``--data-dir`` given to the build)."""
    path = Path(path)
    patterns = ("dataset_info.json", "*/dataset_info.json", "*/*/dataset_info.json", "delib_*/*/*/dataset_info.json")
    for pattern in patterns:
        builds = [b for info in sorted(path.glob(pattern)) if (b := _build_at(info)) and b.dataset]
        if builds:
            return builds
    return []


def find_source(dataset: str, path: str | Path) -> DataSource:
    """Which form of ``dataset`` ('cub' or 'ade20k') ``path`` holds.

    Raises:
      DatasetError: ``path`` is neither form, holds TFDS builds of the other dataset, or several builds of this one
        (which to read is then the caller's choice).
    """
    if dataset not in BUILDER_NAMES:
        raise ValueError(f"dataset must be 'cub' or 'ade20k', got {dataset!r}")
    path = Path(path)
    try:
        return DataSource(dataset, "release", find_cub_root(path) if dataset == "cub" else find_ade20k_root(path))
    except DatasetError as e:
        not_release = e
    builds = find_tfds_builds(path) if path.is_dir() else []
    mine = [b for b in builds if b.dataset == dataset]
    if len(mine) == 1:
        return DataSource(dataset, "tfds", mine[0].path, mine[0])
    if len(mine) > 1:
        listed = ", ".join(str(b.path) for b in mine)
        raise fail(path, f"holds {len(mine)} TFDS builds of {TITLES[dataset]} ({listed}): give the folder of one")
    if builds:
        other = TITLES[builds[0].dataset]
        raise fail(path, f"holds a TFDS build of {other} ({builds[0]}), not of {TITLES[dataset]}")
    raise DatasetError(
        f"{not_release}, nor a TFDS build of it (no dataset_info.json of {BUILDER_NAMES[dataset]} here or below)"
    )


__all__ = ["BUILDER_NAMES", "DataSource", "TfdsBuild", "find_source", "find_tfds_builds"]
