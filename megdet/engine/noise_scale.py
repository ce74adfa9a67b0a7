"""The gradient noise scale of a run, measured as it trains (McCandlish et al. 2018, "An
Empirical Model of Large-Batch Training", appendix A).

Before DDP's all-reduce each process holds the gradient of its own b images; after it, every
process holds the gradient of the global batch B = b x processes. From the squared norms of
the two, without anything more than a few numbers communicated:

    |G|^2 ~ (B |g_B|^2 - b mean|g_b|^2) / (B - b)          (the true gradient's squared norm)
    tr(S) ~ (mean|g_b|^2 - |g_B|^2) / (1/b - 1/B)           (the per-image gradient variance)

both unbiased; each is smoothed by an EMA before their ratio B_simple = tr(S) / |G|^2, the
batch size at which the gradient's noise equals its signal (MegDet's variance equivalence is
about this noise; a batch far above B_simple buys few extra steps' worth of progress).

The local squared norms are read bucket by bucket in a DDP communication hook, just before the
bucket's own all-reduce (DDP's default, unchanged), so no gradient is communicated twice; per
module group (backbone, FPN, RPN, box head, as AGVM separates them) because they differ.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

from megdet import dist

OTHER = "other"  # parameters in no named group


class NoiseScale:
    """Measure the noise scale of each step of a DDP model over ``world_size`` processes of
    ``per_process`` images; ``groups`` names the parameters of each module group."""

    def __init__(
        self,
        groups: dict[str, list[nn.Parameter]],
        per_process: int,
        world_size: int,
        beta: float = 0.95,
    ) -> None:
        if world_size < 2:
            raise ValueError("the noise scale needs gradients of two batch sizes: 2+ processes")
        self.names = [*groups, OTHER]
        self._group = {id(p): i for i, params in enumerate(groups.values()) for p in params}
        self.small, self.big = per_process, per_process * world_size
        self.beta = beta
        self.steps = 0
        size = len(self.names) + 1  # the groups, then all parameters
        self.grad_sq = torch.zeros(size, dtype=torch.float64)
        self.grad_var = torch.zeros(size, dtype=torch.float64)
        # This step's local squared norm of each parameter's gradient: one slot per parameter,
        # so the sums do not depend on how DDP buckets them (it rebuilds its buckets after the
        # first step, and a resumed run's first step would round differently).
        self._local: dict[int, torch.Tensor] = {}
        self._pending: tuple | None = None  # the last step's all-reduce and squared norms
        self._membership: torch.Tensor | None = None  # group x parameter indicator

    def attach(self, ddp: nn.parallel.DistributedDataParallel) -> None:
        ddp.register_comm_hook(state=None, hook=self._hook)

    def _hook(self, state, bucket):
        """Note this bucket's local squared norms, then DDP's own all-reduce."""
        squares = torch.stack(torch._foreach_norm(bucket.gradients())).double() ** 2
        for param, square in zip(bucket.parameters(), squares.unbind(), strict=True):
            self._local[id(param)] = square
        return default_hooks.allreduce_hook(None, bucket)  # the default group, as DDP's

    def _per_group(self, squared: dict[int, torch.Tensor], params) -> torch.Tensor:
        """Sum per group, in the model's parameter order (a fixed order: bitwise repeatable),
        as one product with a parameter-to-group indicator matrix."""
        if not squared:
            return torch.zeros(len(self.names), dtype=torch.float64)
        zero = torch.zeros((), dtype=torch.float64, device=next(iter(squared.values())).device)
        values = torch.stack([squared.get(id(p), zero) for p in params])
        if self._membership is None or self._membership.shape[1] != len(params):
            membership = torch.zeros(len(self.names), len(params), dtype=torch.float64)
            for column, param in enumerate(params):
                membership[self._group.get(id(param), len(self.names) - 1), column] = 1.0
            self._membership = membership
        return (self._membership.to(values.device) @ values).cpu()

    def measure(self, model: nn.Module, loss_scale: float = 1.0) -> None:
        """After backward, on every process: this step's squared norms, local ones averaged
        over the processes by an all-reduce that overlaps the optimizer step (it is finished,
        and the EMAs updated, at the next ``measure`` or ``statistics``). ``loss_scale``: the
        fp16 loss scale of the backward, which the gradients the hook saw still carried (the
        model's are unscaled by now)."""
        self._finish()
        params = list(model.parameters())
        with_grad = [p for p in params if p.grad is not None]
        big = {}
        if with_grad:
            squares = torch.stack(torch._foreach_norm([p.grad for p in with_grad])).double() ** 2
            big = dict(zip(map(id, with_grad), squares.unbind(), strict=True))
        local = self._per_group(self._local, params)
        big = self._per_group(big, params)
        self._local = {}
        device = with_grad[0].grad.device if with_grad else torch.device("cpu")
        local = local.to(device)
        work = dist.all_reduce_sum_async(local)
        self._pending = (work, local, big, loss_scale)

    def _finish(self) -> None:
        if self._pending is None:
            return
        work, local, big, loss_scale = self._pending
        self._pending = None
        if work is not None:
            work.wait()
        small = local.cpu() / dist.get_world_size()
        small = torch.cat([small, small.sum().view(1)]) / loss_scale**2
        big = torch.cat([big, big.sum().view(1)]).cpu()
        b, B = self.small, self.big
        grad_sq = (B * big - b * small) / (B - b)
        grad_var = (small - big) / (1 / b - 1 / B)
        if torch.isfinite(grad_sq).all() and torch.isfinite(grad_var).all():  # fp16 overflow
            self.steps += 1
            self.grad_sq.mul_(self.beta).add_(grad_sq, alpha=1 - self.beta)
            self.grad_var.mul_(self.beta).add_(grad_var, alpha=1 - self.beta)

    def statistics(self) -> dict[str, float]:
        """``gns``, ``grad_sq``, ``grad_var`` of all parameters and ``*_<group>`` of each
        group, from the bias-corrected EMAs (empty before the first step)."""
        self._finish()
        if not self.steps:
            return {}
        correction = 1 - self.beta**self.steps
        grad_sq, grad_var = self.grad_sq / correction, self.grad_var / correction
        values = {}
        for i, name in enumerate([*self.names, ""]):
            if name == OTHER and grad_sq[i] == 0 and grad_var[i] == 0:
                continue
            suffix = f"_{name}" if name else ""
            values[f"grad_sq{suffix}"] = grad_sq[i].item()
            values[f"grad_var{suffix}"] = grad_var[i].item()
            if grad_sq[i] > 0:
                values[f"gns{suffix}"] = (grad_var[i] / grad_sq[i]).item()
        return {k: v for k, v in values.items() if math.isfinite(v)}

    def state_dict(self) -> dict:
        self._finish()
        return {"steps": self.steps, "grad_sq": self.grad_sq.clone(), "grad_var": self.grad_var}

    def load_state_dict(self, state: dict) -> None:
        if state:
            self.steps = int(state["steps"])
            self.grad_sq = state["grad_sq"].to(torch.float64).clone()
            self.grad_var = state["grad_var"].to(torch.float64).clone()
