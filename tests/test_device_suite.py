"""bench/device_suite.sh cannot rot: its dry run takes every step at toy sizes on this CPU."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_device_suite_dry_run_prints_every_table():
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        ["bash", "bench/device_suite.sh", "--dry-run"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    headings = [line for line in proc.stdout.splitlines() if line.startswith("### ")]
    for title in ("GPU training throughput", "activation checkpointing", "CGBN vs nn.SyncBatchNorm",
                  "CPU scaling of CGBN"):  # fmt: skip
        assert any(title in heading for heading in headings), title
    assert "device suite: 0 failed step(s)" in proc.stdout
