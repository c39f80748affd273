"""The MINPACK-2 membrane problems split by grid rows, under mpiexec -n 1/2/3: the sum of
the ranks' parts of f and the gathered gradient equal the whole-vector serial ones."""

from __future__ import annotations

import numpy as np
import pytest

from hpcqn.experiments.minpack2 import make

pytestmark = pytest.mark.mpi

# (nx, ny): more rows than ranks, as many, fewer (7x2, 3x1 leave ranks with no row).
GRIDS = [(7, 5), (4, 3), (7, 2), (3, 1), (12, 10)]


def points(problem):
    lo, hi = problem.bounds()
    t = np.random.default_rng(problem.n).uniform(0.0, 1.0, problem.n)
    return [problem.x0(), lo + t * (hi - lo), np.sin(np.arange(problem.n))]


def check(comm, problem, rows=None):
    fun, x0, lo, hi = problem.distributed(comm, rows)
    layout = problem.layout(comm.size, rows)
    part = layout.local_slice(comm.rank)
    whole_lo, whole_hi = problem.bounds()
    np.testing.assert_array_equal(x0, problem.x0()[part])
    np.testing.assert_array_equal(lo, whole_lo[part])
    np.testing.assert_array_equal(hi, whole_hi[part])
    for x in points(problem):  # the same x on every rank (seeded)
        f_part, g_local = fun(x[part].copy())
        assert g_local.shape == (layout.counts[comm.rank],)
        f = comm.allreduce_named(sums={"f": f_part}).sums["f"]
        g = comm.allgatherv(g_local, list(layout.counts))
        f_ref, g_ref = problem.fun_and_grad(x)
        assert abs(f - f_ref) <= 1e-12 * abs(f_ref)
        assert np.abs(g - g_ref).max() <= 1e-12 * np.abs(g_ref).max()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("name", ["torsion", "obstacle"])
@pytest.mark.parametrize("nx,ny", GRIDS)
def test_split_by_rows_equals_serial(comm, name, nx, ny):
    check(comm, make(name, nx, ny))


@pytest.mark.timeout(60)
@pytest.mark.parametrize("name", ["torsion", "obstacle"])
def test_uneven_rows_with_empty_ranks_between(comm, name):
    # All rows but one on the last rank, none on the ranks in between.
    problem = make(name, 5, 6)
    rows = [6] if comm.size == 1 else [1] + [0] * (comm.size - 2) + [5]
    check(comm, problem, rows)
    # And every row on one middle rank.
    rows = [0] * comm.size
    rows[comm.size // 2] = 6
    check(comm, problem, rows)


@pytest.mark.timeout(60)
def test_repeated_calls_reuse_the_halo_buffers(comm):
    problem = make("obstacle", 6, 4)
    fun, x0, _, _ = problem.distributed(comm)
    layout = problem.layout(comm.size)
    part = layout.local_slice(comm.rank)
    for x in points(problem)[::-1] + points(problem):
        f_part, g_local = fun(x[part].copy())
        f = comm.allreduce_named(sums={"f": f_part}).sums["f"]
        f_ref, g_ref = problem.fun_and_grad(x)
        assert abs(f - f_ref) <= 1e-12 * abs(f_ref)
        np.testing.assert_allclose(comm.allgatherv(g_local, list(layout.counts)), g_ref,
                                   rtol=0, atol=1e-12 * np.abs(g_ref).max())
