"""What every study in ``experiments/`` shares: run rows of plain ``megdet train`` commands,
each into its own run folder, and write their results as a markdown table.

A row is a name and the overrides that make it; each (row, seed) is one run. A finished run
is not run again, so a study stopped halfway continues where it stopped: on this machine (its
``study_result.json`` in ``experiments/runs/``) or on another, from the run's record, a copy of
that result committed in ``experiments/results/NAME/runs/`` (``--fresh`` ignores records). A
run stopped at a checkpoint (SIGTERM to its ``megdet train``, as at a session's end) is resumed
from it by the next invocation, with the same command. A run that diverges is a result: its
iteration and lr are recorded from megdet's one-line message. The table is every finished run
of the study, whichever invocation, machine or commit ran it; each record names its own.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from megdet.atomic import atomic_write_text
from megdet.engine.stop import STOPPED_EXIT_CODE
from megdet.hardware import cpu_name
from megdet.report import per_epoch

ROOT = Path(__file__).resolve().parent.parent
# The studies' shapes set: 8,000 images at 64 px give batch 256 31 iterations an epoch.
STUDY_DATA = ROOT / "experiments" / "data" / "shapes64_8k"
QUICK_DATA = ROOT / "experiments" / "data" / "shapes64_2k"  # --quick: the same, a quarter
QUICK_DATA_500 = ROOT / "experiments" / "data" / "shapes64_500"  # a quarter of that
STUDY_SIZE = ["model.min_size=64", "model.max_size=64"]
# Goyal's studies (issue 16): 10 classes of 32 px textured shapes, 10,000 images (quick: 2,500).
PATTERNS = ROOT / "experiments" / "data" / "patterns32_10k"
QUICK_PATTERNS = ROOT / "experiments" / "data" / "patterns32_2k"
# Issue 26: the set megdet pretrains the detector's backbone on (`make pretrain`'s): all 36
# classes at 64 px, the studies' detection size, 18,000 images (quick: 3,600).
PATTERNS64 = ROOT / "experiments" / "data" / "patterns64_18k"
QUICK_PATTERNS64 = ROOT / "experiments" / "data" / "patterns64_4k"
# The same sizes in the plain style: the detector's own domain, 6 classes.
PLAIN64 = ROOT / "experiments" / "data" / "plain64_18k"
QUICK_PLAIN64 = ROOT / "experiments" / "data" / "plain64_4k"
# An attempt stopped at a checkpoint (megdet's exit code 75, e.g. on SIGTERM) leaves this in its
# run folder; the study's next invocation resumes the run from there.
STOPPED_FILE = "study_stopped.json"
DIVERGED = re.compile(r"training diverged at iteration (\d+) \(lr ([0-9.e+-]+)\)")


@dataclass
class Row:
    name: str
    overrides: list[str]
    # The set the row trains on where it is not its study's (a ``Setting.data`` name).
    data: str | None = None


@dataclass(frozen=True)
class Setting:
    """What a study's runs are: the task's preset and the metric its table reports (an
    ``eval`` key, a fraction shown in percent)."""

    config: str
    metric: str
    label: str
    # "study": the 64 px study sets ("study2k": their quarter, 2,000 images); "demo": the
    # preset's own data/shapes; "patterns32" and "patterns64": the classification sets of
    # Goyal's studies and of pretraining; "plain64": pretraining in the detector's domain
    # (``data patterns --style plain``).
    data: str = "study"
    # The studies of the linear rule keep it whatever the preset's solver.lr_scaling (auto
    # since issue 25); a row may still set it. None: the preset's own.
    lr_scaling: str | None = "linear"


DETECTION = Setting("default", "mmAP", "mmAP")
CLASSIFICATION = Setting("classify_demo", "top1_err", "top-1 error", data="patterns32")
PRETRAIN = Setting("pretrain_tiny", "top1_err", "top-1 error", data="patterns64")
# The demo itself (issue 25): `make demo`'s 2,000 shapes images at 128 px, nothing overridden.
DEMO = Setting("default", "mmAP", "mmAP", data="demo", lr_scaling=None)
DEMO_DATA = ROOT / "data" / "shapes"
QUICK_DEMO_DATA = ROOT / "experiments" / "data" / "shapes128_500"


def ensure_patterns(
    folder: Path, train: int, val: int, classes: int = 10, size: int = 32, style="textured"
) -> list[str]:
    """Generate the classification set once; the overrides that point a run at it."""
    if not (folder / "val").is_dir():
        subprocess.run(
            [sys.executable, "-m", "megdet", "data", "patterns", "--out", str(folder),
             "--classes", str(classes), "--train", str(train), "--val", str(val), "--size",
             str(size), "--seed", "0", "--style", style],
            check=True,
        )  # fmt: skip
    return [f"data.train.images={folder}/train", f"data.val.images={folder}/val"]


def ensure_shapes(folder: Path, train: int, val: int, size: int) -> list[str]:
    """Generate a shapes set once; the overrides that point a run at it."""
    if not (folder / "annotations" / "instances_val.json").is_file():
        subprocess.run(
            [sys.executable, "-m", "megdet", "data", "shapes", "--out", str(folder),
             "--train", str(train), "--val", str(val), "--size", str(size), "--seed", "0"],
            check=True,
        )  # fmt: skip
    return [
        f"data.train.json={folder}/annotations/instances_train.json",
        f"data.train.images={folder}/train",
        f"data.val.json={folder}/annotations/instances_val.json",
        f"data.val.images={folder}/val",
    ]


def run(
    row: Row,
    seed: int,
    runs: Path,
    common: list[str],
    config: str = "default",
    metric="mmAP",
    lr_scaling: str | None = "linear",
    records: Path | None = None,
    fresh: bool = False,
) -> dict:
    """One training run (or its stored result); returns what the table needs: ``metric`` (in
    percent) per epoch and at the end. ``lr_scaling``: the rule unless the row sets one.
    ``records``: the folder of committed results, read (unless ``fresh``) where the run is not
    in ``runs`` and written after it."""
    rule = [f"solver.lr_scaling={lr_scaling}"] if lr_scaling else []
    out = runs / f"{row.name}-s{seed}"
    result_file = out / "study_result.json"
    record = records / f"{row.name}-s{seed}.json" if records else None
    if stored := _stored(result_file, record, row, fresh):
        return stored
    command = [sys.executable, "-m", "megdet", "train", "--config", config, *common,
               *rule, *row.overrides, f"train.seed={seed}", "log.tensorboard=false",
               "--nproc", "2", "--out", str(out)]  # fmt: skip
    earlier = _stopped_earlier(out, command)
    begin = time.perf_counter()
    proc = subprocess.run(
        [*command, "--resume" if earlier else "--overwrite"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    wall = round(time.perf_counter() - begin + (earlier or {}).get("wall_s", 0.0), 1)
    if proc.returncode == STOPPED_EXIT_CODE:  # stopped with a checkpoint (SIGTERM): resumable
        partial = {"command": _portable(command), "wall_s": wall}
        atomic_write_text(out / STOPPED_FILE, json.dumps(partial, indent=1) + "\n")
        raise SystemExit(f"{row.name} seed {seed} stopped at a checkpoint; run the study again "
                         "to continue it")  # fmt: skip
    result = {"row": row.name, "seed": seed, "wall_s": wall}
    if earlier:
        result["resumed"] = True
    result["command"] = " ".join(command[1:])
    diverged = DIVERGED.search(proc.stderr)
    if diverged:
        result["diverged"] = {"iteration": int(diverged[1]), "lr": float(diverged[2])}
    elif proc.returncode:
        raise SystemExit(f"{' '.join(command)} failed:\n{proc.stderr[-3000:]}")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    per_epoch_key = f"{metric}_per_epoch"
    result[per_epoch_key] = [round(100 * r["eval"][metric], 2) for r in records if "eval" in r]
    # Issue 15: the noise scale per epoch as the ratio of the epoch's mean variance and mean
    # squared gradient (a ratio of means: single estimates of |G|^2 are noisy, even negative).
    training = [r for r in records if "eval" not in r]
    variance, signal = per_epoch(training, "grad_var"), per_epoch(training, "grad_sq")
    if variance:
        result["gns_per_epoch"] = [
            round(variance[e] / signal[e], 1) if signal.get(e, 0) > 0 else None for e in variance
        ]
    if training:  # under AdaScale the steps taken are measured, not planned
        result["steps"] = training[-1]["iter"]
        if "mean_gain" in training[-1]:
            result["mean_gain"] = round(training[-1]["mean_gain"], 3)
            result["images_seen"] = training[-1]["images_seen"]
    plan = json.loads((out / "plan.json").read_text())
    result["plan"] = {k: plan[k] for k in ("global_batch", "lr", "warmup_iters", "max_iter")}
    if not diverged:
        result[metric] = result[per_epoch_key][-1]
    result.update(_backbone_source(out))
    result["commit"], result["cpu"] = _commit(), _cpu()
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(result_file, json.dumps(result, indent=1) + "\n")
    (out / STOPPED_FILE).unlink(missing_ok=True)
    _keep_record(record, row, result)
    return result


def _stored(result_file: Path, record: Path | None, row: Row, fresh: bool) -> dict | None:
    """The run's finished result: here (then also kept as its record), else its record unless
    ``fresh``; None where it has to run."""
    if result_file.is_file():
        result = {**_backbone_source(result_file.parent), **json.loads(result_file.read_text())}
        _keep_record(record, row, result)
        return result
    return read_record(record, row) if record and not fresh else None


def _backbone_source(out: Path) -> dict:
    """The sha256 of the backbone file the run started from (its config.yaml's), where it
    started from one: a backbone trained again on another machine is another file, and the
    record says which the run had."""
    try:
        model = yaml.safe_load((out / "config.yaml").read_text()).get("model", {})
    except (OSError, AttributeError, yaml.YAMLError):
        return {}
    digest = model.get("backbone_weights_sha256")
    return {"backbone_sha256": digest} if digest else {}


def _keep_record(record: Path | None, row: Row, result: dict) -> None:
    """Commit-ready copy of a finished run's result: paths relative to the checkout, and the
    row's overrides, by which a later invocation knows the record is of the row it defines."""
    if record is None:
        return
    kept = {**result, "overrides": _overrides_cell(row)}
    if "command" in kept:
        kept["command"] = _relative(kept["command"], _ran_in(kept["command"]))
    text = json.dumps(kept, indent=1) + "\n"
    if not record.is_file() or record.read_text() != text:
        record.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(record, text)


def read_record(record: Path, row: Row) -> dict | None:
    """A committed run's result, or None where there is none or it is of another definition of
    the row (its overrides changed since): such a run is run again."""
    if not record.is_file():
        return None
    stored = json.loads(record.read_text())
    if stored.get("overrides") != _overrides_cell(row):
        print(f"{record}: ran as `{stored.get('overrides')}`, the row is now "
              f"`{_overrides_cell(row)}`: not the row's run (the study runs it again)",
              flush=True)  # fmt: skip
        return None
    return stored


def finished(rows: list[Row], runs: Path, records: Path) -> dict[str, list[dict]]:
    """Every finished run of the rows, here or recorded, by row, seeds ascending: the table.
    A run here without its record (finished by an older checkout) gets one."""
    results: dict[str, list[dict]] = {}
    for row in rows:
        pattern = re.compile(rf"{re.escape(row.name)}-s(\d+)")
        names = [p.name for p in runs.glob(f"{row.name}-s*") if (p / "study_result.json").is_file()]
        names += [p.stem for p in records.glob(f"{row.name}-s*.json")]
        seeds = sorted({int(m[1]) for n in names if (m := pattern.fullmatch(n))})
        for seed in seeds:
            local = runs / f"{row.name}-s{seed}" / "study_result.json"
            if found := _stored(local, records / f"{row.name}-s{seed}.json", row, fresh=False):
                results.setdefault(row.name, []).append(found)
    return results


def _stopped_earlier(out: Path, command: list[str]) -> dict | None:
    """What an earlier attempt of this very run recorded when it was stopped at a checkpoint
    (its command and wall time), or None: a run is resumed only with the command it began
    with, else it starts over."""
    try:
        partial = json.loads((out / STOPPED_FILE).read_text())
    except (OSError, ValueError):
        return None
    complete = (out / "checkpoints" / "last.pt").is_file()
    return partial if complete and partial.get("command") == _portable(command) else None


def _relative(text: str, checkout: Path | str | None = None) -> str:
    """Paths inside the checkout (this one unless given) written relative to it, as a committed
    file must."""
    return text.replace(f"{checkout or ROOT}/", "")


def _ran_in(command: str) -> str:
    """The checkout a run's command ran in, from its ``--out`` folder
    (``CHECKOUT/experiments/runs/...``): a run finished in a git worktree is recorded from the
    main checkout, whose own path its command does not contain."""
    out = command.split(" --out ", 1)[-1].split(" ", 1)[0]
    if out.startswith("/") and "/experiments/runs/" in out:
        return out.split("/experiments/runs/", 1)[0]
    return str(ROOT)


def _portable(command: list[str]) -> list[str]:
    """The command without what differs between checkouts of the same study (the interpreter,
    the checkout's own path: a study continued from another git worktree is the same run)."""
    return [part.replace(str(ROOT), "<repo>") for part in command[1:]]


def summarize(
    rows: list[Row], results: dict[str, list[dict]], metric: str = "mmAP"
) -> list[list[str]]:
    """One table line per row: mean and spread of the final metric, and every divergence."""
    lines = []
    for row in rows:
        done = results.get(row.name, [])
        if not done:
            continue
        finals = [r[metric] for r in done if metric in r]
        diverged = [
            "seed {seed}: iteration {iteration}, lr {lr:.3g}".format(
                seed=r["seed"], **r["diverged"]
            )
            for r in done
            if "diverged" in r
        ]
        plan = done[0]["plan"]
        if len(finals) > 1:
            mean = f"{statistics.mean(finals):.2f} ± {statistics.stdev(finals):.2f}"
        else:
            mean = f"{finals[0]:.2f}" if finals else "—"
        noise = [r["gns_per_epoch"] for r in done if r.get("gns_per_epoch")]
        noise_cell = " / ".join(" ".join(map(_number, n)) for n in noise) or "—"
        steps = [str(r["steps"] if "steps" in r else r["plan"]["max_iter"]) for r in done]
        gains = " / ".join(f"{r['mean_gain']:.2f}" for r in done if "mean_gain" in r) or "—"
        lines.append([
            row.name, str(plan["global_batch"]), f"{plan['lr']:.3g}", str(plan["warmup_iters"]),
            steps[0] if len(set(steps)) == 1 else " / ".join(steps), gains, mean,
            " / ".join(f"{f:.2f}" for f in finals) or "—", "; ".join(diverged) or "none",
            noise_cell, _overrides_cell(row),
        ])  # fmt: skip
    return lines


def _overrides_cell(row: Row) -> str:
    """What makes the row: its overrides, and its data set where it is not the study's."""
    cell = _relative(" ".join(row.overrides)) or "(preset)"
    return f"{cell} (data: {row.data})" if row.data else cell


def _number(value: float | None) -> str:
    """A noise scale, or "—" where the epoch's squared gradient came out <= 0 (noise only)."""
    return "—" if value is None else f"{value:.0f}"


def write_table(
    path: Path, title: str, notes: str, rows: list[Row], results: dict, setting=DETECTION
) -> None:
    header = ["row", "batch", "lr", "warmup it", "iterations", "mean gain",
              f"final {setting.label} (mean ± sd)", "per seed", "diverged",
              "noise scale per epoch", "overrides"]  # fmt: skip
    table = [f"| {' | '.join(header)} |", f"|{'---|' * len(header)}"]
    table += [f"| {' | '.join(line)} |" for line in summarize(rows, results, setting.metric)]
    text = (
        f"# {title}\n\n{notes}\n\nTable written by `python {' '.join(sys.argv)}` at commit "
        f"{_commit()} on {_cpu()} ({platform.python_version()}), from every finished run of the "
        f"study; each run's command, commit and machine are in its record, "
        f"`{_relative(str(path.with_suffix('')))}/runs/ROW-sSEED.json`.\n\n"
        + "\n".join(table)
        + "\n"
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, text)


def _cpu() -> str:
    return f"{cpu_name()}, {os.cpu_count()} CPUs"


def _commit() -> str:
    return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                          capture_output=True, text=True).stdout.strip()  # fmt: skip


def study_data(kind: str, quick: bool) -> list[str]:
    """Generate the set a ``Setting.data`` name stands for (once); the overrides that point a
    run at it."""
    if kind == "patterns32":
        folder, train, val = (QUICK_PATTERNS, 2500, 500) if quick else (PATTERNS, 10000, 2000)
        return ensure_patterns(folder, train, val)
    if kind == "patterns64":
        folder, train, val = (QUICK_PATTERNS64, 3600, 360) if quick else (PATTERNS64, 18000, 1800)
        return ensure_patterns(folder, train, val, classes=36, size=64)
    if kind == "plain64":
        folder, train, val = (QUICK_PLAIN64, 3600, 360) if quick else (PLAIN64, 18000, 1800)
        return ensure_patterns(folder, train, val, classes=6, size=64, style="plain")
    if kind == "demo":  # `make demo`'s own set, generated as the Makefile does
        folder, train, val = (QUICK_DEMO_DATA, 500, 100) if quick else (DEMO_DATA, 2000, 200)
        return ensure_shapes(folder, train=train, val=val, size=128)
    if kind == "study2k":  # a quarter of the study set, for rows whose steps are many
        folder, train, val = (QUICK_DATA_500, 500, 100) if quick else (QUICK_DATA, 2000, 200)
        return STUDY_SIZE + ensure_shapes(folder, train=train, val=val, size=64)
    folder, train = (QUICK_DATA, 2000) if quick else (STUDY_DATA, 8000)
    return STUDY_SIZE + ensure_shapes(folder, train=train, val=200 if quick else 500, size=64)


def main(
    name: str,
    doc: str,
    title: str,
    notes: str,
    rows: list[Row],
    report: bool = False,
    setting: Setting = DETECTION,
    prepare=None,
):
    """A study's command line: ``--rows``, ``--seeds``, ``--quick``, ``--table-only``,
    ``--fresh``; runs to ``experiments/runs/NAME``, their records to
    ``experiments/results/NAME/runs/``, the table of every finished run (rewritten after every
    run) to ``experiments/results/NAME.md`` and, with ``report``, ``megdet report`` of the runs
    (plots, MegDet Table 1) to ``experiments/results/NAME/``, where every run's folder is here.

    ``--quick`` runs the same rows on a quarter of the data (2,000 shapes images, 2,500
    patterns, 500 of the demo's), into ``runs/quick`` and
    ``results/quick``: a check that a study works end to end (``make reproduce-quick``), whose
    numbers are not the study's.

    ``prepare(quick)``, where given, runs first and returns overrides every run takes (the
    MegDet-regime studies: the pretrained backbone, trained once by its own study)."""
    parser = argparse.ArgumentParser(description=doc.split("\n")[0])
    parser.add_argument("--rows", help="comma-separated row names (default: all)")
    parser.add_argument("--seeds", default="0", help="comma-separated seeds (default: 0)")
    parser.add_argument("--quick", action="store_true", help="a quarter of the training images")
    parser.add_argument(
        "--table-only",
        action="store_true",
        help="run nothing: the table (and report) of every run already finished",
    )
    parser.add_argument(
        "--fresh",
        action="store_true",
        help="run the chosen rows again where only a committed record of them is here",
    )
    args = parser.parse_args()
    chosen = [r for r in rows if not args.rows or r.name in args.rows.split(",")]
    if args.rows and not chosen:
        parser.error(
            f"--rows: none of {args.rows} is a row; rows: {', '.join(r.name for r in rows)}"
        )
    base = ROOT / "experiments"
    if args.quick:
        runs, results_dir = base / "runs" / "quick" / name, base / "results" / "quick"
    else:
        runs, results_dir = base / "runs" / name, base / "results"
    records = results_dir / name / "runs"
    if not args.table_only:
        kinds = {setting.data, *(row.data for row in chosen if row.data)}
        sets = {kind: study_data(kind, args.quick) for kind in kinds}
        extra = [] if prepare is None else prepare(args.quick)
        for seed in (int(s) for s in args.seeds.split(",")):
            for row in chosen:
                data = [*sets[row.data or setting.data], *extra]
                result = run(row, seed, runs, data, setting.config, setting.metric,
                             setting.lr_scaling, records, args.fresh)  # fmt: skip
                print(row.name, seed, result.get(setting.metric, result.get("diverged")),
                      flush=True)  # fmt: skip
                done = finished(rows, runs, records)
                write_table(results_dir / f"{name}.md", title, notes, rows, done, setting)
    done = finished(rows, runs, records)
    write_table(results_dir / f"{name}.md", title, notes, rows, done, setting)
    if report:
        _report(runs, rows, done, results_dir / name)


def _report(runs: Path, rows: list[Row], done: dict[str, list[dict]], out: Path) -> None:
    """``megdet report`` of the table's runs, where all of their folders are here: plots of some
    of them would silently drop the others (a record keeps the result, not the run's log)."""
    from megdet.report import write_report

    folders = [runs / f"{row.name}-s{r['seed']}" for row in rows for r in done.get(row.name, [])]
    missing = [f.name for f in folders if not (f / "metrics.jsonl").is_file()]
    if missing:
        some = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
        print(f"{out}: plots not redrawn: {len(missing)} runs finished on another machine "
              f"({some})", flush=True)  # fmt: skip
        return
    write_report(folders, out)
