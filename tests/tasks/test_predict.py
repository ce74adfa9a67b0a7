"""``megdet predict``: a checkpoint alone on people's own images (issue 17)."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch

from megdet.config import config_to_dict, load_config
from megdet.data.images import find_images, read_rgb
from megdet.tasks.detection.predict import (
    class_color,
    draw_detections,
    drawn_paths,
    load_detector,
)
from megdet.tasks.detection.task import DetectionTask
from tests.conftest import instant_overrides


@pytest.fixture(scope="module")
def checkpoint(tiny_shapes, tmp_path_factory) -> Path:
    """An untrained instant-preset detector as training saves it (config, labels)."""
    cfg = load_config("instant_test", instant_overrides(tiny_shapes))
    task = DetectionTask(cfg)
    torch.manual_seed(0)
    model = task.build_model()
    path = tmp_path_factory.mktemp("ckpt") / "last.pt"
    state = {"model": model.state_dict(), "config": config_to_dict(cfg), "iteration": 0}
    torch.save({**state, "labels": task.labels()}, path)
    return path


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    """What people's folders hold: RGB, grayscale and 16-bit PNGs, a JPEG photo whose EXIF
    says "rotate 90°", a text file, and a file named .jpg that is not an image."""
    root = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    (root / "sub").mkdir()
    PIL.Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(root / "a.png")
    PIL.Image.fromarray(rng.integers(0, 255, (64, 64), dtype=np.uint8)).save(root / "gray.png")
    deep = rng.integers(0, 65535, (64, 64), dtype=np.uint16)
    PIL.Image.fromarray(deep).save(root / "sub" / "deep.png")
    photo = PIL.Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8))
    exif = PIL.Image.Exif()
    exif[0x0112] = 6  # orientation: the camera was turned; viewers rotate 90° clockwise
    photo.save(root / "sub" / "photo.jpg", exif=exif)
    (root / "notes.txt").write_text("not an image")
    (root / "fake.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    return root


def test_inputs_are_files_folders_and_globs(photos, tmp_path):
    files, unmatched = find_images([str(photos)])
    names = [f.relative_to(photos).as_posix() for f in files]
    assert names == ["a.png", "fake.jpg", "gray.png", "sub/deep.png", "sub/photo.jpg"]
    files, _ = find_images([str(photos / "**" / "*.png"), str(photos / "a.png")])
    assert [f.name for f in files] == ["a.png", "gray.png", "deep.png"]  # each once
    bracket = tmp_path / "[1].png"
    PIL.Image.new("RGB", (8, 8)).save(bracket)
    assert find_images([str(bracket)]) == ([bracket], [])
    files, unmatched = find_images([str(tmp_path / "nothing*"), str(tmp_path / "none.png")])
    assert files == [] and len(unmatched) == 2 and "no such file" in unmatched[1]


def test_photos_are_read_upright_for_prediction_only(photos):
    path = photos / "sub" / "photo.jpg"
    assert read_rgb(path).shape == (3, 48, 64)  # training reads the stored pixels
    assert read_rgb(path, upright=True).shape == (3, 64, 48)
    stored = read_rgb(path).float()
    # Orientation 6: the upright picture is the stored one turned 90° clockwise.
    assert torch.equal(read_rgb(path, upright=True).float(), torch.rot90(stored, -1, (1, 2)))


def test_drawn_images_keep_their_folders_and_never_collide(tmp_path):
    files = [tmp_path / "x" / "a.png", tmp_path / "x" / "a.jpg", tmp_path / "x" / "y" / "b.png"]
    out = drawn_paths(files, tmp_path / "images")
    assert [p.relative_to(tmp_path / "images").as_posix() for p in out.values()] == [
        "a_png.jpg",
        "a_jpg.jpg",
        "y/b.jpg",
    ]


def test_small_images_are_drawn_enlarged_with_a_color_per_class():
    image = torch.zeros(3, 32, 48, dtype=torch.uint8)
    output = {
        "boxes": torch.tensor([[2.0, 2.0, 20.0, 20.0]]),
        "labels": torch.tensor([2]),
        "scores": torch.tensor([0.9]),
    }
    drawn = draw_detections(image, output, ["cat", "dog"])
    assert drawn.shape == (3, 352, 528)  # x11: the longer side reaches 512
    assert tuple(drawn[:, 200, 2 * 11 + 1].tolist()) == class_color(2)  # the box's left edge
    assert class_color(1) != class_color(2)


def test_predict_writes_detections_and_drawings(checkpoint, photos, tmp_path, cli):
    out = tmp_path / "out"
    done = cli("predict", "--weights", checkpoint, photos, "--out", out, "--score", "0.0")
    assert done.returncode == 0, done.stderr
    skipped = [line for line in done.stdout.splitlines() if line.startswith("skipped:")]
    assert len(skipped) == 1 and "fake.jpg: cannot read image" in skipped[0]
    records = json.loads((out / "detections.json").read_text())
    state = torch.load(checkpoint, weights_only=True)
    names, ids = state["labels"]["names"], state["labels"]["category_ids"]
    assert {r["category_id"] for r in records} <= set(ids)
    assert all(names[ids.index(r["category_id"])] == r["category_name"] for r in records)
    # Image ids are the inputs' places in sorted order; fake.jpg (2) is not among them.
    by_image = {r["image_id"]: Path(r["file_name"]).name for r in records}
    assert by_image == {1: "a.png", 3: "gray.png", 4: "deep.png", 5: "photo.jpg"}
    drawn = sorted(p.relative_to(out / "images").as_posix() for p in out.rglob("*.jpg"))
    assert drawn == ["a.jpg", "gray.jpg", "sub/deep.jpg", "sub/photo.jpg"]
    with PIL.Image.open(out / "images" / "sub" / "photo.jpg") as upright:
        assert upright.size == (384, 512)  # portrait, as the photo is seen
    # The numbers are the model's own on that image.
    cfg = load_config("instant_test", instant_overrides(Path("unused")))
    detector = load_detector(state, cfg, checkpoint, state["labels"], score=0.0)
    image = read_rgb(photos / "a.png").float() / 255
    with torch.no_grad():
        expected = detector([image])[0]
    mine = [r for r in records if r["image_id"] == 1]
    assert len(mine) == len(expected["boxes"]) > 0
    boxes = torch.tensor([r["bbox"] for r in mine])
    boxes[:, 2:] += boxes[:, :2]
    torch.testing.assert_close(boxes, expected["boxes"], atol=0.01, rtol=0)
    torch.testing.assert_close(
        torch.tensor([r["score"] for r in mine]), expected["scores"], atol=1e-4, rtol=0
    )


def test_predict_over_two_processes_gives_the_same_detections(checkpoint, photos, tmp_path, cli):
    single = tmp_path / "one"
    args = ["--score", "0.0", "--no-draw", "--batch", "2"]
    assert cli("predict", "--weights", checkpoint, photos, "--out", single, *args).returncode == 0
    double = tmp_path / "two"
    proc = subprocess.run(
        [sys.executable, "-m", "megdet", "predict", "--weights", checkpoint, photos, "--out",
         double, "--score", "0.0", "--nproc", "2", "--batch", "2"],
        capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.count("skipped:") == 1
    one = json.loads((single / "detections.json").read_text())
    two = json.loads((double / "detections.json").read_text())
    assert [(r["image_id"], r["category_id"]) for r in one] == [
        (r["image_id"], r["category_id"]) for r in two
    ]
    np.testing.assert_allclose(
        [r["bbox"] + [r["score"]] for r in one], [r["bbox"] + [r["score"]] for r in two], atol=0.02
    )
    assert len(list((double / "images").rglob("*.jpg"))) == 4


def test_bad_inputs_are_one_line(checkpoint, photos, tmp_path, cli):
    empty = tmp_path / "empty"
    empty.mkdir()
    state = torch.load(checkpoint, weights_only=True)
    other = tmp_path / "other.pt"
    labels = {"names": list("abcde"), "category_ids": [1, 2, 3, 4, 5]}
    torch.save({**state, "labels": labels}, other)  # weights for 3 classes, names for 5
    classifier = tmp_path / "classifier.pt"
    torch.save({**state, "config": config_to_dict(load_config("classify_demo"))}, classifier)
    for weights, inputs, message in [
        (checkpoint, empty, "no images to predict"),
        (checkpoint, photos / "missing.png", "missing.png: no such file or folder"),
        (tmp_path / "none.pt", photos, "checkpoint not found"),
        (other, photos, "weights do not fit this model"),
        (classifier, photos, "is a classification model"),
    ]:
        done = cli("predict", "--weights", weights, inputs, "--out", tmp_path / "o")
        assert done.returncode == 2 and message in done.stderr, done.stderr
        assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert not (tmp_path / "o").exists()


def test_a_checkpoint_without_names_falls_back_to_its_training_json(
    checkpoint, photos, tmp_path, cli
):
    state = torch.load(checkpoint, weights_only=True)
    old = tmp_path / "old.pt"
    torch.save({k: v for k, v in state.items() if k != "labels"}, old)
    args = ["predict", "--weights", old, photos / "a.png", "--score", "0"]
    assert cli(*args, "--out", tmp_path / "a").returncode == 0
    records = json.loads((tmp_path / "a" / "detections.json").read_text())
    assert {r["category_name"] for r in records} <= set(state["labels"]["names"])
    gone = cli(*args, "--out", tmp_path / "b", "data.train.json=/nowhere.json")
    assert gone.returncode == 2
    assert "keeps no class names" in gone.stderr and "/nowhere.json" in gone.stderr
