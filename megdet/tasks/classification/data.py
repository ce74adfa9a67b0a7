"""ImageFolder data (ImageNet's own layout: ``split/<class>/<image>``) with torchvision's
transforms v2, each image's random augmentation drawn from a generator seeded by
``(seed, epoch, index)``: the same crop and flip whichever process loads it, so a classifier's
training is invariant to the number of processes as the detector's is."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset
from torchvision.transforms import v2

from megdet.config import ClassificationConfig
from megdet.data.images import read_rgb
from megdet.data.sampler import image_seed
from megdet.errors import ConfigError, DataError

# ImageNet's channel statistics (torchvision's models are trained with them).
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class FolderIndex:
    """A split's images and labels: class ``k`` is the ``k``-th class folder by name."""

    root: Path
    classes: list[str]
    samples: list[tuple[str, int]]  # (file path, label)


def read_folder(root: str | Path, key: str) -> FolderIndex:
    """Scan an ImageFolder split (torchvision's rules: sorted class folders, its image
    extensions); one line naming ``key`` when it is missing or holds no image."""
    if not str(root):
        raise ConfigError(f"{key}: not set; point it to an ImageFolder split (<class>/<image>)")
    root = Path(root)
    if not root.is_dir():
        raise ConfigError(f"{key}: {root} is not a folder")
    try:
        classes, class_to_idx = find_classes(str(root))
        samples = make_dataset(str(root), class_to_idx, extensions=IMG_EXTENSIONS)
    except (FileNotFoundError, OSError) as exc:  # no class folders, or one without images
        raise DataError(f"{root}: {str(exc).strip()}") from None
    return FolderIndex(root, classes, samples)


def train_transform(cfg: ClassificationConfig) -> v2.Transform:
    size = cfg.image_size
    if cfg.augment == "random_resized_crop":
        crop = [v2.RandomResizedCrop(size, antialias=True), v2.RandomHorizontalFlip()]
    elif cfg.augment == "pad_crop":
        crop = [v2.Resize(size, antialias=True), v2.RandomCrop(size, padding=4),
                v2.RandomHorizontalFlip()]  # fmt: skip
    else:
        return eval_transform(cfg)
    return v2.Compose([*crop, *_to_float()])


def eval_transform(cfg: ClassificationConfig) -> v2.Transform:
    resize = cfg.resize or (
        round(cfg.image_size / 0.875) if cfg.augment == "random_resized_crop" else cfg.image_size
    )
    return v2.Compose(
        [v2.Resize(resize, antialias=True), v2.CenterCrop(cfg.image_size), *_to_float()]
    )


def _to_float() -> list[v2.Transform]:
    return [v2.ToDtype(torch.float32, scale=True), v2.Normalize(MEAN, STD)]


class FolderDataset(torch.utils.data.Dataset):
    """``(image, {"label", "epoch", "index"})`` items, addressed by ``(epoch, index)``."""

    def __init__(self, index: FolderIndex, transform: v2.Transform, seed: int = 0) -> None:
        self.index, self.transform, self.seed = index, transform, seed

    def __len__(self) -> int:
        return len(self.index.samples)

    def __getitem__(self, key: int | tuple[int, int]):
        epoch, i = key if isinstance(key, tuple) else (0, key)
        path, label = self.index.samples[i]
        image = read_rgb(Path(path))
        # transforms v2 draw from torch's global generator: give it this image's seed, and
        # restore it afterwards (a loader worker's or the main process's other draws).
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(image_seed(self.seed, epoch, i))
            image = self.transform(image)
        return image, {"label": label, "epoch": epoch, "index": i}


def collate(batch):
    """Images of one size after the crop: one tensor; labels another."""
    images, targets = zip(*batch, strict=True)
    labels = torch.tensor([t["label"] for t in targets], dtype=torch.int64)
    return torch.stack(images), labels
