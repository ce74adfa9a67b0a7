"""The large mini-batch recipe: linear scaling, warmup, epoch policies, SGD."""

from megdet.solver.optimizer import build_optimizer, set_lr
from megdet.solver.schedule import lr_at

__all__ = ["build_optimizer", "lr_at", "set_lr"]
