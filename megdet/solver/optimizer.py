"""SGD with momentum and weight decay, and its parameter groups.

torch's SGD keeps ``u <- m*u + g; w <- w - lr*u``: the learning rate multiplies the update, not
the buffer, so changing lr needs no momentum correction (Goyal et al. section 2.1).
"""

from __future__ import annotations

import torch
from torch import nn

from megdet.config import SolverConfig

_NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)


def build_optimizer(
    model: nn.Module,
    cfg: SolverConfig,
    lr: float,
    modules: dict[str, list[nn.Parameter]] | None = None,
) -> torch.optim.SGD:
    """Normalization parameters get ``weight_decay_norm`` (0 by default, as in detectron2).

    ``modules`` (the task's module groups) splits the parameter groups further by module, each
    named by its ``module`` key, so that ``set_lr`` can give a module its own learning rate
    (AGVM); parameters in no module form the module ``other``. SGD's update is elementwise, so
    the split changes no number."""
    module_of = {id(p): name for name, params in (modules or {}).items() for p in params}
    groups: dict[tuple[str, bool], list[nn.Parameter]] = {}
    for module in model.modules():
        is_norm = isinstance(module, _NORM_TYPES)
        for param in module.parameters(recurse=False):
            if param.requires_grad:
                key = (module_of.get(id(param), "other"), is_norm)
                groups.setdefault(key, []).append(param)
    decay = {False: cfg.weight_decay, True: cfg.weight_decay_norm}
    param_groups = [
        {"params": params, "weight_decay": decay[is_norm], "module": name}
        for (name, is_norm), params in groups.items()
    ]
    return torch.optim.SGD(param_groups, lr=lr, momentum=cfg.momentum, nesterov=cfg.nesterov)


def set_lr(
    optimizer: torch.optim.Optimizer, lr: float, factors: dict[str, float] | None = None
) -> None:
    """``lr`` for every parameter group, times its module's factor where ``factors`` has one."""
    factors = factors or {}
    for group in optimizer.param_groups:
        group["lr"] = lr * factors.get(group.get("module"), 1.0)
