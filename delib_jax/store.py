"""The on-disk form of many explanations: a small JSON Lines index plus binary shards, streamable both ways.

    for e in load_explanations("explained/"):      # Explanation objects, lazily, in input order
        e.source, e.insecurities[0].label, e.insecurities[0].mask.shape
    for r in read_records("explained/"):           # the index alone: no arrays are read
        r["source"], r["difficulty"], [q["name_a"] for q in r["insecurities"]]

Layout of an output folder (written by `delib_jax.stream.explain_files`):

    manifest.json                         model (checkpoint, weights digest), settings, class names, mask size, and
                                          the run's identity (a random id made with the manifest)
    explanations/index-PPPPP.jsonl        one record per image of process P: source, its fingerprint (size,
                                          modification time), prediction, top classes and probabilities, difficulty,
                                          each insecurity's pair, names, strength, coverage, threshold and share
                                          (the readable strength; absent in records written before it); its shard,
                                          row and the shard's digest; or the reason it was skipped
    explanations/shard-PPPPP-SSSSSS.safetensors
                                          the arrays of up to `shard_size` images: probs (n, C), difficulty (n,),
                                          classes (n, T), maps (n, T + 1, h, w), grad_cam (n, h, w), pairs (n, Q, 2),
                                          strength, coverage, threshold, valid (n, Q), the insecurities' masks as
                                          packed bits, deflated (about 0.4 KB per mask at 224 px instead of 50 KB);
                                          its metadata: the run's id, its own name and, per row, [ordinal, source,
                                          fingerprint] of the image the row belongs to

Why safetensors: its header declares every array's dtype, shape and byte range before any data, so a reader checks
them (against the manifest's settings, and against the file's size) before it allocates anything, and the header's
free-form metadata carries the binding of each row to its image and run. There is no archive layer (npz is a zip:
a directory whose sizes can lie, members that inflate without bound), no pickle, and other tools (the safetensors
library, in any language) read the arrays. The only compressed array, the mask bits, has an inflated size known from
the rows and the manifest, and is inflated with that bound.

What a reader guarantees (`load_explanations`, `open_index`, `verify`): a row is served only when its record and its
shard agree: the shard's content has the digest the record names (crc32 of the whole file: damage, truncation or a
shard replaced by another), the shard belongs to this folder's run, the row is in range and holds the record's
image (source, fingerprint, ordinal), and no image has two records. Anything else is a `StoreDamage` naming the file
and what is wrong.

A shard is written whole (to a temporary name, then renamed) before its records are appended to the index, so the
index never names a shard that is not complete; a killed run leaves at most a torn last line and an unreferenced
shard, both dropped by `open_index` on the next run, which also re-explains images whose stored results are
damaged or foreign.
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import re
import struct
import tempfile
import zlib
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

FORMAT = "delib-explanations/2"
OLD_FORMATS = ("delib-explanations/1",)
MANIFEST = "manifest.json"
DIRECTORY = "explanations"
SHARD_SUFFIX = ".safetensors"
_INDEX = re.compile(r"index-(\d{5})\.jsonl")
_SHARD = re.compile(r"shard-(\d{5})-(\d{6})\.safetensors")
_RUN = re.compile(r"[0-9a-f]{32}")
_DIGEST = re.compile(r"crc32:[0-9a-f]{8}")
MAX_JSON_DEPTH = 20
MAX_HEADER = 100 << 20  # the safetensors library's own limit on a header
MAX_CROP = 16384  # a manifest asking for masks beyond this is damaged, not a model


class StoreError(ValueError):
    """An output folder that cannot be used as asked (another model's results, a damaged manifest): one line."""


class StoreDamage(StoreError):
    """A stored file that is damaged or foreign: ``path`` names it, ``problem`` says what is wrong (one line)."""

    def __init__(self, path: str | Path, problem: str):
        self.path, self.problem = Path(path), problem
        super().__init__(f"{path}: {problem}")

    def __reduce__(self):
        return type(self), (self.path, self.problem)


def index_name(process: int) -> str:
    return f"index-{process:05d}.jsonl"


def shard_name(process: int, seq: int) -> str:
    return f"shard-{process:05d}-{seq:06d}{SHARD_SUFFIX}"


def new_run_id() -> str:
    """A random identity for a new output folder's run (kept in its manifest and in every shard it writes)."""
    return os.urandom(16).hex()


def source_hash(source: str) -> int:
    """A stable signed 64-bit hash of a source path (any bytes, via surrogateescape)."""
    digest = hashlib.blake2b(source.encode("utf-8", "surrogateescape"), digest_size=8).digest()
    return int.from_bytes(digest, "little", signed=True)


def content_digest(data: bytes | memoryview) -> str:
    """What records keep of their shard's content: ``crc32:XXXXXXXX`` (~1 GB/s; damage, not forgery, is the threat:
    a foreign shard is caught by the run and row binding)."""
    return f"crc32:{zlib.crc32(data):08x}"


# ------------------------------------------------------------------------------------------------ masks


def pack_bits(masks: np.ndarray) -> np.ndarray:
    """(..., H, W) bool -> (..., ceil(H W / 8)) uint8: each mask's pixels row-major, 8 to a byte (`np.packbits`)."""
    masks = np.asarray(masks, bool)
    return np.packbits(masks.reshape(*masks.shape[:-2], masks.shape[-2] * masks.shape[-1]), axis=-1)


def unpack_bits(bits: np.ndarray, size: Sequence[int]) -> np.ndarray:
    """Inverse of `pack_bits`: (..., ceil(H W / 8)) uint8 -> (..., H, W) bool for ``size`` = (H, W)."""
    h, w = (int(s) for s in size)
    return np.unpackbits(np.asarray(bits, np.uint8), axis=-1, count=h * w).astype(bool).reshape(*bits.shape[:-1], h, w)


def inflate(data: bytes | memoryview, size: int) -> bytes | None:
    """``data`` inflated (zlib) if it gives exactly ``size`` bytes, else None; never more than ``size`` bytes are
    allocated, whatever the data claims."""
    d = zlib.decompressobj()
    try:
        out = d.decompress(data, size)
        if not d.eof:
            if d.decompress(d.unconsumed_tail, 1) or not d.eof:
                return None
    except zlib.error:
        return None
    return out if len(out) == size and not d.unused_data else None


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
    """OUT/manifest.json as a dict, None if there is none; `StoreError` if it is not one we wrote (one line, also
    for a folder of an older format)."""
    path = Path(out) / MANIFEST
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
        raise StoreDamage(path, f"damaged ({type(e).__name__}); empty the folder or choose another") from None
    if isinstance(data, dict) and data.get("format") in OLD_FORMATS:
        raise StoreError(
            f"{out} holds explanations of an older format ({data['format']}, this version writes {FORMAT}); "
            "run again into a new folder"
        )
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise StoreError(f"{path} is not a manifest of delib explanations ({FORMAT}); choose another folder")
    return data


def create_manifest(out: str | Path, manifest: Mapping[str, Any]) -> bool:
    """Write OUT/manifest.json only if there is none, atomically also against other processes doing the same (so
    that every process of a run gets one run id): True if this call wrote it."""
    path = Path(out) / MANIFEST
    fd, tmp = tempfile.mkstemp(prefix=f".{MANIFEST}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(manifest, f, indent=1, allow_nan=False)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        try:
            os.link(tmp, path)  # fails if the file exists: the first writer wins
        except FileExistsError:
            return False
        except OSError:  # a file system without hard links
            if path.exists():
                return False
            os.replace(tmp, path)
        return True
    finally:
        Path(tmp).unlink(missing_ok=True)


@dataclass(frozen=True)
class Layout:
    """What the manifest says every shard row holds: C classes, T maps (+1), Q insecurities, masks of crop x crop."""

    run: str
    classes: int
    top: int
    insecurities: int
    crop: int

    @property
    def mask_bytes(self) -> int:
        """Packed bytes of one mask."""
        return -(-self.crop * self.crop // 8)

    def arrays(self) -> dict[str, tuple[str, tuple]]:
        """name -> (safetensors dtype, shape of one row); 'h', 'w' are the maps' size (the same in every array)."""
        c, t, q = self.classes, self.top, self.insecurities
        return {
            "probs": ("F32", (c,)), "difficulty": ("F32", ()), "classes": ("I32", (t,)),
            "maps": ("F32", (t + 1, "h", "w")), "grad_cam": ("F32", ("h", "w")), "pairs": ("I32", (q, 2)),
            "strength": ("F32", (q,)), "coverage": ("F32", (q,)), "threshold": ("F32", (q,)), "valid": ("BOOL", (q,)),
        }  # fmt: skip


def _positive(value: Any, limit: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= limit


def layout(manifest: Mapping[str, Any], path: str | Path = MANIFEST) -> Layout:
    """The `Layout` of a manifest; `StoreDamage` naming ``path`` if it lacks what it needs."""
    try:
        names, settings, run = manifest["class_names"], manifest["settings"], manifest["run"]
        crop, q, top = manifest["input"]["crop"], settings["max_insecurities"], settings.get("top_n")
        ok = isinstance(names, list) and all(isinstance(n, str) for n in names) and 1 <= len(names) <= 1 << 20
        ok = ok and isinstance(run, str) and _RUN.fullmatch(run) is not None and _positive(crop, MAX_CROP)
        top = len(names) if top is None else top
        ok = ok and _positive(top, max(1, len(names))) and _positive(q, max(1, top * (top - 1) // 2))
        ok = ok and all(isinstance(settings.get(k), str) for k in ("score", "method"))
    except (KeyError, TypeError):
        ok = False
    if not ok:
        raise StoreDamage(path, "the manifest lacks or garbles the run id, class names, settings or crop")
    return Layout(run=run, classes=len(names), top=top, insecurities=q, crop=crop)


def _nests_within(value: Any, limit: int = MAX_JSON_DEPTH) -> bool:
    """Whether lists and dicts nest at most ``limit`` deep in ``value`` (a scalar: 0, ``[1]``: 1), stopping at the
    first container past the limit (a plain recursion over what json.loads made: a sixth of a generic walk's time,
    which took half of a resume's start)."""
    kind = type(value)
    if kind is dict:
        items = value.values()
    elif kind is list:
        items = value
    else:
        return True
    if limit <= 0:
        return False
    for v in items:
        if (type(v) is dict or type(v) is list) and not _nests_within(v, limit - 1):
            return False
    return True


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _stat_ok(stat: Any) -> bool:
    return stat is None or (isinstance(stat, list) and len(stat) == 2 and all(_is_int(v) for v in stat))


def _share_ok(q: Mapping[str, Any]) -> bool:
    """An insecurity's readable strength is optional (records written before it lack it), else a number in [0, 1]."""
    v = q.get("share", 0.0)
    return isinstance(v, (int, float)) and not isinstance(v, bool) and 0.0 <= v <= 1.0


def _record(line: str) -> dict[str, Any] | None:
    """An index line as a record, None if it is not one we wrote (torn, not JSON, wrong types, NaN)."""
    try:
        r = json.loads(line)
    except (ValueError, RecursionError):
        return None
    if not isinstance(r, dict) or not _nests_within(r, 3) or not isinstance(r.get("source"), str):
        return None
    if not _is_int(r.get("i")):
        return None
    if not _stat_ok(r.get("stat")):
        return None
    if "skipped" in r:  # a missing file has no stat
        return r if isinstance(r["skipped"], str) else None
    if not isinstance(r.get("stat"), list):
        return None
    try:
        values = [r["confidence"], r["difficulty"], *(v for q in r["insecurities"] for v in (
            q["strength"], q["coverage"], q["threshold"]))]  # fmt: skip
        ok = isinstance(r["shard"], str) and _SHARD.fullmatch(r["shard"]) and _is_int(r["row"])
        ok = ok and isinstance(r["digest"], str) and _DIGEST.fullmatch(r["digest"])
        ok = ok and all(isinstance(v, (int, float)) and math.isfinite(v) for v in values)
        ok = ok and all(_is_int(q[k]) for q in r["insecurities"] for k in ("a", "b"))
        ok = ok and all(_share_ok(q) for q in r["insecurities"])
    except (KeyError, TypeError):
        return None
    return r if ok else None


# An index line exactly as the writer lays it out (`delib_jax.job.writing.make_record`, json.dumps), matched in one
# pass: every such line is one `_record` accepts (finite numbers: at most 20 integer digits and a 2-digit exponent;
# shares in [0, 1]; ints where ints belong), so a resume reads the fields it needs without parsing the rest (18
# us a line against 50 for `_record` on the 2-core CPU). Anything else (older layouts, odd spacing, damage) is parsed.
_STR = r'"[^"\\\x00-\x1f]*(?:\\(?:["\\/bfnrt]|u[0-9a-fA-F]{4})[^"\\\x00-\x1f]*)*"'
_INT = r"-?(?:0|[1-9]\d*)"
_NUM = r"-?(?:0|[1-9]\d{0,19})(?:\.\d+)?(?:[eE][-+]?\d{1,2})?"
_SHARE = r"(?:0(?:\.\d+)?(?:e-\d{1,2})?|1(?:\.0+)?|[1-9](?:\.\d+)?e-0?[1-9]\d?)"
_Q = (rf'\{{"a": {_INT}, "b": {_INT}, "name_a": {_STR}, "name_b": {_STR}, "strength": {_NUM}, "coverage": {_NUM}, '
      rf'"threshold": {_NUM}(?:, "share": {_SHARE})?\}}')  # fmt: skip
_TOP = rf"\[{_INT}, {_NUM}\]"
_LAID_OUT = re.compile(
    rf'\{{"i": (?P<i>{_INT}), "source": (?P<source>{_STR}), "stat": (?:\[(?P<size>{_INT}), (?P<mtime>{_INT})\]|null)'
    rf'(?:, "dataset": {_STR}, "split": {_STR}, "index": {_INT})?, (?:"skipped": (?P<skipped>{_STR})|'
    rf'"prediction": {_INT}, "prediction_name": {_STR}, "confidence": {_NUM}, "difficulty": {_NUM}, '
    rf'"top": \[(?:{_TOP}(?:, {_TOP})*)?\], "insecurities": \[(?:{_Q}(?:, {_Q})*)?\]'
    rf'(?:, "note": {_STR})?(?:, "figure": (?P<figure>{_STR}|null))?, "row": (?P<row>{_INT}), '
    rf'"shard": "(?P<shard>shard-\d{{5}}-\d{{6}}\.safetensors)", "digest": "(?P<digest>crc32:[0-9a-f]{{8}})")\}}\s*'
)


def _string(quoted: str) -> str:
    return quoted[1:-1] if "\\" not in quoted else json.loads(quoted)


def _bookkeeping(line: str) -> dict[str, Any] | None:
    """What a resume needs of an index line (i, source, stat, then skipped, or row, shard, digest and figure when
    present), None if the line is not one `_record` accepts. Lines laid out as the writer writes them are read by
    one regular expression (`_LAID_OUT`); others are parsed whole."""
    m = _LAID_OUT.fullmatch(line)
    if m is None or (m["size"] is None and m["skipped"] is None):
        r = _record(line)
        if r is None:
            return None
        keys = ("i", "source", "stat", "skipped") if "skipped" in r else ("i", "source", "stat", "row", "shard",
                                                                           "digest", "figure")  # fmt: skip
        return {k: r[k] for k in keys if k in r}
    r = {"i": int(m["i"]), "source": _string(m["source"]),
         "stat": None if m["size"] is None else [int(m["size"]), int(m["mtime"])]}  # fmt: skip
    if m["skipped"] is not None:
        r["skipped"] = _string(m["skipped"])
        return r
    r.update(row=int(m["row"]), shard=m["shard"], digest=m["digest"])
    if m["figure"] is not None:  # absent, null or a name
        r["figure"] = None if m["figure"] == "null" else _string(m["figure"])
    return r


def iter_index(path: Path) -> Iterator[tuple[dict[str, Any] | None, str]]:
    """(record or None, raw line) for each non-empty line of one index file."""
    with open(path, encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            if line.strip():
                yield _record(line), line


def _bookkeeping_lines(path: Path) -> Iterator[dict[str, Any] | None]:
    """`_bookkeeping` of each non-empty line of one index file (None for a line that is not a record)."""
    with open(path, encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            if line.strip():
                yield _bookkeeping(line)


def _index_lines(path: Path) -> Iterator[tuple[dict[str, Any] | None, str]]:
    """`iter_index`, an unreadable file as `StoreDamage`."""
    try:
        yield from iter_index(path)
    except OSError as e:
        raise StoreDamage(path, f"cannot be read ({e.strerror or e})") from None


def index_files(out: str | Path) -> list[Path]:
    """OUT/explanations/index-*.jsonl of every process, in process order."""
    d = Path(out) / DIRECTORY
    return sorted(p for p in d.glob("index-*.jsonl") if _INDEX.fullmatch(p.name)) if d.is_dir() else []


def read_records(out: str | Path, *, skipped: bool = False) -> Iterator[dict[str, Any]]:
    """The index records of every process, in order (explained images; with ``skipped`` also skipped ones).
    Damaged lines are left out; no shard is read (`load_explanations` checks records against their shards)."""
    for path in index_files(out):
        for r, _ in iter_index(path):
            if r is not None and (skipped or "skipped" not in r):
                yield r


# ------------------------------------------------------------------------------------------------ shards

_DTYPES = {"F32": np.dtype("<f4"), "I32": np.dtype("<i4"), "BOOL": np.dtype(bool), "U8": np.dtype(np.uint8)}


def encode_shard(arrays: Mapping[str, np.ndarray], metadata: Mapping[str, str]) -> bytes:
    """A shard's bytes (safetensors)."""
    from safetensors.numpy import save

    return save(dict(arrays), metadata=dict(metadata))


def _header(data: memoryview, path: Path) -> tuple[dict[str, Any], int]:
    """The safetensors header of ``data`` (a whole file) and where its data begins, checked against its size."""
    if len(data) < 8:
        raise StoreDamage(path, f"{len(data)} bytes: empty or cut short")
    (size,) = struct.unpack("<Q", data[:8])
    if size > min(MAX_HEADER, len(data) - 8):
        raise StoreDamage(
            path, f"its header claims {size} bytes, the file holds {len(data) - 8}: cut short or not a shard"
        )
    try:
        header = json.loads(bytes(data[8 : 8 + size]))
    except (ValueError, RecursionError):
        raise StoreDamage(path, "its header is not JSON: damaged or not a shard") from None
    if not isinstance(header, dict) or not _nests_within(header, 3):
        raise StoreDamage(path, "its header is not a safetensors header")
    return header, 8 + size


@dataclass
class Shard:
    """One shard read and checked against the folder's `Layout`: n rows, each row's [ordinal, source, fingerprint],
    the content's digest; ``arrays()`` gives the arrays (views of the file's bytes, masks inflated with their known
    size and unpacked to (n, Q, crop, crop) bool)."""

    path: Path
    n: int
    rows: list
    digest: str
    views: dict[str, np.ndarray] = field(repr=False)
    masks_deflated: memoryview = field(repr=False)
    layout: Layout = field(repr=False)

    def arrays(self) -> dict[str, np.ndarray]:
        """The arrays, masks inflated (bounded by their known size) and unpacked."""
        n, q, per = self.n, self.layout.insecurities, self.layout.mask_bytes
        bits = inflate(self.masks_deflated, n * q * per)
        if bits is None:
            raise StoreDamage(self.path, f"its masks do not inflate to the {n * q * per} bytes of {n} x {q} masks")
        c = self.layout.classes
        for name in ("pairs", "classes"):
            v = self.views[name]
            if v.size and (v.min() < 0 or v.max() >= c):
                raise StoreDamage(self.path, f"array {name} holds class indices outside [0, {c})")
        masks = unpack_bits(np.frombuffer(bits, np.uint8).reshape(n, q, per), (self.layout.crop, self.layout.crop))
        return {**self.views, "masks": masks}

    def problem(self, record: Mapping[str, Any]) -> str | None:
        """Why ``record`` may not be served from this shard (None: it may)."""
        row = record["row"]
        if record["digest"] != self.digest:
            return (
                f"its content ({self.digest}) is not what the index recorded ({record['digest']}): changed or replaced"
            )
        if not 0 <= row < self.n:
            return f"row {row} is out of range (the shard holds {self.n} rows)"
        if self.rows[row] != [record["i"], record["source"], record["stat"]]:
            return f"row {row} holds another image than {record['source']!r}"
        return None


def read_shard(path: Path, lay: Layout) -> Shard:
    """Read and check one shard (header, dtypes, shapes against ``lay``, byte ranges, metadata, run, rows);
    `StoreDamage` naming it otherwise. Nothing is allocated beyond the file's own size."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            data = memoryview(f.read())
    except OSError as e:
        raise StoreDamage(path, f"cannot be read ({e.strerror or e})") from None
    header, begin = _header(data, path)
    body = data[begin:]
    meta = header.pop("__metadata__", None)
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise StoreDamage(path, f"not a shard of {FORMAT} (its metadata lacks the format)")
    if meta.get("run") != lay.run:
        raise StoreDamage(path, "written by another run or copied from another folder (its run id differs)")
    if meta.get("name") != path.name:
        raise StoreDamage(path, f"was written as {str(meta.get('name'))[:80]!r}: moved or copied over another shard")
    expected = {**lay.arrays(), "masks_deflated": ("U8", ("m",))}
    if set(header) != set(expected):
        missing, extra = sorted(set(expected) - set(header)), sorted(set(header) - set(expected))
        raise StoreDamage(path, f"arrays missing {missing} or unexpected {extra[:4]}")
    views, bound, spans = {}, {}, []
    n = None
    for name, (dtype, tail) in expected.items():
        entry = header[name]
        try:
            kind, shape, (lo, hi) = entry["dtype"], entry["shape"], entry["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise StoreDamage(path, f"array {name}: its header entry is malformed") from None
        if kind != dtype:
            raise StoreDamage(path, f"array {name} is {kind}, expected {dtype}")
        if not (isinstance(shape, list) and all(_is_int(s) and s >= 0 for s in shape) and _is_int(lo) and _is_int(hi)):
            raise StoreDamage(path, f"array {name}: malformed shape or offsets")
        rows, rest = (shape[0], shape[1:]) if name != "masks_deflated" else (None, shape)
        if len(rest) != len(tail) or (rows is None and name != "masks_deflated"):
            raise StoreDamage(path, f"array {name} has shape {shape}, expected (n, {', '.join(map(str, tail))})")
        for got, want in zip(rest, tail):
            if isinstance(want, str):
                if bound.setdefault(want, got) != got or (want in "hw" and not 1 <= got <= lay.crop):
                    raise StoreDamage(path, f"array {name} has shape {shape}: its maps' size disagrees")
            elif got != want:
                raise StoreDamage(path, f"array {name} has shape {shape}, expected (n, {', '.join(map(str, tail))})")
        if rows is not None:
            if n is None:
                n = rows
            if rows != n:
                raise StoreDamage(path, f"array {name} has {rows} rows, others {n}")
        size = math.prod(shape) * _DTYPES[dtype].itemsize
        if not 0 <= lo <= hi <= len(body) or hi - lo != size:
            raise StoreDamage(path, f"array {name}: its bytes [{lo}, {hi}) do not fit the file or its shape")
        spans.append((lo, hi))
        if name != "masks_deflated":
            views[name] = np.frombuffer(body[lo:hi], _DTYPES[dtype]).reshape(shape)
    spans.sort()
    if spans[0][0] != 0 or spans[-1][1] != len(body) or any(a[1] != b[0] for a, b in zip(spans, spans[1:])):
        raise StoreDamage(path, "its arrays overlap or leave gaps: damaged")
    try:
        rows_meta = json.loads(meta["rows"]) if isinstance(meta.get("rows"), str) else None
    except (ValueError, RecursionError):
        rows_meta = None
    if not (isinstance(rows_meta, list) and len(rows_meta) == n and all(
            isinstance(r, list) and len(r) == 3 and _is_int(r[0]) and isinstance(r[1], str) and _stat_ok(r[2])
            for r in rows_meta)):  # fmt: skip
        raise StoreDamage(path, f"its metadata does not name the image of each of its {n} rows")
    lo, hi = header["masks_deflated"]["data_offsets"]
    return Shard(path, n, rows_meta, content_digest(data), views, body[lo:hi], lay)


class _Shards:
    """Shards of one folder read on demand: the last ``keep`` kept, damaged ones remembered by name (so that each
    is read, and reported, once)."""

    def __init__(self, directory: Path, lay: Layout, keep: int = 2):
        self.directory, self.layout, self.keep = directory, lay, keep
        self._cache: OrderedDict[str, Shard] = OrderedDict()
        self.damaged: dict[str, StoreDamage] = {}

    def get(self, name: str) -> Shard:
        if name in self.damaged:
            raise self.damaged[name]
        shard = self._cache.get(name)
        if shard is None:
            path = self.directory / name
            try:
                if not path.is_file() or path.is_symlink():
                    raise StoreDamage(path, "missing (the index names a shard that is not there)")
                shard = read_shard(path, self.layout)
            except StoreDamage as e:
                self.damaged[name] = e
                raise
            self._cache[name] = shard
            while len(self._cache) > self.keep:
                self._cache.popitem(last=False)
        self._cache.move_to_end(name)
        return shard


def _check(r: Mapping[str, Any], shards: _Shards, where: tuple[Path, int] | None = None) -> Shard:
    """The shard ``r`` may be served from; `StoreDamage` naming the shard (damaged, foreign, or not the content the
    record names) or ``where`` the record is (index file, line) for a problem of the record alone."""
    shard = shards.get(r["shard"])
    problem = shard.problem(r)
    if problem is not None:
        if r["digest"] != shard.digest or where is None:
            raise StoreDamage(shard.path, problem)
        raise StoreDamage(where[0], f"line {where[1]}: {shard.path.name}: {problem}")
    return shard


# ------------------------------------------------------------------------------------------------ reading


def load_explanations(
    out: str | Path,
    *,
    sources: Sequence[str] | None = None,
    skip_damaged: bool = False,
    on_damage: Callable[[StoreDamage], None] | None = None,
) -> Iterator:
    """`Explanation` objects of an output folder, lazily (one shard in memory at a time), in index order.

    ``sources``: only these files (as recorded). Masks are rebuilt exactly from their packed bits. Each row is
    checked against its record (see the module docstring): a damaged or foreign entry raises `StoreDamage` (naming
    the file and what is wrong), or with ``skip_damaged`` is left out and handed to ``on_damage`` (e.g.
    ``damaged.append`` to count them). A folder without a manifest: `FileNotFoundError`; a foreign or older one:
    `StoreError`."""
    wanted = None if sources is None else set(sources)
    where = None if wanted is None else (lambda r: r["source"] in wanted)
    for _, e in iter_explanations(out, where=where, skip_damaged=skip_damaged, on_damage=on_damage):
        yield e


def iter_explanations(
    out: str | Path,
    *,
    where: Callable[[Mapping[str, Any]], bool] | None = None,
    skip_damaged: bool = False,
    on_damage: Callable[[StoreDamage], None] | None = None,
) -> Iterator[tuple[dict[str, Any], Any]]:
    """(index record, `Explanation`) of the records for which ``where(record)`` holds (all: None), streamed as
    `load_explanations` (which it serves): a shard is read only when a chosen record names it, and nothing per
    record is kept but a hash of its source (to refuse a second record of one image)."""
    out = Path(out)
    manifest = read_manifest(out)
    if manifest is None:
        raise FileNotFoundError(f"{out} holds no explanations ({MANIFEST} missing)")
    lay = layout(manifest, out / MANIFEST)
    names = list(manifest["class_names"])
    settings = manifest["settings"]
    shards = _Shards(out / DIRECTORY, lay)
    seen = _Seen()  # hashes of the sources served (flat: 8 bytes an image)
    shard, arrays = None, None

    def damage(e: StoreDamage) -> None:
        if not skip_damaged:
            raise e
        if on_damage is not None:
            on_damage(e)

    for path in index_files(out):
        for lineno, (r, _) in enumerate(_index_lines(path), 1):
            if r is None:
                damage(StoreDamage(path, f"line {lineno} is not a record (torn or damaged)"))
                continue
            if "skipped" in r or (where is not None and not where(r)):
                continue
            h = hash(r["source"])
            if h in seen:
                damage(StoreDamage(path, f"line {lineno}: a second record for {r['source']!r}"))
                continue
            try:
                checked = _check(r, shards, (path, lineno))
                if checked is not shard:
                    try:
                        arrays, shard = checked.arrays(), checked
                    except StoreDamage as e:
                        shards.damaged[r["shard"]] = e  # reported once per record, inflated once
                        raise
            except StoreDamage as e:
                damage(e)
                continue
            seen.add(h)
            yield r, explanation_from_row(arrays, r["row"], names, settings, r["source"])


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


# ------------------------------------------------------------------------------------------------ writing


def disk_full(error: OSError) -> bool:
    return error.errno in (errno.ENOSPC, errno.EDQUOT)


_WRITTEN = {"probs": np.float32, "difficulty": np.float32, "classes": np.int32, "maps": np.float32,
            "grad_cam": np.float32, "pairs": np.int32, "strength": np.float32, "coverage": np.float32,
            "threshold": np.float32, "valid": np.bool_}  # fmt: skip


@dataclass
class ShardWriter:
    """Buffers the rows of one process and writes them as shards of ``shard_size`` images, each followed by its
    index records (see the module docstring for why in that order). Rows hold probs, difficulty, classes, maps,
    grad_cam, pairs, strength, coverage, threshold, valid and mask_bits (n, Q, ceil(H W / 8)) (see `pack_bits`) of
    masks of ``image_size``; records hold at least i, source and stat, which the shard keeps per row with ``run``
    (the manifest's run id); each record gets its shard, row and the shard's digest.

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
    run: str = ""

    def __post_init__(self) -> None:
        if not _RUN.fullmatch(self.run):
            raise ValueError(f"run must be a run id (see new_run_id), got {self.run!r}")
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
            arrays = {k: np.ascontiguousarray(np.concatenate([a[k] for a in self._arrays]), dtype)
                      for k, dtype in _WRITTEN.items()}  # fmt: skip
            bits = np.concatenate([a["mask_bits"] for a in self._arrays])
            arrays["masks_deflated"] = np.frombuffer(zlib.compress(bits.tobytes(), 1), np.uint8)
            rows = [[r["i"], r["source"], r["stat"]] for r in records]
            meta = {"format": FORMAT, "run": self.run, "name": name, "rows": json.dumps(rows)}
            data = encode_shard(arrays, meta)
            atomic_write(self.directory / name, lambda f: f.write(data))
            self.bytes_written += len(data)
            digest = content_digest(data)
            for r in records:
                r["shard"], r["digest"] = name, digest
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


# ------------------------------------------------------------------------------------------------ resuming


def _hashed_in(hashes: np.ndarray, source: object) -> bool:
    """Whether ``source`` is among the sources whose `source_hash` values ``hashes`` (sorted) holds."""
    if not isinstance(source, str) or not len(hashes):
        return False
    h = source_hash(source)
    i = int(hashes.searchsorted(h))
    return i < len(hashes) and int(hashes[i]) == h


@dataclass(frozen=True)
class SourceSet:
    """A set of sources in flat memory: ``source in s`` looks up a sorted array of their 64-bit hashes (8 bytes a
    source, as `Resume`); made from any iterable with `of`, which keeps nothing else."""

    hashes: np.ndarray

    @classmethod
    def of(cls, sources: Iterable[str]) -> SourceSet:
        return cls(np.unique(np.fromiter((source_hash(s) for s in sources), np.int64)))

    def __contains__(self, source: object) -> bool:
        return _hashed_in(self.hashes, source)

    def __len__(self) -> int:
        return len(self.hashes)


@dataclass
class Resume:
    """What a resume found done, in flat memory: ``source in resume`` (a sorted array of 64-bit hashes of the kept
    sources, 8 bytes per image), how many are explained, the skipped ones with their reasons, the next shard number."""

    hashes: np.ndarray
    explained: int
    skipped: list[tuple[str, str]]
    next_seq: int

    def __contains__(self, source: object) -> bool:
        return _hashed_in(self.hashes, source)

    def __len__(self) -> int:
        return len(self.hashes)


class _Seen:
    """A growing set of 64-bit hashes in flat memory: a sorted array, and the last few thousand in a small set that
    is merged into it when full (a set of 100,000 Python ints is 7 MB of small objects, scattered among what a
    resume reads, which the process does not give back)."""

    def __init__(self, buffer: int = 4096):
        self.sorted = np.zeros(0, np.int64)
        self.recent: set[int] = set()
        self.buffer = buffer

    def __contains__(self, h: int) -> bool:
        if h in self.recent:
            return True
        k = int(self.sorted.searchsorted(h))
        return k < len(self.sorted) and int(self.sorted[k]) == h

    def add(self, h: int) -> None:
        self.recent.add(h)
        if len(self.recent) >= self.buffer:
            self._merge()

    def _merge(self) -> None:
        if self.recent:
            more = np.fromiter(self.recent, np.int64, len(self.recent))
            self.sorted = np.sort(np.concatenate([self.sorted, more]))  # a hash added twice is there twice
            self.recent.clear()

    def array(self) -> np.ndarray:
        """Every hash added, sorted, each once."""
        self._merge()
        return np.unique(self.sorted)


def _rewrite(path: Path, keep: bytearray) -> None:
    """Rewrite an index keeping the non-empty lines whose flag in ``keep`` is set, streamed line by line to a
    temporary file that then replaces it."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", errors="surrogateescape") as out:
            with open(path, encoding="utf-8", errors="surrogateescape") as f:
                j = 0
                for line in f:
                    if line.strip():
                        if j < len(keep) and keep[j]:
                            out.write(line if line.endswith("\n") else line + "\n")
                        j += 1
            out.flush()
            os.fsync(out.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def open_index(
    directory: Path, process: int, *, keep: Callable[[dict[str, Any]], bool], report: Callable[[str], None]
) -> Resume:
    """Read the index of ``process`` for a resume (OUT/explanations, OUT/manifest.json must be there): returns a
    `Resume`. Lines that are damaged, duplicated, that ``keep`` rejects (input changed since, figure missing), or
    whose shard is missing, damaged or foreign (one line reported per such file) are dropped, and the file
    rewritten without them; shards no kept record names are deleted. Never refuses to go on because of a stored
    file: what cannot be used is explained again. ``keep`` sees each valid record's bookkeeping only
    (`_bookkeeping`: i, source, stat, then skipped, or row, shard, digest and figure when present)."""
    directory = Path(directory)
    path = directory / index_name(process)
    lay = layout(read_manifest(directory.parent) or {}, directory.parent / MANIFEST)
    shards = _Shards(directory, lay)
    flags = bytearray()
    seen = _Seen()
    used: set[str] = set()
    skipped: list[tuple[str, str]] = []
    explained = dropped = 0
    problems: dict[str, list] = {}  # shard name -> [problem, images], in order of discovery
    if path.is_file() and not path.is_symlink():
        for r in _bookkeeping_lines(path):
            ok = r is not None and keep(r)
            if ok:
                h = source_hash(r["source"])
                ok = h not in seen
            if ok and "skipped" not in r:
                try:
                    _check(r, shards)
                except StoreDamage as e:
                    entry = problems.setdefault(r["shard"], [e.problem, 0])
                    entry[1] += 1
                    ok = False
            flags.append(ok)
            if not ok:
                dropped += 1
                continue
            seen.add(h)
            if "skipped" in r:
                skipped.append((r["source"], r["skipped"]))
            else:
                explained += 1
                used.add(r["shard"])
    for name, (problem, count) in problems.items():
        report(f"{directory / name}: {problem}; explaining its {count} image(s) again")
    if dropped:
        report(f"{path}: dropped {dropped} record(s) (torn, damaged, stale, duplicated or missing their files); "
               "redoing them")  # fmt: skip
        _rewrite(path, flags)
    del flags
    hashes = seen.array()
    del seen
    seq = -1
    for p in directory.glob(f"shard-{process:05d}-*"):
        m = _SHARD.fullmatch(p.name)
        if m and p.name not in used:
            p.unlink(missing_ok=True)  # written by a run killed before its records were appended, or damaged
        elif m:
            seq = max(seq, int(m.group(2)))
    return Resume(hashes, explained, skipped, seq + 1)


# ------------------------------------------------------------------------------------------------ verifying


@dataclass
class Verdict:
    """What `verify_folder` found: counts, ``problems`` (damage, one line each) and ``notes`` (harmless leftovers)."""

    records: int = 0
    skipped: int = 0
    shards: int = 0
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def stored_bytes(out: str | Path) -> int:
    """Bytes of the index files and shards of an output folder (what `verify_folder` reads)."""
    d = Path(out) / DIRECTORY
    if not d.is_dir():
        return 0
    return sum(p.stat().st_size for p in d.iterdir() if p.is_file() and (_INDEX.fullmatch(p.name) or
                                                                       p.name.startswith("shard-")))  # fmt: skip


def _readable_lines(path: Path, problems: list[str]) -> Iterator[tuple[dict[str, Any] | None, str]]:
    """`iter_index`, an unreadable file added to ``problems``."""
    try:
        yield from iter_index(path)
    except OSError as e:
        problems.append(f"{path}: cannot be read ({e.strerror or e})")


def verify_folder(out: str | Path, *, progress: Callable[[int], None] = lambda n: None) -> Verdict:
    """Check a whole output folder without a model: the manifest, every index line, every shard (header, dtypes,
    shapes, byte ranges, run, rows, digest, masks), every record against its shard, no image twice. ``progress``
    gets the bytes read as they are. `FileNotFoundError` if OUT holds no manifest, `StoreError` for a folder of
    another format (not damage: nothing to check)."""
    out = Path(out)
    verdict = Verdict()
    try:
        manifest = read_manifest(out)
    except StoreDamage as e:
        verdict.problems.append(str(e))
        return verdict
    if manifest is None:
        raise FileNotFoundError(f"{out} holds no explanations ({MANIFEST} missing)")
    try:
        lay = layout(manifest, out / MANIFEST)
    except StoreDamage as e:
        verdict.problems.append(str(e))
        return verdict
    directory = out / DIRECTORY
    shards = _Shards(directory, lay, keep=1)
    seen = _Seen()  # hashes of the sources read, not their records
    used: set[str] = set()
    whole: dict[str, list] = {}  # shard name -> [problem, records]
    inflated: set[str] = set()
    for path in index_files(out):
        for lineno, (r, line) in enumerate(_readable_lines(path, verdict.problems), 1):
            progress(len(line.encode("utf-8", "surrogateescape")))
            where = f"{path}: line {lineno}"
            if r is None:
                verdict.problems.append(f"{where} is not a record (torn or damaged)")
                continue
            h = source_hash(r["source"])
            if h in seen:
                verdict.problems.append(f"{where}: a second record for {r['source']!r}")
                continue
            seen.add(h)
            if "skipped" in r:
                verdict.skipped += 1
                continue
            verdict.records += 1
            name = r["shard"]
            used.add(name)
            if name in whole:
                whole[name][1] += 1
                continue
            fresh = name not in shards.damaged and name not in inflated
            try:
                shard = shards.get(name)
                if name not in inflated:
                    inflated.add(name)
                    progress(shard.path.stat().st_size)
                    shard.arrays()  # masks inflate to their size, class indices in range
            except StoreDamage as e:
                if fresh:
                    progress(e.path.stat().st_size if e.path.is_file() else 0)
                shards.damaged.setdefault(name, e)
                whole[name] = [str(e), 1]
                continue
            problem = shard.problem(r)
            if problem is not None and r["digest"] != shard.digest:  # the shard's content: one line for the shard
                whole[name] = [f"{shard.path}: {problem}", 1]
            elif problem is not None:
                verdict.problems.append(f"{where}: {shard.path.name}: {problem}")
    verdict.problems.extend(f"{problem} ({count} record(s) cannot be served)" for problem, count in whole.values())
    verdict.shards = len(used)
    if directory.is_dir():
        for p in sorted(directory.iterdir()):
            if p.name.startswith("shard-") and p.name not in used:
                progress(p.stat().st_size if p.is_file() else 0)
                what = "not a shard of this format" if not _SHARD.fullmatch(p.name) else "named by no record"
                verdict.notes.append(f"{p}: {what} (left by a killed run or copied in; the next run deletes it)")
    return verdict


__all__ = [
    "DIRECTORY", "FORMAT", "MANIFEST", "Resume", "Shard", "ShardWriter", "SourceSet", "StoreDamage", "StoreError",
    "Verdict", "create_manifest", "index_files", "iter_explanations", "load_explanations", "new_run_id", "open_index",
    "pack_bits", "read_manifest", "read_records", "read_shard", "unpack_bits", "verify_folder",
]  # fmt: skip
