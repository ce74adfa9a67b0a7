"""``megdet plan --from RUN``: the time to a run's accuracy on k devices, projected from what
the run measured (issue 28).

**Steps** (McCandlish et al. 2018, "An Empirical Model of Large-Batch Training"): a step at
batch B, where the gradient noise scale is B_noise, makes 1 / (1 + B_noise / B) of the progress
of a step with the true gradient, so a stretch of training that takes S_min such steps takes
S_min (1 + B_noise / B) at batch B. The run's logged noise scale changes over training (10-18
images early in the demo, 100-500 later), so the model is applied window by window: per epoch
of the run, its steps there give S_min for that epoch at the epoch's noise scale (a ratio of
the epoch's mean tr(Sigma) and mean |G|^2: the logged EMAs are noisy, single |G|^2 estimates
even negative), and batch B needs the sum over epochs. Under AdaScale the run's logged gain is
this model's ratio of steps measured (r = (1 + B_noise / b0) / (1 + B_noise / B)): the noise
scale is read from the gain. The model assumes each batch trains at its best lr (a rule that
diverges is outside it) and says nothing about where a large batch's accuracy ends.

**Step time**: t(n, k) = fixed + n x per_image + overhead + a ring all-reduce of the gradient
over k devices, 2 (k - 1) / k x bytes / bus bandwidth; fixed and per_image measured at two
images per device on one process of this machine (forward, backward, the optimizer's step; on a
CPU with the threads one of the run's processes had), the bus bandwidth given or measured here
over gloo between two local processes. ``overhead`` is what that leaves out and the run paid:
its input pipeline, CGBN's per-layer collectives, the hooks, the log. It is calibrated as the
run's logged step time minus the model's at the run's own point, and taken as a constant per
step (none where the run computed on another kind of device than the measurement). No overlap
of the all-reduce with backward is assumed (DDP overlaps part of it): an upper bound.
"""

from __future__ import annotations

import json
import math
import os
import socket
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from megdet.errors import MegdetError
from megdet.report import CURVES, per_epoch, read_run

SLOWER = 0.9  # "more devices stop helping": the best time improves by less than 10% a step


@dataclass(frozen=True)
class Window:
    """A stretch of the run: the steps it took there and the noise scale measured over it
    (``math.inf``: all noise, where |G|^2 came out <= 0)."""

    epoch: int
    first_iter: int  # the run's iterations (first_iter, last_iter]
    last_iter: int
    noise_scale: float  # the whole model's
    modules: dict[str, float] = field(default_factory=dict)  # each module group's

    @property
    def steps(self) -> int:
        return self.last_iter - self.first_iter

    def ratio(self, batch: float, run_batch: float, pace: str = "model") -> float:
        """Steps at ``batch`` per step of the run here. ``pace`` model: the whole model's
        noise scale; module: the module group that needs the most steps sets the pace."""
        if pace == "module" and self.modules:
            return max(step_ratio(n, batch, run_batch) for n in self.modules.values())
        return step_ratio(self.noise_scale, batch, run_batch)


def step_ratio(noise_scale: float, batch: float, run_batch: float) -> float:
    """Steps at ``batch`` per step at ``run_batch`` where the noise scale is ``noise_scale``:
    (1 + B_noise / batch) / (1 + B_noise / run_batch)."""
    if math.isinf(noise_scale):
        return run_batch / batch
    return (1 + noise_scale / batch) / (1 + noise_scale / run_batch)


def noise_from_gain(gain: float, base_batch: int, batch: int) -> float:
    """The noise scale at which AdaScale's gain at ``batch`` over ``base_batch`` is ``gain``
    (the gain's formula solved for B_noise); 0 at gain 1, infinite at gain batch / base."""
    if gain <= 1:
        return 0.0
    slope = 1 / base_batch - gain / batch
    return math.inf if slope <= 0 else (gain - 1) / slope


def steps_at(
    windows: list[Window],
    batch: int,
    run_batch: int,
    until: int | None = None,
    pace: str = "model",
) -> float:
    """The steps batch ``batch`` needs for what the run did in ``windows`` (up to its
    iteration ``until``; a window it cuts counts in part); ``pace``: ``Window.ratio``'s."""
    total = 0.0
    for window in windows:
        end = window.last_iter if until is None else min(window.last_iter, until)
        if end > window.first_iter:
            total += (end - window.first_iter) * window.ratio(batch, run_batch, pace)
    return total


@dataclass(frozen=True)
class StepTime:
    """Seconds per training step of n images per device on k devices."""

    fixed_s: float
    per_image_s: float
    gradient_bytes: int
    bus_bandwidth: float  # bytes/s
    measured: dict  # images per device -> seconds, the points the line goes through
    overhead_s: float = 0.0  # per step, what the run paid beyond the measured parts
    threads: int | None = None  # the CPU threads the points were measured with

    def all_reduce_s(self, devices: int) -> float:
        if devices < 2:
            return 0.0
        return 2 * (devices - 1) / devices * self.gradient_bytes / self.bus_bandwidth

    def seconds(self, per_device: int, devices: int) -> float:
        return (self.fixed_s + per_device * self.per_image_s + self.overhead_s
                + self.all_reduce_s(devices))  # fmt: skip


@dataclass
class RunSummary:
    """What the projection reads of a run folder."""

    path: Path
    global_batch: int
    base_batch: int
    world_size: int
    images_per_device: int
    num_train_images: int
    adascale: bool
    steps: int  # the steps it took
    metric: str
    lower_is_better: bool
    final: float  # the metric at its last evaluation, in percent
    evals: list[tuple[int, float]]  # (iteration, metric in percent)
    logged_step_s: float | None  # the median logged seconds per step after the first record
    hardware: dict | None  # plan.json's: device, name, threads per process (None: older runs)
    windows: list[Window]
    unmeasured: list[int]  # epochs without a usable noise scale (filled from the others)

    def reached(self, target: float) -> int | None:
        """The first evaluated iteration at which the metric reached ``target`` (percent)."""
        for iteration, value in self.evals:
            if (value <= target) if self.lower_is_better else (value >= target):
                return iteration
        return None


def summarize_run(run_dir: Path) -> RunSummary:
    """The noise-scale windows, evaluations and logged step times of a finished run; one-line
    errors for a folder that is not a run or a run that measured no noise scale."""
    run_dir = Path(run_dir)
    plan_file = run_dir / "plan.json"
    if not run_dir.is_dir() or not plan_file.is_file() or not (run_dir / "metrics.jsonl").is_file():
        raise MegdetError(
            f"--from {run_dir}: not a megdet run folder (no plan.json and metrics.jsonl); pass "
            "a folder written by `megdet train`"
        )
    log = read_run(run_dir)  # one-line errors for a broken metrics.jsonl
    try:
        plan = json.loads(plan_file.read_text())
        batch, base, world = plan["global_batch"], plan["base_batch"], plan["world_size"]
        per_device, images = plan["images_per_device"], plan["num_train_images"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise MegdetError(f"{plan_file}: not a megdet plan ({exc})") from None
    adascale = plan.get("lr_scaling") == "adascale"
    training = sorted({r["iter"]: r for r in log.train}.values(), key=lambda r: r["iter"])
    if not any("grad_sq" in r for r in training):
        raise MegdetError(
            f"--from {run_dir}: the run logged no gradient noise scale (it ran on one process, "
            "or with train.gns: false); projecting needs a run of 2+ processes with train.gns: "
            "true"
        )
    windows, unmeasured = _windows(training, batch, base, adascale)
    metric = next((m for m in CURVES for r in log.evals if m in r["eval"]), None)
    evals = [(r["iter"], 100 * r["eval"][metric]) for r in log.evals if metric] if metric else []
    if not evals:
        raise MegdetError(
            f"--from {run_dir}: the run has no evaluation to project to (eval/metrics.json "
            "and its per-epoch evaluations are missing); let it finish, or run megdet eval"
        )
    # The first record holds the start-up; the median passes over the evaluations' spikes.
    times = [r["time_per_iter"] for r in training[1:] if "time_per_iter" in r]
    return RunSummary(
        path=run_dir,
        global_batch=batch,
        base_batch=base,
        world_size=world,
        images_per_device=per_device,
        num_train_images=images,
        adascale=adascale,
        steps=training[-1]["iter"],
        metric=metric,
        lower_is_better=metric.endswith("_err"),
        final=evals[-1][1],
        evals=evals,
        logged_step_s=statistics.median(times) if times else None,
        hardware=plan.get("hardware"),
        windows=windows,
        unmeasured=unmeasured,
    )


def _windows(
    training: list[dict], batch: int, base: int, adascale: bool
) -> tuple[list[Window], list[int]]:
    """One window per epoch of the run (of progress under AdaScale, as its log counts), with
    the whole model's noise scale and each module group's; the epochs without a whole-model
    estimate."""
    last_iter: dict[int, int] = {}
    for record in training:
        last_iter[max(1, math.ceil(record["epoch"] - 1e-9))] = record["iter"]
    groups = sorted({k[len("grad_sq_") :] for r in training for k in r if k.startswith("grad_sq_")})
    model, unmeasured = _noise_per_epoch(training, "", batch, base, adascale, last_iter)
    modules = {g: _noise_per_epoch(training, f"_{g}", batch, base, adascale, last_iter)[0]
               for g in groups}  # fmt: skip
    windows, first = [], 0
    for epoch, end in last_iter.items():
        per_module = {g: values[epoch] for g, values in modules.items()}
        windows.append(Window(epoch, first, end, model[epoch], per_module))
        first = end
    return windows, unmeasured


def _noise_per_epoch(
    training: list[dict], suffix: str, batch: int, base: int, adascale: bool, epochs
) -> tuple[dict[int, float], list[int]]:
    """The noise scale of the parameters ``suffix`` names ("" all, "_rpn" a group) per epoch:
    from the logged gain under AdaScale, else the ratio of the epoch's means. An epoch with no
    estimate, or one that is all noise, takes the largest measured one (the optimistic side
    of what the run showed; the epochs are returned, and said in the output)."""
    variance = per_epoch(training, f"grad_var{suffix}")
    signal = per_epoch(training, f"grad_sq{suffix}")
    gains = per_epoch(training, f"gain{suffix}") if adascale else {}
    noise: dict[int, float | None] = {}
    for epoch in epochs:
        if epoch in gains:
            noise[epoch] = noise_from_gain(gains[epoch], base, batch)
        elif epoch in signal and variance.get(epoch, 0) > 0:
            noise[epoch] = variance[epoch] / signal[epoch] if signal[epoch] > 0 else math.inf
        else:
            noise[epoch] = None
    finite = [n for n in noise.values() if n is not None and math.isfinite(n)]
    unmeasured = [e for e, n in noise.items() if n is None or not math.isfinite(n)]
    fill = max(finite) if finite else math.inf
    return {e: fill if n is None or math.isinf(n) else n for e, n in noise.items()}, unmeasured


@dataclass(frozen=True)
class Row:
    devices: int
    per_device: int
    batch: int
    steps: float
    step_s: float
    hours: float
    efficiency: float = 0.0  # against perfect scaling from the fewest devices' best
    best: bool = False  # the fastest batch at this device count


def project(
    run: RunSummary,
    step_time: StepTime,
    devices: list[int],
    per_device: list[int] | None = None,
    batches: list[int] | None = None,
    until: int | None = None,
    pace: str = "model",
) -> list[Row]:
    """Every (device count, batch) considered, with its projected steps and time. The
    batches: ``batches`` where the device count divides them, else the device count times
    each of ``per_device``."""
    rows = []
    for k in devices:
        if batches:
            choices = [(b // k, b) for b in batches if b % k == 0]
            if not choices:
                raise MegdetError(
                    f"--devices {k}: divides none of --batches {','.join(map(str, batches))}; "
                    f"give batches that are multiples of {k}"
                )
        else:
            choices = [(n, n * k) for n in per_device]
        for n, batch in choices:
            steps = steps_at(run.windows, batch, run.global_batch, until, pace)
            seconds = step_time.seconds(n, k)
            rows.append(Row(k, n, batch, steps, seconds, steps * seconds / 3600))
    return _rank(rows)


def _rank(rows: list[Row]) -> list[Row]:
    """Mark each device count's fastest batch; efficiency against the fewest devices' best
    time scaled perfectly (k times the devices, 1/k the time)."""
    best = {}
    for row in rows:
        if row.devices not in best or row.hours < best[row.devices].hours:
            best[row.devices] = row
    first = best[min(best)]
    reference = first.hours * first.devices
    return [
        Row(**{**asdict(r), "efficiency": reference / (r.hours * r.devices) if r.hours else 0.0,
               "best": r is best[r.devices]})
        for r in rows
    ]  # fmt: skip


def stops_helping(rows: list[Row]) -> int | None:
    """The first device count whose best time is less than 10% better than the previous
    count's best: where more devices stop helping (None if every step helps)."""
    best = sorted((r.devices, r.hours) for r in rows if r.best)
    for (_, before), (k, after) in zip(best, best[1:], strict=False):
        if after > SLOWER * before:
            return k
    return None


def measure_threads(run: RunSummary, device_type: str) -> int | None:
    """The CPU threads to measure a step with: those one of the run's processes had (as
    ``megdet train`` split this machine's cores among them, where the run did not record it);
    None on a GPU, whose step does not depend on them."""
    if device_type != "cpu":
        return None
    if run.hardware and run.hardware.get("device") == "cpu" and run.hardware.get("threads"):
        return int(run.hardware["threads"])
    return max(1, (os.cpu_count() or 1) // run.world_size)


def measure_step_time(
    task, cfg, counts: tuple[int, int], device, repeats: int = 9, threads: int | None = None
) -> dict:
    """Median seconds of a training step (forward, backward, SGD step) at each of ``counts``
    images on one process, through the task's interface, with ``threads`` CPU threads (None:
    as they are); no collective."""
    import torch

    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        return _time_steps(task, cfg, counts, device, repeats)
    finally:
        torch.set_num_threads(before)


def _time_steps(task, cfg, counts: tuple[int, int], device, repeats: int) -> dict:
    """Each timed step takes the next ``count`` training images, as the run's did: images of
    other sizes and boxes cost differently, and the same batch over and over times only its
    own. Where the run loaded its images in the loop (``data.num_workers: 0``), so does the
    timing."""
    import torch

    from megdet.nn import training_norm
    from megdet.solver.optimizer import build_optimizer

    torch.manual_seed(cfg.train.seed)
    model = task.build_model("train", training_norm(cfg.model.norm)).to(device).train()
    optimizer = build_optimizer(model, cfg.solver, cfg.solver.base_lr)
    dataset, images = task.train_dataset(), task.num_train_images
    loads_in_loop = cfg.data.num_workers == 0
    seconds, next_image = {}, 0
    for count in counts:
        times = []
        for attempt in range(repeats + 2):  # two untimed: allocation, autotuning
            indices = [(next_image + i) % images for i in range(count)]
            next_image += count
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            begin = time.perf_counter()
            batch = task.collate([dataset[(0, i)] for i in indices])
            if not loads_in_loop:
                begin = time.perf_counter()
            inputs, targets = task.to_device(batch, device)
            task.begin_step(model, targets)
            loss = sum(task.global_batch_losses(model, model(inputs, targets)).values())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if attempt >= 2:
                times.append(time.perf_counter() - begin)
        seconds[count] = statistics.median(times)
    return {"seconds": seconds, "gradient_bytes": sum(
        p.numel() * p.element_size() for p in model.parameters() if p.requires_grad
    )}  # fmt: skip


def fit_step_time(
    seconds: dict[int, float], gradient_bytes: int, bandwidth: float, threads: int | None = None
) -> StepTime:
    """The line through the two measured points (per image clamped at >= 0: timing noise)."""
    (n1, t1), (n2, t2) = sorted(seconds.items())
    per_image = max(0.0, (t2 - t1) / (n2 - n1)) if n2 != n1 else t1 / n1
    fixed = max(0.0, t1 - n1 * per_image)
    return StepTime(fixed, per_image, gradient_bytes, bandwidth, dict(seconds), threads=threads)


def calibrate(step_time: StepTime, run: RunSummary, device_type: str) -> tuple[StepTime, str]:
    """``step_time`` with the overhead the run paid beyond the model at its own point (its
    logged step time minus the model's there), and a line saying what was done. Not where the
    run logged no step time or computed on another kind of device than ``device_type``: a
    CPU's overhead says nothing of a GPU's."""
    if run.logged_step_s is None:
        return step_time, "not calibrated: the run logged no step time after its first record"
    ran_on = (run.hardware or {}).get("device")
    if ran_on is not None and ran_on != device_type:
        return step_time, (
            f"not calibrated: the run computed on {ran_on}, the step was measured on {device_type}"
        )
    model = step_time.seconds(run.images_per_device, run.world_size) - step_time.overhead_s
    overhead = run.logged_step_s - model
    calibrated = StepTime(**{**asdict(step_time), "overhead_s": overhead})
    return calibrated, (
        f"calibrated: the run logged {run.logged_step_s:.3g} s per step at "
        f"{run.images_per_device} images x {run.world_size} processes, the measured parts "
        f"{model:.3g} s: {overhead:+.3g} s a step of input pipeline, CGBN's collectives and "
        "hooks, added to every row as a constant"
    )


def _all_reduce_worker(rank: int, port: int, numel: int, repeats: int, out: str) -> None:
    import torch
    import torch.distributed as torch_dist

    torch.set_num_threads(1)
    torch_dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2
    )
    buffer = torch.ones(numel)
    times = []
    for attempt in range(repeats + 1):
        torch_dist.barrier()
        begin = time.perf_counter()
        torch_dist.all_reduce(buffer)
        if attempt:
            times.append(time.perf_counter() - begin)
    if rank == 0:
        Path(out).write_text(json.dumps(statistics.median(times)))
    torch_dist.destroy_process_group()


def measure_bus_bandwidth(gradient_bytes: int, repeats: int = 5) -> float:
    """Bytes/s of gloo's all-reduce of ``gradient_bytes`` between two local processes, as a
    bus bandwidth (for 2 devices the algorithm moves 2 (k - 1) / k = 1x the bytes)."""
    import tempfile

    import torch.multiprocessing as mp

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "seconds.json")
        numel = max(1, gradient_bytes // 4)
        mp.start_processes(_all_reduce_worker, (port, numel, repeats, out), nprocs=2,
                           start_method="spawn")  # fmt: skip
        seconds = json.loads(Path(out).read_text())
    return gradient_bytes / max(seconds, 1e-9)


def projection_dict(
    run: RunSummary, step_time: StepTime, rows: list[Row], target: float, pace: str,
    calibration: str = "",
) -> dict:  # fmt: skip
    """What ``projection.json`` holds: the inputs, the assumptions, every row."""
    return {
        "run": str(run.path),
        "pace": pace,
        "metric": run.metric,
        "target": target,
        "run_batch": run.global_batch,
        "run_steps": run.steps,
        "noise_scale_per_epoch": {w.epoch: w.noise_scale for w in run.windows},
        "module_noise_scale_per_epoch": {w.epoch: w.modules for w in run.windows},
        "unmeasured_epochs": run.unmeasured,
        "step_time": asdict(step_time),
        "logged_step_s": run.logged_step_s,
        "calibration": calibration,
        "stops_helping_at": stops_helping(rows),
        "rows": [asdict(r) for r in rows],
    }


def format_projection(run: RunSummary, step_time: StepTime, rows: list[Row], target: float,
                      until: int, pace: str, calibration: str = "") -> str:  # fmt: skip
    """The table a user reads, and what it rests on."""
    noise = " ".join(f"{w.noise_scale:.0f}" for w in run.windows)
    if pace == "module" and any(w.modules for w in run.windows):
        slowest = " ".join(f"{min(w.modules.values()):.0f}" for w in run.windows if w.modules)
        noise += f"; the slowest module's, which sets the pace: {slowest}"
    label = CURVES[run.metric][0].split(" (")[0]
    lines = [
        f"From {run.path}: batch {run.global_batch} on {run.world_size} processes reached "
        f"{label} {target:.2f} at step {until} of {run.steps}"
        + (" (AdaScale: the noise scale read from its gain)" if run.adascale else ""),
        f"noise scale per epoch (images): {noise}"
        + (
            f"; epoch{'s' if len(run.unmeasured) > 1 else ''} "
            f"{','.join(map(str, run.unmeasured))} unmeasured or all noise: given the largest "
            "measured"
            if run.unmeasured
            else ""
        ),
        *(
            [
                "the noise scale was not measurable in part of this run (its |G|^2 came out <= "
                "0): with few images per process its estimate is noisy; project from a run with "
                "more images per process (on the demo, from batch 64: steps within 8%; from "
                "batch 16: 36% off)"
            ]
            if run.unmeasured
            else []
        ),
        f"step time here: {step_time.fixed_s:.3g} s + {step_time.per_image_s:.3g} s per image "
        f"(measured at {', '.join(f'{n}: {s:.3g} s' for n, s in step_time.measured.items())}"
        + (f", {step_time.threads} CPU threads" if step_time.threads else "")
        + f") + all-reduce of {step_time.gradient_bytes / 2**20:.1f} MiB at "
        f"{step_time.bus_bandwidth / 1e9:.3g} GB/s bus bandwidth",
    ]
    if calibration:
        lines.append(calibration)
    header = "| devices | images/device | batch | steps | s/step | hours | efficiency |"
    lines += ["", header, "|---|---|---|---|---|---|---|"]
    for r in rows:
        mark = " *" if r.best else ""
        lines.append(
            f"| {r.devices} | {r.per_device} | {r.batch}{mark} | {r.steps:,.0f} | "
            f"{r.step_s:.3g} | {r.hours:.3g} | {100 * r.efficiency:.0f}% |"
        )
    lines.append("")
    lines.append("*: the fastest batch at that device count")
    knee = stops_helping(rows)
    if knee:
        lines.append(f"from {knee} devices on, more devices give less than 10% off the best time")
    lines.append(
        "assumes each batch trains at its best lr (McCandlish et al.'s model; a rule that "
        "diverges is outside it) and reaches the same accuracy; no all-reduce overlap"
    )
    return "\n".join(lines)
