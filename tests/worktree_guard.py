"""The check that the test suite writes nothing into the working tree (tests write into tmp_path): a listing of the
repository taken when the session starts is compared with one taken when it ends (`tests/conftest.py`)."""

from __future__ import annotations

import fnmatch
import os
from pathlib import Path

# written by the tools around the tests, not by the tests: virtual environments (.ci/run makes .ci-venv inside the
# clone), bytecode, pytest's and hypothesis's caches, the editable install's metadata, git itself, ruff's cache
IGNORED = (".git", ".venv", ".ci-venv", "__pycache__", ".pytest_cache", ".hypothesis", "*.egg-info", ".ruff_cache")


def snapshot(root: Path) -> dict[str, tuple[int, int] | None]:
    """Relative path -> (size, mtime in ns) of every file under ``root`` (None for a folder), the IGNORED names (at
    any depth) left out."""
    out: dict[str, tuple[int, int] | None] = {}
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if not _ignored(d)]
        rel = Path(folder).relative_to(root)
        for d in dirs:
            out[(rel / d).as_posix() + "/"] = None
        for f in files:
            if _ignored(f):
                continue
            try:
                st = os.lstat(os.path.join(folder, f))
            except FileNotFoundError:  # removed while listed
                continue
            out[(rel / f).as_posix()] = (st.st_size, st.st_mtime_ns)
    return out


def _ignored(name: str) -> bool:
    return any(fnmatch.fnmatch(name, pattern) for pattern in IGNORED)


def changes(before: dict, after: dict) -> list[str]:
    """What happened between two snapshots, one line per path: 'new PATH', 'removed PATH', 'changed PATH'."""
    lines = [f"new {p}" for p in sorted(after.keys() - before.keys())]
    lines += [f"removed {p}" for p in sorted(before.keys() - after.keys())]
    lines += [f"changed {p}" for p in sorted(before.keys() & after.keys()) if before[p] != after[p]]
    return lines
