"""Faster R-CNN + FPN assembled from torchvision's detection components."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import (
    FastRCNNConvFCHead,
    FastRCNNPredictor,
    TwoMLPHead,
)
from torchvision.models.detection.rpn import RPNHead

from megdet.config import ModelConfig
from megdet.nn import norm_layer
from megdet.tasks.detection.backbone import build_backbone
from megdet.tasks.detection.roi_align import FastMultiScaleRoIAlign

ASPECT_RATIOS = (0.5, 1.0, 2.0)


def anchor_sizes(cfg: ModelConfig) -> list[int]:
    """One anchor side per level P2..P6.

    Unless set, the anchors span 1/16 of the short image side at P2 to the whole side at P6
    (8..128 at 128 px), so small demo images get small anchors. COCO presets set 32..512.
    """
    if cfg.anchor_sizes is not None:
        return list(cfg.anchor_sizes)
    smallest = max(4, round(cfg.min_size / 16))
    return [smallest * 2**level for level in range(5)]


def build_detector(
    cfg: ModelConfig,
    num_classes: int,
    norm: Callable[[int], nn.Module] | None = None,
    pretrained: bool = False,
) -> FasterRCNN:
    """Faster R-CNN + FPN (P2..P6) for ``num_classes`` object classes plus background.

    ``norm`` builds every normalization layer; by default ``model.norm`` without a process
    group (CGBN then pools over the default group; the trainer passes its BN groups).
    ``pretrained`` loads ``model.backbone_weights`` into the backbone.
    """
    norm = norm or norm_layer(cfg.norm)
    backbone = build_backbone(cfg, norm, pretrained)
    anchors = AnchorGenerator(
        sizes=tuple((size,) for size in anchor_sizes(cfg)),
        aspect_ratios=(ASPECT_RATIOS,) * 5,
    )
    box_roi_pool = FastMultiScaleRoIAlign(
        featmap_names=["0", "1", "2", "3"],
        output_size=7,
        sampling_ratio=cfg.roi_sampling_ratio,
    )
    if cfg.norm_scope == "all":
        box_head = FastRCNNConvFCHead(
            (cfg.fpn_channels, 7, 7),
            conv_layers=[cfg.fpn_channels] * cfg.box_head_convs,
            fc_layers=[cfg.box_head_dim],
            norm_layer=norm,
        )
    else:
        box_head = TwoMLPHead(cfg.fpn_channels * 7 * 7, cfg.box_head_dim)
    model = FasterRCNN(
        backbone,
        min_size=cfg.min_size,
        max_size=cfg.max_size,
        rpn_anchor_generator=anchors,
        rpn_head=RPNHead(cfg.fpn_channels, len(ASPECT_RATIOS)),
        rpn_pre_nms_top_n_train=cfg.rpn_pre_nms_top_n_train,
        rpn_post_nms_top_n_train=cfg.rpn_post_nms_top_n_train,
        rpn_pre_nms_top_n_test=cfg.rpn_pre_nms_top_n_test,
        rpn_post_nms_top_n_test=cfg.rpn_post_nms_top_n_test,
        rpn_batch_size_per_image=cfg.rpn_batch_per_image,
        box_roi_pool=box_roi_pool,
        box_head=box_head,
        box_predictor=FastRCNNPredictor(cfg.box_head_dim, num_classes + 1),
        box_batch_size_per_image=cfg.roi_batch_per_image,
        box_positive_fraction=cfg.roi_positive_fraction,
        box_score_thresh=cfg.box_score_thresh,
        box_detections_per_img=cfg.box_detections_per_img,
    )
    _objectness_targets_in_anchor_dtype(model.rpn)
    _box_geometry_in_image_dtype(model)
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
        model.backbone.register_forward_pre_hook(_images_to_channels_last)
    return model


def _objectness_targets_in_anchor_dtype(rpn: nn.Module) -> None:
    """torchvision makes the RPN's objectness targets float32, which makes the objectness loss
    of a float64 model (train.dtype) a float32 number; give them the anchors' dtype."""
    assign = rpn.assign_targets_to_anchors

    def assign_in_anchor_dtype(anchors, targets):
        labels, matched_boxes = assign(anchors, targets)
        return [lab.to(a.dtype) for lab, a in zip(labels, anchors, strict=True)], matched_boxes

    rpn.assign_targets_to_anchors = assign_in_anchor_dtype


def _box_geometry_in_image_dtype(model: FasterRCNN) -> None:
    """Under mixed precision (train.amp) anchors, box deltas and class scores stay in the
    images' dtype (float32): torchvision gives anchors the feature maps' dtype, and a
    bfloat16 coordinate of a 1333 px image is off by up to 4 px. The heads' convolutions and
    matrix products still run in half precision; only their outputs are cast."""
    model.rpn.anchor_generator.register_forward_pre_hook(_anchors_in_image_dtype)
    model.rpn.head.register_forward_hook(_outputs_in_float32)
    model.roi_heads.box_predictor.register_forward_hook(_outputs_in_float32)


def _anchors_in_image_dtype(module: nn.Module, args: tuple) -> tuple:
    # The generator reads only the feature maps' sizes, dtype and device: empty stand-ins.
    image_list, features = args
    dtype = image_list.tensors.dtype
    return image_list, [f.new_empty((0, 0, *f.shape[-2:]), dtype=dtype) for f in features]


def _outputs_in_float32(module: nn.Module, args: tuple, outputs):
    def cast(value):
        if isinstance(value, (list, tuple)):
            return type(value)(cast(v) for v in value)
        if value.dtype in (torch.float16, torch.bfloat16):
            return value.float()
        return value

    return cast(outputs)


def _images_to_channels_last(module: nn.Module, args: tuple) -> tuple:
    """The transform batches images as NCHW; the first convolution should get them as NHWC."""
    return (args[0].contiguous(memory_format=torch.channels_last), *args[1:])
