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
                                          fingerprint] of the image the row belongs to and the checksums of its
                                          record; the checksums of its arrays' bytes and of its own header

Why safetensors: its header declares every array's dtype, shape and byte range before any data, so a reader checks
them (against the manifest's settings, and against the file's size) before it allocates anything, and the header's
free-form metadata carries the binding of each row to its image and run. There is no archive layer (npz is a zip:
a directory whose sizes can lie, members that inflate without bound), no pickle, and other tools (the safetensors
library, in any language) read the arrays. The only compressed array, the mask bits, has an inflated size known from
the rows and the manifest, and is inflated with that bound.

What a reader guarantees (`load_explanations`, `open_index`, `verify_folder`): a row is served only when its
record and its shard agree: the shard's content has the digest the record names (crc32 of the whole file: damage,
truncation or a shard replaced by another), the shard belongs to this folder's run, the row is in range and holds
the record's image (source, fingerprint, ordinal), the record's content is the one the shard keeps a checksum of,
and no image has two records; the shard passes its own checksums (of its header and of its arrays: damage in any
array, its masks included, is found even where the digest was fixed up) and the manifest its own. Anything else is
a `StoreDamage` naming the file and what is wrong: the shard, or the index file and line where the record is the
side that is wrong. The three views judge with one function (`_Judge`), so verify flags exactly what the reader
refuses, and the resume explains exactly that again. A folder whose manifest says it holds explanations never
reads as an empty one: its explanations folder missing, a file, a link or unreadable is damage naming it.

A shard is written whole (to a temporary name, then renamed) before its records are appended to the index, so the
index never names a shard that is not complete; a killed run leaves at most a torn last line and an unreferenced
shard, both dropped by `open_index` on the next run, which also re-explains images whose stored results are
damaged or foreign.
"""

from __future__ import annotations

import errno
import functools
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
_HEX = re.compile(r"[0-9a-f]*")
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


_POLY = 0xEDB88320  # crc32's polynomial, reflected (zlib's crc32_combine, in Python)


def _multmodp(a: int, b: int) -> int:
    """a x b modulo the crc32 polynomial (a != 0)."""
    m, p = 1 << 31, 0
    while True:
        if a & m:
            p ^= b
            if not a & (m - 1):
                return p
        m >>= 1
        b = (b >> 1) ^ _POLY if b & 1 else b >> 1


_X2N = [1 << 30]  # x^(2^k)
for _ in range(31):
    _X2N.append(_multmodp(_X2N[-1], _X2N[-1]))


@functools.lru_cache(maxsize=256)
def _x8n(n: int) -> int:
    """x^(8 n) modulo the crc32 polynomial: n zero bytes run through the register."""
    p, k = 1 << 31, 3
    while n:
        if n & 1:
            p = _multmodp(_X2N[k & 31], p)
        n >>= 1
        k += 1
    return p


def crc32_combine(crc1: int, crc2: int, length2: int) -> int:
    """The crc32 of A + B from crc32(A), crc32(B) and len(B) (zlib's crc32_combine): a shard's bytes are run through
    crc32 once, for its own checksum of its arrays and for the digest of the whole file its records name."""
    return _multmodp(_x8n(length2), crc1) ^ crc2


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
    """``root/name`` created if needed; `StoreError` naming it if it is a link, leads outside ``root``, is a file or
    cannot be listed."""
    path = root / name
    _no_follow(path, root)
    try:
        path.mkdir(exist_ok=True)
    except FileExistsError:
        raise StoreError(f"{path} is a file, not a folder: it is in the way of delib explain's {name} folder (move "
                         "it away)") from None  # fmt: skip
    _no_follow(path, root)
    try:
        with os.scandir(path) as entries:
            next(entries, None)
    except OSError as e:
        raise StoreError(f"{path} cannot be read ({e.strerror or e}): give delib explain access to it") from None
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


def manifest_check(manifest: Mapping[str, Any]) -> str:
    """The checksum a manifest carries of itself (its ``check``: crc32 of its JSON, keys sorted, less the check):
    a damaged manifest is told apart from one of other settings, and repaired by a resume instead of refused."""
    body = {k: v for k, v in manifest.items() if k != "check"}
    return content_digest(json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=False).encode())


def read_manifest(out: str | Path) -> dict[str, Any] | None:
    """OUT/manifest.json as a dict, None if there is none; `StoreDamage` if it is damaged (not JSON, not what its
    checksum says, a folder or a link in its place), `StoreError` if it is not one we wrote (one line, also for a
    folder of an older format)."""
    path = Path(out) / MANIFEST
    if path.is_symlink() or (path.exists() and not path.is_file()):
        raise StoreDamage(path, "not a file (a folder or a link, which delib explain never writes): move it away")
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
        raise StoreDamage(path, f"damaged ({type(e).__name__})") from None
    if isinstance(data, dict) and data.get("format") in OLD_FORMATS:
        raise StoreError(
            f"{out} holds explanations of an older format ({data['format']}, this version writes {FORMAT}); "
            "run again into a new folder"
        )
    if isinstance(data, dict) and "check" in data:
        try:
            intact = data["check"] == manifest_check(data)
        except (TypeError, ValueError):
            intact = False
        if not intact:
            raise StoreDamage(path, "damaged (its content is not what its checksum says)")
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise StoreError(f"{path} is not a manifest of delib explanations ({FORMAT}); choose another folder")
    return data


def sealed_manifest(manifest: Mapping[str, Any]) -> dict[str, Any]:
    """``manifest`` with its checksum (``check``, `manifest_check`), as the job writes it."""
    return {**{k: v for k, v in manifest.items() if k != "check"}, "check": manifest_check(manifest)}


def _write_manifest(path: Path, manifest: Mapping[str, Any]) -> str:
    """``manifest`` into a temporary file beside ``path``; returns the temporary's name."""
    fd, tmp = tempfile.mkstemp(prefix=f".{MANIFEST}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(manifest, f, indent=1, allow_nan=False)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return tmp


def create_manifest(out: str | Path, manifest: Mapping[str, Any]) -> bool:
    """Write OUT/manifest.json only if there is none, atomically also against other processes doing the same (so
    that every process of a run gets one run id): True if this call wrote it. The job writes it `sealed_manifest`."""
    path = Path(out) / MANIFEST
    tmp = _write_manifest(path, manifest)
    try:
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


def replace_manifest(out: str | Path, manifest: Mapping[str, Any]) -> None:
    """Put ``manifest`` in place of a damaged OUT/manifest.json, atomically."""
    path = Path(out) / MANIFEST
    tmp = _write_manifest(path, manifest)
    try:
        os.replace(tmp, path)
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


def _finite_number(v: Any) -> bool:
    """A JSON number (or true/false, as before) that is finite."""
    t = type(v)
    return t is int or t is bool or (t is float and math.isfinite(v))


def _record(line: str) -> dict[str, Any] | None:
    """An index line as a record, None if it is not one we wrote (torn, not JSON, wrong types, NaN). (Checked with
    exact types: json.loads makes no subclasses.)"""
    try:
        r = json.loads(line)
    except (ValueError, RecursionError):
        return None
    if type(r) is not dict or type(r.get("source")) is not str or type(r.get("i")) is not int:
        return None
    if not _nests_within(r, 3) or not _stat_ok(r.get("stat")):
        return None
    if "skipped" in r:  # a missing file has no stat
        return r if type(r["skipped"]) is str else None
    if type(r.get("stat")) is not list:
        return None
    try:
        shard, row, digest = r["shard"], r["row"], r["digest"]
        if not (type(shard) is str and _SHARD.fullmatch(shard) and type(row) is int and type(digest) is str and
                _DIGEST.fullmatch(digest)):  # fmt: skip
            return None
        if not (_finite_number(r["confidence"]) and _finite_number(r["difficulty"])):
            return None
        for q in r["insecurities"]:
            if not (_finite_number(q["strength"]) and _finite_number(q["coverage"]) and
                    _finite_number(q["threshold"])):  # fmt: skip
                return None
            if type(q["a"]) is not int or type(q["b"]) is not int:
                return None
            share = q.get("share", 0.0)
            if (type(share) is not float and type(share) is not int) or not 0.0 <= share <= 1.0:
                return None
    except (KeyError, TypeError):
        return None
    return r


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


def _bookkeeping_lines(path: Path) -> Iterator[tuple[dict[str, Any] | None, str]]:
    """(`_bookkeeping` of the line or None, raw line) for each non-empty line of one index file."""
    with open(path, encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            if line.strip():
                yield _bookkeeping(line), line


def _index_problem(path: Path) -> str | None:
    """Why an index file cannot be read as one (a link, a folder), None if it is a file."""
    if path.is_symlink():
        return "cannot be read: a symbolic link, which delib explain never writes (move it away)"
    if not path.is_file():
        return "cannot be read (not a file: move it away)"
    return None


def _index_lines(path: Path) -> Iterator[tuple[dict[str, Any] | None, str]]:
    """`iter_index`, a file that is not one or cannot be read as `StoreDamage`."""
    problem = _index_problem(path)
    if problem is not None:
        raise StoreDamage(path, problem)
    try:
        yield from iter_index(path)
    except OSError as e:
        raise StoreDamage(path, f"cannot be read ({e.strerror or e})") from None


def _listing(out: str | Path) -> tuple[Path, list[str]]:
    """OUT/explanations and the names in it, checked: a folder whose manifest says it holds explanations never reads
    as an empty one. `StoreDamage` naming the folder if it is a link (delib explain never writes one), missing
    while the manifest is there, a file, or cannot be listed; no manifest and no folder: nothing."""
    out = Path(out)
    path = out / DIRECTORY
    if path.is_symlink():
        target, root = os.path.realpath(path), os.path.realpath(out)
        where = "" if target.startswith(root.rstrip(os.sep) + os.sep) else f" out of {out}"
        raise StoreDamage(path, f"a symbolic link{where} (to {target}): delib explain keeps its results in a folder "
                                "of its own, never behind a link; move it away")  # fmt: skip
    if not path.exists():
        if (out / MANIFEST).exists() or (out / MANIFEST).is_symlink():
            raise StoreDamage(path, "missing, although the manifest says this folder holds explanations")
        return path, []
    if not path.is_dir():
        raise StoreDamage(path, "not a folder (a file is in its place): move it away")
    try:
        return path, os.listdir(path)
    except OSError as e:
        raise StoreDamage(path, f"cannot be read ({e.strerror or e})") from None


def index_files(out: str | Path) -> list[Path]:
    """OUT/explanations/index-*.jsonl of every process, in process order; `StoreDamage` naming OUT/explanations if
    it is not a folder that can be read (see `_listing`)."""
    directory, names = _listing(out)
    return sorted(directory / n for n in names if _INDEX.fullmatch(n))


def read_records(out: str | Path, *, skipped: bool = False) -> Iterator[dict[str, Any]]:
    """The index records of every process, in order (explained images; with ``skipped`` also skipped ones).
    Damaged lines are left out; no shard is read (`load_explanations` checks records against their shards)."""
    for path in index_files(out):
        for r, _ in _index_lines(path):
            if r is not None and (skipped or "skipped" not in r):
                yield r


# ------------------------------------------------------------------------------------------------ shards

_DTYPES = {"F32": np.dtype("<f4"), "I32": np.dtype("<i4"), "BOOL": np.dtype(bool), "U8": np.dtype(np.uint8)}


BOOKKEEPING = ("figure", "row", "shard", "digest")  # where a record's result is stored: last in its line, in this order


def _content_text(record: Mapping[str, Any]) -> str:
    """A record as the writer lays out its line, up to where its result is stored (`BOOKKEEPING`): what the shard's
    checksum of the record covers."""
    return json.dumps({k: v for k, v in record.items() if k not in BOOKKEEPING}, allow_nan=False)[:-1]


def _bare(record: Mapping[str, Any]) -> dict[str, Any]:
    """A record as one written before the index held shares: its insecurities without ``share``."""
    return {**record, "insecurities": [{k: v for k, v in q.items() if k != "share"} for q in record["insecurities"]]}


def _content_crc(record: Mapping[str, Any]) -> int:
    return zlib.crc32(_content_text(record).encode("utf-8", "surrogateescape"))


def _content_matches(record: Mapping[str, Any], line: str, expected: tuple[int, int]) -> bool:
    """Whether an index line's record has the content whose checksums (as written, and without its shares: as a
    record of before shares reads) its shard keeps: the line as the writer lays it out is checked as it is (a crc32
    of its first part), a line laid out otherwise (rewritten by another tool) by its parsed record."""
    cut = line.rfind(', "row": ')  # near the end: found at once
    if cut > 0:
        tail = f', "row": {record["row"]}, "shard": "{record["shard"]}", "digest": "{record["digest"]}"}}'
        if "figure" in record:  # before the row: look only a little way back
            figure = line.rfind(', "figure": ', max(0, cut - 1024), cut)
            tail = f', "figure": {json.dumps(record["figure"])}{tail}'
            cut = figure
        end = len(line) - 1 if line.endswith("\n") else len(line)
        if cut > 0 and end - cut == len(tail) and line.startswith(tail, cut):  # nothing else after the content
            if zlib.crc32(line[:cut].encode("utf-8", "surrogateescape")) == expected[0]:
                return True
    full = record if "prediction" in record else _record(line)  # a resume reads only the bookkeeping
    if full is None:
        return False
    try:
        if any("share" in q for q in full["insecurities"]):
            return _content_crc(full) == expected[0]
        return _content_crc(_bare(full)) == expected[1]
    except ValueError:
        return False


def _header_check(tensors: Mapping[str, Any], meta: Mapping[str, Any]) -> str:
    """A shard's checksum of its own header: crc32 of its JSON (keys sorted), less the checksum itself."""
    header = {"__metadata__": {k: v for k, v in meta.items() if k != "check"}, **tensors}
    return content_digest(json.dumps(header, sort_keys=True, separators=(",", ":")).encode())


def encode_shard(arrays: Mapping[str, np.ndarray], metadata: Mapping[str, str]) -> bytes:
    """A shard's bytes (safetensors), sealed: its metadata holds ``body``, the crc32 of its arrays' bytes, and
    ``check``, the crc32 of its header less this one (`_header_check`), so that a reader tells a damaged shard from
    a record that names it wrongly."""
    from safetensors.numpy import save

    meta = {k: v for k, v in metadata.items() if k not in ("body", "check")}
    first = save(dict(arrays), metadata=meta)
    (size,) = struct.unpack("<Q", first[:8])
    meta["body"] = f"crc32:{zlib.crc32(memoryview(first)[8 + size :]):08x}"
    tensors = {k: v for k, v in json.loads(first[8 : 8 + size]).items() if k != "__metadata__"}
    meta["check"] = _header_check(tensors, meta)
    return save(dict(arrays), metadata=meta)  # the same arrays at the same offsets: only the metadata grew


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


_FINITE = ("probs", "difficulty", "maps", "grad_cam", "strength", "coverage")  # as the job checks its outputs


@dataclass
class Shard:
    """One shard read and checked against the folder's `Layout` (`read_shard`: its header, metadata and rows):
    n rows, each row's [ordinal, source, fingerprint], the digest of the whole file; ``check()`` checks the rest
    (masks inflated to their known size, class indices, finite values and, for a shard written with them
    (``sealed``), its own checksums of its header and arrays); ``records``: the checksums of each row's record (as
    written, and without its shares, as a record written before them reads).
    ``arrays()`` gives the arrays (views of the file's bytes, masks unpacked to (n, Q, crop, crop) bool)."""

    path: Path
    n: int
    rows: list
    digest: str
    views: dict[str, np.ndarray] = field(repr=False)
    masks_deflated: memoryview = field(repr=False)
    layout: Layout = field(repr=False)
    sealed: bool = False
    records: list[tuple[int, int]] | None = field(default=None, repr=False)
    seals: tuple = field(default=(), repr=False)  # (header entries, metadata, crc32 of the arrays' bytes)
    bits: bytes | None = field(default=None, repr=False)

    def check(self) -> Shard:
        """The shard's content checked (once): masks, class indices, finite values, its own checksums;
        `StoreDamage` naming it otherwise."""
        if self.bits is not None:
            return self
        path, n, lay, views = self.path, self.n, self.layout, self.views
        q, per = lay.insecurities, lay.mask_bytes
        bits = inflate(self.masks_deflated, n * q * per)
        if bits is None:
            raise StoreDamage(path, f"its masks do not inflate to the {n * q * per} bytes of {n} x {q} masks")
        c = lay.classes
        for name in ("pairs", "classes"):
            v = views[name]
            if v.size and (v.min() < 0 or v.max() >= c):
                raise StoreDamage(path, f"array {name} holds class indices outside [0, {c})")
        if views["valid"].size and views["valid"].view(np.uint8).max() > 1:
            raise StoreDamage(path, "array valid holds bytes other than 0 and 1")
        for name in _FINITE:
            if not np.isfinite(views[name]).all():
                raise StoreDamage(path, f"array {name} holds values that are not finite (the job never stores those)")
        if self.sealed:
            tensors, meta, body_crc = self.seals
            if meta.get("check") != _header_check(tensors, meta):
                raise StoreDamage(path, "its header is not the one it was written with (its checksum differs): damaged")
            if meta.get("body") != f"crc32:{body_crc:08x}":
                raise StoreDamage(path, "its arrays are not the bytes they were written as (their checksum differs): "
                                        "damaged")  # fmt: skip
        self.bits = bits
        return self

    def arrays(self) -> dict[str, np.ndarray]:
        """The arrays, masks unpacked (`check` first)."""
        bits = self.check().bits
        n, q, per = self.n, self.layout.insecurities, self.layout.mask_bytes
        masks = unpack_bits(np.frombuffer(bits, np.uint8).reshape(n, q, per), (self.layout.crop,) * 2)
        return {**self.views, "masks": masks}

    def problem(self, record: Mapping[str, Any], line: str | None = None) -> tuple[str, bool] | None:
        """Why ``record`` (its index ``line``) may not be served from this shard (`check`ed): (what is wrong,
        whether it is the record (else the shard)); None: it may. A sealed shard has passed its own checksums, so
        whatever disagrees with it is the record's fault."""
        row = record["row"]
        if record["digest"] != self.digest:
            if self.sealed:
                return f"its digest ({record['digest']}) is not that of the shard ({self.digest})", True
            return (
                f"its content ({self.digest}) is not what the index recorded ({record['digest']}): changed or "
                "replaced (it carries no checksum of its own: the shard or the record)", False
            )  # fmt: skip
        if not 0 <= row < self.n:
            return f"row {row} is out of range (the shard holds {self.n} rows)", True
        if self.rows[row] != [record["i"], record["source"], record["stat"]]:
            return f"row {row} holds another image than {record['source']!r}", True
        if self.records is not None and line is not None and not _content_matches(record, line, self.records[row]):
            return f"its content is not the record the shard keeps a checksum of (row {row})", True
        return None


def read_shard(path: Path, lay: Layout) -> Shard:
    """Read and check one shard: header, dtypes, shapes against ``lay``, byte ranges, metadata, run, rows (the
    rest: `Shard.check`); `StoreDamage` naming it otherwise. Nothing is allocated beyond the file's own size."""
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
    records = meta.get("records")
    if records is not None:
        if not (isinstance(records, str) and len(records) == 16 * n and _HEX.fullmatch(records)):
            raise StoreDamage(path, f"its metadata does not hold the checksums of each of its {n} rows' records")
        crcs = np.frombuffer(bytes.fromhex(records), ">u4").reshape(n, 2).tolist()
        records = [(a, b) for a, b in crcs]
    body_crc = zlib.crc32(body)
    digest = f"crc32:{crc32_combine(zlib.crc32(data[:begin]), body_crc, len(body)):08x}"  # of the whole file
    lo, hi = header["masks_deflated"]["data_offsets"]
    sealed = "check" in meta or "body" in meta
    return Shard(path, n, rows_meta, digest, views, body[lo:hi], lay, sealed, records, (header, meta, body_crc))


class _Shards:
    """Shards of one folder read on demand: the last ``keep`` kept, damaged ones remembered by name (so that each
    is read, and reported, once); ``on_read(size)`` is told of every file read."""

    def __init__(self, directory: Path, lay: Layout, keep: int = 2, on_read: Callable[[int], None] | None = None):
        self.directory, self.layout, self.keep, self.on_read = directory, lay, keep, on_read
        self._cache: OrderedDict[str, Shard] = OrderedDict()
        self._last: Shard | None = None
        self.damaged: dict[str, StoreDamage] = {}

    def get(self, name: str) -> Shard:
        last = self._last
        if last is not None and last.path.name == name:  # the common case: a shard's records one after another
            return last
        if name in self.damaged:
            raise self.damaged[name]
        shard = self._cache.get(name)
        if shard is None:
            path = self.directory / name
            try:
                if path.is_symlink():
                    raise StoreDamage(path, "a symbolic link, which delib explain never writes: not read")
                if not path.exists():
                    raise StoreDamage(path, "missing (the index names a shard that is not there)")
                if not path.is_file():
                    raise StoreDamage(path, "not a file (a folder in its place): cannot be read")
                if self.on_read is not None:
                    self.on_read(path.stat().st_size)
                shard = read_shard(path, self.layout).check()
            except StoreDamage as e:
                self.damaged[name] = e
                raise
            self._cache[name] = shard
            while len(self._cache) > self.keep:
                self._cache.popitem(last=False)
        self._cache.move_to_end(name)
        self._last = shard
        return shard


class _Judge:
    """THE judgement of index lines, in order, made the same way by the reader (`iter_explanations`),
    `verify_folder` and a resume (`open_index`): ``judge(record, line, index file, line number)`` is the shard an
    explained image's record may be served from (None for a skipped image's record), or `StoreDamage` naming the
    side that is wrong: the index line (not a record, a second record of an image that already has one, or a
    record whose row, image, digest or content disagrees with its intact shard: the index file and line) or the
    shard (missing, damaged or foreign in its file, header, metadata, arrays or masks: its path, the same damage
    for every record naming it). ``key`` hashes a source (8 bytes an image are kept)."""

    def __init__(self, shards: _Shards, key: Callable[[str], int] = hash):
        self.shards, self.key, self.seen = shards, key, _Seen()

    def __call__(self, r: Mapping[str, Any] | None, line: str, path: Path, lineno: int) -> Shard | None:
        if r is None:
            raise StoreDamage(path, f"line {lineno} is not a record (torn or damaged)")
        h = self.key(r["source"])
        if h in self.seen:
            raise StoreDamage(path, f"line {lineno}: a second record for {r['source']!r}")
        if "skipped" in r:
            self.seen.add(h)
            return None
        shard = self.shards.get(r["shard"])
        found = shard.problem(r, line)
        if found is not None:
            problem, the_record = found
            if not the_record:
                raise StoreDamage(shard.path, problem)
            who = "the record is wrong (the shard is intact)" if shard.sealed else "the record or its shard is wrong"
            raise StoreDamage(path, f"line {lineno}: {shard.path.name}: {problem}; {who}")
        self.seen.add(h)
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
    record is kept but a hash of its source (to refuse a second record of one image). Every line is judged as
    `verify_folder` and a resume judge it (`_Judge`); a damaged manifest or explanations folder (nothing can be
    served) raises `StoreDamage` even with ``skip_damaged``."""
    out = Path(out)
    manifest = read_manifest(out)
    if manifest is None:
        raise FileNotFoundError(f"{out} holds no explanations ({MANIFEST} missing)")
    lay = layout(manifest, out / MANIFEST)
    names = list(manifest["class_names"])
    settings = manifest["settings"]
    paths = index_files(out)
    judge = _Judge(_Shards(out / DIRECTORY, lay))
    shard, arrays = None, None

    def damage(e: StoreDamage) -> None:
        if not skip_damaged:
            raise e
        if on_damage is not None:
            on_damage(e)

    for path in paths:
        try:
            for lineno, (r, line) in enumerate(_index_lines(path), 1):
                if r is not None and where is not None and not where(r):
                    continue
                try:
                    found = judge(r, line, path, lineno)
                except StoreDamage as e:
                    damage(e)  # raises it without skip_damaged (and the handler below raises it again)
                    continue
                if found is None:  # a skipped image
                    continue
                if found is not shard:
                    arrays, shard = found.arrays(), found
                yield r, explanation_from_row(arrays, r["row"], names, settings, r["source"])
        except StoreDamage as e:  # the file is not one, or cannot be read
            damage(e)


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


def _laid_out(record: Mapping[str, Any]) -> dict[str, Any]:
    """A record with where its result is stored last (`BOOKKEEPING`, in that order), as its shard's checksum of it
    expects (`_content_text`) and the resume's fast read (`_LAID_OUT`) reads it."""
    if not any(k in record for k in BOOKKEEPING):
        return dict(record)
    return {**{k: v for k, v in record.items() if k not in BOOKKEEPING}, **{k: record[k] for k in BOOKKEEPING if k in
                                                                            record}}  # fmt: skip


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
            crcs = "".join(f"{_content_crc(r):08x}{_content_crc(_bare(r)):08x}" for r in records)
            meta = {"format": FORMAT, "run": self.run, "name": name, "rows": json.dumps(rows), "records": crcs}
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
        text = "".join(json.dumps(_laid_out(r), allow_nan=False) + "\n" for r in sorted(lines, key=lambda r: r["i"]))
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
    `Resume`. Lines that ``keep`` rejects (input changed since, figure missing) and every line the reader would
    refuse, judged as it and `verify_folder` judge them (`_Judge`: a torn or damaged line, a second record, a
    shard missing, damaged or foreign in its file, header, metadata, arrays or masks, a record that disagrees with
    its shard) are dropped, one line reported per damaged shard, and the file rewritten without them; shards no
    kept record names are deleted. Never refuses to go on because of a stored file's content: what cannot be used
    is explained again. `StoreError` naming the index if it is in the way (a link, a folder, unreadable). ``keep``
    sees each valid record's bookkeeping only (`_bookkeeping`: i, source, stat, then skipped, or row, shard,
    digest and figure when present)."""
    directory = Path(directory)
    path = directory / index_name(process)
    lay = layout(read_manifest(directory.parent) or {}, directory.parent / MANIFEST)
    judge = _Judge(_Shards(directory, lay), key=source_hash)
    flags = bytearray()
    used: set[str] = set()
    skipped: list[tuple[str, str]] = []
    explained = dropped = 0
    problems: dict[str, list] = {}  # shard name -> [problem, images], in order of discovery
    first: str | None = None  # the first problem of a record alone
    if path.exists() or path.is_symlink():
        problem = _index_problem(path)
        if problem is not None:
            raise StoreError(f"{path}: {problem}")
        try:
            for lineno, (r, line) in enumerate(_bookkeeping_lines(path), 1):
                ok = r is not None and keep(r)
                if ok:
                    try:
                        judge(r, line, path, lineno)
                    except StoreDamage as e:
                        ok = False
                        if e.path == path:
                            first = first or e.problem
                        else:
                            problems.setdefault(e.path.name, [e.problem, 0])[1] += 1
                flags.append(ok)
                if not ok:
                    dropped += 1
                    continue
                if "skipped" in r:
                    skipped.append((r["source"], r["skipped"]))
                else:
                    explained += 1
                    used.add(r["shard"])
        except OSError as e:
            raise StoreError(f"{path}: cannot be read ({e.strerror or e}): give delib explain access to it") from None
    for name, (problem, count) in problems.items():
        report(f"{directory / name}: {problem}; explaining its {count} image(s) again")
    if dropped:
        why = f"; the first record alone: {first}" if first else ""
        report(f"{path}: dropped {dropped} record(s) (torn, damaged, stale, duplicated or missing their files{why}); "
               "redoing them")  # fmt: skip
        _rewrite(path, flags)
    del flags
    hashes = judge.seen.array()
    del judge
    seq = -1
    for name in os.listdir(directory):
        m = _SHARD.fullmatch(name)
        if not m or int(m.group(1)) != process:
            continue
        p = directory / name
        if name not in used and (p.is_symlink() or p.is_file()):
            p.unlink(missing_ok=True)  # written by a run killed before its records were appended, or damaged
        else:  # named by a kept record, or a folder in a shard's place (left alone, never written onto)
            seq = max(seq, int(m.group(2)))
    return Resume(hashes, explained, skipped, seq + 1)


# ------------------------------------------------------------------------------------------------ verifying


@dataclass
class Verdict:
    """What `verify_folder` found: ``problems`` (damage, one line each: a shard's once, with how many records it
    keeps from being served), ``notes`` (harmless leftovers) and counts: explained ``records`` and ``skipped``
    ones among the index lines, the ``shards`` records name, and, as the reader would find them
    (`load_explanations(..., skip_damaged=True)`), the records it would ``served`` and the lines it would refuse
    (``refused``: what it reports)."""

    records: int = 0
    skipped: int = 0
    shards: int = 0
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    served: int = 0
    refused: int = 0
    unusable: bool = False  # the manifest or the explanations folder is damaged: nothing can be served


def stored_bytes(out: str | Path) -> int:
    """Bytes of the index files and shards of an output folder (what `verify_folder` reads)."""
    d = Path(out) / DIRECTORY
    if d.is_symlink() or not d.is_dir():
        return 0
    try:
        return sum(p.stat().st_size for p in d.iterdir() if p.is_file() and (_INDEX.fullmatch(p.name) or
                                                                           p.name.startswith("shard-")))  # fmt: skip
    except OSError:
        return 0


def verify_folder(
    out: str | Path, *, progress: Callable[[int], None] = lambda n: None,
    on_damage: Callable[[StoreDamage], None] | None = None,
) -> Verdict:  # fmt: skip
    """Check a whole output folder without a model: the manifest, the explanations folder, every index line, every
    shard (header, dtypes, shapes, byte ranges, run, rows, masks, its own checksums), every record against its
    shard, no image twice; each line judged as the reader judges it (`_Judge`), so that ``on_damage`` gets what
    the reader would report, word for word. ``progress`` gets the bytes read as they are. `FileNotFoundError` if
    OUT holds no manifest, `StoreError` for a folder of another format (not damage: nothing to check)."""
    out = Path(out)
    verdict = Verdict()
    try:
        manifest = read_manifest(out)
        if manifest is None:
            raise FileNotFoundError(f"{out} holds no explanations ({MANIFEST} missing)")
        lay = layout(manifest, out / MANIFEST)
        directory, names = _listing(out)
    except StoreDamage as e:  # nothing can be served
        verdict.problems.append(str(e))
        verdict.unusable = True
        return verdict
    judge = _Judge(_Shards(directory, lay, keep=1, on_read=progress))
    used: set[str] = set()
    counts: dict[str, list] = {}  # what is wrong -> [records, whether it is a shard's], in order of discovery

    def refuse(e: StoreDamage, shard: bool = False) -> None:
        verdict.refused += 1
        counts.setdefault(str(e), [0, shard])[0] += 1
        if on_damage is not None:
            on_damage(e)

    for path in sorted(directory / n for n in names if _INDEX.fullmatch(n)):
        lines = _index_lines(path)
        lineno = 0
        while True:
            try:
                r, line = next(lines)
            except StopIteration:
                break
            except StoreDamage as e:
                refuse(e)
                break
            lineno += 1
            progress(len(line.encode("utf-8", "surrogateescape")))
            if r is not None and "skipped" not in r:
                verdict.records += 1
                used.add(r["shard"])
            elif r is not None:
                verdict.skipped += 1
            try:
                found = judge(r, line, path, lineno)
            except StoreDamage as e:
                refuse(e, e.path != path)
                continue
            verdict.served += found is not None
    for problem, (count, shard) in counts.items():
        verdict.problems.append(f"{problem} ({count} record(s) cannot be served)" if shard or count > 1 else problem)
    verdict.shards = len(used)
    for name in sorted(names):
        if name.startswith("shard-") and name not in used:
            p = directory / name
            progress(p.stat().st_size if p.is_file() and not p.is_symlink() else 0)
            what = "not a shard of this format" if not _SHARD.fullmatch(name) else "named by no record"
            if p.is_symlink() or not p.is_file():
                what = "not a file, named by no record"
            verdict.notes.append(f"{p}: {what} (left by a killed run or copied in; the next run deletes it)")
    return verdict


__all__ = [
    "DIRECTORY", "FORMAT", "MANIFEST", "Resume", "Shard", "ShardWriter", "SourceSet", "StoreDamage", "StoreError",
    "Verdict", "crc32_combine", "create_manifest", "index_files", "iter_explanations", "load_explanations",
    "manifest_check", "new_run_id", "open_index", "pack_bits", "read_manifest", "read_records", "read_shard",
    "replace_manifest", "sealed_manifest", "unpack_bits", "verify_folder",
]  # fmt: skip
