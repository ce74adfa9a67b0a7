"""RoIAlign with a vectorized CPU backward; torchvision's kernels everywhere else.

torchvision's CPU ``roi_align`` backward walks every output element of every RoI in one scalar
loop; on the demo detector it was 18% of a training step, more than every convolution's forward
(BENCHMARKS.md). The gradient is a sparse sum: each sample point of each bin adds its output
gradient to the four feature cells around it, weighted bilinearly. Here that sum is one
``index_add_`` over a channels-last view of the features, so the channel dimension is a
contiguous vector; the sample points and weights follow torchvision's arithmetic step by step
(same clamping at the borders, same treatment of points outside the map), and the forward is
torchvision's own kernel, so outputs are bitwise those of ``torchvision.ops.roi_align`` and
gradients equal up to the order of a floating-point sum (tests/tasks/test_roi_align.py).

CUDA, an adaptive ``sampling_ratio`` (0: a grid size per RoI) and double backward keep
torchvision's implementation.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable
from torchvision.ops import MultiScaleRoIAlign, roi_align
from torchvision.ops.poolers import _setup_scales  # torchvision is pinned (pyproject.toml)

# Elements of one chunk's weighted gradients (16 MB in float32): bounds the backward's memory
# (ResNet-50 FPN: 512 RoIs x 2 images x 14 x 14 samples x 4 corners x 256 channels otherwise).
CHUNK_ELEMENTS = 1 << 22


def fast_roi_align(
    features: Tensor,
    rois: Tensor,
    output_size: tuple[int, int],
    spatial_scale: float,
    sampling_ratio: int,
    aligned: bool = False,
) -> Tensor:
    """``torchvision.ops.roi_align`` on (K, 5) ``rois``; our backward where it applies."""
    if features.device.type == "cpu" and sampling_ratio > 0 and features.requires_grad:
        if features.dtype in (torch.float16, torch.bfloat16):
            # Mixed precision: bilinear sums and the gradient's index_add_ in float32, as
            # torchvision's autocast kernel does.
            features = features.float()
        return _RoIAlignFunction.apply(
            features, rois, output_size, spatial_scale, sampling_ratio, aligned
        )
    return roi_align(features, rois, output_size, spatial_scale, sampling_ratio, aligned)


class _RoIAlignFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, features, rois, output_size, spatial_scale, sampling_ratio, aligned):
        ctx.save_for_backward(rois)
        ctx.geometry = (features.shape, output_size, spatial_scale, sampling_ratio, aligned)
        height, width = output_size
        return torch.ops.torchvision.roi_align(
            features, rois, spatial_scale, height, width, sampling_ratio, aligned
        )

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        (rois,) = ctx.saved_tensors
        grad = _roi_align_backward(grad_output, rois, *ctx.geometry)
        return grad, None, None, None, None, None


def _roi_align_backward(
    grad_output: Tensor,
    rois: Tensor,
    shape: torch.Size,
    output_size: tuple[int, int],
    spatial_scale: float,
    grid: int,
    aligned: bool,
) -> Tensor:
    num_images, channels, height, width = shape
    bins_y, bins_x = output_size
    num_rois = rois.shape[0]
    grad_flat = grad_output.new_zeros(num_images * height * width, channels)
    if num_rois:
        offset = 0.5 if aligned else 0.0
        start_x = rois[:, 1] * spatial_scale - offset
        start_y = rois[:, 2] * spatial_scale - offset
        size_x = rois[:, 3] * spatial_scale - offset - start_x
        size_y = rois[:, 4] * spatial_scale - offset - start_y
        if not aligned:  # torchvision's legacy behaviour: RoIs at least one cell wide
            size_x, size_y = size_x.clamp(min=1.0), size_y.clamp(min=1.0)
        cell_y, weight_y = _axis_samples(start_y, size_y / bins_y, bins_y, grid, height)
        cell_x, weight_x = _axis_samples(start_x, size_x / bins_x, bins_x, grid, width)
        # (roi, y sample, x sample, y corner, x corner): the 4 cells of each sample point.
        weight = weight_y[:, :, None, :, None] * weight_x[:, None, :, None, :]
        image = rois[:, 0].long()[:, None, None, None, None]
        cell = (image * height + cell_y[:, :, None, :, None]) * width + cell_x[:, None, :, None, :]
        # Each bin's gradient goes to its grid x grid sample points, averaged.
        per_bin = grad_output.permute(0, 2, 3, 1) / (grid * grid)  # (roi, bin y, bin x, C)
        # RoIs in chunks, so the per-corner products stay within CHUNK_ELEMENTS.
        chunk = max(1, CHUNK_ELEMENTS // (weight[0].numel() * channels))
        for begin in range(0, num_rois, chunk):
            rows = slice(begin, begin + chunk)
            per_sample = per_bin[rows].repeat_interleave(grid, 1).repeat_interleave(grid, 2)
            source = weight[rows, ..., None] * per_sample[:, :, :, None, None, :]
            grad_flat.index_add_(0, cell[rows].reshape(-1), source.reshape(-1, channels))
    grad = grad_flat.view(num_images, height, width, channels).permute(0, 3, 1, 2)
    return grad.contiguous()


def _axis_samples(
    start: Tensor, bin_size: Tensor, bins: int, grid: int, length: int
) -> tuple[Tensor, Tensor]:
    """Cells ``(roi, bins * grid, 2)`` below/above each sample coordinate and their bilinear
    weights (zero where the point is outside the map), as torchvision's
    ``bilinear_interpolate_gradient`` computes them per axis."""
    dtype = start.dtype
    bin_index = torch.arange(bins, dtype=dtype, device=start.device)
    within = (torch.arange(grid, dtype=dtype, device=start.device) + 0.5)[None, None, :]
    position = (
        start[:, None, None]
        + bin_index[None, :, None] * bin_size[:, None, None]
        + within * bin_size[:, None, None] / grid
    ).reshape(start.shape[0], bins * grid)
    inside = (position >= -1.0) & (position <= length)
    position = position.clamp(min=0.0)
    low = position.floor()
    at_edge = low >= length - 1
    low = torch.where(at_edge, torch.full_like(low, length - 1), low)
    position = torch.where(at_edge, low, position)
    upper_weight = (position - low) * inside
    lower_weight = (1.0 - (position - low)) * inside
    low = low.long()
    high = torch.where(at_edge, low, low + 1)
    return torch.stack((low, high), -1), torch.stack((lower_weight, upper_weight), -1)


class FastMultiScaleRoIAlign(MultiScaleRoIAlign):
    """torchvision's ``MultiScaleRoIAlign`` (same level mapping, same output) over
    ``fast_roi_align``: the module the detector uses for its box head."""

    def forward(
        self, x: dict[str, Tensor], boxes: list[Tensor], image_shapes: list[tuple[int, int]]
    ) -> Tensor:
        features = [x[name] for name in self.featmap_names]
        if self.scales is None or self.map_levels is None:
            self.scales, self.map_levels = _setup_scales(
                features, image_shapes, self.canonical_scale, self.canonical_level
            )
        rois = torch.cat(
            [torch.cat([b.new_full((len(b), 1), i), b], 1) for i, b in enumerate(boxes)]
        )
        levels = self.map_levels(boxes)
        pooled = features[0].new_zeros((len(rois), features[0].shape[1], *self.output_size))
        for level, (feature, scale) in enumerate(zip(features, self.scales, strict=True)):
            in_level = torch.where(levels == level)[0]
            pooled[in_level] = fast_roi_align(
                feature, rois[in_level], self.output_size, scale, self.sampling_ratio
            ).to(pooled.dtype)
        return pooled
