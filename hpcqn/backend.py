"""Array backend: which array namespace (NumPy or CuPy) holds the data, dtypes, DLPack.

Numerical code in hpcqn is written once against ``xp`` (the namespace returned by
:func:`namespace`). NumPy is the default; CuPy is used when it is asked for by name or
when the inputs are CuPy arrays. Only float32 and float64 data are accepted.
"""

from __future__ import annotations

import importlib
import math
from types import ModuleType
from typing import Any

import numpy as np

FLOAT_DTYPES = ("float32", "float64")


def _cupy() -> ModuleType:
    try:
        return importlib.import_module("cupy")
    except ImportError as exc:  # pragma: no cover - depends on the machine
        raise RuntimeError(
            "the 'cupy' backend was requested but CuPy is not installed; "
            "install hpcqn with the [gpu] extra (pip install 'hpcqn[gpu]')"
        ) from exc


def is_cupy_array(a: Any) -> bool:
    """True for a CuPy ndarray (checked by its module, so CuPy need not be importable)."""
    return type(a).__module__.split(".")[0] == "cupy"


def is_device_array(a: Any) -> bool:
    """True for any array that lives in GPU memory (exposes ``__cuda_array_interface__``)."""
    return hasattr(a, "__cuda_array_interface__")


def namespace(*arrays: Any, backend: str | None = None) -> ModuleType:
    """The array namespace for ``arrays``: ``numpy`` or ``cupy``.

    ``backend`` ("numpy" or "cupy") forces the choice; otherwise CuPy is chosen when any
    input is a CuPy array, NumPy otherwise. Mixing NumPy and CuPy inputs is an error.
    """
    if backend is not None:
        if backend == "numpy":
            return np
        if backend == "cupy":
            return _cupy()
        raise ValueError(f"backend must be 'numpy' or 'cupy', got {backend!r}")
    kinds = {is_cupy_array(a) for a in arrays if a is not None}
    if len(kinds) > 1:
        raise TypeError("inputs mix NumPy and CuPy arrays; put them on one device first")
    return _cupy() if kinds == {True} else np


def check_float_array(a: Any, name: str) -> None:
    """Raise TypeError unless ``a`` is a 1-D float32 or float64 array."""
    dtype = getattr(a, "dtype", None)
    if dtype is None or str(dtype) not in FLOAT_DTYPES:
        raise TypeError(
            f"{name} must be a float32 or float64 array, got "
            f"{'dtype ' + str(dtype) if dtype is not None else type(a).__name__}"
        )
    if getattr(a, "ndim", None) != 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {tuple(a.shape)}")


def asarray(a: Any, xp: ModuleType | None = None, dtype: Any = None) -> Any:
    """``a`` as an array of namespace ``xp`` (default: the namespace ``a`` already uses)."""
    xp = xp or namespace(a)
    return xp.asarray(a, dtype=dtype)


def to_host(a: Any) -> np.ndarray:
    """A NumPy array with the values of ``a`` (a copy only when ``a`` is on a device)."""
    if is_cupy_array(a):
        return a.get()
    return np.asarray(a)


def from_dlpack(obj: Any, xp: ModuleType | None = None) -> Any:
    """A zero-copy view of a DLPack-capable object (torch tensor, JAX array, ...).

    CPU producers become NumPy arrays, CUDA producers CuPy arrays, unless ``xp`` says which.
    """
    if xp is None:
        device_type = obj.__dlpack_device__()[0] if hasattr(obj, "__dlpack_device__") else 1
        xp = np if int(device_type) in (1, 3) else _cupy()  # kDLCPU = 1, kDLCUDAHost = 3
    return xp.from_dlpack(obj)


def synchronize(a: Any) -> None:
    """Wait for pending device work on ``a``'s stream (no-op for host arrays)."""
    if is_cupy_array(a):
        _cupy().cuda.get_current_stream().synchronize()


def all_finite(a: Any) -> bool:
    """Whether every entry of ``a`` is finite. One read: ``a . a`` is finite only when
    every entry is (squares cannot cancel an infinity); only when the dot product is not
    finite (a non-finite entry, or an overflow) are the entries checked one by one."""
    xp = namespace(a)
    flat = a.reshape(-1)
    with np.errstate(over="ignore", invalid="ignore"):
        if math.isfinite(float(flat @ flat)):
            return True
    return bool(xp.isfinite(flat).all())


SYMMETRIZE_TILE = 128  # tiles of a transposed copy that stay in cache


def symmetrize(x: Any) -> Any:
    """``x = (x + x^T) / 2`` in place for a square matrix. For NumPy in cache-sized tiles:
    a whole-matrix transposed copy is many times slower (strided, and conflict misses at
    power-of-two sizes)."""
    if not isinstance(x, np.ndarray):
        x += x.T.copy()
        x *= 0.5
        return x
    d, t = x.shape[0], SYMMETRIZE_TILE
    for i in range(0, d, t):
        block = x[i : i + t, i : i + t]
        block += block.T.copy()
        block *= 0.5
        for j in range(i + t, d, t):
            upper, lower = x[i : i + t, j : j + t], x[j : j + t, i : i + t]
            upper += lower.T
            upper *= 0.5
            lower[...] = upper.T
    return x


def rank1_update(x: Any, alpha: float, u: Any) -> Any:
    """``x += alpha u u^T`` in place (BLAS ``ger`` for contiguous NumPy float32/float64,
    one pass and no ``d x d`` temporary; the namespace's outer product otherwise)."""
    if (isinstance(x, np.ndarray) and x.dtype in (np.float32, np.float64)
            and x.flags.c_contiguous and u.dtype == x.dtype):
        from scipy.linalg import blas

        ger = blas.dger if x.dtype == np.float64 else blas.sger
        # x^T is Fortran-ordered, as BLAS wants; u u^T is symmetric, so updating x^T is
        # updating x.
        result = ger(alpha, u, u, a=x.T, overwrite_a=1)
        if not np.shares_memory(result, x):  # pragma: no cover - BLAS copied
            x[...] = result.T
        return x
    x += alpha * namespace(x).outer(u, u)
    return x


AXPY_BLAS_MIN = 1 << 16  # below this, a BLAS call costs more than the temporary


def axpy(alpha: float, x: Any, y: Any) -> Any:
    """``y += alpha * x`` in place without a temporary (BLAS ``axpy`` for large contiguous
    NumPy arrays; the namespace's arithmetic otherwise). Returns ``y``."""
    if (
        getattr(y, "size", 0) >= AXPY_BLAS_MIN
        and isinstance(y, np.ndarray) and isinstance(x, np.ndarray) and x.dtype == y.dtype
        and y.dtype in (np.float32, np.float64) and x.flags.c_contiguous
        and y.flags.c_contiguous and x.shape == y.shape
    ):
        if y.size:
            function = _blas_axpy(y.dtype)
            result = function(x.ravel(), y.ravel(), a=alpha)
            if not np.shares_memory(result, y):  # pragma: no cover - BLAS copied
                y[...] = result.reshape(y.shape)
        return y
    y += alpha * x
    return y


def _blas_axpy(dtype: Any) -> Any:
    from scipy.linalg import blas

    return blas.daxpy if dtype == np.float64 else blas.saxpy
