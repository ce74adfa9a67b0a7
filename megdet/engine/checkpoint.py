"""Atomic files: a crash mid-write never leaves a truncated checkpoint or results file.

Write to a temporary file in the same folder, fsync, then ``os.replace`` (atomic on POSIX), as
timm does; the previous complete file stays in place until the new one is whole.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from megdet.errors import MegdetError


def _atomic_write(path: Path, write: Callable[[Any], None], mode: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    _atomic_write(path, lambda f: f.write(text), "w")


def save_checkpoint(path: Path, state: dict) -> None:
    """``state`` must hold plain types and tensors only, so that ``weights_only`` loads it."""
    _atomic_write(path, lambda f: torch.save(state, f), "wb")


def load_checkpoint(path: str | Path) -> dict:
    """Load with ``weights_only=True``: a checkpoint can never execute code."""
    path = Path(path)
    if not path.is_file():
        raise MegdetError(f"{path}: checkpoint not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise MegdetError(f"{path}: not a readable megdet checkpoint ({exc})") from None
    if not isinstance(state, dict) or "model" not in state:
        raise MegdetError(f"{path}: not a megdet checkpoint (no 'model' entry)")
    return state
