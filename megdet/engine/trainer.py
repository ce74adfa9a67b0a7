"""The training loop: fetch -> forward -> loss -> backward -> step -> schedule -> events.

Synchronous data parallel (DDP): each process's loss terms are weighted by its share of the
global batch (``task.global_batch_losses``) and DDP averages gradients over processes, so every
step uses the mean over the whole global batch (MegDet section 3.1, Goyal et al. section 2).
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel

from megdet import dist
from megdet.config import Config, config_to_dict, dump_config
from megdet.data.sampler import GlobalShuffleSampler
from megdet.engine.amp import MixedPrecision
from megdet.engine.checkpoint import LAST, newest_checkpoint, save_checkpoint
from megdet.engine.events import EventWriter
from megdet.engine.noise_scale import NoiseScale, split_in_halves
from megdet.engine.run_dir import settle_replacement, start_run_dir
from megdet.engine.state import TrainingState
from megdet.engine.stop import StopRequested, StopSignals
from megdet.engine.task import Task
from megdet.errors import MegdetError
from megdet.hardware import describe
from megdet.nn import training_norm
from megdet.nn.weights import record_backbone_source
from megdet.plan import Plan, make_plan
from megdet.solver import build_optimizer, lr_at, set_lr
from megdet.solver.adascale import AdaScale
from megdet.solver.module_lr import AGVM

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    model: torch.nn.Module
    plan: Plan
    metrics: dict[str, float]  # the final evaluation, identical on every rank
    steps: int = 0  # the iterations the run has done (under AdaScale: measured, not planned)


@dataclass
class _Loop:
    """What the loop needs besides the config and the model, built once by ``train``."""

    ddp: torch.nn.Module
    state: TrainingState
    loader: torch.utils.data.DataLoader
    about: dict  # what every checkpoint repeats (``_about``)
    resumed: bool


class DivergenceError(MegdetError):
    """The loss or the gradients stopped being finite, or the loss passed train.max_loss."""


def train(
    cfg: Config,
    task: Task,
    run_dir: Path,
    ctx: dist.DistContext,
    resume: bool = False,
    replace: bool = False,
) -> TrainResult:
    """Train ``task`` in this process group; rank 0 writes ``run_dir``.

    ``task`` supplies the model, the training set and the evaluator; the loop is task-agnostic.
    ``resume`` continues from the newest complete checkpoint in ``run_dir`` (if there is one)
    exactly where it stopped: same weights, momentum, data order and schedule position.
    ``replace`` moves a previous run's files aside once this one is ready to start, deletes
    them at its first checkpoint, and puts them back if it ends without one.
    """
    found = _find_checkpoint(run_dir, ctx) if resume else None
    # The run's config.yaml records the backbone file it started from: a fresh run resolves
    # it, a resumed one keeps what its checkpoint recorded. Rank 0 reads the file (only it
    # loads the weights: other nodes need not have it); every rank receives the record.
    recorded = _agreed(lambda: _backbone_source(cfg.model, found) if ctx.is_main else None)
    cfg = dataclasses.replace(cfg, model=dist.broadcast_object(recorded))
    memory = None
    if cfg.train.images_per_device == "auto":  # measured once, the same answer on every rank
        memory = task.estimate_memory() if ctx.is_main else None
        memory = dist.broadcast_object(memory)
    plan = make_plan(cfg, ctx.world_size, task.num_train_images, memory)
    if ctx.is_main:
        log.info("plan: %s", plan.summary())

    about = _about(cfg, plan, task) if ctx.is_main else {}
    norm = training_norm(cfg.model.norm, plan.bn_groups, ctx.world_size)
    # A resumed run loads its checkpoint, a fresh one the pretrained backbone (rank 0 only: the
    # others receive the weights); the same initial weights on every rank either way.
    torch.manual_seed(cfg.train.seed)
    model = _agreed(lambda: task.build_model(norm=norm, pretrained=ctx.is_main and not found))
    dtype = getattr(torch, cfg.train.dtype)  # float32, or float64 for numerical references
    model = model.to(ctx.device, dtype)
    dist.broadcast_module_state(model)
    modules = task.parameter_groups(model)
    optimizer = build_optimizer(model, cfg.solver, plan.lr, modules)
    amp = MixedPrecision(cfg.train.amp, ctx.device)
    ddp = _data_parallel(model) if ctx.world_size > 1 else model
    noise = module_lr = None
    if plan.agvm_start is not None:  # the plan refused it unless the processes are even
        agvm = cfg.solver.agvm
        module_lr = AGVM([*modules, "other"], plan.agvm_start, agvm.interval, agvm.momentum)
    adascale = None
    if plan.adascale:  # the plan refused it on one process
        adascale = AdaScale(cfg.solver.base_batch, plan.global_batch, plan.progress_per_epoch,
                            task.num_train_images, cfg.solver.adascale.per_module,
                            cfg.solver.adascale.pace)  # fmt: skip
    if (cfg.train.gns or module_lr or adascale) and ctx.world_size > 1:
        halves = split_in_halves(ctx.world_size, ctx.rank) if module_lr else None
        noise = NoiseScale(modules, plan.images_per_device, ctx.world_size, halves=halves)
        noise.attach(ddp)
    # Every piece of state a step carries; the checkpoint and the log line are their union.
    parts = {"amp": amp, "noise_scale": noise, "module_lr": module_lr, "adascale": adascale}
    state = TrainingState(model, optimizer, parts, quiet=() if cfg.train.gns else ("noise_scale",))
    start_iter = _restore(found, state, plan) if found else 0

    sampler = GlobalShuffleSampler(
        task.num_train_images,
        plan.global_batch,
        ctx.rank,
        ctx.world_size,
        cfg.train.seed,
        max_iter=plan.max_iter,
        start_iter=start_iter,
        group_ids=task.train_group_ids(),
    )
    loader = torch.utils.data.DataLoader(
        task.train_dataset(),
        batch_sampler=sampler,
        num_workers=cfg.data.num_workers,
        collate_fn=task.collate,
        pin_memory=ctx.device.type == "cuda",
    )
    loop = _Loop(ddp, state, loader, about, resumed=resume)
    _agreed(task.check_evaluation)  # evaluation reads these at the end: check them now
    if ctx.is_main:  # the run can start: only now does its folder change
        resumed_at = start_iter if resume else None  # 0: resumed with no checkpoint to load
        plan_json = json.dumps({**plan.to_dict(), "hardware": describe(ctx.device)}, indent=2)
        start_run_dir(run_dir, dump_config(cfg), plan_json + "\n", replace, resumed_at)
    try:
        return _train_loop(cfg, task, run_dir, ctx, plan, model, start_iter, loop)
    finally:
        if ctx.is_main:  # a replaced run is deleted once this one has a checkpoint, else back
            settle_replacement(run_dir)


def _combined(first: dict | None, second: dict | None) -> dict | None:
    """Two sets of per-module lr factors (AGVM's, AdaScale's), multiplied."""
    if not first or not second:
        return first or second
    return {name: first.get(name, 1.0) * second.get(name, 1.0) for name in {*first, *second}}


def _train_loop(cfg, task, run_dir, ctx, plan, model, start_iter, loop: _Loop) -> TrainResult:
    """The loop, from ``start_iter`` to the plan's end."""
    ddp, loader, state = loop.ddp, loop.loader, loop.state
    optimizer = state.optimizer
    amp, noise, module_lr, adascale = (
        state.parts[k] for k in ("amp", "noise_scale", "module_lr", "adascale")
    )
    dtype = getattr(torch, cfg.train.dtype)
    events = EventWriter(
        run_dir,
        plan.max_iter,
        start_iter=start_iter,
        tensorboard=cfg.log.tensorboard,
        enabled=ctx.is_main,
        resumed=loop.resumed,
    )
    # Evaluations every eval_period epochs: of steps, or under AdaScale of progress.
    eval_every = cfg.train.eval_period * (plan.progress_per_epoch or plan.iters_per_epoch)
    done = start_iter
    epoch = _epochs(plan, done, adascale)
    model.train()
    with StopSignals() as stop:
        for iteration, batch in enumerate(loader, start=start_iter):
            # Under AdaScale: the base batch's lr at this progress, times the gain (below).
            lr = lr_at(plan, adascale.progress if adascale else iteration)
            measuring = module_lr is not None and module_lr.measures(iteration)
            if measuring:
                noise.split_next()
            images, targets = task.to_device(batch, ctx.device, dtype)
            task.begin_step(model, targets)
            with amp.autocast():
                losses = task.global_batch_losses(model, ddp(images, targets))
            loss = sum(losses.values())
            # The mean loss over all processes, all-reduced while backward runs.
            # With it, whether a stop signal reached any process: all stop after the same step.
            asked = torch.full((), float(stop.requested), dtype=torch.float64, device=loss.device)
            flags = [(~torch.isfinite(loss)).double(), asked]
            health = torch.stack([loss.detach().double(), *flags])
            health_work = dist.all_reduce_sum_async(health)
            optimizer.zero_grad(set_to_none=True)
            amp.backward(loss, optimizer)
            if noise:  # its all-reduce runs while the gradient norm is computed
                noise.measure(model)
            read = _read_step(health, health_work, model, noise, amp, optimizer)
            _stop_if_diverged(read, losses, iteration, lr, cfg, run_dir, ctx, amp)
            grad_norm = read.grad_norm
            if noise:
                noise.absorb(read.noise, read.loss_scale)
            if measuring:  # this step's multipliers, used by this step (as AGVM does)
                module_lr.update(noise.half_norms())
            factors = module_lr.factors(iteration) if module_lr else None
            if adascale:  # this step's gain, from this step's estimates (as AGVM's)
                lr *= adascale.update(noise.estimates(), noise.group_estimates())
                factors = _combined(factors, adascale.factors())
            set_lr(optimizer, lr, factors)
            _clip_gradients(model, grad_norm, cfg.solver.clip_grad_norm, read.norm)
            amp.step(optimizer, read.found_inf, read.loss_scale)
            events.step()

            done = iteration + 1
            progress_before = adascale.progress if adascale else 0.0
            if adascale and math.isfinite(grad_norm):  # not a step fp16's scaler skipped
                adascale.advance()
            last = done == plan.max_iter or bool(
                adascale and adascale.progress >= plan.progress_iters
            )
            epoch = _epochs(plan, done, adascale)
            if done % cfg.log.period == 0 or last:
                # One collective and one host sync per logged iteration, not per loss term.
                values = dist.reduce_mean_dict(
                    {**losses, "loss": loss, **task.step_statistics(model)}
                )
                if math.isfinite(grad_norm):  # before clipping; the same on every rank
                    values["grad_norm"] = grad_norm
                values.update(state.statistics())
                values.update(task.batch_statistics(values, plan.global_batch))
                events.training(iteration, epoch, lr, values, _steps_left(plan, adascale))
            if last:
                break
            if read.stop_asked:  # by a signal to any process: all stop after this step
                dist.average_buffers(model)
                _save(run_dir, state, done, loop.about, plan, ctx)
                events.close()
                name = stop.signal_name or "a stop signal to another process"
                raise StopRequested(done, plan.max_iter, name, run_dir / "checkpoints" / LAST)
            if cfg.train.checkpoint_period and done % cfg.train.checkpoint_period == 0:
                dist.average_buffers(model)
                _save(run_dir, state, done, loop.about, plan, ctx)
            due = (
                adascale.crossed(progress_before, eval_every)
                if adascale
                else (eval_every and done % eval_every == 0)
            )
            if due:
                dist.average_buffers(model)
                _evaluate(task, model, ctx, run_dir, done, epoch, events, announce=True)

    dist.average_buffers(model)
    _save(run_dir, state, done, loop.about, plan, ctx)
    metrics = _evaluate(task, model, ctx, run_dir, done, epoch, events, announce=False)
    events.close()
    return TrainResult(model, plan, metrics, done)


@dataclass
class _StepRead:
    """What a step decides with, read from the device in one read (``_read_step``)."""

    mean_loss: float
    nonfinite: bool  # the loss, on any process
    stop_asked: bool  # a stop signal, on any process
    grad_norm: float  # after DDP's averaging: the same on every process
    norm: torch.Tensor  # the same, on the device (clipping scales by it there)
    loss_scale: float  # fp16's for this backward; 1 otherwise
    found_inf: bool  # fp16's scaler found an inf or NaN gradient: the step is skipped
    noise: list[float] | None  # the noise scale's pending numbers


def _read_step(health, work, model, noise, amp: MixedPrecision, optimizer) -> _StepRead:
    """The step's one host read: the all-reduced loss and flags, the gradient norm, fp16's
    loss scale and overflow flag, and the noise scale's numbers, copied to the host together
    (each read of a device value stalls the GPU's queue; the reference loop makes one, its
    ``loss.item()``)."""
    if work is not None:
        work.wait()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    norm = torch.nn.utils.get_total_norm(grads) if grads else health.new_zeros(())
    parts = [health, norm.detach().double().view(1), *amp.pending(optimizer)]
    pending = noise.pending() if noise else None
    if pending is not None:
        parts.append(pending)
    values = torch.cat([part.to(health.device) for part in parts]).tolist()
    world = dist.get_world_size()
    scaled = amp.scaler.is_enabled()
    return _StepRead(
        mean_loss=values[0] / world,
        nonfinite=values[1] > 0,
        stop_asked=values[2] > 0,
        grad_norm=values[3],
        norm=norm,
        loss_scale=values[4] if scaled else 1.0,
        found_inf=scaled and values[5] > 0,
        noise=values[6 if scaled else 4 :] if pending is not None else None,
    )


def _stop_if_diverged(read: _StepRead, losses, iteration, lr, cfg, run_dir, ctx, amp) -> None:
    """Raise on every process at the same iteration, before the step changes the weights.

    The decision uses only numbers that are the same on every process: the all-reduced loss and
    the gradient norm after DDP averaged the gradients, so no process is left waiting. A
    non-finite gradient that fp16's scaler skips (at a loss scale of at least 1) is not a
    divergence."""
    too_high = cfg.train.max_loss is not None and read.mean_loss > cfg.train.max_loss
    skipped = amp.skips(read.found_inf, read.loss_scale)
    if not (read.nonfinite or too_high) and (math.isfinite(read.grad_norm) or skipped):
        return
    terms = ", ".join(f"{k} {v.item():.4g}" for k, v in losses.items())
    limit = f" > train.max_loss {cfg.train.max_loss:g}" if too_high else ""
    last = run_dir / "checkpoints" / "last.pt"
    kept = f"the last good checkpoint is {last}" if last.is_file() else "no checkpoint was written"
    raise DivergenceError(
        f"training diverged at iteration {iteration + 1} (lr {lr:.4g}): mean loss "
        f"{read.mean_loss:.4g}{limit}, gradient norm {read.grad_norm:.4g} ({terms} on rank "
        f"{ctx.rank}); stopped before the update, {kept}; lower solver.base_lr or lengthen the "
        "warmup"
    )


def _clip_gradients(
    model: torch.nn.Module,
    grad_norm: float,
    max_norm: float | None,
    norm: torch.Tensor | None = None,
) -> None:
    """Scale the gradients down to ``solver.clip_grad_norm`` when their norm (computed once, the
    same on every process, read as ``grad_norm``; ``norm`` the same on the device) is larger."""
    if max_norm is None or grad_norm <= max_norm or not math.isfinite(grad_norm):
        return  # a non-finite norm: an fp16 step the loss scaler skips
    if norm is None:
        norm = torch.tensor(grad_norm, dtype=torch.float64)
    torch.nn.utils.clip_grads_with_norm_(model.parameters(), max_norm, norm)


def _data_parallel(model: torch.nn.Module) -> DistributedDataParallel:
    """DDP without copying rank 0's buffers into every process at each forward (DDP's
    default): per-process BN and CGBN with several groups keep their own running statistics,
    averaged over all processes before evaluating and saving (detectron2 does the same)."""
    if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters:
        return DistributedDataParallel(model, forward_sync_buffers=False)  # torch >= 2.14
    return DistributedDataParallel(model, broadcast_buffers=False)


def _agreed(build):
    """``build()`` on every rank; a failure on any rank is raised on all of them, so that no
    rank is left waiting for the others in the next collective."""
    result, problem = None, None
    try:
        result = build()
    except MegdetError as exc:
        problem = str(exc)
    problems = [p for p in dist.all_gather_object(problem) if p]
    if problems:
        raise MegdetError(problems[0])
    return result


def _backbone_source(model, found):
    """``model`` (the ModelConfig) with ``backbone_weights`` and its sha256 as the run records
    them: resolved and hashed for a fresh run, the checkpoint's for a resumed one."""
    if not found:
        return record_backbone_source(model)
    saved = found[0].get("config", {}).get("model", {})
    keys = ("backbone_weights", "backbone_weights_sha256")
    return dataclasses.replace(model, **{k: saved.get(k, getattr(model, k)) for k in keys})


def _find_checkpoint(run_dir: Path, ctx):
    """The newest complete checkpoint in ``run_dir`` as ``(state, path)``, or None. Rank 0
    reads, every rank receives."""
    found = newest_checkpoint(run_dir / "checkpoints") if ctx.is_main else None
    found = dist.broadcast_object(found)
    if found is None:
        log.info("resume: no checkpoint in %s/checkpoints, starting from iteration 0", run_dir)
    return found


def _restore(found, state: TrainingState, plan: Plan) -> int:
    """Load a checkpoint found by ``_find_checkpoint`` into the training state; return the
    iteration to continue from."""
    checkpoint, path = found
    saved = checkpoint["plan"]
    for key in ("global_batch", "iters_per_epoch"):  # max_iter may grow: a longer run
        if saved.get(key) != getattr(plan, key):
            raise MegdetError(
                f"{path}: was written by a run with {key} {saved.get(key)}, this one has "
                f"{getattr(plan, key)}; resume with the same config, or start a new --out"
            )
    state.load_state_dict(checkpoint, path)
    start_iter = int(checkpoint["iteration"])
    log.info("resume: %s, continuing at iteration %d of %d", path, start_iter, plan.max_iter)
    return start_iter


def _steps_left(plan: Plan, adascale: AdaScale | None) -> int | None:
    """Under AdaScale, the steps to the end at the mean progress per step so far (the ETA)."""
    if not adascale or not adascale.steps or adascale.progress <= 0:
        return None
    per_step = adascale.progress / adascale.steps
    return max(0, math.ceil((plan.progress_iters - adascale.progress) / per_step))


def _epochs(plan: Plan, done: int, adascale: AdaScale | None) -> float:
    """Epochs after ``done`` steps: of data, or under AdaScale of progress at the base batch
    (what the schedule, the evaluations and the end follow)."""
    if adascale:
        return adascale.progress / plan.progress_per_epoch
    return done / plan.iters_per_epoch


def _evaluate(task, model, ctx, run_dir, iteration, epoch: float, events, announce: bool):
    """Evaluate on every rank; ``announce`` logs the table (the final one is the caller's)."""
    metrics = task.evaluate(model, ctx.device, run_dir / "eval" if ctx.is_main else None)
    events.evaluation(iteration, epoch, metrics)
    if ctx.is_main and announce:
        log.info("evaluation at iteration %d (epoch %.2f):\n%s", iteration, epoch,
                 task.format_metrics(metrics))  # fmt: skip
    return metrics


def _about(cfg: Config, plan: Plan, task: Task) -> dict:
    """The run's config and plan, and the task's labels (class names), so that a checkpoint
    alone is enough to evaluate or predict."""
    return {"config": config_to_dict(cfg), "plan": plan.to_dict(), "labels": task.labels()}


def _save(run_dir, state: TrainingState, iteration, about, plan: Plan, ctx) -> None:
    """``about``: what every checkpoint of the run repeats (``_about``)."""
    entries = state.state_dict()  # on every rank: the noise scale's all-reduce
    if not ctx.is_main:
        return
    checkpoint = {
        **entries,
        "iteration": iteration,  # the next iteration to run
        "epoch": iteration // plan.iters_per_epoch,
        "position_in_epoch": iteration % plan.iters_per_epoch,  # global batches done
        **about,
    }
    save_checkpoint(run_dir / "checkpoints" / "last.pt", checkpoint)
    settle_replacement(run_dir)  # the first checkpoint: a replaced run can go
