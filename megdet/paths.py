"""Output paths checked before anything is written: a command says in one line why it cannot
write where it was told (a file where a folder is meant, a folder where a file is, a path under
a file, no permission), before it does any work. A leaf module: every command uses it."""

from __future__ import annotations

import tempfile
from pathlib import Path


def _existing_ancestor(path: Path) -> Path:
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    return existing


def _not_writable(folder: Path) -> str | None:
    try:  # the one reliable test: os.access says yes to root on a read-only mount
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as exc:
        return exc.strerror or type(exc).__name__
    return None


def folder_problem(folder: Path, option: str = "--out") -> str | None:
    """Why ``folder`` cannot be created or written (one line), or None. Writes nothing."""
    folder = Path(folder)
    existing = _existing_ancestor(folder)
    if not existing.is_dir():
        what = "is a file" if existing == folder else f"is under the file {existing}"
        return f"{option} {folder}: {what}; choose a folder"
    if reason := _not_writable(existing):
        return f"{option} {folder}: cannot write in {existing} ({reason}); choose another"
    return None


def file_problem(file: Path, option: str = "--out") -> str | None:
    """Why the file ``file`` cannot be created or replaced (one line), or None."""
    file = Path(file)
    if file.is_dir():
        return f"{option} {file}: is a folder; name a file"
    existing = _existing_ancestor(file.parent)
    if not existing.is_dir():
        return f"{option} {file}: is under the file {existing}; choose another path"
    if reason := _not_writable(existing):
        return f"{option} {file}: cannot write in {existing} ({reason}); choose another"
    return None
