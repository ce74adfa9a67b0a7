import pytest
import torch
from torch import nn
from torchvision.ops import FrozenBatchNorm2d

from megdet.config import load_config
from megdet.data.coco import CocoDetection, collate, read_coco
from megdet.tasks.detection.model import anchor_sizes, build_detector


def _batch(root, n=2):
    dataset = CocoDetection(
        read_coco(root / "annotations" / "instances_train.json"), root / "train"
    )
    return collate([dataset[i] for i in range(n)])


@pytest.mark.parametrize("norm", ["bn", "gn", "frozen"])
def test_tiny_detector_trains_and_predicts_with_each_norm(tiny_shapes, norm):
    cfg = load_config("instant_test", [f"model.norm={norm}", "model.backbone_weights=none"]).model
    torch.manual_seed(0)
    model = build_detector(cfg, num_classes=3)
    expected = {"bn": nn.BatchNorm2d, "gn": nn.GroupNorm, "frozen": FrozenBatchNorm2d}[norm]
    assert any(isinstance(m, expected) for m in model.backbone.body.modules())
    images, targets = _batch(tiny_shapes)
    losses = model(images, targets)
    assert set(losses) == {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"}
    sum(losses.values()).backward()
    assert model.roi_heads.box_predictor.cls_score.weight.grad.abs().sum() > 0
    model.eval()
    with torch.no_grad():
        outputs = model(images)
    assert len(outputs) == 2 and set(outputs[0]) == {"boxes", "scores", "labels"}
    assert outputs[0]["boxes"].shape[-1] == 4
    assert model.roi_heads.box_predictor.cls_score.out_features == 4  # 3 classes + background


def test_resnet_backbones_build_with_fpn_levels():
    for name, c5 in (("resnet18", 512), ("resnet50", 2048)):
        cfg = load_config("coco_r50_fpn", [f"model.backbone={name}", "model.frozen_stages=2"]).model
        model = build_detector(cfg, num_classes=80)
        body = model.backbone.body
        assert body.layer4[-1].conv1.in_channels in (c5, c5 // 4 * 4)
        assert not any(p.requires_grad for p in body.conv1.parameters())
        assert not any(p.requires_grad for p in body.layer1.parameters())
        assert all(p.requires_grad for p in body.layer2.parameters())
        features = model.backbone(torch.zeros(1, 3, 64, 64))
        assert list(features) == ["0", "1", "2", "3", "pool"]
        assert [f.shape[-1] for f in features.values()] == [16, 8, 4, 2, 1]


def test_anchor_sizes_follow_image_size():
    assert anchor_sizes(load_config("default").model) == [8, 16, 32, 64, 128]
    assert anchor_sizes(load_config("instant_test").model) == [4, 8, 16, 32, 64]
    assert anchor_sizes(load_config("coco_r50_fpn").model) == [32, 64, 128, 256, 512]


def test_channels_last_detector_matches_nchw(tiny_shapes):
    """Same weights, same images: NHWC convolutions change only float rounding. Compared in
    float64, where that rounding cannot move a proposal across a top-n cut or an IoU
    threshold (in float32 it can, by how much depends on the CPU's kernels)."""
    images, targets = _batch(tiny_shapes, n=3)
    images = [image.double() for image in images]
    targets = [{**t, "boxes": t["boxes"].double()} for t in targets]
    results = []
    for channels_last in (True, False):
        cfg = load_config("instant_test", ["model.norm=bn", f"model.channels_last={channels_last}"])
        torch.manual_seed(0)
        model = build_detector(cfg.model, num_classes=3).double()
        conv = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
        assert conv.weight.is_contiguous(memory_format=torch.channels_last) == channels_last
        features = model.backbone(torch.rand(2, 3, 64, 64, dtype=torch.float64))
        assert features["0"].is_contiguous(memory_format=torch.channels_last) == channels_last
        torch.manual_seed(1)  # the RPN/RoI samplers draw from the global generator here
        losses = model(images, targets)
        sum(losses.values()).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append(({k: v.item() for k, v in losses.items()}, grads))
    (losses_nhwc, grads_nhwc), (losses_nchw, grads_nchw) = results
    assert losses_nhwc == pytest.approx(losses_nchw, rel=1e-10)
    assert grads_nhwc.keys() == grads_nchw.keys()
    for name, grad in grads_nchw.items():
        scale = grad.abs().max().clamp(min=1e-3)
        assert (grads_nhwc[name] - grad).abs().max() / scale < 1e-9, name


def test_mixed_precision_keeps_anchors_proposals_and_losses_in_float32(tiny_shapes):
    """Under bf16 autocast (train.amp) the convolutions run in bfloat16, but anchors, box
    deltas, proposals and losses stay float32: anchors bit for bit those of a float32
    forward, and the RPN losses (same anchors, same seeded sampling) within bfloat16's
    rounding (2^-8) times the ~10 layers it passes."""
    cfg = load_config("instant_test").model
    torch.manual_seed(0)
    model = build_detector(cfg, num_classes=3)
    images, targets = _batch(tiny_shapes)
    seen = {"anchors": [], "proposals": [], "features": []}
    model.rpn.anchor_generator.register_forward_hook(
        lambda m, args, out: seen["anchors"].append(out)
    )
    model.rpn.register_forward_hook(lambda m, args, out: seen["proposals"].append(out[0]))
    model.backbone.register_forward_hook(
        lambda m, args, out: seen["features"].append(out["0"].dtype)
    )
    runs = []
    for half in (False, True):
        torch.manual_seed(1)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=half):
            runs.append(model(images, targets))
    full, mixed = runs
    assert seen["features"] == [torch.float32, torch.bfloat16]
    assert all(value.dtype == torch.float32 for value in mixed.values())
    for a, b in zip(*seen["anchors"], strict=True):
        assert a.dtype == b.dtype == torch.float32 and torch.equal(a, b)
    assert all(p.dtype == torch.float32 for p in seen["proposals"][1])
    for key in ("loss_objectness", "loss_rpn_box_reg"):
        assert abs(mixed[key] / full[key] - 1).item() < 10 * 2.0**-8, key
    sum(mixed.values()).backward()
    assert all(p.grad.dtype == torch.float32 for p in model.parameters() if p.grad is not None)
