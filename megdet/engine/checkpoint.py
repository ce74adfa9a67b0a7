"""Checkpoints, written atomically (``megdet.atomic``), and found again. Checkpoints keep one
generation more (``last.pt`` and ``previous.pt``), so that a ``last.pt`` damaged
after it was written (a full disk, a copy cut short) still leaves one to resume from.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from megdet.atomic import atomic_write
from megdet.errors import MegdetError, one_line

log = logging.getLogger(__name__)

LAST, PREVIOUS = "last.pt", "previous.pt"


def save_checkpoint(path: Path, state: dict) -> None:
    """``state`` must hold plain types and tensors only, so that ``weights_only`` loads it.
    The checkpoint ``path`` replaces is kept as ``previous.pt`` beside it."""
    path = Path(path)
    atomic_write(path, lambda f: torch.save(state, f), "wb", path.with_name(PREVIOUS))


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
