"""Per-module learning rates past batch 256: AGVM (Xue et al., NeurIPS 2022, "Large-batch
Optimization for Dense Visual Predictions").

A detector's modules do not agree equally on where to go: the gradients of two halves of a
batch point more apart in the heads than in the backbone, so one learning rate, scaled for
the batch, is too large for some modules and too small for others. Every ``interval``
iterations AGVM measures each module group's D_i = 1 - cos(g_A, g_B) between the gradients of
the two halves of the global batch, and scales the group's lr by
sqrt(clamp(D_backbone / D_i, 0.5, 10)), smoothed by an EMA: a group whose halves disagree
more than the backbone's gets a smaller step, one that agrees more a larger one.

The squared norms come from the DDP hook of ``megdet.engine.noise_scale`` (one extra
collective, on the measuring iterations only); every process computes the same numbers from
the same all-reduced values, so all keep the same learning rates.
"""

from __future__ import annotations

import math

EPS = 1e-6  # AGVM's guard against a zero dissimilarity
LOW, HIGH = 0.5, 10.0  # the clamp of D_reference / D_i, before the square root


def dissimilarity(sq_a: float, sq_b: float, sq_mean: float) -> float:
    """1 - cos(g_A, g_B) from |g_A|^2, |g_B|^2 and |(g_A + g_B) / 2|^2 (polarization:
    g_A . g_B = (4 |g|^2 - |g_A|^2 - |g_B|^2) / 2); NaN for a group without gradient."""
    if not (sq_a > 0 and sq_b > 0):
        return math.nan
    cosine = (4 * sq_mean - sq_a - sq_b) / (2 * math.sqrt(sq_a * sq_b))
    return 1 - min(1.0, max(-1.0, cosine))


def multiplier(reference: float, own: float) -> float:
    """AGVM's lr factor of a group with dissimilarity ``own`` against the reference's."""
    return math.sqrt(min(HIGH, max(LOW, (reference + EPS) / (own + EPS))))


class AGVM:
    """The lr multiplier of each module group. ``start``: the first iteration that measures
    and uses them (AGVM starts after the warmup); ``interval``: iterations between
    measurements; ``momentum``: the EMA of the multipliers, which start at 1."""

    def __init__(
        self,
        groups: list[str],
        start: int,
        interval: int,
        momentum: float,
        reference: str = "backbone",
    ) -> None:
        if reference not in groups:
            raise ValueError(f"the reference group {reference!r} is not among {groups}")
        self.start, self.interval, self.momentum = start, interval, momentum
        self.reference = reference
        self.multipliers = dict.fromkeys(groups, 1.0)
        self.dissimilarity = dict.fromkeys(groups, math.nan)  # the last measurement's

    def measures(self, iteration: int) -> bool:
        return iteration >= self.start and (iteration - self.start) % self.interval == 0

    def update(self, half_norms: dict[str, tuple[float, float, float]]) -> None:
        """One measurement: ``half_norms`` per group as ``NoiseScale.half_norms`` gives them
        (empty after an fp16 overflow: nothing changes)."""
        measured = {g: dissimilarity(*half_norms[g]) for g in self.multipliers if g in half_norms}
        reference = measured.get(self.reference, math.nan)
        if math.isnan(reference):
            return  # nothing to compare with (an fp16 overflow, a frozen backbone)
        self.dissimilarity.update(measured)
        for group, own in measured.items():
            if math.isnan(own):
                continue  # a group without gradient this step keeps its multiplier
            new = multiplier(reference, own)
            self.multipliers[group] = (
                self.momentum * self.multipliers[group] + (1 - self.momentum) * new
            )

    def factors(self, iteration: int) -> dict[str, float]:
        """The multiplier of each group's lr at ``iteration`` (none before ``start``)."""
        return dict(self.multipliers) if iteration >= self.start else {}

    def statistics(self) -> dict[str, float]:
        """``lr_factor_<group>`` and ``agvm_d_<group>`` (the last measurement) of the groups
        measured so far, for the logs."""
        measured = [g for g, d in self.dissimilarity.items() if not math.isnan(d)]
        values = {f"lr_factor_{g}": self.multipliers[g] for g in measured}
        return values | {f"agvm_d_{g}": self.dissimilarity[g] for g in measured}

    def state_dict(self) -> dict:
        return {"multipliers": dict(self.multipliers), "dissimilarity": dict(self.dissimilarity)}

    def load_state_dict(self, state: dict) -> None:
        if state:
            self.multipliers.update(state["multipliers"])
            self.dissimilarity.update(state["dissimilarity"])
