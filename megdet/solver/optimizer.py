"""SGD with momentum and weight decay, and its parameter groups.

torch's SGD keeps ``u <- m*u + g; w <- w - lr*u``: the learning rate multiplies the update, not
the buffer, so changing lr needs no momentum correction (Goyal et al. section 2.1).
"""

from __future__ import annotations

import torch
from torch import nn

from megdet.config import SolverConfig

_NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)


def build_optimizer(model: nn.Module, cfg: SolverConfig, lr: float) -> torch.optim.SGD:
    """Normalization parameters get ``weight_decay_norm`` (0 by default, as in detectron2)."""
    decay, no_decay = [], []
    for module in model.modules():
        params = [p for p in module.parameters(recurse=False) if p.requires_grad]
        (no_decay if isinstance(module, _NORM_TYPES) else decay).extend(params)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": cfg.weight_decay_norm})
    return torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum, nesterov=cfg.nesterov)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
