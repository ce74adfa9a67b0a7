"""Top-1 and top-5 error over the whole validation set, each process counting its share."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from megdet import dist
from megdet.atomic import atomic_write_text
from megdet.logs import Progress
from megdet.tasks.classification.data import FolderDataset, collate

METRICS = ("top1_err", "top5_err")


@torch.no_grad()
def evaluate_classifier(
    model: nn.Module,
    dataset: FolderDataset,
    device: torch.device,
    images_per_device: int,
    out_dir: Path | None,
    num_workers: int = 0,
    progress: bool = False,
) -> dict[str, float]:
    """Errors as fractions (as COCO's metrics are); every image counted once: rank r takes
    images r, r + W, ...; the counts are summed over the processes, so the result is exact and
    the same on every rank. ``out_dir``: ``metrics.json`` (rank 0)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    loader = torch.utils.data.DataLoader(
        torch.utils.data.Subset(dataset, range(rank, len(dataset), world)),
        batch_size=images_per_device,
        num_workers=num_workers,
        collate_fn=collate,
    )
    was_training = model.training
    model.eval()
    dtype = next(model.parameters()).dtype  # train.dtype
    counts = torch.zeros(3, dtype=torch.float64, device=device)  # top-1, top-5 right; images
    shown = Progress(len(loader.dataset), "image", "eval") if progress else None
    for images, labels in loader:
        logits = model(images.to(device, dtype, non_blocking=True))
        if shown:
            shown.update(len(images))
        labels = labels.to(device)
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        right = top == labels[:, None]
        counts += torch.stack(
            [right[:, 0].sum(), right.any(dim=1).sum(), torch.tensor(len(labels), device=device)]
        ).double()
    model.train(was_training)
    if shown:
        shown.close()
    top1, top5, total = dist.all_reduce_sum(counts).tolist()
    metrics = {"top1_err": 1 - top1 / total, "top5_err": 1 - top5 / total, "images": int(total)}
    if out_dir is not None and dist.get_rank() == 0:
        atomic_write_text(Path(out_dir) / "metrics.json", json.dumps(metrics, indent=2) + "\n")
    return metrics


def format_metrics(metrics: dict[str, float]) -> str:
    """A two-line table in percent, as Goyal et al. print errors."""
    header = " | ".join(f"{name:>8}" for name in METRICS)
    values = " | ".join(f"{100 * metrics[name]:8.2f}" for name in METRICS)
    return f"{header}\n{values}"
