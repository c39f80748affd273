"""hpcqn.Minimizer under mpiexec -n 1/2/3: the iterates of hpcqn.minimize on the same
ranks, and an evaluation that fails on one rank raises on every rank."""

from __future__ import annotations

import numpy as np
import pytest

import hpcqn
from hpcqn.experiments.problems import make_problem

pytestmark = pytest.mark.mpi
OPTIONS = {"gtol": 1e-8, "history": 5}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("bounded", [False, True])
def test_same_iterates_as_minimize(comm, bounded):
    problem = make_problem("broyden_tridiagonal", n=301)  # uneven slices on 2 and 3 ranks
    fun, x0 = problem.distributed(comm)
    bounds = (-0.5, 0.55) if bounded else None
    evaluated = []

    def recorded(x):
        evaluated.append(x.copy())
        return fun(x)

    res = hpcqn.minimize(recorded, x0, comm=comm, bounds=bounds, options=OPTIONS)
    solver = hpcqn.Minimizer(x0, comm=comm, bounds=bounds, options=OPTIONS)
    asked = []
    while not solver.done:
        x = solver.ask()
        asked.append(x.copy())
        solver.tell(*fun(x))
    out = solver.result()
    assert res.success and out.success
    assert len(asked) == len(evaluated) == res.nfev
    assert all(np.array_equal(a, b) for a, b in zip(asked, evaluated, strict=True))
    assert (out.nit, out.fun, out.nactive) == (res.nit, res.fun, res.nactive)
    assert (out.nactive > 0) == bounded


@pytest.mark.timeout(60)
def test_fail_on_one_rank_raises_on_every_rank(comm):
    """The last rank's evaluation fails at the fourth point: it raises its own error, the
    others RemoteRankError naming it, in the same tell (nobody waits), and the
    communicator stays usable."""
    # An objective without communication of its own: one whose evaluation exchanges
    # halos would wait for the failing rank inside the caller's code, before hpcqn.
    x0 = np.zeros(100 + comm.rank)
    scale = np.arange(1.0, x0.size + 1.0)

    def fun(x):
        return float((scale * (x - 1.0) ** 4).sum()), 4.0 * scale * (x - 1.0) ** 3

    solver = hpcqn.Minimizer(x0, comm=comm, options=OPTIONS)
    caught, told = None, 0
    try:
        while not solver.done:
            x = solver.ask()
            if told == 3 and comm.rank == comm.size - 1:
                solver.fail(FloatingPointError("the simulation diverged"))
            solver.tell(*fun(x))
            told += 1
    except Exception as exc:  # the type is the test's subject
        caught = exc
    again = hpcqn.minimize(fun, x0, comm=comm, options={"maxiter": 2})
    assert again.nit == 2
    assert told == 3 and solver.done
    if comm.rank == comm.size - 1:
        assert isinstance(caught, FloatingPointError)
    else:
        assert isinstance(caught, hpcqn.RemoteRankError)
        assert (caught.rank, caught.remote_type) == (comm.size - 1, "FloatingPointError")


@pytest.mark.timeout(60)
def test_tell_before_ask_on_one_rank_raises_on_every_rank(comm):
    """Rank 1 (rank 0 alone) tells before it asks, at the start and again in the middle
    of a run (a second tell for one ask): it raises its RuntimeError, every other rank
    RemoteRankError naming it, in the same tell (nobody waits for it), and the
    communicator stays usable."""
    bad = 1 if comm.size > 1 else 0
    x0 = np.zeros(50 + comm.rank)
    scale = np.arange(1.0, x0.size + 1.0)

    def fun(x):
        return float((scale * (x - 1.0) ** 4).sum()), 4.0 * scale * (x - 1.0) ** 3

    for misuse_at in (0, 5):
        solver = hpcqn.Minimizer(x0, comm=comm, options=OPTIONS)
        caught, told, x = None, 0, x0
        try:
            while not solver.done:
                if not (comm.rank == bad and told == misuse_at):
                    x = solver.ask()  # the misusing rank tells without asking here
                solver.tell(*fun(x))
                told += 1
        except Exception as exc:  # the type is the test's subject
            caught = exc
        assert told == misuse_at and solver.done
        if comm.rank == bad:
            assert type(caught) is RuntimeError and "ask() first" in str(caught)
        else:
            assert isinstance(caught, hpcqn.RemoteRankError)
            assert (caught.rank, caught.remote_type) == (bad, "RuntimeError")
        with pytest.raises(RuntimeError, match="stopped on an error"):
            solver.ask()
    again = hpcqn.minimize(fun, x0, comm=comm, options={"maxiter": 2})
    assert again.nit == 2
