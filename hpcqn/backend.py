"""Array backend: which array namespace (NumPy or CuPy) holds the data, dtypes, DLPack,
and the copies between device arrays and host buffers.

Numerical code in hpcqn is written once against ``xp`` (the namespace returned by
:func:`namespace`). NumPy is the default; CuPy is used when it is asked for by name or
when the inputs are CuPy arrays. Arrays of any other namespace that follows the Python
array API standard (``__array_namespace__``) get that namespace: the curvature kernels
keep fast paths for NumPy and CuPy (BLAS calls, views, ``out=``) and a generic branch
that uses the standard only. Only float32 and float64 data are accepted.
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


def is_ndarray(a: Any) -> bool:
    """True for a NumPy or CuPy ndarray: arrays with views, methods and ``out=`` arguments
    (the fast paths); False for arrays of other array-API namespaces."""
    return isinstance(a, np.ndarray) or is_cupy_array(a)


def _namespace_of(a: Any) -> ModuleType:
    if is_cupy_array(a):
        return _cupy()
    if isinstance(a, np.ndarray) or not hasattr(a, "__array_namespace__"):
        return np
    return a.__array_namespace__()


def namespace(*arrays: Any, backend: str | None = None) -> ModuleType:
    """The array namespace for ``arrays``: ``numpy``, ``cupy``, or the one an array-API
    array names (``__array_namespace__``).

    ``backend`` ("numpy" or "cupy") forces the choice; otherwise CuPy is chosen when any
    input is a CuPy array, an array-API array's own namespace when it is one, NumPy
    otherwise (scalars, lists). Mixing namespaces is an error.
    """
    if backend is not None:
        if backend == "numpy":
            return np
        if backend == "cupy":
            return _cupy()
        raise ValueError(f"backend must be 'numpy' or 'cupy', got {backend!r}")
    spaces = {space.__name__: space
              for space in (_namespace_of(a) for a in arrays if a is not None)}
    if len(spaces) > 1:
        raise TypeError(f"inputs mix arrays of {' and '.join(sorted(spaces))}; put them in "
                        f"one namespace (on one device) first")
    return next(iter(spaces.values()), np)


def dtype_name(dtype: Any, xp: ModuleType = np) -> str:
    """The standard name ("float32", "float64", ...) of a NumPy dtype or of a dtype object
    of the array-API namespace ``xp``."""
    try:
        return np.dtype(dtype).name
    except TypeError:
        names = {value: key for key, value in xp.__array_namespace_info__().dtypes().items()}
        return names[dtype]


def astype(a: Any, dtype: Any, copy: bool = True) -> Any:
    """``a`` converted to ``dtype`` (``a`` itself when ``copy`` is False and it already has
    it): the array's method where it has one, the namespace's ``astype`` otherwise."""
    if hasattr(a, "astype"):
        return a.astype(dtype, copy=copy)
    return namespace(a).astype(a, dtype, copy=copy)


def copy(a: Any) -> Any:
    """A copy of ``a`` in its own namespace (the array's method where it has one)."""
    if hasattr(a, "copy"):
        return a.copy()
    return namespace(a).asarray(a, copy=True)


def norm(a: Any) -> float:
    """The 2-norm of ``a`` flattened (the Frobenius norm of a matrix)."""
    xp = namespace(a)
    if is_ndarray(a):
        return float(xp.linalg.norm(a))
    return float(xp.linalg.vector_norm(a))


def check_float_array(a: Any, name: str, finite: bool = False) -> None:
    """Raise TypeError unless ``a`` is a 1-D float32 or float64 array; with ``finite``,
    ValueError when it holds a NaN or an infinity."""
    dtype = getattr(a, "dtype", None)
    if dtype is None or str(dtype) not in FLOAT_DTYPES:
        raise TypeError(
            f"{name} must be a float32 or float64 array, got "
            f"{'dtype ' + str(dtype) if dtype is not None else type(a).__name__}"
        )
    if getattr(a, "ndim", None) != 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {tuple(a.shape)}")
    if finite:
        xp = namespace(a)
        bad = int(xp.sum(xp.logical_not(xp.isfinite(a))))
        if bad:
            raise ValueError(f"{name} has {bad} non-finite entr{'y' if bad == 1 else 'ies'} "
                             f"(NaN or inf); the starting point must be finite")


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


def copy_to_host(a: Any, out: np.ndarray) -> np.ndarray:
    """Copy the device (or host) array ``a`` into the host buffer ``out`` (same shape and
    dtype; a pinned buffer makes the device-to-host copy a direct DMA). Returns ``out``
    once the copy is complete."""
    if is_cupy_array(a):
        a.get(out=out)
        synchronize(a)  # older CuPy copies asynchronously into pinned memory
    else:
        np.copyto(out, np.asarray(a))
    return out


def copy_from_host(host: np.ndarray, out: Any) -> Any:
    """Copy the host buffer ``host`` into the device (or host) array ``out`` and wait until
    the copy is complete, so that ``host`` may be reused at once. Returns ``out``."""
    if is_cupy_array(out):
        out.set(host)
        synchronize(out)
    else:
        out[...] = host
    return out


def empty_like(template: Any, shape: int | tuple[int, ...]) -> Any:
    """An uninitialised array of ``shape`` with ``template``'s dtype, namespace, device and
    array type."""
    return namespace(template).empty_like(template, shape=shape)


def empty_host(shape: int, dtype: Any, pinned: bool) -> np.ndarray:
    """A host buffer for staging device arrays: page-locked (pinned, through CuPy) when
    ``pinned``, so that copies to and from the device run at full bus speed."""
    if pinned:
        return importlib.import_module("cupyx").empty_pinned(shape, dtype=dtype)
    return np.empty(shape, dtype=dtype)


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
    if is_cupy_array(x):
        x += x.T.copy()
        x *= 0.5
        return x
    if not isinstance(x, np.ndarray):  # the array API: no copy() method, no aliasing rules
        x[...] = 0.5 * (x + x.T)
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
    x += alpha * (u[:, None] * u[None, :])
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


def matmul_into(a: Any, b: Any, out: Any) -> Any:
    """``out = a @ b`` (``out=`` for NumPy and CuPy: no temporary; an assignment for other
    namespaces, whose standard has no ``out``). Returns ``out``."""
    if is_ndarray(out):
        return namespace(out).matmul(a, b, out=out)
    out[...] = a @ b
    return out


def _blas_axpy(dtype: Any) -> Any:
    from scipy.linalg import blas

    return blas.daxpy if dtype == np.float64 else blas.saxpy
