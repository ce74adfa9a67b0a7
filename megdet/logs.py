"""Logging set-up: every rank logs, only rank 0 prints INFO lines, warnings come from all."""

from __future__ import annotations

import logging
import sys


class _RankFilter(logging.Filter):
    def __init__(self, rank: int) -> None:
        super().__init__()
        self.rank = rank

    def filter(self, record: logging.LogRecord) -> bool:
        record.rank = self.rank
        return self.rank == 0 or record.levelno >= logging.WARNING


def setup_logging(rank: int = 0, level: int = logging.INFO) -> None:
    """Route the ``megdet`` loggers to stderr with a rank-aware filter (no patched print)."""
    logger = logging.getLogger("megdet")
    logger.handlers.clear()
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_RankFilter(rank))
    handler.setFormatter(logging.Formatter("[%(asctime)s r%(rank)s] %(message)s", "%H:%M:%S"))
    logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False


class Progress:
    """One convention for every command's progress: a tqdm bar on a terminal, a log line
    every tenth of the way otherwise (a bar's redraws are noise in a log file)."""

    def __init__(self, total: int, unit: str, what: str, bar: bool | None = None) -> None:
        self.total, self.unit, self.what, self.done = total, unit, what, 0
        self._next_line = self._step = max(1, -(-total // 10))
        self._bar = None
        if bar if bar is not None else sys.stderr.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=total, unit=unit, dynamic_ncols=True, desc=what)

    def update(self, count: int) -> None:
        self.done += count
        if self._bar is not None:
            self._bar.update(count)
        elif self.done >= self._next_line or self.done == self.total:
            logging.getLogger("megdet").info(
                "%s: %d/%d %ss", self.what, self.done, self.total, self.unit
            )
            while self._next_line <= self.done:
                self._next_line += self._step

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
