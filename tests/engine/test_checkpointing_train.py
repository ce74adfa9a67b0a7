"""Training the detector with activation checkpointing is training it without: same losses,
same weights and BN statistics after 3 iterations over 2 gloo processes. In float64
(train.dtype), so that the comparison does not depend on how this CPU's kernels round."""

import json

import pytest
import torch

from megdet import dist
from megdet.config import load_config
from megdet.engine.trainer import train
from megdet.tasks.detection.task import DetectionTask
from tests.conftest import instant_overrides
from tests.distributed import run_in_processes


def _train(rank, world_size, root, run_dir, norm, checkpointing):
    cfg = load_config(
        "instant_test",
        [
            *instant_overrides(root),
            f"model.norm={norm}",
            f"train.checkpointing={checkpointing}",
            "train.max_iter=3",
            "train.dtype=float64",
            "log.period=1",
        ],
    )
    result = train(cfg, DetectionTask(cfg), run_dir, dist.init_distributed())
    return {k: v for k, v in result.model.state_dict().items() if v.is_floating_point()}


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("norm", ["cgbn", "bn"])
def test_checkpointed_training_equals_plain_training(tiny_shapes, tmp_path, norm):
    runs = {}
    for mode in ("none", "stages+fpn"):
        run_dir = tmp_path / mode
        run_dir.mkdir()
        weights = run_in_processes(_train, 2, tiny_shapes, run_dir, norm, mode)[0]
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
        losses = [json.loads(line)["loss"] for line in lines if '"loss"' in line]
        runs[mode] = (losses, weights)
    (losses, weights), (plain_losses, plain_weights) = runs["stages+fpn"], runs["none"]
    assert len(losses) == 3 and losses == pytest.approx(plain_losses, rel=1e-10)
    assert weights.keys() == plain_weights.keys()  # same parameter names: checkpoints load
    for key, value in plain_weights.items():
        assert value.dtype == torch.float64, key
        torch.testing.assert_close(weights[key], value, rtol=1e-10, atol=1e-13, msg=key)
