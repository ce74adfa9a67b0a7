import json

import PIL.Image
import pytest
import torch

from megdet.data.coco import CocoDetection, read_coco
from megdet.errors import DataError


def test_reads_real_coco128(coco128):
    index = read_coco(coco128 / "annotations" / "instances_train2017.json")
    raw = json.loads((coco128 / "annotations" / "instances_train2017.json").read_text())
    assert len(index.images) == 128
    assert index.num_classes == 80
    assert index.category_ids == sorted(c["id"] for c in raw["categories"])
    assert index.category_ids[-1] == 90  # non-contiguous ids map to labels 1..80
    kept = sum(len(v) for v in index.boxes.values())
    crowd = sum(a["iscrowd"] for a in raw["annotations"])
    assert crowd == 10 and kept == len(raw["annotations"]) - crowd
    labels = {label for boxes in index.boxes.values() for _, label in boxes}
    assert min(labels) >= 1 and max(labels) <= 80
    dataset = CocoDetection(index, coco128 / "images" / "train2017")
    image, target = dataset[0]
    info = index.images[0]
    assert image.shape == (3, info["height"], info["width"]) and image.dtype == torch.float32
    assert image.min() >= 0.0 and image.max() <= 1.0
    assert target["image_id"] == info["id"]
    first = [a for a in raw["annotations"] if a["image_id"] == info["id"] and not a["iscrowd"]]
    x, y, w, h = first[0]["bbox"]
    assert target["boxes"][0].tolist() == pytest.approx([x, y, x + w, y + h], abs=1e-4)
    label = target["labels"][0].item()
    assert index.category_ids[label - 1] == first[0]["category_id"]


def test_flip_is_seeded_per_image_and_epoch(tiny_shapes):
    index = read_coco(tiny_shapes / "annotations" / "instances_train.json")
    plain = CocoDetection(index, tiny_shapes / "train")
    flipping = CocoDetection(index, tiny_shapes / "train", seed=0, hflip=True)
    flipped_any = False
    for i in range(len(plain)):
        image, target = plain[(0, i)]
        a_image, a_target = flipping[(3, i)]
        b_image, _ = flipping[(3, i)]
        assert torch.equal(a_image, b_image)  # same (seed, epoch, index): same draw
        if not torch.equal(a_image, image):
            flipped_any = True
            assert torch.equal(a_image, image.flip(-1))
            width = image.shape[-1]
            expected = target["boxes"][:, [2, 1, 0, 3]] * torch.tensor(
                [-1, 1, -1, 1]
            ) + torch.tensor([width, 0, width, 0])
            assert torch.allclose(a_target["boxes"], expected)
    assert flipped_any


def test_bad_annotation_files_are_clear_errors(tmp_path, tiny_shapes):
    with pytest.raises(DataError, match="annotation file not found"):
        read_coco(tmp_path / "missing.json")
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(DataError, match="broken.json: not valid JSON"):
        read_coco(broken)
    no_images = tmp_path / "no_images.json"
    no_images.write_text(json.dumps({"annotations": [], "categories": []}))
    with pytest.raises(DataError, match="missing list 'images'"):
        read_coco(no_images)
    data = json.loads((tiny_shapes / "annotations" / "instances_train.json").read_text())
    data["annotations"][0]["category_id"] = 999
    wrong = tmp_path / "wrong.json"
    wrong.write_text(json.dumps(data))
    with pytest.raises(DataError, match="unknown category_id 999"):
        read_coco(wrong)


def test_a_decompression_bomb_is_a_one_line_data_error(tiny_shapes, monkeypatch):
    """PIL refuses images of more than 2 x MAX_IMAGE_PIXELS (a 20000 x 20000 PNG) with an
    error that is not an OSError; lowered here so that a 64 px image is one."""
    monkeypatch.setattr(PIL.Image, "MAX_IMAGE_PIXELS", 64 * 64 // 3)
    index = read_coco(tiny_shapes / "annotations" / "instances_train.json")
    dataset = CocoDetection(index, tiny_shapes / "train")
    with pytest.raises(DataError, match=r"cannot read image \(DecompressionBombError: Image size"):
        dataset[0]
