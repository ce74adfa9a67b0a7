import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from megdet.data.shapes import generate_shapes
from megdet.engine.run_dir import LOCK
from tests.distributed import exact_cuda_kernels

COCO128 = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "coco128"


def pytest_configure(config):
    """One compute thread per test process under pytest-xdist (``make test``: two workers on two
    cores), inherited by the ``megdet`` processes a test starts: two workers of one thread per
    core each would spin on each other's cores (OpenMP waits busily), and a single-process run
    that takes both cores leaves the other worker none."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        os.environ["OMP_NUM_THREADS"] = "1"
        torch.set_num_threads(1)


def pytest_addoption(parser):
    parser.addoption(
        "--device",
        default="cpu",
        choices=("cpu", "cuda"),
        help="where tests marked 'device' put their tensors (bench/device_suite.sh: cuda)",
    )


@pytest.fixture(scope="session")
def device(request) -> str:
    """The device of the tests marked ``device``: CPU in ``make test``, CUDA in the device
    suite, so the same numerics tests guard both paths."""
    name = request.config.getoption("--device")
    if name == "cuda" and not torch.cuda.is_available():
        pytest.fail("--device cuda: torch sees no CUDA device here")
    exact_cuda_kernels()
    return name


@pytest.fixture(scope="session")
def tiny_shapes(tmp_path_factory) -> Path:
    """16 training and 8 validation images of 64 px, written once per test session."""
    root = tmp_path_factory.mktemp("shapes")
    generate_shapes(root, num_train=16, num_val=8, size=64, seed=0)
    return root


@pytest.fixture(scope="session")
def tiny_backbone(tmp_path_factory) -> Path:
    """A megdet classification checkpoint of the tiny backbone (issue 26), its weights and BN
    statistics drawn at random so that a detector that starts from it is told apart."""
    from megdet.nn import norm_layer
    from megdet.nn.tiny_resnet import TinyResNetClassifier
    from megdet.tasks.classification.model import Classifier

    torch.manual_seed(26)
    classifier = Classifier(TinyResNetClassifier(norm_layer("bn"), 36))
    with torch.no_grad():
        for name, tensor in classifier.state_dict().items():
            if tensor.is_floating_point():
                tensor.uniform_(0.5, 1.5) if "running_var" in name else tensor.normal_(0, 0.1)
    path = tmp_path_factory.mktemp("pretrained") / "last.pt"
    config = {"task": "classification", "model": {"backbone": "tiny"}}
    torch.save({"model": classifier.state_dict(), "config": config}, path)
    return path


@pytest.fixture(scope="session")
def coco128() -> Path:
    if not (COCO128 / "annotations" / "instances_train2017.json").is_file():
        pytest.skip("../shared/data/coco128 is not on this machine")
    return COCO128


def instant_overrides(root: Path, val_split: str = "train") -> list[str]:
    """Overrides pointing the instant_test preset to a generated shapes folder."""
    return [
        f"data.train.json={root}/annotations/instances_train.json",
        f"data.train.images={root}/train",
        f"data.val.json={root}/annotations/instances_{val_split}.json",
        f"data.val.images={root}/{val_split}",
    ]


def start_and_wait_for_iterations(command, metrics: Path, iterations: int) -> subprocess.Popen:
    """Start a training command and return once its ``metrics.jsonl`` has ``iterations``
    lines (a run to stop mid-way); fails with the run's stderr if it ends or stalls first."""
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and proc.poll() is None:
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= iterations:
            return proc
        time.sleep(0.2)
    proc.kill()
    raise AssertionError(f"no {iterations} iterations logged: {proc.communicate()[1][-2000:]}")


@pytest.fixture
def cli(capsys):
    """``megdet ARGS`` in this process (no torch import per call, unlike a subprocess): its
    exit code and what it printed, as ``subprocess.run`` reports them."""
    from megdet.cli import main

    def run(*args):
        code = main([str(a) for a in args])
        out, err = capsys.readouterr()
        return SimpleNamespace(returncode=code, stdout=out, stderr=err)

    return run


def megdet(*args, cwd=None, timeout: float = 240) -> subprocess.CompletedProcess:
    """``python -m megdet ARGS`` in a process group of its own, as ``subprocess.run`` reports
    it. However the test ends (a failure, its timeout, pytest-timeout's), the whole group is
    killed: the launcher's torchrun workers too, which ``subprocess.run`` would leave behind."""
    command = [sys.executable, "-m", "megdet", *map(str, args)]
    with subprocess.Popen(
        command, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True,
    ) as proc:  # fmt: skip
        try:
            out, err = proc.communicate(timeout=timeout)
        finally:
            kill_group(proc.pid)
    return subprocess.CompletedProcess(command, proc.returncode, out, err)


def kill_group(pid: int) -> None:
    """SIGKILL the process group led by ``pid`` (what is left of it)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


def one_line_error(result, expected: str) -> None:
    """Exit code 2, one error line saying ``expected``, no traceback (log lines may precede)."""
    assert result.returncode == 2, (result.stdout[-2000:], result.stderr[-2000:])
    errors = [line for line in result.stderr.splitlines() if line.startswith("megdet: error:")]
    assert len(errors) == 1 and expected in errors[0], result.stderr[-2000:]
    assert "Traceback" not in result.stderr


def run_files(folder: Path) -> dict[Path, bytes]:
    """Every file under ``folder`` with its bytes, the run lock aside: it names the last
    process that held it."""
    return {p: p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file() and p.name != LOCK}
