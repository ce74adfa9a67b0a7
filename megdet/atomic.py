"""Atomic files: a crash mid-write never leaves a truncated checkpoint, results file or plot.

Write to a temporary file in the same folder, fsync, then ``os.replace`` (atomic on POSIX), as
timm does; the previous complete file stays in place until the new one is whole. A leaf
module: tasks, reports and benches write through it without importing the engine.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any


def atomic_write(
    path: Path, write: Callable[[Any], None], mode: str, previous: Path | None = None
) -> None:
    """Write ``path`` whole or not at all; the file it replaces moves to ``previous``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp's 0600 would hide runs from colleagues
        with os.fdopen(fd, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        if previous is not None and path.exists():
            os.replace(path, previous)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    """The process's umask (reading it means setting it; set straight back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _fsync_dir(folder: Path) -> None:
    """Make the renames themselves durable."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, write: Callable[[Any], None]) -> None:
    """``write(binary_file)`` into ``path``, whole or not at all (plots, for instance)."""
    atomic_write(path, write, "wb")


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda f: f.write(text), "w")
