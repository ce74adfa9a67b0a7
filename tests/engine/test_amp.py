"""train.amp: the fp16 loss scaler's skipped steps against real divergence, its state in the
checkpoint, and a detector training with bf16 autocast."""

import json
import math

import pytest
import torch
from torch import nn

from megdet import dist
from megdet.config import load_config
from megdet.engine.amp import MixedPrecision
from megdet.engine.trainer import train
from megdet.errors import ConfigError
from megdet.tasks.detection.task import DetectionTask
from tests.conftest import instant_overrides

CPU = torch.device("cpu")


def _step(amp, model, optimizer, scale_loss_by=1.0):
    optimizer.zero_grad()
    with amp.autocast():
        loss = model(torch.ones(2, 4)).float().sum() * scale_loss_by
    amp.backward(loss, optimizer)
    grads = [p.grad for p in model.parameters()]
    grad_norm = torch.nn.utils.get_total_norm(grads).item()
    scale, found_inf = torch.cat(amp.pending(optimizer)).tolist()
    assert bool(found_inf) == (not math.isfinite(grad_norm))  # the scaler's own verdict
    amp.step(optimizer, bool(found_inf), scale)
    return grad_norm


def test_fp16_overflow_is_a_skipped_step_then_training_goes_on():
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    amp = MixedPrecision("fp16", CPU)
    before = [p.detach().clone() for p in model.parameters()]
    # A loss whose gradient times the initial scale (2^16) overflows fp16, the gradient itself
    # does not: the scaler skips the step and halves its scale; the weights do not move.
    norm = _step(amp, model, optimizer, scale_loss_by=1e3)
    assert not torch.isfinite(torch.tensor(norm))
    assert amp.statistics() == {"loss_scale": 2.0**15, "skipped_steps": 1}
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    norm = _step(amp, model, optimizer, scale_loss_by=0.1)  # fits fp16 at 2^15: a real step
    assert torch.isfinite(torch.tensor(norm)) and amp.skipped_steps == 1
    assert not torch.equal(before[0], model.weight)


def test_fp16_overflow_below_scale_one_is_a_divergence():
    amp = MixedPrecision("fp16", CPU)
    assert not amp.skips(True, 0.5)
    assert amp.skips(True, 1.0) and not amp.skips(False, 1.0)
    for mode in ("none", "bf16"):  # no scaler: every non-finite gradient is a divergence
        assert not MixedPrecision(mode, CPU).skips(True, 2.0**16)


def test_scaler_state_round_trips_through_the_checkpoint_format(tmp_path):
    amp = MixedPrecision("fp16", CPU)
    amp.load_state_dict({"scaler": {**amp.scaler.state_dict(), "scale": 512.0,
                                    "_growth_tracker": 7}, "skipped_steps": 3})  # fmt: skip
    torch.save(amp.state_dict(), tmp_path / "amp.pt")
    restored = MixedPrecision("fp16", CPU)
    restored.load_state_dict(torch.load(tmp_path / "amp.pt", weights_only=True))
    assert restored.state_dict() == amp.state_dict()
    assert restored.statistics() == {"loss_scale": 512.0, "skipped_steps": 3}


def test_amp_needs_a_float32_model():
    with pytest.raises(ConfigError, match="train.amp: bf16 .* train.dtype=float64"):
        load_config("instant_test", ["train.amp=bf16", "train.dtype=float64"])
    with pytest.raises(ConfigError, match="train.amp: 'fp32' is not one of none, bf16, fp16"):
        load_config("instant_test", ["train.amp=fp32"])


def test_detector_trains_with_bf16_autocast(tiny_shapes, tmp_path):
    cfg = load_config(
        "instant_test",
        [*instant_overrides(tiny_shapes), "train.amp=bf16", "train.max_iter=4", "log.period=1"],
    )
    convolutions = []
    task = DetectionTask(cfg)
    build = task.build_model

    def build_and_watch(**kwargs):
        model = build(**kwargs)
        model.backbone.body.register_forward_hook(
            lambda m, args, out: convolutions.append(next(iter(out.values())).dtype)
        )
        return model

    task.build_model = build_and_watch
    result = train(cfg, task, tmp_path, dist.init_distributed())
    assert convolutions[0] == torch.bfloat16  # training steps; evaluation runs in float32
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(losses) == 4 and all(0 < loss < 10 for loss in losses)
    assert all(p.dtype == torch.float32 for p in result.model.parameters())
