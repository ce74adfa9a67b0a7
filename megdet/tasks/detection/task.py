"""What the engine needs from detection: a model, training data, and an evaluator."""

from __future__ import annotations

import functools
import logging
from pathlib import Path

import torch
from torch import nn

from megdet import dist
from megdet.config import Config
from megdet.data.check import CheckReport, check_image_files
from megdet.data.coco import CocoDetection, CocoIndex, collate, read_coco
from megdet.errors import ConfigError, DataError
from megdet.tasks.detection.backbone import apply_checkpointing
from megdet.tasks.detection.evaluation import evaluate_distributed, format_metrics
from megdet.tasks.detection.model import build_detector
from megdet.tasks.detection.sampling import GlobalSampleCounts, SeededPositiveNegativeSampler

log = logging.getLogger(__name__)


class DetectionTask:
    """Faster R-CNN + FPN on COCO-format data, as the engine's ``Task``. Annotation files are
    read lazily: evaluating needs only the val split."""

    metrics_name = "COCO bbox metrics"

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg

    @functools.cached_property
    def train_index(self) -> CocoIndex:
        return read_coco(
            _required(self.cfg.data.train.json, "data.train.json"), self.cfg.data.strict
        )

    @functools.cached_property
    def val_index(self) -> CocoIndex:
        return read_coco(_required(self.cfg.data.val.json, "data.val.json"))

    @property
    def num_train_images(self) -> int:
        """What the plan divides into epochs: the training JSON's images, as training reads
        them; ``data.train.num_images`` only where the JSON is not on this machine."""
        return self._train_count("num_images", lambda index: len(index.images))

    @property
    def num_classes(self) -> int:
        return self._train_count("num_classes", lambda index: index.num_classes)

    def _train_count(self, key: str, count) -> int:
        declared = getattr(self.cfg.data.train, key)
        if declared is not None and not Path(self.cfg.data.train.json).is_file():
            return declared
        actual = count(self.train_index)
        if declared is not None and declared != actual:
            log.warning(
                "data.train.%s=%d ignored: %s has %d", key, declared, self.train_index.path, actual
            )
        return actual

    def estimate_memory(self):
        """Memory per process for this detector at its image size (``memory.py``)."""
        from megdet.tasks.detection.memory import estimate_memory

        return estimate_memory(self.cfg, self.num_classes)

    def train_group_ids(self) -> list[int] | None:
        """Aspect-ratio groups of the training images (0 landscape or square, 1 portrait)."""
        if not self.cfg.data.aspect_ratio_grouping:
            return None
        return [int(im["height"] > im["width"]) for im in self.train_index.images]

    def build_model(self, split: str = "train", norm=None, pretrained: bool = False) -> nn.Module:
        """The detector, with as many classes as ``split``'s annotation file has categories;
        ``norm`` overrides the normalization constructor (CGBN with its process group);
        ``pretrained`` loads ``model.backbone_weights`` (a fresh run, not a resumed one)."""
        index = self.train_index if split == "train" else self.val_index
        model = build_detector(self.cfg.model, index.num_classes, norm, pretrained)
        apply_checkpointing(model.backbone, self.cfg.train.checkpointing)
        seed, cfg = self.cfg.train.seed, self.cfg.model
        model.rpn.fg_bg_sampler = SeededPositiveNegativeSampler(
            cfg.rpn_batch_per_image, 0.5, seed, stream=0
        )
        model.roi_heads.fg_bg_sampler = SeededPositiveNegativeSampler(
            cfg.roi_batch_per_image, cfg.roi_positive_fraction, seed, stream=1
        )
        model.sample_counts = GlobalSampleCounts(
            model.rpn.fg_bg_sampler, model.roi_heads.fg_bg_sampler
        )
        model.roi_heads.box_roi_pool.register_forward_pre_hook(model.sample_counts.start)
        return model

    @staticmethod
    def begin_step(model: nn.Module, targets: list[dict]) -> None:
        """Tell the seeded samplers which images this batch holds."""
        keys = [(t["epoch"], t["index"]) for t in targets]
        model.rpn.fg_bg_sampler.image_keys = keys
        model.roi_heads.fg_bg_sampler.image_keys = keys

    @staticmethod
    def parameter_groups(model: nn.Module) -> dict[str, list[nn.Parameter]]:
        """The module groups whose gradient statistics differ (AGVM's split of a detector)."""
        parts = {
            "backbone": model.backbone.body,
            "fpn": model.backbone.fpn,
            "rpn": model.rpn,
            "box_head": model.roi_heads,
        }
        return {name: list(part.parameters()) for name, part in parts.items()}

    @staticmethod
    def step_statistics(model: nn.Module) -> dict[str, torch.Tensor]:
        """MegDet Table 1: sampled positives and negatives per image, in the RPN and RoI heads."""
        stats = {}
        for name, sampler in (
            ("rpn", model.rpn.fg_bg_sampler),
            ("roi", model.roi_heads.fg_bg_sampler),
        ):
            pos, neg, images = sampler.last_counts
            stats[f"{name}_pos"] = torch.tensor(pos / max(1, images))
            stats[f"{name}_neg"] = torch.tensor(neg / max(1, images))
        return stats

    @staticmethod
    def batch_statistics(per_image: dict[str, float], global_batch: int) -> dict[str, float]:
        """Table 1 per global batch and as ratios, from the per-image means of all processes
        (every process holds the same number of images, so their mean is the batch's)."""
        stats = {}
        for name in ("rpn", "roi"):
            pos, neg = per_image[f"{name}_pos"], per_image[f"{name}_neg"]
            stats[f"{name}_pos_per_batch"] = pos * global_batch
            stats[f"{name}_neg_per_batch"] = neg * global_batch
            if neg > 0:  # no negatives sampled: no ratio, rather than a NaN in the logs
                stats[f"{name}_pos_neg_ratio"] = pos / neg
        return stats

    def train_dataset(self) -> CocoDetection:
        """The training set, after checking that every image file is there (decoding them all
        would take minutes on COCO; ``megdet data check`` does)."""
        cfg = self.cfg
        _check_files_exist(self.train_index, cfg.data.train.images, "data.train.images")
        return CocoDetection(
            self.train_index, cfg.data.train.images, seed=cfg.train.seed, hflip=cfg.data.hflip
        )

    collate = staticmethod(collate)

    @staticmethod
    def to_device(batch, device: torch.device, dtype: torch.dtype = torch.float32):
        """Images and boxes in the model's ``dtype`` (train.dtype), on ``device``."""
        images, targets = batch
        images = [image.to(device, dtype, non_blocking=True) for image in images]
        targets = [
            {k: _to(v, device, dtype) if torch.is_tensor(v) else v for k, v in t.items()}
            for t in targets
        ]
        return images, targets

    @staticmethod
    def global_batch_losses(model: nn.Module, losses: dict[str, torch.Tensor]) -> dict:
        """Make the step the mean over the global batch's sampled anchors and RoIs.

        torchvision divides each process's RPN and box-head losses by that process's own
        sample count; when processes sample different numbers (few proposals, few negatives),
        DDP's average of those means is not the mean over the whole batch that Goyal et al.'s
        rule asks for (1/kn times the sum). Weighting each process's terms by its share of the
        global count, times the number of processes that DDP divides by, makes it so, at the
        cost of one all-reduce of two numbers per step, which runs while the box head does.
        """
        if dist.get_world_size() == 1:
            return losses
        rpn, roi = model.sample_counts.shares()
        share = {"loss_objectness": rpn, "loss_rpn_box_reg": rpn}
        share |= {"loss_classifier": roi, "loss_box_reg": roi}
        # In each loss's dtype, as a Python float would be: the same numbers as before.
        return {name: value * share[name].to(value.dtype) for name, value in losses.items()}

    def check_evaluation(self) -> None:
        """The val annotations parse and name the training set's categories, and every val
        image file is there."""
        try:
            index = self.val_index
        except DataError as exc:  # a missing file's line already names data.val.json
            text = str(exc)
            raise DataError(
                text if text.startswith("data.val.json:") else f"{text}; check data.val.json"
            ) from None
        if not index.images:
            raise DataError(f"{index.path}: the val set has no images; check data.val.json")
        _check_files_exist(index, self.cfg.data.val.images, "data.val.images")
        if Path(self.cfg.data.train.json).is_file() and (
            index.category_ids != self.train_index.category_ids
        ):
            raise DataError(
                f"{index.path}: its categories (ids {index.category_ids[:5]}) differ from the "
                f"training set's ({self.train_index.category_ids[:5]}); the labels would not "
                "match; check data.val.json"
            )

    def evaluate(
        self, model: nn.Module, device: torch.device, out_dir: Path | None, progress: bool = False
    ) -> dict:
        dataset = CocoDetection(self.val_index, self.cfg.data.val.images)
        return evaluate_distributed(
            model,
            dataset,
            device,
            self.cfg.eval.images_per_device,
            out_dir,
            self.cfg.eval.backend,
            num_workers=self.cfg.data.num_workers,
            progress=progress,
        )

    def labels(self) -> dict[str, list]:
        """Label k is category ``category_ids[k - 1]``, named ``names[k - 1]``."""
        index = self.train_index
        return {"names": list(index.category_names), "category_ids": list(index.category_ids)}

    format_metrics = staticmethod(format_metrics)


def _to(tensor: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    if tensor.is_floating_point():
        return tensor.to(device, dtype, non_blocking=True)
    return tensor.to(device, non_blocking=True)


def _check_files_exist(index: CocoIndex, image_dir: str, key: str) -> None:
    report = CheckReport(index.path)
    check_image_files({"images": index.images}, image_dir, report, False)
    if report.errors:
        more = f" (and {len(report.errors) - 1} more)" if len(report.errors) > 1 else ""
        raise DataError(f"{report.errors[0]}{more}; check {key}")


def _required(path: str, key: str) -> str:
    """The annotation file ``key`` names; one line saying what to do where it is not there
    (most often a preset's relative path, run from another folder or before its data)."""
    if not path:
        raise ConfigError(f"{key}: not set; point it to a COCO instances JSON file")
    if not Path(path).is_file():
        split = key.split(".")[1]
        where = f" (relative to {Path.cwd()})" if not Path(path).is_absolute() else ""
        demo = (  # the demo presets' own set, which `make demo` generates
            ", or, for the presets' demo data, run `make demo` in the repository first (it "
            "writes data/shapes) and run from there"
            if "data/shapes/" in Path(path).as_posix()
            else ""
        )
        raise DataError(
            f"{key}: {path} not found{where}; pass {key}=FILE and data.{split}.images=DIR{demo}"
        )
    return path
