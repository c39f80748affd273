"""Where an optimizer step's time goes: :class:`PhaseTimer`.

Give an hpcqn optimizer a timer (``opt.timer = PhaseTimer(comm)``) and its steps add their
wall time per phase to ``timer.seconds``:

- ``"statistics"``: turning recorded layer inputs and output gradients into the vectors
  or factors of this step (MKOR's ``a``, ``g``; K-FAC's ``A``, ``G``; mL-BFGS's momentum
  averages);
- ``"factors"``: curvature updates (MKOR's Sherman-Morrison steps; K-FAC's running
  averages and inversions; mL-BFGS's pair formation);
- ``"precondition"``: turning the gradient into the step direction;
- ``"update"``: the first-order update that takes it;
- ``"communication"``: the time spent inside the communicator's collectives during any
  of the above, taken out of that phase (the communicator measures it per call), plus
  what an optimizer times as this phase itself: the collectives of its own step and the
  copies into and out of their buffers (mL-BFGS's reduce-scatter and allgather with the
  rank-major packing; the torch bridges' flat-buffer copies; MKOR-H's loss reduction).

Phases do not nest; with no timer set (the default) the optimizers measure nothing.
On a GPU pass ``sync`` (e.g. ``cupy.cuda.Device().synchronize``) so that each phase's
kernels are finished when its clock stops.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

PHASES = ("statistics", "factors", "precondition", "update", "communication")


class PhaseTimer:
    def __init__(self, comm: Any = None, sync: Callable[[], Any] | None = None):
        self.comm, self.sync = comm, sync
        self.seconds: dict[str, float] = {}
        self.reset()

    def reset(self) -> None:
        self.seconds = dict.fromkeys(PHASES, 0.0)

    def _comm_seconds(self) -> float:
        if self.comm is None:
            return 0.0
        return sum(c.seconds for c in self.comm.counters.values())

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        if name not in self.seconds:
            raise ValueError(f"unknown phase {name!r}; known: {PHASES}")
        if self.sync is not None:
            self.sync()
        comm0, start = self._comm_seconds(), time.perf_counter()
        try:
            yield
        finally:
            if self.sync is not None:
                self.sync()
            elapsed = time.perf_counter() - start
            communication = self._comm_seconds() - comm0
            self.seconds[name] += elapsed - communication
            self.seconds["communication"] += communication


def phase(timer: PhaseTimer | None, name: str) -> Any:
    """``timer.phase(name)``, or a no-op context when ``timer`` is None."""
    return nullcontext() if timer is None else timer.phase(name)
