"""``hpcqn.scipy_lbfgs`` as a drop-in for ``scipy.optimize.minimize(method="L-BFGS-B")``:
the conventions SciPy's own L-BFGS-B tests (scipy/optimize/tests/test_optimize.py) rely
on, each checked against SciPy's L-BFGS-B on the same problem."""

from __future__ import annotations

import math
import re
import warnings

import numpy as np
import pytest
import scipy.optimize as so

import hpcqn

X0 = np.array([-1.2, 1.0, -1.2, 1.0, 0.5])
MESSAGES = {"CONVERGENCE: NORM OF PROJECTED GRADIENT <= PGTOL",
            "CONVERGENCE: RELATIVE REDUCTION OF F <= FACTR*EPSMCH"}


def ours(fun, x0=X0, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # hpcqn itself warns of nothing here
        return so.minimize(fun, x0, method=hpcqn.scipy_lbfgs, **kwargs)


def scipys(fun, x0=X0, **kwargs):
    return so.minimize(fun, x0, method="L-BFGS-B", **kwargs)


@pytest.mark.parametrize("jac", [None, False, "2-point", "3-point", "cs"])
def test_gradient_by_finite_differences_as_scipy(jac):
    """SciPy's default (jac=None) and its finite-difference names."""
    res = ours(so.rosen, jac=jac, options={"gtol": 1e-6})
    ref = scipys(so.rosen, jac=so.rosen_der, options={"gtol": 1e-6})
    assert res.success and res.message in MESSAGES
    np.testing.assert_allclose(res.x, ref.x, atol=1e-4)
    # The finite-difference gradient at the end is SciPy's own approx_fprime's.
    np.testing.assert_allclose(res.jac, so.approx_fprime(res.x, so.rosen, 1e-8), atol=1e-5)


def test_finite_difference_step_options():
    forward = ours(so.rosen, options={"eps": 1e-7, "gtol": 1e-6})
    relative = ours(so.rosen, options={"finite_diff_rel_step": 1e-7, "gtol": 1e-6})
    for res in (forward, relative):
        np.testing.assert_allclose(res.x, np.ones(5), atol=1e-3)


@pytest.mark.parametrize("options", [
    {"maxcor": 5}, {"disp": True}, {"disp": None}, {"iprint": -1}, {"workers": map},
    {"return_all": False}, {"maxiter": np.inf}, {"maxfun": np.inf}, {"maxiter": 1000.5},
])
def test_l_bfgs_b_option_names_are_taken(options):
    res = ours(so.rosen, jac=so.rosen_der, options=options)
    assert res.success
    np.testing.assert_allclose(res.x, np.ones(5), atol=1e-4)


def test_maxcor_is_the_history_length():
    a = ours(so.rosen, jac=so.rosen_der, options={"maxcor": 3})
    b = ours(so.rosen, jac=so.rosen_der, options={"history": 3})
    assert a.nit == b.nit and np.array_equal(a.x, b.x)
    assert a.hess_inv.sk.shape[0] <= 3


def test_iteration_limit_as_scipy():
    res = ours(so.rosen, jac=so.rosen_der, options={"maxiter": 3})
    ref = scipys(so.rosen, jac=so.rosen_der, options={"maxiter": 3})
    assert (res.nit, res.status, res.message) == (ref.nit, ref.status, ref.message) == (
        3, 1, "STOP: TOTAL NO. OF ITERATIONS REACHED LIMIT")
    # A fraction rounds up, as L-BFGS-B counts (it stops once nit >= maxiter).
    assert ours(so.rosen, jac=so.rosen_der, options={"maxiter": 2.5}).nit == 3


def test_size_one_array_f_and_list_jac():
    res = ours(lambda x: (np.array([so.rosen(x)]), list(so.rosen_der(x))), jac=True)
    ref = scipys(so.rosen, jac=so.rosen_der)
    assert res.success
    np.testing.assert_allclose(res.x, ref.x, atol=1e-5)
    assert isinstance(res.fun, float)


def test_nan_at_x0_is_a_failed_result_not_an_error():
    res = ours(lambda x: (math.nan, np.ones_like(x)), jac=True)
    assert not res.success and res.status == 2 and res.nit == 0
    assert res.message.startswith("ABNORMAL") and "non-finite" in res.message


def test_fun_may_overwrite_its_argument():
    def clobbering(x):
        f, g = so.rosen(x), so.rosen_der(x)
        x[:] = 1e6  # SciPy passes a copy: this must not move the iterate
        return f, g

    res = ours(clobbering, jac=True)
    ref = ours(lambda x: (so.rosen(x), so.rosen_der(x)), jac=True)
    np.testing.assert_array_equal(res.x, ref.x)


def test_hess_inv_is_an_lbfgs_operator_that_fits_the_curvature():
    """On a quadratic with Hessian A, the operator satisfies the newest secant equation
    exactly and approximates A^-1 once the history spans the space."""
    a = np.diag([1.0, 3.0, 10.0, 30.0])

    def quadratic(x):
        return 0.5 * x @ a @ x, a @ x

    res = ours(quadratic, x0=np.ones(4), jac=True, options={"gtol": 1e-12, "ftol": 0})
    assert isinstance(res.hess_inv, so.LbfgsInvHessProduct)
    assert res.hess_inv.shape == (4, 4)
    s, y = res.hess_inv.sk[-1], res.hess_inv.yk[-1]
    np.testing.assert_allclose(res.hess_inv.dot(y), s, rtol=1e-10)
    ref = scipys(quadratic, x0=np.ones(4), jac=True, options={"gtol": 1e-12, "ftol": 0})
    inverse = np.linalg.inv(a)
    ours_error = np.abs(res.hess_inv.todense() - inverse).max()
    scipy_error = np.abs(ref.hess_inv.todense() - inverse).max()
    assert ours_error <= max(10 * scipy_error, 0.05)


def test_tol_sets_ftol_and_gtol_as_for_l_bfgs_b():
    by_tol = ours(so.rosen, jac=so.rosen_der, tol=1e-3)
    by_options = ours(so.rosen, jac=so.rosen_der, options={"ftol": 1e-3, "gtol": 1e-3})
    assert by_tol.nit == by_options.nit and np.array_equal(by_tol.x, by_options.x)
    default = ours(so.rosen, jac=so.rosen_der, options={"gtol": 1e-3})
    assert by_tol.nit < default.nit  # ftol 1e-3 stops earlier than the default 2.2e-9


def test_float32_x0_comes_back_float64():
    res = ours(so.rosen, x0=X0.astype(np.float32), jac=so.rosen_der)
    ref = scipys(so.rosen, x0=X0.astype(np.float32), jac=so.rosen_der)
    assert res.x.dtype == ref.x.dtype == np.float64
    assert res.jac.dtype == np.float64


@pytest.mark.parametrize("bounds", [None, so.Bounds(-np.inf, np.inf), [(None, None)] * 5,
                                    [(-np.inf, np.inf)] * 5])
def test_bounds_that_bound_nothing_are_accepted(bounds):
    res = ours(so.rosen, jac=so.rosen_der, bounds=bounds)
    free = ours(so.rosen, jac=so.rosen_der)
    np.testing.assert_array_equal(res.x, free.x)


@pytest.mark.parametrize("bounds", [[(0, 1)] * 5, so.Bounds(0.0, np.inf),
                                    [(None, 0.5), (0.0, None), (None, None), (1.5, 2.0),
                                     (0.3, 0.3)]])
@pytest.mark.parametrize("jac", [so.rosen_der, None])
def test_bounds_as_scipy_takes_them(bounds, jac):
    """Bounds in SciPy's two spellings (pairs with None, ``Bounds``), fixed variables
    (lo == hi) and finite differences at a bound: L-BFGS-B's minimiser. (From X0 the
    box problems have several local minimisers, which the two methods reach apart.)"""
    x0 = np.array([1.3, 0.7, 0.8, 1.9, 1.2])
    # Finite differences (jac None) carry errors near 1e-8: SciPy's default tolerances.
    options = {"gtol": 1e-9, "ftol": 0} if jac is not None else {}
    res = ours(so.rosen, x0=x0, jac=jac, bounds=bounds, options=options)
    ref = scipys(so.rosen, x0=x0, jac=jac, bounds=bounds, options=options)
    assert res.success and ref.success
    atol = 1e-5 if jac is not None else 1e-3
    np.testing.assert_allclose(res.x, ref.x, atol=atol)
    assert res.fun == pytest.approx(ref.fun, rel=1e-7, abs=atol**2)


@pytest.mark.parametrize("bounds", [[(0, 1)] * 4, so.Bounds([0, 0], [1, 1]),
                                    [(1, 0)] * 5, so.Bounds(np.zeros(5), [1, 1, -1, 1, 1])])
def test_bad_bounds_are_refused_as_scipy_refuses_them(bounds):
    """The same error and message as minimize gives for L-BFGS-B."""
    with pytest.raises(ValueError) as expected:
        scipys(so.rosen, jac=so.rosen_der, bounds=bounds)
    with pytest.raises(ValueError, match=re.escape(str(expected.value))):
        ours(so.rosen, jac=so.rosen_der, bounds=bounds)


def test_stop_messages_are_spelled_as_scipy_1_17():
    res = ours(so.rosen, jac=so.rosen_der)
    assert res.message in MESSAGES
    ref = scipys(so.rosen, jac=so.rosen_der)
    assert ref.message in MESSAGES  # the set is SciPy's own spelling


class Counted:
    """``fun`` that records every point it is called at."""

    def __init__(self, fun=so.rosen):
        self.fun, self.points = fun, []

    def __call__(self, x):
        self.points.append(np.array(x, copy=True))
        return self.fun(x)


@pytest.mark.parametrize("jac, calls_per_gradient", [(None, 6), ("2-point", 6),
                                                      ("3-point", 11)])
def test_nfev_counts_calls_of_fun_as_l_bfgs_b(jac, calls_per_gradient):
    """With finite differences nfev is the number of calls of fun (1 + n per forward
    gradient, 1 + 2n central, here n = 5), njev the number of gradients, as L-BFGS-B
    reports them; no point is evaluated twice in a row. (minimize hands a custom method
    jac=None for "2-point" and "3-point": the central differences are reached by calling
    scipy_lbfgs itself.)"""
    fun = Counted()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        res = hpcqn.scipy_lbfgs(fun, X0, jac=jac)
    ref_fun = Counted()
    ref = scipys(ref_fun, jac=jac)
    assert ref.nfev == len(ref_fun.points) == calls_per_gradient * ref.njev  # SciPy's rule
    assert res.nfev == len(fun.points) == calls_per_gradient * res.njev
    assert not any(np.array_equal(a, b) for a, b in zip(fun.points[:-1], fun.points[1:],
                                                        strict=True))
    assert res.success and ref.success
    np.testing.assert_allclose(res.x, ref.x, atol=1e-4)
    through_minimize = Counted()
    res = ours(through_minimize, jac=jac)
    assert res.nfev == len(through_minimize.points) == 6 * res.njev


def test_nfev_counts_calls_with_an_analytic_gradient():
    fun = Counted()
    res = ours(fun, jac=so.rosen_der)
    assert res.nfev == res.njev == len(fun.points)


@pytest.mark.parametrize("jac", [None, "3-point"])
def test_finite_differences_stay_in_the_box(jac):
    """Variables fixed by lo == hi are not differenced (their jac entry is NaN, as
    minimize reports it for L-BFGS-B), the others are differenced inside the box (a
    narrow one too); fun is never called outside it. L-BFGS-B's minimiser. (Called
    directly: minimize would hand it jac=None for "3-point".)"""
    lo = np.array([0.3, 2.0, 1.0, -1.0, 1.2])
    hi = np.array([0.3, 2.0 + 1e-9, 1.5, -1.0, 1.7])
    x0 = np.array([0.3, 2.0, 1.5, -1.0, 1.7])  # at upper bounds
    fun = Counted()
    res = hpcqn.scipy_lbfgs(fun, x0, jac=jac, bounds=so.Bounds(lo, hi))
    points = np.array(fun.points)
    assert np.all(points >= lo) and np.all(points <= hi)
    ref = scipys(so.rosen, x0=x0, jac=jac, bounds=so.Bounds(lo, hi))
    assert res.success and ref.success
    np.testing.assert_allclose(res.x, ref.x, atol=1e-4)
    fixed = lo == hi
    assert np.isnan(res.jac[fixed]).all() and np.isnan(ref.jac[fixed]).all()
    np.testing.assert_allclose(res.jac[~fixed], ref.jac[~fixed], rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("jac", [None, so.rosen_der])
def test_every_variable_fixed_gives_minimizes_result(jac):
    bounds = [(1.0, 1.0), (2.0, 2.0), (0.5, 0.5)]
    fun = Counted()
    res = ours(fun, x0=np.zeros(3), jac=jac, bounds=bounds)
    ref = scipys(so.rosen, x0=np.zeros(3), jac=jac, bounds=bounds)
    for name in ("success", "message", "nfev", "njev", "fun"):
        assert res[name] == ref[name], name
    np.testing.assert_array_equal(res.x, ref.x)
    assert len(fun.points) == 1


@pytest.mark.parametrize("options", [{"maxiter": 0}, {"maxiter": -3}, {"maxfun": 0}])
def test_zero_limits_as_l_bfgs_b(options):
    """L-BFGS-B tests the limits after each iteration: maxiter 0 stops after one, with
    status 1; maxfun 0 stops with status 1 too."""
    res = ours(so.rosen, jac=so.rosen_der, options=options)
    ref = scipys(so.rosen, jac=so.rosen_der, options=options)
    assert (res.status, res.success, res.message) == (ref.status, ref.success, ref.message)
    if "maxiter" in options:
        assert res.nit == ref.nit == 1


def test_maxfun_counts_calls_of_fun_with_finite_differences():
    """L-BFGS-B's maxfun limits the calls of fun, the differences' included."""
    fun = Counted()
    res = ours(fun, options={"maxfun": 40})
    ref = scipys(so.rosen, options={"maxfun": 40})
    assert res.status == ref.status == 1 and "EVALUATIONS" in ref.message
    assert res.message == ref.message
    assert res.nfev == len(fun.points) <= 40


@pytest.mark.parametrize("argument, value, message", [
    ("constraints", {"type": "ineq", "fun": lambda x: x[0]}, "cannot handle constraints"),
    ("constraints", so.NonlinearConstraint(lambda x: x[0], 0, 1), "cannot handle constraints"),
    ("hess", so.rosen_hess, r"does not use Hessian information \(hess\)"),
    ("hessp", lambda x, p: so.rosen_hess(x) @ p, r"Hessian-vector product information"),
])
def test_what_l_bfgs_b_ignores_is_ignored_with_its_warning(argument, value, message):
    """minimize warns (RuntimeWarning) and goes on without it, for L-BFGS-B as for us."""
    with pytest.warns(RuntimeWarning, match=message):
        ref = scipys(so.rosen, jac=so.rosen_der, **{argument: value})
    with pytest.warns(RuntimeWarning, match=message):
        res = so.minimize(so.rosen, X0, jac=so.rosen_der, method=hpcqn.scipy_lbfgs,
                          **{argument: value})
    plain = ours(so.rosen, jac=so.rosen_der)
    np.testing.assert_array_equal(res.x, plain.x)
    np.testing.assert_allclose(res.x, ref.x, atol=1e-4)


@pytest.mark.filterwarnings("ignore:Unknown solver options")  # SciPy's second warning
def test_return_all_is_ignored_with_l_bfgs_bs_warning():
    with pytest.warns(RuntimeWarning, match="does not support the return_all option"):
        scipys(so.rosen, jac=so.rosen_der, options={"return_all": True})
    with pytest.warns(RuntimeWarning, match="does not support the return_all option"):
        res = so.minimize(so.rosen, X0, jac=so.rosen_der, method=hpcqn.scipy_lbfgs,
                          options={"return_all": True})
    assert res.success


@pytest.mark.parametrize("jac", ["callable", True])
def test_a_complex_gradient_is_refused(jac):
    """L-BFGS-B drops its imaginary part with a ComplexWarning; we refuse it (the loss is
    silent once the warning is filtered), naming the dtype."""
    def grad(x):
        return so.rosen_der(x) + 1e-3j

    with pytest.warns(np.exceptions.ComplexWarning):
        scipys(so.rosen, jac=grad)
    kwargs = ({"fun": so.rosen, "jac": grad} if jac == "callable"
              else {"fun": lambda x: (so.rosen(x), grad(x)), "jac": True})
    with pytest.raises(hpcqn.FunctionError, match="gradient.*real.*complex128"):
        so.minimize(x0=X0, method=hpcqn.scipy_lbfgs, **kwargs)


def test_a_complex_x0_or_f_is_refused():
    with pytest.raises(TypeError, match="x0 must be real.*complex128"):
        ours(so.rosen, x0=X0 + 0j, jac=so.rosen_der)
    with pytest.raises(hpcqn.FunctionError, match="real f.*complex128"):
        ours(lambda x: so.rosen(x) + 0j, jac=so.rosen_der)
