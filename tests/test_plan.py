import pytest
import torch

from megdet.config import load_config
from megdet.errors import ConfigError
from megdet.plan import BNGroups, make_plan, precision_note


def _groups(bn_size, batch=64, world=8):
    overrides = ["model.norm=cgbn", f"train.batch_size={batch}"]
    if bn_size is not None:
        overrides.append(f"model.bn_size={bn_size}")
    return make_plan(load_config("coco_r50_fpn", overrides), world, 1000).bn_groups


def test_bn_size_becomes_process_groups_or_image_chunks():
    assert _groups(None) == BNGroups(64, 8, None)  # all processes
    assert _groups(32) == BNGroups(32, 4, None)  # the paper's best: 4 devices x 8 images
    assert _groups(32).groups(8) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert _groups(8) == BNGroups(8, 1, 8)  # one device's images
    assert _groups(2) == BNGroups(2, 1, 2)  # chunks inside a device
    assert make_plan(load_config("coco_r50_fpn"), 8, 1000).bn_groups is None


@pytest.mark.parametrize(
    ("bn_size", "message"),
    [(3, "does not divide the 8 images per process"), (24, "do not fit 8 processes x 8")],
)
def test_bn_size_that_does_not_fit_is_a_one_line_error(bn_size, message):
    with pytest.raises(ConfigError, match=message):
        _groups(bn_size)


def test_plan_says_when_train_max_iter_cuts_the_run():
    cfg = load_config("instant_test", ["train.max_iter=20"])
    assert "2 iterations/epoch x 120 epochs = 240 iterations, cut to 20 by train.max_iter" in (
        make_plan(cfg, 1, 16).summary()
    )
    assert "= 240 iterations; decay" in make_plan(load_config("instant_test"), 1, 16).summary()


def test_plan_reports_bn_groups():
    plan = make_plan(load_config("coco_r50_fpn", ["model.norm=cgbn", "model.bn_size=32",
                                                  "train.batch_size=64"]), 8, 1000)  # fmt: skip
    assert "CGBN over 32 images (4 process(es) per group)" in plan.summary()
    assert plan.to_dict()["bn_groups"] == {
        "images_per_group": 32, "ranks_per_group": 4, "local_group_size": None
    }  # fmt: skip


@pytest.mark.parametrize("batch", [32, 64, 128, 256])
def test_paper_presets_scale_lr_and_keep_bn_size_32(batch):
    cfg = load_config(f"coco_r50_fpn_bs{batch}")
    plan = make_plan(cfg, world_size=batch // 2, num_train_images=117266)
    assert plan.lr == pytest.approx(0.02 * batch / 16)
    assert plan.warmup_start_lr == pytest.approx(0.02)
    assert plan.bn_groups == BNGroups(32, 16, None)
    assert plan.max_iter == 11 * -(-117266 // batch)
    base = make_plan(load_config("coco_r50_fpn_16base"), 8, 117266)
    assert base.bn_groups is None and base.lr == pytest.approx(0.02)


def test_plan_command_works_without_the_data_and_prints_lr_at():
    import json
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-m", "megdet", "plan", "--config", "coco_r50_fpn_bs256",
         "data.train.num_images=117266", "--nproc", "128", "--json", "--lr-at", "0,250,4000"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    plan = json.loads(proc.stdout)
    assert (plan["world_size"], plan["images_per_device"], plan["iters_per_epoch"]) == (128, 2, 459)
    assert plan["warmup_iters"] == 459  # one epoch
    warm = 0.02 + (0.32 - 0.02) * 250 / 459
    assert plan["lr_at"] == pytest.approx({"0": 0.02, "250": warm, "4000": 0.032})


def _estimate():
    from megdet.plan import MemoryEstimate

    # 1 GB of weights/gradients/momentum; 1 GB per image without checkpointing, 0.4 GB with.
    per_image = {"none": 1024.0, "stages": 400.0}
    return MemoryEstimate((800, 1067), 1024.0, {"none": 0.0, "stages": 0.0}, per_image)


def test_images_per_device_sets_the_batch_and_auto_fills_the_memory_budget():
    fixed = make_plan(load_config("coco_r50_fpn", ["train.images_per_device=4"]), 8, 1000)
    assert (fixed.global_batch, fixed.lr) == (32, pytest.approx(0.04))
    auto = [
        "train.images_per_device=auto",
        "train.memory_budget_gb=9",
        "train.checkpointing=stages",
    ]
    plan = make_plan(load_config("coco_r50_fpn", auto), 8, 1000, _estimate())
    # (9 GB - 1 GB) / 400 MB = 20.5: 20 images with checkpointing; 8 without.
    assert plan.images_per_device == 20 and plan.global_batch == 160
    assert plan.memory["images_that_fit"] == {"none": 8, "stages": 20}
    assert "20 images fit 9 GB with checkpointing=stages (8 without)" in plan.summary()
    # BN groups of 32 images cannot be made of 20 per process: the most that can is 16.
    grouped = load_config("coco_r50_fpn", [*auto, "model.norm=cgbn", "model.bn_size=32"])
    assert make_plan(grouped, 8, 1000, _estimate()).images_per_device == 16
    with pytest.raises(ConfigError, match="needs a memory estimate"):
        make_plan(load_config("coco_r50_fpn", auto), 8, 1000)
    small = load_config("coco_r50_fpn", [*auto, "train.memory_budget_gb=1.2"])
    with pytest.raises(ConfigError, match="does not hold one image"):
        make_plan(small, 8, 1000, _estimate())
    with pytest.raises(ConfigError, match="expected a positive number or auto, got 'many'"):
        load_config("coco_r50_fpn", ["train.images_per_device=many"])


def test_measured_memory_shrinks_with_checkpointing_and_grows_with_images():
    from megdet.tasks.detection.memory import estimate_memory

    cfg = load_config("default", ["model.min_size=256", "model.max_size=256"])
    estimate = estimate_memory(cfg, num_classes=3)
    none = estimate.per_image_mb["none"]
    # A 256 px image through the tiny backbone keeps several MB of activations.
    assert 2 < none < 100 and estimate.image_size == (256, 256)
    for mode in ("stages", "blocks", "stages+fpn"):
        assert estimate.per_image_mb[mode] < none, mode
    assert estimate.total_mb("none", 4) > estimate.total_mb("none", 2)


def test_plan_says_where_mixed_precision_is_slower_than_float32(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert precision_note("none", set()) is None
    assert precision_note("bf16", {"avx2", "amx_bf16", "amx_tile"}) is None
    assert "train.amp=bf16 on this CPU (no AMX)" in precision_note("bf16", {"avx2", "avx512_bf16"})
    assert "train.amp=fp16" in precision_note("fp16", {"amx_bf16"})
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert precision_note("fp16", set()) is None  # on a GPU: what AMP is for
