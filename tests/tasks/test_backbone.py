"""Pretrained backbones (torchvision's weights API or a local file) and frozen stages that are
really frozen: fixed statistics, no statistics updates, no CGBN collectives."""

from urllib.error import URLError

import pytest
import torch
from torch import nn
from torchvision.models import resnet18, resnet50
from torchvision.ops import FrozenBatchNorm2d

from megdet.cli import main
from megdet.config import load_config, validate_initialization
from megdet.errors import ConfigError
from megdet.nn import CrossGPUBatchNorm2d, norm_layer
from megdet.tasks.detection.backbone import build_backbone

RESNET18_FILE = "resnet18-f37072fd.pth"  # torchvision's IMAGENET1K_V1 file name


def _model_cfg(*overrides):
    return load_config("coco_r50_fpn", ["model.backbone=resnet18", *overrides]).model


def _imagenet_like_state(seed=0):
    """A torchvision resnet18 state_dict with non-trivial BN statistics, fc included."""
    torch.manual_seed(seed)
    model = resnet18()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-1, 1)
                module.running_var.uniform_(0.5, 2)
                module.weight.uniform_(0.5, 1.5)
    return model.state_dict()


def _norms(module):
    return [m for m in module.modules() if isinstance(m, (nn.BatchNorm2d, FrozenBatchNorm2d))]


@pytest.mark.parametrize("with_fc", [True, False])
def test_local_torchvision_state_dict_loads(tmp_path, with_fc):
    state = _imagenet_like_state()
    if not with_fc:
        state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    path = tmp_path / "resnet18.pth"
    torch.save(state, path)
    cfg = _model_cfg(f"model.backbone_weights={path}", "model.norm=bn", "model.frozen_stages=0")
    body = build_backbone(cfg, norm_layer("bn"), pretrained=True).body
    loaded = body.state_dict()
    for key in ("conv1.weight", "layer3.1.bn2.running_var", "layer4.0.downsample.0.weight"):
        assert torch.equal(loaded[key], state[key]), key


def test_imagenet_weights_come_from_the_torch_hub_cache(tmp_path, monkeypatch):
    """`imagenet` goes through torchvision's weights API; a file already in the cache is used
    without any download (frozen BN takes the file's statistics)."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    cache = tmp_path / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    state = _imagenet_like_state()
    torch.save(state, cache / RESNET18_FILE)
    cfg = _model_cfg("model.backbone_weights=imagenet", "model.norm=frozen")
    body = build_backbone(cfg, norm_layer("frozen"), pretrained=True).body
    assert torch.equal(body.layer2[0].bn1.running_mean, state["layer2.0.bn1.running_mean"])
    assert torch.equal(body.conv1.weight, state["conv1.weight"])
    # Without pretrained (evaluation, resume: a checkpoint follows), nothing is read.
    fresh = build_backbone(cfg, norm_layer("frozen"), pretrained=False).body
    assert not torch.equal(fresh.conv1.weight, state["conv1.weight"])


def test_imagenet_weights_offline_is_a_one_line_error(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))

    def offline(*args, **kwargs):
        raise URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    cfg = _model_cfg("model.backbone_weights=imagenet")
    with pytest.raises(ConfigError) as caught:
        build_backbone(cfg, norm_layer("frozen"), pretrained=True)
    message = str(caught.value)
    assert "\n" not in message
    assert "cannot download https://download.pytorch.org/models/resnet18" in message
    assert str(tmp_path / "hub" / "checkpoints" / RESNET18_FILE) in message
    assert "model.backbone_weights=PATH" in message


def test_weights_of_another_depth_are_a_one_line_error(tmp_path):
    path = tmp_path / "resnet50.pth"
    torch.save(resnet50().state_dict(), path)
    cfg = _model_cfg(f"model.backbone_weights={path}")
    with pytest.raises(ConfigError, match="does not fit model.backbone=resnet18") as caught:
        build_backbone(cfg, norm_layer("frozen"), pretrained=True)
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize(
    ("overrides", "problem"),
    [
        (["model.norm=frozen", "model.frozen_stages=0"], "model.norm=frozen would freeze"),
        (["model.norm=cgbn", "model.frozen_stages=2"], "model.frozen_stages=2 would freeze"),
    ],
)
def test_frozen_layers_over_random_weights_need_an_explicit_none(overrides, problem):
    unset = load_config("coco_r50_fpn", ["model.backbone_weights=''", *overrides])
    with pytest.raises(ConfigError, match=problem):
        validate_initialization(unset)
    validate_initialization(
        load_config("coco_r50_fpn", ["model.backbone_weights=none", *overrides])
    )


def test_tiny_has_no_imagenet_weights():
    with pytest.raises(ConfigError, match="no ImageNet weights for the tiny backbone"):
        load_config("instant_test", ["model.backbone_weights=imagenet"])


@pytest.mark.parametrize("command", ["plan", "train"])
def test_refusal_reaches_the_user_as_one_line(capsys, tmp_path, command):
    out = ["--out", str(tmp_path / "run")] if command == "train" else []
    assert main([command, "--config", "instant_test", "model.norm=frozen", *out]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("megdet: error: model.backbone_weights: not set, but model.norm=frozen")
    assert "\n" not in err
    assert not (tmp_path / "run").exists()  # refused before anything was written


@pytest.mark.parametrize("norm", ["cgbn", "bn", "gn"])
def test_frozen_stages_normalize_with_fixed_statistics(tmp_path, norm):
    """Stem and res2 frozen: FrozenBatchNorm2d with the loaded statistics, so a training
    forward neither uses batch statistics nor moves running statistics nor (CGBN)
    communicates; res3 on keeps model.norm and learns."""
    path = tmp_path / "resnet18.pth"
    torch.save(_imagenet_like_state(), path)
    weights = path if norm != "gn" else "none"  # a BN file does not fit GroupNorm layers
    cfg = _model_cfg(
        f"model.backbone_weights={weights}", f"model.norm={norm}", "model.frozen_stages=2"
    )
    body = build_backbone(cfg, norm_layer(norm), pretrained=True).body
    frozen = [body.conv1, body.bn1, body.layer1]
    if norm == "gn":  # no statistics to freeze: GroupNorm stays, without gradients
        assert isinstance(body.bn1, nn.GroupNorm)
    else:
        assert all(isinstance(m, FrozenBatchNorm2d) for f in frozen for m in _norms(f))
        assert not any(isinstance(m, CrossGPUBatchNorm2d) for f in frozen for m in f.modules())
        learned = {"cgbn": CrossGPUBatchNorm2d, "bn": nn.BatchNorm2d}[norm]
        assert all(isinstance(m, learned) for m in _norms(body.layer2))
        assert torch.equal(
            body.bn1.running_var, torch.load(path, weights_only=True)["bn1.running_var"]
        )
    assert not any(p.requires_grad for f in frozen for p in f.parameters())
    assert all(p.requires_grad for p in body.layer2.parameters())

    before = {k: v.clone() for k, v in body.state_dict().items()}
    x = torch.randn(2, 3, 64, 64)
    stem = nn.Sequential(body.conv1, body.bn1, body.relu, body.maxpool, body.layer1)
    body.train()
    trained = stem(x)
    body.eval()
    assert torch.allclose(trained, stem(x), atol=1e-6)  # fixed statistics in training too
    after = body.state_dict()
    unchanged = [k for k in before if k.startswith(("bn1.", "layer1."))]
    assert unchanged and all(torch.equal(before[k], after[k]) for k in unchanged)
