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
