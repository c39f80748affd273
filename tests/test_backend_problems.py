"""The array backend, and the test problems' gradients against finite differences."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.optimize

import hpcqn
from hpcqn import backend
from hpcqn.experiments.problems import PROBLEMS, make_problem

SIZES = {"logistic": 31, "quadratic": 40}


def test_namespace_selection():
    a = np.zeros(3)
    assert backend.namespace(a) is np and backend.namespace(a, backend="numpy") is np
    with pytest.raises(ValueError, match="backend must be"):
        backend.namespace(a, backend="jax")


def test_cupy_requested_without_cupy(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_cupy(name, *args, **kwargs):
        if name == "cupy":
            raise ImportError("No module named 'cupy'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_cupy)
    with pytest.raises(RuntimeError, match=r"\[gpu\] extra"):
        backend.namespace(backend="cupy")


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_float_arrays_accepted(dtype):
    backend.check_float_array(np.zeros(3, dtype=dtype), "x")


@pytest.mark.parametrize("bad", [np.zeros(3, dtype=np.int32), np.zeros(3, dtype=np.float16),
                                 np.zeros(3, dtype=complex), [0.0, 1.0]])
def test_non_float_arrays_rejected(bad):
    with pytest.raises(TypeError, match="x0 must be a float32 or float64 array"):
        backend.check_float_array(bad, "x0")


def test_dlpack_in_is_zero_copy_and_out_works():
    source = np.arange(5.0)
    view = backend.from_dlpack(source)
    assert view.ctypes.data == source.ctypes.data  # same memory
    source[0] = 42.0
    assert view[0] == 42.0
    exported = np.from_dlpack(view)  # backend arrays export DLPack as they are
    assert exported.ctypes.data == source.ctypes.data


def test_to_host_of_host_array_does_not_copy():
    a = np.arange(3.0)
    assert backend.to_host(a) is a


@pytest.mark.parametrize("name", sorted(PROBLEMS))
def test_problem_gradients_match_finite_differences(name):
    problem = make_problem(name, n=SIZES.get(name, 40))
    rng = np.random.default_rng(1)
    x = problem.x0() + 0.1 * rng.standard_normal(problem.n)
    error = scipy.optimize.check_grad(lambda v: problem.value_and_grad(v)[0],
                                      lambda v: problem.value_and_grad(v)[1], x)
    scale = max(1.0, float(np.linalg.norm(problem.value_and_grad(x)[1])))
    assert error <= 1e-5 * scale


@pytest.mark.parametrize("name", sorted(PROBLEMS))
def test_distributed_pieces_add_up_to_the_whole(name):
    """On one rank the distributed callback is the whole objective."""
    problem = make_problem(name, n=SIZES.get(name, 40))
    fun, x0 = problem.distributed(hpcqn.serial_comm())
    x = x0 + 0.05
    f, g = fun(x)
    f_ref, g_ref = problem.value_and_grad(x)
    assert f == pytest.approx(f_ref, rel=1e-13) and np.allclose(g, g_ref, rtol=1e-13)


def test_known_minimisers():
    assert make_problem("extended_rosenbrock", n=4).value_and_grad(np.ones(4))[0] == 0.0
    assert make_problem("extended_wood", n=4).value_and_grad(np.ones(4))[0] == 0.0
    quadratic = make_problem("quadratic", n=10)
    np.testing.assert_allclose(quadratic.value_and_grad(quadratic.solution())[1], 0, atol=1e-12)
    with pytest.raises(ValueError, match="divisible by 4"):
        make_problem("extended_powell", n=6)
    with pytest.raises(ValueError, match="unknown problem"):
        make_problem("himmelblau", n=2)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_axpy_in_place(dtype):
    rng = np.random.default_rng(4)
    x, y = rng.standard_normal((2, backend.AXPY_BLAS_MIN + 3)).astype(dtype)
    expected = y.astype(np.float64) + 0.3 * x.astype(np.float64)
    out = backend.axpy(0.3, x, y)
    assert out is y
    tolerance = 1e-6 if dtype == np.float32 else 1e-15
    np.testing.assert_allclose(y, expected, rtol=0, atol=tolerance * np.abs(expected).max())
    strided = np.zeros(2 * x.size, dtype=dtype)[::2]  # not contiguous: the generic path
    backend.axpy(2.0, x, strided)
    np.testing.assert_allclose(strided, 2.0 * x)
    small = np.ones(5, dtype=dtype)  # below AXPY_BLAS_MIN: the generic path
    assert backend.axpy(0.5, np.ones(5, dtype=dtype), small) is small
    np.testing.assert_array_equal(small, 1.5)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_all_finite(dtype):
    from hpcqn.backend import all_finite

    a = np.linspace(-1.0, 1.0, 100_000).astype(dtype)
    assert all_finite(a) and all_finite(a.reshape(100, 1000)) and all_finite(a[:0])
    for bad in (np.nan, np.inf, -np.inf):
        b = a.copy()
        b[12_345] = bad
        assert not all_finite(b)
    # Squares that overflow: the dot product is inf, the entries are finite.
    big = np.full(10, np.finfo(dtype).max / 2, dtype=dtype)
    assert all_finite(big)
    big[3] = np.inf
    assert not all_finite(big)


@pytest.mark.parametrize("d", [1, 127, 128, 300])  # tile edges and a ragged last tile
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_symmetrize_and_rank1_update(d, dtype):
    from hpcqn.backend import rank1_update, symmetrize

    rng = np.random.default_rng(d)
    x = rng.standard_normal((d, d)).astype(dtype)
    expected = (x + x.T) * dtype(0.5)
    np.testing.assert_array_equal(symmetrize(x), expected)
    u = rng.standard_normal(d).astype(dtype)
    reference = x.astype(np.float64) - 0.3 * np.outer(u, u)
    assert rank1_update(x, -0.3, u) is x  # in place (BLAS ger)
    np.testing.assert_allclose(x, reference, rtol=1e-5 if dtype == np.float32 else 1e-13,
                               atol=1e-5 if dtype == np.float32 else 1e-13)
    strided = np.zeros((2 * d, d), dtype=dtype)[::2]  # not contiguous: the generic path
    rank1_update(strided, 2.0, u)
    np.testing.assert_allclose(strided, 2.0 * np.outer(u, u), rtol=1e-6)
