import hashlib
import json
from collections import Counter

import pytest
from PIL import Image
from pycocotools.coco import COCO

from megdet.data.shapes import CLASSES, generate_shapes


def _digest(root):
    files = sorted(p for p in root.rglob("*") if p.is_file())
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def test_same_seed_gives_byte_identical_files(tmp_path):
    generate_shapes(tmp_path / "a", 6, 3, size=64, seed=3)
    generate_shapes(tmp_path / "b", 6, 3, size=64, seed=3)
    generate_shapes(tmp_path / "c", 6, 3, size=64, seed=4)
    a, b, c = _digest(tmp_path / "a"), _digest(tmp_path / "b"), _digest(tmp_path / "c")
    assert a == b
    assert len(a) == 6 + 3 + 2
    assert a["train/train_000001.png"] != c["train/train_000001.png"]


@pytest.mark.parametrize("height, width", [(96, 96), (64, 112)])
def test_annotations_are_valid_coco_with_boxes_inside_images(tmp_path, height, width):
    generate_shapes(tmp_path, 40, 10, size=height, seed=0, width=width)
    for split, count in (("train", 40), ("val", 10)):
        path = tmp_path / "annotations" / f"instances_{split}.json"
        coco = COCO(str(path))
        assert len(coco.getImgIds()) == count
        assert len(coco.getCatIds()) == len(CLASSES) >= 3
        per_image = Counter(a["image_id"] for a in coco.dataset["annotations"])
        assert set(per_image) == set(coco.getImgIds())  # every image has objects
        assert min(per_image.values()) >= 1 and max(per_image.values()) <= 8
        for ann in coco.dataset["annotations"]:
            x, y, w, h = ann["bbox"]
            assert w > 0 and h > 0 and x >= 0 and y >= 0
            assert x + w <= width + 1e-6 and y + h <= height + 1e-6
            assert 0 < ann["area"] <= w * h + 0.01 * (w + h)  # bbox values are rounded
        for info in coco.dataset["images"]:
            with Image.open(tmp_path / split / info["file_name"]) as image:
                assert image.size == (info["width"], info["height"]) == (width, height)
                assert image.mode == "RGB"


def test_data_is_varied(tmp_path):
    generate_shapes(tmp_path, 60, 0, size=128, seed=1)
    data = json.loads((tmp_path / "annotations" / "instances_train.json").read_text())
    sides = [max(a["bbox"][2], a["bbox"][3]) for a in data["annotations"]]
    assert min(sides) < 20 and max(sides) > 60  # varied scale
    classes = Counter(a["category_id"] for a in data["annotations"])
    assert len(classes) == 3 and min(classes.values()) > 0.2 * len(data["annotations"]) / 3
    overlapping = 0
    by_image = {}
    for a in data["annotations"]:
        by_image.setdefault(a["image_id"], []).append(a["bbox"])
    for boxes in by_image.values():
        for i, (x0, y0, w0, h0) in enumerate(boxes):
            for x1, y1, w1, h1 in boxes[i + 1 :]:
                if min(x0 + w0, x1 + w1) > max(x0, x1) and min(y0 + h0, y1 + h1) > max(y0, y1):
                    overlapping += 1
    assert overlapping > 10
