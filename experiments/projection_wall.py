"""Issue 28, part 2: ``megdet plan --from``'s step time against measured ones. The demo preset
at batch 16 on 1 process (16 images) and on 2 (8 each), 100 steps each on an idle machine; the
projection from the 2-process run for 1 and 2 devices, against what both runs logged.

    python experiments/projection_wall.py

Writes ``experiments/results/projection_wall.md`` (runs in ``experiments/runs/projection_wall``).
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys

from study import ROOT, _cpu

STEPS = 100


def _train(out, nproc: int) -> float:
    """The median logged seconds per step after the first 20 (start-up, DDP's buckets)."""
    subprocess.run(
        [sys.executable, "-m", "megdet", "train", "--config", "default", "--nproc", str(nproc),
         "--out", str(out), "--overwrite", f"train.max_iter={STEPS}", "log.tensorboard=false"],
        cwd=ROOT, check=True, capture_output=True,
    )  # fmt: skip
    lines = (out / "metrics.jsonl").read_text().splitlines()
    times = [r["time_per_iter"] for r in map(json.loads, lines) if "time_per_iter" in r]
    return statistics.median(times[1:])


def main() -> None:
    runs = ROOT / "experiments" / "runs" / "projection_wall"
    measured = {k: _train(runs / f"nproc{k}", k) for k in (1, 2)}
    out = runs / "projection.json"
    subprocess.run(
        [sys.executable, "-m", "megdet", "plan", "--from", str(runs / "nproc2"), "--devices",
         "1,2", "--batches", "16", "--device", "cpu", "--out", str(out)],
        cwd=ROOT, check=True, capture_output=True,
    )  # fmt: skip
    projection = json.loads(out.read_text())
    predicted = {r["devices"]: r["step_s"] for r in projection["rows"]}
    timing = projection["step_time"]
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                            capture_output=True, text=True).stdout.strip()  # fmt: skip
    lines = ["| processes | images each | measured s/step | projected s/step | error |",
             "|---|---|---|---|---|"]  # fmt: skip
    for k in (1, 2):
        error = predicted[k] / measured[k] - 1
        lines.append(f"| {k} | {16 // k} | {measured[k]:.3f} | {predicted[k]:.3f} | "
                     f"{100 * error:+.0f}% |")  # fmt: skip
    text = (
        "# Projected against measured: seconds per step, 1 and 2 processes (issue 28)\n\n"
        f"The demo preset at batch 16, {STEPS} steps each; the median logged s/step after the "
        "first 20. Projection: `megdet plan --from` the 2-process run, its step time measured "
        f"on one process ({timing['fixed_s']:.3f} s + {timing['per_image_s']:.4f} s per image)"
        f" plus gloo's all-reduce of {timing['gradient_bytes'] / 2**20:.1f} MiB at "
        f"{timing['bus_bandwidth'] / 1e9:.2f} GB/s, measured here.\n\n"
        f"Command: `python {' '.join(sys.argv)}` at commit {commit} on {_cpu()}.\n\n"
        + "\n".join(lines)
        + "\n"
    )
    (ROOT / "experiments" / "results" / "projection_wall.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
