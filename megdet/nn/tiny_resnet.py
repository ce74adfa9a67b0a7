"""The tiny backbone: one definition for both tasks, so that a classifier megdet pretrains
(``task: classification``, ``model.backbone: tiny``) and the detector it initializes share
every weight's name and shape (issue 26)."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import resnet

STAGES = ("layer1", "layer2", "layer3", "layer4")


class TinyResNet(nn.Module):
    """A ResNet of BasicBlocks at a quarter of ResNet-18's widths, for CPU training.

    Same strides and stage names as torchvision's ResNet (C2..C5 at 1/4..1/32), so the FPN and
    every other part of the detector are the ones used with ResNet-50.
    """

    def __init__(
        self,
        norm: Callable[[int], nn.Module],
        widths: tuple[int, ...] = (16, 32, 64, 128),
        blocks: tuple[int, ...] = (2, 2, 2, 2),
    ) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, widths[0], 3, stride=2, padding=1, bias=False),
            norm(widths[0]),
            nn.ReLU(inplace=True),
            nn.Conv2d(widths[0], widths[0], 3, stride=2, padding=1, bias=False),
            norm(widths[0]),
            nn.ReLU(inplace=True),
        )
        in_channels = widths[0]
        for i, (width, count) in enumerate(zip(widths, blocks, strict=True)):
            layers = []
            for j in range(count):
                stride = 2 if i > 0 and j == 0 else 1
                downsample = None
                if stride != 1 or in_channels != width:
                    downsample = nn.Sequential(
                        nn.Conv2d(in_channels, width, 1, stride=stride, bias=False), norm(width)
                    )
                layers.append(
                    resnet.BasicBlock(in_channels, width, stride, downsample, norm_layer=norm)
                )
                in_channels = width
            self.add_module(STAGES[i], nn.Sequential(*layers))
        self.widths = widths

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for name in STAGES:
            x = getattr(self, name)(x)
        return x


class TinyResNetClassifier(TinyResNet):
    """The tiny body, globally average-pooled, and a linear classifier (``fc``, dropped when
    the body initializes a detector, as a torchvision ResNet's is)."""

    def __init__(self, norm: Callable[[int], nn.Module], num_classes: int) -> None:
        super().__init__(norm)
        self.fc = nn.Linear(self.widths[-1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = super().forward(x)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(features, 1), 1))
