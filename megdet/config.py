"""Typed configuration: dataclasses, YAML presets and ``a.b=c`` overrides.

A config is a tree of dataclasses. Presets in ``megdet/configs/*.yaml`` hold only the values
that differ from the defaults below; command-line overrides are applied on top. Every value is
checked against its annotated type, and every mistake is reported as one line that names the
key, so a typo never silently trains the wrong model.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from megdet.errors import ConfigError

BACKBONES = ("tiny", "resnet18", "resnet50", "resnet20", "resnet56")
DETECTION_BACKBONES = ("tiny", "resnet18", "resnet50")
CLASSIFICATION_BACKBONES = ("tiny", "resnet18", "resnet50", "resnet20", "resnet56")
AUGMENTS = ("random_resized_crop", "pad_crop", "none")
NORMS = ("frozen", "bn", "gn", "cgbn")
NORM_SCOPES = ("backbone", "backbone+fpn", "all")
POLICIES = ("step", "normal", "long")
CHECKPOINTING = ("none", "stages", "blocks", "fpn", "stages+fpn", "blocks+fpn")
WARMUPS = ("linear", "constant", "none")
EVAL_BACKENDS = ("faster", "pycocotools")
DTYPES = ("float32", "float64")
AMPS = ("none", "bf16", "fp16")
MODULE_LRS = ("none", "agvm")
LR_SCALINGS = ("linear", "adascale", "auto")
ADASCALE_PACES = ("model", "module")
TASKS = ("detection", "classification")


@dataclass(frozen=True)
class Interval:
    """The values a config number may take, as written in its field: ``"[0, 1)"``,
    ``"(0, inf)"``. One place owns every range, so ``train``, ``plan`` and ``eval`` refuse the
    same values, and the config reference can print them."""

    low: float
    high: float
    low_closed: bool
    high_closed: bool

    @classmethod
    def parse(cls, text: str) -> Interval:
        low, high = (float(part) for part in text[1:-1].split(","))
        return cls(low, high, text[0] == "[", text[-1] == "]")

    def __contains__(self, value: float) -> bool:
        above = value >= self.low if self.low_closed else value > self.low
        below = value <= self.high if self.high_closed else value < self.high
        return above and below

    def __str__(self) -> str:
        low, high = _number_text(self.low), _number_text(self.high)
        if math.isinf(self.high):
            return f"{'>=' if self.low_closed else '>'} {low}"
        return (
            f"in {'[' if self.low_closed else '('}{low}, {high}{']' if self.high_closed else ')'}"
        )


def _number_text(value: float) -> str:
    """1, 0.25, 4294967295: integers in full, other numbers as %g."""
    return str(int(value)) if float(value).is_integer() and abs(value) < 1e16 else f"{value:g}"


def bounded(default: Any, interval: str):
    """A config field whose numbers (a list's every item) must lie in ``interval``; a callable
    ``default`` is a default factory (for lists)."""
    metadata = {"interval": Interval.parse(interval)}
    if callable(default):
        return field(default_factory=default, metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class SplitConfig:
    """One COCO split: the annotation file and the folder its ``file_name``s are relative to."""

    json: str = ""  # the COCO instances file (detection)
    # The folder the JSON's file_names are relative to; classification: the ImageFolder split
    # (a folder of images per class).
    images: str = ""
    # What `megdet plan` uses where the data is not on this machine (train only); when the
    # JSON is there, its own counts are used, as in training.
    num_images: int | None = bounded(None, "[1, inf)")
    num_classes: int | None = bounded(None, "[1, inf)")  # the same, for the category count


@dataclass
class DataConfig:
    """Where the images and labels are, and how they are loaded."""

    train: SplitConfig = field(default_factory=SplitConfig)
    val: SplitConfig = field(default_factory=SplitConfig)
    num_workers: int = bounded(1, "[0, inf)")  # loader processes per training process
    hflip: bool = True  # random horizontal flip, drawn per image from (seed, epoch, index)
    strict: bool = False  # boxes without area inside their image: an error instead of dropped
    # Global batches of only landscape or only portrait images (less padding), decided on the
    # whole global batch, so that every process count sees the same batches.
    aspect_ratio_grouping: bool = True


@dataclass
class ModelConfig:
    """The network: backbone, normalization, and the detector's heads."""

    # Detection: tiny (a CPU ResNet, widths 16/32/64/128), resnet18, resnet50; classification
    # also resnet20 and resnet56 (CIFAR ResNets, He et al. 4.2).
    backbone: str = "resnet50"
    # frozen (FrozenBatchNorm2d), bn (per-process BatchNorm), gn (GroupNorm), cgbn (MegDet's
    # cross-GPU BatchNorm: statistics over model.bn_size images of all processes).
    norm: str = "frozen"
    bn_size: int | None = bounded(
        None, "[1, inf)"
    )  # cgbn: images per statistics group; null: all processes
    # Where model.norm applies: the backbone; also the FPN; or also a conv box head ("all").
    norm_scope: str = "backbone"
    box_head_convs: int = bounded(
        4, "[1, inf)"
    )  # conv layers of the box head when norm_scope is "all"
    # imagenet (torchvision's ImageNet weights for model.backbone, through the torch hub
    # cache), a megdet run folder or checkpoint of either task with this backbone (its body's
    # weights and BN statistics), a local state_dict file, or none (random initialization on
    # purpose). Unset: random, refused under frozen norm or frozen stages when training
    # (validate_initialization).
    backbone_weights: str = ""
    # The sha256 of the backbone_weights file. Empty: megdet train records it (and the file's
    # resolved path) in the run's config.yaml; given: a file with another one is refused.
    backbone_weights_sha256: str = ""
    # Scale each pretrained convolution behind a normalization back to the size of this run's
    # own initialization (its BN statistics with it: the network computes the same), so that
    # fine-tuning moves it at the learning rate a fresh one gets. A megdet-pretrained tiny
    # backbone fine-tuned at batch 16: 39.33 mmAP as loaded, 46.58 rescaled, 44.43 from random
    # weights (docs/studies.md).
    backbone_weights_rescale: bool = False
    # 1: stem, 2: stem and res2, ... Frozen stages keep their weights and normalize with
    # fixed statistics (FrozenBatchNorm2d), whatever model.norm is (detectron2's FREEZE_AT).
    frozen_stages: int = bounded(0, "[0, 5]")
    min_size: int = bounded(800, "[1, inf)")  # resize: the short image side to this
    max_size: int = bounded(1333, "[1, inf)")  # ... unless the long side would pass this
    fpn_channels: int = bounded(256, "[1, inf)")  # FPN width
    # Anchor side per FPN level P2..P6; null: min_size/16 doubling per level (see model.py).
    anchor_sizes: list[int] | None = bounded(None, "[1, inf)")
    rpn_pre_nms_top_n_train: int = bounded(2000, "[1, inf)")  # RPN proposals a level, pre-NMS
    rpn_post_nms_top_n_train: int = bounded(2000, "[1, inf)")  # RPN proposals an image, post-NMS
    rpn_pre_nms_top_n_test: int = bounded(1000, "[1, inf)")  # the same at evaluation
    rpn_post_nms_top_n_test: int = bounded(1000, "[1, inf)")  # the same at evaluation
    rpn_batch_per_image: int = bounded(256, "[1, inf)")  # anchors sampled an image (RPN loss)
    roi_batch_per_image: int = bounded(512, "[1, inf)")  # RoIs sampled an image (box head loss)
    roi_positive_fraction: float = bounded(0.25, "(0, 1]")  # largest share of positives in them
    roi_sampling_ratio: int = bounded(2, "[0, inf)")  # RoIAlign samples per bin side (0: adaptive)
    box_head_dim: int = bounded(1024, "[1, inf)")  # the box head's fc width
    box_score_thresh: float = bounded(0.05, "[0, 1]")  # evaluation: detections below it dropped
    box_detections_per_img: int = bounded(100, "[1, inf)")  # evaluation: at most this many kept
    # Convolutions on NHWC tensors. On this project's AVX2 CPUs it speeds up narrow networks
    # (the demo: 1.08x a step) but slows ResNet-50's convolution backward (0.87x); measure
    # (bench/step_variants.py) before turning it on. On GPUs, NHWC is what tensor cores want.
    channels_last: bool = False


@dataclass
class TrainConfig:
    """The run: its batch, length, seed, checkpoints, precision and what it measures."""

    batch_size: int = bounded(16, "[1, inf)")  # GLOBAL images per iteration, over all processes
    # Images per process: null (batch_size / processes), a number (batch_size becomes it x
    # processes) or "auto": the most that fit memory_budget_gb, measured (see megdet plan).
    images_per_device: int | str | None = bounded(None, "[1, inf)")
    memory_budget_gb: float = bounded(16.0, "(0, inf)")  # per process, for images_per_device: auto
    epochs: float | None = bounded(None, "(0, inf)")  # null: the end of solver.policy
    seed: int = bounded(0, "[0, 4294967295]")  # numpy's and torch's generators take 32 bits
    checkpoint_period: int = bounded(0, "[0, inf)")  # iterations; 0: only at the end
    # Activation checkpointing (sub-linear memory): none, stages, blocks, fpn, stages+fpn, ...
    checkpointing: str = "none"
    max_loss: float | None = bounded(
        None, "(0, inf)"
    )  # stop (divergence) when the mean loss passes it
    eval_period: int = bounded(
        1, "[0, inf)"
    )  # epochs between evaluations (per-epoch mmAP curves); 0: at the end
    max_iter: int | None = bounded(
        None, "[1, inf)"
    )  # cut the run short (smoke tests); the schedule is unchanged
    # float64: a numerical reference (world-size invariance tests, chasing a divergence),
    # several times slower; float32 otherwise.
    dtype: str = "float32"
    # Mixed precision: none; bf16 (autocast); fp16 (autocast + loss scaling). Convolutions and
    # matrix products in half precision; BN statistics, box coordinates and losses in float32.
    amp: str = "none"
    # The gradient noise scale (gns, grad_sq, grad_var, per module group) in metrics.jsonl, from
    # each process's gradient and the all-reduced one; needs 2+ processes (engine/noise_scale.py).
    gns: bool = True


@dataclass
class AgvmConfig:
    """AGVM's per-module learning rates (solver.module_lr: agvm); defaults: its paper's."""

    interval: int = bounded(
        10, "[1, inf)"
    )  # iterations between measurements (one extra collective each)
    momentum: float = bounded(0.97, "[0, 1)")  # EMA of the multipliers, per measurement
    start_epochs: float | None = bounded(
        None, "[0, inf)"
    )  # first epoch that measures; null: when warmup ends


@dataclass
class AdaScaleConfig:
    """AdaScale's options (solver.lr_scaling: adascale)."""

    # Each module group's lr by its own gain, from its own noise scale (fairscale's AdaScale:
    # a gain per parameter group); false: one gain, the whole model's, for all.
    # The demo's heads measure a noise scale of 1-30 images where the backbone's is 200-460:
    # one gain, set by the backbone, over-steps the heads (issue 25).
    per_module: bool = True
    # What advances the progress tau: module, the smallest module gain, so that every module
    # gets at least the base batch's schedule; model, the whole model's gain (fairscale's).
    # On the demo, model ends 6.1 and 4.3 mmAP below batch 16 at batch 32 and 64 (its heads
    # fall behind the schedule); module ends above it (issue 25, experiments/demo_preset.py).
    pace: str = "module"


@dataclass
class SolverConfig:
    """SGD, its learning rate schedule, and how the lr follows the batch size."""

    base_lr: float = bounded(0.02, "(0, inf)")  # lr at base_batch images (linear scaling rule)
    base_batch: int = bounded(16, "[1, inf)")  # the batch base_lr is for
    momentum: float = bounded(0.9, "[0, 1)")  # SGD momentum
    weight_decay: float = bounded(1e-4, "[0, inf)")  # L2 weight decay
    weight_decay_norm: float = bounded(0.0, "[0, inf)")  # on BatchNorm/GroupNorm scales and shifts
    nesterov: bool = False  # Nesterov momentum
    # From a low lr to the scaled one: linear (Goyal's gradual warmup), constant (the low lr,
    # then a jump), none.
    warmup: str = "linear"
    # Warmup length in iterations; the presets give warmup_epochs instead, so that a change
    # of the batch size alone changes a run.
    warmup_iters: int = bounded(500, "[0, inf)")
    warmup_epochs: float | None = bounded(
        None, "[0, inf)"
    )  # if set, replaces warmup_iters (Goyal: 5 epochs)
    # Learning rate at iteration 0 as a fraction of the scaled lr; null: base_lr / lr, i.e.
    # start at the small-batch rate (MegDet section 3.2).
    warmup_factor: float | None = bounded(None, "(0, 1]")
    # step (solver.steps, solver.gamma, train.epochs), normal (x0.1 at epochs 8, 10; ends at
    # 11), long (x0.1 at 11, 14, x0.5 at 17; ends at 18).
    policy: str = "step"
    steps: list[float] = bounded(lambda: [8.0, 10.0], "(0, inf)")  # epochs, policy "step"
    gamma: float = bounded(0.1, "(0, 1]")  # a decay: each step multiplies the lr by it
    # Policy "step" only: one factor per entry of steps (e.g. [0.1, 0.1, 0.5]); null: gamma.
    factors: list[float] | None = bounded(None, "(0, 1]")
    # Scale the gradients down to this global L2 norm when larger (detectron2's
    # CLIP_GRADIENTS "norm", mmdetection's grad_clip); null: never.
    clip_grad_norm: float | None = bounded(None, "(0, inf)")
    # none: one lr for the whole model; agvm: each module group (backbone, FPN, RPN, box
    # head) scaled by how its two half-batch gradients agree, against the backbone's (AGVM).
    module_lr: str = "none"
    # How the lr follows the batch. linear: lr = base_lr x batch / base_batch, the schedule in
    # iterations of this batch (Goyal et al.). adascale: each step's lr is its gain r (1 to
    # batch / base_batch, from the measured gradient noise) x the base batch's lr at progress
    # tau, and tau advances by r a step through the base batch's schedule (AdaScale, Johnson
    # et al. 2020); needs 2+ processes (engine/noise_scale.py measures the noise). auto:
    # adascale where it can measure and scale up (2+ processes, batch above base_batch), the
    # linear rule otherwise (at or below the base batch the two are the same run).
    lr_scaling: str = "linear"
    agvm: AgvmConfig = field(default_factory=AgvmConfig)
    adascale: AdaScaleConfig = field(default_factory=AdaScaleConfig)


@dataclass
class LogConfig:
    """What a run writes as it trains (metrics.jsonl always)."""

    period: int = bounded(20, "[1, inf)")  # iterations between metric lines
    tensorboard: bool = True  # also TensorBoard event files in the run folder


@dataclass
class EvalConfig:
    """Evaluation on the val split (after each train.eval_period epochs, and megdet eval)."""

    images_per_device: int = bounded(8, "[1, inf)")  # inference batch per process
    # faster: faster-coco-eval (C++, identical metrics on our fixtures, ~9x faster on 5,000
    # images; see BENCHMARKS.md); pycocotools: the reference implementation.
    backend: str = "faster"


@dataclass
class ClassificationConfig:
    """``task: classification`` (Goyal et al.): ImageFolder data, a ResNet, top-1/5 error."""

    image_size: int = bounded(
        224, "[1, inf)"
    )  # side of the training crop and of the evaluation crop
    # Evaluation: short side before the center crop; null: image_size / 0.875 (224 -> 256)
    # with random_resized_crop, image_size otherwise.
    resize: int | None = bounded(None, "[1, inf)")
    # Training augmentation: random_resized_crop + flip (ImageNet), pad_crop (4 px padding,
    # random crop + flip: CIFAR), none (resize + center crop, as evaluation).
    augment: str = "random_resized_crop"
    zero_init_residual: bool = True  # each residual block's last BN gamma starts at 0 (5.1)
    label_smoothing: float = bounded(0.0, "[0, 1)")  # cross-entropy label smoothing


@dataclass
class Config:
    """A run's whole configuration."""

    task: str = "detection"  # what is trained: the model, data and evaluation it brings
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    solver: SolverConfig = field(default_factory=SolverConfig)
    log: LogConfig = field(default_factory=LogConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    classification: ClassificationConfig = field(default_factory=ClassificationConfig)


# The string keys that take one of a few values: validate() refuses any other, and the
# config reference lists them.
CHOICES = {
    "task": TASKS,
    "model.backbone": BACKBONES,
    "model.norm": NORMS,
    "model.norm_scope": NORM_SCOPES,
    "train.checkpointing": CHECKPOINTING,
    "train.dtype": DTYPES,
    "train.amp": AMPS,
    "solver.warmup": WARMUPS,
    "solver.policy": POLICIES,
    "solver.module_lr": MODULE_LRS,
    "solver.lr_scaling": LR_SCALINGS,
    "solver.adascale.pace": ADASCALE_PACES,
    "eval.backend": EVAL_BACKENDS,
    "classification.augment": AUGMENTS,
}


def preset_names() -> list[str]:
    files = resources.files("megdet.configs").iterdir()
    return sorted(f.name[:-5] for f in files if f.name.endswith(".yaml"))


def load_config(name_or_path: str, overrides: list[str] = ()) -> Config:
    """Read a preset (by name) or a YAML file, apply ``a.b=c`` overrides, type-check, validate."""
    return config_from_dict(_read_yaml(name_or_path), overrides)


def config_from_dict(raw: dict, overrides: list[str] = ()) -> Config:
    """Build a config from a nested dict (a run's config.yaml, a checkpoint) and overrides."""
    raw = copy.deepcopy(raw)
    for item in overrides:
        _apply_override(raw, item)
    cfg = _build(Config, raw, "")
    validate(cfg)
    return cfg


def config_to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False)


def validate(cfg: Config) -> None:
    """Checks that need more than a type: choices and ranges."""
    for key, value in _numbers(config_to_dict(cfg)):
        if not math.isfinite(value):
            raise ConfigError(f"{key}: must be a finite number, got {value}")
    steps = cfg.solver.steps
    if sorted(set(steps)) != steps or any(step <= 0 for step in steps):
        raise ConfigError(f"solver.steps: must be positive and increasing, got {steps}")
    for key, allowed in CHOICES.items():
        value = cfg
        for name in key.split("."):
            value = getattr(value, name)
        if value not in allowed:
            raise ConfigError(f"{key}: '{value}' is not one of {', '.join(allowed)}")
    for key, value, interval in _bounded_values(cfg):
        if value not in interval:
            raise ConfigError(f"{key}: must be {interval}, got {_number_text(value)}")
    per_device = cfg.train.images_per_device
    if isinstance(per_device, str) and per_device != "auto":
        raise ConfigError(
            f"train.images_per_device: expected a positive number or auto, got {per_device!r}"
        )
    if cfg.train.amp != "none" and cfg.train.dtype != "float32":
        raise ConfigError(
            f"train.amp: {cfg.train.amp} mixes half precision into a float32 model; with "
            f"train.dtype={cfg.train.dtype} set train.amp=none"
        )
    factors = cfg.solver.factors
    if factors is not None and len(factors) != len(cfg.solver.steps):
        raise ConfigError(
            f"solver.factors: {len(factors)} factor(s) for {len(cfg.solver.steps)} "
            "solver.steps; give one per step, or leave it null to use solver.gamma"
        )
    if cfg.model.backbone_weights == "imagenet" and cfg.model.backbone == "tiny":
        raise ConfigError(
            "model.backbone_weights: there are no ImageNet weights for the tiny backbone; "
            "use resnet18/resnet50, or none"
        )
    if cfg.model.anchor_sizes is not None and len(cfg.model.anchor_sizes) != 5:
        raise ConfigError("model.anchor_sizes: needs 5 sizes, one per FPN level P2..P6")
    backbones = DETECTION_BACKBONES if cfg.task == "detection" else CLASSIFICATION_BACKBONES
    if cfg.model.backbone not in backbones:
        raise ConfigError(
            f"model.backbone: '{cfg.model.backbone}' is not a {cfg.task} backbone; use one of "
            f"{', '.join(backbones)}"
        )
    if cfg.solver.policy == "step" and cfg.train.epochs is None:
        raise ConfigError("train.epochs: required with solver.policy=step")


def _bounded_values(node: Any, prefix: str = ""):
    """Every number of the config tree that its field bounds, as (dotted key, value,
    interval); a list's items one by one."""
    for item in dataclasses.fields(node):
        value, key = getattr(node, item.name), f"{prefix}{item.name}"
        if dataclasses.is_dataclass(value):
            yield from _bounded_values(value, f"{key}.")
        elif "interval" in item.metadata:
            for number in value if isinstance(value, list) else [value]:
                if isinstance(number, (int, float)) and not isinstance(number, bool):
                    yield key, number, item.metadata["interval"]


def _numbers(tree: dict, prefix: str = ""):
    """Every float of a config (inside lists too) as (dotted key, value)."""
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            yield from _numbers(value, f"{name}.")
        for item in value if isinstance(value, list) else [value]:
            if isinstance(item, float):
                yield name, item


def with_absolute_data_paths(cfg: Config) -> Config:
    """The config a run records: its data paths made absolute, so that ``megdet eval --run``
    finds the data from any working directory."""
    splits = {}
    for name in ("train", "val"):
        split = getattr(cfg.data, name)
        absolute = {
            k: str(Path(v).absolute()) for k in ("json", "images") if (v := getattr(split, k))
        }
        splits[name] = dataclasses.replace(split, **absolute)
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, **splits))


def validate_initialization(cfg: Config) -> None:
    """Before training (and planning it): frozen statistics or frozen stages over random
    weights normalize and keep nothing learned, almost always a forgotten
    ``model.backbone_weights``, so it has to be said. Evaluating a run's checkpoint needs no
    such check: its weights come from the checkpoint."""
    model = cfg.model
    if model.backbone_weights:
        return
    frozen = []
    if model.norm == "frozen":
        frozen.append("model.norm=frozen")
    if model.frozen_stages:
        frozen.append(f"model.frozen_stages={model.frozen_stages}")
    if frozen:
        raise ConfigError(
            f"model.backbone_weights: not set, but {' and '.join(frozen)} would freeze randomly "
            "initialized layers; set it to imagenet or a local file, or to none to train from "
            "scratch on purpose"
        )


def _read_yaml(name_or_path: str) -> dict:
    path = Path(name_or_path)
    if name_or_path in preset_names():
        text = resources.files("megdet.configs").joinpath(f"{name_or_path}.yaml").read_text()
        source = f"preset '{name_or_path}'"
    elif path.is_file():
        source = str(path)
        try:
            text = path.read_text()
        except UnicodeDecodeError:
            raise ConfigError(f"{source}: not a text file (a YAML config is UTF-8 text)") from None
    else:
        raise ConfigError(
            f"--config: '{name_or_path}' is neither a preset ({', '.join(preset_names())}) "
            "nor a YAML file"
        )
    raw = safe_yaml(text, source) or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of sections")
    return raw


def safe_yaml(text: str, source: str) -> Any:
    """``yaml.safe_load``, refusing a document whose anchors expand past ``MAX_YAML_NODES``
    (a "billion laughs" file is a few lines that expand to 10^9 values: safe_load shares
    them, but everything that walks the result, a copy or a dump, would exhaust memory)."""
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        if root is not None and _expanded_nodes(root) > MAX_YAML_NODES:
            raise ConfigError(
                f"{source}: its anchors and aliases expand to more than {MAX_YAML_NODES:,} "
                "values; write the values out, or use fewer aliases"
            )
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise InvalidYaml(f"{source}:{where} is not valid YAML") from None
    except RecursionError:
        raise ConfigError(f"{source}: nested too deeply to be a config") from None


MAX_YAML_NODES = 100_000


class InvalidYaml(ConfigError):
    """Text that does not parse as YAML."""


def _expanded_nodes(root: yaml.Node) -> int:
    """How many values the document holds once every alias is expanded: each node's size
    counted once (an alias shares its anchor's node), in post-order without recursion."""
    sizes: dict[int, int] = {}
    stack = [(root, False)]
    while stack:
        node, children_done = stack.pop()
        if id(node) in sizes:
            continue
        if isinstance(node, yaml.ScalarNode):
            sizes[id(node)] = 1
            continue
        children = [
            child
            for item in node.value
            for child in (item if isinstance(node, yaml.MappingNode) else (item,))
        ]
        if children_done:
            sizes[id(node)] = 1 + sum(sizes.get(id(child), 0) for child in children)
        else:
            stack.append((node, True))
            stack.extend((child, False) for child in children if id(child) not in sizes)
    return sizes[id(root)]


def _apply_override(raw: dict, item: str) -> None:
    key, sep, text = item.partition("=")
    if not sep or not key:
        raise ConfigError(f"override '{item}': expected key=value, e.g. train.batch_size=32")
    try:
        value = safe_yaml(text, f"override '{key}'")
    except InvalidYaml:
        value = text  # e.g. a path with a colon: the text as it is
    node = raw
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override '{item}': '{part}' is not a section")
        node = child
    node[parts[-1]] = value


def _build(cls: type, raw: Any, prefix: str) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - names)
    if unknown:
        raise ConfigError(
            f"{prefix}{unknown[0]}: unknown key (known here: {', '.join(sorted(names))})"
        )
    kwargs = {name: _coerce(raw[name], hints[name], prefix + name) for name in raw}
    return cls(**kwargs)


def _coerce(value: Any, hint: Any, key: str) -> Any:
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, key + ".")
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        choices = [a for a in args if a is not type(None)]
        for inner in choices[:-1]:  # e.g. int | str: a number if it is one, else the string
            try:
                return _coerce(value, inner, key)
            except ConfigError:
                pass
        return _coerce(value, choices[-1], key)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):
        try:
            return float(value)  # YAML 1.1 reads "1e-4" (no dot) as a string
        except ValueError:
            pass
    if hint is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)  # a path or name that YAML read as a number
    if not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
        raise ConfigError(f"{key}: expected {hint.__name__}, got {value!r}")
    return value
