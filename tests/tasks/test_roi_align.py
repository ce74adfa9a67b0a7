"""megdet's RoIAlign backward against torchvision's kernels, in float64 and float32."""

import pytest
import torch
from torchvision.ops import MultiScaleRoIAlign, roi_align

from megdet.tasks.detection.roi_align import FastMultiScaleRoIAlign, fast_roi_align


def _features_and_rois(dtype, num_rois=60, height=13, width=11, scale=0.5, seed=0):
    """RoIs of every kind: inside, partly and wholly outside the map, thinner than a cell."""
    g = torch.Generator().manual_seed(seed)
    features = torch.randn(3, 5, height, width, generator=g, dtype=dtype)
    corner = torch.rand(num_rois, 2, generator=g, dtype=dtype) * 1.4 - 0.2
    corner = corner * torch.tensor([width, height], dtype=dtype) / scale
    size = torch.rand(num_rois, 2, generator=g, dtype=dtype) * 16
    size[:5] = 0.05  # thinner than a feature cell
    image = torch.randint(0, 3, (num_rois, 1), generator=g).to(dtype)
    return features, torch.cat([image, corner, corner + size], 1)


@pytest.mark.parametrize("sampling_ratio", [1, 2, 3])
@pytest.mark.parametrize("aligned", [False, True])
def test_equals_torchvision_in_float64(sampling_ratio, aligned):
    features, rois = _features_and_rois(torch.float64)
    ours_in = features.clone().requires_grad_()
    theirs_in = features.clone().requires_grad_()
    ours = fast_roi_align(ours_in, rois, (7, 7), 0.5, sampling_ratio, aligned)
    theirs = roi_align(theirs_in, rois, (7, 7), 0.5, sampling_ratio, aligned)
    assert ours.grad_fn is not None and "RoIAlignFunction" in type(ours.grad_fn).__name__
    assert torch.equal(ours, theirs)  # the forward is torchvision's own kernel
    upstream = torch.randn(ours.shape, generator=torch.Generator().manual_seed(1), dtype=ours.dtype)
    ours.backward(upstream)
    theirs.backward(upstream)
    assert theirs_in.grad.abs().max() > 1
    assert (ours_in.grad - theirs_in.grad).abs().max() < 1e-12


def test_float32_close_and_channels_last_input():
    features, rois = _features_and_rois(torch.float32, num_rois=200, height=32, width=32)
    features = features.contiguous(memory_format=torch.channels_last)
    ours_in = features.clone().requires_grad_()
    theirs_in = features.detach().clone().requires_grad_()
    upstream = torch.randn(200, 5, 7, 7, generator=torch.Generator().manual_seed(2))
    fast_roi_align(ours_in, rois, (7, 7), 0.5, 2).backward(upstream)
    roi_align(theirs_in, rois, (7, 7), 0.5, 2).backward(upstream)
    scale = theirs_in.grad.abs().max()
    assert ((ours_in.grad - theirs_in.grad).abs().max() / scale) < 1e-6


def test_no_rois_gives_zero_gradient():
    features = torch.randn(2, 4, 8, 8, requires_grad=True)
    out = fast_roi_align(features, torch.zeros(0, 5), (7, 7), 1.0, 2)
    assert out.shape == (0, 4, 7, 7)
    out.sum().backward()
    assert torch.equal(features.grad, torch.zeros_like(features))


def test_adaptive_sampling_and_inference_use_torchvision():
    features, rois = _features_and_rois(torch.float64)
    adaptive = fast_roi_align(features.clone().requires_grad_(), rois, (7, 7), 0.5, 0)
    assert "RoIAlignFunction" not in type(adaptive.grad_fn).__name__
    assert fast_roi_align(features, rois, (7, 7), 0.5, 2).grad_fn is None


def test_multiscale_pooler_equals_torchvision():
    g = torch.Generator().manual_seed(3)
    sizes = (32, 16, 8, 4)
    features = {str(i): torch.randn(2, 4, s, s, generator=g, dtype=torch.float64)
                for i, s in enumerate(sizes)}  # fmt: skip
    corners = torch.rand(2, 40, 2, generator=g, dtype=torch.float64) * 90
    # Box sides from 2 to 120 px so every level gets some.
    sides = torch.exp(torch.rand(2, 40, 1, generator=g, dtype=torch.float64) * 4.1) + 1
    boxes = [torch.cat([c, c + s.expand(-1, 2)], 1) for c, s in zip(corners, sides, strict=True)]
    results = []
    for pooler_class in (FastMultiScaleRoIAlign, MultiScaleRoIAlign):
        # canonical_scale 28 instead of 224: boxes of 2-120 px reach all four levels.
        pooler = pooler_class(["0", "1", "2", "3"], 7, 2, canonical_scale=28)
        inputs = {k: v.clone().requires_grad_() for k, v in features.items()}
        out = pooler(inputs, boxes, [(128, 128)] * 2)
        out.backward(torch.ones_like(out))
        results.append((out, [inputs[k].grad for k in features]))
    (ours, our_grads), (theirs, their_grads) = results
    assert torch.equal(ours, theirs)
    levels = MultiScaleRoIAlign(["0", "1", "2", "3"], 7, 2, canonical_scale=28)
    levels(features, boxes, [(128, 128)] * 2)
    assert len(set(levels.map_levels(boxes).tolist())) == 4  # every level was exercised
    for a, b in zip(our_grads, their_grads, strict=True):
        assert (a - b).abs().max() < 1e-12


def test_chunked_backward_equals_one_chunk(monkeypatch):
    """Large RoI sets are processed in chunks; the gradient must not depend on the chunking."""
    from megdet.tasks.detection import roi_align as module

    features, rois = _features_and_rois(torch.float64, num_rois=50)
    upstream = torch.randn(
        50, 5, 7, 7, generator=torch.Generator().manual_seed(4), dtype=torch.float64
    )
    grads = []
    for chunk_elements in (module.CHUNK_ELEMENTS, 7 * 2 * 2 * 49 * 4 * 5):  # one chunk; 7 RoIs
        monkeypatch.setattr(module, "CHUNK_ELEMENTS", chunk_elements)
        x = features.clone().requires_grad_()
        fast_roi_align(x, rois, (7, 7), 0.5, 2).backward(upstream)
        grads.append(x.grad)
    theirs = features.clone().requires_grad_()
    roi_align(theirs, rois, (7, 7), 0.5, 2).backward(upstream)
    assert (grads[0] - grads[1]).abs().max() < 1e-12
    assert (grads[1] - theirs.grad).abs().max() < 1e-12
