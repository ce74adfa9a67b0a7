"""Issue 28, part 2: ``megdet plan --from``'s step time against measured ones. The demo preset,
100 steps each on an idle machine: batch 16 on 2 processes (8 images each), batch 32 on 2 (16
each), and batch 16 on 1 process given one core (what each of the others had: the model's
"device" on a CPU is one process and its threads). The projection from the batch-16 2-process
run, with and without the overhead calibrated from that run's logged step time, against what
each run logged.

    python experiments/projection_wall.py

Writes ``experiments/results/projection_wall.md`` (runs in ``experiments/runs/projection_wall``).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys

from study import ROOT, _cpu

STEPS = 100
# (processes, batch): the runs measured; the first is the one projected from.
RUNS = [(2, 16), (2, 32), (1, 16)]


def _train(out, nproc: int, batch: int) -> float:
    """The median logged seconds per step after the first 20 (start-up, DDP's buckets)."""
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // 2))}
    subprocess.run(
        [sys.executable, "-m", "megdet", "train", "--config", "default", "--nproc", str(nproc),
         "--out", str(out), "--overwrite", f"train.max_iter={STEPS}", "log.tensorboard=false",
         f"train.batch_size={batch}"],
        cwd=ROOT, check=True, capture_output=True, env=env,
    )  # fmt: skip
    lines = (out / "metrics.jsonl").read_text().splitlines()
    times = [r["time_per_iter"] for r in map(json.loads, lines) if "time_per_iter" in r]
    return statistics.median(times[1:])


def _project(source, calibrate: bool) -> dict:
    out = source.parent / f"projection{'' if calibrate else '_raw'}.json"
    subprocess.run(
        [sys.executable, "-m", "megdet", "plan", "--from", str(source), "--devices", "1,2",
         "--batches", "16,32", "--device", "cpu", "--out", str(out),
         *([] if calibrate else ["--no-calibrate"])],
        cwd=ROOT, check=True, capture_output=True,
    )  # fmt: skip
    return json.loads(out.read_text())


def main() -> None:
    runs = ROOT / "experiments" / "runs" / "projection_wall"
    folders = {(k, b): runs / f"nproc{k}-b{b}" for k, b in RUNS}
    measured = {key: _train(folder, *key) for key, folder in folders.items()}
    source = folders[RUNS[0]]
    projections = {c: _project(source, c) for c in (False, True)}
    predicted = {
        c: {(r["devices"], r["batch"]): r["step_s"] for r in p["rows"]}
        for c, p in projections.items()
    }
    timing = projections[True]["step_time"]
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                            capture_output=True, text=True).stdout.strip()  # fmt: skip
    lines = ["| processes | images each | measured s/step | projected, measured parts | error | "
             "projected, calibrated | error |", "|---|---|---|---|---|---|---|"]  # fmt: skip
    for k, b in RUNS:
        raw, calibrated = predicted[False][k, b], predicted[True][k, b]
        actual = measured[k, b]
        mark = " (calibrated here)" if (k, b) == RUNS[0] else ""
        errors = [f"{100 * (p / actual - 1):+.0f}%" for p in (raw, calibrated)]
        lines.append(f"| {k} | {b // k} | {actual:.3f} | {raw:.3f} | {errors[0]} | "
                     f"{calibrated:.3f}{mark} | {errors[1]} |")  # fmt: skip
    text = (
        "# Projected against measured: seconds per step, 1 and 2 processes (issue 28)\n\n"
        f"The demo preset, {STEPS} steps each, one CPU thread per process (the 1-process run "
        "given one core, as each of the 2-process runs' processes had); the median logged "
        "s/step after the first 20. Projection: `megdet plan --from` the batch-16 2-process "
        f"run; its step measured on one process with {timing['threads']} thread "
        f"({timing['fixed_s']:.3f} s + {timing['per_image_s']:.4f} s per image) plus gloo's "
        f"all-reduce of {timing['gradient_bytes'] / 2**20:.1f} MiB at "
        f"{timing['bus_bandwidth'] / 1e9:.2f} GB/s, measured here; calibrated: plus "
        f"{timing['overhead_s']:.3f} s a step, that run's logged step time minus the measured "
        "parts at its own point.\n\n"
        f"Command: `python {' '.join(sys.argv)}` at commit {commit} on {_cpu()}.\n\n"
        + "\n".join(lines)
        + "\n"
    )
    (ROOT / "experiments" / "results" / "projection_wall.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
