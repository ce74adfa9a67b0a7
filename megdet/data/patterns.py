"""A synthetic classification set in ImageFolder layout: textured shapes on noisy backgrounds.

It lets every machine train a classifier with Goyal et al.'s recipe in minutes, with no
download, on a task hard enough for the learning rate to matter. A class is a shape and a fill
texture together (36 combinations; ``--classes`` takes the first K of a fixed shuffled order);
colors, size, position, stripe period and phase are drawn independently of the class, the two
texture colors may be close, and strong pixel noise and the background's own stripes cover
everything, so the network must learn both the outline and the texture (with milder noise a
ResNet-20 reached 0.35% top-1 error on 10 classes in 10 epochs: too easy for the learning
rate to matter). One seed gives byte-identical files: every random draw comes from
one ``numpy`` generator per image.

The ``plain`` style is the detector's own domain instead (issue 26): the six shapes filled
with one color, one to three of the image's class at the detection set's scales and aspect
ratios, on the shapes set's backgrounds with its light noise: what the detector sees, with
only the task changed. It was made to test whether the textured style's domain was why its
backbone transferred negatively; it transferred worse, and the cause was elsewhere (the size of
the pretrained weights: ``model.backbone_weights_rescale``, docs/studies.md).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from megdet.atomic import atomic_folder, refuse_existing_set
from megdet.data import shapes

SHAPES = ("square", "circle", "triangle", "cross", "ring", "diamond")
TEXTURES = ("solid", "hstripes", "vstripes", "diagonal", "dots", "checker")
# Every (shape, texture), in an order where the first K mix shapes and textures.
_ORDER = np.random.default_rng(20171108).permutation(len(SHAPES) * len(TEXTURES))
CLASSES = tuple(
    f"{SHAPES[i // len(TEXTURES)]}_{TEXTURES[i % len(TEXTURES)]}" for i in _ORDER.tolist()
)
# The classes of each style, in the order ``--classes K`` takes the first K of.
STYLE_CLASSES = {"textured": CLASSES, "plain": SHAPES}


def generate_patterns(
    out: Path,
    num_classes: int,
    num_train: int,
    num_val: int,
    size: int = 32,
    seed: int = 0,
    overwrite: bool = False,
    style: str = "textured",
) -> dict[str, Path]:
    """Write ``out/{train,val}/<class>/<index>.png``: ``num_train`` and ``num_val`` images
    spread evenly over ``num_classes`` classes (image i has class i mod K) of ``style``. The
    set appears whole or not at all; a set already in ``out`` is refused unless
    ``overwrite``."""
    if style not in STYLE_CLASSES:
        raise ValueError(f"--style: one of {', '.join(STYLE_CLASSES)}, got {style!r}")
    classes = STYLE_CLASSES[style]
    if not 2 <= num_classes <= len(classes):
        raise ValueError(
            f"--classes: between 2 and {len(classes)} for style {style}, got {num_classes}"
        )
    if size < 16:
        raise ValueError(f"--size: at least 16 pixels, got {size}")
    out = Path(out)
    refuse_existing_set(out, ("train", "val"), overwrite)
    with atomic_folder(out) as tmp:
        for split, count, offset in (("train", num_train, 0), ("val", num_val, 1_000_003)):
            for name in classes[:num_classes]:
                (tmp / split / name).mkdir(parents=True, exist_ok=True)
            for index in range(count):
                name = classes[index % num_classes]
                rng = np.random.default_rng([seed, offset + index])
                pixels = (draw if style == "textured" else draw_plain)(rng, name, size)
                path = tmp / split / name / f"{index:07d}.png"
                Image.fromarray(pixels).save(path, optimize=False)
    return {split: out / split for split in ("train", "val")}


def draw(rng: np.random.Generator, name: str, size: int) -> np.ndarray:
    """One ``size`` x ``size`` RGB image of class ``name``."""
    shape, texture = name.split("_")
    image = _background(rng, size)
    mask = _shape_mask(rng, shape, size)
    pattern = _texture(rng, texture, size)
    first, second = _contrasting_colors(rng)
    fill = np.where(pattern[..., None], first, second)
    image = np.where(mask[..., None], fill, image)
    noise = rng.normal(0, 24, image.shape)
    return np.clip(image + noise, 0, 255).astype(np.uint8)


def draw_plain(rng: np.random.Generator, shape: str, size: int) -> np.ndarray:
    """One ``size`` x ``size`` RGB image of the plain style: one to three ``shape``s of one
    color each, placed as the shapes set places its objects (a side of 0.1-0.5 of the image,
    each axis x0.6-1.4, at most ``MAX_OVERLAP`` of an earlier one hidden)."""
    image = shapes.background(rng, size, size)
    boxes: list[tuple[float, float, float, float]] = []
    wanted = int(rng.integers(1, 4))
    for _ in range(40):  # placement attempts
        if len(boxes) == wanted:
            break
        side = size * rng.uniform(0.1, 0.5)
        w, h = (min(side * rng.uniform(0.6, 1.4), size - 2.0) for _ in range(2))
        x0, y0 = rng.uniform(0, size - w), rng.uniform(0, size - h)
        box = (x0, y0, x0 + w, y0 + h)
        if any(shapes.hidden_fraction(old, box) > shapes.MAX_OVERLAP for old in boxes):
            continue
        boxes.append(box)
        mask = _shape_mask(rng, shape, size, box)
        image = np.where(mask[..., None], rng.integers(0, 256, 3), image)
    noisy = image + rng.normal(0, 6, image.shape)
    return np.clip(noisy, 0, 255).astype(np.uint8)


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    base = rng.uniform(0, 255, 3)
    y, x = np.mgrid[0:size, 0:size]
    angle = rng.uniform(0, math.pi)
    stripes = np.sin((x * math.cos(angle) + y * math.sin(angle)) * rng.uniform(0.3, 1.2))
    image = base + 25 * stripes[..., None] + rng.normal(0, 15, (size, size, 3))
    return np.clip(image, 0, 255)


def _shape_mask(
    rng: np.random.Generator, shape: str, size: int, box: tuple | None = None
) -> np.ndarray:
    """The mask of ``shape`` inscribed in ``box`` (x0, y0, x1, y1); without one, a square box
    of a side 0.35-0.75 of the image (the textured style)."""
    if box is None:  # drawn as before the plain style existed: the same sets, byte for byte
        side = rng.uniform(0.35, 0.75) * size
        cx, cy = rng.uniform(side / 2, size - side / 2, 2)
        hw = hh = side / 2
        box = (cx - hw, cy - hh, cx + hw, cy + hh)
    else:
        cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
        hw, hh = (box[2] - box[0]) / 2, (box[3] - box[1]) / 2
    canvas = Image.new("L", (size, size), 0)
    pen = ImageDraw.Draw(canvas)
    if shape == "square":
        pen.rectangle(list(box), fill=1)
    elif shape == "circle":
        pen.ellipse(list(box), fill=1)
    elif shape == "ring":
        pen.ellipse(list(box), fill=1)
        inner = rng.uniform(0.45, 0.6)
        pen.ellipse([cx - inner * hw, cy - inner * hh, cx + inner * hw, cy + inner * hh], fill=0)
    elif shape == "triangle":
        turns = rng.uniform(0, 2 * math.pi) + np.arange(3) * 2 * math.pi / 3
        corners = list(zip(cx + hw * np.cos(turns), cy + hh * np.sin(turns), strict=True))
        pen.polygon(corners, fill=1)
    elif shape == "diamond":
        pen.polygon([(cx, cy - hh), (cx + hw, cy), (cx, cy + hh), (cx - hw, cy)], fill=1)
    elif shape == "cross":
        arm = rng.uniform(0.3, 0.45)
        pen.rectangle([cx - hw, cy - arm * hh, cx + hw, cy + arm * hh], fill=1)
        pen.rectangle([cx - arm * hw, cy - hh, cx + arm * hw, cy + hh], fill=1)
    else:
        raise ValueError(f"unknown shape {shape!r}")
    return np.asarray(canvas, dtype=bool)


def _texture(rng: np.random.Generator, texture: str, size: int) -> np.ndarray:
    period = int(rng.integers(3, 6))
    y, x = np.mgrid[0:size, 0:size] + rng.integers(0, period, 2)[:, None, None]
    half = period / 2
    patterns = {
        "solid": np.ones((size, size), dtype=bool),
        "hstripes": (y % period) < half,
        "vstripes": (x % period) < half,
        "diagonal": ((x + y) % period) < half,
        "dots": ((x % period) < half) & ((y % period) < half),
        "checker": ((x // period + y // period) % 2) == 0,
    }
    return patterns[texture]


def _contrasting_colors(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Two colors far enough apart for a texture to show (a solid fill uses the first)."""
    while True:
        first, second = rng.uniform(0, 255, (2, 3))
        if np.abs(first - second).sum() > 90:
            return first, second
