"""What measuring the gradient noise scale costs (``train.gns``), and AGVM's half-batch
measurement at every step (``solver.module_lr=agvm`` with ``solver.agvm.interval=1``, its
most expensive setting): training steps of the demo detector with CGBN under DDP, with and
without ``NoiseScale``'s communication hook and its per-step measurement, same images.

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
from megdet.engine.noise_scale import NoiseScale, split_in_halves
from megdet.nn import training_norm
from megdet.plan import make_plan
from megdet.solver import set_lr
from megdet.solver.module_lr import AGVM
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
    batch = f"train.batch_size={args.images * ctx.world_size}"
    cfg = load_config(
        "default", [f"model.min_size={args.size}", f"model.max_size={args.size}", batch]
    )
    with tempfile.TemporaryDirectory() as tmp:
        generate_shapes(tmp, args.images * ctx.world_size, 0, size=args.size, seed=0)
        dataset = CocoDetection(
            read_coco(f"{tmp}/annotations/instances_train.json"), f"{tmp}/train"
        )
        start = ctx.rank * args.images
        images, targets = collate([dataset[i] for i in range(start, start + args.images)])

    plan = make_plan(cfg, ctx.world_size, len(dataset))  # CGBN over all processes, as trained
    norm = training_norm(cfg.model.norm, plan.bn_groups, ctx.world_size)
    runs = {}
    even = ctx.world_size % 2 == 0
    halves = split_in_halves(ctx.world_size, ctx.rank) if even else None
    for name in ("plain", "python_hook", "gns", "agvm")[: 4 if even else 3]:
        torch.manual_seed(0)
        model = build_detector(cfg.model, num_classes=3, norm=norm)
        ddp = DistributedDataParallel(model.to(ctx.device))
        noise = agvm = None
        if name == "python_hook":  # DDP's all-reduce through a Python hook, nothing measured
            ddp.register_comm_hook(None, default_hooks.allreduce_hook)
        groups = DetectionTask.parameter_groups(model)
        if name in ("gns", "agvm"):
            split = halves if name == "agvm" else None
            noise = NoiseScale(groups, args.images, ctx.world_size, halves=split)
            noise.attach(ddp)
        if name == "agvm":
            agvm = AGVM(list(groups), start=0, interval=1, momentum=0.9)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        runs[name] = (ddp, model, noise, agvm, optimizer)

    times: dict[str, list[float]] = {name: [] for name in runs}
    for step in range(args.steps + 3):
        for name, (ddp, model, noise, agvm, optimizer) in runs.items():
            dist.barrier()
            begin = time.perf_counter()
            if agvm is not None:
                noise.split_next()
            loss = sum(ddp(images, targets).values())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if noise is not None:
                noise.measure(model)
            if agvm is not None:  # the trainer's order: measure, update, set the lr, step
                agvm.update(noise.half_norms())
                set_lr(optimizer, 0.01, agvm.factors(step))
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
                        "AGVM, every step",
                    ][: 1 + len(cells)],
                    [[f"{ctx.world_size} x {args.images} at {args.size} px", *cells]],
                ),  # fmt: skip
                f"Median step of the slower rank, {args.steps} steps per variant, taking turns; "
                "demo detector, CGBN over all processes, DDP. The noise scale adds a squared "
                "norm per group and bucket in the comm hook, one more over the gradients after "
                "it, and an all-reduce of 5 numbers that overlaps the optimizer step. AGVM "
                "(every step; an odd number of processes has no halves): each bucket all-reduced "
                "within its half first (not with one process per half, whose gradient is its "
                "half's), squared norms of the halves, a wait for the 15 numbers, the lr update.",
            )
    dist.shutdown()


if __name__ == "__main__":
    main()
