"""A stand-in for :class:`hpcqn.signals.StopFlag` in tests that stop a run at a chosen step."""

from __future__ import annotations

import signal


class StopAt:
    """Reports a signal (as SIGUSR1 would) from its ``step``-th read of ``signum`` on: the
    drivers read it once per step boundary, into that boundary's agreement."""

    def __init__(self, step: int):
        self.step, self.reads = step, 0

    @property
    def signum(self) -> int | None:
        self.reads += 1
        return signal.SIGUSR1 if self.reads >= self.step else None
