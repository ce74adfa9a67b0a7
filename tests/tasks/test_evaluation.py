import json

import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

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


def test_perfect_detections_score_one(tiny_shapes):
    path = tiny_shapes / "annotations" / "instances_val.json"
    metrics, report = evaluate_coco(path, _ground_truth_as_results(path))
    assert metrics["mmAP"] == pytest.approx(1.0)
    assert metrics["AP50"] == pytest.approx(1.0)
    assert "Average Precision" in report


def test_metrics_equal_pycocotools_run_directly(tiny_shapes):
    path = tiny_shapes / "annotations" / "instances_val.json"
    results = _ground_truth_as_results(path, jitter=1.5)
    results[0]["category_id"] = 3 if results[0]["category_id"] != 3 else 1  # one wrong class
    metrics, _ = evaluate_coco(path, results)
    gt = COCO(str(path))
    evaluator = COCOeval(gt, gt.loadRes(results), "bbox")
    evaluator.evaluate()
    evaluator.accumulate()
    evaluator.summarize()
    assert [metrics[name] for name in METRICS] == list(evaluator.stats[:6])
    assert 0 < metrics["mmAP"] < 1


def test_no_detections_and_table(tiny_shapes):
    metrics, _ = evaluate_coco(tiny_shapes / "annotations" / "instances_val.json", [])
    assert metrics == dict.fromkeys(METRICS, 0.0)
    table = format_metrics({**metrics, "mmAP": 0.5123, "APl": -1.0})
    assert table.splitlines()[0].split("|")[0].strip() == "mmAP"
    assert "51.23" in table and "n/a" in table
