"""Reading image files as 8-bit RGB, whatever they hold, for every task; and finding the image
files a command is given (``megdet predict``'s inputs)."""

from __future__ import annotations

import glob
from pathlib import Path

import numpy as np
import PIL.Image
import PIL.ImageOps
import torch
from torchvision.transforms.v2 import functional as F

from megdet.errors import DataError, one_line

# What is taken from a folder; a file named on its own is tried whatever its suffix.
IMAGE_SUFFIXES = frozenset(
    {".bmp", ".dng", ".gif", ".jpeg", ".jpg", ".mpo", ".png", ".tif", ".tiff", ".webp", ".pfm"}
)


def read_rgb(path: Path, upright: bool = False) -> torch.Tensor:
    """A ``uint8`` tensor (3, H, W); any decoder failure (DecompressionBombError included) is
    one ``DataError`` line naming the file.

    ``upright`` applies the EXIF orientation, as photo viewers do (prediction on people's
    photos); training reads the pixels as stored, which is what COCO's boxes refer to."""
    try:
        with PIL.Image.open(path) as file:
            image = PIL.ImageOps.exif_transpose(file) if upright else file
            return F.pil_to_tensor(_to_rgb8(image))
    except Exception as exc:
        raise DataError(f"{path}: cannot read image ({one_line(exc)})") from None


def _to_rgb8(image: PIL.Image.Image) -> PIL.Image.Image:
    """Grayscale, RGBA, palette and 16/32-bit images as 8-bit RGB; 16-bit values are scaled,
    not clipped (PIL's own conversion clips everything above 255 to white)."""
    if image.mode.startswith("I"):
        array = np.asarray(image, dtype=np.float64)
        top = 65535.0 if "16" in image.mode else max(float(array.max()), 1.0)
        image = PIL.Image.fromarray(np.clip(array / top * 255.0, 0, 255).round().astype(np.uint8))
    return image.convert("RGB")


def find_images(inputs: list[str], exclude: Path | None = None) -> tuple[list[Path], list[str]]:
    """The files ``inputs`` name: files as they are (an image or not, which reading tells),
    folders searched recursively for image suffixes, glob patterns (``**`` too) expanded into
    both; each file once however it is named (relative, absolute, through a link), sorted.
    Files under ``exclude`` (the command's own output folder: drawings of a previous run) are
    left out of folders and globs. Also one line per input that names nothing."""
    found: dict[Path, Path] = {}  # resolved -> as named
    unmatched = []
    skip = Path(exclude).resolve() if exclude is not None else None
    for item in inputs:
        if Path(item).exists():  # literally, even with glob characters in its name ("[1].jpg")
            named = [Path(item)]
        else:
            named = [Path(p) for p in sorted(glob.glob(item, recursive=True))]
        files = [q for p in named for q in (images_in(p) if p.is_dir() else [p])]
        searched = Path(item).is_dir() or named != [Path(item)]  # a folder or a glob
        outputs = []
        if skip is not None and searched:
            outputs = [f for f in files if f.resolve().is_relative_to(skip)]
            files = [f for f in files if f not in outputs]
        if not named:
            unmatched.append(f"{item}: no such file or folder")
        elif not files:
            unmatched.append(
                f"{item}: no image files in it (suffixes: {', '.join(sorted(IMAGE_SUFFIXES))}"
                f"{'; the ones in --out are left out' if outputs else ''})"
            )
        for file in files:
            found.setdefault(file.resolve(), file)
    return sorted(found.values()), unmatched


def images_in(folder: Path) -> list[Path]:
    """The image files under ``folder``, recursively, by suffix, sorted."""
    return sorted(
        p for p in Path(folder).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
    )
