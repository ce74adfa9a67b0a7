"""Training throughput: megdet's trainer vs a loop written the way torchvision's
``references/detection`` (``train.py`` + ``engine.py``) trains, same detector, same images;
then megdet's scaling from 1 to 2 processes with CGBN.

    python bench/reference_throughput.py [--setups demo,r50] [--record]

Two detectors: ``demo`` (the demo's config, per-process BatchNorm, 128 px shapes, global batch
16 on 1 or 2 processes) and ``r50`` (the ``coco_r50_fpn`` preset at 512 px, frozen BN as
torchvision's default, 2 images per process). Each (loop, processes) pair runs in its own
torchrun, as a user would start it: the reference gets plain torchrun (one thread per process,
no core binding), torchvision's own RoIAlign pooler and NCHW tensors; megdet its launcher's setup
and its defaults. Both use the same model settings (RoIs per image, proposals, sampling ratio)
on the same images; images/s is measured over the iterations after the first ``--warmup``,
from each loop's own clock, without evaluation or checkpoint writing.
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

import record

# name: (preset, image size, overrides, images per process or None for a global batch of 16)
SETUPS = {
    "demo": ("default", 128, ["model.norm=bn"], None),
    "r50": ("coco_r50_fpn", 512, ["model.min_size=512", "model.max_size=512"], 2),
}


def reference_worker(data: Path, iters: int, warmup: int, preset: str, overrides: list[str]):
    """torchvision's reference recipe: DistributedSampler + (Grouped)BatchSampler, SGD with a
    LinearLR warmup stepped every iteration, losses all-reduced and read (``.item()``) every
    iteration for the metric logger and the finite-loss check; with ``train.amp`` its
    ``--amp``: autocast around the forward and a GradScaler (fp16 only)."""
    import torch
    import torch.distributed as dist
    from torch import nn
    from torch.utils.data import BatchSampler, DataLoader, DistributedSampler
    from torchvision.ops import FrozenBatchNorm2d, MultiScaleRoIAlign

    from megdet.data.coco import CocoDetection, collate, read_coco
    from megdet.tasks.detection.model import build_detector

    device = _device()
    distributed = "RANK" in os.environ and int(os.environ["WORLD_SIZE"]) > 1
    if distributed:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    world = dist.get_world_size() if distributed else 1
    cfg = _config(data, preset, [*overrides, "model.channels_last=false"])  # torchvision: NCHW
    batch = cfg.train.batch_size
    index = read_coco(cfg.data.train.json)
    dataset = CocoDetection(index, cfg.data.train.images, hflip=True)
    torch.manual_seed(0)
    norm = {"bn": nn.BatchNorm2d, "frozen": FrozenBatchNorm2d}[cfg.model.norm]
    model = build_detector(cfg.model, index.num_classes, norm).to(device)
    # torchvision's own pooler, with its RoIAlign kernels (megdet's has a faster CPU backward).
    pool = model.roi_heads.box_roi_pool
    model.roi_heads.box_roi_pool = MultiScaleRoIAlign(
        pool.featmap_names, pool.output_size, pool.sampling_ratio
    )
    if distributed:
        model = nn.parallel.DistributedDataParallel(model)
    half = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.train.amp)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.train.amp == "fp16")
    sampler = (
        DistributedSampler(dataset) if distributed else torch.utils.data.RandomSampler(dataset)
    )
    # Every image here is 128 x 128: one aspect-ratio group, where the reference's
    # GroupedBatchSampler yields what BatchSampler does.
    batches = BatchSampler(sampler, batch // world, drop_last=True)
    loader = DataLoader(
        dataset,
        batch_sampler=batches,
        num_workers=cfg.data.num_workers,
        collate_fn=collate,
        pin_memory=device.type == "cuda",
    )
    params = [p for p in model.parameters() if p.requires_grad]
    lr = cfg.solver.base_lr * batch / cfg.solver.base_batch  # the linear scaling rule, as megdet
    optimizer = torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=1e-4)
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
                _synchronize(device)
                start = time.perf_counter()
            images = [image.to(device, non_blocking=True) for image in images]
            targets = [{k: v.to(device) for k, v in t.items() if k in ("boxes", "labels")}
                       for t in targets]  # fmt: skip
            with torch.autocast(device.type, dtype=half, enabled=half is not None):
                loss_dict = model(images, targets)
            losses = sum(loss_dict.values())
            reduced = _reduce_dict(loss_dict, world)
            loss_value = sum(reduced.values()).item()
            if not math.isfinite(loss_value):
                raise SystemExit(f"Loss is {loss_value}, stopping training")
            optimizer.zero_grad()
            scaler.scale(losses).backward()
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            _ = {k: v.item() for k, v in reduced.items()}  # the metric logger's update
            done += 1
            if done == iters:
                break
        epoch += 1
    _synchronize(device)
    seconds = time.perf_counter() - start
    return {"images_per_s": batch * (iters - warmup) / seconds, "world": world,
            "peak_memory_gb": _peak_memory_gb(device)}  # fmt: skip


def _device():
    import torch

    if not torch.cuda.is_available():
        return torch.device("cpu")
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    torch.cuda.set_device(device)
    return device


def _synchronize(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_memory_gb(device) -> float | None:
    """The allocator's peak on a GPU (weights, activations, gradients, optimizer state)."""
    import torch

    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


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


def megdet_worker(data: Path, iters: int, warmup: int, out: Path, preset: str, overrides) -> dict:
    """megdet's own trainer; images/s from the time it logs per iteration."""
    from megdet import dist
    from megdet.engine.trainer import train
    from megdet.tasks.detection.task import DetectionTask

    # Logged every `warmup` iterations: the timed ones form whole logging windows.
    extra = [*overrides, f"train.max_iter={iters}", "train.eval_period=0", f"log.period={warmup}"]
    cfg = _config(data, preset, extra)
    ctx = dist.init_distributed()
    train(cfg, DetectionTask(cfg), out, ctx)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    timed = [r["time_per_iter"] for r in records if "time_per_iter" in r and r["iter"] > warmup]
    dist.shutdown()
    batch = cfg.train.batch_size
    return {"images_per_s": batch / (sum(timed) / len(timed)), "world": ctx.world_size,
            "peak_memory_gb": _peak_memory_gb(ctx.device)}  # fmt: skip


def _run(
    loop, nproc, threads, data, iters, warmup, run, preset, overrides, full=False, launch=True
):
    """One torchrun of ``loop``: its images/s (``full``: its whole result). ``launch=False``
    runs a single process without torchrun (a dry run: the same code, 3 s less)."""
    out = Path(data) / f"run-{loop}-{nproc}-{threads}-{run}"
    out.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    if not launch and nproc == 1:
        launcher = []
    command = [sys.executable, *launcher, __file__, "--worker", loop, "--data", str(data),
               "--out", str(out), "--iters", str(iters), "--warmup", str(warmup),
               "--preset", preset,
               *[f"--set={o}" for o in overrides]]  # fmt: skip
    proc = subprocess.run(command, capture_output=True, text=True, env=env)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode or not lines:
        raise SystemExit(proc.stderr[-3000:])
    result = json.loads(lines[-1][7:])
    return result if full else result["images_per_s"]


def _config(data: Path, preset: str, extra: list[str]):
    """``preset`` with ``extra`` overrides, trained on the shapes set in ``data``."""
    from megdet.config import load_config

    return load_config(
        preset,
        [
            f"data.train.json={data}/annotations/instances_train.json",
            f"data.train.images={data}/train",
            f"data.val.json={data}/annotations/instances_val.json",
            f"data.val.images={data}/val",
            "data.num_workers=0",
            "log.tensorboard=false",
            *extra,
        ],
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--setups", default="demo,r50", help="comma-separated: demo, r50")
    parser.add_argument("--iters", type=int, default=60, help="demo iterations per run")
    parser.add_argument("--warmup", type=int, default=10, help="untimed first iterations")
    parser.add_argument("--r50-iters", type=int, default=9)
    parser.add_argument("--r50-warmup", type=int, default=3)
    parser.add_argument("--record", action="store_true", help="append to BENCHMARKS.md")
    parser.add_argument("--worker", choices=("reference", "megdet"), help=argparse.SUPPRESS)
    parser.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--preset", help=argparse.SUPPRESS)
    parser.add_argument("--set", action="append", default=[], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker == "reference":
        result = reference_worker(args.data, args.iters, args.warmup, args.preset, args.set)
    elif args.worker == "megdet":
        result = megdet_worker(args.data, args.iters, args.warmup, args.out, args.preset, args.set)
    if args.worker:
        if int(os.environ.get("RANK", "0")) == 0:
            print("RESULT " + json.dumps(result), flush=True)
        return
    if (args.iters - args.warmup) % args.warmup or (args.r50_iters - args.r50_warmup) % (
        args.r50_warmup
    ):
        parser.error("iterations after the warmup must be a multiple of the warmup")

    from megdet.data.shapes import generate_shapes

    rows, notes = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.setups.split(","):
            preset, size, overrides, per_process = SETUPS[name]
            iters, warmup = (args.iters, args.warmup) if name == "demo" else (
                args.r50_iters, args.r50_warmup)  # fmt: skip
            data = Path(tmp) / name
            generate_shapes(data, 16 * iters, 8, size=size, seed=0)
            runs = 2 if name == "demo" else 1  # alternating, best kept: this VM's noise
            for nproc in (1, 2):
                batch = per_process * nproc if per_process else 16
                setting = [*overrides, f"train.batch_size={batch}"]
                speed: dict[str, list[float]] = {"reference": [], "megdet": []}
                for run in range(runs):
                    for loop in speed:
                        value = _run(loop, nproc, 2 // nproc, data, iters, warmup, run, preset,
                                     setting)  # fmt: skip
                        speed[loop].append(round(value, 3))
                ref, ours = max(speed["reference"]), max(speed["megdet"])
                rows.append([name, f"{nproc} x {2 // nproc}", batch, f"{ref:.3g}",
                             f"{ours:.3g}", f"**{ours / ref:.2f}**"])  # fmt: skip
                print(rows[-1], speed, flush=True)
        if "demo" in args.setups.split(","):
            notes.append(_scaling(Path(tmp) / "demo", args))
    table = record.markdown_table(
        ["detector", "processes x threads", "global batch", "reference images/s",
         "megdet images/s", "megdet / reference"], rows)  # fmt: skip
    print(table)
    print("\n".join(notes))
    if args.record:
        record.append(
            "Training throughput vs torchvision's reference loop (`bench/reference_throughput.py`)",
            table,
            "\n".join([*notes, "demo: best of 2 alternating runs per loop; r50: 1 run each."]),
        )


def _scaling(data: Path, args) -> str:
    """Same per-process batch, CGBN on: 1 x 1 vs 2 x 1, and 2 x 1 vs 1 process x 2 threads."""
    base = ["model.norm=cgbn"]
    scaling = {
        "1 x 1, batch 8": (1, 1, [*base, "train.batch_size=8"]),
        "2 x 1, batch 16": (2, 1, [*base, "train.batch_size=16"]),
        "1 x 2, batch 16": (1, 2, [*base, "train.batch_size=16"]),
    }
    speed: dict[str, float] = {}
    for run in range(2):
        for name, (nproc, threads, overrides) in scaling.items():
            value = _run("megdet", nproc, threads, data, args.iters, args.warmup, 10 + run,
                         "default", overrides)  # fmt: skip
            speed[name] = max(speed.get(name, 0.0), value)
    one, two, threads = speed.values()
    return (
        f"Scaling with CGBN (demo, best of 2): {one:.1f} images/s on 1 process x 1 thread, "
        f"{two:.1f} on 2 processes x 1 thread (**{two / one:.2f}x**, ideal 2.0), {threads:.1f} "
        f"on 1 process x 2 threads at the same global batch (2 x 1 is {two / threads:.2f}x that)."
    )


if __name__ == "__main__":
    main()
