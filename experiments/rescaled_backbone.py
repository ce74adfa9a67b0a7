"""A pretrained tiny backbone with every convolution's weights scaled back to the size of a
fresh initialization (issue 26: why the classifier megdet pretrains transfers negatively).

Behind a BatchNorm a convolution's output does not depend on the size of its weights, but its
learning does: the gradient shrinks as 1/|w| and a step changes the direction by lr/|w|^2.
Pretraining grew the stem's weights to 5x a fresh initialization's RMS and res2's to 2.3x (a
detector trained from scratch: 1.5x), so fine-tuning moves them 25x and 5x more slowly than it
moves a fresh network's. Scaling each weight tensor back to a fresh one's RMS, and its BN's
running statistics with it, leaves every output of the network the same and gives fine-tuning
back its learning rate; ``megdet_regime.py``'s ``b16-rescaled`` row fine-tunes it.

    python experiments/rescaled_backbone.py RUN_DIR OUT.pt
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import nn

from megdet.atomic import atomic_write_bytes
from megdet.nn.tiny_resnet import TinyResNet
from megdet.nn.weights import BODY_PREFIXES, checkpoint_file


def rescaled_body(run_dir: Path) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """The run's tiny body as a state_dict, each conv weight scaled to the RMS of the same
    tensor in a fresh ``TinyResNet`` (seed 0), the BN after it adjusted so that the network
    computes what it did; and each tensor's factor."""
    checkpoint = torch.load(checkpoint_file(run_dir), map_location="cpu", weights_only=True)
    prefix = BODY_PREFIXES[checkpoint["config"]["task"]]
    body = {
        k[len(prefix) :]: v
        for k, v in checkpoint["model"].items()
        if k.startswith(prefix) and not k[len(prefix) :].startswith("fc.")  # the body only
    }
    torch.manual_seed(0)
    fresh = TinyResNet(nn.BatchNorm2d).state_dict()
    factors = {}
    for name, weight in list(body.items()):
        if weight.dim() != 4:
            continue
        factor = (fresh[name].norm() / weight.norm()).item()
        body[name] = weight * factor
        bn = _bn_after(name)
        body[f"{bn}.running_mean"] = body[f"{bn}.running_mean"] * factor
        body[f"{bn}.running_var"] = body[f"{bn}.running_var"] * factor**2
        factors[name] = factor
    return body, factors


def _bn_after(conv: str) -> str:
    """The BatchNorm that normalizes a TinyResNet convolution's output."""
    module, _ = conv.rsplit(".", 1)
    head, last = module.rsplit(".", 1)
    if last.startswith("conv"):  # layerN.i.convK -> layerN.i.bnK
        return f"{head}.bn{last[4:]}"
    return f"{head}.{int(last) + 1}"  # stem.0 -> stem.1, downsample.0 -> downsample.1


def write_rescaled(run_dir: Path, out: Path) -> Path:
    """Write the rescaled body once (a state_dict ``model.backbone_weights`` takes)."""
    if not out.is_file():
        body, factors = rescaled_body(run_dir)
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(out, lambda file: torch.save(body, file))
        stem = factors["stem.0.weight"]
        print(f"{out}: {len(factors)} conv weights rescaled (stem x{stem:.2f})", flush=True)
    return out


if __name__ == "__main__":
    write_rescaled(Path(sys.argv[1]), Path(sys.argv[2]))
