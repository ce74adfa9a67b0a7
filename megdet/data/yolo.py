"""YOLO (Ultralytics) labels to COCO: ``megdet data convert --from yolo``.

The layout: an image folder, and beside it a label folder with one ``.txt`` per image at the
same relative path; each line ``class cx cy w h``, normalized to the image, or ``class x1 y1
x2 y2 ...`` (a polygon, whose bounding box is taken, as Ultralytics does for detection). The
class names are the ``names`` of the dataset YAML (a list, or a dict from class to name).
"""

from __future__ import annotations

import math
from pathlib import Path

from megdet.data.convert import Conversion, categories_from, category_ids
from megdet.data.images import images_in
from megdet.errors import DataError, one_line


def convert_yolo(
    images: Path, labels: Path, names: list[str], ids_spec: str | None = None
) -> Conversion:
    """Every image under ``images`` (recursively, sorted), with its label file if it has one;
    label files without an image are noted, not converted."""
    for folder, option in ((images, "--images"), (labels, "--labels")):
        if not Path(folder).is_dir():
            raise DataError(f"{option} {folder}: not a folder")
    ids = category_ids(ids_spec, len(names))
    conversion = Conversion(f"YOLO labels in {labels}", categories_from(names, ids))
    image_files = images_in(images)
    used = set()
    boxes, unnormalized, largest = 0, 0, 0.0
    for path in image_files:
        relative = path.relative_to(images)
        label_file = Path(labels) / relative.with_suffix(".txt")
        used.add(label_file)
        image = conversion.add_image(path, relative.as_posix())
        if image is None or not label_file.is_file():
            continue
        try:
            lines = label_file.read_text().splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            conversion.errors.append(f"{label_file}: cannot read ({one_line(exc)})")
            continue
        for number, line in enumerate(lines, 1):
            if line.strip():
                coords = _add_line(conversion, image, line, f"{label_file}:{number}", ids)
                if coords:
                    boxes += 1
                    unnormalized += max(coords) > NORMALIZED_LIMIT
                    largest = max(largest, *coords)
    if unnormalized and unnormalized >= boxes / 2:
        # Clipping them to the image would drop nearly all, with only a note to show for it.
        conversion.errors.append(
            f"{labels}: {unnormalized} of {boxes} label lines have coordinates above 1 "
            f"(largest {largest:g}); YOLO labels are fractions of the image size (0 to 1), "
            "these look like pixels: divide x and width by the image width, y and height by "
            "its height"
        )
    orphans = sorted(p for p in Path(labels).rglob("*.txt") if p not in used)
    for orphan in orphans:
        conversion.notes.append(f"{orphan}: no image for this label file (not converted)")
    return conversion


# A normalized coordinate past this is not the rounding of a box at the image's edge.
NORMALIZED_LIMIT = 1.5


def _add_line(
    conversion: Conversion, image: dict, line: str, where: str, ids: list[int]
) -> list[float] | None:
    """Add one label line's box; its normalized box corners, or None if the line is an
    error."""
    fields = line.split()
    try:
        values = [float(v) for v in fields]
    except ValueError:
        conversion.errors.append(f"{where}: not numbers: {line.strip()!r:.60}")
        return None
    if len(values) != 5 and (len(values) < 7 or len(values) % 2 == 0):
        conversion.errors.append(
            f"{where}: expected 'class cx cy w h' or 'class x1 y1 x2 y2 x3 y3 ...', "
            f"got {len(values)} numbers"
        )
        return None
    cls = values[0]
    if not cls.is_integer() or not 0 <= cls < len(ids):
        conversion.errors.append(f"{where}: class {fields[0]} is not one of 0..{len(ids) - 1}")
        return None
    coords = values[1:]
    if not all(math.isfinite(v) for v in coords):
        conversion.errors.append(f"{where}: coordinates must be finite numbers")
        return None
    if len(coords) == 4:
        cx, cy, w, h = coords
        if w < 0 or h < 0:
            conversion.errors.append(f"{where}: negative width or height ({w}, {h})")
            return None
        box = [cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2]
    else:  # a polygon: its bounding box
        xs, ys = coords[0::2], coords[1::2]
        box = [min(xs), min(ys), max(xs), max(ys)]
    width, height = image["width"], image["height"]
    pixels = [box[0] * width, box[1] * height, box[2] * width, box[3] * height]
    conversion.add_box(image, ids[int(cls)], pixels, where)
    return box
