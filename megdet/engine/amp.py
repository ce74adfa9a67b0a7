"""Mixed precision for the training loop (``train.amp``).

``bf16`` and ``fp16`` run the forward under ``torch.autocast``: convolutions and matrix
products in half precision, everything autocast keeps in float32 in float32; the task keeps
its own numerically delicate parts (detection: anchors, box coordinates, losses) in float32
and the normalization layers compute their statistics in float32. ``fp16`` adds dynamic loss
scaling (``torch.amp.GradScaler``): its overflowing steps are skipped, which is not a
divergence while the scale is still at least 1.
"""

from __future__ import annotations

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

    def pending(self, optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
        """fp16: this backward's loss scale and whether the unscaled gradients hold an inf or
        NaN (what the scaler's own ``step`` reads), on the device, for the trainer to read
        with the step's other numbers; nothing otherwise."""
        if not self.scaler.is_enabled():
            return []
        # GradScaler's own state (private, unchanged since torch 1.6): the tensors its step
        # would read, recorded by unscale_ in backward.
        scale = self.scaler._get_scale_async()
        found = self.scaler._per_optimizer_states[id(optimizer)]["found_inf_per_device"]
        overflow = sum(f.to(scale.device) for f in found.values())
        return [scale.double().view(1), torch.as_tensor(overflow).double().view(1)]

    def skips(self, found_inf: bool, loss_scale: float) -> bool:
        """A non-finite gradient that the fp16 scaler skips (and halves its scale for); at a
        scale below 1 the gradient itself overflows fp16: a real divergence."""
        return self.scaler.is_enabled() and found_inf and loss_scale >= 1.0

    def step(self, optimizer: torch.optim.Optimizer, found_inf: bool, loss_scale: float) -> None:
        """The optimizer's step unless fp16's gradients overflowed, decided from the numbers
        already read (``pending``), so that the scaler reads nothing itself; then its
        update (which only halves or grows its scale on the device)."""
        if not self.scaler.is_enabled():
            optimizer.step()
            return
        if self.skips(found_inf, loss_scale):
            self.skipped_steps += 1
        elif not found_inf:
            optimizer.step()
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
