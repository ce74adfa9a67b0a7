"""Hardware efficiency and the data pipeline of the demo detector, in one process.

    python bench/efficiency.py --steps 10

Prints the forward+backward FLOPs per image (``torch.utils.flop_counter.FlopCounterMode``;
torchvision's RoIAlign and NMS are custom ops it does not count), the FLOP/s a training step
achieves, the same process's dense float32 matmul FLOP/s as the peak to compare with, and the
loader's images/s alone (decode + flip + collate, the demo's ``data.num_workers``) next to the
training step's images/s.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import record
import torch
from torch.utils.flop_counter import FlopCounterMode


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=10, help="timed training steps")
    parser.add_argument("--images", type=int, default=8, help="images per step (the demo's)")
    parser.add_argument("--record", action="store_true", help="append to BENCHMARKS.md")
    args = parser.parse_args()

    from megdet.config import load_config
    from megdet.data.coco import CocoDetection, collate, read_coco
    from megdet.data.sampler import GlobalShuffleSampler
    from megdet.data.shapes import generate_shapes
    from megdet.nn import training_norm
    from megdet.tasks.detection.task import DetectionTask

    with tempfile.TemporaryDirectory() as tmp:
        generate_shapes(tmp, 400, 0, size=128, seed=0)
        cfg = load_config("default", [f"data.train.json={tmp}/annotations/instances_train.json",
                                      f"data.train.images={tmp}/train"])  # fmt: skip
        index = read_coco(cfg.data.train.json)
        dataset = CocoDetection(index, cfg.data.train.images, seed=0, hflip=True)
        steps = args.steps + 2
        sampler = GlobalShuffleSampler(len(dataset), args.images, 0, 1, 0, max_iter=steps * 4)
        loader = torch.utils.data.DataLoader(
            dataset, batch_sampler=sampler, num_workers=cfg.data.num_workers, collate_fn=collate
        )
        begin, count = time.perf_counter(), 0
        batches = []
        for images, targets in loader:
            count += len(images)
            batches.append((images, targets))
        loader_images_per_s = count / (time.perf_counter() - begin)

        torch.manual_seed(0)
        task = DetectionTask(cfg)  # the model with the task's seeded samplers, as in training
        model = task.build_model(norm=training_norm(cfg.model.norm)).train()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

        def step(images, targets):
            task.begin_step(model, targets)
            loss = sum(model(images, targets).values())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

        with FlopCounterMode(display=False) as counter:
            step(*batches[0])
        flops_per_image = counter.get_total_flops() / args.images
        times = []
        for images, targets in batches[1:steps]:
            begin = time.perf_counter()
            step(images, targets)
            times.append(time.perf_counter() - begin)
        step_s = statistics.median(times[1:])

    size = 1024
    a, b = torch.randn(size, size), torch.randn(size, size)
    for _ in range(3):
        a @ b
    begin, reps = time.perf_counter(), 20
    for _ in range(reps):
        a @ b
    peak = 2 * size**3 * reps / (time.perf_counter() - begin)

    achieved = flops_per_image * args.images / step_s
    train_images_per_s = args.images / step_s
    print(f"{torch.get_num_threads()} thread(s), {args.images} images of 128 px per step")
    print(f"forward+backward: {flops_per_image / 1e9:.2f} GFLOP per image (counted ops)")
    print(f"training step: {step_s * 1000:.0f} ms, {achieved / 1e9:.1f} GFLOP/s achieved")
    print(f"dense float32 matmul {size}^3: {peak / 1e9:.1f} GFLOP/s; "
          f"training reaches {achieved / peak:.1%} of it")  # fmt: skip
    print(f"loader alone ({cfg.data.num_workers} workers): {loader_images_per_s:.0f} images/s; "
          f"training: {train_images_per_s:.1f} images/s; "
          f"ratio {loader_images_per_s / train_images_per_s:.1f}x")  # fmt: skip
    if args.record:
        record.append(
            "Hardware efficiency and the data pipeline (`bench/efficiency.py`)",
            record.markdown_table(
                ["quantity", "value"],
                [
                    [
                        "forward + backward per image (RoIAlign, NMS not counted)",
                        f"{flops_per_image / 1e9:.2f} GFLOP",
                    ],
                    [
                        "training step",
                        f"{step_s * 1000:.0f} ms = {train_images_per_s:.1f} images/s",
                    ],
                    ["achieved", f"{achieved / 1e9:.1f} GFLOP/s"],
                    [f"dense float32 matmul {size}^3", f"{peak / 1e9:.1f} GFLOP/s"],
                    ["training / matmul peak", f"**{achieved / peak:.1%}**"],
                    [
                        f"loader alone ({cfg.data.num_workers} workers)",
                        f"{loader_images_per_s:.0f} images/s = "
                        f"**{loader_images_per_s / train_images_per_s:.1f}x** training",
                    ],
                ],
            ),  # fmt: skip
            f"{torch.get_num_threads()} thread(s), {args.images} images of 128 px per step.",
        )


if __name__ == "__main__":
    main()
