"""Class folders, the layout of torchvision's ``ImageFolder`` and Keras' ``image_dataset_from_directory``.

    DIR/CLASS/*.jpg                        splits carved: val and test from each class, seeded and stratified
    DIR/{train,val,test}/CLASS/*.jpg       the splits given (train required; a missing val or test is carved)

    ds = load_folders("/data/pets")                         # an ImageDataset (delib_jax.data.images)
    ds = load_dataset("folder", "/data/pets", options={"test_fraction": 0.2})

Classes are the class folders' names in sorted order (their union over the given splits); a class folder's images
may lie in subfolders of it. Images are the files whose extension Pillow opens (``.jpg``, ``.png``, ``.webp``,
``.tif``, ...); other files, and files outside the class folders, are left out and listed once; hidden files and
folders (a leading dot) are skipped silently. Only names are read: no image is opened to list or split a dataset, and
a folder of 100,000 files takes about a second (benchmarks/RESULTS.md). Split folders are recognised by name (train
/ training, val / valid / validation / dev, test / testing, any case) when every folder in DIR is one.

Bad input raises `DatasetError` with one line: no images, one class only, two classes whose names differ only in
case, a class without training images, a split folder beside class folders.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from delib_jax.data._text import DatasetError, fail
from delib_jax.data.images import (
    DEFAULT_TEST_FRACTION,
    DEFAULT_VAL_FRACTION,
    SPLITS,
    ImageDataset,
    Names,
    carve,
    check_classes,
    check_fractions,
    split_name,
    with_options,
)

SHOWN = 5  # left-out files named in the one line that lists them


def image_extensions() -> frozenset[str]:
    """Lower-case extensions (with the dot) of the formats Pillow can open here."""
    from PIL import Image

    Image.init()
    return frozenset(e.lower() for e, fmt in Image.registered_extensions().items() if fmt in Image.OPEN)


def _walk(top: str, rel: str, extensions: frozenset[str], images: list[str], other: list[str], seen: set) -> None:
    """Append the image files under ``top`` (relative names ``rel/...``) to ``images``, the other files to
    ``other``; hidden entries skipped; a folder met twice through links is entered once."""
    try:
        st = os.stat(top)
        if (st.st_dev, st.st_ino) in seen:
            return
        seen.add((st.st_dev, st.st_ino))
        with os.scandir(top) as it:
            entries = [(e.name, e.is_dir()) for e in it if not e.name.startswith(".")]
    except OSError as e:
        raise fail(top, f"cannot list folder ({e.strerror or e})") from None
    for name, is_dir in entries:
        path = f"{rel}/{name}"
        if is_dir:
            _walk(os.path.join(top, name), path, extensions, images, other, seen)
        elif os.path.splitext(name)[1].lower() in extensions:
            images.append(path)
        else:
            other.append(path)


def _entries(folder: Path) -> tuple[list[str], list[str]]:
    """(sub-folder names, file names) of ``folder``, hidden ones left out."""
    try:
        with os.scandir(folder) as it:
            entries = [(e.name, e.is_dir()) for e in it if not e.name.startswith(".")]
    except OSError as e:
        raise fail(folder, f"cannot list folder ({e.strerror or e})") from None
    return sorted(n for n, d in entries if d), sorted(n for n, d in entries if not d)


def find_split_folders(root: Path) -> dict[str, str] | None:
    """{our split: its folder name} when every folder in ``root`` is a split folder (train, val, test under any of
    their names), None when they are class folders; `DatasetError` for a mix, or two folders of one split."""
    folders, _ = _entries(root)
    splits = {f: split_name(f) for f in folders}
    known = [f for f, s in splits.items() if s is not None]
    if not known or "train" not in splits.values() and len(known) < len(folders):
        return None
    if len(known) < len(folders):
        others = ", ".join(f for f in folders if splits[f] is None)
        raise fail(root, f"holds split folders ({', '.join(known)}) beside other folders ({others}): give a folder of "
                         "class folders, or of split folders of class folders")  # fmt: skip
    found: dict[str, str] = {}
    for f in known:
        if splits[f] in found:
            raise fail(root, f"folders {found[splits[f]]!r} and {f!r} are both the {splits[f]} split: keep one")
        found[splits[f]] = f
    if "train" not in found:
        raise fail(root, f"holds split folders ({', '.join(known)}) but no train/ folder: give its training images")
    return found


def load_folders(
    path: str | Path,
    *,
    val_fraction: float = DEFAULT_VAL_FRACTION,
    test_fraction: float = DEFAULT_TEST_FRACTION,
    seed: int = 0,
) -> ImageDataset:
    """Read class folders (module docstring) as an `ImageDataset`; the splits not given are carved (`carve`) with
    ``val_fraction`` and ``test_fraction`` of each class's training images, seeded by ``seed``.

    Raises:
      DatasetError: one line naming the folder: no images, one class, classes differing only in case, a class
        without training images, split folders beside class folders, an unreadable folder.
    """
    check_fractions(val_fraction, test_fraction)
    root = Path(path).absolute()
    if not root.is_dir():
        raise fail(root, "not a folder (give a folder of class folders)")
    title = f"the class folders in {root}"
    extensions = image_extensions()
    splits = find_split_folders(root)
    layout = {"train": ""} if splits is None else splits  # our split -> folder under root ("" the root itself)
    images: dict[tuple[str, str], list[str]] = {}  # (split, class) -> relative names
    other: list[str] = []
    seen: set = set()
    if splits is not None:
        other += _entries(root)[1]  # files beside the split folders
    for split in SPLITS:
        if split not in layout:
            continue
        top = root / layout[split] if layout[split] else root
        classes, files = _entries(top)
        prefix = f"{layout[split]}/" if layout[split] else ""
        other += [prefix + f for f in files]  # files beside the class folders
        for c in classes:
            found: list[str] = []
            _walk(str(top / c), prefix + c, extensions, found, other, seen)
            images[(split, c)] = found
    class_names = tuple(sorted({c for (_, c), found in images.items() if found}))
    empty = sorted({c for (_, c) in images} - set(class_names))
    if not class_names:
        raise DatasetError(
            f"{title}: no images (looked for {', '.join(sorted(extensions)[:8])}, ... in "
            f"{'DIR/SPLIT/CLASS/' if splits else 'DIR/CLASS/'} and below)"
        )
    check_classes(title, class_names)
    untrained = [c for c in class_names if not images.get(("train", c))]
    if untrained:
        where = f"{root / layout['train'] / untrained[0]}" if splits else f"{root / untrained[0]}"
        raise DatasetError(f"{title}: class {untrained[0]!r} has no training images ({where}): give it some, or "
                           "remove it")  # fmt: skip
    index = {c: i for i, c in enumerate(class_names)}
    names, labels, split_ix = [], [], []
    for split in SPLITS:
        for c in class_names:
            found = sorted(images.get((split, c), ()))
            names += found
            labels += [index[c]] * len(found)
            split_ix += [SPLITS.index(split)] * len(found)
    labels_a = np.asarray(labels, np.int64)
    missing = [s for s in ("val", "test") if s not in layout]
    split_a = carve(np.asarray(split_ix, np.int8), labels_a, names, missing=missing, val_fraction=val_fraction,
                    test_fraction=test_fraction, seed=seed)  # fmt: skip
    options = {"val_fraction": float(val_fraction), "test_fraction": float(test_fraction), "seed": int(seed)}
    note = left_out_line(title, sorted(other), empty)
    return ImageDataset(
        kind="folder", root=root, title=title, image_paths=Names(names, prefix=str(root) + os.sep), labels=labels_a,
        split=split_a, class_names=class_names, given=tuple(s for s in SPLITS if s in layout), options=options,
        notes=(note,) if note else (),
    )  # fmt: skip


def left_out_line(title: str, files: list[str], empty: list[str]) -> str | None:
    """The one line listing the files left out of a class-folder dataset (not images, or outside the class folders)
    and its class folders without images, or None."""
    parts = []
    if files:
        more = f" and {len(files) - SHOWN} more" if len(files) > SHOWN else ""
        parts.append(f"{len(files)} files that are not images or lie outside the class folders "
                     f"({', '.join(files[:SHOWN])}{more})")  # fmt: skip
    if empty:
        more = f" and {len(empty) - SHOWN} more" if len(empty) > SHOWN else ""
        parts.append(f"{len(empty)} class folders without images ({', '.join(empty[:SHOWN])}{more})")
    return f"left out of {title}: " + "; ".join(parts) if parts else None


def load(path: str | Path, options: Mapping[str, Any] | None = None) -> ImageDataset:
    """`load_folders` with a run's recorded ``options`` (val_fraction, test_fraction, seed)."""
    o = with_options(options, val_fraction=DEFAULT_VAL_FRACTION, test_fraction=DEFAULT_TEST_FRACTION, seed=0)
    return load_folders(path, **o)


__all__ = ["find_split_folders", "image_extensions", "left_out_line", "load", "load_folders"]
