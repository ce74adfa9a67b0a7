"""Stopping a run on request: clusters preempt jobs with SIGTERM (Slurm sends it, then SIGKILL
after a grace period, and SIGUSR1 ahead of the time limit with ``--signal``), people with
Ctrl-C. The first such signal asks every rank to stop after the iteration in progress, with a
checkpoint; one more stops the process at once.

Ranks may receive the signal at different iterations, so the request travels with the loss in
the all-reduce every iteration already makes (``trainer.py``): all ranks stop after the same one.
"""

from __future__ import annotations

import os
import signal
import threading
import time

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
STOPPED_EXIT_CODE = 75  # EX_TEMPFAIL: stopped with a checkpoint; run again with --resume
# A signal sent to a job reaches a worker twice when both the launcher (which forwards it) and
# the worker get it, as under Slurm; within this window the second is the same request.
REPEAT_WINDOW_S = 1.0


class StopRequested(Exception):
    """Every rank stopped after ``iteration`` on ``signal_name``; rank 0 wrote a checkpoint."""

    def __init__(self, iteration: int, max_iter: int, signal_name: str, checkpoint) -> None:
        super().__init__(f"stopped at iteration {iteration} of {max_iter} ({signal_name})")
        self.iteration, self.max_iter = iteration, max_iter
        self.signal_name, self.checkpoint = signal_name, checkpoint


class StopSignals:
    """While entered (in the main thread), note the first stop signal instead of dying."""

    def __init__(self) -> None:
        self.signal_name: str | None = None
        self._first_at = 0.0
        self._previous: dict = {}

    @property
    def requested(self) -> bool:
        return self.signal_name is not None

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame) -> None:
        now = time.monotonic()
        if self.signal_name is None:
            self.signal_name, self._first_at = signal.Signals(signum).name, now
        elif now - self._first_at > REPEAT_WINDOW_S:
            os._exit(128 + signum)  # asked twice: stop now, as the shell's convention says
