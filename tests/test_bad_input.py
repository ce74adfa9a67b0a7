"""Bad input as a user produces it (issue 24): one line, exit code 2, no traceback, nothing
already written lost; and the inputs that used to be taken silently."""

import errno
import json
import os
import shutil
from pathlib import Path

import numpy as np
import PIL.Image
import pytest

from megdet.data.check import CheckReport, check_structure
from megdet.data.images import find_images
from megdet.errors import MegdetError
from tests.conftest import instant_overrides, one_line_error


def _no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.mark.parametrize(
    "override",
    ["solver.momentum=2", "model.roi_positive_fraction=1.5", "solver.warmup_factor=5",
     "train.max_iter=0"],
)  # fmt: skip
def test_plan_refuses_what_train_refuses(cli, tiny_shapes, tmp_path, override):
    common = ["--config", "instant_test", *instant_overrides(tiny_shapes), override]
    planned = cli("plan", *common)
    trained = cli("train", *common, "--out", tmp_path / "run")
    one_line_error(planned, override.split("=")[0])
    assert planned.stderr.splitlines()[-1] == trained.stderr.splitlines()[-1]
    assert not (tmp_path / "run").exists()


def test_an_empty_training_set_is_refused_by_plan_and_train(cli, tmp_path):
    from megdet.data.shapes import generate_shapes

    generate_shapes(tmp_path / "empty", 0, 2, size=64)
    common = ["--config", "instant_test", *instant_overrides(tmp_path / "empty", "val")]
    for result in (cli("plan", *common), cli("train", *common, "--out", tmp_path / "run")):
        one_line_error(result, "the training set has no images")


@pytest.mark.parametrize("name", ["../outside.png", "/etc/passwd", "a/../../b.png"])
def test_a_file_name_that_leaves_the_images_folder_is_refused(name):
    coco = {
        "images": [{"id": 1, "file_name": name, "width": 4, "height": 4}],
        "annotations": [],
        "categories": [{"id": 1, "name": "x"}],
    }
    report = CheckReport(Path("a.json"))
    check_structure(coco, report)
    assert report.errors == [
        f"a.json: images[0]: file_name '{name}' leaves the images folder (absolute, or through "
        "'..'); file_names are relative to it"
    ]
    coco["images"][0]["file_name"] = "sub/../fine.png"
    report = CheckReport(Path("a.json"))
    check_structure(coco, report)
    assert report.errors == []


def _yolo(tmp_path: Path, lines: list[str]) -> tuple[Path, Path, Path]:
    images, labels = tmp_path / "images", tmp_path / "labels"
    images.mkdir()
    labels.mkdir()
    for index, line in enumerate(lines):
        PIL.Image.fromarray(np.zeros((100, 200, 3), np.uint8)).save(images / f"{index}.png")
        (labels / f"{index}.txt").write_text(line + "\n")
    names = tmp_path / "data.yaml"
    names.write_text("names: [box]\n")
    return images, labels, names


def test_yolo_labels_in_pixels_are_an_error_that_says_so(cli, tmp_path):
    """They used to give a file of 0 boxes, exit code 0 and one note."""
    images, labels, names = _yolo(tmp_path, ["0 100 50 40 20", "0 60 30 10 10", "0 .5 .5 .1 .1"])
    out = tmp_path / "train.json"
    result = cli("data", "convert", "--from", "yolo", "--images", images, "--labels", labels,
                 "--names", names, "--out", out)  # fmt: skip
    assert result.returncode == 2 and not out.exists()
    assert (
        f"error: {labels}: 2 of 3 label lines have coordinates above 1 (largest 120); YOLO "
        "labels are fractions of the image size (0 to 1), these look like pixels"
    ) in result.stdout
    # Normalized labels with one box a little over the edge: converted.
    good = tmp_path / "good"
    good.mkdir()
    images, labels, names = _yolo(good, ["0 0.5 0.5 0.2 0.2", "0 0.99 0.5 0.1 0.1"])
    result = cli("data", "convert", "--from", "yolo", "--images", images, "--labels", labels,
                 "--names", names, "--out", out)  # fmt: skip
    assert result.returncode == 0, result.stdout
    assert len(json.loads(out.read_text())["annotations"]) == 2


def test_a_conversion_that_finds_no_images_writes_nothing(cli, tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "labels").mkdir()
    (tmp_path / "data.yaml").write_text("names: [a]\n")
    out = tmp_path / "t.json"
    folders = ["--images", tmp_path / "images", "--labels", tmp_path / "labels"]
    result = cli("data", "convert", "--from", "yolo", *folders, "--names", tmp_path / "data.yaml",
                 "--out", out)  # fmt: skip
    assert result.returncode == 2 and "no images found to convert" in result.stdout
    assert not out.exists()


def test_a_full_disk_is_one_line_and_keeps_the_previous_file(cli, tmp_path, monkeypatch):
    """Through the one writer every command uses (``atomic_write``): the file named, the
    errno's text and name, no temporary file left, the previous file whole."""
    from megdet.engine.checkpoint import save_checkpoint

    path = tmp_path / "checkpoints" / "last.pt"
    save_checkpoint(path, {"model": {}, "iteration": 1})
    before = path.read_bytes()
    monkeypatch.setattr(os, "fsync", _no_space)
    with pytest.raises(MegdetError) as info:
        save_checkpoint(path, {"model": {}, "iteration": 2})
    assert str(info.value) == (
        f"{path}: cannot write (No space left on device, ENOSPC); the previous file is unchanged"
    )
    assert path.read_bytes() == before
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.pt"]

    images, labels, names = _yolo(tmp_path, ["0 0.5 0.5 0.2 0.2"])
    out = tmp_path / "t.json"
    result = cli("data", "convert", "--from", "yolo", "--images", images, "--labels", labels,
                 "--names", names, "--out", out)  # fmt: skip
    one_line_error(result, f"{out}: cannot write (No space left on device, ENOSPC)")
    assert not out.exists() and not list(tmp_path.glob(".t.json*"))


def test_an_interrupted_shapes_set_leaves_nothing_and_an_existing_one_is_kept(
    cli, tmp_path, monkeypatch
):
    import megdet.data.shapes as shapes

    out = tmp_path / "set"
    assert (
        cli("data", "shapes", "--out", out, "--train", 6, "--val", 2, "--size", 32).returncode == 0
    )
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    refused = cli("data", "shapes", "--out", out, "--train", 3, "--val", 1, "--size", 32)
    one_line_error(refused, f"--out {out}: holds a dataset already (train, val, annotations)")

    drawn = []
    real = shapes._draw_image

    def interrupted(*args):
        if len(drawn) == 2:
            raise KeyboardInterrupt
        drawn.append(1)
        return real(*args)

    monkeypatch.setattr(shapes, "_draw_image", interrupted)
    with pytest.raises(KeyboardInterrupt):
        shapes.generate_shapes(out, 3, 1, size=32, overwrite=True)
    with pytest.raises(KeyboardInterrupt):
        drawn.clear()
        shapes.generate_shapes(tmp_path / "new", 3, 1, size=32)
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["set"]  # no partial folder

    monkeypatch.setattr(shapes, "_draw_image", real)
    replaced = cli("data", "shapes", "--out", out, "--train", 3, "--val", 1, "--size", 32,
                   "--overwrite")  # fmt: skip
    assert replaced.returncode == 0
    assert len(list((out / "train").iterdir())) == 3  # no stale images of the 6
    assert sorted(p.name for p in out.iterdir()) == ["annotations", "train", "val"]


def test_predict_takes_each_file_once_and_not_its_own_drawings(tmp_path, monkeypatch):
    photos = tmp_path / "photos"
    (photos / "predicted" / "images").mkdir(parents=True)
    PIL.Image.new("RGB", (8, 8)).save(photos / "a.png")
    PIL.Image.new("RGB", (8, 8)).save(photos / "predicted" / "images" / "a.jpg")
    monkeypatch.chdir(tmp_path)
    files, unmatched = find_images(["photos", str(photos / "a.png"), "photos/a.png"],
                                   exclude=photos / "predicted")  # fmt: skip
    assert files == [Path("photos/a.png")] and unmatched == []


@pytest.mark.parametrize("command", ["eval", "predict"])
def test_run_and_weights_together_are_refused(cli, tmp_path, command):
    PIL.Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    extra = [tmp_path / "a.png", "--out", tmp_path / "out"] if command == "predict" else []
    result = cli(command, "--run", tmp_path / "r", "--weights", tmp_path / "w.pt", *extra)
    one_line_error(result, f"{command}: give --run RUN_DIR (its checkpoints/last.pt) or --weights")


def _a_file(tmp_path: Path) -> Path:
    file = tmp_path / "notes.txt"
    file.write_text("mine")
    return file


@pytest.mark.parametrize(
    "command",
    [
        ["data", "shapes", "--train", "1", "--val", "1", "--out"],
        ["data", "patterns", "--train", "2", "--val", "2", "--out"],
        ["report", "RUN", "--out"],
        ["predict", "--weights", "w.pt", "IMAGES", "--out"],
    ],
)
def test_an_output_folder_that_is_a_file_or_under_one_isone_line_error(cli, tmp_path, command):
    file = _a_file(tmp_path)
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"iter": 1, "epoch": 1, "lr": 0.1, "loss": 1.0}\n')
    command = [str(run) if c in ("RUN", "IMAGES") else c for c in command]
    for out, says in ((file, "is a file"), (file / "sub", f"is under the file {file}")):
        one_line_error(cli(*command, out), f"{out}: {says}")
    assert file.read_text() == "mine"


def test_a_convert_output_that_is_a_folder_or_under_a_file_isone_line_error(cli, tmp_path):
    file = _a_file(tmp_path)
    images, labels, names = _yolo(tmp_path, ["0 0.5 0.5 0.2 0.2"])
    common = ["data", "convert", "--from", "yolo", "--images", images, "--labels", labels,
              "--names", names, "--overwrite", "--out"]  # fmt: skip
    one_line_error(cli(*common, tmp_path), f"--out {tmp_path}: is a folder; name a file")
    one_line_error(cli(*common, file / "t.json"), f"is under the file {file}")
    assert file.read_text() == "mine"


@pytest.mark.parametrize(
    ("metrics", "plan", "says"),
    [
        ('{"iter": 1, "epoch": 1, "lr": 0.1}\n', None, "metrics.jsonl:1: no 'loss'"),
        ('[1, 2]\n{"iter": 1}\n', None, "metrics.jsonl:1: a line must be a JSON object"),
        ('{"iter": 1, "epoch": 1, "lr": "high", "loss": 1}\n', None, "'lr' must be a number"),
        ('{"iter": 1, "epoch": 1, "eval": {"mmAP": null}}\n', None, "'mmAP' must be a number"),
        ('{"iter": 1, "epoch": 1, "lr": 0.1, "loss": 1}\n', "[1, 2]", "plan.json: not a megdet"),
        ('{"iter": 1, "epoch": 1, "lr": 0.1, "loss": 1}\n', "{oops", "plan.json: not readable"),
    ],
)
def test_report_reads_what_it_is_given_or_says_in_one_line_why_not(
    cli, tmp_path, metrics, plan, says
):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text(metrics)
    if plan is not None:
        (run / "plan.json").write_text(plan)
    one_line_error(cli("report", run), says)
    assert not (run / "report").exists() or not list((run / "report").iterdir())


def test_an_unreadable_file_is_one_line_naming_it(cli, tmp_path, monkeypatch):
    """The last resort for any read or write the commands do not check themselves: an OSError
    that names its file."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"iter": 1, "epoch": 1, "lr": 0.1, "loss": 1}\n')

    def denied(self, *args, **kwargs):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(self))

    monkeypatch.setattr(Path, "read_text", denied)
    one_line_error(
        cli("report", run), f"{run / 'metrics.jsonl'}: cannot use (Permission denied, EACCES)"
    )


def test_a_missing_val_image_stops_eval_before_the_model_runs(cli, tiny_shapes, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(tiny_shapes, data)
    next((data / "val").iterdir()).unlink()
    from megdet.config import config_to_dict, load_config

    cfg = load_config("instant_test", instant_overrides(data, "val"))
    weights = tmp_path / "w.pt"
    import torch

    torch.save({"model": {}, "config": config_to_dict(cfg)}, weights)
    one_line_error(cli("eval", "--weights", weights), "image file not found")


def test_files_that_are_not_text_are_one_line(cli, tmp_path):
    binary = tmp_path / "weights.yaml"
    binary.write_bytes(b"\x80\x81\xfe\xff" * 8)
    one_line_error(cli("plan", "--config", binary), f"{binary}: not a text file")
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_bytes(b"\x80\x81\n" + b'{"iter": 1}\n')
    one_line_error(cli("report", run), "metrics.jsonl:1: not a JSON line")
    images, labels, _ = _yolo(tmp_path, ["0 0.5 0.5 0.2 0.2"])
    one_line_error(
        cli("data", "convert", "--from", "yolo", "--images", images, "--labels", labels,
            "--names", binary, "--out", tmp_path / "t.json"),
        f"{binary}: not a text file",
    )  # fmt: skip
