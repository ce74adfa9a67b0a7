"""The suite's own safety net (issue 24): pytest-timeout's limit ends a hung multi-process test
with a stack dump, and the test's worker processes end with it instead of being left behind to
slow down (or block) every test after it."""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

HUNG = """
import os
import time
from pathlib import Path

from tests.conftest import megdet
from tests.distributed import run_in_processes


def _hang(rank, world_size, folder):
    Path(folder, f"worker{rank}").write_text(str(os.getpid()))
    time.sleep(600)


def test_workers_hang():
    run_in_processes(_hang, 2, os.environ["HUNG_DIR"])


def test_a_command_hangs():
    fifo = Path(os.environ["HUNG_DIR"], "fifo")
    os.mkfifo(fifo)
    folder = os.environ["HUNG_DIR"]
    # Reads class names from a pipe nobody writes: blocks forever.
    megdet("data", "convert", "--from", "yolo", "--images", folder, "--labels", folder,
           "--names", fifo, "--out", Path(folder, "t.json"))  # fmt: skip
"""


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")  # a zombie has ended; only its parent's reaping is left


@pytest.mark.slow
def test_a_hung_test_times_out_with_a_stack_dump_and_leaves_no_process(tmp_path):
    (tmp_path / "test_hung.py").write_text(HUNG)
    env = {**os.environ, "HUNG_DIR": str(tmp_path), "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--timeout", "15",
         "--rootdir", str(tmp_path), "-o", "addopts=", str(tmp_path / "test_hung.py")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    output = proc.stdout + proc.stderr
    assert proc.returncode == 1, output[-3000:]
    assert "2 failed" in output and output.count("Timeout") >= 2, output[-3000:]
    assert "run_in_processes" in output and "communicate" in output  # where each one hung
    workers = [int((tmp_path / f"worker{rank}").read_text()) for rank in (0, 1)]
    deadline = time.monotonic() + 20
    while any(map(_alive, workers)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(map(_alive, workers)), workers
    leftover = subprocess.run(["pgrep", "-f", f"--names {tmp_path}"],
                              capture_output=True, text=True)  # fmt: skip
    assert leftover.stdout == ""
