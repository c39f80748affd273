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


def signal_name(signum: int | None) -> str:
    """``SIGTERM`` for a signal number; None (this rank had none): another rank's."""
    return signal.Signals(signum).name if signum else "a signal on another rank"


class Preempted(Exception):
    """Raised after the checkpoint of a signalled run is written (``started``), or, when
    the signal came before the run's first step (``started`` False: its start-up, before
    any work), with nothing written: ``step`` is then the step of the checkpoint the run
    was resuming from (its state is unchanged), or None when there was none."""

    def __init__(self, step: int | None, signum: int | None, started: bool = True):
        # every rank raises it together (the stop was agreed): an exit while handling it
        # is every rank's, not one rank's failure (hpcqn.comm.install_exit_abort)
        self.hpcqn_agreed = True
        name = signal_name(signum)
        if started:
            text = f"stopped by {name} after step {step}; checkpoint written"
        elif step is None:
            text = f"stopped by {name} before the first step: nothing was done, nothing to resume"
        else:
            text = (f"stopped by {name} before the first step after the checkpoint of step "
                    f"{step}: nothing new was done, that checkpoint is unchanged")
        super().__init__(text)
        self.step, self.signum, self.started = step, signum, started


_EARLY: list[StopFlag] = []


def install_early_stop() -> None:
    """Install the ``hpcqn`` command's :class:`StopFlag` at once (the package's first
    lines run this for the command, before its heavy imports); :func:`early_stop` hands
    it to the command."""
    if not _EARLY:
        _EARLY.append(StopFlag().install())


def early_stop() -> StopFlag | None:
    """The flag :func:`install_early_stop` installed (once; None afterwards or if none)."""
    return _EARLY.pop() if _EARLY else None


class StopFlag:
    """Install with ``with StopFlag() as flag:`` (or :meth:`install`, then
    :meth:`restore`); the previous handlers come back on exit. ``hpcqn run`` installs
    one before anything else (before its heavy imports), so that a signal during the
    start-up is a stop like any other, agreed at the run's first agreement."""

    def __init__(self, signals: Iterable[int] = SIGNALS):
        self.signals = tuple(signals)
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def _handler(self, signum: int, frame: FrameType | None) -> None:
        if signum == signal.SIGINT and self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum

    def install(self) -> StopFlag:
        for s in self.signals:
            self._previous[s] = signal.signal(s, self._handler)
        return self

    def restore(self) -> None:
        """The previous handlers back."""
        for s, previous in self._previous.items():
            signal.signal(s, previous)
        self._previous = {}

    def release(self) -> None:
        """:meth:`restore`, then deliver a signal caught meanwhile again, to the previous
        handler (by default: the process ends as the signal's default says), for a
        program that turned out not to need the flag."""
        self.restore()
        if self.signum is not None:
            signal.raise_signal(self.signum)

    def __enter__(self) -> StopFlag:
        return self.install()

    def __exit__(self, *exc: object) -> None:
        self.restore()
