"""The job's output folder: errors and options, the lock, the manifest check, input fingerprints, the resume plan."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import sys
import zlib
from array import array
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from delib_jax import store as st


class JobError(Exception):
    """A job that cannot go on (folder locked or foreign, disk full, a model with NaN outputs): one line."""


@dataclass(frozen=True)
class JobOptions:
    """How the job runs (not what it computes: that is ``explain_options``, see `explain_files`).

    batch_size: images per device step, over all local devices; workers: reader processes (None: one per core but
    one; 0: threads in this process); prefetch: batches decoded ahead; shard_size / shard_seconds: a shard is
    written when it holds this many images or is this old (what a kill can lose); figures: a PNG per image, drawn by
    ``figure_workers`` processes (None: one per core but one); share: (index, count) of this process among
    ``count`` processes that split the files (None: ``jax.process_index()``, ``jax.process_count()``);
    json: also write OUT/insecurities.json (every explanation in one JSON file, maps included) up to ``json_limit``
    images;
    report_limit: index.html lists the hardest this many images.
    """

    batch_size: int = 32
    workers: int | None = None
    prefetch: int = 2
    shard_size: int = 256
    shard_seconds: float = 10.0
    figures: bool = False
    figure_workers: int | None = None
    share: tuple[int, int] | None = None
    json: bool = False
    json_limit: int = 1000
    report_limit: int = 1000
    progress: bool = True


@dataclass
class JobSummary:
    """What a job did: images explained now and before (resumed), skipped files with reasons, where it wrote."""

    out: Path
    total: int
    explained: int
    resumed: int
    skipped: list[tuple[str, str]] = field(default_factory=list)
    compile_s: float = 0.0
    run_s: float = 0.0
    bytes_written: int = 0
    json_written: bool = False


def lock_folder(out: Path, process: int):
    """An exclusive lock on OUT for this process share (released when the returned file is closed or the process
    dies); `JobError` naming the folder if another job holds it."""
    path = out / f".lock-{process:05d}"
    if path.is_symlink():
        raise JobError(f"{path} is a symbolic link: refusing to use it (remove it)")
    fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o666)
    f = os.fdopen(fd, "r+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.seek(0)
        pid = f.read().strip() or "?"
        f.close()
        raise JobError(
            f"another delib explain (pid {pid}) is writing to {out}; wait for it or choose another --out"
        ) from None
    f.seek(0)
    f.truncate()
    f.write(str(os.getpid()))
    f.flush()
    return f


def weights_digest(leaves: Sequence[Any]) -> str:
    """A hash of a model's weights: a run folder retrained in place gives another digest."""
    import jax

    crc, shapes = 0, []
    for leaf in leaves:
        if jax.dtypes.issubdtype(getattr(leaf, "dtype", np.float32), jax.dtypes.prng_key):
            continue  # random-number state: no part of what an eval-mode model computes
        a = np.ascontiguousarray(np.asarray(leaf))
        shapes.append((a.shape, a.dtype.str))
        crc = zlib.crc32(memoryview(a).cast("B"), crc)  # ~1 GB/s: a ResNet50 in 0.1 s
    return f"{crc:08x}-{hashlib.blake2b(str(shapes).encode(), digest_size=8).hexdigest()}"


def _differences(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for k in sorted(set(a) | set(b)) for d in _differences(a.get(k), b.get(k), f"{prefix}{k}.")]
    return [] if a == b else [prefix.rstrip(".")]


def _ours(out: Path) -> bool:
    """Whether a damaged OUT/manifest.json belongs to a folder of explanations (one the job may repair): it says so
    (its format), or OUT/explanations is there."""
    directory = out / st.DIRECTORY
    if directory.is_dir() and not directory.is_symlink():
        return True
    try:
        return st.FORMAT.encode() in (out / st.MANIFEST).read_bytes()[:4096]
    except OSError:
        return False


def check_manifest(out: Path, manifest: dict[str, Any], report: Callable[[str], None] | None = None) -> str:
    """Write OUT/manifest.json (with a new run id; the first of several processes wins), or check that the one
    there describes the same model and settings; returns the folder's run id. A damaged manifest (not JSON, or not
    what its checksum says) of a folder of explanations is written anew with a new run id, so that every stored
    result, of a model no manifest vouches for any more, is explained again (said through ``report``); the new id
    is derived from the damaged bytes, so that processes of one job that find the same damage write the same
    manifest."""
    manifest = json.loads(json.dumps(manifest))  # as it reads back
    try:
        previous = st.read_manifest(out)
    except st.StoreDamage as e:
        return _repair_manifest(out, manifest, e, report)
    if previous is not None and "check" not in previous:
        # Unsealed: a manifest of an earlier version, or a sealed one whose seal the damage took away. Keys this
        # version never writes, or a run id / settings the layout cannot read, are damage, not another model.
        try:
            st.layout(previous, out / st.MANIFEST)
            if set(previous) - set(manifest) - {"run"}:
                raise st.StoreDamage(out / st.MANIFEST, "the manifest holds fields no delib explain writes")
        except st.StoreDamage as e:
            return _repair_manifest(out, manifest, e, report)
    if previous is None:
        st._no_follow(out / st.MANIFEST, out)
        run = st.new_run_id()
        if st.create_manifest(out, st.sealed_manifest({**manifest, "run": run})):
            return run
        previous = st.read_manifest(out) or {}  # another process of this run wrote it first
    run = previous.pop("run", None)
    previous.pop("check", None)
    if previous != manifest:
        differing = _differences(previous, manifest)
        fields = ", ".join(differing[:4])
        if differing == ["figures"] and manifest.get("figures") and not previous.get("figures"):
            raise JobError(f"{out} was explained with --no-figures: draw its figures with `delib figures {out}` "
                           "(--hardest N or --images ...), or choose another --out")  # fmt: skip
        raise JobError(
            f"{out} holds explanations made with another model or other settings (differing: {fields}); "
            "choose another --out or empty that folder"
        )
    st.layout({**previous, "run": run}, out / st.MANIFEST)  # a damaged run id or settings: one line
    return run


def _repair_manifest(out: Path, manifest: dict[str, Any], damage: Exception, report) -> str:
    """Write a damaged OUT/manifest.json of a folder of explanations anew (a new run id derived from the damaged
    bytes, so that processes of one job finding the same damage write the same manifest); `JobError` where the file
    is not the job's to repair. Returns the new run id."""
    path = out / st.MANIFEST
    if not path.is_file() or path.is_symlink() or not _ours(out):
        raise JobError(f"{damage}; move it away, or choose another --out") from None
    run = hashlib.blake2b(path.read_bytes() + b"\0repaired", digest_size=16).hexdigest()
    st.replace_manifest(out, st.sealed_manifest({**manifest, "run": run}))
    (report or _notices.setdefault(out, []).append)(
        f"{damage}: written anew; every stored result of this folder is explained again"
    )
    return run


_notices: dict[Path, list[str]] = {}  # what `check_manifest` repaired, said by the next `plan_resume` of the folder


# how the files the job writes at the top of OUT begin (`delib_jax.report.render_index`, `finish`'s JSON)
OWN_FILES = {
    "index.html": "<!DOCTYPE html>\n<html lang='en'><head>",
    "pairs.html": "<!DOCTYPE html>\n<html lang='en'><head>",
    "insecurities.json": '{\n "model": ',
}


def check_own_files(out: Path) -> None:
    """`JobError` if OUT holds an index.html or insecurities.json that the job did not write (it would replace
    them): a user's own page is never overwritten."""
    for name, start in OWN_FILES.items():
        path = out / name
        if not (path.exists() or path.is_symlink()):
            continue
        try:
            with open(path, "rb") as f:
                ours = path.is_file() and not path.is_symlink() and f.read(len(start)) == start.encode()
        except OSError:
            ours = False
        if not ours:
            raise JobError(f"{path} was not written by delib explain and would be replaced: move it or choose "
                           "another --out")  # fmt: skip


def prepare_folder(
    out: Path,
    manifest: dict[str, Any],
    *,
    figures: bool,
    sync: Callable[[str], None] | None = None,
    first: bool = True,
    report: Callable[[str], None] | None = None,
) -> tuple[Path, str]:
    """Refuse files of OUT the job did not write (`check_own_files`), check (or write) the manifest, make
    OUT/explanations (and OUT/figures), remove a killed run's temporary files; returns the explanations folder and
    the folder's run id (what every stored row is bound to). Several processes of one job pass ``sync`` (a barrier
    named by its argument) and ``first`` (process 0): only the first removes leftovers, while the others wait, so
    that no process deletes a file another one is writing. ``report``: what was repaired (a damaged manifest;
    None: said by the next `plan_resume`).
    `JobError` naming what is in the way: a foreign folder or file, a planted link, a file where a folder belongs,
    a folder that cannot be read."""
    check_own_files(out)
    try:
        run = check_manifest(out, manifest, report)
        directory = st.safe_dir(out, st.DIRECTORY)
        if figures:
            st.safe_dir(out, "figures")
    except st.StoreError as e:
        raise JobError(str(e)) from None
    if sync is not None:
        sync("delib explain: manifest checked")
    if first:
        st.remove_temporaries(out, directory, out / "figures")
    if sync is not None:
        sync("delib explain: leftovers removed")
    return directory, run


def fingerprint(path: str | os.PathLike) -> list[int]:
    """[size, modification time in ns]: an input replaced under the same path is explained again."""
    s = os.stat(path)
    return [int(s.st_size), int(s.st_mtime_ns)]


def inputs_outside(files: Iterable[str | os.PathLike], out: Path) -> PathList:
    """``files`` less those inside the output folder (its figures are not inputs), as a `PathList`. Each folder is
    resolved once, not each file (resolving 100,000 files took 5 s of a resume's start); a file that is itself a
    symbolic link is resolved on its own."""
    root = os.path.realpath(out)
    folders: dict[str, bool] = {}

    def within(real: str) -> bool:
        return real == root or real.startswith(root.rstrip(os.sep) + os.sep)

    def inside(f: str) -> bool:
        if os.path.islink(f):
            return within(os.path.dirname(os.path.realpath(f)))
        folder = os.path.dirname(f)
        if folder not in folders:
            folders[folder] = within(os.path.realpath(folder))
        return folders[folder]

    names = (files.source(i) for i in range(len(files))) if isinstance(files, PathList) else map(_as_path, files)
    return PathList(f for f in names if not inside(f))


# ------------------------------------------------------------------------------------------------ inputs in flat memory


_FS_ENCODING, _FS_ERRORS = sys.getfilesystemencoding(), sys.getfilesystemencodeerrors()


def _as_path(p: str | os.PathLike) -> str:
    """``p`` as ``str(Path(p))`` (collapsed slashes, no "." parts, no trailing slash), without making a `Path` for
    a string that is already in that form (nearly all: a folder walk's paths)."""
    if isinstance(p, str) and p and not p.startswith("./") and "//" not in p[1:] and "/./" not in p and not p.endswith(
            ("/", "/.")) and p != ".":  # fmt: skip
        return p
    return str(Path(p))


class PathList(Sequence):
    """Paths in flat memory: one buffer of their encoded bytes and an array of offsets (about the length of the path
    plus 8 bytes each, instead of a Python object per path); reads back `Path` objects."""

    def __init__(self, paths: Iterable[str | os.PathLike] = ()):
        blob, ends = bytearray(), array("q")
        for p in paths:
            blob += os.fsencode(_as_path(p))
            ends.append(len(blob))
        self._blob = bytes(blob)
        self._ends = np.frombuffer(ends, np.int64) if ends else np.zeros(0, np.int64)

    def __len__(self) -> int:
        return len(self._ends)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return PathList(self[j] for j in range(*i.indices(len(self))))
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(i)
        return Path(self.source(i))

    def source(self, i: int) -> str:
        """Path ``i`` as the string a record names it by (`store.source_hash` of it); no `Path` is made (a
        resume's start looks up every input: 100,000 `Path` objects cost seconds)."""
        start = int(self._ends[i - 1]) if i else 0
        return self._blob[start : int(self._ends[i])].decode(_FS_ENCODING, _FS_ERRORS)  # as os.fsdecode

    def __eq__(self, other) -> bool:
        return isinstance(other, Sequence) and len(self) == len(other) and all(a == Path(b) for a, b in
                                                                               zip(self, other))  # fmt: skip

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"PathList({len(self)} paths)"

    # the job's view of its inputs (`delib_jax.job.inputs`): a file's source is its path
    def fingerprint(self, i: int) -> list[int] | None:
        """`fingerprint` of file ``i`` (None: unreadable)."""
        try:
            return fingerprint(self.source(i))  # a string: no Path made
        except OSError:
            return None

    def payload(self, i: int) -> str:
        """What a reader decodes: the path (turned upright as its EXIF says, as a photo is shown)."""
        return str(self[i])

    def describe(self, i: int) -> None:
        """Nothing to add to a file's record."""
        return None


@dataclass(frozen=True)
class Items(Sequence):
    """(ordinal, source) pairs of ``files`` (a `PathList` or `delib_jax.job.inputs.DatasetInputs`) picked by an array
    of ordinals (8 bytes per item): this share's inputs, what is left to do."""

    files: Sequence[Path]
    ordinals: np.ndarray

    def __len__(self) -> int:
        return len(self.ordinals)

    def __getitem__(self, k):
        if isinstance(k, slice):
            return Items(self.files, self.ordinals[k])
        i = int(self.ordinals[k])
        return i, self.files[i]

    def __iter__(self):
        for i in self.ordinals.tolist():
            yield i, self.files[i]

    def __eq__(self, other) -> bool:
        if isinstance(other, Items):
            return self.files is other.files and np.array_equal(self.ordinals, other.ordinals)
        return isinstance(other, Sequence) and list(self) == list(other)

    __hash__ = None  # type: ignore[assignment]


class Fingerprints(Mapping):
    """ordinal -> fingerprint (None: unreadable) of the inputs of one share, in one (count, 2) int64 array;
    ``files``: a `PathList` or `delib_jax.job.inputs.DatasetInputs`."""

    def __init__(self, files, ordinals: np.ndarray):
        self.ordinals = ordinals
        self.values = np.full((len(ordinals), 2), -1, np.int64)
        for k, i in enumerate(ordinals.tolist()):
            stat = files.fingerprint(i)
            if stat is not None:  # unreadable: -1 (a size is never negative)
                self.values[k] = stat

    def _position(self, i: int) -> int:
        k = int(self.ordinals.searchsorted(i))
        if k >= len(self.ordinals) or int(self.ordinals[k]) != i:
            raise KeyError(i)
        return k

    def __getitem__(self, i: int) -> list[int] | None:
        v = self.values[self._position(i)]
        return None if v[0] < 0 else [int(v[0]), int(v[1])]

    def __iter__(self):
        return iter(self.ordinals.tolist())

    def __len__(self) -> int:
        return len(self.ordinals)


class Ordinals:
    """source (str) -> ordinal among ``files`` (None: not one of them), through a sorted array of 64-bit hashes of
    the paths (16 bytes per input instead of a dict); a hash match is checked against the path itself."""

    def __init__(self, files: Sequence[Path], ordinals: np.ndarray):
        self.files = files
        hashes = np.fromiter((st.source_hash(files.source(i)) for i in ordinals.tolist()), np.int64, len(ordinals))
        order = np.argsort(hashes, kind="stable")
        self.hashes, self.ordinals = hashes[order], ordinals[order]

    def get(self, source: str) -> int | None:
        h = st.source_hash(source)
        k = int(self.hashes.searchsorted(h))
        while k < len(self.hashes) and int(self.hashes[k]) == h:
            i = int(self.ordinals[k])
            if self.files.source(i) == source:
                return i
            k += 1
        return None

    def left(self, done: st.Resume) -> np.ndarray:
        """The ordinals whose source ``done`` does not hold, in increasing order (by their hashes, at once)."""
        return np.sort(self.ordinals[~np.isin(self.hashes, done.hashes)])


# ------------------------------------------------------------------------------------------------ resume


@dataclass
class ResumePlan:
    """This share's inputs (ordinal, path), their fingerprints (None: unreadable), what is left to do, what an
    earlier run finished (``resumed`` images, ``skipped`` (source, reason)) and the next shard number. Inputs and
    what is left are `Items` (8 bytes per input), fingerprints `Fingerprints` (16 bytes per input)."""

    mine: Items
    stats: Fingerprints
    todo: Items
    resumed: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)
    next_seq: int = 0

    @property
    def kept(self) -> int:
        """Records an earlier run left that stay (explained or skipped)."""
        return self.resumed + len(self.skipped)


def _still_valid(r: dict, *, ordinal: Ordinals, stats, out: Path, figures: bool) -> bool:
    """Whether an earlier run's record stays (before `store.open_index` judges it against its shard, as the reader
    does): its input is among this run's with the same fingerprint and, with figures, its figure is on disk."""
    i = ordinal.get(r["source"])
    if i is None or stats[i] != r["stat"]:
        return False  # not among this run's inputs, or the file changed since
    if "skipped" in r or not figures:
        return True
    figure = r.get("figure")
    return isinstance(figure, str) and (out / figure).is_file()


def plan_resume(
    out: Path, directory: Path, files: Sequence[Path], share: tuple[int, int], *, figures: bool,
    report: Callable[[str], None],
) -> ResumePlan:  # fmt: skip
    """The inputs of process ``share[0]`` of ``share[1]`` (every count-th file), less those an earlier run in
    ``out`` finished (read through `store.open_index`, which drops stale or damaged records). Memory: a few
    bytes per input (`Items`, `Fingerprints`, `Ordinals`, `store.Resume`), not Python objects."""
    import functools

    for notice in _notices.pop(out, []):
        report(notice)
    p, count = share
    files = files if hasattr(files, "payload") else PathList(files)  # a PathList or DatasetInputs
    ordinals = np.arange(p, len(files), count, dtype=np.int64)
    stats = Fingerprints(files, ordinals)
    ordinal = Ordinals(files, ordinals)
    keep = functools.partial(_still_valid, ordinal=ordinal, stats=stats, out=out, figures=figures)
    try:
        done = st.open_index(directory, p, keep=keep, report=report)
    except st.StoreError as e:  # the index is in the way (a link, a folder, unreadable)
        raise JobError(str(e)) from None
    return ResumePlan(
        mine=Items(files, ordinals), stats=stats, todo=Items(files, ordinal.left(done)),
        resumed=done.explained, skipped=list(done.skipped), next_seq=done.next_seq,
    )  # fmt: skip
