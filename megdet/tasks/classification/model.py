"""Classifiers: torchvision's ResNet-18/50, the detector's tiny ResNet (which megdet pretrains
for it), and the CIFAR ResNets (He et al. 2016, section 4.2: 3 stages of 16/32/64 channels,
6n+2 layers; torchvision has none), built with the configured normalization, the last BN gamma
of each residual block zero-initialized (Goyal et al. 5.1: each block starts as the identity,
which eases early training at large learning rates)."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import resnet

from megdet.config import Config
from megdet.errors import ConfigError
from megdet.nn import norm_layer
from megdet.nn.tiny_resnet import TinyResNetClassifier
from megdet.nn.weights import load_backbone_weights

CIFAR_DEPTHS = {"resnet20": 20, "resnet56": 56}


class CifarResNet(nn.Module):
    """conv3x3(16) -> 3 stages of n BasicBlocks (16, 32, 64 channels; stride 1, 2, 2) ->
    global average pool -> fc. Downsampling shortcuts are 1x1 convolutions with BN (option B)."""

    def __init__(self, depth: int, num_classes: int, norm: Callable[[int], nn.Module]) -> None:
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"a CIFAR ResNet has 6n+2 layers, not {depth}")
        blocks = (depth - 2) // 6
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.bn1 = norm(16)
        self.relu = nn.ReLU(inplace=True)
        stages, channels = [], 16
        for width, stride in ((16, 1), (32, 2), (64, 2)):
            layers = []
            for i in range(blocks):
                downsample = None
                if i == 0 and (stride != 1 or channels != width):
                    downsample = nn.Sequential(
                        nn.Conv2d(channels, width, 1, stride, bias=False), norm(width)
                    )
                layers.append(
                    resnet.BasicBlock(channels, width, stride if i == 0 else 1, downsample,
                                      norm_layer=norm)
                )  # fmt: skip
                channels = width
            stages.append(nn.Sequential(*layers))
        self.layer1, self.layer2, self.layer3 = stages
        self.fc = nn.Linear(64, num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class Classifier(nn.Module):
    """The network, with the training loss inside the forward as torchvision's detectors
    have it: ``model(images, labels)`` gives ``{"loss_cls": ...}`` in training, ``model(images)``
    the logits. The last training batch's top-1 error is kept for the logs."""

    def __init__(self, net: nn.Module, label_smoothing: float = 0.0) -> None:
        super().__init__()
        self.net = net
        self.label_smoothing = label_smoothing
        self.last_error = torch.zeros(())

    def forward(self, images: torch.Tensor, labels: torch.Tensor | None = None):
        logits = self.net(images)
        if labels is None:
            return logits
        self.last_error = (logits.detach().argmax(1) != labels).double().mean()
        loss = F.cross_entropy(logits, labels, label_smoothing=self.label_smoothing)
        return {"loss_cls": loss}


def build_classifier(
    cfg: Config, num_classes: int, norm: Callable[[int], nn.Module] | None, pretrained: bool
) -> Classifier:
    """The configured network for ``num_classes``; ``norm`` as the trainer chose it (None:
    ``model.norm`` alone); ``pretrained`` loads ``model.backbone_weights`` but the fc layer."""
    norm = norm or norm_layer(cfg.model.norm)
    name = cfg.model.backbone
    if name in CIFAR_DEPTHS:
        net = CifarResNet(CIFAR_DEPTHS[name], num_classes, norm)
    elif name == "tiny":  # the detector's own tiny body: megdet pretrains it (issue 26)
        net = TinyResNetClassifier(norm, num_classes)
    else:
        net = getattr(resnet, name)(weights=None, num_classes=num_classes, norm_layer=norm)
    if cfg.classification.zero_init_residual:
        _zero_last_gammas(net)
    source = cfg.model.backbone_weights
    if pretrained and source not in ("", "none"):
        if source == "imagenet" and name in CIFAR_DEPTHS:
            raise ConfigError(
                f"model.backbone_weights: there are no ImageNet weights for {name}; pass a "
                "megdet checkpoint of one, or none"
            )
        load_backbone_weights(net, name, source, rescale=cfg.model.backbone_weights_rescale)
    return Classifier(net, cfg.classification.label_smoothing)


def _zero_last_gammas(net: nn.Module) -> None:
    """torchvision's ``zero_init_residual``, for any norm with a weight (BN, CGBN, GN)."""
    for module in net.modules():
        last = getattr(module, "bn3", None) if isinstance(module, resnet.Bottleneck) else None
        if isinstance(module, resnet.BasicBlock):
            last = module.bn2
        if last is not None and isinstance(getattr(last, "weight", None), nn.Parameter):
            nn.init.zeros_(last.weight)  # not a frozen BN's buffer: it would never recover
