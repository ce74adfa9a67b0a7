"""Start N local worker processes through ``torch.distributed.run`` (torchrun's own API).

``megdet train --nproc N ...`` is exactly ``torchrun --standalone --nproc-per-node N -m megdet
train ...``; on a cluster, call torchrun yourself on every node (see README).
"""

from __future__ import annotations

import logging
import os

from torch.distributed import run as torchrun
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

log = logging.getLogger(__name__)


def launch_local(nproc: int, worker_argv: list[str], max_restarts: int = 0) -> int:
    """Run ``python -m megdet *worker_argv`` in ``nproc`` processes; return their exit code."""
    # torchrun would set 1 thread per worker with a warning; split the cores instead.
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    if max_restarts:
        # Restarted workers reading the previous attempt's gloo addresses from the store that
        # torchrun shares with them fail to connect (pytorch#135712); give them their own.
        os.environ.setdefault("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "1")
    args = torchrun_args(nproc, worker_argv, max_restarts)
    log.info(
        "launching %d processes: torchrun --standalone --nproc-per-node %d -m megdet %s",
        nproc,
        nproc,
        " ".join(worker_argv),
    )
    try:
        torchrun.run(args)
    except ChildFailedError as exc:
        codes = [f.exitcode for f in exc.failures.values() if f.exitcode]
        return codes[0] if codes else 1
    return 0


def torchrun_args(nproc: int, worker_argv: list[str], max_restarts: int = 0):
    """torchrun's arguments for ``python -m megdet *worker_argv`` in ``nproc`` processes.

    Ours are set after parsing, never parsed by torchrun: its parser takes ``--run`` (and
    ``--run=DIR``) as an abbreviation of its own ``--run-path`` and stops."""
    args = torchrun.get_args_parser().parse_args(
        ["--standalone", f"--nproc-per-node={nproc}", f"--max-restarts={max_restarts}",
         "--module", "megdet"]
    )  # fmt: skip
    args.training_script_args = list(worker_argv)
    return args
