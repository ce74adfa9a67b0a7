"""Everything that talks to ``torch.distributed``; the rest of megdet calls these helpers.

Processes are started by torchrun (or :mod:`megdet.launch`, which calls the same code), so the
rank, world size and rendezvous come from the environment variables it sets. Without them the
process runs alone and every helper degrades to the single-process answer.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistContext:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(timeout_s: int = 600) -> DistContext:
    """Join the process group torchrun prepared: NCCL on CUDA, gloo on CPU and where several
    processes share a GPU (NCCL needs one GPU per process; gloo runs CGBN's collectives
    through host memory there: for tests and benchmarks, not for speed).

    Also splits this machine's CPU cores among its local processes; without that, every
    process starts one thread per core and they fight over the same cores.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
        backend = "nccl" if local_world_size <= torch.cuda.device_count() else "gloo"
    else:
        device = torch.device("cpu")
        backend = "gloo"
        cores = _bind_cores(local_rank, local_world_size)
        if "OMP_NUM_THREADS" not in os.environ:
            torch.set_num_threads(cores)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(
            backend=backend,
            timeout=datetime.timedelta(seconds=timeout_s),
            device_id=device if backend == "nccl" else None,
        )
    return DistContext(rank, world_size, local_rank, local_world_size, device)


def _bind_cores(local_rank: int, local_world_size: int) -> int:
    """Give this process its own slice of the machine's cores; return how many it has.

    A process that blocks in a gloo collective lets its core go idle, and a thread woken on a
    core that another process is computing on waits for the scheduler: on the 2-core CI machine
    that made the median CGBN all-gather 2-4x slower (BENCHMARKS.md). With more processes than
    cores nothing is bound and the cores are shared.
    """
    available = sorted(os.sched_getaffinity(0))
    per_process = len(available) // local_world_size
    if per_process < 1:
        return 1
    first = local_rank * per_process
    os.sched_setaffinity(0, available[first : first + per_process])
    return per_process


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def get_world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def get_rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def barrier() -> None:
    """Wait for every rank. Before ``shutdown`` on a command's success path: under load, one
    rank's teardown while another was still in its last collective's cleanup aborted the
    other once (``megdet eval --nproc 2``, SIGABRT "terminate called without an active
    exception"); not on error paths, where a dead peer would never arrive."""
    if get_world_size() > 1:
        dist.barrier()


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order, on every rank."""
    if get_world_size() == 1:
        return [obj]
    out: list[Any] = [None] * get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    if get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def group_size(group=None) -> int:
    """Processes in ``group`` (None: the default group); 1 without a process group."""
    return dist.get_world_size(group) if dist.is_initialized() else 1


def all_reduce_sum(tensor: torch.Tensor, group=None) -> torch.Tensor:
    """Sum over the ranks of ``group``, in place, and return the tensor."""
    if group_size(group) > 1:
        _wait(dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group, async_op=True), tensor)
    return tensor


def all_reduce_sum_async(tensor: torch.Tensor):
    """Start summing ``tensor`` in place over all ranks; return the work (None alone)."""
    if get_world_size() == 1:
        return None
    return dist.all_reduce(tensor, op=dist.ReduceOp.SUM, async_op=True)


def all_gather_tensor(tensor: torch.Tensor, group=None) -> torch.Tensor:
    """Stack ``tensor`` from every rank of ``group``: shape ``(group size, *tensor.shape)``.

    Latency-bound small tensors on CPU go through ``all_to_all_single`` with this rank's
    tensor repeated once per peer: the same result as an all-gather in one collective, and
    gloo's all-to-all answered in about two thirds of its all-gather's time here.
    """
    size = group_size(group)
    if size == 1:
        return tensor[None]
    flat = tensor.reshape(-1).contiguous()
    if flat.is_cuda and dist.get_backend(group) == "nccl":
        # NCCL's all-gather (all_gather_single from torch 2.14 on, its new name).
        out = flat.new_empty(size * flat.numel())
        gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
        _wait(gather(out, flat, group=group, async_op=True), flat)
    else:  # gloo; with processes sharing a GPU through host memory (no all-to-all on CUDA)
        host = flat.cpu()
        out = host.new_empty(size * host.numel())
        work = dist.all_to_all_single(out, host.repeat(size), group=group, async_op=True)
        _wait(work, host)
        out = out.to(flat.device)
    return out.view(size, *tensor.shape)


def _wait(work, tensor: torch.Tensor) -> None:
    """Wait for a collective; on CPU with a core of our own, by polling instead of sleeping.

    A sleeping process's core idles and waking it again costs up to a scheduler tick (4 ms
    here); polling with ``sched_yield`` keeps the core ours while still letting gloo's own
    threads run on it. On CUDA, ``wait`` only orders streams and never blocks the host.
    """
    if not tensor.is_cuda and _has_own_core():
        while not work.is_completed():
            os.sched_yield()
    work.wait()


def _has_own_core() -> bool:
    """True after :func:`_bind_cores` gave this process a slice of the cores."""
    local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return len(os.sched_getaffinity(0)) * local_world_size <= (os.cpu_count() or 1)


def new_group(ranks: list[int]):
    """A process group over ``ranks``; every rank must call this for every group, in order."""
    return dist.new_group(ranks)


def own_group(groups: list[list[int]]):
    """Create every group (same order on every rank) and return the one holding this rank.

    The groups are new even when one spans the whole world, so that CGBN's collectives never
    queue behind DDP's gradient buckets on the default group.
    """
    mine = None
    for ranks in groups:
        group = new_group(ranks) if get_world_size() > 1 else None
        if get_rank() in ranks:
            mine = group
    return mine


def reduce_mean_dict(values: dict[str, torch.Tensor]) -> dict[str, float]:
    """Average scalar tensors over all ranks with one collective and one host sync."""
    if not values:
        return {}
    keys = sorted(values)
    # Losses live on the device, counters on the host; NCCL reduces device tensors only.
    device = next((v.device for v in values.values() if v.device.type != "cpu"), "cpu")
    stacked = torch.stack([values[k].detach().to(device, torch.float64).reshape(()) for k in keys])
    stacked = all_reduce_sum(stacked) / get_world_size()
    return dict(zip(keys, stacked.tolist(), strict=True))


def average_buffers(module: torch.nn.Module) -> None:
    """Make floating-point buffers (BN running statistics) identical on every rank.

    Per-process BN updates its running statistics from its own images; evaluating or saving
    such a model would give rank-dependent answers. One collective for all buffers.
    """
    if get_world_size() == 1:
        return
    buffers = [b for b in module.buffers() if b.is_floating_point()]
    if not buffers:
        return
    flat = torch.cat([b.detach().reshape(-1).double() for b in buffers])
    all_reduce_sum(flat).div_(get_world_size())
    offset = 0
    for b in buffers:
        b.copy_(flat[offset : offset + b.numel()].view_as(b))
        offset += b.numel()


def broadcast_module_state(module: torch.nn.Module, src: int = 0) -> None:
    """Give every rank ``src``'s parameters and buffers, one collective per dtype.

    What only ``src`` loaded (pretrained weights, frozen statistics) reaches the others
    without every process reading or downloading the file, and independently of whether
    this torch's DDP syncs buffers when it is built.
    """
    if get_world_size() == 1:
        return
    tensors = [*module.parameters(), *module.buffers()]
    for dtype in sorted({t.dtype for t in tensors}, key=str):
        same = [t for t in tensors if t.dtype == dtype]
        flat = torch.cat([t.detach().reshape(-1) for t in same])
        dist.broadcast(flat, src=src)
        offset = 0
        with torch.no_grad():
            for t in same:
                t.copy_(flat[offset : offset + t.numel()].view_as(t))
                offset += t.numel()
