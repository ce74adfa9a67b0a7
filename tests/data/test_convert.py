"""``megdet data convert``: YOLO and Pascal VOC labels to COCO (issue 17)."""

import json
from pathlib import Path

import numpy as np
import PIL.Image
import pytest

from megdet.data.convert import COCO_CATEGORY_IDS, category_ids, read_names
from megdet.data.voc import VOC_CLASSES
from megdet.errors import DataError


def boxes_by_file(coco: dict) -> dict[str, np.ndarray]:
    """Each image's non-crowd boxes as rows (category id, x, y, w, h), by file name."""
    names = {im["id"]: Path(im["file_name"]).name for im in coco["images"]}
    rows: dict[str, list] = {name: [] for name in names.values()}
    for ann in coco["annotations"]:
        if not ann.get("iscrowd", 0):
            rows[names[ann["image_id"]]].append([ann["category_id"], *ann["bbox"]])
    return {name: np.array(r, dtype=np.float64).reshape(-1, 5) for name, r in rows.items()}


def farthest_match(a: np.ndarray, b: np.ndarray) -> float:
    """The largest distance (max over coordinates) from any box of either set to the nearest
    box of the other with the same category: 0 when the sets are equal."""
    if not len(a) and not len(b):
        return 0.0
    distance = np.abs(a[:, None, 1:] - b[None, :, 1:]).max(-1)
    distance[a[:, None, 0] != b[None, :, 0]] = np.inf
    return max(distance.min(1).max(), distance.min(0).max())


def test_coco128_yolo_labels_convert_to_its_official_coco_json(coco128, tmp_path, cli):
    out = tmp_path / "coco128.json"
    converted = cli(
        "data", "convert", "--from", "yolo", "--images", coco128 / "images",
        "--labels", coco128 / "labels", "--names", coco128 / "config.yaml",
        "--category-ids", "coco", "--out", out,
    )  # fmt: skip
    assert converted.returncode == 0, converted.stdout + converted.stderr
    # The two label files without an image are reported, one line each, and not converted.
    orphans = [line for line in converted.stdout.splitlines() if "no image for" in line]
    assert [Path(line.split(":")[1].strip()).name for line in orphans] == [
        "000000000656.txt",
        "000000000659.txt",
    ]
    ours = json.loads(out.read_text())
    official = json.loads((coco128 / "annotations" / "instances_train2017.json").read_text())
    assert len(ours["images"]) == 128  # the two images without labels are kept
    assert [(c["id"], c["name"]) for c in ours["categories"]] == [
        (c["id"], c["name"]) for c in sorted(official["categories"], key=lambda c: c["id"])
    ]
    sizes = {Path(im["file_name"]).name: (im["width"], im["height"]) for im in ours["images"]}
    assert sizes == {im["file_name"]: (im["width"], im["height"]) for im in official["images"]}
    a, b = boxes_by_file(ours), boxes_by_file(official)
    assert a.keys() == b.keys()
    for name in b:
        assert len(a[name]) == len(b[name]), name
        assert farthest_match(a[name], b[name]) < 1e-3, name
    checked = cli("data", "check", "--json", out, "--images", coco128 / "images")
    assert checked.returncode == 0, checked.stdout


def write_yolo(root: Path) -> tuple[Path, Path, Path]:
    """Three 40x20 images (one in a subfolder, one without labels), their labels, and an
    orphan label file; one box overhangs the image, one has no width."""
    images, labels = root / "images", root / "labels"
    (images / "sub").mkdir(parents=True)
    (labels / "sub").mkdir(parents=True)
    for name in ("a.png", "sub/b.jpg", "c.png"):
        PIL.Image.new("RGB", (40, 20), (90, 90, 90)).save(images / name)
    (labels / "a.txt").write_text("0 0.5 0.5 0.5 0.5\n1 0.9 0.5 0.4 0.2\n\n")
    (labels / "sub" / "b.txt").write_text("1 0.1 0.1 0.3 0.1 0.2 0.6\n0 0.5 0.5 0.0 0.3\n")
    (labels / "orphan.txt").write_text("0 0.5 0.5 0.1 0.1\n")
    names = root / "data.yaml"
    names.write_text("names:\n  0: cat\n  1: dog\n")
    return images, labels, names


def test_yolo_boxes_polygons_clipping_and_what_is_reported(tmp_path, cli):
    images, labels, names = write_yolo(tmp_path)
    out = tmp_path / "out.json"
    converted = cli(
        "data", "convert", "--from", "yolo", "--images", images, "--labels", labels,
        "--names", names, "--category-ids", "3,7", "--out", out,
    )  # fmt: skip
    assert converted.returncode == 0, converted.stdout + converted.stderr
    coco = json.loads(out.read_text())
    assert [(im["file_name"], im["width"], im["height"]) for im in coco["images"]] == [
        ("a.png", 40, 20),
        ("c.png", 40, 20),
        ("sub/b.jpg", 40, 20),
    ]
    assert coco["categories"] == [
        {"id": 3, "name": "cat", "supercategory": ""},
        {"id": 7, "name": "dog", "supercategory": ""},
    ]
    got = [(a["image_id"], a["category_id"], a["bbox"]) for a in coco["annotations"]]
    expected = [
        (1, 3, [10.0, 5.0, 20.0, 10.0]),
        (1, 7, [28.0, 8.0, 12.0, 4.0]),  # x 28..44 clipped to 40
        (3, 7, [4.0, 2.0, 8.0, 10.0]),  # the polygon's bounding box
    ]
    assert len(got) == len(expected)
    for (i, c, box), (ei, ec, ebox) in zip(got, expected, strict=True):
        assert (i, c) == (ei, ec) and box == pytest.approx(ebox, abs=1e-9)
    assert "orphan.txt: no image for this label file" in converted.stdout
    assert "dropped 1 box(es) without area" in converted.stdout
    assert "sub/b.txt:2" in converted.stdout
    assert "3 images (1 without boxes, kept), 3 boxes in 2 categories, 1 box(es) clipped" in (
        converted.stdout
    )
    assert cli("data", "check", "--json", out, "--images", images).returncode == 0


def test_every_problem_is_listed_at_once_and_nothing_is_written(tmp_path, cli):
    images, labels, names = write_yolo(tmp_path)
    (labels / "a.txt").write_text("0 0.5 0.5 0.5\n2 0.5 0.5 0.1 0.1\nx 0.5 0.5 0.1 0.1\n")
    (labels / "c.txt").write_text("1.5 0.5 0.5 0.1 0.1\n0 nan 0.5 0.1 0.1\n")
    (images / "broken.png").write_bytes(b"not a png")
    out = tmp_path / "out.json"
    out.write_text("previous")
    converted = cli(
        "data", "convert", "--from", "yolo", "--images", images, "--labels", labels,
        "--names", names, "--out", out, "--overwrite",
    )  # fmt: skip
    assert converted.returncode == 2
    errors = [line for line in converted.stdout.splitlines() if line.startswith("error: ")]
    assert len(errors) == 6, converted.stdout
    for where in ("a.txt:1", "a.txt:2", "a.txt:3", "c.txt:1", "c.txt:2", "broken.png"):
        assert sum(where in line for line in errors) == 1, where
    assert "Traceback" not in converted.stderr
    assert out.read_text() == "previous"


def test_an_existing_output_is_kept_without_overwrite(tmp_path, cli):
    images, labels, names = write_yolo(tmp_path)
    out = tmp_path / "out.json"
    out.write_text("previous")
    args = ["--images", images, "--labels", labels, "--names", names, "--out", out]
    refused = cli("data", "convert", "--from", "yolo", *args)
    assert refused.returncode == 2 and "--overwrite" in refused.stderr
    assert out.read_text() == "previous"
    missing = cli("data", "convert", "--from", "yolo", "--out", out)
    assert missing.returncode == 2
    assert missing.stderr.strip().endswith("needs --images, --labels, --names")


def test_names_and_category_ids(tmp_path):
    listed = tmp_path / "list.yaml"
    listed.write_text("names: [person, bicycle]\n")
    assert read_names(listed) == ["person", "bicycle"]
    gap = tmp_path / "gap.yaml"
    gap.write_text("names: {0: a, 2: b}\n")
    with pytest.raises(DataError, match="keys must be the classes 0..1"):
        read_names(gap)
    assert category_ids(None, 3) == [1, 2, 3]
    assert category_ids("coco", 80) == COCO_CATEGORY_IDS
    assert len(set(COCO_CATEGORY_IDS)) == 80 and COCO_CATEGORY_IDS[-1] == 90
    with pytest.raises(DataError, match="COCO has 80"):
        category_ids("coco", 3)
    with pytest.raises(DataError, match="3 distinct positive ids"):
        category_ids("1,1,2", 3)


VOC_XML = """<annotation>
  <filename>{name}.jpg</filename>
  <size><width>{said_width}</width><height>30</height><depth>3</depth></size>
  {objects}
</annotation>"""
VOC_OBJECT = """<object><name>{cls}</name><difficult>{difficult}</difficult>
  <bndbox><xmin>{box[0]}</xmin><ymin>{box[1]}</ymin><xmax>{box[2]}</xmax><ymax>{box[3]}</ymax>
  </bndbox></object>"""


def write_voc(root: Path, images: dict[str, list[tuple]], said_width: int = 50) -> None:
    for folder in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    for name, objects in images.items():
        PIL.Image.new("RGB", (50, 30)).save(root / "JPEGImages" / f"{name}.jpg")
        xml = "".join(VOC_OBJECT.format(cls=c, difficult=d, box=b) for c, d, b in objects)
        (root / "Annotations" / f"{name}.xml").write_text(
            VOC_XML.format(name=name, said_width=said_width, objects=xml)
        )
    (root / "ImageSets" / "Main" / "trainval.txt").write_text("\n".join(images) + "\n")


def test_voc_boxes_difficult_and_sizes(tmp_path, cli):
    root = tmp_path / "VOC2007"
    write_voc(
        root,
        {
            "000001": [("dog", 0, (1, 1, 10, 20)), ("person", 1, (5, 6, 50, 30))],
            "000002": [],
            "000003": [("tvmonitor", 0, (40, 10, 60, 30))],  # beyond the 50 px width
        },
        said_width=48,
    )
    out = tmp_path / "voc.json"
    converted = cli("data", "convert", "--from", "voc", "--root", root, "--out", out)
    assert converted.returncode == 0, converted.stdout + converted.stderr
    coco = json.loads(out.read_text())
    assert [c["name"] for c in coco["categories"]] == list(VOC_CLASSES)
    assert [c["id"] for c in coco["categories"]] == list(range(1, 21))
    assert [im["file_name"] for im in coco["images"]] == ["000001.jpg", "000002.jpg", "000003.jpg"]
    assert all((im["width"], im["height"]) == (50, 30) for im in coco["images"])  # the file's
    got = [(a["image_id"], a["category_id"], a["bbox"], a["iscrowd"]) for a in coco["annotations"]]
    assert got == [
        (1, 12, [0.0, 0.0, 10.0, 20.0], 0),  # 1-based inclusive pixels: xmin - 1 .. xmax
        (1, 15, [4.0, 5.0, 46.0, 25.0], 1),  # difficult: ignored
        (3, 20, [39.0, 9.0, 11.0, 21.0], 0),  # clipped at 50
    ]
    assert "1 box(es) marked difficult written as iscrowd=1" in converted.stdout
    assert "says 48x30 but the image is 50x30" in converted.stdout
    assert cli("data", "check", "--json", out, "--images", root / "JPEGImages").returncode == 0


def test_voc_problems_at_once(tmp_path, cli):
    root = tmp_path / "VOC2007"
    write_voc(root, {"000001": [("unicorn", 0, (1, 1, 10, 20)), ("dog", 0, ("a", 1, 2, 3))]})
    (root / "ImageSets" / "Main" / "trainval.txt").write_text("000001\n000009\n")
    out = tmp_path / "voc.json"
    converted = cli("data", "convert", "--from", "voc", "--root", root, "--out", out)
    assert converted.returncode == 2
    errors = [line for line in converted.stdout.splitlines() if line.startswith("error: ")]
    assert len(errors) == 3, converted.stdout
    assert any("class 'unicorn' is not among the names" in e for e in errors)
    assert any("bndbox needs numbers" in e for e in errors)
    assert any("000009.xml: not found" in e for e in errors)
    assert not out.exists()
    no_split = cli("data", "convert", "--from", "voc", "--root", tmp_path, "--out", out)
    assert no_split.returncode == 2 and "ImageSets/Main/trainval.txt: not found" in no_split.stderr


def test_shapes_round_trip_through_yolo_labels_and_train(tiny_shapes, tmp_path, cli):
    """COCO -> YOLO labels (written here, as Ultralytics would) -> ``convert`` gives the same
    boxes, and the converted file trains (without coco128, which CI may not have)."""
    original = json.loads((tiny_shapes / "annotations" / "instances_train.json").read_text())
    labels = tmp_path / "labels"
    labels.mkdir()
    cids = sorted(c["id"] for c in original["categories"])
    for image in original["images"]:
        w, h = image["width"], image["height"]
        lines = [
            f"{cids.index(a['category_id'])} {(a['bbox'][0] + a['bbox'][2] / 2) / w:.6f} "
            f"{(a['bbox'][1] + a['bbox'][3] / 2) / h:.6f} {a['bbox'][2] / w:.6f} "
            f"{a['bbox'][3] / h:.6f}"
            for a in original["annotations"]
            if a["image_id"] == image["id"]
        ]
        (labels / Path(image["file_name"]).with_suffix(".txt")).write_text("\n".join(lines))
    names = tmp_path / "shapes.yaml"
    sorted_names = [c["name"] for c in sorted(original["categories"], key=lambda c: c["id"])]
    names.write_text(json.dumps({"names": sorted_names}))  # JSON is YAML
    out = tmp_path / "converted.json"
    converted = cli(
        "data", "convert", "--from", "yolo", "--images", tiny_shapes / "train", "--labels",
        labels, "--names", names, "--category-ids", ",".join(map(str, cids)), "--out", out,
    )  # fmt: skip
    assert converted.returncode == 0, converted.stdout + converted.stderr
    ours, theirs = boxes_by_file(json.loads(out.read_text())), boxes_by_file(original)
    assert ours.keys() == theirs.keys()
    for name in theirs:  # 6 decimals of a 64 px image: 3.2e-5 px per coordinate at most
        assert len(ours[name]) == len(theirs[name])
        assert farthest_match(ours[name], theirs[name]) < 1e-4, name
    run = tmp_path / "run"
    trained = cli(
        "train", "--config", "instant_test", f"data.train.json={out}",
        f"data.train.images={tiny_shapes / 'train'}", f"data.val.json={out}",
        f"data.val.images={tiny_shapes / 'train'}", "train.max_iter=2", "--out", run,
    )  # fmt: skip
    assert trained.returncode == 0, trained.stderr[-2000:]
    assert (run / "checkpoints" / "last.pt").is_file() and "mmAP" in trained.stdout
