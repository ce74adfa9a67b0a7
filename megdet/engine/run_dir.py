"""The run folder: what a run writes there, and when.

Nothing in a run folder changes until the run can really start: the folder is checked first
(``check_run_dir``), and the files of a replaced run are removed and the new config and plan
written only once the model, the checkpoint to resume from and the data are ready
(``start_run_dir``). A run that fails before that leaves the folder as it was, or no folder.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

from megdet.atomic import atomic_write_text

# What a run writes; --overwrite removes exactly these, never anything else in the folder.
RUN_OUTPUTS = ("config.yaml", "plan.json", "metrics.jsonl", "checkpoints", "eval", "report")


def previous_outputs(run_dir: Path) -> list[str]:
    """The names of a previous run's files in ``run_dir``; none if that run never finished an
    iteration (no metrics, no checkpoint): it holds nothing to lose, and must not block a
    rerun."""
    if not run_dir.is_dir():
        return []
    names = [name for name in RUN_OUTPUTS if (run_dir / name).exists()]
    names += sorted(p.name for p in run_dir.glob("events.out.tfevents.*"))
    metrics = run_dir / "metrics.jsonl"
    started = {"checkpoints", "eval"} & set(names) or (metrics.is_file() and metrics.stat().st_size)
    return names if started else []


def folder_problem(folder: Path, option: str = "--out") -> str | None:
    """Why ``folder`` cannot be created or written (one line), or None. Writes nothing."""
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        what = "is a file" if existing == folder else f"is under the file {existing}"
        return f"{option} {folder}: {what}; choose a folder"
    try:  # the one reliable test: os.access says yes to root on a read-only mount
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as exc:
        return f"{option} {folder}: cannot write in {existing} ({exc.strerror}); choose another"
    return None


def check_run_dir(run_dir: Path, overwrite: bool, resume: bool) -> str | None:
    """Why a run cannot use ``run_dir`` (one line), or None. Changes nothing on disk."""
    problem = folder_problem(run_dir)
    if problem:
        return problem
    previous = previous_outputs(run_dir)
    if previous and not (overwrite or resume):
        return (
            f"--out {run_dir}: holds a previous run ({', '.join(previous[:3])}); "
            "pass --resume to continue it, --overwrite to replace it, or choose another --out"
        )
    return None


def start_run_dir(
    run_dir: Path, config_yaml: str, plan_json: str, replace: bool, resumed_at: int | None
) -> None:
    """The run starts: remove a replaced run's files (``replace``), drop what a resumed run
    logged after its checkpoint (``resumed_at``), write the config and the plan."""
    if replace:
        for name in previous_outputs(run_dir):
            path = run_dir / name
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    if resumed_at is not None:
        _truncate_metrics(run_dir / "metrics.jsonl", resumed_at)
    atomic_write_text(run_dir / "config.yaml", config_yaml)
    atomic_write_text(run_dir / "plan.json", plan_json)


def _truncate_metrics(path: Path, iteration: int) -> None:
    """Drop what a stopped run logged after its checkpoint: the resumed run logs it again."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["iter"] <= iteration:
                kept.append(line)
        except (json.JSONDecodeError, KeyError):
            continue  # a line cut short by the crash
    atomic_write_text(path, "".join(f"{line}\n" for line in kept))
