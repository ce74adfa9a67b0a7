"""What a run computes on, named once: for ``plan.json``, the benchmarks and the studies, so
that a measured time is always read beside the machine it was measured on."""

from __future__ import annotations

import platform
from pathlib import Path

import torch


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo``), or the architecture where there is none."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def describe(device: torch.device) -> dict:
    """One process's compute: the device's kind and name and the process's CPU threads, which
    ``megdet plan --from`` reproduces when it measures step times."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = cpu_name()
    return {"device": device.type, "name": name, "threads": torch.get_num_threads()}
