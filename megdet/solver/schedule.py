"""The learning rate as a pure function of the iteration (nanoGPT's ``get_lr``, checkable by eye).

lr(it) = warmup(it) * prod(factor for (milestone, factor) in milestones if it >= milestone)
warmup(it) = start + (lr - start) * it / warmup_iters   for it < warmup_iters (linear)
           = start                                       for it < warmup_iters (constant)
           = lr                                          afterwards
"""

from __future__ import annotations

import math

from megdet.plan import Plan


def lr_at(plan: Plan, iteration: int) -> float:
    factor = math.prod(f for milestone, f in plan.milestones if iteration >= milestone)
    if iteration < plan.warmup_iters:
        if plan.warmup == "linear":
            alpha = iteration / plan.warmup_iters
            return (plan.warmup_start_lr + (plan.lr - plan.warmup_start_lr) * alpha) * factor
        return plan.warmup_start_lr * factor
    return plan.lr * factor
