"""The MINPACK-2 membrane problems (hpcqn.experiments.minpack2), serially."""

from __future__ import annotations

import numpy as np
import pytest

import hpcqn
from hpcqn.experiments.minpack2 import ElasticPlasticTorsion, Obstacle, make

GRIDS = [(1, 1), (3, 2), (7, 5), (6, 9)]


def loop_objective(problem, x):
    """f and g by MINPACK-2's element loops (lower, then upper triangles), one element at
    a time: the reference the vectorised code is checked against."""
    nx, ny, c = problem.nx, problem.ny, problem.c
    hx, hy = 1.0 / (nx + 1), 1.0 / (ny + 1)
    area = 0.5 * hx * hy

    def value(i, j):  # 1-based grid indices; zero on the boundary
        return x[nx * (j - 1) + (i - 1)] if 1 <= i <= nx and 1 <= j <= ny else 0.0

    def add(g, i, j, amount):
        if 1 <= i <= nx and 1 <= j <= ny:
            g[nx * (j - 1) + (i - 1)] += amount

    quad = lin = 0.0
    g = [0.0] * (nx * ny)
    for j in range(0, ny + 1):  # lower triangles: (i, j), (i+1, j), (i, j+1)
        for i in range(0, nx + 1):
            v, vr, vt = value(i, j), value(i + 1, j), value(i, j + 1)
            dvdx, dvdy = (vr - v) / hx, (vt - v) / hy
            quad += dvdx**2 + dvdy**2
            lin -= c / 3 * (v + vr + vt)
            add(g, i, j, -dvdx / hx - dvdy / hy - c / 3)
            add(g, i + 1, j, dvdx / hx - c / 3)
            add(g, i, j + 1, dvdy / hy - c / 3)
    for j in range(1, ny + 2):  # upper triangles: (i, j), (i-1, j), (i, j-1)
        for i in range(1, nx + 2):
            v, vl, vb = value(i, j), value(i - 1, j), value(i, j - 1)
            dvdx, dvdy = (v - vl) / hx, (v - vb) / hy
            quad += dvdx**2 + dvdy**2
            lin -= c / 3 * (vb + vl + v)
            add(g, i, j - 1, -dvdy / hy - c / 3)
            add(g, i - 1, j, -dvdx / hx - c / 3)
            add(g, i, j, dvdx / hx + dvdy / hy - c / 3)
    return area * (0.5 * quad + lin), np.array(g) * area


def problems(nx, ny):
    return [ElasticPlasticTorsion(nx, ny), Obstacle(nx, ny), ElasticPlasticTorsion(nx, ny, c=25)]


def random_point(problem, seed=0):
    """A point inside the bounds, away from them."""
    lo, hi = problem.bounds()
    t = np.random.default_rng(seed).uniform(0.1, 0.9, problem.n)
    return lo + t * (hi - lo)


@pytest.mark.parametrize("nx,ny", GRIDS)
def test_objective_matches_element_loops(nx, ny):
    for problem in problems(nx, ny):
        for x in (problem.x0(), random_point(problem), np.zeros(problem.n)):
            f, g = problem.fun_and_grad(x)
            f_ref, g_ref = loop_objective(problem, x)
            assert f == pytest.approx(f_ref, rel=1e-12, abs=1e-15)
            np.testing.assert_allclose(g, g_ref, rtol=1e-11, atol=1e-14 * np.abs(g_ref).max())


def test_known_value_at_the_standard_start():
    # At v = 0 only the linear term is left: f = 0, g = -c hx hy everywhere.
    problem = ElasticPlasticTorsion(4, 3)
    f, g = problem.fun_and_grad(np.zeros(12))
    assert f == 0.0
    np.testing.assert_allclose(g, -5.0 / (5 * 4))
    # One interior point of a 1x1 grid: v = t gives f = (1/4)(1/2)(4 t^2 / (1/4)) - c t/4.
    single = ElasticPlasticTorsion(1, 1, c=5.0)
    f, g = single.fun_and_grad(np.array([0.3]))
    assert f == pytest.approx(0.25 * 0.5 * 4 * 0.09 / 0.25 - 5.0 * 0.3 / 4)
    assert g[0] == pytest.approx(0.25 * 4 * 0.3 / 0.25 - 5.0 / 4)


@pytest.mark.parametrize("nx,ny", [(6, 5), (4, 7)])
def test_gradient_matches_central_differences(nx, ny):
    for problem in problems(nx, ny):
        x = random_point(problem, seed=1)
        _, g = problem.fun_and_grad(x)
        step = 1e-5
        fd = np.empty(problem.n)
        for k in range(problem.n):
            e = np.zeros(problem.n)
            e[k] = step
            fd[k] = (problem.fun_and_grad(x + e)[0] - problem.fun_and_grad(x - e)[0]) / (2 * step)
        # f is quadratic: central differences are exact up to rounding.
        np.testing.assert_allclose(fd, g, rtol=1e-6, atol=1e-9 * np.abs(g).max())


def test_bounds_and_start():
    torsion = ElasticPlasticTorsion(5, 4)
    lo, hi = torsion.bounds()
    np.testing.assert_array_equal(lo, -hi)
    # MINPACK-2's XS and XU: the distance to the boundary, min(i, nx-i+1) hx vs j's.
    i, j = 2, 1  # 0-based: grid point (3, 2)
    assert hi[5 * j + i] == pytest.approx(min(3 / 6, 2 / 5))
    np.testing.assert_array_equal(torsion.x0(), hi)
    obstacle = Obstacle(8, 6)
    lo, hi = obstacle.bounds()
    x = (1 + np.arange(8)) / 9
    y = (1 + np.arange(6)) / 7
    s = np.sin(9.2 * x[None, :]) * np.sin(9.3 * y[:, None])
    np.testing.assert_allclose(lo, (s**3).ravel())
    np.testing.assert_allclose(hi, (s**2 + 0.2).ravel())
    assert np.all(lo < hi)
    x0 = obstacle.x0()
    assert np.all((lo <= x0) & (x0 <= hi))
    np.testing.assert_array_equal(x0, np.maximum(lo, 0.0))


@pytest.mark.parametrize("name", ["torsion", "obstacle"])
def test_distributed_serial_equals_whole_vector(name):
    problem = make(name, 7, 5)
    fun, x0, lo, hi = problem.distributed(hpcqn.serial_comm())
    np.testing.assert_array_equal(x0, problem.x0())
    whole_lo, whole_hi = problem.bounds()
    np.testing.assert_array_equal(lo, whole_lo)
    np.testing.assert_array_equal(hi, whole_hi)
    for x in (x0, random_point(problem, seed=2)):
        f, g = fun(x)
        f_ref, g_ref = problem.fun_and_grad(x)
        assert f == f_ref
        np.testing.assert_array_equal(g, g_ref)


def test_row_blocks_sum_to_the_whole():
    # The serial pieces of a row split (halo rows passed by hand) add up to the whole.
    problem = Obstacle(5, 6)
    x = random_point(problem, seed=3)
    v = x.reshape(6, 5)
    f_ref, g_ref = problem.fun_and_grad(x)
    zero = np.zeros(5)
    f1, g1 = problem.block(v[:2].ravel(), zero, v[2], False)
    f2, g2 = problem.block(v[2:].ravel(), v[1], zero, True)
    assert f1 + f2 == pytest.approx(f_ref, rel=1e-13)
    np.testing.assert_allclose(np.concatenate([g1, g2]), g_ref, rtol=1e-13, atol=1e-16)


def test_bad_arguments():
    with pytest.raises(ValueError, match="positive"):
        ElasticPlasticTorsion(0)
    with pytest.raises(ValueError, match="shape"):
        Obstacle(3).fun_and_grad(np.zeros(8))
    with pytest.raises(ValueError, match="rows"):
        Obstacle(3).distributed(hpcqn.serial_comm(), rows=[2])
    with pytest.raises(ValueError, match="unknown problem"):
        make("bearing", 3)


@pytest.mark.parametrize("module", ["minpack2", "mgh"])
def test_objective_modules_load_by_path_with_numpy_only(module):
    """The TAO comparison (benchmarks/tao_solve.py) runs outside hpcqn's environment and
    loads these files by path: they must need nothing but NumPy at load time, and give
    the objectives hpcqn's problems give."""
    import subprocess
    import sys
    from pathlib import Path

    path = Path(hpcqn.__file__).parent / "experiments" / f"{module}.py"
    script = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('alone', {str(path)!r})\n"
        "module = importlib.util.module_from_spec(spec)\n"
        "sys.modules['alone'] = module\n"
        "spec.loader.exec_module(module)\n"
        "loaded = sorted(m.split('.')[0] for m in sys.modules if m.split('.')[0] in "
        "('hpcqn', 'scipy', 'mpi4py', 'h5py'))\n"
        "assert not loaded, loaded\n"
        "import numpy as np\n"
        "if hasattr(module, 'make'):\n"
        "    p = module.make('obstacle', 6)\n"
        "    print(repr(p.fun_and_grad(p.x0())[0]))\n"
        "else:\n"
        "    print(repr(module.FUNCTIONS['extended_wood'](module.start('extended_wood', 8))[0]))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    if module == "minpack2":
        problem = make("obstacle", 6)
        expected = problem.fun_and_grad(problem.x0())[0]
    else:
        from hpcqn.experiments.problems import make_problem

        problem = make_problem("extended_wood", n=8)
        expected = problem.value_and_grad(problem.x0())[0]
    assert float(done.stdout) == expected
