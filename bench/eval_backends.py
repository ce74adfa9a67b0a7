"""COCO bbox evaluation: pycocotools vs faster-coco-eval on the same detections.

    python bench/eval_backends.py --images 5000 [--record]

Ground truth is the shapes set (``megdet data shapes``, annotations only are needed but the
generator writes the images too); detections are made from it the way a half-trained detector
looks: most objects found with jittered boxes, some missed, some with the wrong class, plus
false positives, 20-100 detections per image with scores. Both evaluators run on the same
inputs, alternating, several rounds; prints seconds of each (load results + evaluate +
accumulate + summarize), the ratio, and whether all twelve summary metrics are identical.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import record


def fake_detections(gt: dict, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    category_ids = [c["id"] for c in gt["categories"]]
    sizes = {image["id"]: (image["width"], image["height"]) for image in gt["images"]}
    per_image: dict[int, list] = {image_id: [] for image_id in sizes}
    for annotation in gt["annotations"]:
        per_image[annotation["image_id"]].append(annotation)
    results = []
    for image_id, objects in per_image.items():
        width, height = sizes[image_id]
        for annotation in objects:
            for _ in range(rng.integers(0, 3)):  # 0: missed, 2: a duplicate
                x, y, w, h = annotation["bbox"]
                jitter = rng.normal(0, 0.06, 4) * [w, h, w, h]
                category = annotation["category_id"]
                if rng.random() < 0.1:
                    category = int(rng.choice(category_ids))
                box = [x, y, w, h] + jitter
                results.append(_detection(image_id, category, box, rng.uniform(0.3, 1.0)))
        for _ in range(rng.integers(20, 100) - len(objects)):
            w, h = rng.uniform(4, width / 2), rng.uniform(4, height / 2)
            box = [rng.uniform(0, width - w), rng.uniform(0, height - h), w, h]
            category = int(rng.choice(category_ids))
            results.append(_detection(image_id, category, box, rng.uniform(0.01, 0.6)))
    return results


def _detection(image_id: int, category_id: int, box, score: float) -> dict:
    return {
        "image_id": image_id,
        "category_id": category_id,
        "bbox": [round(float(v), 2) for v in np.maximum(box, [0, 0, 1, 1])],
        "score": round(float(score), 4),
    }


def run(backend: str, gt_json: Path, results: list[dict]) -> tuple[float, list[float]]:
    if backend == "pycocotools":
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval as Evaluator
    else:
        from faster_coco_eval import COCO
        from faster_coco_eval import COCOeval_faster as Evaluator
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(gt_json))
        begin = time.perf_counter()
        evaluator = Evaluator(gt, gt.loadRes(results), "bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
        seconds = time.perf_counter() - begin
    return seconds, [float(v) for v in evaluator.stats[:12]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--record", action="store_true", help="append to BENCHMARKS.md")
    args = parser.parse_args()

    from megdet.data.shapes import generate_shapes

    with tempfile.TemporaryDirectory() as tmp:
        gt_json = generate_shapes(Path(tmp), 0, args.images, size=128, seed=0)["val"]
        gt = json.loads(gt_json.read_text())
        results = fake_detections(gt)
        print(f"{len(gt['images'])} images, {len(gt['annotations'])} objects, "
              f"{len(results)} detections")  # fmt: skip
        times: dict[str, list[float]] = {"pycocotools": [], "faster": []}
        stats = {}
        for _ in range(args.rounds):
            for backend in times:
                seconds, stats[backend] = run(backend, gt_json, results)
                times[backend].append(seconds)
                print(f"{backend:12s} {seconds:7.2f} s  mmAP {stats[backend][0]:.6f}", flush=True)

    slow, fast = (statistics.median(times[name]) for name in ("pycocotools", "faster"))
    identical = stats["pycocotools"] == stats["faster"]
    largest = max(abs(a - b) for a, b in zip(stats["pycocotools"], stats["faster"], strict=True))
    table = record.markdown_table(
        ["images", "detections", "pycocotools", "faster-coco-eval", "speed-up",
         "12 summary metrics"],  # fmt: skip
        [[len(gt["images"]), len(results), f"{slow:.2f} s", f"{fast:.2f} s",
          f"{slow / fast:.1f}x",
          "identical" if identical else f"equal to {largest:.1e} (summation order)"]],
    )  # fmt: skip
    print(table)
    if args.record:
        record.append(
            "COCO evaluation backends (`bench/eval_backends.py`)",
            table,
            f"Median of {args.rounds} alternating rounds; seconds from loading the detections to "
            "the summary (ground truth loaded before).",
        )


if __name__ == "__main__":
    main()
