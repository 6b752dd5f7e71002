"""The reader stage and the hand-over between the stages.

`Channel` carries dispatched batches from the main thread to the writer thread (a short bounded queue) and the
reader's batch buffers (slots) back once the writer has fetched them; it also carries the writer's failure and the
stop signal of a Ctrl-C. `read_ahead` keeps the reader several batches ahead of the device.
"""

from __future__ import annotations

import queue
import threading
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from delib_jax import _reader

POLL_S = 0.1  # how often a waiting main thread looks for a writer failure


@dataclass
class ReadBatch:
    """One decoded batch: the reader slot holding its pixels (rows 0..), its (ordinal, source) items and one
    `_reader.Decoded` report per item."""

    slot: int
    items: list[tuple[int, Any]]
    reports: list[_reader.Decoded]

    @property
    def any_readable(self) -> bool:
        return any(r.error is None for r in self.reports)


@dataclass
class Dispatched:
    """A batch on its way to the writer: what was read, and the device step's outputs (None: nothing readable)."""

    batch: ReadBatch
    outputs: Any


class Channel:
    """Main thread -> writer thread: `put` dispatched batches (at most ``depth`` waiting), None to end; writer ->
    main thread: `give_slot` a slot whose pixels are no longer needed, `fail` with an exception. The main thread's
    waits (`take_slot`, `put`) raise the writer's failure instead of blocking for ever; `stop` (Ctrl-C) tells the
    writer to drop what it has not fetched."""

    def __init__(self, slots: int, depth: int = 2):
        self._free: queue.Queue[int] = queue.Queue()
        for s in range(slots):
            self._free.put(s)
        self._slots = slots
        self._work: queue.Queue[Dispatched | None] = queue.Queue(maxsize=depth)
        self.stopping = threading.Event()
        self.failure: BaseException | None = None

    def _check(self) -> None:
        if self.failure is not None:
            raise self.failure

    def take_slot(self) -> int:
        """A free slot for the reader (waits; raises the writer's failure)."""
        while True:
            self._check()
            try:
                return self._free.get(timeout=POLL_S)
            except queue.Empty:
                continue

    def give_slot(self, slot: int) -> None:
        self._free.put(slot)

    def put(self, item: Dispatched | None) -> None:
        """Hand a batch (or None: the end) to the writer (waits; raises the writer's failure)."""
        while True:
            self._check()
            try:
                return self._work.put(item, timeout=POLL_S)
            except queue.Full:
                continue

    def get(self) -> Dispatched | None:
        """The writer's next batch (None: the end)."""
        return self._work.get()

    def fail(self, error: BaseException) -> None:
        """The writer stops with ``error``: kept for the main thread, whose waits are released."""
        self.failure = error
        while True:
            try:
                item = self._work.get_nowait()
            except queue.Empty:
                break
            if item is not None:
                self.give_slot(item.batch.slot)
        for s in range(self._slots):
            self.give_slot(s)

    def stop(self) -> None:
        """Interrupted: the writer keeps what it has fetched and drops the rest (redone on resume)."""
        self.stopping.set()
        while True:
            try:
                self._work.put_nowait(None)
                return
            except queue.Full:
                try:
                    self._work.get_nowait()
                except queue.Empty:
                    pass


def batches_of(todo: Sequence[tuple[int, Path]], size: int) -> list[list[tuple[int, Path]]]:
    """``todo`` cut into batches of ``size`` items (the last one shorter)."""
    return [list(todo[s : s + size]) for s in range(0, len(todo), size)]


def read_ahead(reader: _reader.Reader, todo: Sequence[tuple[int, Any]], ahead: int, channel: Channel,
               payload: Callable[[int, Any], Any] | None = None) -> Iterator[ReadBatch]:  # fmt: skip
    """The batches of ``todo`` (ordinal, source) decoded, in order: ``ahead`` batches are submitted before the first
    is waited for, and the next one is submitted as soon as one is handed back (it decodes while that one computes).
    Each slot is taken from ``channel`` and given back there by the writer. ``payload(ordinal, source)``: what the
    reader decodes (default: the source, a file)."""
    payload = payload or (lambda i, source: source)
    size = reader.shape[0]
    count = -(-len(todo) // size)
    reading: deque[tuple[int, list, list]] = deque()
    submitted = 0

    def submit() -> None:  # a batch's items are made when it is submitted: flat memory for any length of todo
        nonlocal submitted
        slot = channel.take_slot()
        items = list(todo[submitted * size : (submitted + 1) * size])
        reading.append((slot, items, reader.submit(slot, [payload(i, f) for i, f in items])))
        submitted += 1

    for _ in range(min(ahead, count)):
        submit()
    for _ in range(count):
        slot, items, futures = reading.popleft()
        reports = [r for fut in futures for r in fut.result()]
        if submitted < count:
            submit()
        yield ReadBatch(slot, items, reports)
