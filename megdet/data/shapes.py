"""A synthetic detection dataset in COCO format: colored shapes on textured backgrounds.

It lets every machine train and evaluate a real detector in minutes with no download. The
class is the shape, never the color (colors are drawn independently), objects overlap and vary
in scale, and backgrounds carry noise and stripes so the detector must learn edges. One seed
gives byte-identical files: every random draw comes from one ``numpy`` generator per image.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from megdet.atomic import atomic_folder, refuse_existing_set

CLASSES = ("rectangle", "ellipse", "triangle")
# Non-contiguous ids on purpose, as in COCO: code must map ids to labels, never assume 1..K.
CATEGORY_IDS = (1, 3, 7)
MAX_OVERLAP = 0.4  # an object may hide at most this fraction of an earlier one


def generate_shapes(
    out: Path,
    num_train: int,
    num_val: int,
    size: int = 128,
    seed: int = 0,
    width: int | None = None,
    overwrite: bool = False,
) -> dict[str, Path]:
    """Write ``out/{train,val}/*.png`` and ``out/annotations/instances_{train,val}.json``:
    ``size`` x ``size`` images, or ``size`` high and ``width`` wide (COCO's 800 x 1333).

    The set appears whole or not at all (``atomic_folder``); a set already in ``out`` is
    refused unless ``overwrite``, which replaces it (no stale images left)."""
    out = Path(out)
    refuse_existing_set(out, SET_ENTRIES, overwrite)
    with atomic_folder(out) as tmp:
        written = _write_shapes(tmp, num_train, num_val, size, seed, width or size)
    return {split: out / path.relative_to(tmp) for split, path in written.items()}


SET_ENTRIES = ("train", "val", "annotations")


def _write_shapes(out: Path, num_train, num_val, height, seed, width) -> dict[str, Path]:
    written = {}
    for split, count, offset in (("train", num_train, 0), ("val", num_val, 1_000_003)):
        (out / split).mkdir(parents=True, exist_ok=True)
        (out / "annotations").mkdir(parents=True, exist_ok=True)
        images, annotations = [], []
        for index in range(count):
            rng = np.random.default_rng([seed, offset + index])
            pixels, objects = _draw_image(rng, height, width)
            image_id = index + 1
            file_name = f"{split}_{image_id:06d}.png"
            Image.fromarray(pixels).save(out / split / file_name, optimize=False)
            images.append(
                {"id": image_id, "file_name": file_name, "width": width, "height": height}
            )
            for category_id, box, polygon, area in objects:
                annotations.append(
                    {
                        "id": len(annotations) + 1,
                        "image_id": image_id,
                        "category_id": category_id,
                        "bbox": [round(v, 2) for v in box],
                        "area": round(area, 2),
                        "segmentation": [[round(v, 2) for v in polygon]],
                        "iscrowd": 0,
                    }
                )
        coco = {
            "info": {"description": f"megdet synthetic shapes ({split}), seed {seed}"},
            "images": images,
            "annotations": annotations,
            "categories": [
                {"id": cid, "name": name, "supercategory": "shape"}
                for cid, name in zip(CATEGORY_IDS, CLASSES, strict=True)
            ],
        }
        path = out / "annotations" / f"instances_{split}.json"
        path.write_text(json.dumps(coco, indent=1, sort_keys=True) + "\n")
        written[split] = path
    return written


def _draw_image(rng: np.random.Generator, height: int, width: int):
    pixels = background(rng, height, width)
    size = min(height, width)
    image = Image.fromarray(pixels)
    draw = ImageDraw.Draw(image)
    boxes: list[tuple[float, float, float, float]] = []
    objects = []
    wanted = int(rng.integers(1, 9))
    for _ in range(40):  # placement attempts
        if len(objects) == wanted:
            break
        side = size * rng.uniform(0.1, 0.5)
        w = side * rng.uniform(0.6, 1.4)
        h = side * rng.uniform(0.6, 1.4)
        w, h = min(w, width - 2.0), min(h, height - 2.0)
        x0 = rng.uniform(0, width - w)
        y0 = rng.uniform(0, height - h)
        box = (x0, y0, x0 + w, y0 + h)
        if any(hidden_fraction(old, box) > MAX_OVERLAP for old in boxes):
            continue
        kind = int(rng.integers(len(CLASSES)))
        color = tuple(int(c) for c in rng.integers(0, 256, 3))
        polygon = _shape_polygon(kind, box, rng)
        draw.polygon(polygon, fill=color)
        xs, ys = [x for x, _ in polygon], [y for _, y in polygon]
        tight = (min(xs), min(ys), max(xs) - min(xs), max(ys) - min(ys))
        flat = [v for point in polygon for v in point]
        boxes.append(box)
        objects.append((CATEGORY_IDS[kind], tight, flat, _polygon_area(polygon)))
    noisy = np.asarray(image, dtype=np.float32) + rng.normal(0, 6, (height, width, 3))
    return np.clip(noisy, 0, 255).astype(np.uint8), objects


def background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A striped, noisy background; the plain patterns draw theirs here too, so that a
    backbone pretrained on them has seen the detector's backgrounds."""
    base = rng.uniform(40, 215, 3)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    angle = rng.uniform(0, math.pi)
    period = rng.uniform(6, 40)
    stripes = np.sin((xx * math.cos(angle) + yy * math.sin(angle)) * 2 * math.pi / period)
    amplitude = rng.uniform(0, 30)
    noise = rng.normal(0, rng.uniform(5, 20), (height, width, 3))
    pixels = base + amplitude * stripes[..., None] + noise
    return np.clip(pixels, 0, 255).astype(np.uint8)


def _shape_polygon(kind: int, box, rng: np.random.Generator):
    """Polygon of the shape inscribed in ``box``, touching all four sides."""
    x0, y0, x1, y1 = box
    w, h = x1 - x0, y1 - y0
    if CLASSES[kind] == "rectangle":
        return [(x0, y0), (x1, y0), (x1, y1), (x0, y1)]
    if CLASSES[kind] == "ellipse":
        cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
        return [
            (cx + w / 2 * math.cos(t), cy + h / 2 * math.sin(t))
            for t in np.linspace(0, 2 * math.pi, 32, endpoint=False)
        ]
    apex = rng.uniform(0.0, 1.0)
    orientation = int(rng.integers(4))  # apex on the top, bottom, left or right side
    if orientation == 0:
        points = [(x0 + apex * w, y0), (x1, y1), (x0, y1)]
    elif orientation == 1:
        points = [(x0 + apex * w, y1), (x1, y0), (x0, y0)]
    elif orientation == 2:
        points = [(x0, y0 + apex * h), (x1, y0), (x1, y1)]
    else:
        points = [(x1, y0 + apex * h), (x0, y0), (x0, y1)]
    return points


def _polygon_area(points) -> float:
    """Shoelace formula: the COCO ``area`` of the drawn polygon."""
    twice = sum(
        x0 * y1 - x1 * y0
        for (x0, y0), (x1, y1) in zip(points, points[1:] + points[:1], strict=True)
    )
    return abs(twice) / 2


def hidden_fraction(old, new) -> float:
    """Fraction of ``old``'s box area that ``new`` covers."""
    iw = min(old[2], new[2]) - max(old[0], new[0])
    ih = min(old[3], new[3]) - max(old[1], new[1])
    if iw <= 0 or ih <= 0:
        return 0.0
    return iw * ih / ((old[2] - old[0]) * (old[3] - old[1]))
