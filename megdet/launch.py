"""Start N local worker processes through ``torch.distributed.run`` (torchrun's own API), and
say in one line how they ended.

``megdet train --nproc N ...`` is exactly ``torchrun --standalone --nproc-per-node N -m megdet
train ...``; on a cluster, call torchrun yourself on every node (see docs/gpus.md).

The workers leave their one line (an error, a stop) in a folder the launcher reads once they
have all ended, so that a problem met by one rank is reported once, by its owner, instead of
as the other ranks' tracebacks about a lost connection.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shlex
import signal
import tempfile
from dataclasses import dataclass
from pathlib import Path

from torch.distributed import run as torchrun
from torch.distributed.elastic.multiprocessing import SignalException
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

from megdet.engine.stop import STOP_SIGNALS, STOPPED_EXIT_CODE

log = logging.getLogger(__name__)

REPORT_DIR = "MEGDET_REPORT_DIR"  # where workers leave their line for the launcher
COMMAND = "MEGDET_COMMAND"  # the command as typed, for the resume line
# Time the workers get to finish an iteration and write a checkpoint after a stop signal,
# before torchrun kills them (TORCH_ELASTIC_SHUTDOWN_TIMEOUT overrides it).
SHUTDOWN_TIMEOUT_S = 120
# What a worker sees when another one died under it: a symptom, not the cause.
LOST_PEER = re.compile(
    r"Connection (closed|reset) by peer|Broken pipe|Socket Timeout|ProcessGroupGloo|gloo",
    re.IGNORECASE,
)


@dataclass
class Ended:
    """How the workers ended: the exit code for the launcher, the one line a worker left
    (``reported``, printed as it is), or else what torchrun saw (``cause``)."""

    exit_code: int
    reported: str | None = None
    cause: str | None = None


def launch_local(nproc: int, worker_argv: list[str], max_restarts: int = 0, typed=None) -> Ended:
    """Run ``python -m megdet *worker_argv`` in ``nproc`` processes until they all end."""
    # torchrun would set 1 thread per worker with a warning; split the cores instead.
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    if max_restarts:
        # Restarted workers reading the previous attempt's gloo addresses from the store that
        # torchrun shares with them fail to connect (pytorch#135712); give them their own.
        os.environ.setdefault("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "1")
    os.environ[COMMAND] = shlex.join(typed or ["megdet", *worker_argv])
    args = torchrun_args(nproc, worker_argv, max_restarts)
    log.info(
        "launching %d processes: torchrun --standalone --nproc-per-node %d -m megdet %s",
        nproc,
        nproc,
        " ".join(worker_argv),
    )
    # torchrun's own lines (W "Sending process ... closing signal", E "failed (exitcode: 1)")
    # repeat what the launcher says in one line.
    for name in list(logging.root.manager.loggerDict):  # each sets its own level
        if name.startswith("torch.distributed.elastic"):
            logging.getLogger(name).setLevel(logging.CRITICAL)
    with tempfile.TemporaryDirectory(prefix="megdet-launch-") as folder:
        os.environ[REPORT_DIR] = folder
        try:
            torchrun.run(args)
            ended = Ended(0)
        except ChildFailedError as exc:
            # The cause, not its echo: torchrun stops the others with SIGTERM once one fails.
            rank, failure = min(
                exc.failures.items(),
                key=lambda item: (item[1].exitcode == -signal.SIGTERM, item[1].timestamp, item[0]),
            )
            code = failure.exitcode or 1
            if code < 0:
                ended = Ended(1, cause=f"rank {rank} was killed by {signal.Signals(-code).name}")
            else:
                ended = Ended(code, cause=f"rank {rank} exited with code {code}")
        except SignalException as exc:
            cause = f"stopped by {exc.sigval.name} before the workers wrote a checkpoint"
            ended = Ended(128 + exc.sigval, cause=cause)
        finally:
            del os.environ[REPORT_DIR]
        reports = _read_reports(Path(folder))
    for kind, code in (("stopped", STOPPED_EXIT_CODE), ("error", 2)):
        if kind in reports:  # what a worker said outranks what torchrun saw
            return Ended(code, reported=reports[kind])
    return ended


def torchrun_args(nproc: int, worker_argv: list[str], max_restarts: int = 0):
    """torchrun's arguments for ``python -m megdet *worker_argv`` in ``nproc`` processes.

    Ours are set after parsing, never parsed by torchrun: its parser takes ``--run`` (and
    ``--run=DIR``) as an abbreviation of its own ``--run-path`` and stops. The stop signals
    are forwarded to the workers (SIGUSR1 too, which Slurm's ``--signal`` sends)."""
    parser = torchrun.get_args_parser()
    options = ["--standalone", f"--nproc-per-node={nproc}", f"--max-restarts={max_restarts}"]
    known = parser._option_string_actions  # older torch has neither of these two
    if "--signals-to-handle" in known:
        names = {s.name for s in STOP_SIGNALS} | {"SIGHUP", "SIGQUIT"}
        options.append(f"--signals-to-handle={','.join(sorted(names))}")
    if "--shutdown-timeout" in known and "TORCH_ELASTIC_SHUTDOWN_TIMEOUT" not in os.environ:
        options.append(f"--shutdown-timeout={SHUTDOWN_TIMEOUT_S}")
    args = parser.parse_args([*options, "--module", "megdet"])
    args.training_script_args = list(worker_argv)
    return args


def report_to_launcher(kind: str, line: str) -> bool:
    """Under megdet's launcher, leave this worker's one line for it (``kind``: stopped, error,
    lost_peer) and return True; elsewhere (torchrun called directly) return False."""
    folder = os.environ.get(REPORT_DIR)
    if not folder or not Path(folder).is_dir():
        return False
    rank = int(os.environ.get("RANK", "0"))
    (Path(folder) / f"rank{rank}.json").write_text(json.dumps({"kind": kind, "line": line}))
    return True


def lost_peer(exc: BaseException) -> bool:
    """Whether ``exc`` is a collective failing because another process is gone."""
    import torch.distributed as torch_dist

    return isinstance(exc, torch_dist.DistError) or (
        isinstance(exc, RuntimeError) and bool(LOST_PEER.search(str(exc)))
    )


def _read_reports(folder: Path) -> dict[str, str]:
    """Each kind's line from the lowest rank that left one."""
    reports: dict[str, str] = {}
    files = sorted(folder.glob("rank*.json"), key=lambda p: int(p.stem[4:]))
    for file in files:
        try:
            report = json.loads(file.read_text())
        except (OSError, ValueError):
            continue
        reports.setdefault(report["kind"], report["line"])
    return reports
