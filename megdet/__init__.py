"""megdet: large mini-batch object detection on torch.distributed (MegDet, Goyal et al.)."""

__version__ = "0.1.0"
