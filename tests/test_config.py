import subprocess
import sys

import pytest
import yaml

from megdet.config import (
    Config,
    config_from_dict,
    config_to_dict,
    dump_config,
    load_config,
    preset_names,
)
from megdet.errors import ConfigError


def test_presets_load_and_round_trip():
    assert {"default", "instant_test", "coco_r50_fpn"} <= set(preset_names())
    for name in preset_names():
        cfg = load_config(name)
        assert config_from_dict(yaml.safe_load(dump_config(cfg))) == cfg


def test_coco_preset_is_the_paper_detector():
    cfg = load_config("coco_r50_fpn")
    assert (cfg.model.backbone, cfg.model.min_size, cfg.model.max_size) == ("resnet50", 800, 1333)
    assert (cfg.train.batch_size, cfg.solver.base_lr, cfg.solver.policy) == (16, 0.02, "normal")


def test_overrides_are_parsed_and_typed():
    cfg = load_config(
        "default",
        [
            "train.batch_size=64",
            "solver.base_lr=1e-2",
            "solver.steps=[3, 5.5]",
            "model.anchor_sizes=[4,8,16,32,64]",
            "data.train.json=/data/x.json",
            "train.epochs=2",
        ],
    )
    assert cfg.train.batch_size == 64
    assert cfg.solver.base_lr == 0.01
    assert cfg.solver.steps == [3.0, 5.5]
    assert cfg.model.anchor_sizes == [4, 8, 16, 32, 64]
    assert cfg.data.train.json == "/data/x.json"
    assert isinstance(cfg.train.epochs, float) and cfg.train.epochs == 2.0


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("model.backbon=tiny", "model.backbon: unknown key"),
        ("nosuch.key=1", "nosuch: unknown key"),
        ("train.batch_size=abc", "train.batch_size: expected int"),
        ("train.batch_size=16.5", "train.batch_size: expected int"),
        ("train.batch_size=true", "train.batch_size: expected int"),
        ("solver.steps=3", "solver.steps: expected a list"),
        ("model.norm=batch", "model.norm: 'batch' is not one of"),
        ("model.backbone=vgg", "model.backbone: 'vgg' is not one of"),
        ("train.batch_size=0", "train.batch_size: must be >= 1, got 0"),
        ("model.anchor_sizes=[8,16]", "model.anchor_sizes: needs 5 sizes"),
        ("train.batch_size", "expected key=value"),
        ("solver.factors=[0.1,0.1]", "solver.factors: 2 factor(s) for 1 solver.steps"),
        ("train.eval_period=-1", "train.eval_period: must be >= 0"),
        ("solver.base_lr=nan", "solver.base_lr: must be a finite number, got nan"),
        ("solver.base_lr=inf", "solver.base_lr: must be a finite number, got inf"),
        ("solver.warmup_factor=-inf", "solver.warmup_factor: must be a finite number"),
        ("solver.steps=[5,nan]", "solver.steps: must be a finite number, got nan"),
        ("solver.steps=[5,2]", "solver.steps: must be positive and increasing, got [5.0, 2.0]"),
        ("solver.steps=[5,5]", "solver.steps: must be positive and increasing"),
        ("solver.steps=[-1]", "solver.steps: must be positive and increasing"),
    ],
)
def test_bad_values_are_one_line_errors(override, message):
    with pytest.raises(ConfigError) as info:
        load_config("default", [override])
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_unknown_preset_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="neither a preset"):
        load_config("no_such_preset")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(str(bad))


def test_yaml_file_config(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text(yaml.safe_dump({"train": {"epochs": 3}, "model": {"norm": "gn"}}))
    cfg = load_config(str(path))
    assert cfg.model.norm == "gn" and cfg.train.epochs == 3.0
    assert config_to_dict(cfg)["model"]["backbone"] == Config().model.backbone


def test_cli_reports_config_errors_in_one_line_with_exit_code_2():
    proc = subprocess.run(
        [sys.executable, "-m", "megdet", "plan", "--config", "default", "model.norm=batch"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "megdet: error: model.norm: 'batch' is not one of frozen, bn, gn, cgbn"
    ]


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("solver.momentum=2", "solver.momentum: must be in [0, 1), got 2"),
        ("model.roi_positive_fraction=1.5", "model.roi_positive_fraction: must be in (0, 1]"),
        ("solver.warmup_factor=5", "solver.warmup_factor: must be in (0, 1], got 5"),
        ("train.max_iter=0", "train.max_iter: must be >= 1, got 0"),
        ("solver.weight_decay=-1e-4", "solver.weight_decay: must be >= 0"),
        ("solver.factors=[0.1,2]", "solver.factors: must be in (0, 1], got 2"),
        ("model.anchor_sizes=[8,16,0,64,128]", "model.anchor_sizes: must be >= 1, got 0"),
        ("train.seed=-1", "train.seed: must be in [0, 4294967295], got -1"),
        ("data.num_workers=-1", "data.num_workers: must be >= 0, got -1"),
        ("model.box_score_thresh=1.5", "model.box_score_thresh: must be in [0, 1]"),
        ("train.images_per_device=0", "train.images_per_device: must be >= 1, got 0"),
    ],
)
def test_numbers_outside_their_meaning_are_refused(override, message):
    """Each used to be accepted (momentum 2 trained to a loss of 4e20; max_iter 0 wrote an
    untrained checkpoint)."""
    with pytest.raises(ConfigError) as info:
        load_config("default", [override])
    assert message in str(info.value)


def test_every_default_and_preset_lies_in_its_ranges():
    from megdet.config import _bounded_values, preset_names

    for cfg in [Config(), *(load_config(name) for name in preset_names())]:
        for key, value, interval in _bounded_values(cfg):
            assert value in interval, (key, value)
    # Every int and float field of the tree has its range.
    numeric = [f for f, hint in _leaf_fields(Config) if {int, float} & set(_types(hint))]
    assert len(numeric) > 30 and all("interval" in f.metadata for f in numeric)


def _leaf_fields(cls):
    import dataclasses
    import typing

    hints = typing.get_type_hints(cls)
    for item in dataclasses.fields(cls):
        hint = hints[item.name]
        if dataclasses.is_dataclass(hint):
            yield from _leaf_fields(hint)
        else:
            yield item, hint


def _types(hint):
    import typing

    args = typing.get_args(hint)
    return [t for a in args for t in _types(a)] if args else [hint]


def test_a_billion_laughs_config_is_refused_at_once(tmp_path):
    """Nine lines whose aliases expand to 9^9 values: refused before anything walks them."""
    import time

    lines = ["a: &a [1, 1, 1, 1, 1, 1, 1, 1, 1]"]
    for prev, name in zip("abcdefgh", "bcdefghi", strict=True):
        lines.append(f"{name}: &{name} [{', '.join([f'*{prev}'] * 9)}]")
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text("\n".join(lines) + "\n")
    begin = time.perf_counter()
    with pytest.raises(ConfigError, match="expand to more than 100,000 values"):
        load_config(str(bomb))
    with pytest.raises(ConfigError, match="expand to more than"):
        load_config("default", ["solver.steps={" + ", ".join(lines) + "}"])
    assert time.perf_counter() - begin < 5
    # A few aliases are fine.
    ok = tmp_path / "ok.yaml"
    ok.write_text("train: &t {epochs: 3}\n")
    assert load_config(str(ok)).train.epochs == 3.0
