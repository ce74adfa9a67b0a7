"""The training loop: fetch -> forward -> loss -> backward -> step -> schedule -> events.

Synchronous data parallel (DDP): each process's loss is the mean over its own images and DDP
averages gradients over processes, so every step uses the mean over the whole global batch
(MegDet section 3.1, Goyal et al. section 2).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel

from megdet import dist
from megdet.config import Config, config_to_dict, dump_config
from megdet.data.coco import collate
from megdet.data.sampler import GlobalShuffleSampler
from megdet.engine.checkpoint import atomic_write_text, save_checkpoint
from megdet.engine.events import EventWriter
from megdet.nn import norm_layer
from megdet.plan import Plan, make_plan
from megdet.solver import build_optimizer, lr_at, set_lr
from megdet.tasks.detection.task import DetectionTask

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    model: torch.nn.Module
    plan: Plan
    metrics: dict[str, float]  # the final evaluation, identical on every rank


def train(cfg: Config, task: DetectionTask, run_dir: Path, ctx: dist.DistContext) -> TrainResult:
    """Train ``task`` in this process group; rank 0 writes ``run_dir``.

    ``task`` supplies the model, the training set and the evaluator; the loop is task-agnostic.
    """
    memory = None
    if cfg.train.images_per_device == "auto":  # measured once, the same answer on every rank
        memory = task.estimate_memory() if ctx.is_main else None
        memory = dist.broadcast_object(memory)
    plan = make_plan(cfg, ctx.world_size, task.num_train_images, memory)
    if ctx.is_main:
        atomic_write_text(run_dir / "config.yaml", dump_config(cfg))
        atomic_write_text(run_dir / "plan.json", plan.to_json() + "\n")
        log.info("plan: %s", plan.summary())

    norm = None
    if plan.bn_groups is not None:
        group = dist.own_group(plan.bn_groups.groups(ctx.world_size))
        norm = norm_layer(cfg.model.norm, group, plan.bn_groups.local_group_size)
    elif cfg.model.norm == "bn":
        # Per-process BN as CGBN over this process alone: the same BN (tests/nn/test_cgbn.py),
        # and under activation checkpointing it replays its statistics where nn.BatchNorm2d
        # would update its running statistics a second time. Used whether or not checkpointing
        # is on, so turning it on changes nothing else.
        alone = dist.own_group([[rank] for rank in range(ctx.world_size)])
        norm = norm_layer("cgbn", alone)
    torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
    model = task.build_model(norm=norm).to(ctx.device)
    optimizer = build_optimizer(model, cfg.solver, plan.lr)
    ddp = DistributedDataParallel(model) if ctx.world_size > 1 else model

    sampler = GlobalShuffleSampler(
        task.num_train_images,
        plan.global_batch,
        ctx.rank,
        ctx.world_size,
        cfg.train.seed,
        max_iter=plan.max_iter,
        group_ids=task.train_group_ids(),
    )
    loader = torch.utils.data.DataLoader(
        task.train_dataset(),
        batch_sampler=sampler,
        num_workers=cfg.data.num_workers,
        collate_fn=collate,
        pin_memory=ctx.device.type == "cuda",
    )
    events = EventWriter(
        run_dir, plan.max_iter, tensorboard=cfg.log.tensorboard, enabled=ctx.is_main
    )
    eval_every = cfg.train.eval_period * plan.iters_per_epoch
    model.train()
    for iteration, batch in enumerate(loader):
        lr = lr_at(plan, iteration)
        set_lr(optimizer, lr)
        images, targets = task.to_device(batch, ctx.device)
        task.begin_step(model, targets)
        losses = ddp(images, targets)
        loss = sum(losses.values())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        events.step()

        done = iteration + 1
        if done % cfg.log.period == 0 or done == plan.max_iter:
            # One collective and one host sync per logged iteration, not per loss term.
            values = dist.reduce_mean_dict({**losses, "loss": loss, **task.step_statistics(model)})
            values.update(task.batch_statistics(values, plan.global_batch))
            events.training(iteration, done / plan.iters_per_epoch, lr, values)
        if done == plan.max_iter:
            break
        if cfg.train.checkpoint_period and done % cfg.train.checkpoint_period == 0:
            dist.average_buffers(model)
            _save(run_dir, model, optimizer, done, cfg, plan, ctx)
        if eval_every and done % eval_every == 0:
            dist.average_buffers(model)
            _evaluate(task, model, ctx, run_dir, done, plan, events, announce=True)

    dist.average_buffers(model)
    _save(run_dir, model, optimizer, plan.max_iter, cfg, plan, ctx)
    metrics = _evaluate(task, model, ctx, run_dir, plan.max_iter, plan, events, announce=False)
    events.close()
    return TrainResult(model, plan, metrics)


def _evaluate(task, model, ctx, run_dir, iteration, plan: Plan, events, announce: bool):
    """Evaluate on every rank; ``announce`` logs the table (the final one is the caller's)."""
    metrics = task.evaluate(model, ctx.device, run_dir / "eval" if ctx.is_main else None)
    epoch = iteration / plan.iters_per_epoch
    events.evaluation(iteration, epoch, metrics)
    if ctx.is_main and announce:
        log.info("evaluation at iteration %d (epoch %.2f):\n%s", iteration, epoch,
                 task.format_metrics(metrics))  # fmt: skip
    return metrics


def _save(run_dir, model, optimizer, iteration, cfg, plan: Plan, ctx) -> None:
    if not ctx.is_main:
        return
    state = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "iteration": iteration,
        "config": config_to_dict(cfg),
        "plan": plan.to_dict(),
    }
    save_checkpoint(run_dir / "checkpoints" / "last.pt", state)
