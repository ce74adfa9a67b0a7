import json
import random

import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from megdet.config import load_config
from megdet.errors import ConfigError
from megdet.tasks.detection.evaluation import METRICS, evaluate_coco, format_metrics


def _ground_truth_as_results(path, jitter=0.0, score=0.9):
    data = json.loads(path.read_text())
    return [
        {
            "image_id": a["image_id"],
            "category_id": a["category_id"],
            "bbox": [v + jitter for v in a["bbox"]],
            "score": score,
        }
        for a in data["annotations"]
    ]


def _noisy_detections(path, seed=0):
    """Found (jittered, some with the wrong class), missed and made-up boxes, random scores."""
    data = json.loads(path.read_text())
    rng = random.Random(seed)
    category_ids = [c["id"] for c in data["categories"]]
    results = []
    for a in data["annotations"]:
        for _ in range(rng.randint(0, 2)):
            x, y, w, h = a["bbox"]
            box = [x + rng.gauss(0, 0.08) * w, y + rng.gauss(0, 0.08) * h, w, h]
            wrong = rng.random() < 0.1
            category = rng.choice(category_ids) if wrong else a["category_id"]
            results.append(_result(a["image_id"], category, box, rng.uniform(0.2, 1)))
    for image in data["images"]:
        for _ in range(rng.randint(0, 30)):
            w, h = rng.uniform(2, image["width"] / 2), rng.uniform(2, image["height"] / 2)
            box = [rng.uniform(0, image["width"] - w), rng.uniform(0, image["height"] - h), w, h]
            score = rng.uniform(0.01, 0.7)
            results.append(_result(image["id"], rng.choice(category_ids), box, score))
    return results


def _result(image_id, category_id, box, score):
    bbox = [round(max(v, 1.0 if i >= 2 else 0.0), 2) for i, v in enumerate(box)]
    return {"image_id": image_id, "category_id": category_id, "bbox": bbox, "score": score}


def _pycocotools_stats(path, results):
    gt = COCO(str(path))
    evaluator = COCOeval(gt, gt.loadRes(results), "bbox")
    evaluator.evaluate()
    evaluator.accumulate()
    evaluator.summarize()
    return list(evaluator.stats[:6])


@pytest.mark.parametrize("backend", ["pycocotools", "faster"])
def test_perfect_detections_score_one(tiny_shapes, backend):
    path = tiny_shapes / "annotations" / "instances_val.json"
    metrics, report = evaluate_coco(path, _ground_truth_as_results(path), backend)
    assert metrics["mmAP"] == pytest.approx(1.0)
    assert metrics["AP50"] == pytest.approx(1.0)
    assert "Average Precision" in report


@pytest.mark.parametrize("backend", ["pycocotools", "faster"])
def test_metrics_equal_pycocotools_run_directly(tiny_shapes, backend):
    path = tiny_shapes / "annotations" / "instances_val.json"
    results = _ground_truth_as_results(path, jitter=1.5)
    results[0]["category_id"] = 3 if results[0]["category_id"] != 3 else 1  # one wrong class
    metrics, _ = evaluate_coco(path, results, backend)
    assert [metrics[name] for name in METRICS] == _pycocotools_stats(path, results)
    assert 0 < metrics["mmAP"] < 1


def test_faster_backend_is_identical_on_noisy_detections(tiny_shapes):
    path = tiny_shapes / "annotations" / "instances_val.json"
    results = _noisy_detections(path)
    faster, report = evaluate_coco(path, results, "faster")
    assert [faster[name] for name in METRICS] == _pycocotools_stats(path, results)
    assert 0.05 < faster["mmAP"] < 0.95
    assert "Average Precision" in report


def test_faster_backend_is_identical_on_coco128(coco128):
    """80 classes, crowd regions, all three size ranges: where the evaluators could differ."""
    path = coco128 / "annotations" / "instances_train2017.json"
    results = _noisy_detections(path, seed=1)
    faster, _ = evaluate_coco(path, results, "faster")
    # Equal up to the order of a floating-point sum (measured: 1 ulp in one metric).
    expected = _pycocotools_stats(path, results)
    assert [faster[name] for name in METRICS] == pytest.approx(expected, rel=1e-12, abs=0)
    assert all(faster[name] > 0 for name in METRICS)


def test_unknown_backend_is_a_config_error():
    with pytest.raises(ConfigError, match="eval.backend"):
        load_config("instant_test", ["eval.backend=detectron"])


def test_no_detections_and_table(tiny_shapes):
    metrics, _ = evaluate_coco(tiny_shapes / "annotations" / "instances_val.json", [], "faster")
    assert metrics == dict.fromkeys(METRICS, 0.0)
    table = format_metrics({**metrics, "mmAP": 0.5123, "APl": -1.0})
    assert table.splitlines()[0].split("|")[0].strip() == "mmAP"
    assert "51.23" in table and "n/a" in table
