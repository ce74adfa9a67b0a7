"""Pretrained weights for a backbone, for every task's model: torchvision's ImageNet weights, a
megdet checkpoint of either task (issue 26: megdet pretrains its own backbones), or a plain
state_dict file; and the record of which file a run started from."""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from pathlib import Path
from urllib.error import URLError
from urllib.parse import urlparse

import torch
from torch import nn
from torchvision.models import get_model_weights

from megdet.errors import ConfigError

log = logging.getLogger(__name__)

# Where each task's model keeps the backbone body in its state_dict: a classifier's whole net
# is the body plus ``fc``; a detector's body sits under its FPN.
BODY_PREFIXES = {"classification": "net.", "detection": "backbone.body."}
RUN_CHECKPOINT = Path("checkpoints") / "last.pt"


def load_backbone_weights(
    body: nn.Module, backbone: str, source: str, rescale: bool = False
) -> None:
    """Pretrained weights and BN statistics into the backbone ``body`` (a classifier's net, or
    a detector's ResNet body); any classifier (``fc``) in the source is ignored. ``source``:
    ``imagenet`` (torchvision's, through the torch hub cache), a megdet run folder or
    checkpoint of either task with the same ``model.backbone``, or a state_dict file.
    ``rescale``: each normalized convolution's weights back to the size ``body``'s own fresh
    initialization gave them (``rescale_to_initialization``)."""
    initial = conv_sizes(body) if rescale else None
    if source == "imagenet":
        state, source = _imagenet_state_dict(backbone)
    else:
        path = checkpoint_file(source)
        try:
            loaded = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # torch's own message runs over lines: its first one
            reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
            raise ConfigError(
                f"model.backbone_weights: cannot load {path} ({reason}); pass a file that "
                "torch.save wrote"
            ) from None
        state = _body_state(loaded, path, backbone)
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    try:
        missing, unexpected = body.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shapes of another ResNet
        first = str(exc).strip().splitlines()[-1].strip()
        raise ConfigError(
            f"model.backbone_weights: {source} does not fit model.backbone={backbone} ({first})"
        ) from None
    missing = [k for k in missing if not k.startswith("fc.") and "num_batches_tracked" not in k]
    if missing or unexpected:
        raise ConfigError(
            f"model.backbone_weights: {source} does not fit model.backbone={backbone} "
            f"(missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    log.info("loaded backbone weights from %s", source)
    if initial is not None:
        factors = rescale_to_initialization(body, initial)
        log.info(
            "rescaled %d convolutions to their initial size (x%.2f to x%.2f)",
            len(factors), min(factors.values()), max(factors.values()),
        )  # fmt: skip


def normalized_convs(body: nn.Module) -> dict[str, tuple[nn.Conv2d, nn.Module]]:
    """Each convolution whose output a normalization layer takes next (in the order the
    modules are registered, as in torchvision's ResNets and the tiny one), with that layer: the
    convolutions whose weights' size the network's outputs do not depend on."""
    leaves = [(n, m) for n, m in body.named_modules() if not list(m.children())]
    pairs = {}
    for (name, conv), (_, after) in zip(leaves, leaves[1:], strict=False):
        normalizes = hasattr(after, "running_var") or isinstance(after, nn.GroupNorm)
        if isinstance(conv, nn.Conv2d) and normalizes:
            pairs[name] = (conv, after)
    return pairs


def conv_sizes(body: nn.Module) -> dict[str, float]:
    """The RMS of each normalized convolution's weights."""
    return {name: _rms(conv.weight) for name, (conv, _) in normalized_convs(body).items()}


def rescale_to_initialization(body: nn.Module, initial: dict[str, float]) -> dict[str, float]:
    """Scale each normalized convolution's weights to the RMS they had in ``initial`` (a
    fresh initialization's ``conv_sizes``), and the running statistics of the BN after it
    with them, so that the network computes what it did (up to BN's eps). Behind a
    normalization a weight's gradient shrinks as 1/|w| and its direction moves by lr/|w|^2:
    pretraining that grew the weights (megdet's tiny classifier: its stem to 5x its initial
    size) leaves them learning that much more slowly when fine-tuned (issue 26). Returns each
    convolution's factor."""
    factors = {}
    with torch.no_grad():
        for name, (conv, norm) in normalized_convs(body).items():
            factor = initial[name] / _rms(conv.weight)
            conv.weight.mul_(factor)
            if getattr(norm, "running_var", None) is not None:
                norm.running_mean.mul_(factor)
                norm.running_var.mul_(factor**2)
            factors[name] = factor
    return factors


def _rms(weight: torch.Tensor) -> float:
    return weight.detach().double().pow(2).mean().sqrt().item()


def checkpoint_file(source: str | Path) -> Path:
    """The file ``model.backbone_weights`` names: itself, or a run folder's last checkpoint."""
    path = Path(source)
    if path.is_dir():
        if not (path / RUN_CHECKPOINT).is_file():
            raise ConfigError(
                f"model.backbone_weights: {path} is a folder without {RUN_CHECKPOINT}; pass a "
                "megdet run folder that saved a checkpoint, or a weights file"
            )
        return path / RUN_CHECKPOINT
    if not path.is_file():
        raise ConfigError(f"model.backbone_weights: file not found: {path}")
    return path


def _body_state(loaded, path: Path, backbone: str) -> dict:
    """The backbone body's tensors: from a megdet checkpoint (its model's body, once its task
    and backbone are known to fit), or the file's state_dict as it is."""
    if isinstance(loaded, dict) and isinstance(loaded.get("model"), dict) and "config" in loaded:
        config = loaded["config"] if isinstance(loaded["config"], dict) else {}
        task = config.get("task", "detection")
        trained = (config.get("model") or {}).get("backbone")
        if trained != backbone:
            raise ConfigError(
                f"model.backbone_weights: {path} is a {task} checkpoint of backbone {trained}, "
                f"not {backbone}; set model.backbone={trained}, or pretrain a {backbone}"
            )
        prefix = BODY_PREFIXES.get(task)
        if prefix is None:
            raise ConfigError(f"model.backbone_weights: {path}: a checkpoint of task {task}")
        model = loaded["model"]
        return {k[len(prefix) :]: v for k, v in model.items() if k.startswith(prefix)}
    if (
        not isinstance(loaded, dict)
        or not loaded
        or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in loaded.items())
    ):
        raise ConfigError(
            f"model.backbone_weights: {path} is neither a megdet checkpoint nor a state_dict; "
            "pass RUN/checkpoints/last.pt, a run folder, or a file of torch.save(state_dict)"
        )
    return loaded


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def record_backbone_source(cfg):
    """``cfg`` (a ModelConfig) with ``backbone_weights`` resolved to the file it names (a run
    folder's last checkpoint) and ``backbone_weights_sha256`` to that file's, so that the
    run's config.yaml says what it started from; a given sha256 that differs is refused: the
    file changed since the run that recorded it."""
    source = cfg.backbone_weights
    if source in ("", "none", "imagenet"):
        return cfg
    path = checkpoint_file(source).resolve()
    digest = file_sha256(path)
    expected = cfg.backbone_weights_sha256
    if expected and expected != digest:
        raise ConfigError(
            f"model.backbone_weights_sha256: {path} has sha256 {digest[:16]}..., not "
            f"{expected[:16]}...: the file changed since this was recorded; point at the "
            "original, or clear model.backbone_weights_sha256 to start from this one"
        )
    return dataclasses.replace(cfg, backbone_weights=str(path), backbone_weights_sha256=digest)


def _imagenet_state_dict(backbone: str) -> tuple[dict, str]:
    """torchvision's ImageNet weights (IMAGENET1K_V1, as its detection models use), from the
    torch hub cache, downloading them once where there is internet."""
    weights = get_model_weights(backbone).IMAGENET1K_V1
    cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(weights.url).path).name
    try:
        state = weights.get_state_dict(progress=False, check_hash=True, weights_only=True)
    except (OSError, URLError) as exc:  # no internet: URLError is an OSError too
        reason = getattr(exc, "reason", exc)
        raise ConfigError(
            f"model.backbone_weights: imagenet: cannot download {weights.url} ({reason}); "
            f"put that file at {cached}, or pass a local copy: model.backbone_weights=PATH"
        ) from None
    except Exception as exc:  # a damaged file in the cache
        raise ConfigError(
            f"model.backbone_weights: imagenet: cannot read {cached} ({exc}); delete it to "
            "download it again"
        ) from None
    return state, str(cached)
