"""Activation checkpointing: peak training memory and step time, none vs stages vs blocks.

    python bench/checkpoint_memory.py            # both detectors, every mode
    python bench/checkpoint_memory.py --steps 5

Each (detector, mode) runs in a fresh process, so its peak resident set size
(``resource.getrusage``) is its own; the memory a step needs is that peak minus the resident
size after building the model (weights, imports). Also printed: megdet's estimate
(``megdet plan --memory``) of the same quantity, activations only, for comparison.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import record

DETECTORS = {
    # MegDet's detector with CGBN (here one process) training every stage, 2 images of 512 px.
    "resnet50-fpn 512px x2": (
        "coco_r50_fpn",
        ["model.min_size=512", "model.max_size=512", "model.norm=cgbn", "model.frozen_stages=0"],
        2,
        512,
    ),
    # The demo's detector and per-process batch.
    "demo x8": ("default", [], 8, 128),
}
MODES = ("none", "stages", "blocks")


def child(name: str, mode: str, steps: int) -> dict:
    import torch

    from megdet.config import load_config
    from megdet.nn import training_norm
    from megdet.tasks.detection.backbone import apply_checkpointing
    from megdet.tasks.detection.memory import estimate_memory
    from megdet.tasks.detection.model import build_detector

    preset, overrides, images, size = DETECTORS[name]
    cfg = load_config(preset, [*overrides, f"train.checkpointing={mode}"])
    torch.manual_seed(0)
    model = build_detector(cfg.model, 80, training_norm(cfg.model.norm)).train()
    apply_checkpointing(model.backbone, mode)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.001, momentum=0.9)
    g = torch.Generator().manual_seed(0)
    batch = [torch.rand(3, size, size, generator=g) for _ in range(images)]
    boxes = torch.tensor([[0.1, 0.1, 0.5, 0.6], [0.4, 0.3, 0.9, 0.9]]) * size
    targets = [{"boxes": boxes, "labels": torch.tensor([1, 2])} for _ in range(images)]
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # MB (Linux: KB)
    times = []
    for _ in range(steps + 1):  # the first step is not timed (allocator warm-up)
        begin = time.perf_counter()
        loss = sum(model(batch, targets).values())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        times.append(time.perf_counter() - begin)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    estimate = estimate_memory(cfg, 80)  # after reading the peak: it allocates too
    return {
        "step_s": statistics.median(times[1:]),
        "peak_mb": peak,
        "base_mb": base,
        "estimate_mb": estimate.fixed_mb[mode] + images * estimate.per_image_mb[mode],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=3, help="timed steps per setting")
    parser.add_argument("--record", action="store_true", help="append to BENCHMARKS.md")
    parser.add_argument("--child", nargs=2, metavar=("DETECTOR", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(*args.child, args.steps)))
        return
    rows = []
    for name in DETECTORS:
        results = {}
        for mode in MODES:
            command = [sys.executable, __file__, "--steps", str(args.steps), "--child", name, mode]
            out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
            results[mode] = json.loads(out.strip().splitlines()[-1])
        none = results["none"]
        print(f"{name}:")
        for mode, r in results.items():
            used = r["peak_mb"] - r["base_mb"]
            ref = none["peak_mb"] - none["base_mb"]
            print(
                f"  {mode:>6}: step {r['step_s']:.3f} s ({r['step_s'] / none['step_s']:.2f}x), "
                f"peak RSS {r['peak_mb']:.0f} MB, training memory {used:.0f} MB "
                f"({used / ref:.2f}x, {1 - used / ref:.0%} less), "
                f"estimated activations {r['estimate_mb']:.0f} MB"
            )
            rows.append([name, mode, f"{r['step_s']:.3f} s ({r['step_s'] / none['step_s']:.2f}x)",
                         f"{used:.0f} MB ({1 - used / ref:.0%} less)",
                         f"{r['estimate_mb']:.0f} MB"])  # fmt: skip
    if args.record:
        record.append(
            "Activation checkpointing (`bench/checkpoint_memory.py`)",
            record.markdown_table(
                ["detector", "mode", "step time", "training memory", "estimated activations"],
                rows,
            ),
            "Training memory: peak RSS of the steps minus RSS after building the model.",
        )


if __name__ == "__main__":
    main()
