"""The plan: what a run will do, computed from the config before any training.

Users change ``train.batch_size`` and nothing else; the plan applies the linear scaling rule,
turns the epoch policy into iterations for that batch, and splits the batch over processes.
It is printed, written to ``RUN_DIR/plan.json``, and drives the schedule.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path

from megdet.config import Config
from megdet.errors import ConfigError, DataError

# Paper policies (MegDet section 4): ([(epoch, lr factor), ...], last epoch).
POLICIES = {
    "normal": ([(8.0, 0.1), (10.0, 0.1)], 11.0),
    "long": ([(11.0, 0.1), (14.0, 0.1), (17.0, 0.5)], 18.0),
}


@dataclass(frozen=True)
class BNGroups:
    """How BN statistics are pooled (MegDet's "BN size"): over ``ranks_per_group``
    consecutive processes, or over chunks of ``local_group_size`` images inside each process."""

    images_per_group: int
    ranks_per_group: int
    local_group_size: int | None

    def groups(self, world_size: int) -> list[list[int]]:
        k = self.ranks_per_group
        return [list(range(start, start + k)) for start in range(0, world_size, k)]


def bn_groups(cfg: Config, world_size: int, batch: int) -> BNGroups | None:
    """Turn ``model.bn_size`` into groups for a global ``batch``; None unless norm is cgbn."""
    if cfg.model.norm != "cgbn":
        return None
    per_device = batch // world_size
    size = cfg.model.bn_size or batch  # null: all processes
    if size <= per_device:
        if per_device % size:
            raise ConfigError(
                f"model.bn_size: {size} does not divide the {per_device} images per process"
            )
        return BNGroups(size, 1, size)
    ranks = size // per_device
    if size % per_device or world_size % ranks:
        raise ConfigError(
            f"model.bn_size: {size} images do not fit {world_size} processes x {per_device} "
            f"images; use a divisor of {per_device} or a multiple of it that divides "
            f"{batch}"
        )
    # Consecutive ranks: torchrun numbers each node's processes consecutively, so a group of
    # k ranks stays inside one node whenever k divides the processes per node (as in MegDet).
    return BNGroups(size, ranks, None)


@dataclass(frozen=True)
class MemoryEstimate:
    """What a task measured of its model's memory per process (``Task.estimate_memory``),
    for ``images_per_device: auto`` and ``megdet plan --memory``."""

    image_size: tuple[int, int]  # (height, width) the estimate was measured at
    weights_mb: float  # weights, gradients, momentum and DDP buckets: 4 x parameters
    fixed_mb: dict[str, float]  # activations not proportional to images, per mode
    per_image_mb: dict[str, float]  # activations per image, per checkpointing mode

    def total_mb(self, mode: str, images: int) -> float:
        return self.weights_mb + self.fixed_mb[mode] + images * self.per_image_mb[mode]

    def images_that_fit(self, mode: str, budget_gb: float) -> int:
        free = budget_gb * 1024 - self.weights_mb - self.fixed_mb[mode]
        return max(0, int(free // self.per_image_mb[mode]))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class Plan:
    world_size: int
    global_batch: int
    images_per_device: int
    num_train_images: int
    base_lr: float
    base_batch: int
    lr: float
    warmup: str
    warmup_iters: int
    warmup_start_lr: float
    iters_per_epoch: int
    epochs: float
    max_iter: int
    milestones: list[list[float]]  # [[iteration, factor], ...]
    bn_groups: BNGroups | None = None
    # Measured memory per process (megdet plan --memory, or images_per_device: auto).
    memory: dict | None = None
    precision_note: str | None = None  # train.amp where it may be slower than float32
    # solver.module_lr agvm: the first iteration that measures (null: agvm off).
    agvm_start: int | None = None
    agvm_interval: int | None = None
    # solver.lr_scaling adascale: lr, warmup_iters and milestones are the base batch's, in
    # its iterations of progress (tau); the run ends when tau reaches progress_iters, after
    # between min_steps (every gain at its largest, scale) and max_iter steps (gain 1).
    lr_scaling: str = "linear"
    scale: float = 1.0  # global batch / base batch
    progress_per_epoch: int | None = None  # base-batch iterations in an epoch
    progress_iters: int | None = None
    min_steps: int | None = None
    lr_scaling_note: str | None = None  # solver.lr_scaling auto: the rule taken and why
    adascale_per_module: bool = False  # a gain per module group (solver.adascale.per_module)

    @property
    def adascale(self) -> bool:
        return self.lr_scaling == "adascale"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def _adascale_summary(self, warmup: str, steps: str, bn: str) -> str:
        """The plan under AdaScale: the base batch's schedule, and the bounds on the steps."""
        base = round(self.global_batch / self.scale)
        cut = (
            f", cut to {self.max_iter} steps by train.max_iter"
            if self.max_iter < (self.progress_iters)
            else ""
        )
        return (
            f"{self.world_size} process(es) x {self.images_per_device} images = global batch "
            f"{self.global_batch}; AdaScale: each step's lr is its gain (1 to {self.scale:g}, "
            f"measured{', per module group' if self.adascale_per_module else ''}) x batch "
            f"{base}'s lr {self.lr:g} ({warmup}; decay {steps}, in iterations "
            f"of progress at batch {base}); {self.epochs:g} epochs of progress at batch {base} "
            f"= {self.progress_iters} iterations: between {self.min_steps} steps (gain "
            f"{self.scale:g}) and {self.progress_iters} (gain 1){cut}; {self.iters_per_epoch} "
            f"steps per epoch of data{bn}" + self._notes()
        )

    def _notes(self) -> str:
        """The lines under the summary: measured memory, precision, the lr rule taken."""
        notes = [self.memory["summary"] if self.memory else None, self.precision_note]
        return "".join(f"\n{note}" for note in [*notes, self.lr_scaling_note] if note)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def summary(self) -> str:
        steps = ", ".join(f"x{f:g} at {int(m)}" for m, f in self.milestones) or "none"
        bn = ""
        if self.bn_groups:
            g = self.bn_groups
            where = f"{g.ranks_per_group} process(es)" if not g.local_group_size else "1 process"
            bn = f"; CGBN over {g.images_per_group} images ({where} per group)"
        length = f"{self.max_iter} iterations"
        warmup = "no warmup"
        if self.warmup_iters:
            warmup = (
                f"{self.warmup} warmup from {self.warmup_start_lr:g} over {self.warmup_iters} "
                "iterations"
            )
        planned = round(self.epochs * self.iters_per_epoch)
        if self.max_iter < planned:
            length = f"{planned} iterations, cut to {self.max_iter} by train.max_iter"
        if self.adascale:
            return self._adascale_summary(warmup, steps, bn)
        return (
            f"{self.world_size} process(es) x {self.images_per_device} images = global batch "
            f"{self.global_batch}; lr {self.base_lr:g} x {self.global_batch}/{self.base_batch} = "
            f"{self.lr:g}; {warmup}; {self.iters_per_epoch} iterations/epoch x "
            f"{self.epochs:g} epochs = {length}; decay {steps}{bn}"
            + (
                f"; AGVM module lr from iteration {self.agvm_start}, measured every "
                f"{self.agvm_interval}"
                if self.agvm_start is not None
                else ""
            )
            + self._notes()
        )


def make_plan(
    cfg: Config, world_size: int, num_train_images: int, memory: MemoryEstimate | None = None
) -> Plan:
    """What a run will do. ``memory`` (measured by ``estimate_memory``) is required when
    ``train.images_per_device`` is ``auto`` and reported whenever it is given."""
    if num_train_images < 1:  # here, so that `megdet plan` refuses it as `train` does
        where = cfg.data.train.json or cfg.data.train.images or "data.train"
        raise DataError(f"{where}: the training set has no images; check data.train")
    batch = cfg.train.batch_size
    per_device = cfg.train.images_per_device
    memory_report = None
    if per_device == "auto" and memory is None:
        raise ConfigError("train.images_per_device: auto needs a memory estimate")
    if memory is not None:
        memory_report = _memory_report(cfg, memory)
        if per_device == "auto":
            fit = memory_report["images_that_fit"][cfg.train.checkpointing]
            per_device = _largest_valid_per_device(cfg, world_size, fit)
            if per_device != fit:
                memory_report["summary"] += (
                    f"; {per_device} chosen, the most that model.bn_size={cfg.model.bn_size} "
                    "can group"
                )
            if per_device < 1:
                raise ConfigError(
                    f"train.memory_budget_gb: {cfg.train.memory_budget_gb:g} GB does not hold "
                    f"one image ({memory_report['summary']}); raise it or turn on "
                    "train.checkpointing"
                )
    if per_device is not None:
        batch = per_device * world_size
    if batch % world_size:
        raise ConfigError(
            f"train.batch_size: {batch} images cannot be split evenly over {world_size} "
            f"processes; use a multiple of {world_size}"
        )
    solver = cfg.solver
    lr = solver.base_lr * batch / solver.base_batch  # linear scaling rule
    iters_per_epoch = -(-num_train_images // batch)
    # The schedule's clock: this batch's iterations, or, under AdaScale, the base batch's.
    schedule_per_epoch = iters_per_epoch
    rule, rule_note = _lr_scaling(solver.lr_scaling, world_size, batch, solver.base_batch)
    adascale = rule == "adascale"
    if adascale:
        if world_size < 2:
            raise ConfigError(
                "solver.lr_scaling: adascale measures the gradient noise from two batch sizes "
                "(each process's and the global one); run 2+ processes (--nproc), or use linear"
            )
        if batch < solver.base_batch:
            raise ConfigError(
                f"solver.lr_scaling: adascale scales up from solver.base_batch "
                f"{solver.base_batch}; train.batch_size {batch} is smaller"
            )
        lr = solver.base_lr  # the base batch's rate; each step multiplies it by its gain
        schedule_per_epoch = -(-num_train_images // solver.base_batch)
    if solver.policy == "step":
        factors = solver.factors or [solver.gamma] * len(solver.steps)
        steps, end = list(zip(solver.steps, factors, strict=True)), cfg.train.epochs
    else:
        steps, end = POLICIES[solver.policy]
        if cfg.train.epochs is not None and cfg.train.epochs != end:
            raise ConfigError(
                f"train.epochs: {cfg.train.epochs:g} conflicts with solver.policy="
                f"{solver.policy}, which ends at epoch {end:g}; leave train.epochs unset"
            )
    max_iter = round(end * schedule_per_epoch)  # adascale: at most one step per base iteration
    if cfg.train.max_iter is not None:
        max_iter = min(max_iter, cfg.train.max_iter)
    warmup_iters = solver.warmup_iters
    if solver.warmup_epochs is not None:
        warmup_iters = round(solver.warmup_epochs * schedule_per_epoch)
    if solver.warmup == "none":
        warmup_iters = 0
    agvm_start = None
    if solver.module_lr == "agvm":
        if world_size < 2 or world_size % 2:
            raise ConfigError(
                f"solver.module_lr: agvm compares the gradients of two halves of the "
                f"processes; run an even number of them (--nproc), not {world_size}"
            )
        # In steps. Under AdaScale the warmup's end in steps is measured, not planned: the
        # earliest it can come (every gain at its largest) is taken.
        agvm_start = warmup_iters if not adascale else -(-warmup_iters * solver.base_batch // batch)
        if solver.agvm.start_epochs is not None:
            agvm_start = round(solver.agvm.start_epochs * iters_per_epoch)
    if solver.warmup_factor is None:
        start = min(solver.base_lr, lr)  # MegDet: start at the small-batch rate
    else:
        start = lr * solver.warmup_factor
    return Plan(
        world_size=world_size,
        global_batch=batch,
        images_per_device=batch // world_size,
        num_train_images=num_train_images,
        base_lr=solver.base_lr,
        base_batch=solver.base_batch,
        lr=lr,
        warmup=solver.warmup,
        warmup_iters=warmup_iters,
        warmup_start_lr=start,
        iters_per_epoch=iters_per_epoch,
        epochs=end,
        max_iter=max_iter,
        milestones=[[round(epoch * schedule_per_epoch), factor] for epoch, factor in steps],
        bn_groups=bn_groups(cfg, world_size, batch),
        memory=memory_report,
        precision_note=precision_note(cfg.train.amp),
        agvm_start=agvm_start,
        agvm_interval=solver.agvm.interval if agvm_start is not None else None,
        lr_scaling_note=rule_note,
        **(
            _adascale_fields(
                batch / solver.base_batch, schedule_per_epoch, end, solver.adascale.per_module
            )
            if adascale
            else {}
        ),
    )


def _lr_scaling(asked: str, world_size: int, batch: int, base_batch: int) -> tuple[str, str | None]:
    """The rule ``solver.lr_scaling`` names, with ``auto`` resolved, and what the plan says of
    the choice (None where the config named the rule itself)."""
    if asked != "auto":
        return asked, None
    if batch <= base_batch:
        return "linear", (
            f"solver.lr_scaling auto: the linear rule (batch {batch} is not above "
            f"solver.base_batch {base_batch}; AdaScale would be the same run)"
        )
    if world_size < 2:
        return "linear", (
            f"solver.lr_scaling auto: the linear rule, as AdaScale needs 2+ processes to "
            f"measure the gradient noise; batch {batch} is {batch / base_batch:g}x "
            f"solver.base_batch, where the linear rule may diverge: run --nproc 2 or more"
        )
    return (
        "adascale",
        f"solver.lr_scaling auto: AdaScale ({world_size} processes measure the noise)",
    )


def _adascale_fields(scale: float, per_epoch: int, epochs: float, per_module: bool) -> dict:
    progress = round(epochs * per_epoch)
    return {
        "lr_scaling": "adascale",
        "adascale_per_module": per_module,
        "scale": scale,
        "progress_per_epoch": per_epoch,
        "progress_iters": progress,
        "min_steps": math.ceil(progress / scale),
    }


def precision_note(amp: str, cpu_flags: set[str] | None = None) -> str | None:
    """On a machine without a GPU, bfloat16 autocast pays only where the CPU multiplies
    bfloat16 natively (AMX tiles): measured 1.23x (demo) and 2.55x (ResNet-50 FPN) faster
    on a Xeon with AMX, 5.6x slower on an AVX2 EPYC (BENCHMARKS.md). fp16 on a CPU is slower
    still. Said where a run would be slower, never silently changed."""
    import torch

    if amp == "none" or torch.cuda.is_available():
        return None
    flags = _cpu_flags() if cpu_flags is None else cpu_flags
    if amp == "bf16" and "amx_bf16" in flags:
        return None
    if amp == "bf16":
        why = "no AMX) is likely slower than float32 (5.6x on an AVX2 EPYC, BENCHMARKS.md"
    else:  # measured here: 18x slower steps of ResNet-50 FPN at 64 x 96 px
        why = "no native float16 arithmetic on CPUs) is many times slower than float32"
    return (
        f"train.amp={amp} on this CPU ({why}): set train.amp=none here; bf16 pays on CPUs "
        "with AMX (Intel Xeon 4th gen and later)"
    )


def _cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _largest_valid_per_device(cfg: Config, world_size: int, fit: int) -> int:
    """The most images per process, at most ``fit``, that the BN groups can be made of."""
    for per_device in range(fit, 0, -1):
        try:
            bn_groups(cfg, world_size, per_device * world_size)
        except ConfigError:
            continue
        return per_device
    return 0


def _memory_report(cfg: Config, memory: MemoryEstimate) -> dict:
    mode, budget = cfg.train.checkpointing, cfg.train.memory_budget_gb
    modes = ["none"] if mode == "none" else ["none", mode]
    fit = {m: memory.images_that_fit(m, budget) for m in modes}
    per_image = {m: round(memory.per_image_mb[m], 1) for m in modes}
    h, w = memory.image_size
    lines = [
        f"memory per process at {h}x{w} px: weights, gradients, momentum {memory.weights_mb:.0f} "
        f"MB; activations per image {per_image['none']:.1f} MB without checkpointing"
    ]
    if mode != "none":
        saved = 1 - memory.per_image_mb[mode] / memory.per_image_mb["none"]
        lines[0] += f", {per_image[mode]:.1f} MB with checkpointing={mode} ({saved:.0%} less)"
    choice = cfg.train.images_per_device
    if choice == "auto":
        lines.append(
            f"images_per_device auto: {fit[mode]} images fit {budget:g} GB with "
            f"checkpointing={mode}" + (f" ({fit['none']} without)" if mode != "none" else "")
        )
    return {
        "image_size": [h, w],
        "weights_mb": round(memory.weights_mb, 1),
        "activations_per_image_mb": per_image,
        "activations_fixed_mb": {m: round(memory.fixed_mb[m], 1) for m in modes},
        "budget_gb": budget,
        "images_that_fit": fit,
        "summary": "; ".join(lines),
    }
