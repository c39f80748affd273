"""hpcqn.minimize against SciPy's L-BFGS-B, options, results and bad input (serial)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.optimize

import hpcqn
from hpcqn.experiments.problems import make_problem

# (problem, n, gtol, tolerance on the minimiser): standard unconstrained problems.
STANDARD = [
    ("extended_rosenbrock", 1000, 1e-9, 1e-6),
    ("extended_powell", 100, 1e-9, 2e-2),  # singular Hessian at 0: x converges slowly
    ("broyden_tridiagonal", 1000, 1e-7, 1e-6),  # f* = 0.71: 1e-8 is below its roundoff
    ("quadratic", 1000, 1e-9, 1e-6),  # condition number 1e4
    ("logistic", 31, 1e-9, 1e-6),  # scikit-learn's breast-cancer data
    ("extended_wood", 100, 1e-9, 1e-6),
]
LIMITS = {"ftol": 0.0, "maxiter": 20000, "maxfun": 40000}


@pytest.mark.parametrize("name,n,gtol,xtol", STANDARD)
def test_same_minimiser_as_scipy(name, n, gtol, xtol, record_property):
    problem = make_problem(name, n=n)
    fun, x0 = problem.distributed(hpcqn.serial_comm())
    ours = hpcqn.minimize(fun, x0, comm=hpcqn.serial_comm(),
                          options={"history": 10, "gtol": gtol, **LIMITS})
    ref = scipy.optimize.minimize(
        problem.value_and_grad, problem.x0(), jac=True, method="L-BFGS-B",
        options={"maxcor": 10, "gtol": gtol, **LIMITS},
    )
    record_property("nit", (ours.nit, ref.nit))
    print(f"{name:22s} n={n:5d} hpcqn nit {ours.nit:5d} nfev {ours.nfev:5d} | "
          f"SciPy L-BFGS-B nit {ref.nit:5d} nfev {ref.nfev:5d}")
    assert ours.success, ours.message
    scale = max(1.0, float(np.abs(ref.x).max()))
    np.testing.assert_allclose(ours.x, ref.x, atol=xtol * scale, rtol=0)
    assert ours.fun == pytest.approx(ref.fun, rel=1e-8, abs=1e-10)
    if problem.solution() is not None:
        np.testing.assert_allclose(ours.x, problem.solution(), atol=xtol * scale, rtol=0)
    assert ours.nit <= 1.5 * ref.nit + 10  # same algorithm: comparable iteration counts


def test_result_fields_and_reduction_count():
    problem = make_problem("extended_rosenbrock", n=200)
    fun, x0 = problem.distributed()
    res = hpcqn.minimize(fun, x0, options={"gather_x": True})
    for field in ("x", "fun", "jac", "nit", "nfev", "njev", "success", "status", "message"):
        assert field in res
    assert res.success and res.status == 0
    f, g = fun(res.x)
    assert res.fun == f and np.array_equal(res.jac, g)
    # One reduction at x0, then per iteration one per line-search trial plus one.
    assert res.nallreduce == 2 + (res.nfev - 1) + res.nit
    np.testing.assert_array_equal(res.x_global, res.x)


def test_float32():
    problem = make_problem("extended_rosenbrock", n=100, dtype=np.float32)
    fun, x0 = problem.distributed()
    res = hpcqn.minimize(fun, x0, options={"gtol": 1e-3})
    assert res.x.dtype == np.float32 and res.success
    np.testing.assert_allclose(res.x, 1.0, atol=2e-3)


def test_armijo_linesearch_converges():
    problem = make_problem("extended_rosenbrock", n=100)
    fun, x0 = problem.distributed()
    res = hpcqn.minimize(fun, x0, options={"linesearch": "armijo", "gtol": 1e-6})
    assert res.success
    np.testing.assert_allclose(res.x, 1.0, atol=1e-5)


def test_scipy_custom_method():
    x0 = np.array([-1.2, 1.0, -1.2, 1.0, 0.5])
    ref = scipy.optimize.minimize(scipy.optimize.rosen, x0, jac=scipy.optimize.rosen_der,
                                  method="L-BFGS-B", options={"gtol": 1e-8})
    for kwargs in ({"jac": True, "fun": lambda x: (scipy.optimize.rosen(x),
                                                    scipy.optimize.rosen_der(x))},
                   {"jac": scipy.optimize.rosen_der, "fun": scipy.optimize.rosen}):
        fun = kwargs.pop("fun")
        res = scipy.optimize.minimize(fun, x0, method=hpcqn.scipy_lbfgs, tol=1e-8, **kwargs)
        assert res.success
        np.testing.assert_allclose(res.x, ref.x, atol=1e-6)
    boxed = [(0, 0.5)] * 5  # cuts the minimiser (1, ..., 1): every variable at 0.5 or inside
    ref = scipy.optimize.minimize(scipy.optimize.rosen, x0, jac=scipy.optimize.rosen_der,
                                  method="L-BFGS-B", bounds=boxed,
                                  options={"gtol": 1e-8})
    res = scipy.optimize.minimize(scipy.optimize.rosen, x0, jac=scipy.optimize.rosen_der,
                                  method=hpcqn.scipy_lbfgs, bounds=boxed,
                                  options={"gtol": 1e-8})
    assert res.success and res.nactive >= 1
    np.testing.assert_allclose(res.x, ref.x, atol=1e-6)


def test_callback_gets_intermediate_result_and_stop_iteration():
    problem = make_problem("extended_rosenbrock", n=100)
    fun, x0 = problem.distributed()
    seen = []

    def callback(intermediate_result):
        seen.append((intermediate_result.nit, intermediate_result.fun))
        assert intermediate_result.fun == fun(intermediate_result.x)[0]
        if intermediate_result.nit == 5:
            raise StopIteration

    res = hpcqn.minimize(fun, x0, callback=callback)
    assert [nit for nit, _ in seen] == [1, 2, 3, 4, 5]
    assert res.status == 99 and not res.success and res.nit == 5
    assert "StopIteration" in res.message and res.fun == seen[-1][1]


def test_old_style_callback_gets_x():
    problem = make_problem("extended_rosenbrock", n=10)
    seen = []
    res = hpcqn.minimize(problem.value_and_grad, problem.x0(), callback=seen.append)
    assert len(seen) == res.nit and isinstance(seen[0], np.ndarray)
    np.testing.assert_array_equal(seen[-1], res.x)
    assert seen[0] is not seen[1]  # copies, not the solver's buffer


def test_gradient_returned_in_the_same_buffer_every_call():
    """A simulation code that reuses one gradient array: same iterates as fresh arrays."""
    problem = make_problem("extended_rosenbrock", n=100)
    shared = np.empty(100)

    def reusing(x):
        f, g = problem.value_and_grad(x)
        shared[...] = g
        return f, shared

    fresh = hpcqn.minimize(problem.value_and_grad, problem.x0())
    reused = hpcqn.minimize(reusing, problem.x0())
    assert reused.nit == fresh.nit
    np.testing.assert_array_equal(reused.x, fresh.x)


def test_non_descent_direction_resets_history(monkeypatch):
    """A direction that is not a descent direction (injected once, as rounding could
    produce it) drops the history and takes the scaled gradient step instead."""
    from hpcqn.curvature.gram_history import GramHistory

    real = GramHistory.direction_coefficients
    calls = {"n": 0}

    def flipped_once(self):
        calls["n"] += 1
        delta = real(self)
        return -delta if calls["n"] == 5 else delta

    monkeypatch.setattr(GramHistory, "direction_coefficients", flipped_once)
    problem = make_problem("extended_rosenbrock", n=100)
    res = hpcqn.minimize(problem.value_and_grad, problem.x0(), options={"gtol": 1e-6})
    assert res.success and res.nreset == 1
    np.testing.assert_allclose(res.x, 1.0, atol=1e-5)


def test_limits():
    problem = make_problem("extended_rosenbrock", n=100)
    fun, x0 = problem.distributed()
    res = hpcqn.minimize(fun, x0, options={"maxiter": 3})
    assert (res.status, res.nit) == (1, 3) and "ITERATIONS" in res.message
    res = hpcqn.minimize(fun, x0, options={"maxfun": 4})
    assert res.status == 1 and res.nfev <= 4 and "EVALUATIONS" in res.message


@pytest.mark.parametrize(
    "tolerance,value",
    [("gatol", 1e-2), ("grtol", 1e-3), ("gttol", 1e-3)],
)
def test_tao_gradient_tolerances(tolerance, value):
    problem = make_problem("logistic", n=31)  # f* > 0, so grtol is meaningful
    fun, x0 = problem.distributed()
    g0 = np.linalg.norm(fun(x0)[1])
    res = hpcqn.minimize(fun, x0, options={tolerance: value, "gtol": 0.0, "ftol": 0.0})
    gnorm = np.linalg.norm(res.jac)
    bound = {"gatol": value, "grtol": value * abs(res.fun), "gttol": value * g0}[tolerance]
    assert res.success and gnorm <= bound
    assert tolerance[1:] in res.message or tolerance in res.message


def test_wrong_gradient_stops_with_line_search_status():
    """A gradient of the wrong sign: no step lowers f, the history is dropped, the
    retry fails too, and the run stops with status 2 at the starting point."""
    problem = make_problem("extended_rosenbrock", n=10)
    x0 = problem.x0()
    res = hpcqn.minimize(lambda x: (problem.value_and_grad(x)[0], -problem.value_and_grad(x)[1]),
                         x0)
    # SciPy 1.17 spells it "ABNORMAL: ..."; ours names the line search.
    assert res.status == 2 and not res.success and "ABNORMAL: LINE SEARCH FAILED" in res.message
    assert res.nreset == 0  # no history yet: a retry would repeat the same search
    np.testing.assert_array_equal(res.x, x0)


def test_line_search_failure_drops_history_then_stops():
    """The gradient turns wrong after 12 evaluations: the first failed search drops the
    history and retries with steepest descent, the second stops the run at the last
    accepted point, whose f is the lowest seen."""
    problem = make_problem("extended_rosenbrock", n=10)
    accepted = []
    calls = 0

    def fun(x):
        nonlocal calls
        calls += 1
        f, g = problem.value_and_grad(x)
        return f, (g if calls <= 12 else -g)

    def callback(intermediate_result):
        accepted.append((intermediate_result.x, intermediate_result.fun))

    res = hpcqn.minimize(fun, problem.x0(), callback=callback)
    assert res.status == 2 and res.nreset == 1
    np.testing.assert_array_equal(res.x, accepted[-1][0])
    assert res.fun == accepted[-1][1] == problem.value_and_grad(res.x)[0]


def test_non_finite_region_is_backed_out_of():
    """f is +inf beyond |x| > 3: the line search shrinks the step instead of failing."""
    def fun(x):
        if np.abs(x).max() > 3.0:
            return math.inf, np.full_like(x, math.inf)
        return float((x - 2.5) @ (x - 2.5)), 2 * (x - 2.5)

    res = hpcqn.minimize(fun, np.zeros(4), options={"gtol": 1e-8})
    assert res.success
    np.testing.assert_allclose(res.x, 2.5, atol=1e-7)


# -- bad input --------------------------------------------------------------------
def rosen(x):
    return scipy.optimize.rosen(x), scipy.optimize.rosen_der(x)


def test_bad_x0_dtype():
    with pytest.raises(TypeError, match="x0 must be a float32 or float64 array.*int64"):
        hpcqn.minimize(rosen, np.array([1, 2, 3]))
    with pytest.raises(TypeError, match="x0"):
        hpcqn.minimize(rosen, [1.0, 2.0])
    with pytest.raises(ValueError, match="one-dimensional"):
        hpcqn.minimize(rosen, np.zeros((2, 2)))


def test_unknown_and_bad_options():
    with pytest.raises(ValueError, match="unknown option.*'maxcor'"):
        hpcqn.minimize(rosen, np.zeros(3), options={"maxcor": 5})
    with pytest.raises(ValueError, match="history"):
        hpcqn.minimize(rosen, np.zeros(3), options={"history": 0})
    with pytest.raises(ValueError, match="gtol"):
        hpcqn.minimize(rosen, np.zeros(3), options={"gtol": -1.0})
    with pytest.raises(ValueError, match="linesearch"):
        hpcqn.minimize(rosen, np.zeros(3), options={"linesearch": "exact"})
    with pytest.raises(ValueError, match="unknown method"):
        hpcqn.minimize(rosen, np.zeros(3), method="bfgs")


def test_gradient_of_wrong_shape():
    message = r"gradient of shape \(2,\) for x of shape \(3,\)"
    with pytest.raises(hpcqn.FunctionError, match=message):
        hpcqn.minimize(lambda x: (0.0, np.zeros(2)), np.zeros(3))


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_non_finite_at_x0(bad):
    with pytest.raises(hpcqn.FunctionError, match="non-finite value at x0"):
        hpcqn.minimize(lambda x: (bad, x.copy()), np.ones(3))
    with pytest.raises(hpcqn.FunctionError, match="non-finite value at x0"):
        hpcqn.minimize(lambda x: (1.0, np.full(3, bad)), np.ones(3))


def test_exception_in_fun_propagates():
    def fun(x):
        raise RuntimeError("simulation diverged")

    with pytest.raises(RuntimeError, match="simulation diverged"):
        hpcqn.minimize(fun, np.ones(3))


def test_complex_gradient_or_f_is_refused():
    """Copied into the solver's real buffers, a complex gradient would lose its imaginary
    part: refused with its dtype named, as a complex x0 is."""
    with pytest.raises(hpcqn.FunctionError, match="complex gradient.*complex128"):
        hpcqn.minimize(lambda x: (float(x @ x), (2 * x).astype(np.complex128)), np.ones(3))
    with pytest.raises(hpcqn.FunctionError, match="real number as f.*complex"):
        hpcqn.minimize(lambda x: (np.complex128(x @ x), 2 * x), np.ones(3))
    with pytest.raises(TypeError, match="x0 must be a float32 or float64 array.*complex128"):
        hpcqn.minimize(rosen, np.ones(3, dtype=np.complex128))


@pytest.mark.parametrize("bounds", [None, (-5.0, 5.0)])
def test_non_finite_values_under_a_raising_numpy_error_mode(bounds):
    """The caller's np.seterr(invalid="raise", over="raise") (SciPy's differential
    evolution tests set it) does not turn the line search's backing out of f = +inf with
    a gradient of infinities of both signs (whose products are NaN) into a
    FloatingPointError: the same run as in the default mode."""
    scale = np.array([1.0, 10.0, 100.0, 1000.0])
    visits = []

    def fun(x):
        if np.abs(x).max() > 3.0:
            visits.append(x.copy())
            return math.inf, np.where(np.arange(x.size) % 2, -math.inf, math.inf)
        return float(scale @ (x - 2.5) ** 2), 2 * scale * (x - 2.5)

    quiet = hpcqn.minimize(fun, np.zeros(4), options={"gtol": 1e-8}, bounds=bounds)
    assert visits  # the line search did step into the region
    with np.errstate(invalid="raise", over="raise"):
        raising = hpcqn.minimize(fun, np.zeros(4), options={"gtol": 1e-8}, bounds=bounds)
    assert raising.success and raising.nfev == quiet.nfev
    np.testing.assert_array_equal(raising.x, quiet.x)
    np.testing.assert_allclose(raising.x, 2.5, atol=1e-5)
