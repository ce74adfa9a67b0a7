"""A worker killed with SIGKILL mid-run: torchrun restarts the group, which resumes from the
newest checkpoint and ends with the weights of an uninterrupted run."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import instant_overrides


def _command(out, data, *extra):
    return [sys.executable, "-m", "megdet", "train", "--config", "instant_test", "--nproc", "2",
            "--out", str(out), *instant_overrides(data), "train.max_iter=80",
            "train.checkpoint_period=10", "log.period=1", "model.norm=cgbn", *extra]  # fmt: skip


def _descendants(root: int) -> list[int]:
    parents = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    found, frontier = [], [root]
    while frontier:
        pid = frontier.pop()
        children = [p for p, parent in parents.items() if parent == pid]
        found += children
        frontier += children
    return found


def _worker(root: int, local_rank: int) -> int | None:
    for pid in _descendants(root):
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"LOCAL_RANK={local_rank}".encode() in environ:
            return pid
    return None


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_killed_worker_is_restarted_and_the_run_ends_as_if_nothing_happened(
    tiny_shapes, tmp_path
):
    straight = subprocess.run(
        _command(tmp_path / "straight", tiny_shapes), capture_output=True, text=True, timeout=300
    )
    assert straight.returncode == 0, straight.stderr[-3000:]

    out = tmp_path / "killed"
    proc = subprocess.Popen(
        _command(out, tiny_shapes, "--max-restarts", "3"),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 240
        while not (out / "checkpoints" / "last.pt").exists():
            assert proc.poll() is None and time.monotonic() < deadline, "no checkpoint written"
            time.sleep(0.02)
        victim = _worker(proc.pid, local_rank=1)
        assert victim is not None
        os.kill(victim, signal.SIGKILL)
        stdout, stderr = proc.communicate(timeout=300)
    finally:
        proc.kill()
    assert proc.returncode == 0, stderr[-3000:]
    assert "resume:" in stderr and "continuing at iteration" in stderr, stderr[-3000:]
    ours = torch.load(out / "checkpoints" / "last.pt", weights_only=True)
    theirs = torch.load(tmp_path / "straight" / "checkpoints" / "last.pt", weights_only=True)
    assert ours["iteration"] == theirs["iteration"] == 80
    for key, value in theirs["model"].items():
        assert torch.equal(ours["model"][key], value), key
