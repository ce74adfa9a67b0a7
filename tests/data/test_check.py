"""`megdet data check`: every problem of a broken dataset at once, one line each, exit code 2;
odd image formats converted, not refused."""

import contextlib
import copy
import io
import json

import numpy as np
import PIL.Image
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

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
    assert any("1 annotation(s) (annotations[1]) name unknown image_id 7" in e for e in errors)
    assert any("1 annotation(s) (annotations[2]) name unknown category_id 9" in e for e in errors)
    assert any("annotations[3] (id 4): missing key 'bbox'" in e for e in errors)
    assert any("b.png: cannot read image" in e for e in errors)
    assert any("gone.png: image file not found" in e for e in errors)
    assert len(errors) == 5
    assert sum(line.startswith("dropped: ") for line in out) == 3
    assert "2 image(s) without annotations (kept)" in out[-1]  # b.png and gone.png have none

    # Training reads the same file: one line naming the first problem and how many more.
    with pytest.raises(DataError, match=r"missing key 'bbox' \(and 2 more; `megdet data check"):
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


def test_non_finite_numbers_and_wrong_types_are_errors_not_boxes(tmp_path, capsys):
    """A NaN coordinate used to pass the check and train as a full-width box."""
    annotations = [
        _ann(1, bbox=(float("nan"), 10, 20, 20)),
        _ann(2, bbox=(1, 1, float("inf"), 4)),
        {**_ann(3), "area": float("nan")},
        {**_ann(4), "iscrowd": "no"},
        _ann(5, image_id=2),
    ]
    images = [
        {"id": 1, "file_name": "a.png", "width": 20, "height": 10},
        {"id": 2, "file_name": "b.png", "width": float("inf"), "height": 10},
    ]
    path, folder = _dataset(tmp_path, annotations, images)
    assert main(["data", "check", "--json", str(path), "--images", str(folder)]) == 2
    errors = [line for line in capsys.readouterr().out.splitlines() if line.startswith("error")]
    assert any("annotations[0] (id 1): bbox must be 4 finite numbers" in e for e in errors)
    assert any("annotations[1] (id 2): bbox must be 4 finite numbers" in e for e in errors)
    assert any("annotations[2] (id 3): area must be a finite number" in e for e in errors)
    assert any("annotations[3] (id 4): iscrowd must be 0 or 1, got 'no'" in e for e in errors)
    assert any("images[1]: width and height must be positive finite numbers" in e for e in errors)
    assert any("(annotations[4]) name unknown image_id 2" in e for e in errors)
    assert len(errors) == 6
    with pytest.raises(DataError, match=r"images\[1\]: width and height must be positive finite"):
        read_coco(path)


def test_a_wrong_id_type_is_named_once_not_as_unknown_ids_per_box(tmp_path):
    path, _ = _dataset(tmp_path, [_ann(i) for i in range(6)])
    coco = json.loads(path.read_text())
    coco["images"][0]["id"] = "abc"
    path.write_text(json.dumps(coco))
    assert check_dataset(path, None).errors == [
        f"{path}: images[0]: id must be an integer, got 'abc'",
        f"{path}: 6 annotation(s) (annotations[0], [1], [2], ...) name unknown image_id 1",
    ]


VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(min_value=10**308, max_value=10**320),  # beyond float
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.lists(st.integers(), max_size=5),
    st.dictionaries(st.text(max_size=4), st.integers(), max_size=3),
)


def _places(value, path=()):
    """Every (container path, key) of a JSON tree."""
    items = value.items() if isinstance(value, dict) else enumerate(value)
    for key, child in items:
        yield path, key
        if isinstance(child, (dict, list)):
            yield from _places(child, (*path, key))


@pytest.fixture(scope="module")
def valid_dataset(tmp_path_factory):
    annotations = [
        {**_ann(1), "area": 25.0, "iscrowd": 0},
        {**_ann(2, image_id=2, bbox=(2, 2, 4, 4)), "iscrowd": 1},
    ]
    return _dataset(tmp_path_factory.mktemp("fuzz"), annotations)


@settings(max_examples=250, deadline=None, derandomize=True, database=None)
@given(data=st.data())
def test_mutated_coco_files_are_accepted_or_refused_in_lines_never_a_traceback(valid_dataset, data):
    """Types, missing keys, NaN/inf/negative/huge numbers, duplicates, unicode: `data check`
    either accepts the file or exits 2 with one line per problem; training's reader either
    reads it or raises one DataError line."""
    path, folder = valid_dataset
    coco = json.loads(path.read_text())
    for _ in range(data.draw(st.integers(1, 3), label="mutations")):
        places = list(_places(coco))
        container_path, key = data.draw(st.sampled_from(places), label="where")
        container = coco
        for step in container_path:
            container = container[step]
        action = data.draw(st.sampled_from(["replace", "delete", "duplicate"]), label="action")
        if action == "replace":
            container[key] = data.draw(VALUES, label="value")
        elif action == "delete":
            del container[key]
        elif isinstance(container, list):
            container.append(copy.deepcopy(container[key]))
    mutated = path.with_name("mutated.json")
    mutated.write_text(json.dumps(coco, ensure_ascii=False))
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        code = main(["data", "check", "--json", str(mutated), "--images", str(folder)])
    lines = out.getvalue().splitlines()
    assert code in (0, 2)
    assert all(line.startswith(("error: ", "dropped: ", str(mutated))) for line in lines), lines
    assert (code == 2) == any(line.startswith("error: ") for line in lines)
    assert all(len(line) < 600 for line in lines)
    try:
        read_coco(mutated)
    except DataError as exc:
        assert code == 2 and "\n" not in str(exc)


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
