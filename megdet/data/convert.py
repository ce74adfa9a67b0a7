"""What the label converters (``yolo.py``, ``voc.py``) share: the COCO file they build, the
problems they collect, and how it is written.

A converter lists every problem at once, as ``megdet data check`` does. Errors (a line that
does not parse, an unknown class, an unreadable image) mean no file is written; notes (a label
file without an image, boxes clipped to their image or dropped for having no area) are printed
beside a file that is.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import PIL.Image

from megdet.atomic import atomic_write_text
from megdet.config import safe_yaml
from megdet.data.check import MIN_SIDE, CheckReport, check_structure
from megdet.errors import DataError, one_line

# COCO's 80 category ids, in the order of YOLO's contiguous classes 0-79.
COCO_CATEGORY_IDS = (
    [*range(1, 12), *range(13, 26), 27, 28, *range(31, 45), *range(46, 66), 67, 70]
    + [*range(72, 83), *range(84, 91)]
)  # fmt: skip


@dataclass
class Conversion:
    """A COCO instances file being built, with what went wrong on the way."""

    source: str  # what is being converted, for the summary line
    categories: list[dict]
    images: list[dict] = field(default_factory=list)
    annotations: list[dict] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    clipped: int = 0
    dropped: list[str] = field(default_factory=list)  # where each degenerate box was

    def add_image(self, path: Path, file_name: str) -> dict | None:
        """An image record with the size read from the file (its header, not its EXIF
        orientation: the pixels as stored, which training reads); None if it cannot be read."""
        try:
            with PIL.Image.open(path) as image:
                width, height = image.size
        except Exception as exc:  # any decoder failure
            self.errors.append(f"{path}: cannot read image ({one_line(exc)})")
            return None
        record = {"id": len(self.images) + 1, "file_name": file_name}
        record |= {"width": width, "height": height}
        self.images.append(record)
        return record

    def add_box(
        self, image: dict, category_id: int, xyxy: list[float], where: str, crowd: bool = False
    ) -> None:
        """A box in pixels, clipped to its image; dropped (and counted) if nothing is left."""
        width, height = image["width"], image["height"]
        x0, y0 = min(max(xyxy[0], 0.0), width), min(max(xyxy[1], 0.0), height)
        x1, y1 = min(max(xyxy[2], 0.0), width), min(max(xyxy[3], 0.0), height)
        if x1 - x0 < MIN_SIDE or y1 - y0 < MIN_SIDE:
            self.dropped.append(where)
            return
        # Overhangs below MIN_SIDE are the rounding of normalized labels, not boxes to report.
        if max(abs(a - b) for a, b in zip((x0, y0, x1, y1), xyxy, strict=True)) > MIN_SIDE:
            self.clipped += 1
        w, h = x1 - x0, y1 - y0
        self.annotations.append(
            {
                "id": len(self.annotations) + 1,
                "image_id": image["id"],
                "category_id": category_id,
                "bbox": [x0, y0, w, h],
                "area": w * h,
                "iscrowd": int(crowd),
                "segmentation": [],
            }
        )

    def to_coco(self) -> dict:
        return {
            "info": {"description": f"converted by megdet from {self.source}"},
            "images": self.images,
            "annotations": self.annotations,
            "categories": self.categories,
        }

    def summary(self, out: Path) -> str:
        empty = len(self.images) - len({a["image_id"] for a in self.annotations})
        return (
            f"{out}: {len(self.images)} images ({empty} without boxes, kept), "
            f"{len(self.annotations)} boxes in {len(self.categories)} categories, "
            f"{self.clipped} box(es) clipped to their image, {len(self.dropped)} without area "
            f"dropped"
        )

    def dropped_note(self) -> str | None:
        if not self.dropped:
            return None
        first = ", ".join(self.dropped[:3]) + (", ..." if len(self.dropped) > 3 else "")
        return f"dropped {len(self.dropped)} box(es) without area inside their image: {first}"


def read_names(path: Path) -> list[str]:
    """Class names from a dataset YAML's ``names``, in class order."""
    try:
        data = safe_yaml(Path(path).read_text(), str(path))
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror})") from None
    except UnicodeDecodeError:
        raise DataError(f"{path}: not a text file (a dataset YAML is UTF-8 text)") from None
    names = data.get("names") if isinstance(data, dict) else None
    if isinstance(names, dict):
        if sorted(names) != list(range(len(names))):
            raise DataError(f"{path}: names: the keys must be the classes 0..{len(names) - 1}")
        names = [names[i] for i in range(len(names))]
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        raise DataError(f"{path}: needs 'names', a list of class names or a dict class -> name")
    return names


def categories_from(names: list[str], ids: list[int]) -> list[dict]:
    return [{"id": i, "name": n, "supercategory": ""} for i, n in zip(ids, names, strict=True)]


def category_ids(spec: str | None, count: int) -> list[int]:
    """The COCO ids of classes 0..count-1: ``None`` 1..count, ``coco`` COCO's 80 in order,
    or a comma-separated list of positive integers, one per class."""
    if spec is None:
        return list(range(1, count + 1))
    if spec == "coco":
        if count != len(COCO_CATEGORY_IDS):
            raise DataError(
                f"--category-ids coco: COCO has 80 categories but the names list {count}"
            )
        return list(COCO_CATEGORY_IDS)
    try:
        ids = [int(item) for item in spec.split(",")]
    except ValueError:
        raise DataError(f"--category-ids: expected coco or ids like 1,2,5, got {spec}") from None
    if len(ids) != count or len(set(ids)) != count or min(ids) < 1:
        raise DataError(
            f"--category-ids: needs {count} distinct positive ids (one per class), got {len(ids)}"
        )
    return ids


def write_conversion(conversion: Conversion, out: Path, overwrite: bool) -> CheckReport:
    """Write the COCO file atomically, after it passes ``megdet data check``'s record checks;
    nothing is written while there are errors. The check's report comes back."""
    if not conversion.images and not conversion.errors:
        conversion.errors.append(f"{conversion.source}: no images found to convert")
    if conversion.errors:
        raise ConversionFailed(conversion.errors)
    if out.exists() and not overwrite:
        raise DataError(f"{out}: exists; pass --overwrite to replace it")
    coco = conversion.to_coco()
    report = CheckReport(out)
    check_structure(coco, report)
    if report.errors:  # a converter bug: never write a file that check refuses
        raise ConversionFailed(report.errors)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, json.dumps(coco))
    return report


class ConversionFailed(DataError):
    """Every problem of a conversion, one line each."""

    def __init__(self, errors: list[str]) -> None:
        self.errors = errors
        super().__init__(f"{len(errors)} problem(s); nothing written")
