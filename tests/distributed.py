"""Run a function in k processes joined by a gloo process group, as torchrun would.

The processes are forked from a server that imported torch and megdet once for the whole test
session (multiprocessing's forkserver): a spawned process spends ~3 s of CPU importing them,
which was most of the time of a multi-process test. Forked before any of torch's threads exist,
each worker is as fresh as a spawned one, and gets the caller's environment.
"""

from __future__ import annotations

import multiprocessing
import os
import socket
import tempfile
from pathlib import Path

import torch
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# What the fork server imports once; workers start with these already loaded.
PRELOAD = [
    "torch", "torchvision", "tests.distributed", "megdet.engine.trainer",
    "megdet.tasks.detection.task", "megdet.tasks.classification.task",
]  # fmt: skip
multiprocessing.set_forkserver_preload(PRELOAD)


def run_in_processes(fn, world_size: int, *args, timeout_s: int = 240) -> list:
    """``fn(rank, world_size, *args)`` in ``world_size`` spawned processes; their returns.

    Each process sees the environment torchrun sets (RANK, WORLD_SIZE, LOCAL_RANK, ...), so
    the code under test joins the group through ``megdet.dist.init_distributed`` as in a run.
    """
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        context = mp.start_processes(
            _worker,
            args=(fn, world_size, port, tmp, timeout_s, args, dict(os.environ)),
            nprocs=world_size,
            join=False,
            start_method="forkserver",
        )
        try:
            while not context.join(timeout=timeout_s):
                pass
        finally:  # a failed or timed-out test (pytest-timeout) leaves no worker behind
            for process in context.processes:
                if process.is_alive():
                    process.kill()
                process.join(timeout=10)
        return [torch.load(Path(tmp) / f"{r}.pt", weights_only=False) for r in range(world_size)]


def _worker(rank, fn, world_size, port, tmp, timeout_s, args, environ):
    os.environ.clear()
    os.environ.update(environ)  # the caller's, not the fork server's
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world_size),
        OMP_NUM_THREADS="1",
    )
    torch.set_num_threads(1)
    exact_cuda_kernels()
    from megdet import dist

    dist.init_distributed(timeout_s=timeout_s)
    try:
        result = fn(rank, world_size, *args)
    finally:
        dist.shutdown()
    torch.save(result, Path(tmp) / f"{rank}.pt")


def exact_cuda_kernels() -> None:
    """On a GPU, float32 tests compare runs to float32 tolerances: no TF32 (10-bit mantissa)
    convolutions or matrix products, and deterministic cuDNN algorithms, so two runs of the
    same computation give the same numbers as on a CPU."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
