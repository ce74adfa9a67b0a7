"""What the engine needs from classification (``megdet.engine.task.Task``): a ResNet, an
ImageFolder training set with seeded augmentation, and top-1/top-5 error."""

from __future__ import annotations

import functools
from pathlib import Path

import torch
from torch import nn

from megdet.config import Config
from megdet.errors import ConfigError, DataError
from megdet.nn import training_norm
from megdet.plan import MemoryEstimate
from megdet.tasks.classification import data
from megdet.tasks.classification.evaluation import evaluate_classifier, format_metrics
from megdet.tasks.classification.model import build_classifier

MB = 2**20


class ClassificationTask:
    """Goyal et al.'s setting on any ImageFolder data; folders are scanned lazily."""

    metrics_name = "classification error"

    def __init__(self, cfg: Config) -> None:
        if cfg.train.checkpointing != "none":
            raise ConfigError(
                f"train.checkpointing: {cfg.train.checkpointing} is for detection backbones; "
                "classification trains with none"
            )
        self.cfg = cfg

    @functools.cached_property
    def train_index(self) -> data.FolderIndex:
        return data.read_folder(self.cfg.data.train.images, "data.train.images")

    @functools.cached_property
    def val_index(self) -> data.FolderIndex:
        index = data.read_folder(self.cfg.data.val.images, "data.val.images")
        train = self.cfg.data.train.images
        if train and Path(train).is_dir() and index.classes != self.train_index.classes:
            raise DataError(
                f"{index.root}: its class folders differ from {self.train_index.root}'s "
                f"({len(index.classes)} vs {len(self.train_index.classes)}); the labels would "
                "not match"
            )
        return index

    @property
    def num_train_images(self) -> int:
        """The training folder's images; ``data.train.num_images`` where it is not here."""
        return self._train_count("num_images", lambda index: len(index.samples))

    @property
    def num_classes(self) -> int:
        return self._train_count("num_classes", lambda index: len(index.classes))

    def _train_count(self, key: str, count) -> int:
        """``data.train.<key>`` where the folder is not on this machine (``megdet plan``),
        else counted from the folder."""
        declared = getattr(self.cfg.data.train, key)
        if declared is not None and not Path(self.cfg.data.train.images).is_dir():
            return declared
        return count(self.train_index)

    def build_model(self, split: str = "train", norm=None, pretrained: bool = False) -> nn.Module:
        index = self.train_index if split == "train" else self.val_index
        return build_classifier(self.cfg, len(index.classes), norm, pretrained)

    @staticmethod
    def parameter_groups(model: nn.Module) -> dict[str, list[nn.Parameter]]:
        """The network below the classifier, and the classifier (``fc``)."""
        head = list(model.net.fc.parameters())
        heads = {id(p) for p in head}
        return {
            "backbone": [p for p in model.parameters() if id(p) not in heads],
            "head": head,
        }

    def train_dataset(self) -> data.FolderDataset:
        transform = data.train_transform(self.cfg.classification)
        return data.FolderDataset(self.train_index, transform, seed=self.cfg.train.seed)

    @staticmethod
    def train_group_ids() -> None:
        return None  # one crop size: any images batch together

    collate = staticmethod(data.collate)

    @staticmethod
    def to_device(batch, device: torch.device, dtype: torch.dtype = torch.float32):
        images, labels = batch
        return images.to(device, dtype, non_blocking=True), labels.to(device, non_blocking=True)

    @staticmethod
    def begin_step(model: nn.Module, targets) -> None:
        pass  # nothing is sampled per image inside the model

    @staticmethod
    def global_batch_losses(model: nn.Module, losses: dict[str, torch.Tensor]) -> dict:
        """The loss is a mean over each process's images, all processes hold as many, so
        DDP's average is the mean over the global batch (Goyal's 1/kn) as it stands."""
        return losses

    @staticmethod
    def step_statistics(model: nn.Module) -> dict[str, torch.Tensor]:
        return {"train_top1_err": model.last_error}

    @staticmethod
    def batch_statistics(per_image: dict[str, float], global_batch: int) -> dict[str, float]:
        return {}

    def check_evaluation(self) -> None:
        """The val folder has images in the training set's class folders."""
        _ = self.val_index  # read_folder and val_index raise what they find

    def evaluate(
        self, model: nn.Module, device: torch.device, out_dir: Path | None, progress: bool = False
    ) -> dict:
        dataset = data.FolderDataset(self.val_index, data.eval_transform(self.cfg.classification))
        return evaluate_classifier(
            model,
            dataset,
            device,
            self.cfg.eval.images_per_device,
            out_dir,
            num_workers=self.cfg.data.num_workers,
            progress=progress,
        )

    def labels(self) -> dict[str, list]:
        """Label k is the class folder ``names[k]``."""
        return {"names": list(self.train_index.classes)}

    format_metrics = staticmethod(format_metrics)

    def estimate_memory(self) -> MemoryEstimate:
        """Bytes autograd keeps for backward in a training forward of 1 and 2 images (counted
        once per storage, weights excluded): a part per image and a fixed part. Weights,
        gradients, momentum and DDP's buckets add 4 x the parameter bytes."""
        torch.manual_seed(0)
        model = self.build_model(norm=training_norm(self.cfg.model.norm)).train()
        size = self.cfg.classification.image_size
        per_count = {n: _saved_bytes(model, n, size, self.num_classes) for n in (1, 2)}
        per_image = (per_count[2] - per_count[1]) / MB
        fixed = max(0.0, per_count[1] / MB - per_image)
        params = sum(p.numel() * p.element_size() for p in model.parameters())
        return MemoryEstimate((size, size), 4 * params / MB, {"none": fixed}, {"none": per_image})


def _saved_bytes(model: nn.Module, images: int, size: int, num_classes: int) -> int:
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(tensor):
        key = tensor.untyped_storage().data_ptr()
        if key not in weights:
            saved[key] = tensor.untyped_storage().nbytes()
        return tensor

    inputs = torch.randn(images, 3, size, size)
    labels = torch.arange(images) % num_classes
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(inputs, labels)["loss_cls"]
    return sum(saved.values())
