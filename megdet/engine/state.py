"""What a training step carries besides the data, with one owner.

The model, the optimizer and the pieces that keep state across steps (the fp16 loss scaler, the
gradient noise scale, AGVM's multipliers, and whatever comes next) each have ``state_dict``,
``load_state_dict`` and ``statistics``. ``TrainingState`` holds them by name: a checkpoint is
the union of their state dicts (an entry per name, ``{}`` for a piece this run does not use),
the log line the union of their statistics (torch.distributed.checkpoint's ``Stateful`` idea).
Adding a piece is one entry where the trainer builds this, not an edit in the save, the
restore and the loop.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

import torch

from megdet.engine.checkpoint import load_model_state
from megdet.errors import MegdetError


class Stateful(Protocol):
    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...

    def statistics(self) -> dict[str, float]: ...


class TrainingState:
    """``parts``: name -> piece (None where this run has none). ``quiet``: the names whose
    statistics stay out of the log (the noise scale measured only for AGVM, ``train.gns:
    false``)."""

    def __init__(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        parts: dict[str, Stateful | None],
        quiet: tuple[str, ...] = (),
    ) -> None:
        self.model = model
        self.optimizer = optimizer
        self.parts = parts
        self.quiet = quiet

    def state_dict(self) -> dict[str, Any]:
        """Everything a checkpoint keeps of the step. On every rank: a piece may need a
        collective to finish its state (the noise scale's all-reduce)."""
        parts = {name: part.state_dict() if part else {} for name, part in self.parts.items()}
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            **parts,
            "rng": {"torch": torch.get_rng_state()},
        }

    def load_state_dict(self, state: dict, path: Path) -> None:
        """Continue from a checkpoint (``path`` names it in errors); pieces missing from it (a
        checkpoint written before they existed) keep their fresh state."""
        load_model_state(self.model, state["model"], path)
        try:
            self.optimizer.load_state_dict(state["optimizer"])
        except ValueError as exc:  # e.g. a checkpoint from before per-module parameter groups
            raise MegdetError(
                f"{path}: its optimizer state does not fit this model's parameter groups "
                f"({exc}); start a new --out"
            ) from None
        for name, part in self.parts.items():
            if part:
                part.load_state_dict(state.get(name, {}))
        torch.set_rng_state(state["rng"]["torch"])

    def statistics(self) -> dict[str, float]:
        """The pieces' numbers for the log line, in the order of ``parts``."""
        values: dict[str, float] = {}
        for name, part in self.parts.items():
            if part and name not in self.quiet:
                values.update(part.statistics())
        return values
