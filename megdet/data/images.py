"""Reading an image file as 8-bit RGB, whatever it holds, for every task."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import PIL.Image
import torch
from torchvision.transforms.v2 import functional as F

from megdet.errors import DataError, one_line


def read_rgb(path: Path) -> torch.Tensor:
    """A ``uint8`` tensor (3, H, W); any decoder failure (DecompressionBombError included) is
    one ``DataError`` line naming the file."""
    try:
        with PIL.Image.open(path) as file:
            return F.pil_to_tensor(_to_rgb8(file))
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
