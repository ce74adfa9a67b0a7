"""The cost of normalizing the RPN and RoI losses by the global batch's sample counts.

    torchrun --standalone --nproc-per-node 2 bench/loss_normalization.py --steps 30

Training steps of the demo detector (CGBN over all processes, the task's seeded samplers),
taking turns step by step: each process's losses divided by its own sample counts
(torchvision's), and by the global counts (``DetectionTask.global_batch_losses``: one
all-reduce of two numbers per step). Rank 0 prints the median step of the slower rank for
both and the median time spent in the extra all-reduce, which is an upper bound of its cost:
it includes waiting for the other process, a wait the next collective would have had anyway.
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
from megdet.data.coco import CocoDetection, collate
from megdet.data.shapes import generate_shapes
from megdet.nn import training_norm
from megdet.plan import make_plan
from megdet.tasks.detection.task import DetectionTask


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=8, help="images per process (the demo's)")
    parser.add_argument("--steps", type=int, default=30, help="timed steps per variant")
    parser.add_argument("--record", action="store_true", help="append to BENCHMARKS.md")
    args = parser.parse_args()

    ctx = dist.init_distributed()
    with tempfile.TemporaryDirectory() as tmp:
        generate_shapes(tmp, args.images * ctx.world_size, 0, size=128, seed=0)
        cfg = load_config("default", [f"data.train.json={tmp}/annotations/instances_train.json",
                                      f"train.batch_size={args.images * ctx.world_size}",
                                      f"data.train.images={tmp}/train"])  # fmt: skip
        task = DetectionTask(cfg)
        dataset = CocoDetection(task.train_index, cfg.data.train.images, seed=0, hflip=True)
        start = ctx.rank * args.images
        images, targets = collate([dataset[i] for i in range(start, start + args.images)])
        plan = make_plan(cfg, ctx.world_size, len(dataset))  # CGBN over all processes, as trained
        norm = training_norm(cfg.model.norm, plan.bn_groups, ctx.world_size)
        models = {}
        for name in ("own counts", "global counts"):
            torch.manual_seed(0)
            model = task.build_model(norm=norm).train()
            optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
            models[name] = (model, DistributedDataParallel(model), optimizer)

    times: dict[str, list[float]] = {name: [] for name in models}
    in_all_reduce: list[float] = []
    for step in range(args.steps + 3):
        for name, (model, ddp, optimizer) in models.items():
            dist.barrier()
            begin = time.perf_counter()
            task.begin_step(model, targets)
            losses = ddp(images, targets)
            if name == "global counts":
                before = time.perf_counter()
                losses = task.global_batch_losses(model, losses)
                if step >= 3:
                    in_all_reduce.append(time.perf_counter() - before)
            loss = sum(losses.values())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if step >= 3:  # warm-up steps are not timed
                times[name].append(time.perf_counter() - begin)

    medians = {
        name: max(dist.all_gather_object(statistics.median(values)))
        for name, values in times.items()
    }
    reduce_s = max(dist.all_gather_object(statistics.median(in_all_reduce)))
    if ctx.is_main:
        base = medians["own counts"]
        rows = [
            [name, f"{value * 1000:.1f}", f"{value / base:.3f}"] for name, value in medians.items()
        ]
        rows.append(["in the count all-reduce", f"{reduce_s * 1000:.2f}", f"{reduce_s / base:.4f}"])
        table = record.markdown_table(["losses divided by", "ms/step", "ratio"], rows)
        print(table)
        if args.record:
            record.append(
                "Global loss normalization (`bench/loss_normalization.py`)",
                table,
                f"{ctx.world_size} processes x {args.images} images, demo detector with CGBN, "
                f"{args.steps} steps per variant taking turns; median step of the slower rank; "
                "the last row is the median time inside the extra all-reduce (an upper bound: "
                "it includes waiting for the other process).",
            )
    dist.shutdown()


if __name__ == "__main__":
    main()
