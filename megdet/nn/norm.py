"""The normalization a backbone is built with, chosen by one setting (``model.norm``).

MegDet compares frozen ImageNet statistics ("16-base"), per-device BN, cross-GPU BN and
GroupNorm; building every backbone through a ``norm_layer`` factory makes that one switch.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import torch
from torch import nn
from torchvision import ops

from megdet import dist
from megdet.nn.cgbn import CrossGPUBatchNorm2d, copy_batchnorm_state


class FrozenBatchNorm2d(ops.FrozenBatchNorm2d):
    """torchvision's, with the output in the input's dtype: under mixed precision (train.amp)
    its float32 scale would otherwise promote every half-precision activation to float32."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        bias = self.bias - self.running_mean * scale
        shape = (1, -1, 1, 1)
        return x * scale.to(x.dtype).view(shape) + bias.to(x.dtype).view(shape)


def _group_norm(num_channels: int) -> nn.GroupNorm:
    # 32 groups as in Wu & He (2018); narrow layers of small backbones get fewer.
    return nn.GroupNorm(math.gcd(32, num_channels), num_channels)


_NORMS: dict[str, Callable[[int], nn.Module]] = {
    "frozen": FrozenBatchNorm2d,
    "bn": nn.BatchNorm2d,
    "gn": _group_norm,
}


def norm_layer(
    name: str, process_group=None, local_group_size: int | None = None
) -> Callable[[int], nn.Module]:
    """A constructor ``f(num_channels) -> nn.Module`` for ``model.norm``.

    ``process_group`` and ``local_group_size`` are CGBN's statistics group (see ``plan.py``).
    """
    if name == "cgbn":
        return functools.partial(
            CrossGPUBatchNorm2d, process_group=process_group, local_group_size=local_group_size
        )
    try:
        return _NORMS[name]
    except KeyError:
        raise ValueError(f"unknown norm '{name}' (choose from cgbn, {', '.join(_NORMS)})") from None


def training_norm(name: str, bn_groups=None, world_size: int = 1) -> Callable[[int], nn.Module]:
    """The normalization a training process builds its model with, for ``model.norm`` and the
    plan's ``bn_groups`` (``plan.BNGroups``, CGBN's statistics groups) over ``world_size``
    processes. Called by every process together (it creates process groups) when
    ``world_size`` > 1; with 1 (the memory estimate, one-process benches) it creates none.

    ``bn`` (per-process BN) trains as CGBN over each process alone: ATen's BatchNorm kernels,
    as ``nn.BatchNorm2d``, but a recomputation under activation checkpointing does not move
    its running statistics a second time; used whether or not checkpointing is on, so that
    turning it on changes nothing else. ``frozen`` and ``gn`` have no statistics to share."""
    if name == "cgbn" and bn_groups is not None:
        group = dist.own_group(bn_groups.groups(world_size)) if world_size > 1 else None
        return norm_layer("cgbn", group, bn_groups.local_group_size)
    if name in ("bn", "cgbn"):
        alone = dist.own_group([[rank] for rank in range(world_size)]) if world_size > 1 else None
        return norm_layer("cgbn", alone)
    return norm_layer(name)


def freeze_batchnorm(module: nn.Module) -> nn.Module:
    """``module`` with every BatchNorm (plain, sync or cross-GPU) replaced by a
    ``FrozenBatchNorm2d`` holding its affine parameters and running statistics.

    A frozen stage must normalize with fixed statistics: a BN layer whose parameters merely
    stop learning still normalizes with batch statistics, moves its running statistics and,
    as CGBN, communicates (detectron2's ``convert_frozen_batchnorm``). GroupNorm has no
    statistics to freeze and is returned as is.
    """
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        frozen = FrozenBatchNorm2d(module.num_features, eps=module.eps)
        copy_batchnorm_state(module, frozen)
        return frozen
    for name, child in module.named_children():
        module.add_module(name, freeze_batchnorm(child))
    return module
