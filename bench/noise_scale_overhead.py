"""What measuring the gradient noise scale costs (``train.gns``): training steps of the demo
detector with CGBN under DDP, with and without ``NoiseScale``'s communication hook and its
per-step measurement, same images.

    torchrun --standalone --nproc-per-node 2 bench/noise_scale_overhead.py --images 8 --steps 20

The two variants take turns step by step so that machine noise hits them alike; each step
starts after a barrier. Rank 0 prints the median step of the slower rank and the ratio.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import record
import torch
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.nn.parallel import DistributedDataParallel

from megdet import dist
from megdet.config import load_config
from megdet.data.coco import CocoDetection, collate, read_coco
from megdet.data.shapes import generate_shapes
from megdet.engine.noise_scale import NoiseScale
from megdet.nn import norm_layer
from megdet.tasks.detection.model import build_detector
from megdet.tasks.detection.task import DetectionTask


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=8, help="images per process")
    parser.add_argument("--size", type=int, default=128, help="image side")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per variant")
    parser.add_argument("--record", action="store_true", help="append to BENCHMARKS.md")
    args = parser.parse_args()

    ctx = dist.init_distributed()
    if ctx.world_size < 2:
        raise SystemExit("run with torchrun over 2+ processes: the noise scale needs them")
    cfg = load_config("default", [f"model.min_size={args.size}", f"model.max_size={args.size}"])
    with tempfile.TemporaryDirectory() as tmp:
        generate_shapes(tmp, args.images * ctx.world_size, 0, size=args.size, seed=0)
        dataset = CocoDetection(
            read_coco(f"{tmp}/annotations/instances_train.json"), f"{tmp}/train"
        )
        start = ctx.rank * args.images
        images, targets = collate([dataset[i] for i in range(start, start + args.images)])

    group = dist.own_group([list(range(ctx.world_size))])
    runs = {}
    for name in ("plain", "python_hook", "gns"):
        torch.manual_seed(0)
        model = build_detector(cfg.model, num_classes=3, norm=norm_layer("cgbn", group))
        ddp = DistributedDataParallel(model.to(ctx.device))
        noise = None
        if name == "python_hook":  # DDP's all-reduce through a Python hook, nothing measured
            ddp.register_comm_hook(None, default_hooks.allreduce_hook)
        if name == "gns":
            groups = DetectionTask.parameter_groups(model)
            noise = NoiseScale(groups, args.images, ctx.world_size)
            noise.attach(ddp)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        runs[name] = (ddp, model, noise, optimizer)

    times: dict[str, list[float]] = {name: [] for name in runs}
    for step in range(args.steps + 3):
        for name, (ddp, model, noise, optimizer) in runs.items():
            dist.barrier()
            begin = time.perf_counter()
            loss = sum(ddp(images, targets).values())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if noise is not None:
                noise.measure(model)
            optimizer.step()
            if step >= 3:  # warm-up steps are not timed
                times[name].append(time.perf_counter() - begin)

    medians = {  # the slowest rank sets the pace of a synchronous step
        name: max(dist.all_gather_object(statistics.median(values)))
        for name, values in times.items()
    }
    if ctx.is_main:
        print(
            f"{ctx.world_size} processes x {args.images} images at {args.size} px, "
            f"{args.steps} steps per variant"
        )
        for name, value in medians.items():
            print(f"{name:>12}: {value * 1000:7.1f} ms/step  ratio {value / medians['plain']:.3f}")
        if args.record:
            cells = [f"{v * 1000:.1f} ms ({v / medians['plain']:.3f})" for v in medians.values()]
            record.append(
                "Gradient noise scale overhead (`bench/noise_scale_overhead.py`)",
                record.markdown_table(
                    [
                        "processes x images",
                        "plain DDP",
                        "DDP, Python all-reduce hook",
                        "with train.gns",
                    ],
                    [[f"{ctx.world_size} x {args.images} at {args.size} px", *cells]],
                ),  # fmt: skip
                f"Median step of the slower rank, {args.steps} steps per variant, taking turns; "
                "demo detector, CGBN over all processes, DDP. The noise scale adds a squared "
                "norm per group and bucket in the comm hook, one more over the gradients after "
                "it, and an all-reduce of 5 numbers that overlaps the optimizer step.",
            )
    dist.shutdown()


if __name__ == "__main__":
    main()
