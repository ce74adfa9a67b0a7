from pathlib import Path

import pytest

from megdet.data.shapes import generate_shapes

COCO128 = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "coco128"


@pytest.fixture(scope="session")
def tiny_shapes(tmp_path_factory) -> Path:
    """16 training and 8 validation images of 64 px, written once per test session."""
    root = tmp_path_factory.mktemp("shapes")
    generate_shapes(root, num_train=16, num_val=8, size=64, seed=0)
    return root


@pytest.fixture(scope="session")
def coco128() -> Path:
    if not (COCO128 / "annotations" / "instances_train2017.json").is_file():
        pytest.skip("../shared/data/coco128 is not on this machine")
    return COCO128


def instant_overrides(root: Path, val_split: str = "train") -> list[str]:
    """Overrides pointing the instant_test preset to a generated shapes folder."""
    return [
        f"data.train.json={root}/annotations/instances_train.json",
        f"data.train.images={root}/train",
        f"data.val.json={root}/annotations/instances_{val_split}.json",
        f"data.val.images={root}/{val_split}",
    ]
