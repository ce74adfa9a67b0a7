"""A pretrained tiny backbone with every convolution's weights scaled back to the size of a
fresh initialization, as a file (issue 26: why the classifier megdet pretrains transfers
negatively); ``megdet_regime.py``'s ``bB-rescaled`` rows fine-tune it.

Behind a BatchNorm a convolution's output does not depend on the size of its weights, but its
learning does: the gradient shrinks as 1/|w| and a step changes the direction by lr/|w|^2.
Pretraining grew the stem's weights to 5x a fresh initialization's RMS and res2's to 2.3x (a
detector trained from scratch: 1.5x), so fine-tuning moves them 25x and 5x more slowly than it
moves a fresh network's. The rows ran from this file before ``model.backbone_weights_rescale``
did the same in megdet itself (``megdet.nn.weights.rescale_to_initialization``, used here).

    python experiments/rescaled_backbone.py RUN_DIR OUT.pt
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import nn

from megdet.atomic import atomic_write_bytes
from megdet.nn.tiny_resnet import TinyResNet
from megdet.nn.weights import conv_sizes, load_backbone_weights, rescale_to_initialization


def rescaled_body(run_dir: Path) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """The run's tiny body as a state_dict, each conv weight scaled to its RMS in a fresh
    ``TinyResNet`` (seed 0), the BN after it adjusted so that the network computes what it
    did; and each convolution's factor."""
    torch.manual_seed(0)
    body = TinyResNet(nn.BatchNorm2d)
    initial = conv_sizes(body)
    load_backbone_weights(body, "tiny", str(run_dir))
    factors = rescale_to_initialization(body, initial)
    return body.state_dict(), factors


def write_rescaled(run_dir: Path, out: Path) -> Path:
    """Write the rescaled body once (a state_dict ``model.backbone_weights`` takes)."""
    if not out.is_file():
        body, factors = rescaled_body(run_dir)
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(out, lambda file: torch.save(body, file))
        stem = factors["stem.0"]
        print(f"{out}: {len(factors)} conv weights rescaled (stem x{stem:.2f})", flush=True)
    return out


if __name__ == "__main__":
    write_rescaled(Path(sys.argv[1]), Path(sys.argv[2]))
