"""One training step of a detector under each speed option, side by side.

    python bench/step_variants.py [--detector demo|r50] [--steps 15] [--threads 1] [--record]

Variants, each a fresh model with the same seed on the same batches, in one process: ``demo``
is the demo's detector with per-process BN on 8 images of 128 px, ``r50`` the ``coco_r50_fpn``
preset (frozen BN) on 2 images of 512 px.
- ``torchvision``: NCHW tensors and torchvision's RoIAlign (what megdet did before issue 7);
- ``fast_roi_align``: megdet's RoIAlign (vectorized CPU backward);
- ``channels_last``: plus NHWC convolutions (``model.channels_last``, on in the demo preset);
- ``compile``: plus ``torch.compile`` of the backbone + FPN (compilation not timed);
- ``bf16``: plus bf16 autocast (CPU).
The variants take turns step by step, so a slow moment of the machine hits them alike; the
median step is printed with the ratio to the first variant.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import record
import torch
from torchvision.ops import MultiScaleRoIAlign

VARIANTS = ("torchvision", "fast_roi_align", "channels_last", "compile", "bf16")
# name: (preset, overrides, images per step, image size, norm)
DETECTORS = {
    "demo": ("default", [], 8, 128, "bn"),
    "r50": ("coco_r50_fpn", ["model.min_size=512", "model.max_size=512"], 2, 512, "frozen"),
}


def build(variant: str, detector: str, overrides: list[str]):
    """(task, model, optimizer) of one variant, same seed as the others."""
    from megdet.config import load_config
    from megdet.nn import norm_layer
    from megdet.tasks.detection.task import DetectionTask

    preset, extra, _, _, norm = DETECTORS[detector]
    nchw = variant in ("torchvision", "fast_roi_align")
    layout = f"model.channels_last={not nchw}"
    task = DetectionTask(load_config(preset, [*overrides, *extra, layout]))
    torch.manual_seed(0)
    model = task.build_model(norm=norm_layer(norm)).train()
    if variant == "torchvision":
        pool = model.roi_heads.box_roi_pool
        model.roi_heads.box_roi_pool = MultiScaleRoIAlign(
            pool.featmap_names, pool.output_size, pool.sampling_ratio
        )
    if variant in ("compile", "bf16"):
        model.backbone = torch.compile(model.backbone)
    return task, model, torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--detector", choices=tuple(DETECTORS), default="demo")
    parser.add_argument("--steps", type=int, default=15, help="timed steps per variant")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--record", action="store_true", help="append to BENCHMARKS.md")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from megdet.data.coco import CocoDetection, collate, read_coco
    from megdet.data.sampler import GlobalShuffleSampler
    from megdet.data.shapes import generate_shapes

    variants = args.variants.split(",")
    _, _, images, size, norm = DETECTORS[args.detector]
    with tempfile.TemporaryDirectory() as tmp:
        generate_shapes(tmp, images * (args.steps + 3), 0, size=size, seed=0)
        overrides = [f"data.train.json={tmp}/annotations/instances_train.json",
                     f"data.train.images={tmp}/train"]  # fmt: skip
        index = read_coco(f"{tmp}/annotations/instances_train.json")
        dataset = CocoDetection(index, f"{tmp}/train", seed=0, hflip=True)
        sampler = GlobalShuffleSampler(len(dataset), images, 0, 1, 0, max_iter=args.steps + 3)
        batches = list(torch.utils.data.DataLoader(dataset, batch_sampler=sampler,
                                                   collate_fn=collate))  # fmt: skip
        built = {name: build(name, args.detector, overrides) for name in variants}
        times: dict[str, list[float]] = {name: [] for name in variants}
        compile_s = 0.0
        for step, (images, targets) in enumerate(batches):
            for name, (task, model, optimizer) in built.items():
                begin = time.perf_counter()
                task.begin_step(model, targets)
                with torch.autocast("cpu", torch.bfloat16, enabled=name == "bf16"):
                    loss = sum(model(images, targets).values())
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                elapsed = time.perf_counter() - begin
                if step >= 3:  # the first steps warm up (and compile)
                    times[name].append(elapsed)
                elif name == "compile" and step == 0:
                    compile_s = elapsed
    base = statistics.median(times[variants[0]])
    rows = []
    for name in variants:
        median = statistics.median(times[name])
        rows.append([name, f"{median * 1000:.1f} ms", f"{base / median:.2f}x"])
        print(f"{name:>15}: {median * 1000:7.1f} ms/step, {base / median:.2f}x the first")
    if "compile" in variants:
        print(f"compiling the backbone took {compile_s:.0f} s (first step)")
    if args.record:
        record.append(
            "Training step under each speed option (`bench/step_variants.py`)",
            record.markdown_table(["variant (cumulative)", "median step", "speed-up"], rows),
            f"`{args.detector}`: one process, {args.threads} thread(s), {images} images of "
            f"{size} px, norm {norm}, "
            f"{args.steps} timed steps per variant taking turns"
            + (f"; compiling took {compile_s:.0f} s." if "compile" in variants else "."),
        )


if __name__ == "__main__":
    main()
