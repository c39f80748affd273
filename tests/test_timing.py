"""hpcqn.timing.PhaseTimer and the communicator's per-collective seconds: the wait in a
collective is moved out of the phase that made it (real MPI: one rank arrives late)."""

from __future__ import annotations

import time

import numpy as np
import pytest

import hpcqn
from hpcqn.timing import PhaseTimer, phase


def test_phases_add_up_to_the_wall_time_and_unknown_phases_are_refused():
    comm = hpcqn.serial_comm()
    timer = PhaseTimer(comm)
    start = time.perf_counter()
    with timer.phase("factors"):
        time.sleep(0.02)
    with timer.phase("update"):
        comm.allreduce(np.ones(4))
    wall = time.perf_counter() - start
    assert 0.02 <= timer.seconds["factors"] < wall
    assert sum(timer.seconds.values()) <= wall
    assert timer.seconds["communication"] == pytest.approx(
        comm.counters["allreduce"].seconds, abs=1e-12)
    with pytest.raises(ValueError, match="unknown phase"):
        with timer.phase("forward"):
            pass
    with phase(None, "anything"):  # no timer: nothing measured, nothing refused
        pass
    timer.reset()
    assert set(timer.seconds.values()) == {0.0}


@pytest.mark.mpi
def test_a_late_rank_shows_as_communication_not_as_the_phase(comm):
    """Rank 1 reaches the allreduce 0.3 s late: the others' wait lands in "communication"."""
    if comm.size == 1:
        pytest.skip("needs two ranks")
    c = hpcqn.Communicator(comm.mpi_comm)
    timer = PhaseTimer(c)
    comm.barrier()
    with timer.phase("statistics"):
        if c.rank == 1:
            time.sleep(0.3)
        total = c.allreduce(np.ones(3))
    np.testing.assert_array_equal(total, np.full(3, c.size))
    assert c.counters["allreduce"].calls == 1
    if c.rank == 1:
        assert timer.seconds["statistics"] >= 0.3
    else:  # every other rank waited for rank 1 inside the allreduce
        assert timer.seconds["communication"] >= 0.25
        assert timer.seconds["statistics"] < 0.1
