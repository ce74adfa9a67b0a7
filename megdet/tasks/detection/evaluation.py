"""Distributed inference and COCO evaluation.

Two interchangeable evaluators: pycocotools (the reference implementation) and faster-coco-eval
(the same algorithm in C++). Both give identical metrics on our fixtures (tests/tasks/
test_evaluation.py); ``bench/eval_backends.py`` measures the speed difference.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
from pathlib import Path

import torch
from torch import nn

from megdet import dist
from megdet.atomic import atomic_write_text
from megdet.config import EVAL_BACKENDS
from megdet.data.coco import CocoDetection, collate
from megdet.logs import Progress

log = logging.getLogger(__name__)

# COCOeval.stats[0:6]; "mmAP" is the paper's name for AP@[.5:.95].
METRICS = ("mmAP", "AP50", "AP75", "APs", "APm", "APl")


@torch.no_grad()
def predict(
    model: nn.Module,
    dataset: CocoDetection,
    device: torch.device,
    images_per_device: int,
    num_workers: int = 0,
    progress: bool = False,
) -> list[dict]:
    """COCO-format detections for this rank's contiguous share of ``dataset``."""
    rank, world = dist.get_rank(), dist.get_world_size()
    share = -(-len(dataset) // world)
    indices = list(range(rank * share, min(len(dataset), (rank + 1) * share)))
    loader = torch.utils.data.DataLoader(
        torch.utils.data.Subset(dataset, indices),
        batch_size=images_per_device,
        num_workers=num_workers,
        collate_fn=collate,
    )
    category_ids = dataset.index.category_ids
    was_training = model.training
    model.eval()
    dtype = next(model.parameters()).dtype  # train.dtype
    results = []
    shown = Progress(len(indices), "image", "eval") if progress else None
    for images, targets in loader:
        outputs = model([image.to(device, dtype, non_blocking=True) for image in images])
        if shown:
            shown.update(len(images))
        for output, target in zip(outputs, targets, strict=True):
            boxes = output["boxes"].cpu()
            boxes[:, 2:] -= boxes[:, :2]  # xyxy -> xywh
            for box, score, label in zip(
                boxes.tolist(), output["scores"].tolist(), output["labels"].tolist(), strict=True
            ):
                results.append(
                    {
                        "image_id": target["image_id"],
                        "category_id": category_ids[label - 1],
                        "bbox": [round(v, 3) for v in box],
                        "score": round(score, 5),
                    }
                )
    model.train(was_training)
    if shown:
        shown.close()
    return results


def evaluate_coco(
    gt_json: str | Path, results: list[dict], backend: str
) -> tuple[dict[str, float], str]:
    """Run COCO's bbox evaluation (``eval.backend``) on ``results``; return the six summary
    metrics and the evaluator's printed report."""
    if not results:
        return dict.fromkeys(METRICS, 0.0), "no detections\n"
    coco_class, make_evaluator = _backend(backend)
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        ground_truth = coco_class(str(gt_json))
        evaluator = make_evaluator(ground_truth, ground_truth.loadRes(results))
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    # COCOeval reports -1 where a size range has no ground truth; that is "not measured".
    metrics = {name: float(v) for name, v in zip(METRICS, evaluator.stats[:6], strict=True)}
    return metrics, buffer.getvalue()


def _backend(name: str):
    """The backend's COCO class and a bbox-evaluator constructor; imported only if used."""
    if name == "pycocotools":
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval

        return COCO, lambda gt, dt: COCOeval(gt, dt, "bbox")
    if name == "faster":
        from faster_coco_eval import COCO, COCOeval_faster

        # Its summary goes to a logger by default; printed, the report reads as pycocotools'.
        return COCO, lambda gt, dt: COCOeval_faster(gt, dt, "bbox", print_function=print)
    raise ValueError(f"eval.backend: '{name}' is not one of {', '.join(EVAL_BACKENDS)}")


def evaluate_distributed(
    model: nn.Module,
    dataset: CocoDetection,
    device: torch.device,
    images_per_device: int,
    out_dir: Path | None,
    backend: str,
    num_workers: int = 0,
    progress: bool = False,
) -> dict[str, float]:
    """Every rank predicts its share; rank 0 evaluates, writes ``out_dir``, shares the metrics."""
    mine = predict(model, dataset, device, images_per_device, num_workers, progress)
    shares = dist.all_gather_object(mine)
    metrics = None
    if dist.get_rank() == 0:
        results = [r for share in shares for r in share]
        metrics, report = evaluate_coco(dataset.index.path, results, backend)
        if out_dir is not None:
            out_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_text(out_dir / "results.json", json.dumps(results))
            atomic_write_text(out_dir / "metrics.json", json.dumps(metrics, indent=2) + "\n")
            atomic_write_text(out_dir / "cocoeval.txt", report)
    return dist.broadcast_object(metrics)


def format_metrics(metrics: dict[str, float]) -> str:
    """A two-line table: metric names over values, in percent as COCO papers print them."""
    header = " | ".join(f"{name:>6}" for name in METRICS)
    values = " | ".join(
        f"{100 * metrics[name]:6.2f}" if metrics[name] >= 0 else f"{'n/a':>6}" for name in METRICS
    )
    return f"{header}\n{values}"
