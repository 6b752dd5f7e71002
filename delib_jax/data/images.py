"""Labelled images of your own as one `ImageDataset`: class folders (`delib_jax.data.folders`) and TensorFlow Datasets
catalog datasets prepared in a local data folder (`delib_jax.data.catalog`).

Both give N examples, C class names, and a split of each example among ``train``, ``val`` and ``test``: the splits
the data gives, the others carved from its training split, per class (stratified) and by a seeded hash of each
example's name. A carved split is therefore a pure function of the examples' names, classes, the fractions and the
seed: the same files give the same split on every machine, in any listing order, and adding a few files moves only a
few examples between splits. ``ImageDataset.options`` holds what a run records to read the same dataset, with the
same splits, again (`delib_jax.data.load_dataset`'s ``options``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from delib_jax.data._text import DatasetError

SPLITS: tuple[str, ...] = ("train", "val", "test")
# Names a dataset may give its splits (folder names, TFDS split names), lower case -> ours.
SPLIT_NAMES: dict[str, str] = {
    "train": "train", "training": "train",
    "val": "val", "valid": "val", "validation": "val", "dev": "val",
    "test": "test", "testing": "test",
}  # fmt: skip
DEFAULT_VAL_FRACTION = 0.1
DEFAULT_TEST_FRACTION = 0.1


def split_name(name: str) -> str | None:
    """'train', 'val' or 'test' for a split's name as given (``--split validation`` is 'val'), None if unknown."""
    return SPLIT_NAMES.get(name.lower())


class Names(Sequence):
    """N strings in flat memory (one buffer and an offsets array, about a byte per character), each ``prefix +
    name``: the examples' source names of a large dataset without a Python string per example."""

    def __init__(self, names: Iterable[str], prefix: str = ""):
        encoded = [os.fsencode(n) for n in names]
        self._ends = np.cumsum([len(b) for b in encoded], dtype=np.int64) if encoded else np.zeros(0, np.int64)
        self._blob, self.prefix = b"".join(encoded), prefix

    def __len__(self) -> int:
        return len(self._ends)

    def name(self, i: int) -> str:
        """Item ``i`` without the prefix (a relative path)."""
        i = int(i)
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(i)
        start = int(self._ends[i - 1]) if i else 0
        return os.fsdecode(self._blob[start : int(self._ends[i])])

    def __getitem__(self, i):
        if isinstance(i, slice):
            return Names((self.name(j) for j in range(*i.indices(len(self)))), self.prefix)
        return self.prefix + self.name(i)

    def take(self, indices: Sequence[int] | np.ndarray) -> Names:
        """The items at ``indices``, as a new `Names`."""
        return Names((self.name(int(i)) for i in indices), self.prefix)

    def __repr__(self) -> str:
        return f"Names({len(self)} names under {self.prefix!r})"


@dataclasses.dataclass(frozen=True)
class ImageDataset:
    """N labelled images, C classes, each example in one of the splits train / val / test.

    Attributes:
      kind: 'folder' (class folders) or 'tfds' (a TFDS catalog dataset): the `delib_jax.data.load_dataset` name.
      root: the folder read (class folders), or the TFDS dataset's version folder.
      title: what the data is, for messages ("the class folders in /data/pets").
      image_paths: N source names: files (class folders), or ``VERSION_DIR::SPLIT/KEY`` of a TFDS record.
      labels: (N,) int64 class index in [0, C).
      split: (N,) int8 index into `SPLITS`.
      class_names: C names in class-index order.
      given: the splits the data gives (the others were carved from its training split).
      options: how it was read: with these `load_dataset` options the same examples, classes and splits again.
      records: None (images are the files ``image_paths``), or random access to the encoded images by example index
        (``encoded(i)`` -> (image bytes, None)), as `delib_jax.data.tfds.TfdsRecords`.
      notes: lines to say once when the dataset is read (files left out), `delib_jax.data.load_dataset`'s report.
    """

    kind: str
    root: Path
    title: str
    image_paths: Sequence[str]
    labels: np.ndarray
    split: np.ndarray
    class_names: tuple[str, ...]
    given: tuple[str, ...]
    options: dict[str, Any]
    records: Any = None
    notes: tuple[str, ...] = ()

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def is_train(self) -> np.ndarray:
        """(N,) bool: in the training split (the split class examples are taken from)."""
        return self.split == SPLITS.index("train")

    def indices(self, split: str) -> np.ndarray:
        """Sorted example indices of ``split`` ('train', 'val' / 'validation', 'test', or 'all'); `DatasetError`
        naming the splits there are for any other name."""
        if split == "all":
            return np.arange(len(self), dtype=np.int64)
        ours = split_name(split)
        if ours is None:
            raise DatasetError(f"{self.title}: no split {split!r}; its splits are {', '.join(SPLITS)}")
        return np.flatnonzero(self.split == SPLITS.index(ours)).astype(np.int64)

    def counts(self) -> dict[str, int]:
        """Examples per split."""
        n = np.bincount(self.split, minlength=len(SPLITS))
        return {name: int(n[i]) for i, name in enumerate(SPLITS)}

    def describe(self) -> str:
        """One line: what was read, its classes and splits (which carved)."""
        counts = self.counts()
        parts = [f"{counts[s]} {s}" + ("" if s in self.given else " (carved)") for s in SPLITS]
        return f"data: {self.title}: {len(self)} images of {self.num_classes} classes; {', '.join(parts)}"


def check_fractions(val_fraction: float, test_fraction: float) -> None:
    """ValueError (one line) unless both lie in [0, 1) and leave training images."""
    for name, f in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0 <= f < 1:  # False for NaN
            raise ValueError(f"{name} must lie in [0, 1), got {f}")
    if val_fraction + test_fraction >= 1:
        raise ValueError(f"val_fraction + test_fraction must be below 1, got {val_fraction} + {test_fraction}")


def hash_order(names: Sequence[str], seed: int) -> np.ndarray:
    """A seeded order of ``names`` by a keyed hash of each name (independent of the listing order and of the other
    names): the positions sorted by ``blake2b(name, key=seed)``."""
    key = int(seed).to_bytes(8, "little")
    digests = np.fromiter(
        (int.from_bytes(hashlib.blake2b(n.encode("utf-8", "surrogateescape"), digest_size=8, key=key).digest(),
                        "little") for n in names),
        dtype=np.uint64, count=len(names),
    )  # fmt: skip
    return np.argsort(digests, kind="stable")


def quotas(counts: np.ndarray, fraction: float) -> np.ndarray:
    """Per-class shares of ``round(fraction * counts.sum())`` examples, proportional to ``counts`` (the largest
    remainders rounded up, ties to the lower class index): the stratified sizes of a carved split."""
    counts = np.asarray(counts, np.int64)
    exact = fraction * counts
    share = np.floor(exact).astype(np.int64)
    extra = int(round(fraction * counts.sum())) - int(share.sum())
    if extra > 0:
        order = np.lexsort((np.arange(len(counts)), -(exact - share)))
        share[order[:extra]] += 1
    return share


def carve(
    split: np.ndarray,
    labels: np.ndarray,
    names: Sequence[str],
    *,
    missing: Sequence[str],
    val_fraction: float,
    test_fraction: float,
    seed: int,
) -> np.ndarray:
    """``split`` with the splits in ``missing`` ('val', 'test') carved from the training examples, stratified: of
    the N training examples, round(test_fraction N) go to test and round(val_fraction N) to val, shared among the
    classes in proportion to their sizes (`quotas`), each class's taken in `hash_order` of their names (test first,
    then val); every class keeps at least one training example. Returns a new (N,) int8 array."""
    split = np.array(split, np.int8)
    train = SPLITS.index("train")
    fractions = [(SPLITS.index(s), f) for s, f in (("test", test_fraction), ("val", val_fraction)) if s in missing]
    if not fractions:
        return split
    in_train = split == train
    classes, counts = np.unique(labels[in_train], return_counts=True)
    takes = [quotas(counts, f) for _, f in fractions]
    for j, c in enumerate(classes):
        members = np.flatnonzero(in_train & (labels == c))
        order = members[hash_order([names[i] for i in members], seed)]
        start = 0
        for (target, _), take in zip(fractions, takes):
            k = max(0, min(int(take[j]), len(order) - 1 - start))
            split[order[start : start + k]] = target
            start += k
    return split


def check_classes(title: str, class_names: Sequence[str]) -> None:
    """`DatasetError` (one line) for one class only, or class names that differ only in case."""
    if len(class_names) < 2:
        only = f" ({class_names[0]})" if class_names else ""
        raise DatasetError(f"{title}: only one class{only}: a classifier needs at least two classes")
    folded: dict[str, str] = {}
    for name in class_names:
        other = folded.setdefault(name.casefold(), name)
        if other != name:
            raise DatasetError(
                f"{title}: classes {other!r} and {name!r} differ only in case: rename one (a case-insensitive file "
                "system holds them as one folder)"
            )


def _name_key(name: str) -> str:
    """A class name as folders spell it loosely: case, underscores, hyphens and runs of spaces ignored."""
    return " ".join(str(name).replace("_", " ").replace("-", " ").casefold().split())


def match_classes(data_names: Sequence[str], model_names: Sequence[str]) -> tuple[np.ndarray | None, str]:
    """Each of the data's classes as a class of a model, by name: ((C_data,) int64 model class index, "") when every
    data class names exactly one model class (the same name, or the same up to case, ``_``, ``-`` and spaces:
    folder ``great_white_shark`` is ImageNet's "great white shark"), else (None, one line saying which class does
    not and why). A subset of the model's classes, or the same classes in another order, maps; indices are never
    guessed."""
    exact: dict[str, list[int]] = {}
    loose: dict[str, list[int]] = {}
    for k, n in enumerate(model_names):
        exact.setdefault(str(n), []).append(k)
        loose.setdefault(_name_key(n), []).append(k)
    out = np.empty(len(data_names), np.int64)
    taken: dict[int, str] = {}
    for i, name in enumerate(data_names):
        found = exact.get(str(name)) or loose.get(_name_key(name), [])
        if not found:
            return None, f"class {name!r} is not one of the model's {len(model_names)} classes"
        if len(found) > 1:
            both = " and ".join(f"{k} ({model_names[k]!r})" for k in found[:2])
            return None, f"class {name!r} could be the model's class {both}"
        if found[0] in taken:
            return None, f"classes {taken[found[0]]!r} and {name!r} are both the model's {model_names[found[0]]!r}"
        out[i], taken[found[0]] = found[0], str(name)
    return out, ""


def class_correspondence(
    data_names: Sequence[str], model_names: Sequence[str], title: str, model: str, *, by_index: bool = True
) -> tuple[np.ndarray | None, str]:
    """How a dataset's classes are a model's: (None, "") when they are the same; (data class -> model class index,
    a line saying so) when each is one of the model's by name (`match_classes`: a subset, or another order); else,
    with ``by_index`` where the counts agree, (None, a line: labels matched by index, as ImageNet's class folders
    named by WordNet ID sort in the order of its class indices); else ValueError (one line naming the first class
    the model lacks). ``title`` and ``model`` name the two in the lines ("the class folders in DIR", "the
    classifier of RUN")."""
    names = [str(n) for n in data_names]
    if names == [str(n) for n in model_names]:
        return None, ""
    mapping, why = match_classes(names, model_names)
    if mapping is not None:
        renamed = next((f"{n!r} is {model_names[k]!r}" for n, k in zip(names, mapping) if n != model_names[k]), None)
        return mapping, (f"the {len(names)} classes of {title} are matched by name to those of {model} "
                         f"({len(model_names)} classes){'; ' + renamed if renamed else ''}")  # fmt: skip
    if len(names) == len(model_names):
        if by_index:
            return None, f"the class names of {title} are not those of {model} ({why}); labels are matched by index"
        raise ValueError(f"the classes of {title} are not those of {model}: {why}")
    raise ValueError(
        f"{title} has {len(names)} classes and {model} has {len(model_names)}; {why}: give the data it was trained "
        "on, or class folders named as its classes"
    )


def image_source(ds: ImageDataset, split: str = "train", *, indices: np.ndarray | None = None):
    """The pipeline `Source` of ``split`` of ``ds`` (or of explicit example ``indices``)."""
    from delib_jax.data.pipeline import Source

    ix = ds.indices(split) if indices is None else np.asarray(indices, dtype=np.int64)
    paths = ds.image_paths.take(ix) if isinstance(ds.image_paths, Names) else tuple(ds.image_paths[i] for i in ix)
    if indices is not None:
        name, why = f"the selected images of {ds.title}", "no image index was given"
    else:
        name = f"the {split} split of {ds.title}"
        why = f"the {split} split is empty" + ("" if split in ds.given else " (carved: too few images per class)")
    return Source(image_paths=paths, labels=ds.labels[ix], indices=ix, records=ds.records, name=name, why_empty=why)


def with_options(options: Mapping[str, Any] | None, **defaults: Any) -> dict[str, Any]:
    """``options`` (a run's record, or None) over ``defaults``; `ValueError` naming an option not among them."""
    options = dict(options or {})
    unknown = sorted(set(options) - set(defaults))
    if unknown:
        raise ValueError(f"unknown dataset option(s) {', '.join(unknown)}; known: {', '.join(sorted(defaults))}")
    return {**defaults, **options}


__all__ = [
    "DEFAULT_TEST_FRACTION", "DEFAULT_VAL_FRACTION", "SPLITS", "SPLIT_NAMES", "ImageDataset", "Names", "carve",
    "check_classes", "check_fractions", "class_correspondence", "hash_order", "image_source", "match_classes",
    "quotas", "split_name", "with_options",
]  # fmt: skip
