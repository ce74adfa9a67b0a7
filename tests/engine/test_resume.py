"""Exact resume, a damaged checkpoint, and the divergence guard."""

import json
import subprocess
import sys

import pytest
import torch
import yaml

from megdet import dist
from megdet.config import load_config
from megdet.engine.checkpoint import newest_checkpoint, save_checkpoint
from megdet.engine.trainer import train
from megdet.errors import MegdetError
from megdet.nn.weights import file_sha256
from megdet.tasks.detection.task import DetectionTask
from tests.conftest import instant_overrides
from tests.distributed import run_in_processes

VARIANTS = {
    "float32": [],
    # the loss scaler's scale and growth tracker are part of the exact state
    "fp16": ["train.amp=fp16"],
    # AGVM's multipliers too: measured every 3 iterations from iteration 2, so that the resumed
    # run starts between two measurements
    "agvm": ["solver.module_lr=agvm", "solver.agvm.start_epochs=1", "solver.agvm.interval=3",
             "solver.agvm.momentum=0.5"],
    # a backbone megdet pretrained (issue 26): read by the fresh run, not by the resumed one
    "pretrained": ["model.backbone_weights={backbone}"],
}  # fmt: skip


def _train(rank, world_size, root, run_dir, max_iter, resume, variant="float32", backbone=""):
    overrides = [o.format(backbone=backbone) for o in VARIANTS[variant]]
    cfg = load_config(
        "instant_test",
        [*instant_overrides(root), f"train.max_iter={max_iter}", "train.checkpoint_period=4",
         "log.period=1", "model.norm=cgbn", "data.hflip=true", *overrides],
    )  # fmt: skip
    result = train(cfg, DetectionTask(cfg), run_dir, dist.init_distributed(), resume=resume)
    return result.model.state_dict()


def _losses(run_dir):
    """Loss, gradient noise scale and AGVM's backbone multiplier per iteration (the noise
    scale's EMAs and the multipliers are resumed too)."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {
        r["iter"]: (r["loss"], r.get("gns"), r.get("lr_factor_box_head"))
        for r in records
        if "loss" in r
    }


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_stop_and_resume_gives_the_weights_of_a_straight_run(
    tiny_shapes, tmp_path, variant, tiny_backbone
):
    straight, split = tmp_path / "straight", tmp_path / "split"
    straight.mkdir()
    split.mkdir()
    how = (variant, str(tiny_backbone))
    expected = run_in_processes(_train, 2, tiny_shapes, straight, 8, False, *how)[0]
    run_in_processes(_train, 2, tiny_shapes, split, 4, False, *how)
    # What a crash after the checkpoint leaves behind: a line the resumed run will log again.
    with open(split / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"iter": 5, "loss": 123.0}) + "\n")
    resumed = run_in_processes(_train, 2, tiny_shapes, split, 8, True, *how)[0]
    for key, value in expected.items():
        assert torch.equal(resumed[key], value), key  # bitwise: same world size, same CPU
    assert _losses(split) == _losses(straight)
    assert any(gns is not None for _, gns, _ in _losses(straight).values())  # logged, compared
    assert sorted(_losses(split)) == list(range(1, 9))
    state = torch.load(split / "checkpoints" / "last.pt", weights_only=True)
    assert (state["iteration"], state["epoch"], state["position_in_epoch"]) == (8, 4, 0)
    if variant == "fp16":
        assert state["amp"]["scaler"]["scale"] > 0
    if variant == "pretrained":  # the resumed run's config.yaml still says what it started from
        recorded = yaml.safe_load((split / "config.yaml").read_text())["model"]
        assert recorded["backbone_weights_sha256"] == file_sha256(tiny_backbone)
        assert recorded["backbone_weights"] == str(tiny_backbone.resolve())
    if variant == "agvm":  # measured at iterations 2 (before the stop at 4) and 5 (after)
        factors = [f for _, _, f in _losses(straight).values()]
        assert factors[:2] == [None, None] and len(set(factors[2:])) == 2, factors
        assert state["module_lr"]["multipliers"]["box_head"] != 1.0


def test_a_damaged_last_checkpoint_falls_back_to_the_previous_one(tmp_path):
    folder = tmp_path / "checkpoints"
    assert newest_checkpoint(folder) is None
    save_checkpoint(folder / "last.pt", {"model": {}, "iteration": 4})
    save_checkpoint(folder / "last.pt", {"model": {}, "iteration": 8})
    assert sorted(p.name for p in folder.iterdir()) == ["last.pt", "previous.pt"]
    state, path = newest_checkpoint(folder)
    assert (state["iteration"], path.name) == (8, "last.pt")
    last = folder / "last.pt"
    last.write_bytes(last.read_bytes()[:50])  # truncated after it was written
    state, path = newest_checkpoint(folder)
    assert (state["iteration"], path.name) == (4, "previous.pt")
    (folder / "previous.pt").write_bytes(b"garbage")
    with pytest.raises(MegdetError, match="no readable checkpoint to resume from"):
        newest_checkpoint(folder)


@pytest.mark.slow
def test_divergence_stops_every_process_with_one_line_and_keeps_the_good_checkpoint(
    tiny_shapes, tmp_path
):
    run = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "megdet", "train", "--config", "instant_test", "--nproc", "2",
         "--out", str(run), *instant_overrides(tiny_shapes), "train.checkpoint_period=2",
         "solver.base_lr=2", "solver.warmup_iters=10", "train.max_iter=40"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("megdet: error:")]
    assert len(errors) == 1 and "training diverged at iteration" in errors[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    diverged_at = int(errors[0].split("iteration ")[1].split(" ")[0])
    state = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert state["iteration"] < diverged_at
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def test_max_loss_stops_training(tiny_shapes, tmp_path):
    from megdet.engine.trainer import DivergenceError

    cfg = load_config("instant_test", [*instant_overrides(tiny_shapes), "train.max_loss=0.01"])
    with pytest.raises(DivergenceError, match=r"iteration 1 .*> train.max_loss 0.01"):
        train(cfg, DetectionTask(cfg), tmp_path, dist.init_distributed())
    assert not (tmp_path / "checkpoints").exists()
