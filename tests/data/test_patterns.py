"""The synthetic classification set: ImageFolder layout, deterministic, every class drawable."""

import hashlib

import numpy as np
import pytest
from PIL import Image

from megdet.data.patterns import CLASSES, draw, generate_patterns


def _digest(folder):
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*.png"))
    }


def test_layout_and_determinism(tmp_path):
    generate_patterns(tmp_path / "a", 4, num_train=12, num_val=4, size=24, seed=3)
    generate_patterns(tmp_path / "b", 4, num_train=12, num_val=4, size=24, seed=3)
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")  # byte-identical
    train = tmp_path / "a" / "train"
    assert sorted(p.name for p in train.iterdir()) == sorted(CLASSES[:4])
    assert [len(list((train / c).iterdir())) for c in CLASSES[:4]] == [3, 3, 3, 3]
    with Image.open(next((train / CLASSES[0]).iterdir())) as image:
        assert image.size == (24, 24) and image.mode == "RGB"
    generate_patterns(tmp_path / "c", 4, num_train=12, num_val=4, size=24, seed=4)
    assert _digest(tmp_path / "c") != _digest(tmp_path / "a")


def test_every_class_draws_its_shape_and_texture():
    """The 36 classes are distinct: same draws, different class -> different pixels."""
    images = [draw(np.random.default_rng(0), name, 32) for name in CLASSES]
    assert len(CLASSES) == len(set(CLASSES)) == 36
    assert len({image.tobytes() for image in images}) == 36


@pytest.mark.parametrize(("classes", "size"), [(1, 32), (37, 32), (10, 8)])
def test_bad_arguments_are_refused_before_writing(tmp_path, classes, size):
    with pytest.raises(ValueError):
        generate_patterns(tmp_path / "x", classes, 10, 2, size)
    assert not (tmp_path / "x").exists()
