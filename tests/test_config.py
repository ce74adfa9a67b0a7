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
        ("train.batch_size=0", "train.batch_size: must be > 0"),
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
