"""Issue 27: a training step reads the device at most once (each read stalls a GPU's queue).

On CPU a read costs nothing, so the test counts them: every call that copies a tensor's values
to Python or to the CPU (``item``, ``tolist``, ``cpu``, ``numpy``, ``bool``, ``float``, ``int``)
made while a step runs, outside the data loader (which works on host tensors by design). The
classification task's model reads nothing itself, so what is counted is the engine's: the
divergence guard, stop signals, the noise scale, AdaScale, AGVM, clipping and fp16's scaler.
"""

import contextlib
import os
import traceback

import pytest
import torch

from megdet import dist
from megdet.config import load_config
from megdet.data.patterns import generate_patterns
from megdet.engine import trainer
from megdet.engine.trainer import train
from megdet.tasks import build_task
from tests.conftest import instant_overrides
from tests.distributed import run_in_processes

READS = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__")
# Frames of the input pipeline, whose host tensors are not the device's.
LOADER = (os.sep + os.path.join("torch", "utils", "data"), os.sep + "transforms", "megdet/data/")
STEPS = 6


@contextlib.contextmanager
def _counting(log: list, skip=LOADER):
    """Record, for every read made inside (but in frames of ``skip``), where it came from."""
    originals = {name: getattr(torch.Tensor, name) for name in READS}

    def wrap(name, original):
        def counted(self, *args, **kwargs):
            if name == "cpu" and self.device.type == "cpu":  # a host tensor: nothing copied
                return original(self, *args, **kwargs)
            stack = traceback.extract_stack(limit=40)[:-1]
            if not any(any(part in frame.filename for part in skip) for frame in stack):
                log.append(f"{name} at {stack[-1].filename}:{stack[-1].lineno}")
            return original(self, *args, **kwargs)

        return counted

    for name, original in originals.items():
        setattr(torch.Tensor, name, wrap(name, original))
    try:
        yield
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)


def _reads_of_each_step(cfg, run_dir, skip=LOADER) -> list[list[str]]:
    """Train ``cfg``; the reads of steps 2 .. STEPS - 1: after the first (DDP builds its
    buckets) and before the last (which logs). Each span runs from one step's update to the
    next's, the batch's loading too."""
    log: list[str] = []
    boundaries = []
    step = trainer.EventWriter.step

    def mark(self):  # the end of each step's update
        boundaries.append(len(log))
        return step(self)

    trainer.EventWriter.step = mark
    try:
        with _counting(log, skip):
            train(cfg, build_task(cfg), run_dir, dist.init_distributed())
    finally:
        trainer.EventWriter.step = step
    return [log[a:b] for a, b in zip(boundaries[:-2], boundaries[1:-1], strict=True)]


def _classifier_reads(rank, world_size, root, run_dir, extra):
    cfg = load_config("classify_demo", [
        f"data.train.images={root}/train", f"data.val.images={root}/val",
        "train.batch_size=8", "model.bn_size=4", f"train.max_iter={STEPS}", "log.period=1000",
        "train.eval_period=0", "eval.images_per_device=8", "solver.base_batch=4", *extra,
    ])  # fmt: skip
    return _reads_of_each_step(cfg, run_dir)


@pytest.fixture(scope="module")
def patterns(tmp_path_factory):
    root = tmp_path_factory.mktemp("patterns")
    generate_patterns(root, 4, num_train=48, num_val=8, size=32, seed=0)
    return root


@pytest.mark.slow
@pytest.mark.parametrize(
    "extra",
    [
        [],  # the noise scale on (train.gns), the divergence guard, stop signals
        ["solver.lr_scaling=adascale", "solver.clip_grad_norm=0.5"],
        ["solver.module_lr=agvm", "solver.agvm.interval=2", "solver.agvm.start_epochs=0"],
        ["train.amp=fp16"],
        ["train.amp=bf16"],
    ],
    ids=["gns", "adascale+clip", "agvm", "fp16", "bf16"],
)
def test_a_step_reads_the_device_at_most_once(patterns, tmp_path, extra):
    for steps in run_in_processes(_classifier_reads, 2, patterns, tmp_path, extra):
        assert len(steps) == STEPS - 2
        for reads in steps:  # the one: _read_step's, of everything the step decides with
            assert len(reads) == 1 and reads[0].startswith("tolist at "), reads
            assert reads[0].split(" at ")[1].startswith(trainer.__file__), reads


def _detection_reads(rank, world_size, root, run_dir):
    cfg = load_config("instant_test", [*instant_overrides(root), f"train.max_iter={STEPS}",
                                       "log.period=1000", "model.norm=cgbn"])  # fmt: skip
    # torchvision's detector reads a few values itself (image sizes, box checks): the
    # reference loop runs the same model, so they are not the engine's to remove.
    return _reads_of_each_step(cfg, run_dir, skip=(*LOADER, os.sep + "torchvision" + os.sep))


@pytest.mark.slow
def test_a_detector_step_reads_the_device_once_beyond_torchvisions_own(tiny_shapes, tmp_path):
    """The detector's engine-side reads too: its global sample counts stay on the device."""
    for steps in run_in_processes(_detection_reads, 2, tiny_shapes, tmp_path):
        assert len(steps) == STEPS - 2
        assert all(len(reads) == 1 and reads[0].startswith("tolist at ") for reads in steps), steps


def test_the_counter_sees_a_read(patterns):
    """The test above cannot pass by not counting: a read in a step is seen, with its line."""
    log: list[str] = []
    with _counting(log):
        torch.ones(3).sum().item()
    assert len(log) == 1 and log[0].startswith("item at ") and __file__ in log[0]
