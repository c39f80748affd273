"""hpcqn.minimize under mpiexec -n 1/2/3: a one-rank run is the reference."""

from __future__ import annotations

import numpy as np
import pytest
from stops import StopAt

import hpcqn
from hpcqn.experiments.problems import make_problem
from hpcqn.layout import SliceLayout

pytestmark = pytest.mark.mpi

# Sums over ranks round differently on different rank counts (the summation order
# changes), so iterates agree to rounding, and the iteration count is the same while
# no stopping or line-search test falls within that rounding of its threshold. The
# gradient test at 1e-6 sits far above the rounding floor of these problems.
OPTIONS = {"gtol": 1e-6, "ftol": 0.0, "maxiter": 5000}


def reference(problem, options=OPTIONS):
    """The same problem solved on one rank, in this process, with no MPI."""
    fun, x0 = problem.distributed(hpcqn.serial_comm())
    return hpcqn.minimize(fun, x0, comm=hpcqn.serial_comm(), options=options)


def relative_error(x, ref) -> float:
    return float(np.abs(x - ref).max() / np.abs(ref).max())


@pytest.mark.parametrize("name,n", [("broyden_tridiagonal", 301), ("logistic", 31),
                                    ("extended_powell", 300)])
def test_same_iterates_on_any_rank_count(comm, name, n):
    problem = make_problem(name, n=n)
    fun, x0 = problem.distributed(comm)
    res = hpcqn.minimize(fun, x0, comm=comm, options={**OPTIONS, "gather_x": True})
    ref = reference(problem)
    assert res.success and ref.success
    assert res.nit == ref.nit
    assert relative_error(res.x_global, ref.x) <= 1e-8
    part = problem.layout(comm.size).local_slice(comm.rank)
    np.testing.assert_array_equal(res.x, res.x_global[part])
    assert res.fun == pytest.approx(ref.fun, rel=1e-10, abs=1e-14)


@pytest.mark.parametrize("name,n,gtol", [("extended_rosenbrock", 1000, 1e-6),
                                         ("extended_wood", 300, 1e-6),
                                         ("quadratic", 301, 1e-7)])
def test_sensitive_problems_on_any_rank_count(comm, name, n, gtol):
    """Curved valleys (Rosenbrock, Wood) and a condition number of 1e4 amplify the
    rounding differences between rank counts into slightly different paths. The spread
    is that of rounding itself, not of the rank count: on ONE rank, starts one ulp away
    from x0 take 45 to 55 iterations for Rosenbrock where x0 itself takes 36 (the
    trajectories agree to 1e-9 for 27 iterations, then a line-search decision flips),
    and 3 or 4 ranks take 48. The count may differ by that spread (60%); every rank
    count reaches the closed-form minimiser."""
    problem = make_problem(name, n=n)
    fun, x0 = problem.distributed(comm)
    options = {**OPTIONS, "gtol": gtol, "gather_x": True}
    res = hpcqn.minimize(fun, x0, comm=comm, options=options)
    ref = reference(problem, {**options, "gather_x": False})
    assert res.success and abs(res.nit - ref.nit) <= 0.6 * ref.nit
    tolerance = 1e-6 if name == "quadratic" else 1e-5  # f stalls on rounding near there
    assert relative_error(res.x_global, problem.solution()) <= tolerance
    assert relative_error(ref.x, problem.solution()) <= tolerance


def test_empty_slices_and_uneven_split(comm):
    """Rank 0 owns nothing; the others split 101 unknowns unevenly."""
    problem = make_problem("broyden_tridiagonal", n=101)
    counts = [0] + list(SliceLayout.even(101, comm.size - 1).counts) if comm.size > 1 else [101]
    layout = SliceLayout(tuple(counts))
    fun, x0 = problem.distributed(comm, layout)
    res = hpcqn.minimize(fun, x0, comm=comm, options={**OPTIONS, "gtol": 1e-7, "gather_x": True})
    ref = reference(problem, {**OPTIONS, "gtol": 1e-7})
    assert res.nit == ref.nit and res.x.shape == (counts[comm.rank],)
    np.testing.assert_allclose(res.x_global, ref.x, rtol=1e-8)


class CountingComm:
    """An mpi4py communicator that counts the MPI calls made through it."""

    def __init__(self, mpi_comm):
        self.mpi_comm = mpi_comm
        self.calls: dict[str, int] = {}

    def __getattr__(self, name):
        attribute = getattr(self.mpi_comm, name)
        if name in ("Get_rank", "Get_size") or not callable(attribute):
            return attribute

        def counted(*args, **kwargs):
            self.calls[name] = self.calls.get(name, 0) + 1
            return attribute(*args, **kwargs)

        return counted


def test_one_reduction_per_iteration_plus_one_per_trial(comm):
    """MPI calls counted at the mpi4py level and callback calls counted here: one
    collective before any evaluation, one at x0, then one per line-search trial and one
    per iteration."""
    if comm.size == 1:
        pytest.skip("a one-rank communicator makes no MPI calls")
    problem = make_problem("extended_rosenbrock", n=200)
    fun, x0 = problem.distributed(comm)
    evaluations = []

    def counted(x):
        evaluations.append(1)
        return fun(x)

    mpi = CountingComm(comm.mpi_comm)
    res = hpcqn.minimize(counted, x0, comm=hpcqn.Communicator(mpi))
    assert res.nfev == len(evaluations)
    assert mpi.calls == {"Allgather": 2 + (len(evaluations) - 1) + res.nit}
    assert res.nallreduce == mpi.calls["Allgather"]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("variant", ["bounds", "H0", "inner"])
def test_bounds_and_metrics_keep_one_reduction_per_trial_and_iteration(comm, variant):
    """Bounds (the subspace step's products ride in the closing reduction), H0 and a
    user inner product (their products too): the same count of MPI calls as the
    unconstrained run, 2 + (nfev - 1) + nit, and nothing else."""
    if comm.size == 1:
        pytest.skip("a one-rank communicator makes no MPI calls")
    problem = make_problem("extended_rosenbrock", n=200)
    fun, x0 = problem.distributed(comm)
    weights = 1.0 + np.arange(x0.size) % 3  # a diagonal "mass": local H0 and inner
    kwargs = {"bounds": {"bounds": (-0.5, 0.8)},
              "H0": {"H0": lambda v: v / weights},
              "inner": {"inner": lambda u, v: float(u @ (weights * v))}}[variant]
    if variant == "inner":
        plain = fun

        def fun(x):  # the gradient in that inner product
            f, g = plain(x)
            return f, g / weights

    evaluations = []

    def counted(x):
        evaluations.append(1)
        return fun(x)

    mpi = CountingComm(comm.mpi_comm)
    res = hpcqn.minimize(counted, x0, comm=hpcqn.Communicator(mpi), **kwargs)
    assert res.success, res.message
    assert res.nfev == len(evaluations)
    assert mpi.calls == {"Allgather": 2 + (len(evaluations) - 1) + res.nit}
    assert res.nallreduce == mpi.calls["Allgather"]
    assert (res.nactive > 0) == (variant == "bounds")



def test_reductions_inside_fun_are_not_the_solvers(comm):
    problem = make_problem("logistic", n=31)  # its callback reduces the margins itself
    fun, x0 = problem.distributed(comm)
    res = hpcqn.minimize(fun, x0, comm=comm)
    assert res.nallreduce == 2 + (res.nfev - 1) + res.nit


@pytest.mark.timeout(60)
@pytest.mark.parametrize("bad", ["unknown option", "option value", "dtype", "disp",
                                 "fun_global"])
def test_bad_input_on_one_rank_only(comm, bad):
    """Only the last rank passes the bad input: every rank raises, none waits."""
    if comm.size == 1:
        pytest.skip("needs a rank with good input")
    problem = make_problem("extended_rosenbrock", n=100)
    fun, x0 = problem.distributed(comm)
    options = {}
    if comm.rank == comm.size - 1:
        if bad == "unknown option":
            options = {"maxcor": 5}
        elif bad == "option value":
            options = {"gtol": -1.0}
        elif bad == "dtype":
            x0 = x0.astype(np.int64)
        elif bad == "disp":
            options = {"disp": "1"}
        else:
            options = {"fun_global": True}
    with pytest.raises((ValueError, TypeError, hpcqn.RemoteRankError)):
        hpcqn.minimize(fun, x0, comm=comm, options=options)


def test_fun_global_with_a_non_finite_trial(comm):
    """f = inf beyond |x| > 3 on every rank: the step shrinks, no false disagreement."""
    def fun(x):
        if comm.allreduce(np.array([np.abs(x).max(initial=0.0)]), op="max")[0] > 3.0:
            return np.inf, np.full_like(x, np.inf)
        return comm.allreduce(np.array([float((x - 2.5) @ (x - 2.5))]))[0], 2 * (x - 2.5)

    res = hpcqn.minimize(fun, np.zeros(3 + comm.rank), comm=comm,
                         options={"fun_global": True, "gtol": 1e-8})
    assert res.success
    np.testing.assert_allclose(res.x, 2.5, atol=1e-7)


def test_distributed_pieces_add_up_to_the_whole(comm):
    for name, n in [("broyden_tridiagonal", 50), ("logistic", 31), ("extended_wood", 40),
                    ("quadratic", 50)]:
        problem = make_problem(name, n=n)
        fun, x0 = problem.distributed(comm)
        x_full = problem.x0() + np.linspace(0.0, 0.3, n)
        part = problem.layout(comm.size).local_slice(comm.rank)
        f_part, g_part = fun(x_full[part])
        f_ref, g_ref = problem.value_and_grad(x_full)
        assert comm.allreduce(np.array([f_part]))[0] == pytest.approx(f_ref, rel=1e-12)
        np.testing.assert_allclose(hpcqn.gather_global(g_part, comm), g_ref, rtol=1e-12)


def test_global_f_option(comm):
    """A callback that already returns the global f (every rank the same value)."""
    problem = make_problem("broyden_tridiagonal", n=120)
    fun, x0 = problem.distributed(comm)

    def global_fun(x):
        f_part, g = fun(x)
        return comm.allreduce(np.array([f_part]))[0], g

    res = hpcqn.minimize(global_fun, x0, comm=comm, options={"fun_global": True, **OPTIONS})
    ref = reference(problem)
    assert res.nit == ref.nit and res.fun == pytest.approx(ref.fun, abs=1e-14)


@pytest.mark.timeout(60)
def test_exception_on_one_rank_stops_all(comm):
    """fun raises on the last rank only, at its fourth call: every rank stops with an
    error (the failing rank its own, the others RemoteRankError), none hangs."""
    problem = make_problem("extended_rosenbrock", n=100)
    fun, x0 = problem.distributed(comm)
    calls = []

    def flaky(x):
        calls.append(1)
        if comm.rank == comm.size - 1 and len(calls) == 4:
            raise FloatingPointError("solver blew up on this rank")
        return fun(x)

    expected = FloatingPointError if comm.rank == comm.size - 1 else hpcqn.RemoteRankError
    with pytest.raises(expected, match="solver blew up"):
        hpcqn.minimize(flaky, x0, comm=comm)


@pytest.mark.timeout(60)
def test_bad_gradient_shape_on_one_rank(comm):
    problem = make_problem("extended_rosenbrock", n=100)
    fun, x0 = problem.distributed(comm)

    def bad(x):
        f, g = fun(x)
        return f, (g[:-1] if comm.rank == 0 else g)

    expected = hpcqn.FunctionError if comm.rank == 0 else hpcqn.RemoteRankError
    with pytest.raises(expected, match="gradient of shape"):
        hpcqn.minimize(bad, x0, comm=comm)


@pytest.mark.timeout(60)
def test_non_finite_on_one_rank_at_x0(comm):
    problem = make_problem("extended_rosenbrock", n=100)
    fun, x0 = problem.distributed(comm)

    def bad(x):
        f, g = fun(x)
        return (np.nan if comm.rank == comm.size - 1 else f), g

    with pytest.raises(hpcqn.FunctionError, match="non-finite value at x0"):
        hpcqn.minimize(bad, x0, comm=comm)


@pytest.mark.timeout(60)
def test_options_that_differ_across_ranks(comm):
    if comm.size == 1:
        pytest.skip("needs two ranks to differ")
    problem = make_problem("extended_rosenbrock", n=100)
    fun, x0 = problem.distributed(comm)
    with pytest.raises(ValueError, match="different options"):
        hpcqn.minimize(fun, x0, comm=comm, options={"history": 5 + comm.rank})


@pytest.mark.timeout(60)
def test_stop_iteration_on_one_rank_stops_all(comm):
    problem = make_problem("extended_rosenbrock", n=100)
    fun, x0 = problem.distributed(comm)

    def callback(intermediate_result):
        if comm.rank == comm.size - 1 and intermediate_result.nit == 3:
            raise StopIteration

    res = hpcqn.minimize(fun, x0, comm=comm, callback=callback)
    assert res.status == 99 and res.nit == 3


def test_plain_mpi4py_communicator(comm):
    if comm.mpi_comm is None:
        pytest.skip("needs mpi4py")
    problem = make_problem("broyden_tridiagonal", n=100)
    fun, x0 = problem.distributed(comm.mpi_comm)
    res = hpcqn.minimize(fun, x0, comm=comm.mpi_comm, options=OPTIONS)
    assert res.success and res.nit == reference(problem).nit


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.timeout(120)
def test_resume_after_a_checkpoint_is_bitwise(comm, tmp_path_factory, dtype):
    from hpcqn.checkpoint import CheckpointError
    from hpcqn.signals import Preempted

    directory = comm.bcast_object(str(tmp_path_factory.mktemp("ckpt")) if comm.rank == 0
                                  else None)
    problem = make_problem("extended_rosenbrock", n=300, dtype=dtype)
    fun, x0 = problem.distributed(comm)
    options = {"gtol": 1e-5, "history": 5}
    straight = hpcqn.minimize(fun, x0, comm=comm, options=options)
    with pytest.raises(Preempted):
        hpcqn.minimize(fun, x0, comm=comm, options=options, checkpoint_dir=directory,
                       checkpoint_every=4, stop=StopAt(13))
    resumed = hpcqn.minimize(fun, x0, comm=comm, options=options, checkpoint_dir=directory)
    np.testing.assert_array_equal(resumed.x, straight.x)
    assert (resumed.nit, resumed.nfev, resumed.fun) == (straight.nit, straight.nfev,
                                                        straight.fun)
    with pytest.raises(CheckpointError, match="saved for"):
        hpcqn.minimize(fun, x0, comm=comm, options={**options, "history": 6},
                       checkpoint_dir=directory)
