"""Issue 28, part 2: is ``megdet plan --from`` worth what it predicts? From a study's batch-16
run, the projected steps to fixed mmAP levels at the batches of the study's other runs,
against the steps those runs took (read off their per-epoch curves, linearly between
evaluations); and the projected seconds per step against those the runs logged.

    python experiments/projection_check.py --study demo_preset [--base b16] [--levels 20,30,40]

Reads finished runs in ``experiments/runs/STUDY/``; writes
``experiments/results/projection_check_STUDY_BASE.md``. Nothing is trained.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

from study import ROOT, _cpu

from megdet.projection import steps_at, summarize_run


def reached(evals: list[tuple[int, float]], level: float) -> float | None:
    """The iteration at which the curve first reaches ``level``, linearly between evaluations
    (from 0 mmAP at iteration 0); None if it never does."""
    before_iter, before = 0, 0.0
    for iteration, value in evals:
        if value >= level:
            return before_iter + (iteration - before_iter) * (level - before) / (value - before)
        before_iter, before = iteration, value
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--study", default="demo_preset")
    parser.add_argument("--base", default="b16", help="the row projected from")
    parser.add_argument("--levels", default="20,30,40")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    runs = ROOT / "experiments" / "runs" / args.study
    base = summarize_run(runs / f"{args.base}-s{args.seed}")
    levels = [float(v) for v in args.levels.split(",")]
    others = sorted(
        (p for p in runs.glob(f"*-s{args.seed}") if p.name != f"{args.base}-s{args.seed}"),
        key=lambda p: json.loads((p / "plan.json").read_text())["global_batch"],
    )
    header = ["run", "batch", "rule", "level (mmAP)", "base reached at", "measured steps",
              "predicted: model", "error", "predicted: slowest module", "error"]  # fmt: skip
    lines = [f"| {' | '.join(header)} |", "|---" * len(header) + "|"]
    errors: dict[str, list[float]] = {"model": [], "module": []}
    for folder in others:
        if not (folder / "study_result.json").is_file():
            continue
        result = json.loads((folder / "study_result.json").read_text())
        if "diverged" in result:
            continue
        run = summarize_run(folder)
        rule = "AdaScale" if run.adascale else "linear"
        for level in levels:
            at_base, measured = reached(base.evals, level), reached(run.evals, level)
            if at_base is None or measured is None:
                continue
            cells = []
            for pace in ("model", "module"):
                predicted = steps_at(base.windows, run.global_batch, base.global_batch,
                                     round(at_base), pace)  # fmt: skip
                error = predicted / measured - 1
                errors[pace].append(abs(error))
                cells += [f"{predicted:.0f}", f"{100 * error:+.0f}%"]
            lines.append(
                f"| {folder.name} | {run.global_batch} | {rule} | {level:g} | {at_base:.0f} | "
                f"{measured:.0f} | {' | '.join(cells)} |"
            )
    noise = " ".join(f"{w.noise_scale:.0f}" for w in base.windows)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                            capture_output=True, text=True).stdout.strip()  # fmt: skip
    text = (
        f"# Projected against measured: steps to mmAP levels ({args.study})\n\n"
        f"From `{args.base}` (batch {base.global_batch}, noise scale per epoch: {noise}), "
        "McCandlish et al.'s model window by window (`megdet/projection.py`), against the "
        "steps each run of the study needed to reach the level (linear between its per-epoch "
        "evaluations). Diverged runs are left out.\n\n"
        f"Command: `python {' '.join(sys.argv)}` at commit {commit} on {_cpu()}.\n\n"
        + "\n".join(lines)
        + "".join(
            f"\n\nMean absolute error, {pace}: {100 * sum(e) / len(e):.0f}% over {len(e)} points."
            for pace, e in errors.items()
            if e
        )
        + "\n"
    )
    out = ROOT / "experiments" / "results" / f"projection_check_{args.study}_{args.base}.md"
    out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
