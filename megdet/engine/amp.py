"""Mixed precision for the training loop (``train.amp``).

``bf16`` and ``fp16`` run the forward under ``torch.autocast``: convolutions and matrix
products in half precision, everything autocast keeps in float32 in float32; the task keeps
its own numerically delicate parts (detection: anchors, box coordinates, losses) in float32
and the normalization layers compute their statistics in float32. ``fp16`` adds dynamic loss
scaling (``torch.amp.GradScaler``): its overflowing steps are skipped, which is not a
divergence while the scale is still at least 1.
"""

from __future__ import annotations

import math
from contextlib import AbstractContextManager

import torch

HALF = {"bf16": torch.bfloat16, "fp16": torch.float16}


class MixedPrecision:
    """Autocast and loss scaling as one object the trainer asks; ``mode`` "none" makes every
    method a no-op, so the loop has one path."""

    def __init__(self, mode: str, device: torch.device) -> None:
        self.mode = mode
        self.device_type = device.type
        self.scaler = torch.amp.GradScaler(device.type, enabled=mode == "fp16")
        self.skipped_steps = 0

    def autocast(self) -> AbstractContextManager:
        return torch.autocast(
            self.device_type, dtype=HALF.get(self.mode, torch.bfloat16), enabled=self.mode in HALF
        )

    def backward(self, loss: torch.Tensor, optimizer: torch.optim.Optimizer) -> None:
        """Backward of the scaled loss, then the gradients unscaled in place, so that their
        norm, clipping and the divergence guard see the true gradients."""
        self.scaler.scale(loss).backward()
        if self.scaler.is_enabled():
            self.scaler.unscale_(optimizer)

    def loss_scale(self) -> float:
        """The factor the loss was multiplied by for this step's backward (1 without fp16)."""
        return self.scaler.get_scale() if self.scaler.is_enabled() else 1.0

    def overflow_skipped(self, grad_norm: float) -> bool:
        """A non-finite gradient that the fp16 scaler skips (and halves its scale for); at a
        scale below 1 the gradient itself overflows fp16: a real divergence."""
        return (
            self.scaler.is_enabled()
            and not math.isfinite(grad_norm)
            and self.scaler.get_scale() >= 1.0
        )

    def step(self, optimizer: torch.optim.Optimizer, grad_norm: float) -> None:
        if self.overflow_skipped(grad_norm):
            self.skipped_steps += 1
        self.scaler.step(optimizer)  # skipped by the scaler itself when it found an inf
        self.scaler.update()

    def statistics(self) -> dict[str, float]:
        """What the metrics log gets: the loss scale and the steps skipped so far (fp16)."""
        if not self.scaler.is_enabled():
            return {}
        return {"loss_scale": self.scaler.get_scale(), "skipped_steps": self.skipped_steps}

    def state_dict(self) -> dict:
        return {"scaler": self.scaler.state_dict(), "skipped_steps": self.skipped_steps}

    def load_state_dict(self, state: dict) -> None:
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.skipped_steps = int(state.get("skipped_steps", 0))
