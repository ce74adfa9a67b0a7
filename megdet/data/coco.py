"""COCO-format detection data: the annotation file, its images, and per-image augmentation."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import PIL.Image
import torch
from torchvision import tv_tensors
from torchvision.transforms.v2 import functional as F

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


def read_coco(path: str | Path) -> CocoIndex:
    """Parse a COCO instances file; crowd and degenerate boxes are left out of training."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: annotation file not found")
    try:
        coco = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: not valid JSON ({exc})") from None
    for key in ("images", "annotations", "categories"):
        if not isinstance(coco, dict) or not isinstance(coco.get(key), list):
            raise DataError(f"{path}: missing list '{key}' (is this a COCO instances file?)")
    categories = sorted(coco["categories"], key=lambda c: c["id"])
    label_of = {c["id"]: k + 1 for k, c in enumerate(categories)}
    images = sorted(coco["images"], key=lambda im: im["id"])
    sizes = {im["id"]: (im["width"], im["height"]) for im in images}
    boxes: dict[int, list[tuple[list[float], int]]] = {im["id"]: [] for im in images}
    dropped = 0
    for ann in coco["annotations"]:
        image_id, category_id = ann.get("image_id"), ann.get("category_id")
        if image_id not in sizes:
            raise DataError(f"{path}: annotation {ann.get('id')} names unknown image_id {image_id}")
        if category_id not in label_of:
            raise DataError(
                f"{path}: annotation {ann.get('id')} names unknown category_id {category_id}"
            )
        if ann.get("iscrowd", 0):
            continue
        x, y, w, h = ann["bbox"]
        width, height = sizes[image_id]
        x0, y0 = max(0.0, x), max(0.0, y)
        x1, y1 = min(float(width), x + w), min(float(height), y + h)
        if x1 - x0 < 1e-2 or y1 - y0 < 1e-2:
            dropped += 1
            continue
        boxes[image_id].append(([x0, y0, x1, y1], label_of[category_id]))
    if dropped:
        log.warning("%s: dropped %d boxes with no area inside their image", path, dropped)
    return CocoIndex(
        path=path,
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
        try:
            with PIL.Image.open(path) as file:
                image = F.pil_to_tensor(file.convert("RGB"))
        except (OSError, ValueError) as exc:
            raise DataError(f"{path}: cannot read image ({exc})") from None
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
