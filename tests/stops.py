"""A stand-in for :class:`hpcqn.signals.StopFlag` in tests that stop a run at a chosen step."""

from __future__ import annotations

import signal


class StopAt:
    """Reports a signal (as SIGUSR1 would) at its ``step``-th check, and from then on."""

    def __init__(self, step: int):
        self.step, self.calls, self.signum = step, 0, None

    def agreed(self, comm: object) -> bool:
        self.calls += 1
        if self.calls == self.step:
            self.signum = signal.SIGUSR1
        return self.signum is not None
