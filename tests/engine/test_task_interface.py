"""The engine meets its tasks through ``megdet.engine.task.Task`` only (issue 16)."""

import subprocess
import sys

import pytest

from megdet.config import load_config
from megdet.engine.task import Task
from megdet.errors import ConfigError
from megdet.tasks import build_task
from tests.conftest import instant_overrides


def test_the_engine_imports_no_task():
    """Importing the trainer, the plan, the report and the CLI loads no task module, so a
    second task needs no change to them."""
    code = (
        "import sys; import megdet.engine.trainer, megdet.plan, megdet.report, megdet.cli; "
        "print(sorted(m for m in sys.modules if m.startswith('megdet.tasks.')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_detection_is_a_task(tiny_shapes):
    """On generated data: a clean clone has no ``data/shapes`` until ``make demo`` runs."""
    task = build_task(load_config("instant_test", instant_overrides(tiny_shapes)))
    assert isinstance(task, Task)
    members = [m for m in dir(Task) if not m.startswith("_")]
    assert all(hasattr(task, m) for m in members), members


def test_an_unknown_task_is_one_line():
    with pytest.raises(ConfigError, match="task: 'segmentation' is not one of detection"):
        load_config("default", ["task=segmentation"])
