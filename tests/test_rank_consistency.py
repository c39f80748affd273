"""Inputs that differ between ranks are detected at the start, on every rank, naming the
option and the ranks (never a deadlock or a silent average); non-finite starting points
and losses are refused or skipped. Run under ``mpiexec -n 1/2/3``; the cases that need
ranks to differ skip on one."""

from __future__ import annotations

import math

import numpy as np
import pytest

import hpcqn
from hpcqn.experiments.problems import DigitsSoftmax, make_problem
from hpcqn.stochastic import minimize_stochastic

pytestmark = pytest.mark.mpi


@pytest.fixture(scope="module")
def problem():
    return DigitsSoftmax()


def run(problem, comm, **options):
    method = options.pop("method", "sgd")
    return minimize_stochastic(
        problem.batch_loss, problem.x0(), problem.batches(60, comm.rank, comm.size),
        method=method, comm=comm,
        options={"blocks": problem.block_sizes, "disp": False, "epochs": 1, "lr": 0.1,
                 **options})


@pytest.mark.timeout(60)
@pytest.mark.parametrize("name, values, shown", [
    ("epochs", (1, 2), "option 'epochs'"),
    ("lr", (0.1, 0.2), "option 'lr'"),
    ("method", ("sgd", "adam"), "method"),
])
def test_an_option_that_differs_on_one_rank_is_named_on_every_rank(comm, problem, name,
                                                                   values, shown):
    if comm.size == 1:
        pytest.skip("needs two ranks to differ")
    value = values[1] if comm.rank == comm.size - 1 else values[0]
    last = comm.size - 1
    expected = (f"ranks 0-{last - 1}" if last > 1 else "rank 0") + f": {values[0]!r}; " \
        f"rank {last}: {values[1]!r}"
    with pytest.raises(ValueError, match="differs between ranks") as info:
        run(problem, comm, **{name: value})
    assert shown in str(info.value) and expected in str(info.value)


@pytest.mark.timeout(60)
def test_a_block_size_on_one_rank_only_is_refused(comm, problem):
    if comm.size == 1:
        pytest.skip("needs two ranks to differ")
    kwargs = {"block_size": 100} if comm.rank == 0 else {}
    with pytest.raises(ValueError, match="option 'block_size'.*rank 0: 100"):
        minimize_stochastic(problem.batch_loss, problem.x0(),
                            problem.batches(60, comm.rank, comm.size), method="mlbfgs",
                            comm=comm, options={"disp": False, **kwargs})


@pytest.mark.timeout(60)
def test_non_finite_x0_is_named_as_such(comm, problem):
    x0 = problem.x0()
    x0[3] = math.nan
    with pytest.raises(ValueError, match="x0 has 1 non-finite entry"):
        minimize_stochastic(problem.batch_loss, x0, problem.batches(60, comm.rank, comm.size),
                            comm=comm, options={"disp": False, "blocks": problem.block_sizes})
    fun, start = make_problem("extended_rosenbrock", n=30).distributed(comm)
    start = start.copy()
    if comm.rank == 0:
        start[0] = math.inf
    with pytest.raises((ValueError, hpcqn.RemoteRankError), match="non-finite") as info:
        hpcqn.minimize(fun, start, comm=comm)
    assert type(info.value) is (ValueError if comm.rank == 0 else hpcqn.RemoteRankError)


@pytest.mark.timeout(60)
def test_a_nan_loss_on_one_rank_is_skipped_on_every_rank(comm, problem):
    """The step with the NaN loss is not taken anywhere; the others match a run that never
    saw that batch's update, and the epoch mean leaves the NaN out of sum and count."""
    calls = [0]

    def poisoned(x, batch):
        f, g = problem.batch_loss(x, batch)
        calls[0] += 1
        return (math.nan if calls[0] == 5 and comm.rank == comm.size - 1 else f), g

    options = {"blocks": problem.block_sizes, "disp": False, "epochs": 1, "lr": 0.1}
    res = minimize_stochastic(poisoned, problem.x0(), problem.batches(60, comm.rank, comm.size),
                              method="sgd", comm=comm, options={**options, "momentum": 0.0})
    assert res.skipped_steps == 1
    assert math.isnan(res.loss_history[4])
    finite = res.loss_history[np.isfinite(res.loss_history)]
    assert res.epoch_losses[0] == pytest.approx(finite.mean(), rel=1e-14)
    # The replicas agree bitwise.
    gathered = comm.allgather_object(res.x.tobytes())
    assert all(b == gathered[0] for b in gathered)
    # Reference: plain SGD over the same batches without the fifth one's update.
    x = problem.x0()
    for step, batch in enumerate(problem.batches(60, 0, 1)(0)):
        if step == 4:
            continue
        _, g = problem.batch_loss(x, batch)
        x -= 0.1 * g
    np.testing.assert_allclose(res.x, x, rtol=1e-10, atol=1e-12)
