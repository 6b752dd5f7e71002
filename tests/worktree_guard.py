"""The check that the test suite writes nothing into the working tree (tests write into tmp_path): a listing of the
repository taken when the session starts is compared with one taken when it ends (`tests/conftest.py`).

Only paths that appeared or disappeared count: a file edited in an editor while the suite runs is no error."""

from __future__ import annotations

import fnmatch
import os
from pathlib import Path

# written by the tools around the tests, not by the tests: virtual environments (.ci/run makes .ci-venv inside the
# clone), bytecode, pytest's and hypothesis's caches, the editable install's metadata, git itself, ruff's cache
IGNORED = (".git", ".venv", ".ci-venv", "__pycache__", ".pytest_cache", ".hypothesis", "*.egg-info", ".ruff_cache")


def snapshot(root: Path) -> set[str]:
    """The relative paths of every file and folder (with a trailing /) under ``root``, the IGNORED names (at any
    depth) left out."""
    out: set[str] = set()
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if not _ignored(d)]
        rel = Path(folder).relative_to(root)
        out |= {(rel / d).as_posix() + "/" for d in dirs}
        out |= {(rel / f).as_posix() for f in files if not _ignored(f)}
    return out


def _ignored(name: str) -> bool:
    return any(fnmatch.fnmatch(name, pattern) for pattern in IGNORED)


def changes(before: set[str], after: set[str]) -> list[str]:
    """What happened between two snapshots, one line per path: 'new PATH' or 'removed PATH'."""
    return [f"new {p}" for p in sorted(after - before)] + [f"removed {p}" for p in sorted(before - after)]
