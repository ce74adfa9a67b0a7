"""``megdet predict``: a trained detector on people's own images.

Each process takes a contiguous share of the inputs, predicts them in batches, and draws its
own images; rank 0 gathers the detections into one COCO results file. A file that cannot be
decoded is skipped and named; the rest are still predicted.
"""

from __future__ import annotations

import colorsys
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import PIL.Image
import torch
from torch import nn
from torchvision.transforms.v2 import functional as F
from torchvision.utils import draw_bounding_boxes

from megdet import dist
from megdet.atomic import atomic_write_bytes, atomic_write_text
from megdet.config import Config
from megdet.data.images import read_rgb
from megdet.engine.checkpoint import load_model_state
from megdet.errors import DataError, MegdetError
from megdet.logs import Progress
from megdet.tasks.detection.model import build_detector

DRAWN_MIN_SIDE = 512  # smaller images are enlarged (by a whole factor) so labels stay legible


@dataclass
class Predictions:
    """What one process (or, gathered, all of them) predicted."""

    results: list[dict] = field(default_factory=list)  # COCO results, plus names
    skipped: list[str] = field(default_factory=list)  # one line per file not predicted
    images: int = 0  # predicted


def checkpoint_labels(state: dict, cfg: Config, source: Path) -> dict[str, list]:
    """The class names and category ids the checkpoint keeps; for a checkpoint written before
    megdet kept them, those of the config's training JSON, if it is on this machine."""
    labels = state.get("labels")
    if labels is None:
        from megdet.tasks.detection.task import DetectionTask

        try:
            labels = DetectionTask(cfg).labels()
        except MegdetError as exc:
            raise MegdetError(
                f"{source}: keeps no class names (written by an older megdet) and its "
                f"data.train.json cannot tell them ({exc}); retrain, or give data.train.json=FILE"
            ) from None
    names, ids = labels.get("names"), labels.get("category_ids")
    if not (isinstance(names, list) and isinstance(ids, list) and len(names) == len(ids)):
        raise MegdetError(f"{source}: not a detection checkpoint (no category ids in its labels)")
    return labels


def load_detector(state: dict, cfg: Config, source: Path, labels: dict, score: float) -> nn.Module:
    """The checkpoint's detector in eval mode, keeping detections scoring at least ``score``."""
    model = build_detector(cfg.model, len(labels["names"]))
    load_model_state(model, state["model"], source)
    model.roi_heads.score_thresh = score
    return model.eval()


@torch.no_grad()
def predict_files(
    model: nn.Module,
    files: list[Path],
    drawn: dict[Path, Path] | None,
    labels: dict[str, list],
    device: torch.device,
    batch_size: int,
    progress: bool = False,
) -> Predictions:
    """This rank's share of ``files``: detections (image ids are positions in ``files``, from
    1) and, where ``drawn`` gives a path, the image with its boxes drawn."""
    rank, world = dist.get_rank(), dist.get_world_size()
    share = -(-len(files) // world)
    mine = list(enumerate(files, 1))[rank * share : (rank + 1) * share]
    out = Predictions()
    bar = Progress(len(mine), "image", "predict") if progress else None
    model = model.to(device)
    for start in range(0, len(mine), batch_size):
        batch = []
        for image_id, path in mine[start : start + batch_size]:
            try:
                batch.append((image_id, path, read_rgb(path, upright=True)))
            except DataError as exc:
                out.skipped.append(f"{exc}; skipped")
        if batch:
            images = [F.to_dtype(image, torch.float32, scale=True) for _, _, image in batch]
            outputs = model([image.to(device) for image in images])
            for (image_id, path, image), output in zip(batch, outputs, strict=True):
                output = {k: v.cpu() for k, v in output.items()}
                out.results += _records(image_id, path, output, labels)
                if drawn is not None:
                    _write_jpeg(drawn[path], draw_detections(image, output, labels["names"]))
            out.images += len(batch)
        if bar is not None:
            bar.update(len(mine[start : start + batch_size]))
    if bar is not None:
        bar.close()
    return out


def gather(mine: Predictions) -> Predictions:
    """Every rank's predictions, in input order (on every rank)."""
    shares = dist.all_gather_object(mine)
    total = Predictions()
    for share in shares:
        total.results += share.results
        total.skipped += share.skipped
        total.images += share.images
    return total


def write_detections(path: Path, predictions: Predictions) -> None:
    atomic_write_text(path, json.dumps(predictions.results))


def _records(image_id: int, path: Path, output: dict, labels: dict) -> list[dict]:
    """COCO results (xywh boxes, the dataset's category ids), with the file and class names."""
    boxes = output["boxes"].clone()
    boxes[:, 2:] -= boxes[:, :2]
    return [
        {
            "image_id": image_id,
            "file_name": str(path),
            "category_id": labels["category_ids"][label - 1],
            "category_name": labels["names"][label - 1],
            "bbox": [round(v, 2) for v in box],
            "score": round(score, 4),
        }
        for box, score, label in zip(
            boxes.tolist(), output["scores"].tolist(), output["labels"].tolist(), strict=True
        )
    ]


def drawn_paths(files: list[Path], folder: Path) -> dict[Path, Path]:
    """Where each input's drawing goes: its path below the inputs' common folder, as JPEG.
    Inputs that would land on one name (``a.png`` and ``a.jpg``) keep their suffix in it."""
    absolute = [f.resolve() for f in files]
    common = Path(os.path.commonpath([a.parent for a in absolute]))
    relative = [a.relative_to(common) for a in absolute]
    wanted = [r.with_suffix(".jpg") for r in relative]
    counts: dict[Path, int] = {}
    for w in wanted:
        counts[w] = counts.get(w, 0) + 1
    return {
        f: folder / (w if counts[w] == 1 else r.with_name(r.name.replace(".", "_") + ".jpg"))
        for f, r, w in zip(files, relative, wanted, strict=True)
    }


def class_color(label: int) -> tuple[int, int, int]:
    """A color per class, far from its neighbours' (golden-ratio hue steps)."""
    hue = (label * 0.618033988749895) % 1.0
    return tuple(round(255 * c) for c in colorsys.hsv_to_rgb(hue, 0.85, 0.8))


def text_color(background: tuple[int, int, int]) -> str:
    """Black on light label backgrounds (yellow, lime), white on dark ones (Rec. 601 luma)."""
    red, green, blue = background
    return "black" if 0.299 * red + 0.587 * green + 0.114 * blue > 125 else "white"


def draw_detections(image: torch.Tensor, output: dict, names: list[str]) -> torch.Tensor:
    """``image`` (uint8, 3xHxW) with each box, its class name and score drawn; small images are
    enlarged first, and line and text sizes follow the image's size."""
    factor = max(1, math.ceil(DRAWN_MIN_SIDE / max(image.shape[-2:])))
    if factor > 1:
        image = image.repeat_interleave(factor, -2).repeat_interleave(factor, -1)
    if not len(output["boxes"]):
        return image
    longest = max(image.shape[-2:])
    labels, scores = output["labels"].tolist(), output["scores"].tolist()
    font = _font()
    colors = [class_color(k) for k in labels]
    return draw_bounding_boxes(
        image,
        output["boxes"] * factor,
        labels=[f"{names[k - 1]} {s:.2f}" for k, s in zip(labels, scores, strict=True)],
        colors=colors,
        width=max(2, round(longest / 320)),
        font=font,
        font_size=max(13, round(longest / 36)) if font else None,
        label_colors=[text_color(c) for c in colors],
        fill_labels=True,
    )


def _font() -> str | None:
    """matplotlib's DejaVu Sans (a megdet dependency, for the reports): PIL's built-in font
    cannot be scaled to the image."""
    import matplotlib

    path = Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf"
    return str(path) if path.is_file() else None


def _write_jpeg(path: Path, image: torch.Tensor) -> None:
    picture = PIL.Image.fromarray(image.permute(1, 2, 0).numpy())
    atomic_write_bytes(path, lambda f: picture.save(f, format="JPEG", quality=92))
