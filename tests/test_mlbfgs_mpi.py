"""mL-BFGS and the first-order baselines under mpiexec -n 1/2/3; one-rank runs in this
process are the reference."""

from __future__ import annotations

import numpy as np
import pytest
from stops import StopAt

import hpcqn
from hpcqn.experiments.problems import DigitsSoftmax
from hpcqn.layout import BlockLayout
from hpcqn.optimizers.first_order import SGD, Adam
from hpcqn.optimizers.mlbfgs import MLBFGS
from hpcqn.stochastic import minimize_stochastic

pytestmark = pytest.mark.mpi

SIZES = [65] * 10  # the digits problem: one block per class
OPTIONS = {"mlbfgs": {"lr": 0.1, "period": 5, "beta": 0.9, "history": 4},
           "mlbfgs_gradient": {"lr": 0.3, "period": 5, "beta": 0.9, "history": 4,
                               "normalize_to": "gradient"},
           "sgd": {"lr": 0.1, "momentum": 0.9, "nesterov": True},
           "adam": {"lr": 0.01}}


@pytest.fixture(scope="module")
def problem():
    return DigitsSoftmax()


def train(problem, method, comm, rank, nranks, epochs=3):
    """``method``: a key of OPTIONS (its method is the key's first word)."""
    return minimize_stochastic(
        problem.batch_loss, problem.x0(), problem.batches(60, rank, nranks),
        method=method.split("_")[0], comm=comm,
        options={"epochs": epochs, "blocks": SIZES, "disp": False, **OPTIONS[method]},
    )


@pytest.mark.parametrize("method", ["mlbfgs", "mlbfgs_gradient", "sgd", "adam"])
def test_replicated_trajectory_independent_of_rank_count(comm, problem, method):
    """Same global batches split over 1, 2 or 3 ranks: the same iterates (1e-10)."""
    res = train(problem, method, comm, comm.rank, comm.size)
    ref = train(problem, method, hpcqn.serial_comm(), 0, 1)
    assert res.nit == ref.nit == 3 * 22
    np.testing.assert_allclose(res.x, ref.x, rtol=1e-10, atol=1e-10 * np.abs(ref.x).max())
    np.testing.assert_allclose(res.loss_history, ref.loss_history, rtol=1e-10)
    if method == "mlbfgs":
        assert sum(comm.allgatherv(np.array([float(res.optimizer.statistics()["npairs"])]))) > 0


def quadratic_gradient(x):
    return np.linspace(0.5, 3.0, x.shape[0]) * x - 1.0


def test_sharded_equals_replicated(comm):
    layout = BlockLayout.from_sizes([7, 5, 9, 3, 6], comm.size)
    options = dict(lr=0.2, period=3, beta=0.5, history=3)
    replicated = MLBFGS(layout, comm, **options)
    sharded = MLBFGS(layout, comm, mode="sharded", **options)
    x = np.ones(layout.n)
    mine = layout.to_rank_major(np.ones(layout.n), np.empty(layout.n))
    segment = slice(sum(layout.counts[: comm.rank]), sum(layout.counts[: comm.rank + 1]))
    x_local = mine[segment].copy()
    for _ in range(12):
        replicated.step(x, quadratic_gradient(x))
        full_g = layout.to_rank_major(quadratic_gradient(layout.from_rank_major(
            comm.allgatherv(x_local, list(layout.counts)), np.empty(layout.n))), np.empty(layout.n))
        sharded.step(x_local, full_g[segment].copy())
    np.testing.assert_allclose(layout.to_rank_major(x, np.empty(layout.n))[segment], x_local,
                               rtol=1e-13)


def test_owner_memory_falls_with_rank_count(comm):
    """Optimizer state bytes, measured per rank, against a one-rank run of the same
    layout: each rank holds only its blocks' share."""
    sizes = [1000] * 6
    one = MLBFGS(BlockLayout.from_sizes(sizes, 1), hpcqn.serial_comm(), history=5, period=1)
    many = MLBFGS(BlockLayout.from_sizes(sizes, comm.size), comm, history=5, period=1)
    rng = np.random.default_rng(0)
    x1, xp = np.ones(6000), np.ones(6000)
    for _ in range(7):
        g = rng.standard_normal(6000)
        one.step(x1, g + x1)
        many.step(xp, g + xp)
    total = one.state_nbytes()
    mine = many.state_nbytes()
    share = len(many.owned) / 6
    assert mine == pytest.approx(total * share, rel=1e-9)
    assert max(comm.allgatherv(np.array([float(mine)]))) <= total / comm.size * (
        1 if 6 % comm.size == 0 else 1.5)


def test_communication_is_one_reduce_scatter_and_one_allgatherv(comm):
    """On one rank the gradient is used where it lies: no reduce_scatter (no copy).
    Construction communicates nothing; the first step agrees the layout and the options
    in one small reduction (one number for each, and the error flag), counted apart."""
    layout = BlockLayout.from_sizes([40, 30, 20, 10], comm.size)
    c = hpcqn.Communicator(comm.mpi_comm) if comm.size > 1 else hpcqn.serial_comm()
    opt = MLBFGS(layout, c, period=2, normalize_direction=False)
    assert c.counters == {}
    x = np.ones(layout.n)
    opt.step(x, quadratic_gradient(x))
    assert c.counters["allreduce"].calls == 1
    agreed = 1 + 3 + len(hpcqn.options.declared(MLBFGS))  # flag, class, layout, options
    assert c.counters["allreduce"].nbytes == agreed * 8
    c.reset_counters()
    scatters = 1 if comm.size > 1 else 0
    expected = {"reduce_scatter", "allgatherv"} if comm.size > 1 else {"allgatherv"}
    for step in range(1, 6):
        opt.step(x, quadratic_gradient(x))
        assert c.counters.get("reduce_scatter", hpcqn.comm.CollectiveCounter()).calls == (
            scatters * step)
        assert c.counters["allgatherv"].calls == step
        assert set(c.counters) == expected
    itemsize = 8
    if comm.size > 1:
        assert c.counters["reduce_scatter"].nbytes == 5 * (layout.n + comm.size) * itemsize
    assert c.counters["allgatherv"].nbytes == 5 * layout.counts[comm.rank] * itemsize
    # The default normalised direction adds one reduction of one number per step.
    opt = MLBFGS(layout, c)
    opt.step(x, quadratic_gradient(x))
    c.reset_counters()
    opt.step(x, quadratic_gradient(x))
    assert {k: v.calls for k, v in c.counters.items()} == {
        **({"reduce_scatter": 1} if comm.size > 1 else {}), "allreduce": 1, "allgatherv": 1}
    assert c.counters["allreduce"].nbytes == 2 * itemsize  # error flag + the norm
    # With weight decay the gradient is modified, so even one rank copies it.
    opt = MLBFGS(layout, c, weight_decay=0.1)
    c.reset_counters()
    opt.step(x, quadratic_gradient(x))
    assert c.counters["reduce_scatter"].calls == 1


@pytest.mark.parametrize("cls", [MLBFGS, SGD, Adam])
@pytest.mark.timeout(60)
def test_nan_gradient_on_one_rank_skips_everywhere(comm, cls):
    layout = BlockLayout.from_sizes([8, 8, 8], comm.size)
    opt = cls(layout, comm, lr=0.05)
    x = np.ones(layout.n)
    for step in range(6):
        g = quadratic_gradient(x)
        if step == 3 and comm.rank == comm.size - 1:
            g[0] = np.nan
        before = x.copy()
        took = opt.step(x, g)
        assert took is (step != 3)
        if step == 3:
            np.testing.assert_array_equal(x, before)
    assert opt.skipped_steps == 1 and opt.step_count == 5


@pytest.mark.timeout(60)
def test_stochastic_driver_failures_reach_every_rank(comm, problem):
    def bad(w, batch):
        if comm.rank == comm.size - 1:
            raise RuntimeError("bad batch on the last rank")
        return problem.batch_loss(w, batch)

    expected = RuntimeError if comm.rank == comm.size - 1 else hpcqn.RemoteRankError
    with pytest.raises(expected, match="bad batch"):
        minimize_stochastic(bad, problem.x0(), problem.batches(60, comm.rank, comm.size),
                            comm=comm, options={"blocks": SIZES, "disp": False})
    if comm.size > 1:
        short = problem.batches(60, comm.rank, comm.size)(0)[: 5 + comm.rank]
        with pytest.raises(ValueError, match="ran out of batches"):
            minimize_stochastic(problem.batch_loss, problem.x0(), short, comm=comm,
                                options={"blocks": SIZES, "disp": False})


def test_state_dict_round_trip_continues_exactly(comm):
    layout = BlockLayout.from_sizes([11, 7, 5], comm.size)
    options = dict(lr=0.1, period=2, beta=0.5, history=2)
    first = MLBFGS(layout, comm, **options)
    x = np.ones(layout.n)
    for _ in range(5):
        first.step(x, quadratic_gradient(x))
    saved = first.state_dict()
    x_saved = x.copy()
    for _ in range(4):
        first.step(x, quadratic_gradient(x))
    second = MLBFGS(layout, comm, **options)
    second.load_state_dict(saved)
    for _ in range(4):
        second.step(x_saved, quadratic_gradient(x_saved))
    np.testing.assert_array_equal(x_saved, x)


@pytest.mark.timeout(60)
def test_bad_options_on_one_rank_raise_everywhere(comm, problem):
    if comm.size == 1:
        pytest.skip("needs a rank with good options")
    options = {"blocks": SIZES, "disp": False}
    if comm.rank == comm.size - 1:
        options["history"] = 0
    with pytest.raises((ValueError, hpcqn.RemoteRankError), match="history"):
        minimize_stochastic(problem.batch_loss, problem.x0(),
                            problem.batches(60, comm.rank, comm.size), comm=comm,
                            options=options)
    x0 = problem.x0() + (1.0 if comm.rank == 0 else 0.0)
    with pytest.raises(ValueError, match="x0 differs"):
        minimize_stochastic(problem.batch_loss, x0, problem.batches(60, comm.rank, comm.size),
                            comm=comm, options={"blocks": SIZES, "disp": False})


@pytest.mark.parametrize("method", ["mlbfgs", "sgd", "adam"])
@pytest.mark.timeout(120)
def test_resume_bitwise_and_elastic(comm, problem, method, tmp_path_factory):
    """Stopped by a signal mid-epoch and resumed on the same ranks: bitwise. The same
    checkpoint resumed by one process with the whole batch: the one-rank run (1e-10)."""
    import shutil

    from hpcqn.signals import Preempted

    base = comm.bcast_object(str(tmp_path_factory.mktemp("ck")) if comm.rank == 0 else None)
    straight = train(problem, method, comm, comm.rank, comm.size)

    def run(c, rank, nranks, directory, stop=None):
        return minimize_stochastic(
            problem.batch_loss, problem.x0(), problem.batches(60, rank, nranks),
            method=method, comm=c, checkpoint_dir=directory, stop=stop,
            options={"epochs": 3, "blocks": SIZES, "disp": False, **OPTIONS[method]})

    with pytest.raises(Preempted):
        run(comm, comm.rank, comm.size, base, StopAt(30))
    comm.barrier()
    mine = f"{base}-copy-{comm.rank}"  # one copy per rank for the one-process resume
    shutil.copytree(base, mine)
    resumed = run(comm, comm.rank, comm.size, base)
    np.testing.assert_array_equal(resumed.x, straight.x)
    np.testing.assert_array_equal(resumed.loss_history, straight.loss_history)
    alone = run(hpcqn.serial_comm(), 0, 1, mine)
    reference = train(problem, method, hpcqn.serial_comm(), 0, 1)
    np.testing.assert_allclose(alone.x, reference.x, rtol=1e-10,
                               atol=1e-10 * np.abs(reference.x).max())


def rank_layout(comm, sizes_by_rank):
    """A layout whose block sizes depend on the rank (a caller's bug)."""
    return BlockLayout.from_sizes(sizes_by_rank[min(comm.rank, len(sizes_by_rank) - 1)],
                                  comm.size)


@pytest.mark.parametrize("cls", [MLBFGS, SGD, Adam])
@pytest.mark.timeout(60)
def test_a_layout_that_differs_between_ranks_is_an_error_on_every_rank(comm, cls):
    """Each rank its own block sizes (same total length): before, every step was skipped
    on every rank and x never moved (exit 0). Now the first step raises a ValueError on
    every rank naming the layout and which ranks hold which, and x is untouched; the
    same layout everywhere steps as before."""
    if comm.size == 1:
        pytest.skip("needs two ranks to differ")
    layout = rank_layout(comm, [[30, 30, 40], [40, 30, 30]])
    opt = cls(layout, comm, lr=0.1)
    x = np.ones(layout.n)
    with pytest.raises(ValueError, match=r"layout block sizes differs between ranks \(rank 0: "
                                         r"\(30, 30, 40\); ranks? 1.*: \(40, 30, 30\)\)"):
        opt.step(x, quadratic_gradient(x))
    np.testing.assert_array_equal(x, np.ones(layout.n))
    good = cls(BlockLayout.from_sizes([30, 30, 40], comm.size), comm, lr=0.1)
    assert good.step(x, quadratic_gradient(x))
    assert not np.array_equal(x, np.ones(layout.n))


@pytest.mark.timeout(60)
def test_an_option_that_differs_between_ranks_is_named(comm):
    """normalize_direction on one rank only would add a reduction that the others never
    join (a hang); history differing would change the direction. Both named."""
    if comm.size == 1:
        pytest.skip("needs two ranks to differ")
    layout = BlockLayout.from_sizes([20, 20, 20], comm.size)
    last = comm.rank == comm.size - 1
    for option, value in (("normalize_direction", not last), ("history", 3 if last else 5)):
        opt = MLBFGS(layout, comm, **{option: value})
        x = np.ones(layout.n)
        with pytest.raises(ValueError, match=f"option {option} differs between ranks"):
            opt.step(x, quadratic_gradient(x))


@pytest.mark.timeout(60)
def test_a_bad_gradient_on_one_rank_at_the_first_step_is_an_error_on_every_rank(comm):
    """The first step's agreement carries a bad argument on any one rank: that rank
    raises its own error, the others a RemoteRankError naming it (no hang)."""
    if comm.size == 1:
        pytest.skip("needs two ranks to differ")
    layout = BlockLayout.from_sizes([20, 20, 20], comm.size)
    opt = MLBFGS(layout, comm)
    x = np.ones(layout.n)
    g = quadratic_gradient(x)[: -1 if comm.rank == 1 else None]
    expected = ValueError if comm.rank == 1 else hpcqn.RemoteRankError
    with pytest.raises(expected, match="needs x and g of length 60"):
        opt.step(x, g)
