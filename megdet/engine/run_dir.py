"""The run folder: who writes there, what a run writes, and when.

A run folder has one writer: the run holds an advisory lock on ``RUN/.megdet.lock`` for its
whole life (``RunLock``); the operating system releases it when the process ends, however it
ends, so a killed run never blocks its ``--resume``.

Nothing in a run folder changes until the run can really start: the folder is checked first
(``check_run_dir``), and the new config and plan are written only once the model, the
checkpoint to resume from and the data are ready (``start_run_dir``). A replaced run
(``--overwrite``) is moved aside then, not deleted, and deleted only once the new run has
written its first checkpoint; a new run that ends without one puts it back
(``settle_replacement``). A run that fails before it starts leaves the folder as it was.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shlex
import shutil
import socket
import sys
import time
from pathlib import Path

from megdet.atomic import atomic_write_text
from megdet.paths import folder_problem

log = logging.getLogger(__name__)

# What a run writes; --overwrite replaces exactly these, never anything else in the folder.
RUN_OUTPUTS = ("config.yaml", "plan.json", "metrics.jsonl", "checkpoints", "eval", "report")
LOCK = ".megdet.lock"
ASIDE = ".megdet.replaced"  # a replaced run, until the new one has a checkpoint


def run_outputs(run_dir: Path) -> list[str]:
    """The names of the run outputs in ``run_dir`` (event files included)."""
    if not run_dir.is_dir():
        return []
    names = [name for name in RUN_OUTPUTS if (run_dir / name).exists()]
    return names + sorted(p.name for p in run_dir.glob("events.out.tfevents.*"))


def previous_outputs(run_dir: Path) -> list[str]:
    """The names of a previous run's files in ``run_dir``; none if that run never finished an
    iteration (no metrics, no checkpoint): it holds nothing to lose, and must not block a
    rerun."""
    names = run_outputs(run_dir)
    metrics = run_dir / "metrics.jsonl"
    started = {"checkpoints", "eval"} & set(names) or (metrics.is_file() and metrics.stat().st_size)
    return names if started else []


class RunLock:
    """The lock that makes a process the one writer of a run folder.

    ``acquire`` makes the folder if needed and returns None, or the line that names the
    process holding it; ``release`` gives it up and removes what ``acquire`` made if the run
    never started (a folder with nothing else in it)."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = Path(run_dir)
        self._fd: int | None = None
        self._made_folder = False

    def acquire(self, option: str = "--out") -> str | None:
        if problem := folder_problem(self.run_dir, option):
            return problem
        self._made_folder = not self.run_dir.exists()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        path = self.run_dir / LOCK
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
        try:
            _lock(fd)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            return (
                f"{option} {self.run_dir}: in use by another megdet run ({holder}); wait for it "
                "to end, or choose another folder"
            )
        except OSError as exc:  # a filesystem without locks (some network mounts)
            log.warning("%s: cannot lock (%s); make sure no other run writes here", path, exc)
        os.ftruncate(fd, 0)
        command = shlex.join(["megdet", *sys.argv[1:]])
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}: {command}\n".encode())
        self._fd = fd
        return None

    def release(self) -> None:
        if self._fd is None:
            return
        if self._made_folder and not run_outputs(self.run_dir):
            with contextlib.suppress(OSError):
                (self.run_dir / LOCK).unlink()
                self.run_dir.rmdir()  # only if nothing else was put there
        os.close(self._fd)  # releases the lock
        self._fd = None


def _lock(fd: int, orphan_wait_s: float = 15.0) -> None:
    """``flock`` without blocking, except where the process the lock file names is gone: then
    what holds the lock is a child it forked (a DataLoader worker, which inherits the open
    file and notices its parent's death within seconds), so wait for it to exit. A run that
    torchrun restarts after a SIGKILL takes the lock again this way."""
    deadline = time.monotonic() + orphan_wait_s
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if _holder_alive(_read_holder(fd)) or time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def _holder_alive(holder: str) -> bool:
    """Whether the process a lock file names (``pid N on HOST: ...``) still runs; True when
    that cannot be told (another host, an unreadable line)."""
    words = holder.split()
    if len(words) < 4 or words[0] != "pid" or not words[1].isdigit():
        return True
    if words[3].rstrip(":") != socket.gethostname():
        return True
    try:
        os.kill(int(words[1]), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _read_holder(fd: int) -> str:
    try:
        text = os.pread(fd, 4096, 0).decode(errors="replace").strip()
    except OSError:
        text = ""
    return f"{text[:160]}..." if len(text) > 160 else (text or "a process that said no more")


def check_run_dir(run_dir: Path, overwrite: bool, resume: bool) -> str | None:
    """Why a run cannot use ``run_dir`` (one line), or None. Changes nothing on disk."""
    problem = folder_problem(run_dir)
    if problem:
        return problem
    for name in ("checkpoints", "eval"):  # folders the run writes into
        path = run_dir / name
        if path.exists() and not path.is_dir() and not overwrite:
            return f"--out {run_dir}: {path} is a file, where the run keeps its {name}; move it"
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
    """The run starts: move a replaced run's files aside (``replace``), drop what a resumed
    run logged after its checkpoint (``resumed_at``), write the config and the plan."""
    if replace and (previous := previous_outputs(run_dir)):
        aside = run_dir / ASIDE
        shutil.rmtree(aside, ignore_errors=True)
        aside.mkdir()
        for name in previous:
            os.replace(run_dir / name, aside / name)
        log.info("the previous run in %s is kept in %s until this one's checkpoint", run_dir, aside)
    if resumed_at is not None:
        _truncate_metrics(run_dir / "metrics.jsonl", resumed_at)
    atomic_write_text(run_dir / "config.yaml", config_yaml)
    atomic_write_text(run_dir / "plan.json", plan_json)


def settle_replacement(run_dir: Path) -> None:
    """End a replacement (``--overwrite``): delete the replaced run once the new one has a
    checkpoint; put it back in place of the new run's files if the new run has none (it
    failed, or was killed before its first). Nothing to do without one."""
    aside = run_dir / ASIDE
    if not aside.is_dir():
        return
    if any((run_dir / "checkpoints" / name).is_file() for name in ("last.pt", "previous.pt")):
        shutil.rmtree(aside)
        return
    for name in run_outputs(run_dir):
        path = run_dir / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    for path in aside.iterdir():
        os.replace(path, run_dir / path.name)
    aside.rmdir()
    log.warning("%s: the new run ended without a checkpoint; the previous run is back", run_dir)


def _truncate_metrics(path: Path, iteration: int) -> None:
    """Drop what a stopped run logged after its checkpoint (all of it, if it never wrote one:
    ``iteration`` 0): the resumed run logs it again."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            if json.loads(line)["iter"] <= iteration:
                kept.append(line)
        except (json.JSONDecodeError, KeyError, TypeError):
            continue  # a line cut short by the crash
    atomic_write_text(path, "".join(f"{line}\n" for line in kept))
