"""Layers megdet adds to torch: the normalization choices of the paper."""

from megdet.nn.cgbn import CrossGPUBatchNorm2d, convert_to_cgbn
from megdet.nn.norm import norm_layer

__all__ = ["CrossGPUBatchNorm2d", "convert_to_cgbn", "norm_layer"]
