"""Shared helpers for the dataset readers: the one error type and strict line-oriented text parsing."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path


class DatasetError(ValueError):
    """A dataset file is missing, malformed or undecodable; the message names the file (and the line at fault)."""


def fail(path: Path | str, message: str, line: int | None = None) -> DatasetError:
    """Build a `DatasetError` whose message starts with ``path:line:`` (or ``path:``)."""
    where = f"{path}:{line}" if line is not None else f"{path}"
    return DatasetError(f"{where}: {message}")


def require_file(path: Path) -> Path:
    """Return ``path`` if it is a file, else raise `DatasetError` naming it."""
    if not path.is_file():
        raise fail(path, "file not found (is this the complete dataset release?)")
    return path


def read_text(path: Path) -> str:
    """The whole file as text (UTF-8, a leading byte-order mark dropped as spreadsheet tools write one, undecodable
    bytes replaced), raising `DatasetError` if it is missing."""
    require_file(path)
    return path.read_bytes().decode("utf-8-sig", errors="replace")


def rows(path: Path, *, fields: int, rest: bool = False) -> Iterator[tuple[int, list[str]]]:
    """Yield ``(line_number, fields)`` for each non-blank line of a whitespace-separated file.

    Args:
      path: the file.
      fields: number of fields each line must have.
      rest: if True the last field takes the remainder of the line (names with spaces), so a line needs at least
        ``fields`` tokens.
    """
    for number, line in enumerate(read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        if rest:
            parts = line.strip().split(maxsplit=fields - 1)
            ok = len(parts) == fields
        else:
            parts = line.split()
            ok = len(parts) == fields
        if not ok:
            raise fail(
                path, f"expected {fields} fields{' or more' if rest else ''}, found {len(parts)}: {line!r}", number
            )
        yield number, parts


def to_int(path: Path, line: int, token: str, *, low: int | None = None, high: int | None = None) -> int:
    """Parse an integer field, optionally range-checked, raising `DatasetError` naming file and line."""
    try:
        value = int(token)
    except ValueError:
        raise fail(path, f"expected an integer, found {token!r}", line) from None
    if (low is not None and value < low) or (high is not None and value > high):
        if high is None:
            raise fail(path, f"value {value} must be at least {low}", line)
        if low is None:
            raise fail(path, f"value {value} must be at most {high}", line)
        raise fail(path, f"value {value} outside [{low}, {high}]", line)
    return value


def to_float(path: Path, line: int, token: str) -> float:
    """Parse a finite float field, raising `DatasetError` naming file and line."""
    try:
        value = float(token)
    except ValueError:
        raise fail(path, f"expected a number, found {token!r}", line) from None
    if not math.isfinite(value):
        raise fail(path, f"expected a finite number, found {token!r}", line)
    return value
