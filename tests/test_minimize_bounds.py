"""hpcqn.minimize with bounds (serial), against SciPy's L-BFGS-B on problems whose
bounds are active at the solution, against closed-form or dense active-set solutions
where there are any, and against the KKT conditions checked directly."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import pytest
import scipy.linalg
import scipy.optimize
from stops import StopAt

import hpcqn
from hpcqn.checkpoint import CheckpointError
from hpcqn.experiments.problems import make_problem
from hpcqn.signals import Preempted

SERIAL = hpcqn.serial_comm()
# Both solvers stop on the projected-gradient test only (ftol 0 disables hpcqn's
# f test; L-BFGS-B's factr 0 stops only when f does not decrease): each case's gtol
# sits above the rounding floor of its problem, so both reach it.
LIMITS = {"ftol": 0.0, "maxiter": 20000, "maxfun": 40000}


def full(bound, n: int, missing: float) -> np.ndarray:
    """A bound as hpcqn takes it (None, a scalar or an array) as a float64 array."""
    value = missing if bound is None else bound
    return np.broadcast_to(np.asarray(value, dtype=np.float64), (n,)).copy()


@dataclass
class Case:
    """``fun`` the whole objective, ``lo``/``hi`` as passed to hpcqn.minimize,
    ``exact`` the independent minimiser where there is one."""

    fun: object
    x0: np.ndarray
    lo: object
    hi: object
    gtol: float
    xtol: float  # on max|x - x_ref|
    exact: np.ndarray | None = None

    @property
    def n(self) -> int:
        return self.x0.size

    @property
    def bounds(self):
        return (self.lo, self.hi)

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        return full(self.lo, self.n, -np.inf), full(self.hi, self.n, np.inf)


def dense_quadratic_case() -> Case:
    """0.5 x'Ax - b'x, A = M'M + 0.05 I (n = 200, condition number 79), in the box
    [-1, 1] (the unconstrained minimiser reaches |x| = 16). Reference: SciPy's BVLS on
    the equivalent least-squares problem |Rx - c| (A = R'R, R'c = b), refined by
    solving the free block exactly for its active set, then the KKT conditions of
    that point checked here."""
    rng = np.random.default_rng(17)
    n = 200
    m = rng.standard_normal((n, n)) / np.sqrt(n)
    a = m.T @ m + 0.05 * np.eye(n)
    b = rng.standard_normal(n)
    lo, hi = np.full(n, -1.0), np.full(n, 1.0)
    r = np.linalg.cholesky(a).T
    c = scipy.linalg.solve_triangular(r, b, trans="T")
    ls = scipy.optimize.lsq_linear(r, c, bounds=(lo, hi), method="bvls", tol=1e-14)
    at_lo, at_hi = ls.active_mask == -1, ls.active_mask == 1
    free = ~(at_lo | at_hi)
    exact = np.where(at_lo, lo, np.where(at_hi, hi, ls.x))
    exact[free] = np.linalg.solve(a[np.ix_(free, free)],
                                  b[free] - a[np.ix_(free, ~free)] @ exact[~free])
    g = a @ exact - b
    assert np.all((exact[free] > -1.0) & (exact[free] < 1.0))
    assert np.abs(g[free]).max() < 1e-12
    assert g[at_lo].min() > 1e-3 and g[at_hi].max() < -1e-3  # strictly complementary
    assert np.abs(exact - ls.x).max() < 1e-10 and 100 < at_lo.sum() + at_hi.sum() < 150

    def fun(x):
        ax = a @ x
        return float(0.5 * (x @ ax) - b @ x), ax - b

    return Case(fun, np.zeros(n), lo, hi, gtol=1e-7, xtol=1e-5, exact=exact)


def rosenbrock_case() -> Case:
    """Extended Rosenbrock (n = 1000) with its minimiser 1 cut: first half x_odd <= 0.8,
    second half x_odd >= 1.2 (x0 = -1.2 is outside, projected) and every other y there
    <= 1.3. Closed form: (0.8, 0.64) in the first half; (1.2, 1.3) and (1.2, 1.44)
    alternating in the second (df/dx > 0 at (1.2, 1.3), so x stays at its bound)."""
    n = 1000
    problem = make_problem("extended_rosenbrock", n=n)
    lo, hi = np.full(n, -np.inf), np.full(n, np.inf)
    hi[0:n // 2:2] = 0.8
    lo[n // 2::2] = 1.2
    hi[n // 2 + 1::4] = 1.3
    exact = np.empty(n)
    exact[0:n // 2:2], exact[1:n // 2:2] = 0.8, 0.64
    exact[n // 2::2], exact[n // 2 + 1::2] = 1.2, 1.44
    exact[n // 2 + 1::4] = 1.3
    return Case(problem.value_and_grad, problem.x0(), lo, hi, gtol=1e-6, xtol=1e-6,
                exact=exact)


def quadratic_case() -> Case:
    """The diagonal quadratic (n = 1000, minimiser 1/a in [1e-4, 1]) in the scalar box
    [1e-3, 1e-2]: a quarter of the variables at lo, half at hi; the minimiser is
    clip(1/a, lo, hi) (separable)."""
    problem = make_problem("quadratic", n=1000)
    exact = np.clip(problem.solution(), 1e-3, 1e-2)
    return Case(problem.value_and_grad, problem.x0(), 1e-3, 1e-2, gtol=1e-6, xtol=1e-7,
                exact=exact)


def logistic_box_case() -> Case:
    problem = make_problem("logistic", n=31)
    return Case(problem.value_and_grad, problem.x0(), -0.5, 0.5, gtol=1e-6, xtol=1e-5)


def logistic_lower_case() -> Case:
    """One-sided bounds: w >= -0.3 (hi None); 22 of the 31 weights end at it."""
    problem = make_problem("logistic", n=31)
    return Case(problem.value_and_grad, problem.x0(), -0.3, None, gtol=1e-6, xtol=1e-5)


def logistic_upper_case() -> Case:
    """One-sided bounds: w <= 0.3 (lo None); 8 of the 31 weights end at it."""
    problem = make_problem("logistic", n=31)
    return Case(problem.value_and_grad, problem.x0(), None, 0.3, gtol=1e-6, xtol=1e-5)


def broyden_fixed_case() -> Case:
    """Broyden tridiagonal (n = 1000, coupled): every 7th variable fixed (lo == hi =
    -0.5), the one 3 after it bounded below only (>= -0.6, x0 = -1 outside)."""
    n = 1000
    problem = make_problem("broyden_tridiagonal", n=n)
    lo, hi = np.full(n, -np.inf), np.full(n, np.inf)
    lo[::7] = hi[::7] = -0.5
    lo[3::7] = -0.6
    return Case(problem.value_and_grad, problem.x0(), lo, hi, gtol=1e-6, xtol=1e-6)


CASES = {
    "dense_quadratic": dense_quadratic_case,
    "rosenbrock": rosenbrock_case,
    "quadratic": quadratic_case,
    "logistic_box": logistic_box_case,
    "logistic_lower": logistic_lower_case,
    "logistic_upper": logistic_upper_case,
    "broyden_fixed": broyden_fixed_case,
}
# nfev(hpcqn) / nfev(L-BFGS-B), measured (history 10) with the subspace direction
# (docs/algorithms.md 1.11): dense_quadratic 1.00, rosenbrock 1.24, quadratic 0.97,
# logistic_box 1.00, logistic_lower 0.89, logistic_upper 1.02, broyden_fixed 1.00. The
# projected direction d = -P_F H P_F g it replaced measured 1.06, 2.51, 1.03, 1.70,
# 1.78, 1.29, 1.14 on the same cases (the history is built on all variables and does not
# restrict to the free ones as L-BFGS-B's subspace step does).
NFEV_RATIO = dict.fromkeys(CASES, 1.3)


@pytest.fixture(scope="module")
def cases():
    built = {}

    def get(name: str) -> Case:
        if name not in built:
            built[name] = CASES[name]()
        return built[name]

    return get


def scipy_reference(case: Case, **options):
    lo, hi = case.arrays()
    return scipy.optimize.minimize(
        case.fun, case.x0, jac=True, method="L-BFGS-B", bounds=scipy.optimize.Bounds(lo, hi),
        options={"maxcor": 10, "gtol": case.gtol, **LIMITS, **options})


def kkt(x, g, lo, hi) -> dict[str, float]:
    """The first-order conditions at x: max |projected gradient|; max |g| over the
    variables strictly inside; the least g over those at lo only (>= 0 wanted); the
    largest over those at hi only (<= 0 wanted). Fixed variables have no condition."""
    at_lo, at_hi = x == lo, x == hi
    inside = ~(at_lo | at_hi)
    return {
        "pg": float(np.abs(x - np.clip(x - g, lo, hi)).max()),
        "free": float(np.abs(g[inside]).max(initial=0.0)),
        "lo": float(g[at_lo & ~at_hi].min(initial=np.inf)),
        "hi": float(g[at_hi & ~at_lo].max(initial=-np.inf)),
        "nactive": int((at_lo | at_hi).sum()),
    }


def assert_kkt(conditions: dict[str, float], gtol: float) -> None:
    assert conditions["pg"] <= gtol
    assert conditions["free"] <= 10 * gtol  # near a bound |g| may exceed pg
    assert conditions["lo"] >= -gtol and conditions["hi"] <= gtol


class Recorder:
    """``fun`` that keeps a copy of every point it is evaluated at."""

    def __init__(self, fun):
        self.fun, self.points = fun, []

    def __call__(self, x):
        self.points.append(x.copy())
        return self.fun(x)


@pytest.mark.parametrize("name", list(CASES))
def test_same_solution_as_l_bfgs_b(cases, name, record_property):
    case = cases(name)
    lo, hi = case.arrays()
    recorder = Recorder(case.fun)
    ours = hpcqn.minimize(recorder, case.x0, comm=SERIAL, bounds=case.bounds,
                          options={"history": 10, "gtol": case.gtol, **LIMITS})
    ref = scipy_reference(case)
    ours_kkt, ref_kkt = kkt(ours.x, ours.jac, lo, hi), kkt(ref.x, ref.jac, lo, hi)
    ratio = ours.nfev / ref.nfev
    record_property("nfev", (ours.nfev, ref.nfev))
    print(f"{name:22s} n={case.n:5d} nactive {ours_kkt['nactive']:4d} | hpcqn nit "
          f"{ours.nit:4d} nfev {ours.nfev:4d} | L-BFGS-B nit {ref.nit:4d} nfev {ref.nfev:4d} "
          f"| ratio {ratio:.2f} | max|x - x_scipy| {np.abs(ours.x - ref.x).max():.1e}")
    assert ref.success and ours.success, ours.message
    assert_kkt(ref_kkt, case.gtol)  # the reference itself
    assert_kkt(ours_kkt, case.gtol)
    np.testing.assert_allclose(ours.x, ref.x, atol=case.xtol, rtol=0)
    if case.exact is not None:
        np.testing.assert_allclose(ours.x, case.exact, atol=case.xtol, rtol=0)
        np.testing.assert_allclose(ref.x, case.exact, atol=case.xtol, rtol=0)
    assert ours.fun == pytest.approx(ref.fun, rel=1e-9, abs=1e-12)
    assert ours.fun == case.fun(ours.x)[0] and np.array_equal(ours.jac, case.fun(ours.x)[1])
    assert ours.nactive == ours_kkt["nactive"] == ref_kkt["nactive"] > 0
    # Every evaluation is inside the box (the line search moves along the projected
    # path), the first at the projection of x0.
    for point in recorder.points:
        assert np.all((point >= lo) & (point <= hi))
    np.testing.assert_array_equal(recorder.points[0], np.clip(case.x0, lo, hi))
    assert ours.nfev == len(recorder.points)
    assert ratio <= NFEV_RATIO[name]


# -- bounds that bound nothing ------------------------------------------------------
N_FREE = 100
NOTHING = {
    "pair of infinities": (-np.inf, np.inf),
    "pair of None": (None, None),
    "arrays of infinities": (np.full(N_FREE, -np.inf), np.full(N_FREE, np.inf)),
    "None and an array": (None, np.full(N_FREE, np.inf)),
    "an array and None": (np.full(N_FREE, -np.inf), None),
    "numpy scalars": (np.float64(-np.inf), np.float32(np.inf)),
}


@pytest.mark.parametrize("name", ["extended_rosenbrock", "broyden_tridiagonal"])
@pytest.mark.parametrize("bounds", list(NOTHING.values()), ids=list(NOTHING))
def test_bounds_that_bound_nothing_are_the_unconstrained_run(name, bounds):
    problem = make_problem(name, n=N_FREE)
    free_points, bounded_points = Recorder(problem.value_and_grad), Recorder(
        problem.value_and_grad)
    options = {"gtol": 1e-8}
    free = hpcqn.minimize(free_points, problem.x0(), options=options)
    bounded = hpcqn.minimize(bounded_points, problem.x0(), options=options, bounds=bounds)
    assert free.success and bounded.success
    np.testing.assert_array_equal(bounded.x, free.x)
    np.testing.assert_array_equal(bounded.jac, free.jac)
    assert (bounded.nit, bounded.nfev, bounded.fun, bounded.status, bounded.nallreduce) == (
        free.nit, free.nfev, free.fun, free.status, free.nallreduce)
    assert len(bounded_points.points) == len(free_points.points)
    for a, b in zip(bounded_points.points, free_points.points, strict=True):
        np.testing.assert_array_equal(a, b)
    assert bounded.nactive == 0


# -- projection of x0 --------------------------------------------------------------
def test_x0_outside_the_bounds_is_projected():
    """x0 = (-1.2, 1, ...) with x >= -1 and y <= 0.5: the first evaluation is at the
    clipped point; a callback sees only feasible iterates; SciPy's L-BFGS-B agrees."""
    problem = make_problem("extended_rosenbrock", n=20)
    lo, hi = np.full(20, -1.0), np.full(20, 0.5)
    lo[1::2], hi[0::2] = -np.inf, np.inf
    recorder = Recorder(problem.value_and_grad)
    iterates = []
    res = hpcqn.minimize(recorder, problem.x0(), bounds=(lo, hi), options={"gtol": 1e-8},
                         callback=iterates.append)
    clipped = np.clip(problem.x0(), lo, hi)
    assert not np.array_equal(clipped, problem.x0())
    np.testing.assert_array_equal(recorder.points[0], clipped)
    for x in iterates:
        assert np.all((x >= lo) & (x <= hi))
    ref = scipy.optimize.minimize(problem.value_and_grad, problem.x0(), jac=True,
                                  method="L-BFGS-B", bounds=scipy.optimize.Bounds(lo, hi),
                                  options={"gtol": 1e-8})
    assert res.success and ref.success
    np.testing.assert_allclose(res.x, ref.x, atol=1e-6)
    assert res.nactive == int(((res.x == lo) | (res.x == hi)).sum()) > 0


def test_x0_outside_with_a_scalar_bound_is_projected_too():
    problem = make_problem("quadratic", n=50)
    recorder = Recorder(problem.value_and_grad)
    x0 = np.linspace(-1.0, 1.0, 50)
    res = hpcqn.minimize(recorder, x0, bounds=(0.0, 0.5), options={"gtol": 1e-9, "ftol": 0.0})
    np.testing.assert_array_equal(recorder.points[0], np.clip(x0, 0.0, 0.5))
    assert res.success
    np.testing.assert_allclose(res.x, np.clip(problem.solution(), 0.0, 0.5), atol=1e-5)


# -- bad bounds -------------------------------------------------------------------
def quadratic(x):
    return float(0.5 * x @ x), x.copy()


N_BAD = 6
ORDER = r"(?i)lo.*hi|low.*upp"  # the message names the two bounds
BAD = {
    "lo > hi (arrays)": ((np.zeros(N_BAD), np.r_[np.ones(N_BAD - 1), -1.0]), ORDER),
    "lo > hi (scalars)": ((1.0, 0.0), ORDER),
    "lo > hi (scalar and array)": ((0.5, np.linspace(0.0, 1.0, N_BAD)), ORDER),
    "NaN in lo": ((np.r_[np.zeros(N_BAD - 1), np.nan], None), r"(?i)nan"),
    "NaN in hi": ((None, np.r_[np.nan, np.ones(N_BAD - 1)]), r"(?i)nan"),
    "NaN scalar": ((np.nan, 1.0), r"(?i)nan"),
    "short lo": ((np.zeros(N_BAD - 1), None), r"(?i)shape"),
    "long hi": ((None, np.ones(N_BAD + 1)), r"(?i)shape"),
    "2-D lo": ((np.zeros((N_BAD, 1)), None), r"(?i)shape"),
    "lo = +inf": ((np.r_[np.zeros(N_BAD - 1), np.inf], None), r"(?i)inf.*feasible"),
    "hi = -inf": ((None, -np.inf), r"(?i)inf.*feasible"),
}


@pytest.mark.parametrize("bounds,message", list(BAD.values()), ids=list(BAD))
def test_bad_bounds_raise_value_error(bounds, message):
    calls = []

    def fun(x):
        calls.append(1)
        return quadratic(x)

    with pytest.raises(ValueError, match=message):
        hpcqn.minimize(fun, np.full(N_BAD, 0.25), bounds=bounds)
    with pytest.raises(ValueError, match=message):
        hpcqn.Minimizer(np.full(N_BAD, 0.25), bounds=bounds)
    assert calls == []  # refused before any evaluation


def test_equal_bounds_are_not_bad():
    """lo == hi fixes the variable (it is not lo > hi)."""
    lo = np.array([-1.0, 0.3, -np.inf, 2.0])
    hi = np.array([1.0, 0.3, np.inf, 2.0])
    res = hpcqn.minimize(lambda x: (float((x - 5) @ (x - 5)), 2 * (x - 5)), np.zeros(4),
                         bounds=(lo, hi))
    assert res.success
    np.testing.assert_allclose(res.x, [1.0, 0.3, 5.0, 2.0], atol=1e-6)
    assert res.x[1] == 0.3 and res.x[3] == 2.0 and res.nactive == 3


@pytest.mark.parametrize("extra", ["inner", "H0"])
def test_bounds_with_inner_or_h0_are_not_supported(extra):
    kwargs = {"inner": lambda u, v: float(u @ v)} if extra == "inner" else {
        "H0": lambda v: v.copy()}
    # (docs said "not supported"; the message says "bounds do not combine with inner
    # or H0 (...); pass one or the other")
    with pytest.raises(ValueError, match="bounds do not combine with inner or H0"):
        hpcqn.minimize(quadratic, np.ones(4), bounds=(0.0, 1.0), **kwargs)
    with pytest.raises(ValueError, match="bounds do not combine with inner or H0"):
        hpcqn.Minimizer(np.ones(4), bounds=(0.0, 1.0), **kwargs)


# -- hpcqn.scipy_lbfgs ------------------------------------------------------------
def scipy_forms(case: Case) -> dict[str, object]:
    lo, hi = case.arrays()
    pairs = [(None if np.isneginf(a) else float(a), None if np.isposinf(b) else float(b))
             for a, b in zip(lo, hi, strict=True)]
    return {"Bounds": scipy.optimize.Bounds(lo, hi), "pairs": pairs}


@pytest.mark.parametrize("form", ["Bounds", "pairs"])
@pytest.mark.parametrize("name", ["dense_quadratic", "rosenbrock", "logistic_lower",
                                  "broyden_fixed"])
def test_scipy_custom_method_with_bounds(cases, name, form):
    case = cases(name)
    bounds = scipy_forms(case)[form]
    options = {"maxcor": 10, "gtol": case.gtol, **LIMITS}
    ours = scipy.optimize.minimize(case.fun, case.x0, jac=True, method=hpcqn.scipy_lbfgs,
                                   bounds=bounds, options=options)
    ref = scipy.optimize.minimize(case.fun, case.x0, jac=True, method="L-BFGS-B",
                                  bounds=bounds, options=options)
    assert (ours.success, ours.status) == (ref.success, ref.status) == (True, 0)
    np.testing.assert_allclose(ours.x, ref.x, atol=case.xtol, rtol=0)
    lo, hi = case.arrays()
    assert np.all((ours.x >= lo) & (ours.x <= hi))
    assert ours.nactive == kkt(ref.x, ref.jac, lo, hi)["nactive"]


def test_scipy_custom_method_with_scalar_bounds_object(cases):
    case = cases("logistic_box")
    bounds = scipy.optimize.Bounds(-0.5, 0.5)
    options = {"gtol": case.gtol, "ftol": 0.0}
    ours = scipy.optimize.minimize(case.fun, case.x0, jac=True, method=hpcqn.scipy_lbfgs,
                                   bounds=bounds, options=options)
    ref = scipy.optimize.minimize(case.fun, case.x0, jac=True, method="L-BFGS-B",
                                  bounds=bounds, options=options)
    assert (ours.success, ours.status) == (ref.success, ref.status) == (True, 0)
    np.testing.assert_allclose(ours.x, ref.x, atol=case.xtol, rtol=0)


def test_scipy_custom_method_is_hpcqn_minimize_with_bounds(cases):
    """The custom method adds nothing to the iteration: same x bit for bit."""
    case = cases("rosenbrock")
    options = {"gtol": case.gtol, **LIMITS}
    direct = hpcqn.minimize(case.fun, case.x0, bounds=case.bounds, options=options)
    via = scipy.optimize.minimize(case.fun, case.x0, jac=True, method=hpcqn.scipy_lbfgs,
                                  bounds=scipy_forms(case)["pairs"], options=options)
    np.testing.assert_array_equal(via.x, direct.x)
    assert (via.nit, via.nfev) == (direct.nit, direct.nfev)


def test_scipy_custom_method_refuses_bad_bounds():
    x0 = np.array([-1.2, 1.0, -1.2, 1.0, 0.5])
    for bounds in ([(1.0, 0.0)] * 5, scipy.optimize.Bounds(np.ones(5), np.zeros(5)),
                   [(0.0, 1.0)] * 4):
        with pytest.raises(ValueError):
            scipy.optimize.minimize(scipy.optimize.rosen, x0, jac=scipy.optimize.rosen_der,
                                    method=hpcqn.scipy_lbfgs, bounds=bounds)


# -- checkpoints and ask-and-tell -------------------------------------------------
@pytest.mark.parametrize("interrupt", ["signal", "StopIteration"])
def test_resume_with_bounds_is_bitwise(cases, tmp_path, interrupt):
    """Interrupted at iteration 13 (a stop signal, or a callback raising StopIteration)
    with a checkpoint every 4: the resumed run equals the uninterrupted one."""
    case = cases("rosenbrock")
    options = {"gtol": case.gtol, "history": 5}
    straight = hpcqn.minimize(case.fun, case.x0, bounds=case.bounds, options=options)
    assert straight.nit > 20
    if interrupt == "signal":
        with pytest.raises(Preempted):
            hpcqn.minimize(case.fun, case.x0, bounds=case.bounds, options=options,
                           checkpoint_dir=tmp_path, checkpoint_every=4, stop=StopAt(13))
    else:
        def callback(intermediate_result):
            if intermediate_result.nit == 13:
                raise StopIteration

        stopped = hpcqn.minimize(case.fun, case.x0, bounds=case.bounds, options=options,
                                 checkpoint_dir=tmp_path, checkpoint_every=4,
                                 callback=callback)
        assert stopped.status == 99 and stopped.nit == 13
    lo, hi = case.arrays()
    with pytest.raises(CheckpointError, match="saved for"):  # other bounds: refused
        hpcqn.minimize(case.fun, case.x0, bounds=(lo, hi + 0.01), options=options,
                       checkpoint_dir=tmp_path)
    recorder = Recorder(case.fun)
    resumed = hpcqn.minimize(recorder, case.x0, bounds=case.bounds, options=options,
                             checkpoint_dir=tmp_path)
    np.testing.assert_array_equal(resumed.x, straight.x)
    assert (resumed.nit, resumed.nfev, resumed.fun, resumed.nactive) == (
        straight.nit, straight.nfev, straight.fun, straight.nactive)
    assert len(recorder.points) < straight.nfev - 10  # it did resume (from iteration 12)


@pytest.mark.parametrize("first,second", [
    (None, (-np.inf, np.inf)), ((None, None), None),
    ((-2.0, 2.0), (np.full(10, -2.0), 2.0)),
])
def test_equivalent_bounds_resume(tmp_path, first, second):
    """A resume compares what the bounds mean: None and -inf/+inf, a scalar and an array
    of it, are the same bounds (and a resumed run equals the uninterrupted one)."""
    def fun(x):
        return float(((x - 3.0) ** 2 * np.arange(1, 11)).sum()), 2 * (x - 3.0) * np.arange(1, 11)

    x0 = np.zeros(10)
    straight = hpcqn.minimize(fun, x0, bounds=first, options={"gtol": 1e-10})

    def callback(intermediate_result):
        if intermediate_result.nit == 2:
            raise StopIteration

    hpcqn.minimize(fun, x0, bounds=first, options={"gtol": 1e-10}, callback=callback,
                   checkpoint_dir=tmp_path, checkpoint_every=1)
    resumed = hpcqn.minimize(fun, x0, bounds=second, options={"gtol": 1e-10},
                             checkpoint_dir=tmp_path)
    np.testing.assert_array_equal(resumed.x, straight.x)
    assert (resumed.nit, resumed.nfev) == (straight.nit, straight.nfev)


@pytest.mark.parametrize("name", ["rosenbrock", "broyden_fixed"])
def test_ask_and_tell_gives_the_iterates_of_minimize(cases, name):
    case = cases(name)
    options = {"gtol": case.gtol, **LIMITS}
    recorder = Recorder(case.fun)
    res = hpcqn.minimize(recorder, case.x0, bounds=case.bounds, options=options)
    solver = hpcqn.Minimizer(case.x0, bounds=case.bounds, options=options)
    asked = []
    while not solver.done:
        x = solver.ask()
        asked.append(x.copy())
        solver.tell(*case.fun(x))
    out = solver.result()
    assert len(asked) == len(recorder.points) == res.nfev
    for a, b in zip(asked, recorder.points, strict=True):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(out.x, res.x)
    assert (out.nit, out.nfev, out.fun, out.status, out.nactive) == (
        res.nit, res.nfev, res.fun, res.status, res.nactive)


def test_ask_and_tell_state_dict_resumes_with_bounds(cases):
    """A state taken mid-run (after 17 evaluations), loaded into a new Minimizer with the
    same bounds: the rest of the run is the uninterrupted one."""
    case = cases("rosenbrock")
    options = {"gtol": case.gtol, "history": 5}
    straight = hpcqn.minimize(case.fun, case.x0, bounds=case.bounds, options=options)
    first = hpcqn.Minimizer(case.x0, bounds=case.bounds, options=options)
    for _ in range(17):
        first.tell(*case.fun(first.ask()))
    state = copy.deepcopy(first.state_dict())
    second = hpcqn.Minimizer(case.x0, bounds=case.bounds, options=options)
    second.load_state_dict(state)
    lo, hi = case.arrays()
    ntold = 0
    while not second.done:
        x = second.ask()
        assert np.all((x >= lo) & (x <= hi))
        second.tell(*case.fun(x))
        ntold += 1
    out = second.result()
    assert ntold < straight.nfev - 10  # it went on from the state, not from x0
    np.testing.assert_array_equal(out.x, straight.x)
    assert (out.nit, out.nfev, out.fun, out.nactive) == (straight.nit, straight.nfev,
                                                        straight.fun, straight.nactive)


def test_float32_with_float64_bounds():
    """Bounds are taken in x0's dtype: x ends exactly at float32(0.8)."""
    problem = make_problem("extended_rosenbrock", n=100, dtype=np.float32)
    hi = np.full(100, np.inf)
    hi[0::2] = 0.8
    res = hpcqn.minimize(problem.value_and_grad, problem.x0(), bounds=(None, hi),
                         options={"gtol": 1e-3})
    assert res.success and res.x.dtype == np.float32 and res.nactive == 50
    assert np.all(res.x[0::2] == np.float32(0.8))
    np.testing.assert_allclose(res.x[1::2], 0.64, atol=1e-3)


def test_box_kernels_match_their_definitions():
    """The Box's fused kernels against the definitions written out elementwise: L-BFGS-B's
    projected gradient (``max(x - hi, g)`` where ``g < 0``, ``min(x - lo, g)`` elsewhere;
    infinite sides, a fixed variable and a NaN included), the held set and the free
    gradient, ``P_F d``, the projected path's derivative and the count at a bound."""
    from hpcqn.optimizers.bounds import parse_bounds

    rng = np.random.default_rng(4)
    n = 400
    lo = rng.uniform(-1.0, 0.0, n)
    hi = lo + rng.uniform(0.0, 2.0, n)
    lo[:40], hi[40:80] = -np.inf, np.inf
    hi[80:90] = lo[80:90]  # fixed variables
    x = np.clip(rng.uniform(-1.5, 1.5, n), lo, hi)  # many at a bound
    x[100:120] = lo[100:120]
    x[120:140] = np.where(np.isfinite(hi[120:140]), hi[120:140], 0.0)
    g, d = rng.standard_normal(n), rng.standard_normal(n)
    box = parse_bounds((lo, hi), x)

    pg = np.where(g < 0, np.maximum(x - hi, g), np.minimum(x - lo, g))
    assert box.projected_gradient_inf(x, g) == np.abs(pg).max()
    with_nan = g.copy()
    with_nan[7] = np.nan
    assert np.isnan(box.projected_gradient_inf(x, with_nan))

    box.classify(x, g)
    held = ((x <= lo) & (g > 0)) | ((x >= hi) & (g < 0))
    np.testing.assert_array_equal(box.free, ~held)
    np.testing.assert_array_equal(box.free_gradient(g, np.empty(n)), np.where(held, 0.0, g))
    leaving = ((x <= lo) & (d < 0)) | ((x >= hi) & (d > 0))
    np.testing.assert_array_equal(box.restrict(d.copy()), np.where(held | leaving, 0.0, d))
    assert box.nactive() == np.count_nonzero((x <= lo) | (x >= hi))

    trial = x + 0.3 * d
    box.project(trial)
    np.testing.assert_array_equal(trial, np.clip(x + 0.3 * d, lo, hi))
    inside = (trial > lo) & (trial < hi)
    np.testing.assert_array_equal(box.path_direction(trial, d, np.empty(n)),
                                  np.where(inside, d, 0.0))
