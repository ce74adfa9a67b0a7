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
import math
import numbers
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import PIL.Image

from megdet.errors import one_line

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
    except OSError as exc:
        report.errors.append(f"{path}: cannot read ({exc.strerror})")
        return None, report
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, UnicodeDecodeError, nesting
        report.errors.append(f"{path}: not valid JSON ({one_line(exc)})")
        return None, report
    for key in ("images", "annotations", "categories"):
        if not isinstance(coco, dict) or not isinstance(coco.get(key), list):
            report.errors.append(f"{path}: missing list '{key}' (is this a COCO instances file?)")
    return (coco if not report.errors else None), report


def check_structure(coco: dict, report: CheckReport) -> list[tuple[dict, list[float]]]:
    """Check every image, category and annotation record; return the usable annotations with
    their boxes clipped to the image (x0, y0, x1, y1), crowd annotations left out."""
    sizes = _check_images(coco["images"], report)
    category_ids = _check_categories(coco["categories"], report)
    report.images = len(coco["images"])
    report.annotations = len(coco["annotations"])
    path = report.path
    usable = []
    annotated = set()
    annotation_ids = set()
    # An id that names nothing is one line however many annotations use it (a missing or
    # mistyped image would otherwise be reported once per box).
    unknown: dict[tuple[str, int], list[int]] = {}
    for n, ann in enumerate(coco["annotations"]):
        if not isinstance(ann, dict):
            report.errors.append(f"{path}: annotations[{n}]: must be an object, got {ann!r:.40}")
            continue
        where = f"{path}: annotations[{n}] (id {ann.get('id')!r:.40})"
        missing = _missing(ann, ("image_id", "category_id", "bbox"))
        if missing:
            report.errors.append(f"{where}: missing key '{missing}'")
            continue
        problem = _id_problem(ann, ("id", "image_id", "category_id"))
        if problem:
            report.errors.append(f"{where}: {problem}")
            continue
        if "id" in ann:
            if ann["id"] in annotation_ids:
                report.errors.append(f"{where}: duplicate annotation id {ann['id']}")
            annotation_ids.add(ann["id"])
        if ann["image_id"] not in sizes:
            unknown.setdefault(("image_id", ann["image_id"]), []).append(n)
            continue
        if ann["category_id"] not in category_ids:
            unknown.setdefault(("category_id", ann["category_id"]), []).append(n)
            continue
        bbox = ann["bbox"]
        if not (isinstance(bbox, list) and len(bbox) == 4 and all(map(_number, bbox))):
            report.errors.append(
                f"{where}: bbox must be 4 finite numbers [x, y, width, height], got {bbox!r:.80}"
            )
            continue
        if "area" in ann and not (_number(ann["area"]) and ann["area"] >= 0):
            report.errors.append(
                f"{where}: area must be a finite number >= 0, got {ann['area']!r:.40}"
            )
            continue
        if ann.get("iscrowd", 0) not in (0, 1):
            report.errors.append(f"{where}: iscrowd must be 0 or 1, got {ann['iscrowd']!r:.40}")
            continue
        annotated.add(ann["image_id"])
        if ann.get("iscrowd", 0):
            continue
        x, y, w, h = bbox
        width, height = sizes[ann["image_id"]]
        if w <= 0 or h <= 0:
            report.dropped_boxes.append(f"{where}: bbox has width {w} and height {h}")
            continue
        x0, y0, x1, y1 = (
            max(0.0, x),
            max(0.0, y),
            min(float(width), x + w),
            min(float(height), y + h),
        )
        if x1 - x0 < MIN_SIDE or y1 - y0 < MIN_SIDE:
            report.dropped_boxes.append(
                f"{where}: bbox {bbox} lies outside its {width}x{height} image"
            )
            continue
        usable.append((ann, [x0, y0, x1, y1]))
    for (key, value), indices in unknown.items():
        named = ", ".join(f"[{i}]" for i in indices[:3]) + (", ..." if len(indices) > 3 else "")
        report.errors.append(
            f"{path}: {len(indices)} annotation(s) (annotations{named}) name unknown {key} {value}"
        )
    report.images_without_annotations = len(set(sizes) - annotated)
    return usable


def _check_images(images: list, report: CheckReport) -> dict[int, tuple[float, float]]:
    """Image id -> (width, height) of every valid image record."""
    sizes: dict[int, tuple[float, float]] = {}
    for n, image in enumerate(images):
        where = f"{report.path}: images[{n}]"
        missing = _missing(image, ("id", "file_name", "width", "height"))
        if missing:
            report.errors.append(f"{where}: missing key '{missing}'")
            continue
        problem = _id_problem(image, ("id",))
        if problem:
            report.errors.append(f"{where}: {problem}")
            continue
        if image["id"] in sizes:
            report.errors.append(f"{where}: duplicate image id {image['id']}")
        if not (isinstance(image["file_name"], str) and image["file_name"]):
            report.errors.append(
                f"{where}: file_name must be a path, got {image['file_name']!r:.40}"
            )
            continue
        if leaves_folder(image["file_name"]):
            report.errors.append(
                f"{where}: file_name {image['file_name']!r:.80} leaves the images folder "
                "(absolute, or through '..'); file_names are relative to it"
            )
            continue
        if not all(_positive(image[k]) for k in ("width", "height")):
            report.errors.append(f"{where}: width and height must be positive finite numbers")
            continue
        sizes[image["id"]] = (image["width"], image["height"])
    return sizes


def _check_categories(categories: list, report: CheckReport) -> set[int]:
    category_ids: set[int] = set()
    for n, category in enumerate(categories):
        where = f"{report.path}: categories[{n}]"
        if _missing(category, ("id",)):
            report.errors.append(f"{where}: missing key 'id'")
        elif problem := _id_problem(category, ("id",)):
            report.errors.append(f"{where}: {problem}")
        elif category["id"] in category_ids:
            report.errors.append(f"{where}: duplicate category id {category['id']}")
        elif not isinstance(category.get("name", ""), str):
            report.errors.append(f"{where}: name must be a string, got {category['name']!r:.40}")
        else:
            category_ids.add(category["id"])
    return category_ids


def check_image_files(coco: dict, image_dir: Path, report: CheckReport, decode: bool) -> None:
    """Every image file exists; with ``decode``, it also opens and has the JSON's size."""
    for image in coco["images"]:
        if (
            _missing(image, ("file_name", "width", "height"))
            or not isinstance(image["file_name"], str)
            or leaves_folder(image["file_name"])
        ):
            continue  # reported by check_structure
        file = Path(image_dir) / image["file_name"]
        try:
            found = file.is_file()
        except OSError as exc:  # e.g. a name too long for the filesystem
            found, reason = False, exc.strerror
        else:
            reason = "image file not found"
        if not found:
            report.errors.append(f"{file!s:.200}: {reason} (image id {image.get('id')!r:.40})")
            continue
        if not decode:
            continue
        try:
            with PIL.Image.open(file) as opened:
                opened.load()
                mode, size = opened.mode, opened.size
        except Exception as exc:  # any decoder failure (PIL raises SyntaxError, struct.error, ...)
            report.errors.append(f"{file}: cannot read image ({one_line(exc)})")
            continue
        if mode != "RGB":
            report.converted_images += 1
        valid_size = _positive(image["width"]) and _positive(image["height"])
        if valid_size and size != (image["width"], image["height"]):
            report.errors.append(
                f"{file}: image is {size[0]}x{size[1]} but {report.path} says "
                f"{image['width']}x{image['height']}"
            )


def leaves_folder(file_name: str) -> bool:
    """Whether a COCO ``file_name`` points outside the folder it is relative to: an absolute
    path (``/etc/passwd``), or one that climbs out through ``..``. Subfolders are fine."""
    parts = PurePosixPath(file_name.replace("\\", "/")).parts
    if Path(file_name).is_absolute() or (parts and parts[0] == "/"):
        return True
    depth = 0
    for part in parts:
        depth += -1 if part == ".." else (0 if part == "." else 1)
        if depth < 0:
            return True
    return False


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


def _id_problem(record: dict, keys) -> str | None:
    """COCO ids are integers: a string or float id would silently match nothing."""
    for key in keys:
        value = record.get(key, 0)
        if not isinstance(value, int) or isinstance(value, bool):
            return f"{key} must be an integer, got {value!r:.40}"
    return None


def _number(value) -> bool:
    """A finite real number (NaN, infinities and ints beyond float range are not)."""
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def _positive(value) -> bool:
    return _number(value) and value > 0
