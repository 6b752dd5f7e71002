"""What every ``delib`` subcommand is made of: `Command`, the one-line `UsageError`, and the output-folder checks.

A subcommand lives in its own module, which builds a `Command` and imports only this module of the command line;
`delib_jax.cli` lists the subcommands and builds the parser (the registry imports its commands, never the reverse).
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path


class UsageError(Exception):
    """A problem the user can fix (bad option, missing file): printed as one line, exit status 2."""


@dataclass(frozen=True)
class Command:
    """A ``delib`` subcommand: ``configure`` adds its arguments, ``run`` gets the parsed namespace, returns the exit
    status (raising `UsageError` for a one-line error with status 2)."""

    name: str
    help: str
    description: str
    configure: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


def check_out_dir(out: str | Path, flag: str = "--out") -> None:
    """Refuse early an output folder that cannot be created: it, or the nearest existing folder above it, is a file
    or not writable."""
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise UsageError(f"{flag} {out} exists and is not a directory")
    parent = next((p for p in [path, *path.absolute().parents] if p.exists()), None)
    if parent is not None and (not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK)):
        why = "is a file" if not parent.is_dir() else "is not writable"
        raise UsageError(f"{flag} {out} cannot be created: {parent} {why}; choose another folder")


def make_out_dir(out: str | Path, flag: str = "--out") -> Path:
    """Create the output folder, a failure (permissions, a read-only or virtual file system) as one line."""
    path = Path(out)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"{flag} {out} cannot be created ({e.strerror or e}); choose another folder") from None
    return path


__all__ = ["Command", "UsageError", "check_out_dir", "make_out_dir"]
