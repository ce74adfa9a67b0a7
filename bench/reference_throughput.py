"""Training throughput: megdet's trainer vs a loop written the way torchvision's
``references/detection`` (``train.py`` + ``engine.py``) trains, same detector, same images;
then megdet's scaling from 1 to 2 processes with CGBN.

    python bench/reference_throughput.py --iters 60

Each (loop, processes) pair runs in its own torchrun, as a user would start it: the reference
gets plain torchrun (one thread per process, no core binding), megdet its own launcher's
setup. Both train the demo detector (per-process BatchNorm, `norm: bn`) on the same 128 px
shapes with the same global batch; images/s is measured over the iterations after the first
`--warmup`, from the loop's own clock, without evaluation or checkpoint writing.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BATCH = 16  # global, as the demo


def reference_worker(data: Path, iters: int, warmup: int) -> dict:
    """torchvision's reference recipe: DistributedSampler + (Grouped)BatchSampler, SGD with a
    LinearLR warmup stepped every iteration, losses all-reduced and read (``.item()``) every
    iteration for the metric logger and the finite-loss check."""
    import torch
    import torch.distributed as dist
    from torch import nn
    from torch.utils.data import BatchSampler, DataLoader, DistributedSampler

    from megdet.data.coco import CocoDetection, collate, read_coco
    from megdet.tasks.detection.model import build_detector

    distributed = "RANK" in os.environ and int(os.environ["WORLD_SIZE"]) > 1
    if distributed:
        dist.init_process_group("gloo")
    world = dist.get_world_size() if distributed else 1
    from torchvision.ops import MultiScaleRoIAlign

    cfg = _config(data, ["model.channels_last=false"])  # torchvision's detection default
    index = read_coco(cfg.data.train.json)
    dataset = CocoDetection(index, cfg.data.train.images, hflip=True)
    torch.manual_seed(0)
    model = build_detector(cfg.model, index.num_classes, nn.BatchNorm2d)
    # torchvision's own pooler, with its RoIAlign kernels (megdet's has a faster CPU backward).
    pool = model.roi_heads.box_roi_pool
    model.roi_heads.box_roi_pool = MultiScaleRoIAlign(
        pool.featmap_names, pool.output_size, pool.sampling_ratio
    )
    if distributed:
        model = nn.parallel.DistributedDataParallel(model)
    sampler = (
        DistributedSampler(dataset) if distributed else torch.utils.data.RandomSampler(dataset)
    )
    # Every image here is 128 x 128: one aspect-ratio group, where the reference's
    # GroupedBatchSampler yields what BatchSampler does.
    batches = BatchSampler(sampler, BATCH // world, drop_last=True)
    loader = DataLoader(dataset, batch_sampler=batches, num_workers=0, collate_fn=collate)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=0.04, momentum=0.9, weight_decay=1e-4)
    warmup_iters = min(1000, len(loader) - 1)
    scheduler = torch.optim.lr_scheduler.LinearLR(
        optimizer, start_factor=0.001, total_iters=warmup_iters
    )
    model.train()
    done, epoch, start = 0, 0, None
    while done < iters:
        if distributed:
            sampler.set_epoch(epoch)
        for images, targets in loader:
            if done == warmup:
                start = time.perf_counter()
            targets = [{k: v for k, v in t.items() if k in ("boxes", "labels")} for t in targets]
            loss_dict = model(images, targets)
            losses = sum(loss_dict.values())
            reduced = _reduce_dict(loss_dict, world)
            loss_value = sum(reduced.values()).item()
            if not math.isfinite(loss_value):
                raise SystemExit(f"Loss is {loss_value}, stopping training")
            optimizer.zero_grad()
            losses.backward()
            optimizer.step()
            scheduler.step()
            _ = {k: v.item() for k, v in reduced.items()}  # the metric logger's update
            done += 1
            if done == iters:
                break
        epoch += 1
    seconds = time.perf_counter() - start
    return {"images_per_s": BATCH * (iters - warmup) / seconds, "world": world}


def _reduce_dict(values: dict, world: int) -> dict:
    import torch
    import torch.distributed as dist

    if world == 1:
        return values
    with torch.no_grad():
        names = sorted(values)
        stacked = torch.stack([values[k] for k in names])
        dist.all_reduce(stacked)
        return dict(zip(names, stacked / world, strict=True))


def megdet_worker(data: Path, iters: int, warmup: int, out: Path, overrides: list[str]) -> dict:
    """megdet's own trainer; images/s from the time it logs per iteration."""
    from megdet import dist
    from megdet.engine.trainer import train
    from megdet.tasks.detection.task import DetectionTask

    extra = [f"train.max_iter={iters}", "train.eval_period=0", "log.period=10", *overrides]
    cfg = _config(data, extra)
    ctx = dist.init_distributed()
    train(cfg, DetectionTask(cfg), out, ctx)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    timed = [r["time_per_iter"] for r in records if "time_per_iter" in r and r["iter"] > warmup]
    dist.shutdown()
    batch = cfg.train.batch_size
    return {"images_per_s": batch / (sum(timed) / len(timed)), "world": ctx.world_size}


def _run(loop, nproc, threads, tmp, args, run, overrides=()) -> float:
    out = Path(tmp) / f"run-{loop}-{nproc}-{threads}-{run}"
    out.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc-per-node={nproc}", __file__, "--worker", loop, "--data", tmp,
               "--out", str(out), "--iters", str(args.iters), "--warmup", str(args.warmup),
               *[f"--set={o}" for o in overrides]]  # fmt: skip
    proc = subprocess.run(command, capture_output=True, text=True, env=env)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode or not lines:
        raise SystemExit(proc.stderr[-3000:])
    return json.loads(lines[-1][7:])["images_per_s"]


def _config(data: Path, extra: tuple[str, ...] = ()):
    from megdet.config import load_config

    return load_config(
        "default",
        [
            f"data.train.json={data}/annotations/instances_train.json",
            f"data.train.images={data}/train",
            f"data.val.json={data}/annotations/instances_val.json",
            f"data.val.images={data}/val",
            "model.norm=bn",
            "log.tensorboard=false",
            *extra,
        ],
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--iters", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=10, help="untimed first iterations")
    parser.add_argument("--worker", choices=("reference", "megdet"), help=argparse.SUPPRESS)
    parser.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--set", action="append", default=[], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker == "reference":
        result = reference_worker(args.data, args.iters, args.warmup)
    elif args.worker == "megdet":
        result = megdet_worker(args.data, args.iters, args.warmup, args.out, args.set)
    if args.worker:
        if int(os.environ.get("RANK", "0")) == 0:
            print("RESULT " + json.dumps(result), flush=True)
        return

    from megdet.data.shapes import generate_shapes

    with tempfile.TemporaryDirectory() as tmp:
        generate_shapes(tmp, BATCH * args.iters, 8, size=128, seed=0)
        results: dict = {}
        for nproc in (1, 2):
            for run, loop in enumerate(("reference", "megdet") * 2):  # alternate: noise
                value = _run(loop, nproc, 2 // nproc, tmp, args, run, ["model.norm=bn"])
                results.setdefault((loop, nproc), []).append(round(value, 1))
        for nproc in (1, 2):
            ref, ours = max(results[("reference", nproc)]), max(results[("megdet", nproc)])
            print(
                f"{nproc} process(es) x {2 // nproc} thread(s), global batch {BATCH}, norm bn: "
                f"torchvision-reference loop {ref:.1f} images/s, megdet {ours:.1f} images/s, "
                f"ratio {ours / ref:.2f} (best of 2: {results[('reference', nproc)]} vs "
                f"{results[('megdet', nproc)]})"
            )

        cgbn = ["model.norm=cgbn"]
        scaling = {
            "1 process x 1 thread, batch 8": (1, 1, [*cgbn, "train.batch_size=8"]),
            "2 processes x 1 thread, batch 16": (2, 1, [*cgbn, "train.batch_size=16"]),
            "1 process x 2 threads, batch 16": (1, 2, [*cgbn, "train.batch_size=16"]),
        }
        speed = {}
        for run in range(2):
            for name, (nproc, threads, overrides) in scaling.items():
                value = _run("megdet", nproc, threads, tmp, args, 10 + run, overrides)
                speed[name] = max(speed.get(name, 0.0), value)
        one, two, threads = speed.values()
        print(
            f"scaling with CGBN: {one:.1f} images/s on 1 process x 1 thread, {two:.1f} on 2 "
            f"processes x 1 thread ({two / one:.2f}x, ideal 2.0), {threads:.1f} on 1 process x "
            f"2 threads at the same global batch ({two / threads:.2f}x)"
        )


if __name__ == "__main__":
    main()
