"""AdaScale SGD (Johnson, Agrawal, Gu, Guestrin, ICML 2020): the learning rate follows the
measured gradient noise instead of the linear scaling rule's assumption about it.

At a global batch B = S x b0 (b0 = solver.base_batch), with the per-image gradient variance
tr(Sigma) and the squared true gradient |G|^2 that ``engine/noise_scale.py`` estimates (its
bias-corrected EMAs), the gain

    r = (tr(Sigma) / b0 + |G|^2) / (tr(Sigma) / B + |G|^2)          in [1, S]

is how many base-batch steps one step of B is worth: S where the noise dominates (the linear
rule's case), 1 where the gradient does (a larger batch buys nothing). The step uses
lr = r x lr_base(tau), and tau, the progress in base-batch iterations, advances by r, so a run
at any batch follows the base batch's schedule (warmup, decays, end) in progress, not in
steps. With S = 1 it is the base schedule itself, step for step.

The same gain as ``fairscale.optim.AdaScale``'s with scale S = processes (its estimator, from
each process's and the averaged gradient, is algebraically the noise scale's: tested).
"""

from __future__ import annotations

import math


def adascale_gain(grad_sq: float, grad_var: float, base_batch: int, batch: int) -> float:
    """r from |G|^2 and the per-image tr(Sigma); clamped to [1, batch / base_batch] (an
    estimate of |G|^2 at or below 0 is all noise: the largest gain)."""
    scale = batch / base_batch
    if not (math.isfinite(grad_sq) and math.isfinite(grad_var)) or grad_var <= 0:
        return 1.0
    if grad_sq <= 0:
        return scale
    gain = (grad_var / base_batch + grad_sq) / (grad_var / batch + grad_sq)
    return min(max(gain, 1.0), scale)


class AdaScale:
    """Progress and gain of a run under ``solver.lr_scaling: adascale``; a piece of the
    training state (``state_dict``, ``statistics``)."""

    def __init__(
        self,
        base_batch: int,
        batch: int,
        per_epoch: int,
        num_images: int,
        per_module: bool = False,
        pace: str = "model",
    ) -> None:
        self.base_batch, self.batch = base_batch, batch
        self.per_module = per_module
        self.pace = pace  # what advances the progress: the model's gain or the smallest module's
        self.module_gains: dict[str, float] = {}  # the last step's, per module group
        self.per_epoch = per_epoch  # base-batch iterations in an epoch of progress
        self.num_images = num_images
        self.progress = 0.0  # tau: base-batch iterations done
        self.steps = 0
        self.gain = 1.0  # the last step's
        self.gain_sum = 0.0

    def update(
        self,
        estimates: tuple[float, float] | None,
        groups: dict[str, tuple[float, float]] | None = None,
    ) -> float:
        """This step's gain from the noise scale's (|G|^2, tr(Sigma)); 1 before it has any.
        With ``per_module``, each group's gain from ``groups``' estimates too (``factors``)."""
        self.gain = adascale_gain(*estimates, self.base_batch, self.batch) if estimates else 1.0
        if self.per_module or self.pace == "module":
            self.module_gains = {
                name: adascale_gain(*values, self.base_batch, self.batch)
                for name, values in (groups or {}).items()
            }
        return self.gain

    def factors(self) -> dict[str, float] | None:
        """Per module group, its lr over the whole model's (its gain / the gain): what
        ``set_lr`` multiplies; None with one gain for all."""
        if not self.per_module or not self.module_gains:
            return None
        return {name: gain / self.gain for name, gain in self.module_gains.items()}

    def advance(self) -> None:
        """The step was taken with ``self.gain``: the progress advances by it, or, with pace
        ``module``, by the smallest module gain (every module's lr at least its base
        schedule's per unit of progress)."""
        pace = self.gain
        if self.pace == "module" and self.module_gains:
            pace = min(self.gain, *self.module_gains.values())
        self.progress += pace
        self.gain_sum += self.gain
        self.steps += 1

    def crossed(self, before: float, period: float) -> bool:
        """Whether the last step carried the progress past a multiple of ``period``."""
        return period > 0 and math.floor(self.progress / period) > math.floor(before / period)

    def statistics(self) -> dict[str, float]:
        if not self.steps:
            return {}
        images = self.steps * self.batch
        return {
            **{f"gain_{name}": gain for name, gain in self.module_gains.items()},
            "gain": self.gain,
            "mean_gain": self.gain_sum / self.steps,
            "progress_epochs": self.progress / self.per_epoch,  # at the base batch
            "images_seen": float(images),
            "data_epochs": images / self.num_images,  # of the training set, actually used
        }

    def state_dict(self) -> dict:
        return {"progress": self.progress, "steps": self.steps, "gain": self.gain,
                "gain_sum": self.gain_sum}  # fmt: skip

    def load_state_dict(self, state: dict) -> None:
        if state:
            self.progress = float(state["progress"])
            self.steps = int(state["steps"])
            self.gain = float(state["gain"])
            self.gain_sum = float(state["gain_sum"])
