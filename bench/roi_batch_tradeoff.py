"""Accuracy vs speed of ``model.roi_batch_per_image``: the demo trained once per setting.

    python bench/roi_batch_tradeoff.py [--values 32,64,128,256,512] [--record]

Each setting is a full ``megdet train --config default --nproc 2`` run on the demo's shapes
(``make demo`` data; generated if missing) with mmAP measured after every epoch; everything
else is the demo's. Prints seconds per iteration (median of the logged ones), the training
wall time without evaluation, and mmAP per epoch. ``--positive`` sets
``model.roi_positive_fraction`` (the demo's 0.5; torchvision's and detectron2's 0.25).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import record

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "data" / "shapes"


def train(value: int, positive: float, seed: int, out: Path) -> dict:
    command = [sys.executable, "-m", "megdet", "train", "--config", "default",
               f"model.roi_batch_per_image={value}", f"model.roi_positive_fraction={positive}",
               f"train.seed={seed}",
               "train.eval_period=1", "log.tensorboard=false",
               "--nproc", "2", "--out", str(out), "--overwrite"]  # fmt: skip
    begin = time.perf_counter()
    proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"{' '.join(command)} failed:\n{proc.stderr[-3000:]}")
    wall = time.perf_counter() - begin
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    per_iter = [r["time_per_iter"] for r in lines if "time_per_iter" in r]
    evals = [r["eval"]["mmAP"] for r in lines if "eval" in r]
    return {"s_per_iter": statistics.median(per_iter), "wall": wall, "mmAP": evals}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--values", default="32,64,128,256,512")
    parser.add_argument("--positive", type=float, default=0.5)
    parser.add_argument("--seed", type=int, default=0, help="train.seed (weights, order, samples)")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "roi_batch")
    parser.add_argument("--record", action="store_true", help="append to BENCHMARKS.md")
    args = parser.parse_args()
    if not (DATA / "annotations" / "instances_train.json").exists():
        subprocess.run([sys.executable, "-m", "megdet", "data", "shapes", "--out", str(DATA),
                        "--train", "2000", "--val", "200", "--size", "128", "--seed", "0"],
                       cwd=ROOT, check=True)  # fmt: skip
    rows = []
    for value in (int(v) for v in args.values.split(",")):
        result = train(value, args.positive, args.seed, args.out / f"rois{value}-seed{args.seed}")
        curve = " / ".join(f"{100 * m:.1f}" for m in result["mmAP"])
        rows.append([value, f"{result['s_per_iter']:.3f}", f"{result['wall'] / 60:.1f} min",
                     curve, f"**{100 * result['mmAP'][-1]:.2f}**"])  # fmt: skip
        print(rows[-1], flush=True)
    table = record.markdown_table(
        ["RoIs per image", "s/iteration", "wall (with 7 evaluations)", "mmAP after each epoch",
         "final mmAP"], rows)  # fmt: skip
    print(table)
    if args.record:
        record.append(
            "`model.roi_batch_per_image` trade study (`bench/roi_batch_tradeoff.py`)",
            table,
            f"The demo (2 processes x 8 images, 875 iterations), positive fraction "
            f"{args.positive}, train.seed {args.seed}, one run per setting.",
        )


if __name__ == "__main__":
    main()
