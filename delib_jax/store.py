"""The on-disk form of many explanations: a small JSON Lines index plus binary shards, streamable both ways.

    for e in load_explanations("explained/"):      # Explanation objects, lazily, in input order
        e.source, e.insecurities[0].label, e.insecurities[0].mask.shape
    for r in read_records("explained/"):           # the index alone: no arrays are read
        r["source"], r["difficulty"], [q["name_a"] for q in r["insecurities"]]

Layout of an output folder (written by `delib_jax.stream.explain_files`):

    manifest.json                         model (checkpoint, weights digest), settings, class names, mask size
    explanations/index-PPPPP.jsonl        one record per image of process P: source, prediction, top classes and
                                          probabilities, difficulty, each insecurity's pair, names, strength,
                                          coverage, threshold; its shard and row; or the reason it was skipped
    explanations/shard-PPPPP-SSSSSS.npz   the arrays of up to `shard_size` images: probs (n, C), maps
                                          (n, N + 1, H, W), grad_cam (n, H, W), the insecurities' masks as packed
                                          bits, deflated (about 0.4 KB per mask at 224 px instead of 50 KB as bool)

A shard is written whole (to a temporary name, then renamed) before its records are appended to the index, so the
index never names a shard that is not complete; a killed run leaves at most a torn last line and an unreferenced
shard, both dropped by `open_index` on the next run.
"""

from __future__ import annotations

import errno
import json
import os
import re
import zlib
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

FORMAT = "delib-explanations/1"
MANIFEST = "manifest.json"
DIRECTORY = "explanations"
_INDEX = re.compile(r"index-(\d{5})\.jsonl")
_SHARD = re.compile(r"shard-(\d{5})-(\d{6})\.npz")
MAX_JSON_DEPTH = 20


class StoreError(ValueError):
    """An output folder that cannot be used as asked (another model's results, a damaged manifest): one line."""


def index_name(process: int) -> str:
    return f"index-{process:05d}.jsonl"


def shard_name(process: int, seq: int) -> str:
    return f"shard-{process:05d}-{seq:06d}.npz"


# ------------------------------------------------------------------------------------------------ masks


def pack_bits(masks: np.ndarray) -> np.ndarray:
    """(..., H, W) bool -> (..., ceil(H W / 8)) uint8: each mask's pixels row-major, 8 to a byte (`np.packbits`)."""
    masks = np.asarray(masks, bool)
    return np.packbits(masks.reshape(*masks.shape[:-2], masks.shape[-2] * masks.shape[-1]), axis=-1)


def unpack_bits(bits: np.ndarray, size: Sequence[int]) -> np.ndarray:
    """Inverse of `pack_bits`: (..., ceil(H W / 8)) uint8 -> (..., H, W) bool for ``size`` = (H, W)."""
    h, w = (int(s) for s in size)
    return np.unpackbits(np.asarray(bits, np.uint8), axis=-1, count=h * w).astype(bool).reshape(*bits.shape[:-1], h, w)


# ------------------------------------------------------------------------------------------------ files


def _no_follow(path: Path, root: Path) -> None:
    """Refuse a path that is a symbolic link or leads outside ``root`` (nothing is written through a planted link)."""
    if path.is_symlink():
        raise StoreError(f"{path} is a symbolic link: refusing to write through it (remove it)")
    resolved, base = path.resolve(), root.resolve()
    if resolved != base and base not in resolved.parents:
        raise StoreError(f"{path} leads outside {root}: refusing to write there (remove it)")


def safe_dir(root: Path, name: str) -> Path:
    """``root/name`` created if needed, refused if it is a link or leads outside ``root``."""
    path = root / name
    _no_follow(path, root)
    path.mkdir(exist_ok=True)
    _no_follow(path, root)
    return path


def remove_temporaries(*directories: Path) -> int:
    """Delete the temporary files a killed run left (``.NAME.<random>.tmp``, see `atomic_write`); returns how
    many."""
    count = 0
    for d in directories:
        if d.is_dir() and not d.is_symlink():
            for p in d.glob(".*.tmp"):
                if p.is_file() and not p.is_symlink():
                    p.unlink(missing_ok=True)
                    count += 1
    return count


def read_manifest(out: str | Path) -> dict[str, Any] | None:
    """OUT/manifest.json as a dict, None if there is none; `StoreError` if it is not one we wrote."""
    path = Path(out) / MANIFEST
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
        raise StoreError(f"{path} is damaged ({type(e).__name__}); empty the folder or choose another") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise StoreError(f"{path} is not a manifest of delib explanations ({FORMAT}); choose another folder")
    return data


def _depth(value: Any, limit: int = MAX_JSON_DEPTH) -> int:
    stack, deepest = [(value, 1)], 0
    while stack:
        item, d = stack.pop()
        deepest = max(deepest, d)
        if d > limit:
            return d
        if isinstance(item, dict):
            stack.extend((v, d + 1) for v in item.values())
        elif isinstance(item, list):
            stack.extend((v, d + 1) for v in item)
    return deepest


def _record(line: str) -> dict[str, Any] | None:
    """An index line as a record, None if it is not one we wrote (torn, not JSON, wrong types, NaN)."""
    try:
        r = json.loads(line)
    except (ValueError, RecursionError):
        return None
    if not isinstance(r, dict) or _depth(r) > 4 or not isinstance(r.get("source"), str):
        return None
    if not isinstance(r.get("i"), int):
        return None
    if "skipped" in r:  # a missing file has no stat
        return r if isinstance(r["skipped"], str) and isinstance(r.get("stat"), (list, type(None))) else None
    if not isinstance(r.get("stat"), list):
        return None
    try:
        values = [r["confidence"], r["difficulty"], *(v for q in r["insecurities"] for v in (
            q["strength"], q["coverage"], q["threshold"]))]  # fmt: skip
        ok = isinstance(r["shard"], str) and _SHARD.fullmatch(r["shard"]) and isinstance(r["row"], int)
        ok = ok and all(isinstance(v, (int, float)) and np.isfinite(v) for v in values)
        ok = ok and all(isinstance(q[k], int) for q in r["insecurities"] for k in ("a", "b"))
    except (KeyError, TypeError):
        return None
    return r if ok else None


def iter_index(path: Path) -> Iterator[tuple[dict[str, Any] | None, str]]:
    """(record or None, raw line) for each non-empty line of one index file."""
    with open(path, encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            if line.strip():
                yield _record(line), line


def index_files(out: str | Path) -> list[Path]:
    """OUT/explanations/index-*.jsonl of every process, in process order."""
    d = Path(out) / DIRECTORY
    return sorted(p for p in d.glob("index-*.jsonl") if _INDEX.fullmatch(p.name)) if d.is_dir() else []


def read_records(out: str | Path, *, skipped: bool = False) -> Iterator[dict[str, Any]]:
    """The index records of every process, in order (explained images; with ``skipped`` also skipped ones).
    Damaged lines are left out."""
    for path in index_files(out):
        for r, _ in iter_index(path):
            if r is not None and (skipped or "skipped" not in r):
                yield r


def load_explanations(out: str | Path, *, sources: Sequence[str] | None = None) -> Iterator:
    """`Explanation` objects of an output folder, lazily (one shard in memory at a time), in index order.

    ``sources``: only these files (as recorded). Masks are rebuilt exactly from their packed bits."""
    out = Path(out)
    manifest = read_manifest(out)
    if manifest is None:
        raise FileNotFoundError(f"{out} holds no explanations ({MANIFEST} missing)")
    names = list(manifest["class_names"])
    settings = manifest["settings"]
    wanted = None if sources is None else set(sources)
    shard_path, arrays = None, None
    for r in read_records(out):
        if wanted is not None and r["source"] not in wanted:
            continue
        path = out / DIRECTORY / r["shard"]
        if path != shard_path:
            arrays, shard_path = read_shard(path), path
        yield explanation_from_row(arrays, r["row"], names, settings, r["source"])


def explanation_from_row(
    arrays: Mapping[str, np.ndarray], row: int, names: Sequence[str], settings: Mapping[str, Any], source: str | None
):
    """The `Explanation` in ``row`` of a shard's arrays (masks unpacked: ``masks`` (n, Q, H, W) bool)."""
    from delib_jax.explanation import Explanation, Insecurity

    masks, pairs = arrays["masks"][row], arrays["pairs"][row]
    items = tuple(
        Insecurity(
            mask=masks[q],
            strength=np.float32(arrays["strength"][row, q]),
            coverage=np.float32(arrays["coverage"][row, q]),
            threshold=np.float32(arrays["threshold"][row, q]),
            a=int(pairs[q, 0]),
            b=int(pairs[q, 1]),
            name_a=names[int(pairs[q, 0])],
            name_b=names[int(pairs[q, 1])],
        )  # fmt: skip
        for q in np.flatnonzero(arrays["valid"][row])
    )
    probs, classes = arrays["probs"][row], arrays["classes"][row]
    prediction = int(np.argmax(probs))
    return Explanation(
        probs=probs, difficulty=np.float32(arrays["difficulty"][row]), classes=classes, maps=arrays["maps"][row],
        grad_cam=arrays["grad_cam"][row], insecurities=items, prediction=prediction,
        prediction_name=names[prediction], class_names=tuple(names[int(c)] for c in classes),
        score=settings["score"], method=settings["method"], image_size=tuple(masks.shape[1:]), source=source,
    )  # fmt: skip


def read_shard(path: Path) -> dict[str, np.ndarray]:
    """The arrays of one shard, masks unpacked to (n, Q, H, W) bool."""
    with np.load(path, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    n, q, h, w = (int(v) for v in arrays.pop("masks_shape"))
    bits = np.frombuffer(zlib.decompress(arrays.pop("masks_deflated").tobytes()), np.uint8)
    arrays["masks"] = unpack_bits(bits.reshape(n, q, -1), (h, w))
    return arrays


# ------------------------------------------------------------------------------------------------ writing


def disk_full(error: OSError) -> bool:
    return error.errno in (errno.ENOSPC, errno.EDQUOT)


@dataclass
class ShardWriter:
    """Buffers the rows of one process and writes them as shards of ``shard_size`` images, each followed by its
    index records (see the module docstring for why in that order). Rows hold probs, difficulty, classes, maps,
    grad_cam, pairs, strength, coverage, threshold, valid and mask_bits (n, Q, ceil(H W / 8)) (see `pack_bits`) of
    masks of ``image_size``.

    ``ready(records, block)`` returns the records of a written shard that may be appended now (the job's figures
    of them are drawn), or None to wait; with ``block`` it waits until they may. The index never names a figure
    that is not written, and up to ``max_pending`` written shards wait for their figures while the next ones are
    filled, so the figure processes never run dry at a shard boundary."""

    directory: Path
    process: int
    shard_size: int
    next_seq: int = 0
    image_size: tuple[int, int] = (0, 0)
    ready: Callable[[list[dict[str, Any]], bool], list[dict[str, Any]] | None] | None = None
    max_pending: int = 2

    def __post_init__(self) -> None:
        self._arrays: list[dict[str, np.ndarray]] = []
        self._records: list[dict[str, Any]] = []
        self._skipped: list[dict[str, Any]] = []
        self._rows = 0
        self._pending: deque[tuple[list[dict[str, Any]], list[dict[str, Any]]]] = deque()
        self.bytes_written = 0

    @property
    def index_path(self) -> Path:
        return self.directory / index_name(self.process)

    def add(self, arrays: Mapping[str, np.ndarray], records: Sequence[dict[str, Any]]) -> None:
        """Rows of explained images (``arrays`` of n rows, n ``records`` without shard/row yet)."""
        n = len(records)
        if n:
            self._arrays.append({k: np.asarray(v)[:n] for k, v in arrays.items()})
            for j, r in enumerate(records):
                r["row"] = self._rows + j
            self._records.extend(records)
            self._rows += n
        if self._rows >= self.shard_size:
            self.flush()

    def skip(self, record: dict[str, Any]) -> None:
        """A skipped image's record (committed with the next shard, or at `flush`)."""
        self._skipped.append(record)

    def flush(self, *, final: bool = False) -> None:
        """Write the buffered rows as one shard, then append the records of every written shard whose figures are
        done (``final``: wait for all of them)."""
        from delib_jax.explanation import atomic_write

        records = self._records
        if records:
            name = shard_name(self.process, self.next_seq)
            arrays = {k: np.concatenate([a[k] for a in self._arrays]) for k in self._arrays[0]}
            arrays["masks_deflated"] = np.frombuffer(zlib.compress(arrays.pop("mask_bits").tobytes(), 1), np.uint8)
            arrays["masks_shape"] = np.asarray([*arrays["pairs"].shape[:2], *self.image_size], np.int64)
            path = atomic_write(self.directory / name, lambda f: np.savez(f, **arrays))
            self.bytes_written += path.stat().st_size
            for r in records:
                r["shard"] = name
            self.next_seq += 1
        if records or self._skipped:
            self._pending.append((records, self._skipped))
        self._arrays, self._records, self._skipped, self._rows = [], [], [], 0
        while self._pending:
            head, skipped = self._pending[0]
            block = final or len(self._pending) > self.max_pending
            if self.ready is not None and head:
                head = self.ready(head, block)
                if head is None:
                    break
            self._pending.popleft()
            self._append([*head, *skipped])

    def _append(self, lines: list[dict[str, Any]]) -> None:
        if not lines:
            return
        text = "".join(json.dumps(r, allow_nan=False) + "\n" for r in sorted(lines, key=lambda r: r["i"]))
        fd = os.open(self.index_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o666)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        self.bytes_written += len(text)


def open_index(
    directory: Path, process: int, *, keep: Callable[[dict[str, Any]], bool], report: Callable[[str], None]
) -> tuple[dict[str, dict[str, Any]], int]:
    """Read the index of ``process`` for a resume: returns the records to keep (by source) and the next shard
    number. Lines that are damaged, or that ``keep`` rejects (input changed since, shard or figure missing), are
    dropped and the file rewritten without them; shards no kept record names are deleted."""
    from delib_jax.explanation import atomic_write

    path = directory / index_name(process)
    kept: dict[str, dict[str, Any]] = {}
    dropped = 0
    if path.is_file():
        for r, _ in iter_index(path):
            if r is None or not keep(r):
                dropped += 1
                continue
            if r["source"] in kept:
                dropped += 1
            kept[r["source"]] = r
    if dropped:
        report(f"{path}: dropped {dropped} record(s) (torn, damaged, stale or missing their files); redoing them")
        text = "".join(json.dumps(r, allow_nan=False) + "\n" for r in kept.values())
        atomic_write(path, lambda f: f.write(text), binary=False)
    used = {r["shard"] for r in kept.values() if "shard" in r}
    seq = -1
    for p in directory.glob(f"shard-{process:05d}-*.npz"):
        m = _SHARD.fullmatch(p.name)
        if m and p.name not in used:
            p.unlink(missing_ok=True)  # written by a run killed before its records were appended
        elif m:
            seq = max(seq, int(m.group(2)))
    return kept, seq + 1


__all__ = [
    "DIRECTORY", "FORMAT", "MANIFEST", "ShardWriter", "StoreError", "index_files", "load_explanations",
    "open_index", "pack_bits", "read_manifest", "read_records", "read_shard", "unpack_bits",
]  # fmt: skip
