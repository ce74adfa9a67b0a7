"""Validate a COCO instances file and its images, reporting every problem at once.

``megdet data check`` runs all of it, decoding every image; training runs the same checks on
the JSON and that every image file exists before the first iteration (decoding a whole dataset
would take minutes on COCO), and the loader reports an undecodable image by name.

Errors make the dataset unusable (a missing key, an annotation naming an unknown image or
category, a missing or unreadable image). Boxes without area inside their image are dropped
with a count, and are errors under ``data.strict``. Images without annotations are kept, as in
COCO. Grayscale, RGBA, palette and 16-bit images are converted to 8-bit RGB when loaded.
"""

from __future__ import annotations

import json
import numbers
from dataclasses import dataclass, field
from pathlib import Path

import PIL.Image

MIN_SIDE = 1e-2  # a box narrower than this (in pixels) inside its image has no area


@dataclass
class CheckReport:
    path: Path
    errors: list[str] = field(default_factory=list)
    dropped_boxes: list[str] = field(default_factory=list)  # why each dropped box was dropped
    converted_images: int = 0  # grayscale, RGBA, palette or 16-bit: converted to RGB
    images: int = 0
    annotations: int = 0
    images_without_annotations: int = 0

    def problems(self, strict: bool) -> list[str]:
        return self.errors + (self.dropped_boxes if strict else [])

    def summary(self) -> str:
        return (
            f"{self.path}: {self.images} images, {self.annotations} annotations, "
            f"{len(self.errors)} error(s), {len(self.dropped_boxes)} box(es) without area "
            f"dropped, {self.images_without_annotations} image(s) without annotations (kept), "
            f"{self.converted_images} image(s) converted to 8-bit RGB"
        )


def load_json(path: Path) -> tuple[dict | None, CheckReport]:
    report = CheckReport(Path(path))
    if not report.path.is_file():
        report.errors.append(f"{path}: annotation file not found")
        return None, report
    try:
        coco = json.loads(report.path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        report.errors.append(f"{path}: not valid JSON ({exc})")
        return None, report
    for key in ("images", "annotations", "categories"):
        if not isinstance(coco, dict) or not isinstance(coco.get(key), list):
            report.errors.append(f"{path}: missing list '{key}' (is this a COCO instances file?)")
    return (coco if not report.errors else None), report


def check_structure(coco: dict, report: CheckReport) -> list[tuple[dict, list[float]]]:
    """Check every image, category and annotation record; return the usable annotations with
    their boxes clipped to the image (x0, y0, x1, y1), crowd annotations left out."""
    path = report.path
    sizes: dict = {}
    for n, image in enumerate(coco["images"]):
        where = f"{path}: images[{n}]"
        missing = _missing(image, ("id", "file_name", "width", "height"))
        if missing:
            report.errors.append(f"{where}: missing key '{missing}'")
            continue
        if image["id"] in sizes:
            report.errors.append(f"{where}: duplicate image id {image['id']}")
        if not all(_positive(image[k]) for k in ("width", "height")):
            report.errors.append(f"{where}: width and height must be positive numbers")
            continue
        sizes[image["id"]] = (image["width"], image["height"])
    category_ids = set()
    for n, category in enumerate(coco["categories"]):
        if "id" not in category:
            report.errors.append(f"{path}: categories[{n}]: missing key 'id'")
        elif category["id"] in category_ids:
            report.errors.append(f"{path}: categories[{n}]: duplicate category id {category['id']}")
        else:
            category_ids.add(category["id"])
    report.images = len(coco["images"])
    report.annotations = len(coco["annotations"])
    usable = []
    annotated = set()
    for n, ann in enumerate(coco["annotations"]):
        where = f"{path}: annotations[{n}] (id {ann.get('id')})"
        missing = _missing(ann, ("image_id", "category_id", "bbox"))
        if missing:
            report.errors.append(f"{where}: missing key '{missing}'")
            continue
        if ann["image_id"] not in sizes:
            report.errors.append(f"{where}: names unknown image_id {ann['image_id']}")
            continue
        if ann["category_id"] not in category_ids:
            report.errors.append(f"{where}: names unknown category_id {ann['category_id']}")
            continue
        bbox = ann["bbox"]
        if not (isinstance(bbox, list) and len(bbox) == 4 and all(map(_number, bbox))):
            report.errors.append(f"{where}: bbox must be [x, y, width, height], got {bbox!r}")
            continue
        annotated.add(ann["image_id"])
        if ann.get("iscrowd", 0):
            continue
        x, y, w, h = bbox
        width, height = sizes[ann["image_id"]]
        if w <= 0 or h <= 0:
            report.dropped_boxes.append(f"{where}: bbox has width {w} and height {h}")
            continue
        x0, y0, x1, y1 = max(0.0, x), max(0.0, y), min(float(width), x + w), min(float(height), y + h)
        if x1 - x0 < MIN_SIDE or y1 - y0 < MIN_SIDE:
            report.dropped_boxes.append(f"{where}: bbox {bbox} lies outside its {width}x{height} image")
            continue
        usable.append((ann, [x0, y0, x1, y1]))
    report.images_without_annotations = len(set(sizes) - annotated)
    return usable


def check_image_files(coco: dict, image_dir: Path, report: CheckReport, decode: bool) -> None:
    """Every image file exists; with ``decode``, it also opens and has the JSON's size."""
    for image in coco["images"]:
        if _missing(image, ("file_name", "width", "height")):
            continue  # reported by check_structure
        file = Path(image_dir) / image["file_name"]
        if not file.is_file():
            report.errors.append(f"{file}: image file not found (images[{image.get('id')}])")
            continue
        if not decode:
            continue
        try:
            with PIL.Image.open(file) as opened:
                opened.load()
                mode, size = opened.mode, opened.size
        except (OSError, ValueError, PIL.Image.DecompressionBombError) as exc:
            report.errors.append(f"{file}: cannot read image ({exc})")
            continue
        if mode != "RGB":
            report.converted_images += 1
        if size != (image["width"], image["height"]):
            report.errors.append(
                f"{file}: image is {size[0]}x{size[1]} but {report.path} says "
                f"{image['width']}x{image['height']}"
            )


def check_dataset(json_path: Path, image_dir: Path | None, decode: bool = True) -> CheckReport:
    """Everything at once: the JSON's records and, given ``image_dir``, the image files."""
    coco, report = load_json(json_path)
    if coco is None:
        return report
    check_structure(coco, report)
    if image_dir is not None:
        check_image_files(coco, image_dir, report, decode)
    return report


def _missing(record, keys) -> str | None:
    if not isinstance(record, dict):
        return keys[0]
    return next((k for k in keys if k not in record), None)


def _number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _positive(value) -> bool:
    return _number(value) and value > 0
