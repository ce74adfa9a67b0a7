"""ResNet backbones with an FPN on top, all built with the configured normalization."""

from __future__ import annotations

import logging
from collections.abc import Callable

from torch import nn
from torchvision.models import resnet
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from megdet.config import ModelConfig
from megdet.nn import freeze_batchnorm
from megdet.nn.recompute import checkpoint_module
from megdet.nn.tiny_resnet import STAGES, TinyResNet
from megdet.nn.weights import load_backbone_weights

log = logging.getLogger(__name__)


def build_backbone(
    cfg: ModelConfig, norm: Callable[[int], nn.Module], pretrained: bool = False
) -> BackboneWithFPN:
    """Backbone + FPN returning P2..P5 (names '0'..'3') and P6 ('pool'), normalized by ``norm``.

    ``pretrained`` loads ``model.backbone_weights`` first (a fresh training run; evaluation
    and resume load a checkpoint instead). Frozen stages are then turned into fixed layers.
    """
    if cfg.backbone == "tiny":
        body = TinyResNet(norm)
        widths = list(body.widths)
        stem = ["stem"]
    else:
        body = getattr(resnet, cfg.backbone)(weights=None, norm_layer=norm)
        expansion = 4 if cfg.backbone == "resnet50" else 1
        widths = [64 * expansion, 128 * expansion, 256 * expansion, 512 * expansion]
        stem = ["conv1", "bn1"]
    if pretrained and cfg.backbone_weights not in ("", "none"):
        load_backbone_weights(
            body, cfg.backbone, cfg.backbone_weights, rescale=cfg.backbone_weights_rescale
        )
    # detectron2's FREEZE_AT: 1 freezes the stem, 2 the stem and res2, ...
    stages = [stem, *([name] for name in STAGES)]
    for names in stages[: cfg.frozen_stages]:
        for name in names:
            module = getattr(body, name).requires_grad_(False)
            setattr(body, name, freeze_batchnorm(module))
    return BackboneWithFPN(
        body,
        return_layers={name: str(i) for i, name in enumerate(STAGES)},
        in_channels_list=widths,
        out_channels=cfg.fpn_channels,
        extra_blocks=LastLevelMaxPool(),
        norm_layer=norm if cfg.norm_scope != "backbone" else None,
    )


def checkpoint_regions(backbone: BackboneWithFPN) -> dict[str, list[tuple[str, nn.Module]]]:
    """What each kind of ``train.checkpointing`` recomputes: ResNet stages (res2..res5), their
    residual blocks, or the FPN; the stem, the RPN and the RoI heads are never recomputed."""
    stages = [(f"body.{name}", getattr(backbone.body, name)) for name in STAGES]
    blocks = [(f"{name}.{i}", block) for name, stage in stages for i, block in enumerate(stage)]
    return {"stages": stages, "blocks": blocks, "fpn": [("fpn", backbone.fpn)]}


def apply_checkpointing(backbone: BackboneWithFPN, mode: str) -> list[str]:
    """Recompute parts of ``backbone`` in backward (``train.checkpointing``, e.g. ``stages`` or
    ``blocks+fpn``); return their names. Each keeps only its input for backward."""
    regions = checkpoint_regions(backbone)
    names = []
    for kind in sorted(set(mode.split("+")) - {"none"}):
        for name, module in regions[kind]:
            checkpoint_module(module)
            names.append(name)
    return names
