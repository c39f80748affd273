"""hpcqn.timing.PhaseTimer and the communicator's per-collective seconds: the wait in a
collective is moved out of the phase that made it (real MPI: one rank arrives late), and
the block-wise optimizers' collectives are timed as "communication"."""

from __future__ import annotations

import time

import numpy as np
import pytest

import hpcqn
from hpcqn.layout import BlockLayout
from hpcqn.optimizers.mlbfgs import MLBFGS
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
    c = hpcqn.Communicator(transport=comm.transport)
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


def _timed_mlbfgs_steps(c, steps=12, late_rank=None):
    """mL-BFGS core steps (replicated mode, pairs every 2 steps) on ``c`` with a
    PhaseTimer: returns the timer and, per timed step, the phases' seconds and the wall
    time. With ``late_rank``, that rank reaches the first timed step 0.2 s late."""
    layout = BlockLayout.from_sizes([20_000] * 4, c.size)
    opt = MLBFGS(layout, c, period=2, history=3)
    rng = np.random.default_rng(c.rank)
    x = np.zeros(layout.n)
    for _ in range(4):  # untimed: block states, first pairs
        opt.step(x, rng.standard_normal(layout.n))
    opt.timer = timer = PhaseTimer(c)
    c.reset_counters()
    per_step = []
    for step in range(steps):
        g = rng.standard_normal(layout.n)
        c.barrier()
        if step == 0 and c.rank == late_rank:
            time.sleep(0.2)
        before = sum(timer.seconds.values())
        start = time.perf_counter()
        assert opt.step(x, g)
        wall = time.perf_counter() - start
        per_step.append((sum(timer.seconds.values()) - before, wall))
    assert opt.statistics()["npairs"] > 0 or not opt.owned
    return timer, per_step


def _assert_phases_add_up(per_step):
    """Each step's phases add up to no more than its wall time and, outside every phase
    being only the argument checks and the finiteness test of g, to most of it (the
    median step: a step the OS preempts outside a phase is an outlier). Those checks take
    10-16 % of a step of this size (about 1-3 ms) on a 2-core machine, so the bound is
    0.75: it catches untimed work the size of the factors or the preconditioning (about
    30 % of the step each); that every phase is timed at all is checked by the callers."""
    for phases, wall in per_step:
        assert phases <= wall
    shares = sorted(phases / wall for phases, wall in per_step)
    assert shares[len(shares) // 2] >= 0.75, shares


def test_mlbfgs_core_step_phases_add_up_on_one_process():
    timer, per_step = _timed_mlbfgs_steps(hpcqn.serial_comm())
    for name in ("statistics", "factors", "precondition", "update", "communication"):
        assert timer.seconds[name] > 0, name
    _assert_phases_add_up(per_step)


@pytest.mark.mpi
def test_mlbfgs_core_step_times_its_collectives_as_communication(comm):
    """The reduce-scatter, the allgatherv and the direction's norm reduction land in
    "communication" (a late rank's wait included), and the phases add up to the step."""
    if comm.size == 1:
        pytest.skip("needs two ranks")
    c = hpcqn.Communicator(transport=comm.transport)
    timer, per_step = _timed_mlbfgs_steps(c, late_rank=1)
    assert {"reduce_scatter", "allgatherv", "allreduce"} <= set(c.counters)
    collectives = sum(counter.seconds for counter in c.counters.values())
    assert collectives > 0
    # every second inside a collective is in "communication" (with the copies around them)
    assert timer.seconds["communication"] >= collectives
    if c.rank != 1:  # waited for rank 1 inside the first step's reduce-scatter
        assert timer.seconds["communication"] >= 0.15
    for name in ("statistics", "factors", "precondition", "update"):
        assert timer.seconds[name] > 0, name
    _assert_phases_add_up(per_step)
