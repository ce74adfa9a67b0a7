"""Activation checkpointing keeps CGBN exact: same gradients, same running statistics and the
same number of collectives as without it (the pytorch#96136 / fairscale#694 trap)."""

import functools

import pytest
import torch

from megdet import dist
from megdet.config import load_config
from megdet.nn.cgbn import CrossGPUBatchNorm2d
from megdet.nn.recompute import StatisticsTape
from megdet.tasks.detection.backbone import apply_checkpointing, build_backbone
from tests.distributed import run_in_processes

MODES = ("none", "stages", "blocks+fpn")


def _three_steps(rank, mode, dtype, device):
    """Backbone + FPN with CGBN (BN in the FPN too), 3 SGD steps on a fixed loss."""
    cfg = load_config("instant_test", ["model.norm_scope=backbone+fpn"]).model
    torch.manual_seed(0)
    backbone = build_backbone(cfg, functools.partial(CrossGPUBatchNorm2d, momentum=0.3))
    backbone = backbone.to(device, dtype).train()
    checkpointed = apply_checkpointing(backbone, mode)
    g = torch.Generator().manual_seed(100 + rank)
    images = torch.randn(2, 3, 64, 64, generator=g, dtype=dtype).to(device)
    calls = []
    gather = dist.all_gather_tensor
    dist.all_gather_tensor = lambda *a, **k: calls.append(1) or gather(*a, **k)
    grads, losses, collectives = [], [], []
    try:
        for _ in range(3):
            before = len(calls)
            features = backbone(images)
            loss = sum((f.square() * (i + 1)).mean() for i, f in enumerate(features.values()))
            backbone.zero_grad()
            loss.backward()
            collectives.append(len(calls) - before)
            losses.append(loss.item())
            grads.append({n: p.grad.clone() for n, p in backbone.named_parameters()})
            with torch.no_grad():
                for p in backbone.parameters():
                    p -= 0.1 * p.grad
    finally:
        dist.all_gather_tensor = gather
    buffers = {n: b.clone() for n, b in backbone.named_buffers()}
    return {"checkpointed": checkpointed, "losses": losses, "grads": grads,
            "buffers": buffers, "collectives": collectives}  # fmt: skip


def _compare_worker(rank, world, device):
    results = {}
    for dtype in (torch.float64, torch.float32):
        runs = {mode: _three_steps(rank, mode, dtype, device) for mode in MODES}
        reference = runs["none"]
        for mode in MODES[1:]:
            run = runs[mode]
            assert run["checkpointed"], mode
            assert run["collectives"] == reference["collectives"], mode
            for a, b in zip(run["losses"], reference["losses"], strict=True):
                assert a == pytest.approx(b, rel=1e-12 if dtype == torch.float64 else 1e-5)
            pairs = [(run["buffers"], reference["buffers"])]
            pairs += list(zip(run["grads"], reference["grads"], strict=True))
            for ours, ref in pairs:
                for name, value in ref.items():
                    diff = (ours[name].double() - value.double()).abs().max().item()
                    if dtype == torch.float64:
                        assert diff < 1e-10, (mode, name, diff)
                    else:
                        scale = max(1.0, value.double().abs().max().item())
                        assert diff / scale < 1e-5, (mode, name, diff)
        # Running statistics moved exactly 3 times, not 6.
        tracked = [v for k, v in reference["buffers"].items() if k.endswith("num_batches_tracked")]
        assert tracked and all(int(v) == 3 for v in tracked)
        assert all(int(v) == 3 for k, v in runs["stages"]["buffers"].items()
                   if k.endswith("num_batches_tracked"))  # fmt: skip
        results[str(dtype)] = reference["collectives"]
    return results


@pytest.mark.slow
@pytest.mark.device
@pytest.mark.parametrize("world", [1, 2])
def test_checkpointing_equals_no_checkpointing_with_cgbn(world, device):
    results = run_in_processes(_compare_worker, world, device)
    # One all-gather per BN layer in forward and one in backward, every iteration; none when
    # the group is this process alone (ATen's own BatchNorm kernels then).
    bn_layers = 21 + 8  # the tiny backbone's, and the FPN's 4 inner and 4 output convs
    for per_iteration in results[0].values():
        assert per_iteration == [2 * bn_layers if world > 1 else 0] * 3


def test_a_recomputation_that_differs_is_an_error():
    tape = StatisticsTape()
    tape.record("stats")
    assert tape.replay() == "stats"
    with pytest.raises(RuntimeError, match="must compute the same thing twice"):
        tape.replay()
