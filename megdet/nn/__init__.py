"""Layers megdet adds to torch: the normalization choices of the paper."""

from megdet.nn.cgbn import CrossGPUBatchNorm2d, convert_to_cgbn
from megdet.nn.norm import freeze_batchnorm, norm_layer, training_norm

__all__ = [
    "CrossGPUBatchNorm2d",
    "convert_to_cgbn",
    "freeze_batchnorm",
    "norm_layer",
    "training_norm",
]
