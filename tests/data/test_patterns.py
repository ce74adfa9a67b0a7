"""The synthetic classification set: ImageFolder layout, deterministic, every class drawable."""

import hashlib

import numpy as np
import pytest
from PIL import Image

from megdet.data import shapes
from megdet.data.patterns import CLASSES, SHAPES, draw, draw_plain, generate_patterns


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


def test_plain_style_layout_and_determinism(tmp_path):
    generate_patterns(tmp_path / "a", 6, num_train=12, num_val=6, size=48, style="plain")
    generate_patterns(tmp_path / "b", 6, num_train=12, num_val=6, size=48, style="plain")
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")
    assert sorted(p.name for p in (tmp_path / "a" / "val").iterdir()) == sorted(SHAPES)


def test_plain_shapes_lie_on_the_shapes_sets_background():
    """The background is the detection set's own (its first draws), and the 1-3 objects cover
    some of it, never all: each side is at most 0.7 of the image."""
    for index, shape in enumerate(SHAPES * 4):
        image = draw_plain(np.random.default_rng([7, index]), shape, 64).astype(float)
        base = shapes.background(np.random.default_rng([7, index]), 64, 64).astype(float)
        covered = (np.abs(image - base).max(axis=2) > 40).mean()  # beyond the noise (sd 6)
        assert 0.002 < covered < 0.75, (shape, covered)


def test_every_plain_class_draws_its_shape():
    images = [draw_plain(np.random.default_rng(0), name, 32) for name in SHAPES]
    assert len({image.tobytes() for image in images}) == len(SHAPES)


@pytest.mark.parametrize(
    ("classes", "size", "style"),
    [(1, 32, "textured"), (37, 32, "textured"), (10, 8, "textured"), (7, 32, "plain"),
     (6, 32, "wavy")],
)  # fmt: skip
def test_bad_arguments_are_refused_before_writing(tmp_path, classes, size, style):
    with pytest.raises(ValueError):
        generate_patterns(tmp_path / "x", classes, 10, 2, size, style=style)
    assert not (tmp_path / "x").exists()
