"""Append a benchmark's result table to BENCHMARKS.md with the machine, commit and command.

Every script in ``bench/`` prints its table; with ``--record`` it also appends it here, so the
log says what was measured where and how to measure it again. The file is rewritten atomically
(a crash never leaves half a table), and nothing already in it is changed.
"""

from __future__ import annotations

import datetime
import os
import shlex
import subprocess
import sys
from pathlib import Path

import torch

from megdet.atomic import atomic_write_text
from megdet.hardware import cpu_name

ROOT = Path(__file__).resolve().parent.parent
LOG_HEADING = "## Results log (appended by `make bench`)"


def machine() -> str:
    """CPU model and usable cores, or the GPU, and the torch build: what a result depends on."""
    cpu = cpu_name()
    # The machine's CPUs, not this process's affinity (megdet binds each process to its own).
    parts = [f"{cpu}, {os.cpu_count()} CPUs"]
    if torch.cuda.is_available():
        parts.append(f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}")
    import torchvision

    parts.append(f"torch {torch.__version__}, torchvision {torchvision.__version__}")
    return "; ".join(parts)


def commit() -> str:
    """The short commit hash, marked ``+changes`` when the tree differs from it."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip()
        dirty = subprocess.run(
            # BENCHMARKS.md itself changes with every result appended; it is not code.
            ["git", "status", "--porcelain", "--untracked-files=no", "--", ".", ":!BENCHMARKS.md"],
            cwd=ROOT,
            capture_output=True,
            text=True,
        ).stdout.strip()
    except OSError:
        return "unknown"
    return (head or "unknown") + ("+changes" if dirty else "")


def command() -> str:
    """The command line that ran this script, as one could paste it into a shell."""
    return " ".join(shlex.quote(part) for part in ["python", *sys.argv])


def append(title: str, table: str, notes: str = "", path: Path = ROOT / "BENCHMARKS.md") -> None:
    """Append ``table`` (markdown) under the results log heading of ``path``."""
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    if LOG_HEADING not in text:
        text = text.rstrip("\n") + f"\n\n{LOG_HEADING}\n"
    block = [
        f"\n### {title}, {now}\n",
        f"- command: `{command()}`",
        f"- commit: {commit()}",
        f"- machine: {machine()}\n",
        table.rstrip("\n"),
    ]
    if notes:
        block += ["", notes.rstrip("\n")]
    atomic_write_text(path, text.rstrip("\n") + "\n" + "\n".join(block) + "\n")
    print(f"appended to {path}")


def markdown_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)
