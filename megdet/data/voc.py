"""Pascal VOC XML to COCO: ``megdet data convert --from voc``.

The layout: ``ROOT/ImageSets/Main/SPLIT.txt`` lists the image ids; ``ROOT/Annotations/ID.xml``
holds each image's objects; ``ROOT/JPEGImages/`` its picture. VOC boxes are 1-based inclusive
pixel indices, so ``xmin - 1, ymin - 1, xmax, ymax`` is the box in COCO's continuous
coordinates (as detectron2 reads them). Boxes marked ``difficult`` become ``iscrowd: 1``:
ignored in training and matched without penalty in COCO evaluation, as VOC's own metric does.
"""

from __future__ import annotations

import math
import xml.etree.ElementTree as ET
from pathlib import Path

from megdet.data.convert import Conversion, categories_from, category_ids
from megdet.errors import DataError, one_line

VOC_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor",
)  # fmt: skip


def convert_voc(
    root: Path, split: str, names: list[str] | None = None, ids_spec: str | None = None
) -> Conversion:
    """The images of ``split`` in their listed order; ``names`` defaults to VOC's 20 classes."""
    names = list(names or VOC_CLASSES)
    split_file = Path(root) / "ImageSets" / "Main" / f"{split}.txt"
    if not split_file.is_file():
        raise DataError(f"{split_file}: not found; is --root a VOC year folder (VOC2007)?")
    ids = category_ids(ids_spec, len(names))
    label = {name: i for name, i in zip(names, ids, strict=True)}
    conversion = Conversion(f"Pascal VOC {root} {split}", categories_from(names, ids))
    difficult = 0
    unknown: dict[str, list[str]] = {}
    for image_id in split_file.read_text(errors="replace").split():
        xml_file = Path(root) / "Annotations" / f"{image_id}.xml"
        try:
            tree = ET.parse(xml_file).getroot()
        except FileNotFoundError:
            conversion.errors.append(f"{xml_file}: not found (listed in {split_file})")
            continue
        except ET.ParseError as exc:
            conversion.errors.append(f"{xml_file}: not valid XML ({one_line(exc)})")
            continue
        file_name = (tree.findtext("filename") or f"{image_id}.jpg").strip()
        image_file = Path(root) / "JPEGImages" / file_name
        if not image_file.is_file():
            conversion.errors.append(f"{image_file}: image not found (named in {xml_file})")
            continue
        image = conversion.add_image(image_file, file_name)
        if image is None:
            continue
        _check_size(conversion, tree, image, xml_file)
        for n, obj in enumerate(tree.iter("object")):
            where = f"{xml_file}: object[{n}]"
            name = (obj.findtext("name") or "").strip()
            if name not in label:
                unknown.setdefault(name, []).append(where)
                continue
            box = _box(obj, where, conversion)
            if box is None:
                continue
            crowd = (obj.findtext("difficult") or "0").strip() == "1"
            difficult += crowd
            conversion.add_box(image, label[name], box, where, crowd=crowd)
    for name, places in unknown.items():
        conversion.errors.append(
            f"{places[0]}: class {name!r} is not among the names ({len(places)} object(s); "
            f"give --names DATASET.yaml for a dataset with other classes)"
        )
    if difficult:
        conversion.notes.append(
            f"{difficult} box(es) marked difficult written as iscrowd=1: ignored in training, "
            f"and detections on them neither count nor cost in evaluation"
        )
    return conversion


def _box(obj: ET.Element, where: str, conversion: Conversion) -> list[float] | None:
    try:
        values = [float(obj.findtext(f"bndbox/{k}")) for k in ("xmin", "ymin", "xmax", "ymax")]
    except (TypeError, ValueError):
        conversion.errors.append(f"{where}: bndbox needs numbers xmin, ymin, xmax, ymax")
        return None
    if not all(math.isfinite(v) for v in values):
        conversion.errors.append(f"{where}: bndbox values must be finite")
        return None
    xmin, ymin, xmax, ymax = values
    return [xmin - 1, ymin - 1, xmax, ymax]


def _check_size(conversion: Conversion, tree: ET.Element, image: dict, xml_file: Path) -> None:
    """The file's own size is used; an XML that says otherwise is noted."""
    try:
        said = (int(tree.findtext("size/width")), int(tree.findtext("size/height")))
    except (TypeError, ValueError):
        return
    if said != (image["width"], image["height"]):
        conversion.notes.append(
            f"{xml_file}: says {said[0]}x{said[1]} but the image is "
            f"{image['width']}x{image['height']} (the image's size is used)"
        )
