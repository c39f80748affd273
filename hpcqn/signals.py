"""Stopping at a step boundary on SIGUSR1, SIGTERM or SIGINT (what Slurm sends before a time
limit or a preemption, see ``slurm/``): the handler only sets a flag (``signum``); at the
next step boundary the driver (:mod:`hpcqn.run`) puts it into a reduction the ranks make
anyway, so a signal delivered to any one rank stops every rank at the same step, which
then checkpoints and exits with :data:`EXIT_PREEMPTED`."""

from __future__ import annotations

import signal
from collections.abc import Iterable
from types import FrameType
from typing import Any

EXIT_PREEMPTED = 3  # checkpoint written after a signal; run the same command to resume
# SIGINT too: Ctrl-C on mpiexec (which forwards it to every rank) or srun stops the run at
# the next step boundary with a checkpoint, like SIGTERM; a second Ctrl-C on a rank that
# is still running raises KeyboardInterrupt there (a hard stop).
SIGNALS = (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT)


class Preempted(Exception):
    """Raised after the checkpoint of a signalled run is written."""

    def __init__(self, step: int, signum: int | None):
        name = signal.Signals(signum).name if signum else "a signal on another rank"
        super().__init__(f"stopped by {name} after step {step}; checkpoint written")
        self.step, self.signum = step, signum


class StopFlag:
    """Install with ``with StopFlag() as flag:``; the previous handlers come back on exit."""

    def __init__(self, signals: Iterable[int] = SIGNALS):
        self.signals = tuple(signals)
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def _handler(self, signum: int, frame: FrameType | None) -> None:
        if signum == signal.SIGINT and self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum

    def __enter__(self) -> StopFlag:
        for s in self.signals:
            self._previous[s] = signal.signal(s, self._handler)
        return self

    def __exit__(self, *exc: object) -> None:
        for s, previous in self._previous.items():
            signal.signal(s, previous)
        self._previous = {}
