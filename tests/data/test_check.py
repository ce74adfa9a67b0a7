"""`megdet data check`: every problem of a broken dataset at once, one line each, exit code 2;
odd image formats converted, not refused."""

import json

import numpy as np
import PIL.Image
import pytest
import torch

from megdet.cli import main
from megdet.data.check import check_dataset
from megdet.data.coco import CocoDetection, read_coco
from megdet.errors import DataError


def _dataset(root, annotations, images=None):
    (root / "img").mkdir(parents=True)
    images = images or [
        {"id": 1, "file_name": "a.png", "width": 20, "height": 10},
        {"id": 2, "file_name": "b.png", "width": 20, "height": 10},
    ]
    for image in images:
        PIL.Image.new("RGB", (20, 10), (10, 20, 30)).save(root / "img" / image["file_name"])
    coco = {"images": images, "annotations": annotations,
            "categories": [{"id": 5, "name": "thing"}]}  # fmt: skip
    (root / "coco.json").write_text(json.dumps(coco))
    return root / "coco.json", root / "img"


def _ann(i, image_id=1, bbox=(1, 1, 5, 5), category_id=5):
    return {"id": i, "image_id": image_id, "category_id": category_id, "bbox": list(bbox)}


def test_every_problem_is_reported_at_once(tmp_path, capsys):
    annotations = [
        _ann(1),  # fine
        _ann(2, image_id=7),  # unknown image
        _ann(3, category_id=9),  # unknown category
        {"id": 4, "image_id": 1, "category_id": 5},  # no bbox
        _ann(5, bbox=(1, 1, 0, 4)),  # zero width: dropped
        _ann(6, bbox=(1, 1, -3, 4)),  # negative width: dropped
        _ann(7, bbox=(50, 50, 5, 5)),  # outside the 20x10 image: dropped
        _ann(8, bbox=(15, 5, 50, 50)),  # partly outside: clipped, kept
    ]
    path, images = _dataset(tmp_path, annotations)
    (images / "b.png").write_bytes(b"not a png")  # corrupt
    coco = json.loads(path.read_text())
    coco["images"].append({"id": 3, "file_name": "gone.png", "width": 20, "height": 10})
    path.write_text(json.dumps(coco))
    code = main(["data", "check", "--json", str(path), "--images", str(images)])
    out = capsys.readouterr().out.splitlines()
    assert code == 2
    errors = [line for line in out if line.startswith("error: ")]
    assert any("annotations[1] (id 2): names unknown image_id 7" in e for e in errors)
    assert any("annotations[2] (id 3): names unknown category_id 9" in e for e in errors)
    assert any("annotations[3] (id 4): missing key 'bbox'" in e for e in errors)
    assert any("b.png: cannot read image" in e for e in errors)
    assert any("gone.png: image file not found" in e for e in errors)
    assert len(errors) == 5
    assert sum(line.startswith("dropped: ") for line in out) == 3
    assert "2 image(s) without annotations (kept)" in out[-1]  # b.png and gone.png have none

    # Training reads the same file: one line naming the first problem and how many more.
    with pytest.raises(DataError, match=r"unknown image_id 7 \(and 2 more; `megdet data check"):
        read_coco(path)


def test_boxes_without_area_are_dropped_or_errors_under_strict(tmp_path, capsys):
    path, images = _dataset(tmp_path, [_ann(1), _ann(2, bbox=(1, 1, 0, 4))])
    index = read_coco(path)
    assert [len(index.boxes[i]) for i in (1, 2)] == [1, 0]  # image 2 kept without boxes
    with pytest.raises(DataError, match=r"annotations\[1\] \(id 2\): bbox has width 0"):
        read_coco(path, strict=True)
    assert main(["data", "check", "--json", str(path), "--images", str(images)]) == 0
    assert main(["data", "check", "--json", str(path), "--strict"]) == 2
    assert "error: " in capsys.readouterr().out


def test_missing_keys_and_malformed_json_name_the_field(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"images": [{"id": 1, "file_name": "a.png", "width": 4}], '
                   '"annotations": [], "categories": []}')  # fmt: skip
    report = check_dataset(bad, None)
    assert report.errors == [f"{bad}: images[0]: missing key 'height'"]
    bad.write_text('{"images": [')
    assert "not valid JSON" in check_dataset(bad, None).errors[0]


def test_grayscale_rgba_palette_and_16_bit_images_load_as_8_bit_rgb(tmp_path):
    names = {"gray.png": "L", "rgba.png": "RGBA", "pal.png": "P", "deep.png": "I;16"}
    images = [{"id": i, "file_name": n, "width": 4, "height": 2} for i, n in enumerate(names, 1)]
    path, folder = _dataset(tmp_path, [_ann(i, image_id=i, bbox=(0, 0, 2, 1)) for i in (1, 2)],
                            images)  # fmt: skip
    PIL.Image.new("L", (4, 2), 128).save(folder / "gray.png")
    PIL.Image.new("RGBA", (4, 2), (255, 0, 0, 10)).save(folder / "rgba.png")
    PIL.Image.new("RGB", (4, 2), (0, 0, 255)).convert("P").save(folder / "pal.png")
    PIL.Image.fromarray(np.full((2, 4), 65535 // 2, dtype=np.uint16)).save(folder / "deep.png")
    report = check_dataset(path, folder)
    assert report.errors == [] and report.converted_images == 4
    dataset = CocoDetection(read_coco(path), folder)
    pixels = [dataset[i][0][:, 0, 0] for i in range(4)]
    assert all(p.shape == (3,) for p in pixels)
    assert torch.allclose(pixels[0], torch.full((3,), 128 / 255))
    assert torch.allclose(pixels[1], torch.tensor([1.0, 0.0, 0.0]))
    assert torch.allclose(pixels[2], torch.tensor([0.0, 0.0, 1.0]))
    # 32767 of 65535 is 127 of 255: scaled, where a plain conversion would clip it to 255.
    assert torch.allclose(pixels[3], torch.full((3,), 127 / 255))
