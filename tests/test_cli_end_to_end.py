"""The user's path through the CLI: make data, train the instant preset, evaluate the run."""

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from megdet.launch import torchrun_args
from tests.conftest import instant_overrides, megdet


@pytest.mark.slow
def test_instant_train_then_eval_through_the_cli(cli, tmp_path, monkeypatch):
    """In this process (``cli``): a subprocess per command would spend most of the test
    importing torch; ``python -m megdet`` itself is run by the tests below."""
    data = tmp_path / "data"
    made = cli("data", "shapes", "--out", data, "--train", 16, "--val", 8, "--size", 64)
    assert made.returncode == 0, made.stderr
    run = tmp_path / "run"
    # Relative paths, from the data's folder: `eval --run` below runs from another one.
    relative = instant_overrides(Path("data"))
    monkeypatch.chdir(tmp_path)
    trained = cli("train", "--config", "instant_test", "--out", "run", *relative)
    monkeypatch.chdir(data / "train")
    assert trained.returncode == 0, trained.stderr[-3000:]
    assert "mmAP" in trained.stdout
    # What the run left and how long it took: the last lines a user reads.
    assert "\ntrained 240 steps in " in trained.stdout
    assert trained.stdout.rstrip().endswith(
        "run folder: run (config.yaml, plan.json, metrics.jsonl, eval/)\n"
        "checkpoint: run/checkpoints/last.pt\nplots:      megdet report run"
    )

    assert {p.name for p in run.iterdir()} >= {
        "config.yaml", "plan.json", "metrics.jsonl", "checkpoints", "eval"
    }  # fmt: skip
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    training = [r for r in records if "loss" in r]
    assert {"iter", "epoch", "lr", "loss", "loss_classifier", "grad_norm"} <= set(training[0])
    assert training[-1]["loss"] < training[0]["loss"]
    # MegDet Table 1 statistics: sampled positives/negatives per image in the RPN and RoI heads.
    for record in training:
        assert record["rpn_pos"] + record["rpn_neg"] == pytest.approx(256)
        assert record["roi_pos"] + record["roi_neg"] == pytest.approx(64)
        assert 0 < record["roi_pos"] <= 32 and 0 < record["rpn_pos"] <= 128
        assert record["roi_pos_per_batch"] == pytest.approx(8 * record["roi_pos"])
        assert record["rpn_pos_neg_ratio"] == pytest.approx(record["rpn_pos"] / record["rpn_neg"])
    final = records[-1]["eval"]
    # Overfitting 16 images: the instant preset's expected band.
    assert final["AP50"] > 0.5, final
    checkpoint = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert checkpoint["iteration"] == json.loads((run / "plan.json").read_text())["max_iter"]

    results = json.loads((run / "eval" / "results.json").read_text())
    assert {r["category_id"] for r in results} <= {1, 3, 7}  # the dataset's own ids
    evaluated = cli("eval", "--run", run, "--out", tmp_path / "eval2")
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    assert re.search(r"eval: (\d+)/\1 images\n", evaluated.stderr)  # progress, off a terminal
    assert "in percent; " in evaluated.stdout and "holds fractions" in evaluated.stdout
    again = json.loads((tmp_path / "eval2" / "metrics.json").read_text())
    assert again == pytest.approx(final)

    # predict: the checkpoint alone (it keeps the class names) finds what eval found.
    state = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert state["labels"] == {
        "names": ["rectangle", "ellipse", "triangle"],
        "category_ids": [1, 3, 7],
    }
    predicted = cli(
        "predict", "--weights", run / "checkpoints" / "last.pt", data / "train", "--out",
        tmp_path / "predicted", "--score", 0.3, "--batch", 8,
    )  # fmt: skip
    assert predicted.returncode == 0, predicted.stderr[-3000:]
    ids = {
        im["file_name"]: im["id"]
        for im in json.loads((data / "annotations" / "instances_train.json").read_text())["images"]
    }
    found = json.loads((tmp_path / "predicted" / "detections.json").read_text())
    assert min(r["score"] for r in found) >= 0.3
    assert len(list((tmp_path / "predicted" / "images").iterdir())) == 16

    # Every prediction is one of eval's detections, and every eval detection clear of the
    # threshold (its scores are rounded to 5 decimals, predict's to 4) is predicted.
    ours = [
        (ids[Path(r["file_name"]).name], r["category_id"], *r["bbox"], r["score"]) for r in found
    ]
    theirs = [(r["image_id"], r["category_id"], *r["bbox"], r["score"]) for r in results]

    def twin(record, pool):
        return any(
            other[:2] == record[:2] and np.allclose(other[2:], record[2:], rtol=0, atol=0.011)
            for other in pool
        )

    assert ours and all(twin(r, theirs) for r in ours)
    assert all(twin(r, ours) for r in theirs if r[-1] >= 0.3002)

    reported = cli("report", run)
    assert reported.returncode == 0, reported.stderr[-3000:]
    # One process measures no noise scale: no placeholder plot, and a line saying so.
    names = {"loss_lr.png", "mmap_per_epoch.png", "pos_neg_ratio.png", "table1.md"}
    assert {p.name for p in (run / "report").iterdir()} == names
    assert "| rpn |" in (run / "report" / "table1.md").read_text()

    refused = cli("train", "--config", "instant_test", "--out", run, *instant_overrides(data))
    assert refused.returncode == 2
    assert "--overwrite to replace it" in refused.stderr and "Traceback" not in refused.stderr


def test_missing_data_is_a_one_line_error(tmp_path):
    """The hint to generate the data only where the path is the demo presets' own set."""
    proc = megdet(
        "train", "--config", "instant_test", "--out", tmp_path / "r",
        f"data.train.json={tmp_path}/nope.json",
    )  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr.strip() == (
        f"megdet: error: data.train.json: {tmp_path}/nope.json not found; pass "
        "data.train.json=FILE and data.train.images=DIR"
    )
    proc = megdet("plan", "--config", "default", cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip() == (
        "megdet: error: data.train.json: data/shapes/annotations/instances_train.json not found "
        f"(relative to {tmp_path}); pass data.train.json=FILE and data.train.images=DIR, or, "
        "for the presets' demo data, run `make demo` in the repository first (it writes "
        "data/shapes) and run from there"
    )


@pytest.mark.slow
def test_nproc_launches_workers_through_torchrun(tiny_shapes, tmp_path):
    run = tmp_path / "run"
    # num_images is only for planning without the data: with the JSON here, both ignore it.
    overrides = [*instant_overrides(tiny_shapes), "train.max_iter=3", "data.train.num_images=999"]
    proc = megdet("train", "--config", "instant_test", "--nproc", 2, "--out", run, *overrides)
    assert proc.returncode == 0, proc.stderr[-3000:]
    plan = json.loads((run / "plan.json").read_text())
    assert (plan["world_size"], plan["images_per_device"], plan["max_iter"]) == (2, 4, 3)
    assert plan["num_train_images"] == 16
    planned = megdet("plan", "--config", "instant_test", *overrides, "--nproc", 2, "--json")
    assert planned.returncode == 0, planned.stderr[-3000:]
    hardware = plan.pop("hardware")  # what the run computed on, which only training knows
    assert hardware["device"] == "cpu" and hardware["threads"] >= 1
    assert json.loads(planned.stdout) == plan  # `megdet plan` shows what training does
    assert torch.load(run / "checkpoints" / "last.pt", weights_only=True)["iteration"] == 3
    # torchrun's parser used to take --run for its own --run-path ("ambiguous option").
    evaluated = megdet("eval", f"--run={run}", "--nproc", 2, "--out", tmp_path / "eval")
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    assert "mmAP" in evaluated.stdout and (tmp_path / "eval" / "metrics.json").is_file()
    # Issue 28: the 2-process run's noise scale and this machine's step time, projected (the
    # gloo bandwidth measured: no --bandwidth); the report draws it.
    projected = megdet("plan", "--from", run, "--devices", "2,4", "--images-per-device", "1,2")
    assert projected.returncode == 0, projected.stderr[-3000:]
    assert "| 4 | 2 | 8" in projected.stdout and "fastest batch" in projected.stdout
    document = json.loads((run / "projection.json").read_text())
    assert [(r["devices"], r["batch"]) for r in document["rows"]] == [
        (2, 2),
        (2, 4),
        (4, 4),
        (4, 8),
    ]
    assert document["step_time"]["bus_bandwidth"] > 0 and document["run_steps"] == 3
    assert document["step_time"]["threads"] == hardware["threads"]
    reported = megdet("report", run, "--out", tmp_path / "report")
    assert reported.returncode == 0, reported.stderr[-3000:]
    assert (tmp_path / "report" / "projection.png").stat().st_size > 10_000
    bad = megdet("train", "--config", "instant_test", "--nproc", 2, "model.norm=batch")
    assert bad.returncode == 2
    assert (
        bad.stderr.strip()
        == "megdet: error: model.norm: 'batch' is not one of frozen, bn, gn, cgbn"
    )


def test_worker_arguments_reach_megdet_unparsed_by_torchrun():
    worker = ["eval", "--run", "r", "--run=x", "--nnodes", "3", "--module", "--", "a=b"]
    args = torchrun_args(2, worker, max_restarts=1)
    assert (args.module, args.training_script, args.training_script_args) == (
        True,
        "megdet",
        worker,
    )
    assert (args.nproc_per_node, args.max_restarts, args.nnodes, args.run_path) == (
        "2",
        1,
        "1:1",
        False,
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--nproc", "2", "train.batch_size=7"], "train.batch_size: 7 images cannot be split"),
        (["--nproc", "0"], "--nproc: must be >= 1, got 0"),
        (["--nproc", "-2"], "--nproc: must be >= 1, got -2"),
        (["--max-restarts", "-1"], "--max-restarts: must be >= 0, got -1"),
        (["--bogus"], "unrecognized arguments: --bogus"),
    ],
)
def test_bad_launches_are_refused_before_any_worker_starts_or_folder_is_made(
    tmp_path, args, message
):
    run = tmp_path / "run"
    proc = megdet("train", "--config", "instant_test", "--out", run, *args)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and message in proc.stderr, proc.stderr
    assert not run.exists()
