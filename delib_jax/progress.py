"""Progress of long jobs, on a terminal and in logs: a tqdm bar on a TTY, else a line every N seconds.

    bar = progress_bar(total=len(files), desc="explain", unit="img")
    for ...: bar.update(n)
    bar.close()

Without a terminal (a log file, a batch scheduler) tqdm would print nothing (``disable=None``) or a stream of
carriage returns; `LineProgress` writes one plain line every ``every`` seconds instead (default 30 s, or the
environment variable ``DELIB_PROGRESS_SECONDS``), and one at the end:

    explain: 120/300 img (40%), 12.3 img/s, 15s left
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any, TextIO

DEFAULT_SECONDS = 30.0


def interval() -> float:
    """Seconds between two progress lines without a terminal: ``DELIB_PROGRESS_SECONDS`` or 30."""
    try:
        seconds = float(os.environ.get("DELIB_PROGRESS_SECONDS", DEFAULT_SECONDS))
    except ValueError:
        return DEFAULT_SECONDS
    return seconds if math.isfinite(seconds) and seconds > 0 else DEFAULT_SECONDS


def duration(seconds: float) -> str:
    """'42s', '3m05s', '2h07m'."""
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def progress_line(
    desc: str, done: int, total: int | None, unit: str, elapsed: float, postfix: str = "", start: int = 0
) -> str:
    """One line: done / total (percent), rate per second over the ``done - start`` of this run, time left."""
    rate = (done - start) / elapsed if elapsed > 0 else 0.0
    parts = [f"{done}/{total} {unit} ({done / total:.0%})" if total else f"{done} {unit}", f"{rate:.3g} {unit}/s"]
    if total and rate > 0 and done < total:
        parts.append(f"{duration((total - done) / rate)} left")
    elif total and done >= total:
        parts.append(f"done in {duration(elapsed)}")
    return f"{desc}: {', '.join(parts)}" + (f" [{postfix}]" if postfix else "")


class LineProgress:
    """The part of tqdm's interface the jobs use (update, set_postfix, write, close, iteration), printing a
    `progress_line` every ``every`` seconds and at `close`."""

    def __init__(
        self,
        iterable: Iterable | None = None,
        *,
        total: int | None = None,
        desc: str = "",
        unit: str = "it",
        initial: int = 0,
        every: float | None = None,
        file: TextIO | None = None,
    ):
        self.iterable = iterable
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)
        self.total, self.desc, self.unit, self.n = total, desc, unit, int(initial)
        self.start_n = self.n
        self.every = interval() if every is None else float(every)
        self.file = file
        self.postfix = ""
        self.t0 = self.last = time.monotonic()
        self.printed = self.n
        self.closed = False

    def _out(self) -> TextIO:
        return self.file or sys.stderr

    def _print(self) -> None:
        elapsed = time.monotonic() - self.t0
        line = progress_line(self.desc, self.n, self.total, self.unit, elapsed, self.postfix, self.start_n)
        print(line, file=self._out(), flush=True)
        self.last, self.printed = time.monotonic(), self.n

    def update(self, n: int = 1) -> None:
        self.n += int(n)
        if time.monotonic() - self.last >= self.every:
            self._print()

    def set_postfix(self, **values: Any) -> None:
        self.postfix = ", ".join(f"{k}={v}" for k, v in values.items())

    def write(self, text: str, file: TextIO | None = None) -> None:
        print(text, file=file or self._out(), flush=True)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            if self.n != self.printed:  # the last line, unless it was printed already
                self._print()

    def __iter__(self) -> Iterator:
        try:
            for item in self.iterable:
                yield item
                self.update(1)
        finally:
            self.close()

    def __enter__(self) -> LineProgress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def progress_bar(iterable: Iterable | None = None, *, disable: bool = False, leave: bool = True, **kw):
    """A tqdm bar when stderr is a terminal, a `LineProgress` otherwise, or a silent one with ``disable``.

    Keywords as tqdm's: total, desc, unit, initial (others are passed to tqdm only)."""
    from tqdm.auto import tqdm

    if disable:
        return tqdm(iterable, disable=True, **kw)
    if sys.stderr.isatty():
        return tqdm(iterable, leave=leave, dynamic_ncols=True, **kw)
    line = {k: kw[k] for k in ("total", "desc", "unit", "initial") if k in kw}
    return LineProgress(iterable, **line)


__all__ = ["LineProgress", "duration", "interval", "progress_bar", "progress_line"]
