"""COCO-format detection data: the annotation file, its images, and per-image augmentation."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torchvision import tv_tensors
from torchvision.transforms.v2 import functional as F

from megdet.data.check import check_structure, load_json
from megdet.data.images import read_rgb
from megdet.data.sampler import image_seed
from megdet.errors import DataError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CocoIndex:
    """What training and evaluation need from a COCO annotation file, with labels 1..K."""

    path: Path
    images: list[dict]
    boxes: dict[int, list[tuple[list[float], int]]]  # image id -> [(xyxy, label)], no crowd
    category_ids: list[int]  # label k (1-based) is category_ids[k - 1]
    category_names: list[str]

    @property
    def num_classes(self) -> int:
        return len(self.category_ids)


def read_coco(path: str | Path, strict: bool = False) -> CocoIndex:
    """Parse a COCO instances file, checked as ``megdet data check`` does (``check.py``).

    Crowd boxes and boxes without area inside their image are left out of training (an error
    with ``strict``); any other problem is a one-line ``DataError`` naming the first of them.
    """
    coco, report = load_json(Path(path))
    if coco is None:
        raise DataError(report.errors[0])
    usable = check_structure(coco, report)
    problems = report.problems(strict)
    if problems:
        more = ""
        if len(problems) > 1:
            more = f" (and {len(problems) - 1} more; `megdet data check --json {path}` lists them)"
        raise DataError(problems[0] + more)
    if report.dropped_boxes:
        log.warning(
            "%s: dropped %d box(es) without area inside their image (first: %s); "
            "data.strict=true makes this an error",
            path, len(report.dropped_boxes), report.dropped_boxes[0],
        )  # fmt: skip
    categories = sorted(coco["categories"], key=lambda c: c["id"])
    label_of = {c["id"]: k + 1 for k, c in enumerate(categories)}
    images = sorted(coco["images"], key=lambda im: im["id"])
    boxes: dict[int, list[tuple[list[float], int]]] = {im["id"]: [] for im in images}
    for ann, box in usable:
        boxes[ann["image_id"]].append((box, label_of[ann["category_id"]]))
    return CocoIndex(
        path=Path(path),
        images=images,
        boxes=boxes,
        category_ids=[c["id"] for c in categories],
        category_names=[c.get("name", str(c["id"])) for c in categories],
    )


class CocoDetection(torch.utils.data.Dataset):
    """Images as float tensors in [0, 1] and torchvision-style targets.

    Items are addressed by ``(epoch, index)`` so that each image's augmentation draws from its
    own generator seeded by ``(seed, epoch, index)``: the same image gets the same flip whichever
    process loads it, which keeps training invariant to the world size.
    """

    def __init__(self, index: CocoIndex, image_dir: str | Path, seed: int = 0, hflip: bool = False):
        self.index = index
        self.image_dir = Path(image_dir)
        self.seed = seed
        self.hflip = hflip

    def __len__(self) -> int:
        return len(self.index.images)

    def __getitem__(self, key: int | tuple[int, int]):
        epoch, i = key if isinstance(key, tuple) else (0, key)
        info = self.index.images[i]
        image = self._load(info)
        pairs = self.index.boxes[info["id"]]
        boxes = tv_tensors.BoundingBoxes(
            torch.tensor([b for b, _ in pairs], dtype=torch.float32).reshape(-1, 4),
            format="XYXY",
            canvas_size=tuple(image.shape[-2:]),
        )
        if self.hflip:
            generator = torch.Generator().manual_seed(image_seed(self.seed, epoch, i))
            if torch.rand((), generator=generator) < 0.5:
                image, boxes = F.horizontal_flip(image), F.horizontal_flip(boxes)
        target = {
            "boxes": boxes.as_subclass(torch.Tensor),
            "labels": torch.tensor([label for _, label in pairs], dtype=torch.int64),
            "image_id": info["id"],
            "epoch": epoch,
            "index": i,
        }
        image = F.to_dtype(image, torch.float32, scale=True).as_subclass(torch.Tensor)
        return image, target

    def _load(self, info: dict) -> torch.Tensor:
        path = self.image_dir / info["file_name"]
        image = read_rgb(path)
        if tuple(image.shape[-2:]) != (info["height"], info["width"]):
            raise DataError(
                f"{path}: image is {image.shape[-1]}x{image.shape[-2]} but "
                f"{self.index.path} says {info['width']}x{info['height']}"
            )
        return tv_tensors.Image(image)


def collate(batch):
    """Detection batches stay lists: images differ in size until the model batches them."""
    images, targets = zip(*batch, strict=True)
    return list(images), list(targets)
