"""Atomic files: a crash mid-write never leaves a truncated checkpoint, results file or plot.

Write to a temporary file in the same folder, fsync, then ``os.replace`` (atomic on POSIX), as
timm does; the previous complete file stays in place until the new one is whole. A leaf
module: tasks, reports and benches write through it without importing the engine.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from megdet.errors import MegdetError


def atomic_write(
    path: Path, write: Callable[[Any], None], mode: str, previous: Path | None = None
) -> None:
    """Write ``path`` whole or not at all; the file it replaces moves to ``previous``. A
    failed write (a full disk, no permission) is one ``MegdetError`` line naming the file and
    the cause, with no partial file left and the previous file as it was."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise MegdetError(write_failure(path, exc)) from None
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
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        raise MegdetError(write_failure(path, exc)) from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_failure(path: Path, exc: OSError, action: str = "write") -> str:
    """One line: which file could not be written (or read, ...), and why: the errno's text
    and name."""
    if exc.errno is None:
        return f"{path}: cannot {action} ({exc})"
    name = errno.errorcode.get(exc.errno, str(exc.errno))
    kept = "; the previous file is unchanged" if action == "write" and Path(path).exists() else ""
    return f"{path}: cannot {action} ({os.strerror(exc.errno)}, {name}){kept}"


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


def refuse_existing_set(out: Path, names: tuple[str, ...], overwrite: bool) -> None:
    """A generated set's entries (``names``) already in ``out`` are kept unless
    ``overwrite``: one line saying so. A file at ``out`` is always refused."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise MegdetError(f"--out {out}: is a file; choose a folder")
    existing = [name for name in names if (out / name).exists()]
    if existing and not overwrite:
        raise MegdetError(
            f"--out {out}: holds a dataset already ({', '.join(existing)}); pass --overwrite "
            "to replace it, or choose another --out"
        )


@contextlib.contextmanager
def atomic_folder(out: Path) -> Iterator[Path]:
    """Build a set of files whole or not at all: write into the folder this yields (a hidden
    sibling of ``out``); when the block ends, its entries replace ``out``'s entries of the
    same names (a new ``out`` is one rename). An interrupted build leaves nothing behind,
    and ``out``'s other files are kept."""
    out = Path(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
        tmp.chmod(0o777 & ~_umask())  # mkdtemp's 0700 would hide the set from colleagues
    except OSError as exc:
        raise MegdetError(write_failure(out, exc)) from None
    try:
        yield tmp
        if not out.exists():
            os.replace(tmp, out)
            _fsync_dir(out.parent)
            return
        trash = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".replaced", dir=out))
        for entry in sorted(tmp.iterdir()):
            if (out / entry.name).exists():
                os.replace(out / entry.name, trash / entry.name)
            os.replace(entry, out / entry.name)
        _fsync_dir(out)
        shutil.rmtree(trash)
    except OSError as exc:
        raise MegdetError(write_failure(Path(exc.filename or out), exc)) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
