"""The figures only a GPU machine gives (issue 18), one part at a time, each printing its table.

    python bench/device_figures.py throughput   # ResNet-50 FPN at 800 x 1333: megdet vs reference
    python bench/device_figures.py memory       # the same, train.checkpointing none vs stages
    python bench/device_figures.py bn           # CGBN vs nn.SyncBatchNorm vs BN, per layer
    python bench/device_figures.py scaling      # CPU: CGBN over 1, 2, 4, 8 gloo processes

``bench/device_suite.sh`` runs them all; ``--dry-run`` shrinks every size so that the whole set
runs on a CPU in about a minute (a test does, so the suite cannot rot). Training runs are
separate torchruns of ``bench/reference_throughput.py``'s two loops (megdet's trainer, and the
loop torchvision's references write), same detector, same images; images/s is measured after
the first iterations, peak memory is the CUDA allocator's.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import record
from reference_throughput import _run

from megdet.plan import precision_note

# ResNet-50 FPN at COCO's sizes. From random weights (no ImageNet download on an offline
# machine; weights do not change the speed), so with per-process BN and nothing frozen, and a
# small lr: without normalization a random ResNet-50 overflows within a few steps.
R50 = ["model.backbone_weights=none", "model.norm=bn", "model.frozen_stages=0",
       "solver.base_lr=0.002", "data.num_workers=4", "train.eval_period=0"]  # fmt: skip


def _sizes(dry: bool) -> dict:
    if dry:  # the tiny backbone: every code path in seconds (fp16 on a CPU is very slow)
        # bf16 autocast only where the CPU multiplies bfloat16 natively: without it (an AVX2
        # EPYC, Zen 3) a step is 37x slower and the step outlasts its 300 s limit.
        amp = ("bf16",) if precision_note("bf16") is None else ("none",)
        return {"height": 64, "width": 96, "images": (2,), "iters": 4, "warmup": 2,
                "amp": amp, "processes": (1, 2), "demo_size": 64, "launch": False,
                "threads": 1,
                "model": ["model.backbone=tiny", "model.frozen_stages=0",
                          "data.num_workers=0"]}  # fmt: skip
    return {"height": 800, "width": 1333, "images": (2, 8), "iters": 12, "warmup": 4,
            "amp": ("none", "fp16"), "processes": (1, 2, 4, 8), "demo_size": 128, "launch": True,
            "threads": os.cpu_count(),
            "model": []}  # fmt: skip


def _data(folder: Path, sizes: dict, count: int) -> Path:
    from megdet.data.shapes import generate_shapes

    data = folder / f"shapes-{sizes['height']}x{sizes['width']}"
    if not data.exists():
        generate_shapes(data, count, 4, size=sizes["height"], seed=0, width=sizes["width"])
    return data


def _r50(sizes: dict) -> list[str]:
    side = [f"model.min_size={min(sizes['height'], sizes['width'])}",
            f"model.max_size={max(sizes['height'], sizes['width'])}"]  # fmt: skip
    return [*R50, *side, *sizes["model"]]


def throughput(folder: Path, sizes: dict) -> tuple[str, str]:
    """megdet vs the reference loop, images per GPU x float32/AMP, one process each."""
    data = _data(folder, sizes, 4 * max(sizes["images"]))
    rows = []
    for images in sizes["images"]:
        for amp in sizes["amp"]:
            overrides = [*_r50(sizes), f"train.batch_size={images}", f"train.amp={amp}"]
            result = {}
            for loop in ("reference", "megdet"):
                result[loop] = _run(loop, 1, sizes["threads"], data, sizes["iters"],
                                    sizes["warmup"], f"{images}{amp}", "coco_r50_fpn",
                                    overrides, full=True, launch=sizes["launch"])  # fmt: skip
            ref, ours = result["reference"]["images_per_s"], result["megdet"]["images_per_s"]
            rows.append([
                images, amp, f"{images / ref:.3f}", f"{images / ours:.3f}", f"{ref:.2f}",
                f"{ours:.2f}", f"**{ours / ref:.2f}**", _gb(result["reference"]),
                _gb(result["megdet"]),
            ])  # fmt: skip
            print(rows[-1], flush=True)
    header = ["images/GPU", "amp", "reference s/iter", "megdet s/iter", "reference images/s",
              "megdet images/s", "megdet / reference", "reference peak GB",
              "megdet peak GB"]  # fmt: skip
    note = (
        f"ResNet-50 FPN (`coco_r50_fpn`, per-process BN, random init) on {sizes['height']} x "
        f"{sizes['width']} shapes images, 1 process, {sizes['iters']} iterations of which the "
        f"first {sizes['warmup']} untimed; amp fp16: autocast + GradScaler in both loops."
    )
    return record.markdown_table(header, rows), note


def memory(folder: Path, sizes: dict) -> tuple[str, str]:
    """megdet's peak GPU memory and speed with activation checkpointing off and on."""
    data = _data(folder, sizes, 4 * max(sizes["images"]))
    images = max(sizes["images"])
    rows = []
    for mode in ("none", "stages"):
        overrides = [*_r50(sizes), f"train.batch_size={images}", f"train.checkpointing={mode}"]
        result = _run("megdet", 1, sizes["threads"], data, sizes["iters"], sizes["warmup"],
                      f"mem-{mode}", "coco_r50_fpn", overrides, full=True,
                      launch=sizes["launch"])  # fmt: skip
        rows.append([mode, images, f"{images / result['images_per_s']:.3f}", _gb(result)])
        print(rows[-1], flush=True)
    header = ["train.checkpointing", "images/GPU", "s/iter", "peak GB"]
    return record.markdown_table(header, rows), "float32, otherwise as the throughput table."


def bn_layers(folder: Path, sizes: dict) -> tuple[str, str]:
    """Forward + backward of one normalization layer on ResNet-50 FPN activation shapes."""
    import torch
    import torch.distributed as tdist
    from torch import nn

    from megdet.nn.cgbn import CrossGPUBatchNorm2d

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not tdist.is_initialized():  # SyncBatchNorm needs a process group, even of one
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
        tdist.init_process_group("gloo", rank=0, world_size=1)
    images = max(sizes["images"])
    scale = sizes["height"] / 800
    shapes = [(256, 200, 336), (512, 100, 168), (1024, 50, 84), (2048, 25, 42)]
    shapes = [(c, max(2, round(h * scale)), max(2, round(w * scale))) for c, h, w in shapes]
    layers = {
        "nn.BatchNorm2d": lambda c: nn.BatchNorm2d(c),
        "nn.SyncBatchNorm": lambda c: nn.SyncBatchNorm(c),  # GPU only: refuses CPU tensors
        "CGBN": lambda c: CrossGPUBatchNorm2d(c),
        "CGBN, BN size = half the images": lambda c: CrossGPUBatchNorm2d(
            c, local_group_size=max(1, images // 2)
        ),
    }
    rows = []
    for c, h, w in shapes:
        x = torch.randn(images, c, h, w, device=device, requires_grad=True)
        dy = torch.randn_like(x)
        modules = {name: make(c).to(device).train() for name, make in layers.items()}
        if device.type == "cpu":
            modules.pop("nn.SyncBatchNorm")
        times = {name: [] for name in modules}
        for repeat in range(3 if sizes["height"] < 800 else 25):
            for name, module in modules.items():  # taking turns: noise hits all alike
                _sync(device)
                begin = time.perf_counter()
                module(x).backward(dy)
                _sync(device)
                if repeat >= 2:
                    times[name].append(time.perf_counter() - begin)
        base = statistics.median(times["nn.BatchNorm2d"])
        row = [f"{images} x {c} x {h} x {w}"]
        for name in layers:
            if name not in times:
                row.append("n/a (CPU)")
                continue
            ms = statistics.median(times[name])
            row.append(f"{1000 * ms:.3f} ({ms / base:.2f}x)")
        rows.append(row)
        print(rows[-1], flush=True)
    header = ["activation", *[f"{name} ms" for name in layers]]
    note = (
        f"float32 on {device}, one process: forward + backward of one layer, median of the "
        "timed repeats, ratio to nn.BatchNorm2d. With one process CGBN and SyncBatchNorm "
        "both take ATen's kernels; the chunked variant is CGBN's own arithmetic."
    )
    return record.markdown_table(header, rows), note


def scaling(folder: Path, sizes: dict) -> tuple[str, str]:
    """CPU only: the demo detector, 8 images per process, CGBN over all processes."""
    from megdet.data.shapes import generate_shapes

    data = folder / "demo-shapes"
    size = sizes["demo_size"]
    if not data.exists():
        generate_shapes(data, 8 * max(sizes["processes"]) * 2, 4, size=size, seed=0)
    hidden = os.environ.pop("CUDA_VISIBLE_DEVICES", None)
    os.environ["CUDA_VISIBLE_DEVICES"] = ""  # gloo on CPU, as the machines without a GPU
    try:
        speed = {}
        for nproc in sizes["processes"]:
            overrides = ["model.norm=cgbn", f"train.batch_size={8 * nproc}", "solver.base_lr=0.01",
                         f"model.min_size={size}", f"model.max_size={size}",
                         "train.eval_period=0"]  # fmt: skip
            speed[nproc] = _run("megdet", nproc, 1, data, sizes["iters"], sizes["warmup"],
                                f"scale-{nproc}", "default", overrides)  # fmt: skip
            print(nproc, speed[nproc], flush=True)
    finally:
        os.environ.pop("CUDA_VISIBLE_DEVICES")
        if hidden is not None:
            os.environ["CUDA_VISIBLE_DEVICES"] = hidden
    one = speed[sizes["processes"][0]]
    rows = [[n, f"{v:.1f}", f"{v / one:.2f}", f"**{v / (one * n):.2f}**"] for n, v in speed.items()]
    header = ["processes x 1 thread", "images/s", "speedup", "of ideal"]
    note = f"Demo detector at {size} px, 8 images per process, CGBN over all processes, gloo."
    return record.markdown_table(header, rows), note


def _gb(result: dict) -> str:
    value = result.get("peak_memory_gb")
    return "n/a (CPU)" if value is None else f"{value:.2f}"


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


PARTS = {"throughput": throughput, "memory": memory, "bn": bn_layers, "scaling": scaling}
TITLES = {
    "throughput": "GPU training throughput, ResNet-50 FPN: megdet vs torchvision's reference loop",
    "memory": "GPU memory with activation checkpointing, ResNet-50 FPN",
    "bn": "CGBN vs nn.SyncBatchNorm vs nn.BatchNorm2d, per layer",
    "scaling": "CPU scaling of CGBN over gloo processes",
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("part", choices=tuple(PARTS))
    parser.add_argument("--dry-run", action="store_true", help="toy sizes, any machine")
    parser.add_argument("--data", type=Path, help="folder for generated images (kept)")
    parser.add_argument("--record", action="store_true", help="append to BENCHMARKS.md")
    args = parser.parse_args()
    sizes = _sizes(args.dry_run)
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.data or Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        table, note = PARTS[args.part](folder, sizes)
    print(f"### {TITLES[args.part]}\n\n{table}\n\n{note}", flush=True)
    if args.record:
        record.append(f"{TITLES[args.part]} (`bench/device_figures.py {args.part}`)", table, note)


if __name__ == "__main__":
    main()
