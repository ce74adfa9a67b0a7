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

On the iterations that AGVM measures (``split_next``), the hook first sums each bucket within
each half of the processes, notes the squared norm of the half's mean gradient g_A or g_B, and
only then all-reduces over all processes (scaled so that the result is DDP's mean): one extra
collective on those iterations, no gradient sent twice otherwise. With the squared norm of the
mean g = (g_A + g_B) / 2, each group's g_A . g_B = (4|g|^2 - |g_A|^2 - |g_B|^2) / 2, so
the halves' cosine needs a few numbers per group, never the gradients themselves.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

from megdet import dist

OTHER = "other"  # parameters in no named group


@dataclass(frozen=True)
class Halves:
    """This process's half of the processes (ranks ``[0, W/2)`` or ``[W/2, W)``): the first
    and second halves of every global batch, whatever the number of processes."""

    group: object  # the half's process group
    index: int  # 0: the first half, 1: the second
    size: int  # processes per half
    leader: bool  # the half's first rank, which alone reports the half's numbers


def split_in_halves(world_size: int, rank: int) -> Halves:
    """Create both halves' process groups (every rank, the same order)."""
    if world_size < 2 or world_size % 2:
        raise ValueError(f"two halves of {world_size} processes: needs an even number")
    size = world_size // 2
    group = dist.own_group([list(range(size)), list(range(size, world_size))])
    return Halves(group, rank // size, size, rank % size == 0)


class NoiseScale:
    """Measure the noise scale of each step of a DDP model over ``world_size`` processes of
    ``per_process`` images; ``groups`` names the parameters of each module group."""

    def __init__(
        self,
        groups: dict[str, list[nn.Parameter]],
        per_process: int,
        world_size: int,
        beta: float = 0.95,
        halves: Halves | None = None,
    ) -> None:
        if world_size < 2:
            raise ValueError("the noise scale needs gradients of two batch sizes: 2+ processes")
        self.names = [*groups, OTHER]
        self._group = {id(p): i for i, params in enumerate(groups.values()) for p in params}
        self.small, self.big = per_process, per_process * world_size
        self.beta = beta
        self.steps = 0
        size = len(self.names) + 1  # the groups, then all parameters
        # The EMAs, on the host as plain floats: reading them is never a device read.
        self.grad_sq = [0.0] * size
        self.grad_var = [0.0] * size
        # This step's local squared norm of each parameter's gradient: one slot per parameter,
        # so the sums do not depend on how DDP buckets them (it rebuilds its buckets after the
        # first step, and a resumed run's first step would round differently).
        self._local: dict[int, torch.Tensor] = {}
        self._pending: tuple | None = None  # the last step's all-reduce and squared norms
        self.halves = halves
        self._split = False  # the coming backward reduces within halves first (split_next)
        self._half: dict[int, torch.Tensor] = {}  # |g_A|^2 or |g_B|^2 per parameter
        # The last split step's squared norms per group (and all): the halves', the mean's.
        self._half_norms: tuple[list[float], list[float], list[float]] | None = None
        self._membership: torch.Tensor | None = None  # group x parameter indicator

    def attach(self, ddp: nn.parallel.DistributedDataParallel) -> None:
        ddp.register_comm_hook(state=None, hook=self._hook)

    def split_next(self) -> None:
        """Let the next backward measure the two halves' gradients (see the module's doc)."""
        if self.halves is None:
            raise ValueError("split_next needs the halves given to NoiseScale")
        self._split = True

    def _hook(self, state, bucket):
        """Note this bucket's local squared norms, then DDP's own all-reduce (on a split
        step, within the half first)."""
        self._note(self._local, bucket)
        if self._split:
            halves, world = self.halves, 2 * self.halves.size
            if halves.size > 1:  # one process per half: its gradient is the half's already
                torch.distributed.all_reduce(bucket.buffer(), group=halves.group)
                bucket.buffer().mul_(2 / world)  # the half's mean (in DDP's units)
            self._note(self._half, bucket)
            # allreduce_hook divides by W and sums: (W/2) (g_A + g_B) / W = the mean.
        return default_hooks.allreduce_hook(None, bucket)  # the default group, as DDP's

    @staticmethod
    def _note(into: dict[int, torch.Tensor], bucket) -> None:
        squares = torch.stack(torch._foreach_norm(bucket.gradients())).double() ** 2
        for param, square in zip(bucket.parameters(), squares.unbind(), strict=True):
            into[id(param)] = square

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
            self._membership = membership.to(values.device)  # once: no copy per step
        return self._membership @ values  # on the gradients' device: read with the step's

    def measure(self, model: nn.Module, loss_scale: float = 1.0) -> None:
        """After backward, on every process: this step's squared norms, local ones averaged
        over the processes by an asynchronous all-reduce. The numbers stay on the device:
        the trainer reads them with the step's other numbers in one read (``pending`` and
        ``absorb``); otherwise they are read at the next ``measure`` or ``statistics``.
        ``loss_scale``: the fp16 loss scale of the backward, which the gradients the hook saw
        still carried (the model's are unscaled by now)."""
        self._finish()
        params = list(model.parameters())
        with_grad = [p for p in params if p.grad is not None]
        big = {}
        if with_grad:
            squares = torch.stack(torch._foreach_norm([p.grad for p in with_grad])).double() ** 2
            big = dict(zip(map(id, with_grad), squares.unbind(), strict=True))
        local = self._per_group(self._local, params)
        big = self._per_group(big, params)
        if self._split:  # [local | half A | half B]; each half's leader reports it
            half = self._per_group(self._half, params) * self.halves.leader
            slots = [torch.zeros_like(half), torch.zeros_like(half)]
            slots[self.halves.index] = half
            local = torch.cat([local, *slots])
        self._local, self._half, self._split = {}, {}, False
        device = with_grad[0].grad.device if with_grad else torch.device("cpu")
        local, big = local.to(device), big.to(device)
        work = dist.all_reduce_sum_async(local)
        self._pending = (work, local, big, loss_scale)

    def pending(self) -> torch.Tensor | None:
        """The last ``measure``'s numbers, on the device, once their all-reduce is done (one
        flat tensor to read with others); None if nothing is pending."""
        if self._pending is None:
            return None
        work, local, big, _ = self._pending
        if work is not None:
            work.wait()
        return torch.cat([local.view(-1), big.view(-1)])

    def absorb(self, values: list[float], loss_scale: float | None = None) -> None:
        """Update the EMAs from ``pending()``'s numbers read to the host (``loss_scale``: the
        backward's, read with them; default the one ``measure`` was given). Plain floats from
        here on: nothing of it reads the device again."""
        _, _, _, measured_scale = self._pending
        self._pending = None
        scale = measured_scale if loss_scale is None else loss_scale
        groups, world = len(self.names), dist.get_world_size()
        rows = [
            [v / scale**2 for v in values[start : start + groups]]
            for start in range(0, len(values) - groups, groups)
        ]
        small = _with_total([v / world for v in rows[0]])
        big = _with_total(values[-groups:])
        if len(rows) == 3:
            halves = (_with_total(rows[1]), _with_total(rows[2]), big)
            finite = all(math.isfinite(v) for half in halves for v in half)
            self._half_norms = halves if finite else None
        b, B = self.small, self.big
        grad_sq = [(B * g - b * s) / (B - b) for g, s in zip(big, small, strict=True)]
        grad_var = [(s - g) / (1 / b - 1 / B) for g, s in zip(big, small, strict=True)]
        if all(math.isfinite(v) for v in grad_sq + grad_var):  # fp16 overflow: skipped
            self.steps += 1
            self.grad_sq = _ema(self.grad_sq, grad_sq, self.beta)
            self.grad_var = _ema(self.grad_var, grad_var, self.beta)

    def _finish(self) -> None:
        """Read and absorb what is pending (outside the trainer's one read per step)."""
        numbers = self.pending()
        if numbers is not None:
            self.absorb(numbers.tolist())

    def half_norms(self) -> dict[str, tuple[float, float, float]]:
        """After a split step's ``measure``: per group (and ``""`` for all parameters) the
        squared norms |g_A|^2, |g_B|^2 of the halves' mean gradients and |g|^2 of their mean;
        empty if the step overflowed (fp16). Consumed: a second call returns nothing."""
        self._finish()
        found, self._half_norms = self._half_norms, None
        if found is None:
            return {}
        return {
            name: (found[0][i], found[1][i], found[2][i])
            for i, name in enumerate([*self.names, ""])
        }

    def _corrected(self) -> tuple[list[float], list[float]]:
        """The bias-corrected EMAs (|G|^2, tr(Sigma)) per group, then of all parameters."""
        correction = 1 - self.beta**self.steps
        return [v / correction for v in self.grad_sq], [v / correction for v in self.grad_var]

    def estimates(self) -> tuple[float, float] | None:
        """(|G|^2, tr(Sigma)) of all parameters from the bias-corrected EMAs, the same on
        every rank; None before the first step (AdaScale's gain reads these)."""
        self._finish()
        if not self.steps:
            return None
        grad_sq, grad_var = self._corrected()
        return grad_sq[-1], grad_var[-1]

    def group_estimates(self) -> dict[str, tuple[float, float]]:
        """(|G|^2, tr(Sigma)) of each module group, as ``estimates`` (empty before the first
        step)."""
        self._finish()
        if not self.steps:
            return {}
        grad_sq, grad_var = self._corrected()
        return {
            name: (grad_sq[i], grad_var[i])
            for i, name in enumerate(self.names)
            if not (name == OTHER and grad_sq[i] == 0 and grad_var[i] == 0)  # no parameters
        }

    def statistics(self) -> dict[str, float]:
        """``gns``, ``grad_sq``, ``grad_var`` of all parameters and ``*_<group>`` of each
        group, from the bias-corrected EMAs (empty before the first step)."""
        self._finish()
        if not self.steps:
            return {}
        grad_sq, grad_var = self._corrected()
        values = {}
        for i, name in enumerate([*self.names, ""]):
            if name == OTHER and grad_sq[i] == 0 and grad_var[i] == 0:
                continue
            suffix = f"_{name}" if name else ""
            values[f"grad_sq{suffix}"] = grad_sq[i]
            values[f"grad_var{suffix}"] = grad_var[i]
            if grad_sq[i] > 0:
                values[f"gns{suffix}"] = grad_var[i] / grad_sq[i]
        return {k: v for k, v in values.items() if math.isfinite(v)}

    def state_dict(self) -> dict:
        self._finish()
        return {"steps": self.steps, "grad_sq": torch.tensor(self.grad_sq, dtype=torch.float64),
                "grad_var": torch.tensor(self.grad_var, dtype=torch.float64)}  # fmt: skip

    def load_state_dict(self, state: dict) -> None:
        if state:
            self.steps = int(state["steps"])
            self.grad_sq = state["grad_sq"].to(torch.float64).tolist()
            self.grad_var = state["grad_var"].to(torch.float64).tolist()


def _ema(average: list[float], values: list[float], keep: float) -> list[float]:
    return [keep * a + (1 - keep) * v for a, v in zip(average, values, strict=True)]


def _with_total(per_group: list[float]) -> list[float]:
    """The groups' values, then their sum (all parameters)."""
    return [*per_group, math.fsum(per_group)]
