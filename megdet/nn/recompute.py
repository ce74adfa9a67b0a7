"""Activation checkpointing (sub-linear memory, MegDet section 3.3) that keeps BatchNorm exact.

``torch.utils.checkpoint`` recomputes a region's forward during backward. A BatchNorm inside it
would then update its running statistics a second time, and a cross-GPU BatchNorm would run its
collective again (pytorch#96136, fairscale#694). Each checkpointed call gets a
:class:`StatisticsTape`: the first forward records every BN layer's batch statistics on it, the
recomputation replays them, so the recomputed activations are bit-identical, running statistics
move once and the number of collectives per step does not change.
"""

from __future__ import annotations

import contextlib
from collections import deque
from collections.abc import Iterator
from contextvars import ContextVar

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

# The tape of the checkpointed region being run in this thread, if any. A context variable, set
# only inside the region, so nested or concurrent regions each see their own.
_ACTIVE_TAPE: ContextVar[StatisticsTape | None] = ContextVar("megdet_bn_tape", default=None)


class StatisticsTape:
    """BN statistics of one checkpointed call, in the order the layers ran."""

    def __init__(self) -> None:
        self._entries: deque = deque()
        self.replaying = False

    def record(self, entry) -> None:
        self._entries.append(entry)

    def replay(self):
        if not self._entries:
            raise RuntimeError(
                "a recomputed forward ran a BatchNorm that the first forward did not; the "
                "checkpointed region must compute the same thing twice"
            )
        return self._entries.popleft()


def active_tape() -> StatisticsTape | None:
    return _ACTIVE_TAPE.get()


@contextlib.contextmanager
def _running(tape: StatisticsTape, replaying: bool) -> Iterator[None]:
    token = _ACTIVE_TAPE.set(tape)
    tape.replaying = replaying
    try:
        yield
    finally:
        _ACTIVE_TAPE.reset(token)


def statistics_context():
    """``context_fn`` for ``torch.utils.checkpoint``: record in forward, replay in recompute."""
    tape = StatisticsTape()
    return _running(tape, replaying=False), _running(tape, replaying=True)


def checkpoint_module(module: nn.Module) -> nn.Module:
    """Make ``module`` recompute its forward in backward while training; return it.

    The forward is replaced on the instance rather than wrapped in a new module, so parameter
    names and checkpoints stay the same with checkpointing on or off.
    """
    original = module.forward

    def forward(*args, **kwargs):
        if module.training and torch.is_grad_enabled():
            return checkpoint(
                original, *args, use_reentrant=False, context_fn=statistics_context, **kwargs
            )
        return original(*args, **kwargs)

    module.forward = forward
    return module
