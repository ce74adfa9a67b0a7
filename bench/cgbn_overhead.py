"""CGBN overhead: training steps of the demo detector, per-process BN vs CGBN, same images.

Run with torchrun (2 processes stand in for 2 GPUs; gloo on CPU, NCCL on CUDA):

    torchrun --standalone --nproc-per-node 2 bench/cgbn_overhead.py --images 8 --steps 20

The variants take turns step by step (BN, CGBN, CGBN two-pass, BN, ...) so that machine noise
hits them alike; each step starts after a barrier. Rank 0 prints median step times and ratios.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import record
import torch
from torch.nn.parallel import DistributedDataParallel

from megdet import dist
from megdet.config import load_config
from megdet.data.coco import CocoDetection, collate, read_coco
from megdet.data.shapes import generate_shapes
from megdet.nn import norm_layer
from megdet.nn.cgbn import CrossGPUBatchNorm2d
from megdet.tasks.detection.model import build_detector


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=8, help="images per process")
    parser.add_argument("--size", type=int, default=128, help="image side")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per variant")
    parser.add_argument("--record", action="store_true", help="append to BENCHMARKS.md")
    args = parser.parse_args()

    ctx = dist.init_distributed()
    cfg = load_config("default", [f"model.min_size={args.size}", f"model.max_size={args.size}"])
    with tempfile.TemporaryDirectory() as tmp:
        generate_shapes(tmp, args.images * ctx.world_size, 0, size=args.size, seed=0)
        dataset = CocoDetection(
            read_coco(f"{tmp}/annotations/instances_train.json"), f"{tmp}/train"
        )
        start = ctx.rank * args.images
        images, targets = collate([dataset[i] for i in range(start, start + args.images)])

    group = dist.own_group([list(range(ctx.world_size))])
    alone = dist.own_group([[rank] for rank in range(ctx.world_size)])
    variants = {
        "bn": norm_layer("bn"),
        # Each process its own BN group: no collective. Since CGBN runs a one-process group on
        # ATen's BatchNorm kernels, this measures the module's own overhead over nn.BatchNorm2d.
        "cgbn_no_sync": norm_layer("cgbn", alone),
        "cgbn": norm_layer("cgbn", group),
        "cgbn_two_pass": lambda c: CrossGPUBatchNorm2d(c, process_group=group, two_pass=True),
    }
    models = {}
    for name, norm in variants.items():
        torch.manual_seed(0)
        model = build_detector(cfg.model, num_classes=3, norm=norm).to(ctx.device)
        ddp = DistributedDataParallel(model) if ctx.world_size > 1 else model
        models[name] = (ddp, torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9))

    times: dict[str, list[float]] = {name: [] for name in models}
    for step in range(args.steps + 3):
        for name, (model, optimizer) in models.items():
            dist.barrier()
            begin = time.perf_counter()
            loss = sum(model(images, targets).values())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            elapsed = time.perf_counter() - begin
            if step >= 3:  # warm-up steps are not timed
                times[name].append(elapsed)

    # The slowest rank sets the pace of a synchronous step.
    medians = {
        name: max(dist.all_gather_object(statistics.median(values)))
        for name, values in times.items()
    }
    if ctx.is_main:
        print(
            f"{ctx.world_size} processes x {args.images} images at {args.size} px, "
            f"{torch.get_num_threads()} thread(s) each, {args.steps} steps per variant"
        )
        for name, value in medians.items():
            print(f"{name:>14}: {value * 1000:7.1f} ms/step  ratio {value / medians['bn']:.3f}")
        if args.record:
            record.append(
                "Cross-GPU BatchNorm overhead (`bench/cgbn_overhead.py`)",
                record.markdown_table(
                    ["processes x images", *medians],
                    [
                        [
                            f"{ctx.world_size} x {args.images} at {args.size} px",
                            *(
                                f"{v * 1000:.1f} ms ({v / medians['bn']:.3f})"
                                for v in medians.values()
                            ),
                        ]
                    ],
                ),  # fmt: skip
                f"Median step of the slower rank, {args.steps} steps per variant, taking turns; "
                f"{torch.get_num_threads()} thread(s) per process; ratio to per-process BN.",
            )
    dist.shutdown()


if __name__ == "__main__":
    main()
