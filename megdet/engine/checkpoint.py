"""Atomic files: a crash mid-write never leaves a truncated checkpoint or results file.

Write to a temporary file in the same folder, fsync, then ``os.replace`` (atomic on POSIX), as
timm does; the previous complete file stays in place until the new one is whole. Checkpoints
keep one generation more (``last.pt`` and ``previous.pt``), so that a ``last.pt`` damaged
after it was written (a full disk, a copy cut short) still leaves one to resume from.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from megdet.errors import MegdetError, one_line

log = logging.getLogger(__name__)

LAST, PREVIOUS = "last.pt", "previous.pt"


def _atomic_write(
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
    _atomic_write(path, write, "wb")


def atomic_write_text(path: Path, text: str) -> None:
    _atomic_write(path, lambda f: f.write(text), "w")


def save_checkpoint(path: Path, state: dict) -> None:
    """``state`` must hold plain types and tensors only, so that ``weights_only`` loads it.
    The checkpoint ``path`` replaces is kept as ``previous.pt`` beside it."""
    path = Path(path)
    _atomic_write(path, lambda f: torch.save(state, f), "wb", path.with_name(PREVIOUS))


def newest_checkpoint(folder: Path) -> tuple[dict, Path] | None:
    """The newest readable checkpoint in ``folder`` (``last.pt``, else ``previous.pt``) and its
    path; None when there is none. A damaged one is skipped with a warning."""
    problems = []
    for name in (LAST, PREVIOUS):
        path = Path(folder) / name
        if not path.is_file():
            continue
        try:
            return load_checkpoint(path), path
        except MegdetError as exc:
            log.warning("%s; trying the previous checkpoint", exc)
            problems.append(str(exc))
    if problems:
        raise MegdetError(f"{folder}: no readable checkpoint to resume from ({problems[-1]})")
    return None


def load_checkpoint(path: str | Path) -> dict:
    """Load with ``weights_only=True``: a checkpoint can never execute code."""
    path = Path(path)
    if not path.is_file():
        raise MegdetError(f"{path}: checkpoint not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise MegdetError(f"{path}: not a readable megdet checkpoint ({one_line(exc)})") from None
    if not isinstance(state, dict) or "model" not in state:
        raise MegdetError(f"{path}: not a megdet checkpoint (no 'model' entry)")
    return state


def load_model_state(model, state: dict, path: Path) -> None:
    """``model.load_state_dict`` with a one-line error naming the keys that do not fit."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or wrong:
        raise MegdetError(
            f"{path}: weights do not fit this model (missing {missing[:3]}, unexpected "
            f"{unexpected[:3]}, wrong shape {wrong[:3]}); check model.* and the data's classes"
        )
    model.load_state_dict(state)
