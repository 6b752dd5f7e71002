"""The explanation job's image reader: decode, resize and crop files into shared batch buffers.

Runs in worker processes (started with 'spawn', so they never inherit JAX's threads), each writing its rows
straight into a shared-memory slot of shape (B, crop, crop, 3) uint8: no pixels are pickled, and the compiled
explanation normalises them on the device (a quarter of the bytes of float32, and no normalising on the host).
Imports neither JAX nor matplotlib, so a worker starts in a fraction of a second. With ``workers=0`` the same code
runs in threads of the calling process (no shared memory needed).
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import signal
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass
from multiprocessing import shared_memory
from pathlib import Path

import numpy as np
from PIL import Image

from delib_jax import _entry
from delib_jax.data import transforms


@dataclass(frozen=True)
class Decoded:
    """What a reader reports for one file: ``error`` (a one-line reason) or the image's size and an optional note."""

    error: str | None = None
    size: tuple[int, int] | None = None
    note: str | None = None


@dataclass(frozen=True)
class StoredImage:
    """A dataset's image as its pipelines read it (no EXIF rotation: the annotations are in stored pixels): the file
    ``name`` of a release folder, or the encoded ``data`` of a TFDS record that ``name`` stands for in errors."""

    name: str
    data: bytes | None = None


def size_note(path: str, width: int, height: int, resize: int, crop: int) -> str | None:
    """A one-line note for an image the evaluation transform treats badly: far smaller than the crop (blown up), or
    so elongated that the centre crop keeps a small part of it; None for ordinary images."""
    notes = []
    if width * height > Image.MAX_IMAGE_PIXELS:
        notes.append(f"{width * height / 1e6:.3g} megapixels, slow to read")
    if min(width, height) < crop / 4:
        notes.append(f"far smaller than the {crop}-pixel crop, blown up")
    kept = (crop / resize) ** 2 * min(width, height) / max(width, height)
    if kept < 0.2:
        notes.append(f"the centre crop keeps {kept * 100:.2g}% of it")
    return f"note: {path} ({width}x{height}): " + "; ".join(notes) if notes else None


def decode(path, *, resize: int, crop: int) -> tuple[np.ndarray | None, Decoded]:
    """(crop, crop, 3) uint8 pixels as the run evaluated them (or None) and the report for ``path``: a file (turned
    upright as its EXIF says), or a dataset's image (`delib_jax.job.inputs.StoredImage`: a file or encoded bytes,
    read as the dataset's pipelines read it)."""
    try:
        if isinstance(path, str):
            image = transforms.read_rgb(path, exif_orientation=True)
        elif path.data is None:
            image = transforms.read_rgb(path.name, exif_orientation=False)
        else:
            image = transforms.decode_rgb(path.data, path.name, exif_orientation=False)
        path = path if isinstance(path, str) else path.name
        note = size_note(path, image.width, image.height, resize, crop)
        plan = transforms.eval_plan(image.width, image.height, resize=resize, crop=crop)
        return transforms.apply_to_image(plan, image), Decoded(size=(image.width, image.height), note=note)
    except transforms.ImageReadError as e:
        return None, Decoded(error=str(e))
    except Exception as e:  # noqa: BLE001 -- a decoder failing in an unexpected way: skip the file, say why
        name = path if isinstance(path, str) else getattr(path, "name", path)
        return None, Decoded(error=f"{name}: cannot read image ({type(e).__name__}: {e})")


# ------------------------------------------------------------------------------------------------ worker side

_STATE: dict = {}


def _init(names: Sequence[str] | None, shape: tuple[int, ...], resize: int, crop: int) -> None:
    warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
    _STATE.update(resize=resize, crop=crop, shape=shape)
    if names is not None:
        blocks = [shared_memory.SharedMemory(name=n) for n in names]
        _STATE["blocks"] = blocks  # keep them open
        _STATE["slots"] = [np.ndarray(shape, np.uint8, buffer=b.buf) for b in blocks]


def _fill(slots: list[np.ndarray], slot: int, row: int, paths: Sequence[str], resize, crop) -> list[Decoded]:
    reports = []
    for j, path in enumerate(paths):
        pixels, report = decode(path, resize=resize, crop=crop)
        if pixels is not None:
            slots[slot][row + j] = pixels
        reports.append(report)
    return reports


def _work(slot: int, row: int, paths: Sequence[str]) -> list[Decoded]:
    s = _STATE
    return _fill(s["slots"], slot, row, paths, s["resize"], s["crop"])


# ------------------------------------------------------------------------------------------------ caller side


@contextlib.contextmanager
def _main_hidden() -> Iterator[None]:
    """Hide the caller's __main__ from 'spawn' while worker processes start: the workers need nothing from it, and
    re-running a user's script without an ``if __name__ == "__main__":`` guard would fail (or redo its work)."""
    main = sys.modules.get("__main__")
    saved = {k: main.__dict__[k] for k in ("__file__", "__spec__") if main is not None and k in main.__dict__}
    try:
        if main is not None:
            main.__dict__.pop("__file__", None)
            main.__dict__["__spec__"] = None
        yield
    finally:
        if main is not None:
            main.__dict__.pop("__spec__", None)
            main.__dict__.update(saved)


def _ready() -> int:
    return os.getpid()


def _exit_with(parent: int) -> None:
    while True:
        time.sleep(0.5)
        if os.getppid() != parent:
            os._exit(0)


def _worker_init(initializer: Callable | None, initargs: tuple, parent: int | None = None) -> None:
    """Workers ignore Ctrl-C (a terminal sends it to the whole process group): the caller stops them, and an
    interrupt must print one line, not a traceback per worker. They leave as soon as the caller (``parent``, its
    pid given by the caller: a worker that starts after the caller died must still see it gone) is gone (killed,
    or left with os._exit): a pool's workers hold their own end of its task pipe and would otherwise wait forever."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    parent = os.getppid() if parent is None else parent
    if os.getppid() != parent:
        os._exit(0)
    threading.Thread(target=_exit_with, args=(parent,), daemon=True).start()
    if initializer is not None:
        initializer(*initargs)


def start_pool(workers: int, initializer: Callable | None = None, initargs: tuple = ()) -> ProcessPoolExecutor:
    """``workers`` processes started with 'spawn' (never forked from a process running JAX's threads), all of
    them launched now (not waited for: they start while the caller prepares its work)."""
    pool = ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"), initializer=_worker_init,
                               initargs=(initializer, initargs, os.getpid()))  # fmt: skip
    _entry.on_exit(pool, lambda: pool.shutdown(wait=False, cancel_futures=True))
    with _main_hidden():
        for _ in range(workers):
            pool.submit(_ready)
    return pool


class Reader:
    """``slots`` batch buffers (B, crop, crop, 3) uint8 filled by ``workers`` processes (0: threads).

    ``submit(slot, paths)`` decodes up to B files into rows 0.. of a slot, returning futures of `Decoded` lists;
    ``array(slot)`` is the slot's buffer. Close it (a context manager) to stop the workers and free the memory."""

    def __init__(self, *, batch: int, crop: int, resize: int, slots: int, workers: int, chunk: int = 8):
        self.shape = (batch, crop, crop, 3)
        self.chunk = chunk
        self._blocks: list[shared_memory.SharedMemory] = []
        self._pool: Executor
        if workers > 0:
            try:
                nbytes = int(np.prod(self.shape))
                self._blocks = [shared_memory.SharedMemory(create=True, size=nbytes) for _ in range(slots)]
            except OSError:  # no (or too small a) /dev/shm: decode in threads instead
                self.close()
                workers = 0
        if workers > 0:
            self.arrays = [np.ndarray(self.shape, np.uint8, buffer=b.buf) for b in self._blocks]
            names = [b.name for b in self._blocks]
            self._pool = start_pool(workers, _init, (names, self.shape, resize, crop))
            self._run = _work
        else:
            warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)  # large, not hostile
            self.arrays = [np.zeros(self.shape, np.uint8) for _ in range(slots)]
            self._pool = ThreadPoolExecutor(max(1, min(8, os.cpu_count() or 1)))
            arrays = self.arrays
            self._run = lambda slot, row, paths: _fill(arrays, slot, row, paths, resize, crop)
        self.workers = workers

    def submit(self, slot: int, paths: Sequence) -> list[Future]:
        """Decode ``paths`` (files, or `StoredImage` of a dataset) into rows 0.. of ``slot``."""
        paths = [p if not isinstance(p, Path) else str(p) for p in paths]
        return [
            self._pool.submit(self._run, slot, row, paths[row : row + self.chunk])
            for row in range(0, len(paths), self.chunk)
        ]

    def close(self) -> None:
        pool = getattr(self, "_pool", None)
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
        self.arrays = []
        for b in self._blocks:
            try:
                b.close()
                b.unlink()
            except (OSError, BufferError):
                pass
        self._blocks = []

    def __enter__(self) -> Reader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def default_workers() -> int:
    """Reader processes by default: one per core but one (the device stage and the writer need a core)."""
    return max(1, min(32, (os.cpu_count() or 2) - 1))
