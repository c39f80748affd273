"""hpcqn.minimize's options ``H0`` and ``inner`` and the ask-and-tell hpcqn.Minimizer
(serial), on the finite-element control problem of tests/fe1d.py.

On a graded mesh the Euclidean L-BFGS needs more iterations the finer the mesh (the
Hessian's spectrum follows the mass matrix, whose eigenvalues scale like the element
sizes); with the mass matrix as the initial inverse Hessian (H0 = M^{-1}, consistent or
lumped) or as the inner product, the count does not depend on the mesh. Every run is
stopped by the same mesh-independent test, ||g||_{M^{-1}} <= TOL ||g0||_{M^{-1}} (the L2
norm of the gradient's Riesz representer, relative to the start), and checked against
the exact minimiser of the quadratic from a dense float64 solve.

Measured (alpha 1e-3, grading 2, history 10, TOL 1e-6, q0 = 0), iterations (function
evaluations in parentheses):

      N  h_max/h_min   Euclidean   H0 = M^{-1}   H0 = lumped M^{-1}   inner = M
     50       65        47  (53)      6 (7)          7 (8)             6 (7)
    100      134        69  (73)      6 (7)          6 (7)             6 (7)
    200      265        93 (105)      6 (7)          6 (7)             6 (7)
    400      534       129 (141)      6 (7)          6 (7)             6 (7)
    800     1065       165 (185)      6 (7)          6 (7)             6 (7)

The spectrum of M^{-1} H is [1.0000e-3, 1.1266e-2] on every mesh (condition 11.3).
M-norm errors to the exact minimiser: 8e-6 to 1.1e-5 (Euclidean), 2.0e-7 to 2.1e-7
(H0 = M^{-1} and inner), 7.6e-6 falling to 2.1e-7 (lumped H0), each within 2% of its
a-posteriori bound (:func:`error_bound`). The H0 and inner runs take the same number of
iterations on every mesh and end 7e-16 apart (M-norm, relative to ||q*||_M).
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
import scipy.linalg
from fe1d import FE1D

import hpcqn

MESHES = (50, 100, 200, 400, 800)
TOL = 1e-6  # relative L2 norm of the gradient's Riesz representer
OPTIONS = {"history": 10, "gtol": 0.0, "ftol": 0.0, "maxiter": 3000, "maxfun": 6000}
VARIANTS = ("euclidean", "H0", "H0_lumped", "inner")


@functools.cache
def problem(n_elements: int) -> FE1D:
    return FE1D(n_elements)


@functools.cache
def spectrum(n_elements: int) -> tuple[float, float]:
    """The extreme eigenvalues of M^{-1} H (dense generalised eigenvalues, float64): the
    smallest is just above alpha, the largest about alpha + 1/pi^4, on every mesh."""
    p = problem(n_elements)
    eigenvalues = scipy.linalg.eigh(p.hessian(), p.mass.toarray(), eigvals_only=True)
    return float(eigenvalues[0]), float(eigenvalues[-1])


def error_bound(n_elements: int, g: np.ndarray) -> float:
    """The bound on ||q - q*||_M / ||q*||_M at a point of Euclidean gradient g, from
    q0 = 0 (g0 = -H q*), lambda the eigenvalues of M^{-1} H: ||q - q*||_M <=
    ||g||_{M^{-1}} / lambda_min and ||q*||_M >= ||g0||_{M^{-1}} / lambda_max."""
    p = problem(n_elements)
    low, high = spectrum(n_elements)
    g0 = p.dual_norm(p.value_and_grad(p.x0())[1])
    return high / low * p.dual_norm(g) / g0 * (1 + 1e-9)


class RelativeGradientStop:
    """A callback that stops the run (StopIteration) once ||g||_{M^{-1}} <= tol
    ||g0||_{M^{-1}}; ``riesz``: the callback returns the Riesz gradient M^{-1} g, whose
    M-norm is the same number."""

    def __init__(self, p: FE1D, tol: float = TOL, riesz: bool = False):
        self.p, self.tol, self.riesz = p, tol, riesz
        self.g0 = self.norm(p.value_and_grad(p.x0())[1], riesz=False)
        self.ratios: list[float] = []

    def norm(self, g: np.ndarray, riesz: bool | None = None) -> float:
        riesz = self.riesz if riesz is None else riesz
        return self.p.m_norm(g) if riesz else self.p.dual_norm(g)

    def __call__(self, intermediate_result) -> None:
        self.ratios.append(self.norm(intermediate_result.jac) / self.g0)
        if self.ratios[-1] <= self.tol:
            raise StopIteration


def arguments(p: FE1D, variant: str) -> dict:
    """minimize's fun and options for a variant."""
    if variant == "euclidean":
        return {"fun": p.value_and_grad}
    if variant == "H0":
        return {"fun": p.value_and_grad, "H0": p.mass_inverse}
    if variant == "H0_lumped":
        return {"fun": p.value_and_grad, "H0": p.lumped_mass_inverse}
    if variant == "inner":
        return {"fun": p.value_and_riesz_grad, "inner": p.inner}
    raise AssertionError(variant)


@functools.cache
def solve(n_elements: int, variant: str):
    p = problem(n_elements)
    stop = RelativeGradientStop(p, riesz=variant == "inner")
    res = hpcqn.minimize(x0=p.x0(), comm=hpcqn.serial_comm(), options=OPTIONS,
                         callback=stop, **arguments(p, variant))
    return res, stop


def check_converged(n_elements: int, variant: str) -> None:
    res, stop = solve(n_elements, variant)
    assert res.status == 99 and "StopIteration" in res.message, res.message
    assert stop.ratios[-1] <= TOL and len(stop.ratios) == res.nit
    # The a-posteriori bounds of a quadratic from q0 = 0 (g0 = -H q*), lambda the
    # eigenvalues of M^{-1} H: ||q - q*||_M <= ||g||_{M^{-1}} / lambda_min and
    # ||q*||_M >= ||g0||_{M^{-1}} / lambda_max, f - f* <= ||g||_{M^{-1}}^2 / (2 lambda_min).
    # The Euclidean runs end close to both (their error is in the lambda_min directions).
    p = problem(n_elements)
    low, high = spectrum(n_elements)
    ratio = stop.ratios[-1] * (1 + 1e-9)
    assert p.relative_error(res.x) <= high / low * ratio
    f_star = p.value_and_grad(p.solution())[0]
    assert 0 <= res.fun - f_star <= (ratio * stop.g0) ** 2 / (2 * low) + 1e-15


def table() -> str:
    """The iteration table of the module docstring (python -c 'import
    test_minimize_inner as t; print(t.table())' in tests/)."""
    lines = []
    for n in MESHES:
        counts = "  ".join(f"{solve(n, v)[0].nit:5d}" for v in VARIANTS)
        lines.append(f"{n:5d}  {problem(n).mesh_ratio:9.0f}  {counts}")
    return "\n".join(lines)


def test_fe1d_gradient_and_solution():
    """The problem itself: the derivative against central differences, the Riesz
    gradient against M^{-1} g, the minimiser's gradient is zero."""
    p = FE1D(40)
    rng = np.random.default_rng(0)
    q, v = rng.standard_normal(p.n), rng.standard_normal(p.n)
    step = 1e-6
    slope = (p.value_and_grad(q + step * v)[0] - p.value_and_grad(q - step * v)[0]) / (2 * step)
    assert slope == pytest.approx(p.value_and_grad(q)[1] @ v, rel=1e-7)
    np.testing.assert_allclose(p.mass @ p.value_and_riesz_grad(q)[1], p.value_and_grad(q)[1],
                               rtol=1e-12, atol=1e-15)
    g_star = p.value_and_grad(p.solution())[1]
    assert p.dual_norm(g_star) <= 1e-12 * p.dual_norm(p.value_and_grad(p.x0())[1])
    assert p.inner(q, v) == pytest.approx(q @ (p.mass.toarray() @ v), rel=1e-12)


def test_euclidean_iterations_grow_with_refinement():
    nits = [solve(n, "euclidean")[0].nit for n in MESHES]
    for n in MESHES:
        check_converged(n, "euclidean")
    assert nits == sorted(nits)
    assert nits[-1] >= 3 * nits[0], nits


@pytest.mark.parametrize("variant", ["H0", "H0_lumped", "inner"])
def test_mass_matrix_makes_iterations_mesh_independent(variant):
    nits = [solve(n, variant)[0].nit for n in MESHES]
    for n in MESHES:
        check_converged(n, variant)
    assert max(nits) <= 1.3 * min(nits), nits
    assert max(nits) * 10 <= solve(MESHES[-1], "euclidean")[0].nit


@pytest.mark.parametrize("n_elements", MESHES)
def test_inner_and_h0_are_the_same_algorithm(n_elements):
    """In exact arithmetic L-BFGS with the inner product u' M v and the Riesz gradient
    is L-BFGS with the Euclidean product and H0 = M^{-1}: same iterates (measured: the
    same nit on every mesh, final x 2e-16 to 7e-16 apart)."""
    with_h0, _ = solve(n_elements, "H0")
    with_inner, _ = solve(n_elements, "inner")
    assert with_h0.nit == with_inner.nit and with_h0.nfev == with_inner.nfev
    p = problem(n_elements)
    assert p.m_norm(with_h0.x - with_inner.x) <= 1e-12 * p.m_norm(p.solution())


@pytest.mark.parametrize("variant", ["H0", "inner"])
def test_gttol_is_the_mesh_independent_stop(variant):
    """With ``inner`` the gttol test measures the gradient in that product, with ``H0``
    by sqrt(g.H0 g): for M both are ||g||_{M^{-1}}, so gttol stops where the callback
    computing it does, on every mesh."""
    for n in MESHES:
        p = problem(n)
        res = hpcqn.minimize(x0=p.x0(), comm=hpcqn.serial_comm(),
                             options={**OPTIONS, "gttol": TOL}, **arguments(p, variant))
        assert res.success and "gttol" in res.message, res.message
        assert res.nit == solve(n, variant)[0].nit
        np.testing.assert_array_equal(res.x, solve(n, variant)[0].x)


def iterates(fun, x0, options, **kwargs):
    path = []

    def record(intermediate_result):
        path.append(intermediate_result.x.copy())

    res = hpcqn.minimize(fun, x0, options=options, callback=record, **kwargs)
    return res, path


def test_identity_h0_and_dot_inner_give_the_default_run():
    """H0 = identity and inner = the dot product are the default algorithm, computed
    another way (the products of the metric history instead of the Gram matrix): the
    same iterates to rounding, which the Euclidean problem's condition amplifies late in
    the run. Measured (N = 100, gttol 1e-8): nit 92 default, 94 H0 = I, 93 inner = dot;
    iterates equal to 4e-15 at iteration 10, 1e-11 at 20, 3e-9 at 50, 1e-5 at 80."""
    p = problem(100)
    options = {**OPTIONS, "gttol": 1e-8}
    default, reference = iterates(p.value_and_grad, p.x0(), options)
    for kwargs in ({"H0": lambda v: v.copy()}, {"inner": lambda u, v: float(u @ v)}):
        res, path = iterates(p.value_and_grad, p.x0(), options, **kwargs)
        assert res.success and abs(res.nit - default.nit) <= 4, (res.nit, default.nit)
        for k in range(20):
            error = np.abs(path[k] - reference[k]).max() / np.abs(reference[k]).max()
            assert error <= 1e-9, (k, error)
        assert p.relative_error(res.x) <= error_bound(100, res.jac)


@pytest.mark.parametrize("variant", ["H0", "inner"])
def test_minimizer_ask_and_tell_gives_minimize_iterates(variant):
    """The ask-and-tell loop and minimize evaluate the same points, bit for bit."""
    p = problem(200)
    kwargs = arguments(p, variant)
    fun = kwargs.pop("fun")
    options = {**OPTIONS, "gttol": 1e-8}
    evaluated, accepted = [], []

    def recording(x):
        evaluated.append(x.copy())
        return fun(x)

    def on_accept(intermediate_result):
        accepted.append(intermediate_result.x.copy())

    res = hpcqn.minimize(recording, p.x0(), options=options, callback=on_accept, **kwargs)
    asked, told = [], []

    def on_tell(intermediate_result):
        told.append(intermediate_result.x.copy())

    solver = hpcqn.Minimizer(p.x0(), options=options, callback=on_tell, **kwargs)
    while not solver.done:
        x = solver.ask()
        asked.append(x.copy())
        solver.tell(*fun(x))
    out = solver.result()
    assert res.success and out.success
    assert (out.nit, out.nfev, out.fun) == (res.nit, res.nfev, res.fun)
    np.testing.assert_array_equal(out.x, res.x)
    assert len(asked) == len(evaluated) and len(told) == len(accepted) == res.nit
    for a, b in zip(asked, evaluated, strict=True):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(told, accepted, strict=True):
        np.testing.assert_array_equal(a, b)
    assert p.relative_error(out.x) <= error_bound(200, p.value_and_grad(out.x)[1])


@pytest.mark.parametrize("bad", [
    pytest.param(lambda v: v[:-1].copy(), id="short"),
    pytest.param(lambda v: np.vstack([v, v]), id="2-D"),
    pytest.param(list, id="list"),
    pytest.param(lambda v: v * np.inf, id="inf"),
    pytest.param(lambda v: np.full_like(v, np.nan), id="nan"),
    pytest.param(lambda v: -v, id="negative-definite"),
])
def test_bad_h0_raises_naming_it(bad):
    """A user's mistake in H0 gives an error that names H0."""
    p = problem(50)
    with pytest.raises((ValueError, hpcqn.FunctionError), match="H0"):
        hpcqn.minimize(p.value_and_grad, p.x0(), H0=bad, options=OPTIONS)


@pytest.mark.parametrize("bad", [
    pytest.param(lambda u, v: u * v, id="array"),
    pytest.param(lambda u, v: "one", id="str"),
    pytest.param(lambda u, v: "1.0", id="numeric-str"),
    pytest.param(lambda u, v: float(u @ v) * np.inf, id="inf"),
    pytest.param(lambda u, v: float("nan"), id="nan"),
    pytest.param(lambda u, v: -float(u @ v), id="negative-definite"),
])
def test_bad_inner_raises_naming_it(bad):
    p = problem(50)
    with pytest.raises((ValueError, hpcqn.FunctionError), match="inner"):
        hpcqn.minimize(p.value_and_riesz_grad, p.x0(), inner=bad, options=OPTIONS)


@pytest.mark.parametrize("extra", [{"H0": "mass_inverse"}, {"inner": "inner"}])
def test_bounds_with_h0_or_inner_rejected(extra):
    p = problem(50)
    kwargs = {name: getattr(p, attribute) for name, attribute in extra.items()}
    with pytest.raises(ValueError, match="do not combine"):
        hpcqn.minimize(p.value_and_grad, p.x0(), bounds=(0.0, None), **kwargs)
