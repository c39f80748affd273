"""hpcqn.Minimizer, the ask-and-tell form of hpcqn.minimize: the same iterates, its
checkpoints, and its misuse (serial; tests/test_ask_tell_mpi.py runs it on 1-3 ranks)."""

from __future__ import annotations

import copy
import re
import subprocess
import sys
import time

import numpy as np
import pytest
from procs import ENV, MPIEXEC, ROOT

import hpcqn
from hpcqn.experiments.problems import make_problem

OPTIONS = {"gtol": 1e-9, "history": 5}


def rosenbrock():
    problem = make_problem("extended_rosenbrock", n=200)
    return problem.distributed(hpcqn.serial_comm())


def drive(solver, fun, until=None):
    """Ask and tell until done (or until ``until`` points were told); the told points."""
    points = []
    while not solver.done and (until is None or len(points) < until):
        x = solver.ask()
        points.append(x.copy())
        solver.tell(*fun(x))
    return points


def test_ask_and_tell_gives_the_iterates_of_minimize():
    fun, x0 = rosenbrock()
    evaluated = []

    def recorded(x):
        evaluated.append(x.copy())
        return fun(x)

    res = hpcqn.minimize(recorded, x0, options=OPTIONS)
    solver = hpcqn.Minimizer(x0, options=OPTIONS)
    asked = drive(solver, fun)
    out = solver.result()
    assert res.success and out.success and res.nit > 30
    assert len(asked) == len(evaluated) == res.nfev
    for a, b in zip(asked, evaluated, strict=True):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(out.x, res.x)
    assert (out.nit, out.nfev, out.fun, out.nallreduce) == (res.nit, res.nfev, res.fun,
                                                            res.nallreduce)


@pytest.mark.parametrize("stop_after", [1, 7, 40])
def test_state_dict_in_the_middle_continues_the_same_run(stop_after):
    """A state taken after any number of evaluations (also inside a line search) is the
    last accepted iterate's; a fresh solver loaded with it repeats the remaining
    evaluations of the uninterrupted run exactly."""
    fun, x0 = rosenbrock()
    straight = hpcqn.Minimizer(x0, options=OPTIONS)
    everything = drive(straight, fun)
    first = hpcqn.Minimizer(x0, options=OPTIONS)
    drive(first, fun, until=stop_after)
    state = first.state_dict()
    nfev_at_state = state["nfev"]
    second = hpcqn.Minimizer(x0, options=OPTIONS)
    second.load_state_dict(state)
    rest = drive(second, fun)
    # The resumed solver evaluates x0 once (every rank's start check), then the run
    # continues from the state's iterate with the uninterrupted run's points.
    np.testing.assert_array_equal(rest[0], x0)
    for a, b in zip(rest[1:], everything[nfev_at_state:], strict=True):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(second.result().x, straight.result().x)
    assert second.result().nit == straight.result().nit
    assert second.result().nfev == straight.result().nfev


def test_checkpoint_dir_resumes_a_minimizer(tmp_path):
    fun, x0 = rosenbrock()
    straight = hpcqn.Minimizer(x0, options=OPTIONS)
    drive(straight, fun)
    interrupted = hpcqn.Minimizer(x0, options=OPTIONS, checkpoint_dir=tmp_path,
                                  checkpoint_every=5)
    drive(interrupted, fun, until=30)  # the process "dies" here
    resumed = hpcqn.Minimizer(x0, options=OPTIONS, checkpoint_dir=tmp_path)
    told = drive(resumed, fun)
    np.testing.assert_array_equal(resumed.result().x, straight.result().x)
    assert resumed.result().nit == straight.result().nit
    assert len(told) < straight.result().nfev - 10  # it did resume


def test_state_dict_is_a_snapshot():
    """A kept state dict does not change while the run goes on, and a solver loaded with
    it later repeats the uninterrupted run's continuation from it exactly."""
    fun, x0 = rosenbrock()
    straight = hpcqn.Minimizer(x0, options=OPTIONS)
    everything = drive(straight, fun)
    first = hpcqn.Minimizer(x0, options=OPTIONS)
    drive(first, fun, until=20)
    kept = first.state_dict()
    frozen = copy.deepcopy(kept)
    drive(first, fun, until=40)  # 40 more evaluations overwrite the solver's buffers
    for name in ("x", "g", "f", "nit", "nfev"):
        np.testing.assert_array_equal(kept[name], frozen[name])
    for name in ("vectors", "gram", "order"):
        np.testing.assert_array_equal(kept["history"][name], frozen["history"][name])
    resumed = hpcqn.Minimizer(x0, options=OPTIONS)
    resumed.load_state_dict(kept)
    rest = drive(resumed, fun)
    assert len(rest) - 1 == len(everything) - kept["nfev"]  # x0's start check, then the rest
    for a, b in zip(rest[1:], everything[kept["nfev"]:], strict=True):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(resumed.result().x, straight.result().x)
    assert (resumed.result().nit, resumed.result().nfev) == (straight.result().nit,
                                                             straight.result().nfev)


@pytest.mark.parametrize("misuse_at", [0, 3])
def test_tell_without_ask_ends_the_solver(misuse_at):
    """A tell that answers no ask (before the first, or a second for one ask) raises and
    ends the solver: under MPI the other ranks wait in that tell's reduction and raise
    with it (tests/test_ask_tell_mpi.py)."""
    fun, x0 = rosenbrock()
    solver = hpcqn.Minimizer(x0, options=OPTIONS)
    x = x0
    for _ in range(misuse_at):
        x = solver.ask()
        solver.tell(*fun(x))
    with pytest.raises(RuntimeError, match=r"needs a point from ask\(\) first"):
        solver.tell(*fun(x))
    assert solver.done
    with pytest.raises(RuntimeError, match="stopped on an error.*ask"):
        solver.ask()


def test_misuse_is_a_clear_error():
    fun, x0 = rosenbrock()
    solver = hpcqn.Minimizer(x0, options=OPTIONS)
    with pytest.raises(RuntimeError, match="finished"):
        solver.result()
    with pytest.raises(RuntimeError, match="first evaluation"):
        solver.state_dict()
    x = solver.ask()
    np.testing.assert_array_equal(solver.ask(), x)  # the same point until told
    with pytest.raises(ValueError, match="read-only"):
        x[0] = 1.0  # the solver's own buffer cannot be changed through ask()
    with pytest.raises(RuntimeError, match="before the first ask"):
        solver.load_state_dict({})
    drive(solver, fun)
    assert solver.result().success
    with pytest.raises(RuntimeError, match="finished"):
        solver.ask()


def test_a_bad_evaluation_raises_and_ends_the_solver():
    fun, x0 = rosenbrock()
    solver = hpcqn.Minimizer(x0, options=OPTIONS)
    x = solver.ask()
    with pytest.raises(hpcqn.FunctionError, match="shape"):
        solver.tell(1.0, np.zeros(3))
    assert solver.done
    for call in (solver.ask, solver.result):
        with pytest.raises(RuntimeError, match="stopped on an error.*shape"):
            call()
    solver = hpcqn.Minimizer(x0, options=OPTIONS)
    solver.ask()
    with pytest.raises(ZeroDivisionError):
        solver.fail(ZeroDivisionError("the simulation diverged"))
    assert solver.done
    del x


def test_a_complex_gradient_is_refused():
    """Its imaginary part would be lost in the solver's real buffer: refused, naming the
    dtype (as a complex x0 is)."""
    fun, x0 = rosenbrock()
    solver = hpcqn.Minimizer(x0, options=OPTIONS)
    x = solver.ask()
    f, g = fun(x)
    with pytest.raises(hpcqn.FunctionError, match="complex gradient.*complex128"):
        solver.tell(f, g + 1j)
    assert solver.done
    with pytest.raises(TypeError, match="x0 must be a float32 or float64 array.*complex"):
        hpcqn.Minimizer(x0 + 0j, options=OPTIONS)


MISUSE = """
import sys, numpy as np, hpcqn
comm = hpcqn.get_comm()
x0 = np.zeros(20 + comm.rank)
def fun(x):
    return float(((x - 1.0) ** 4).sum()), 4.0 * (x - 1.0) ** 3
solver = hpcqn.Minimizer(x0, comm=comm, options={"gtol": 1e-10})
try:
    if comm.rank != 1:
        solver.ask()
    solver.tell(*fun(x0))
except Exception as exc:  # agreed on every rank: each ends normally
    print(f"[rank {comm.rank}: {type(exc).__name__} from rank {getattr(exc, 'rank', '-')}]",
          exc, flush=True)
else:
    print(f"[rank {comm.rank}: no error]", flush=True)
"""


@pytest.mark.skipif(MPIEXEC is None, reason="mpiexec not on PATH")
@pytest.mark.timeout(120)
@pytest.mark.parametrize("ranks", [2, 3])
def test_tell_before_ask_on_one_rank_under_mpiexec(ranks):
    """Real mpiexec, a hard time limit (a hang fails): rank 1 tells before it asks; it
    raises its own error, every other rank RemoteRankError naming rank 1."""
    start = time.perf_counter()
    out = subprocess.run([MPIEXEC, "-n", str(ranks), sys.executable, "-c", MISUSE],
                         capture_output=True, text=True, env=ENV, timeout=60, cwd=ROOT)
    assert time.perf_counter() - start < 30, out.stdout + out.stderr
    assert out.returncode == 0, out.stdout + out.stderr
    # mpiexec may interleave the ranks' lines: each report is found by its brackets.
    reports = dict(re.findall(r"\[rank (\d): ([^]]*)\]", out.stdout))
    assert reports == {str(rank): "RuntimeError from rank -" if rank == 1
                       else "RemoteRankError from rank 1" for rank in range(ranks)}, out.stdout
    assert out.stdout.count("tell() needs a point from ask() first") == ranks
