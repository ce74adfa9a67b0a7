"""Layers megdet adds to torch: the normalization choices of the paper."""

from megdet.nn.norm import norm_layer

__all__ = ["norm_layer"]
