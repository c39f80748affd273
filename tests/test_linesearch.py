"""The line searches against closed-form one-dimensional functions."""

from __future__ import annotations

import math

import numpy as np
import pytest

from hpcqn.curvature.linesearch import CONVERGED, EVALUATE, FAILED, Backtracking, MoreThuente


def phi1(a: float, beta: float = 2.0) -> tuple[float, float]:
    """Moré-Thuente's function 1: -a / (a^2 + beta), minimiser sqrt(beta)."""
    return -a / (a * a + beta), (a * a - beta) / (a * a + beta) ** 2


def phi2(a: float, beta: float = 0.004) -> tuple[float, float]:
    """Moré-Thuente's function 2: (a + beta)^5 - 2 (a + beta)^4, minimiser 1.6 - beta."""
    return (a + beta) ** 5 - 2 * (a + beta) ** 4, 5 * (a + beta) ** 4 - 8 * (a + beta) ** 3


def phi_quadratic(a: float) -> tuple[float, float]:
    return (a - 3.0) ** 2, 2.0 * (a - 3.0)


def run(search, phi) -> tuple[str, float, int]:
    result, nfev = EVALUATE, 0
    while result == EVALUATE:
        nfev += 1
        result = search.advance(*phi(search.stp))
        assert nfev < 50
    return result, search.stp, nfev


@pytest.mark.parametrize("phi", [phi1, phi2, phi_quadratic])
@pytest.mark.parametrize("stp0", [1e-3, 1e-1, 1.0, 10.0, 1e3])
def test_more_thuente_meets_strong_wolfe(phi, stp0):
    ftol, gtol = 1e-3, 0.1
    f0, d0 = phi(0.0)
    search = MoreThuente(f0, d0, stp0, ftol=ftol, gtol=gtol, xtol=1e-12)
    status, stp, _ = run(search, phi)
    assert status == CONVERGED and search.message == ""
    f, d = phi(stp)
    assert f <= f0 + ftol * stp * d0  # sufficient decrease
    assert abs(d) <= gtol * abs(d0)  # curvature (strong Wolfe)


def test_more_thuente_matches_the_paper_table():
    """Moré and Thuente (1994), Table 1: function 1, ftol 1e-3, gtol 0.1."""
    expected = {1e-3: 1.4, 1e-1: 1.4, 10.0: 10.0, 1e3: 37.0}
    for stp0, stp_paper in expected.items():
        status, stp, _ = run(MoreThuente(*phi1(0.0), stp0, ftol=1e-3, gtol=0.1), phi1)
        assert status == CONVERGED
        assert stp == pytest.approx(stp_paper, rel=0.05)


def test_more_thuente_exact_quadratic_step():
    """A quadratic is minimised exactly by the cubic interpolation in two trials."""
    status, stp, nfev = run(MoreThuente(*phi_quadratic(0.0), 1.0, gtol=1e-6), phi_quadratic)
    assert status == CONVERGED and stp == pytest.approx(3.0, abs=1e-9) and nfev <= 3


def test_more_thuente_rejects_ascent_and_fails_on_linear_decrease():
    with pytest.raises(ValueError, match="descent"):
        MoreThuente(0.0, 1.0, 1.0)
    search = MoreThuente(0.0, -1.0, 1.0, stpmax=100.0)
    status, stp, _ = run(search, lambda a: (-a, -1.0))  # unbounded below: a warning,
    assert status == CONVERGED and stp == 100.0 and "stpmax" in search.message  # taken


def test_more_thuente_fails_when_no_step_lowers_f():
    """A warning at a step that did not lower f is a failure (f rises at 1e-3 already)."""
    search = MoreThuente(0.0, -1.0, 1.0, stpmin=1e-3, stpmax=1.0)
    status, stp, _ = run(search, lambda a: (1.0 + a, 1.0))
    assert status == FAILED and stp == 1e-3 and "stpmin" in search.message


def test_more_thuente_xtol_warning_takes_the_best_step():
    """With L-BFGS-B's xtol = 0.1, function 2 ends on the interval test at a step that
    lowered f: the search accepts it, as L-BFGS-B does."""
    search = MoreThuente(*phi2(0.0), 1e-3, ftol=1e-3, gtol=0.1, xtol=0.1)
    status, stp, _ = run(search, phi2)
    assert status == CONVERGED
    assert "xtol" in search.message or "rounding" in search.message
    assert phi2(stp)[0] < phi2(0.0)[0] and stp == pytest.approx(1.596, abs=0.01)


def test_shrink_after_non_finite_value():
    def phi(a: float) -> tuple[float, float]:
        return (math.inf, math.inf) if a > 2.0 else phi_quadratic(a)

    search = MoreThuente(*phi_quadratic(0.0), 8.0, gtol=0.5)
    nfev = 0
    while True:
        nfev += 1
        f, d = phi(search.stp)
        if not math.isfinite(f):
            search.shrink()
            continue
        if search.advance(f, d) != EVALUATE:
            break
    assert search.stp <= 2.0 and phi(search.stp)[0] < phi_quadratic(0.0)[0]


def test_backtracking_armijo():
    f0, d0 = phi_quadratic(0.0)
    status, stp, nfev = run(Backtracking(f0, d0, 64.0), phi_quadratic)
    assert status == CONVERGED
    assert stp == 4.0 and nfev == 5  # 64, 32, 16, 8 fail the Armijo test; 4 passes
    assert phi_quadratic(stp)[0] <= f0 + 1e-4 * stp * d0


def scipy_trials(phi, stp0, ftol, gtol, xtol, stpmax):
    """The steps SciPy's MINPACK-2 dcsrch port evaluates, for an independent reference."""
    dcsrch_module = pytest.importorskip("scipy.optimize._dcsrch")
    steps = []

    def value(a):
        steps.append(a)
        return phi(a)[0]

    search = dcsrch_module.DCSRCH(value, lambda a: phi(a)[1], ftol, gtol, xtol, 0.0, stpmax)
    f0, d0 = phi(0.0)
    steps.clear()
    stp, _, _, task = search(stp0, phi0=f0, derphi0=d0, maxiter=30)
    return steps, task


def test_trial_steps_match_minpack_on_random_functions():
    """On random smooth 1-D functions our trial steps are MINPACK-2's (via SciPy)."""
    rng = np.random.default_rng(0)
    checked = 0
    for _ in range(300):
        c = rng.standard_normal(4)
        scale = 10 ** rng.uniform(-2, 2)

        def phi(a, c=c, scale=scale):  # a random quartic with phi'(0) < 0
            f = -abs(c[0]) * a + c[1] * a**2 + abs(c[2]) * a**4 * scale + 0.1 * c[3] * a**3
            d = -abs(c[0]) + 2 * c[1] * a + 4 * abs(c[2]) * a**3 * scale + 0.3 * c[3] * a**2
            return f, d

        stp0 = 10 ** rng.uniform(-2, 1)
        ftol, gtol, xtol = 1e-3, 0.9, 0.1
        reference, task = scipy_trials(phi, stp0, ftol, gtol, xtol, 1e10)
        ours = []
        search = MoreThuente(*phi(0.0), stp0, ftol=ftol, gtol=gtol, xtol=xtol)
        result = EVALUATE
        while result == EVALUATE and len(ours) < 30:
            ours.append(search.stp)
            result = search.advance(*phi(search.stp))
        np.testing.assert_allclose(ours[: len(reference)], reference, rtol=1e-10)
        if task[:4] == b"CONV":
            assert result == CONVERGED and len(ours) == len(reference)
        checked += 1
    assert checked == 300
