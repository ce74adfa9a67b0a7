"""What the engine asks of a task (detection, classification): the one door a task comes in by.

The trainer, evaluation, the plan and the CLI use these members and nothing else; a task is
any object that has them (a ``Protocol``: no base class to inherit, checked by type checkers
and, for its members' presence, by ``isinstance``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from megdet.plan import MemoryEstimate


@runtime_checkable
class Task(Protocol):
    metrics_name: str  # what ``evaluate`` measures, for the final line ("COCO bbox metrics")

    @property
    def num_train_images(self) -> int:
        """What the plan divides into epochs."""

    def estimate_memory(self) -> MemoryEstimate:
        """Memory per process at the task's input size, measured (``images_per_device:
        auto``, ``megdet plan --memory``)."""

    def build_model(self, split: str = "train", norm=None, pretrained: bool = False) -> nn.Module:
        """The model for ``split``'s labels; ``norm`` the normalization constructor (the
        trainer's choice, ``megdet.nn.training_norm``); ``pretrained`` loads initial weights
        (a fresh run, not a resumed one, on rank 0)."""

    def parameter_groups(self, model: nn.Module) -> dict[str, list[nn.Parameter]]:
        """Module groups for the gradient noise scale and per-module learning rates; the
        first one is AGVM's reference (the backbone)."""

    def train_dataset(self) -> torch.utils.data.Dataset:
        """Items keyed by ``(epoch, index)`` from the global-shuffle sampler."""

    def train_group_ids(self) -> list[int] | None:
        """A group per training image that a global batch must not mix (aspect ratio), or
        None."""

    def collate(self, items: list) -> Any:
        """A batch from the dataset's items."""

    def to_device(self, batch, device: torch.device, dtype: torch.dtype = torch.float32):
        """``(inputs, targets)`` on ``device``, floating tensors in ``dtype``."""

    def begin_step(self, model: nn.Module, targets) -> None:
        """Before the forward of a training step (e.g. seeding per-image sampling)."""

    def global_batch_losses(self, model: nn.Module, outputs) -> dict[str, torch.Tensor]:
        """The model's training outputs as named loss terms whose DDP average is the mean
        over the global batch."""

    def step_statistics(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """Per-process numbers to average over processes and log (may be empty)."""

    def batch_statistics(self, per_image: dict[str, float], global_batch: int) -> dict:
        """Logged numbers derived from the averaged ones (may be empty)."""

    def check_evaluation(self) -> None:
        """Check what ``evaluate`` will read (the val annotations, that its images are there)
        and raise a one-line ``MegdetError`` if it cannot work; called before the first
        iteration, so a broken val set is not found after hours of training."""

    def evaluate(
        self, model: nn.Module, device: torch.device, out_dir: Path | None, progress: bool = False
    ) -> dict:
        """Metrics on the validation split, the same on every rank; files to ``out_dir``
        (rank 0 only); ``progress``: this rank shows how far it is (``megdet eval``)."""

    def labels(self) -> dict[str, list]:
        """What a checkpoint keeps so that it alone serves on new inputs (``megdet
        predict``): the class ``names`` in label order, and whatever else maps a label back to
        the dataset (detection: its ``category_ids``). Plain lists, as ``weights_only`` loads."""

    def format_metrics(self, metrics: dict[str, float]) -> str:
        """The metrics as a few lines for the terminal."""
