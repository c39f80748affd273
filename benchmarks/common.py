"""What the benchmark scripts share: the machine line and a STREAM-style triad."""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy

import hpcqn

_TRIAD_ARRAYS: dict[tuple[int, str], tuple[np.ndarray, np.ndarray, np.ndarray]] = {}


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def machine(extra: str = "") -> str:
    """CPU, core count, library versions, MPI library and thread settings, in one line;
    ``extra`` (e.g. torch's version) is added after the libraries."""
    from hpcqn.comm import library_version

    mpi_library = library_version() or "no mpi4py"
    threads = "/".join(os.environ.get(name, "unset") for name in
                       ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"))
    return (
        f"{cpu_model()}, {os.cpu_count()} cores | Python {platform.python_version()}, "
        f"NumPy {np.__version__}, SciPy {scipy.__version__}, hpcqn {hpcqn.__version__}, "
        f"{extra + ', ' if extra else ''}{mpi_library} | OMP/OPENBLAS/MKL threads {threads}"
    )


def triad_bandwidth(n: int, dtype: Any = np.float64, repeats: int = 5) -> float:
    """Bytes per second of ``a = b + s*c`` on ``n`` entries of ``dtype``, best of
    ``repeats``, counted as STREAM does (3 arrays). NumPy makes two passes (``a = s*c``,
    then ``a += b``), so this is below what a fused STREAM triad would report."""
    key = (n, np.dtype(dtype).name)
    if key not in _TRIAD_ARRAYS:
        rng = np.random.default_rng(0)
        b, c = rng.random(n).astype(dtype), rng.random(n).astype(dtype)
        _TRIAD_ARRAYS[key] = (np.empty_like(b), b, c)
    a, b, c = _TRIAD_ARRAYS[key]
    scalar = np.dtype(dtype).type(3.0)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        np.multiply(c, scalar, out=a)
        a += b
        best = min(best, time.perf_counter() - start)
    return 3 * np.dtype(dtype).itemsize * n / best


def forget_triad(n: int, dtype: Any = np.float64) -> None:
    """Free the arrays kept for :func:`triad_bandwidth` at this size."""
    _TRIAD_ARRAYS.pop((n, np.dtype(dtype).name), None)


def history_products_timer(
    blocks: list[tuple[np.ndarray, np.ndarray, np.ndarray]], coeffs: np.ndarray
) -> Callable[[], float]:
    """A timer of the two history products of an mL-BFGS step alone: for every block's
    ``(vectors, g, out)``, ``vectors @ g`` and ``coeffs @ vectors``; returns seconds."""

    def run() -> float:
        start = time.perf_counter()
        for vectors, g, out in blocks:
            _ = vectors @ g
            np.matmul(coeffs, vectors, out=out)
        return time.perf_counter() - start

    return run


@dataclass
class Run:
    """One timed solve (bench_minimize.py, bench_bounds.py)."""

    nit: int
    nfev: int
    fun: float
    seconds: float
    success: bool
    message: str = ""
