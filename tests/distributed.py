"""Run a function in k processes joined by a gloo process group, as torchrun would."""

from __future__ import annotations

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


def run_in_processes(fn, world_size: int, *args, timeout_s: int = 240) -> list:
    """``fn(rank, world_size, *args)`` in ``world_size`` spawned processes; their returns.

    Each process sees the environment torchrun sets (RANK, WORLD_SIZE, LOCAL_RANK, ...), so
    the code under test joins the group through ``megdet.dist.init_distributed`` as in a run.
    """
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        context = mp.start_processes(
            _worker,
            args=(fn, world_size, port, tmp, timeout_s, args),
            nprocs=world_size,
            join=False,
            start_method="spawn",
        )
        while not context.join(timeout=timeout_s):
            pass
        return [torch.load(Path(tmp) / f"{r}.pt", weights_only=False) for r in range(world_size)]


def _worker(rank, fn, world_size, port, tmp, timeout_s, args):
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
