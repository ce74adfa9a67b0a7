"""ImageNet (or a local file's) weights for a torchvision ResNet, for every task's model."""

from __future__ import annotations

import logging
from pathlib import Path
from urllib.error import URLError
from urllib.parse import urlparse

import torch
from torch import nn
from torchvision.models import get_model_weights

from megdet.errors import ConfigError

log = logging.getLogger(__name__)


def load_resnet_weights(body: nn.Module, backbone: str, source: str) -> None:
    """ImageNet weights into the ResNet ``body``: torchvision's own (``imagenet``, through the
    torch hub cache) or a local state_dict file of that ResNet; the classifier is ignored."""
    if source == "imagenet":
        state, source = _imagenet_state_dict(backbone)
    else:
        try:
            state = torch.load(source, map_location="cpu", weights_only=True)
        except FileNotFoundError:
            raise ConfigError(f"model.backbone_weights: file not found: {source}") from None
        except Exception as exc:
            raise ConfigError(f"model.backbone_weights: cannot load {source} ({exc})") from None
        if not isinstance(state, dict):
            raise ConfigError(f"model.backbone_weights: {source} does not hold a state_dict")
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
