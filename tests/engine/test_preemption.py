"""Preemption: SIGTERM to `megdet train --nproc 2` stops every rank after the same iteration
with a checkpoint and one line; --resume then gives the weights of an uninterrupted run. A
second signal stops at once; a killed worker is named, with the command that continues."""

import json
import os
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megdet.engine.stop import REPEAT_WINDOW_S, STOPPED_EXIT_CODE
from tests.conftest import instant_overrides, start_and_wait_for_iterations


def _command(tiny_shapes, out, *extra):
    return [sys.executable, "-m", "megdet", "train", "--config", "instant_test", "--nproc", "2",
            *instant_overrides(tiny_shapes), "train.max_iter=40", "log.period=1",
            "model.norm=cgbn", "data.hflip=true", "train.eval_period=0", "--out", str(out),
            *extra]  # fmt: skip


def _rank(pid: int) -> int:
    environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return int(next(item for item in environ if item.startswith(b"RANK="))[5:])


def _megdet_lines(stderr: str) -> list[str]:
    assert "Traceback" not in stderr, stderr[-3000:]
    return [line for line in stderr.splitlines() if line.startswith("megdet:")]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_sigterm_stops_with_a_checkpoint_and_resume_gives_the_uninterrupted_weights(
    tiny_shapes, tmp_path
):
    straight, split = tmp_path / "straight", tmp_path / "split"
    done = subprocess.run(_command(tiny_shapes, straight), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]

    proc = start_and_wait_for_iterations(_command(tiny_shapes, split), split / "metrics.jsonl", 5)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == STOPPED_EXIT_CODE, stderr[-3000:]
    (line,) = _megdet_lines(stderr)
    assert line.startswith("megdet: stopped at iteration ") and "(SIGTERM)" in line
    stopped_at = int(line.split("iteration ")[1].split(" ")[0])
    assert 5 <= stopped_at < 40
    state = torch.load(split / "checkpoints" / "last.pt", weights_only=True)
    assert state["iteration"] == stopped_at
    logged = [json.loads(x)["iter"] for x in (split / "metrics.jsonl").read_text().splitlines()]
    assert logged[-1] == stopped_at

    # The line's own command continues the run (from any folder: its paths are absolute).
    resume = shlex.split(line.split("resume with: ")[1])
    assert resume[:2] == ["megdet", "train"] and resume[-1] == "--resume"
    resumed = subprocess.run(
        [sys.executable, "-m", "megdet", *resume[1:]], capture_output=True, text=True
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    expected = torch.load(straight / "checkpoints" / "last.pt", weights_only=True)["model"]
    final = torch.load(split / "checkpoints" / "last.pt", weights_only=True)["model"]
    for key, value in expected.items():
        assert torch.equal(final[key], value), key  # bitwise: same world size, same CPU


@pytest.mark.slow
def test_a_killed_worker_is_named_with_the_last_checkpoint_and_the_resume_command(
    tiny_shapes, tmp_path
):
    run = tmp_path / "run"
    command = _command(tiny_shapes, run, "train.checkpoint_period=2")
    proc = start_and_wait_for_iterations(command, run / "metrics.jsonl", 5)
    workers = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True)
    rank_of = {pid: _rank(pid) for pid in map(int, workers.stdout.split())}
    assert sorted(rank_of.values()) == [0, 1], workers
    os.kill(next(pid for pid, rank in rank_of.items() if rank == 1), signal.SIGKILL)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 1
    (line,) = _megdet_lines(stderr)
    assert (
        "megdet: error: rank 1 was killed by SIGKILL; the last checkpoint is at iteration" in line
    )
    assert line.endswith(f"--out {run} --resume")


def test_a_second_stop_signal_stops_at_once_but_a_repeat_of_the_first_does_not():
    script = (
        "import os, signal, sys, time\n"
        "from megdet.engine.stop import StopSignals\n"
        "with StopSignals() as stop:\n"
        "    os.kill(os.getpid(), signal.SIGUSR1)\n"
        "    os.kill(os.getpid(), signal.SIGTERM)  # the same request, forwarded twice\n"
        "    time.sleep(0.1)\n"
        "    print(stop.signal_name, flush=True)\n"
        f"    time.sleep({REPEAT_WINDOW_S} + 0.2)\n"
        "    os.kill(os.getpid(), signal.SIGINT)\n"
        "    time.sleep(5)\n"
        "sys.exit(0)\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert proc.stdout.strip() == "SIGUSR1"
    assert proc.returncode == 128 + signal.SIGINT, proc.stderr
