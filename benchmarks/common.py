"""What the benchmark scripts share: the machine line, a STREAM-style triad, a timed
objective and the launcher of the TAO comparison (``tao_solve.py``)."""

from __future__ import annotations

import glob
import json
import os
import platform
import shutil
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
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
    """One timed solve (bench_minimize.py, bench_bounds.py): wall and CPU seconds of the
    solve, and of the objective inside it (``callback_*``), the slowest rank's each."""

    nit: int
    nfev: int
    fun: float
    seconds: float
    success: bool
    message: str = ""
    callback_seconds: float = 0.0
    cpu_seconds: float = 0.0
    callback_cpu_seconds: float = 0.0

    @property
    def own_per_iteration(self) -> float:
        """The solver's own wall seconds per iteration: the solve less the objective."""
        return (self.seconds - self.callback_seconds) / max(self.nit, 1)

    @property
    def own_cpu_per_iteration(self) -> float:
        """The solver's own CPU seconds per iteration (this process's CPU time: on a
        shared machine the measure that other processes' load disturbs least)."""
        return (self.cpu_seconds - self.callback_cpu_seconds) / max(self.nit, 1)


def load_average() -> str:
    """The 1-, 5- and 15-minute load averages, as ``uptime`` prints them."""
    try:
        return " ".join(f"{value:.2f}" for value in os.getloadavg())
    except OSError:  # pragma: no cover - no /proc/loadavg
        return "unknown"


class TimedObjective:
    """``fun`` counting its calls and the seconds spent in them, wall and CPU (the
    objective's own time, subtracted from a solve's time to give the solver's own)."""

    def __init__(self, fun: Callable[[Any], tuple[Any, Any]]):
        self.fun = fun
        self.calls = 0
        self.seconds = 0.0
        self.cpu_seconds = 0.0

    def __call__(self, x: Any) -> tuple[Any, Any]:
        start, cpu = time.perf_counter(), time.process_time()
        try:
            return self.fun(x)
        finally:
            self.cpu_seconds += time.process_time() - cpu
            self.seconds += time.perf_counter() - start
            self.calls += 1


# -- PETSc TAO, outside hpcqn's environment ----------------------------------------------
# TAO runs under Debian's python3-petsc4py (PETSc 3.18, Open MPI), a separate Python with
# NumPy and petsc4py only; these name it, its launcher and the side script.
TAO_PYTHON = os.environ.get("TAO_PYTHON", "/usr/bin/python3")
TAO_MPIEXEC = os.environ.get("TAO_MPIEXEC", "mpiexec.openmpi")
TAO_SCRIPT = Path(__file__).resolve().with_name("tao_solve.py")


def tao_environment() -> dict[str, str]:
    """The environment of a TAO launch: one thread per process, ``PETSC_DIR`` (given, or
    Debian's ``/usr/lib/petscdir/petsc*/*-real``), Open MPI allowed to run as root, and
    Open MPI's ranks yielding the core while they wait (``mpi_yield_when_idle``, unless
    set): on a machine whose cores other processes share, Open MPI's default spinning
    stalls every collective while the other rank waits for a core (measured: TAO on 2
    ranks, n = 1e4, 10-25 s instead of 0.6-2 s wall), which is no measure of TAO."""
    env = os.environ.copy()
    for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        env[name] = "1"
    env.setdefault("OMPI_MCA_mpi_yield_when_idle", "1")
    if "PETSC_DIR" not in env:
        found = sorted(glob.glob("/usr/lib/petscdir/petsc*/*-real"))
        if found:
            env["PETSC_DIR"] = found[-1]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        env["OMPI_ALLOW_RUN_AS_ROOT"] = env["OMPI_ALLOW_RUN_AS_ROOT_CONFIRM"] = "1"
    return env


def tao_available() -> tuple[bool, str]:
    """Whether TAO can run (the launcher is on PATH and petsc4py imports in
    :data:`TAO_PYTHON`), and a line saying what was found or why not."""
    if shutil.which(TAO_MPIEXEC) is None:
        return False, f"{TAO_MPIEXEC} not found (apt-get install python3-petsc4py)"
    probe = ("import petsc4py, sys; petsc4py.init(sys.argv[:1]); from petsc4py import PETSc; "
             "print('PETSc', '.'.join(map(str, PETSc.Sys.getVersion())), 'petsc4py', "
             "petsc4py.__version__)")
    try:
        done = subprocess.run([TAO_PYTHON, "-c", probe], capture_output=True, text=True,
                              env=tao_environment(), timeout=120)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return False, f"{TAO_PYTHON}: {exc}"
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["failed"])[-1]
        return False, f"{TAO_PYTHON} cannot import petsc4py ({last})"
    return True, f"{done.stdout.strip()} ({TAO_PYTHON} under {TAO_MPIEXEC})"


def run_tao(ranks: int, arguments: list[str]) -> list[dict[str, Any]]:
    """``tao_solve.py`` on ``ranks`` Open MPI ranks with ``arguments``; its JSON lines."""
    command = [TAO_MPIEXEC, "--bind-to", "none", "-n", str(ranks), TAO_PYTHON,
               str(TAO_SCRIPT), *arguments]
    done = subprocess.run(command, capture_output=True, text=True, env=tao_environment())
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed with status {done.returncode}:\n"
                           f"{done.stdout}\n{done.stderr}")
    return [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
