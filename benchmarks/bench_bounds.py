"""Bound-constrained hpcqn against SciPy's L-BFGS-B (and TAO's BLMVM) on two MINPACK-2
membrane problems: elastic-plastic torsion and the obstacle problem.

For each problem (``--problems``: torsion, obstacle; see
:mod:`hpcqn.experiments.minpack2`) and size n (``--sizes``; an ``nx x nx`` grid with
``nx = round(sqrt(n))``: 100, 316, 1000 for the default 1e4, 1e5, 1e6) it solves the same
problem, from the same start (the problem's standard point) and with the same stopping
rule, with:

* SciPy's ``L-BFGS-B`` (``maxcor`` 10) on the whole vector, bounds as ``Bounds(lo, hi)``;
* ``hpcqn.minimize(..., bounds=(lo, hi))`` on one rank (``hpcqn.serial_comm()``, in this
  process);
* ``hpcqn.minimize`` on two MPI ranks: this script relaunches itself under
  ``mpiexec -n 2 ... --worker``; the unknown is split by grid rows and the objective
  exchanges one halo row with the neighbouring rank (``Sendrecv``);
* TAO's ``blmvm`` through petsc4py on one rank, when ``import petsc4py`` works (else the
  table says it was skipped, and why).

The stopping rule. The gradients of these discretisations scale with the cell area
``h^2``, so an absolute tolerance means something different at every size; every solver
stops at ``max|pg(x)| <= rtol * max|pg(x0)|`` (``--rtol``, default 1e-5), with
``pg(x) = x - clip(x - g(x), lo, hi)`` the projected gradient of L-BFGS-B (SciPy's
``gtol``, hpcqn's ``gtol``, TAO through a convergence test of that rule), history 10,
``ftol = 0`` (SciPy and hpcqn then also stop when f does not decrease at all: the
rounding floor), maxiter and maxfun 100000. ``rtol = 1e-6`` reaches that rounding floor
for the obstacle problem from n = 1e5 on (the runs stop on "no decrease" instead).

Only the solve is timed (the ``scipy.optimize.minimize``, ``hpcqn.minimize`` or
``tao.solve`` call; on MPI runs after a barrier, the slowest rank's time); the table
shows the median of ``--repeats`` runs (counts from the first: the runs are
deterministic) and, per row: nit, nfev, seconds, f, ``max|x - x_scipy|``, the final
``max|pg| / max|pg(x0)|`` (every row's x is checked on the whole vector), the number of
variables at a bound, and the nfev and time ratios against SciPy (and TAO when present),
all measured in this one run. One BLAS/OpenMP thread per process.

Run from the repository root::

    python benchmarks/bench_bounds.py                      # 1e4, 1e5, 1e6: long
    python benchmarks/bench_bounds.py --sizes 10000 --repeats 1     # seconds
    python benchmarks/bench_bounds.py --sizes 1e5 --problems obstacle --json /tmp/b.json
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

# One thread per process, set before NumPy loads its BLAS (inherited by mpiexec's ranks).
for _name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_name, "1")
# Import hpcqn from this checkout, also when it is not installed.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse  # noqa: E402
import inspect  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from dataclasses import asdict, dataclass  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
import scipy.optimize  # noqa: E402
from common import Run, machine  # noqa: E402

import hpcqn  # noqa: E402
from hpcqn.experiments.minpack2 import PROBLEMS, Membrane, make  # noqa: E402

HISTORY = 10
RTOL = 1e-5
FTOL = 0.0
MAXITER = 100_000
MAXFUN = 100_000
MPI_RANKS = 2
SIZES = [10_000, 100_000, 1_000_000]




@dataclass
class Row:
    """The median of the repeats of one solver on one problem and size."""

    problem: str
    n: int
    nx: int
    ranks: int
    solver: str
    nit: int
    nfev: int
    seconds: float
    fun: float
    dx_scipy: float  # max |x - x_scipy|
    pg_rel: float  # max |pg(x)| / max |pg(x0)|, on the whole vector
    nactive: int  # variables at a bound
    nfev_ratio: float  # nfev / SciPy's
    time_ratio: float  # seconds / SciPy's
    time_ratio_tao: float | None  # seconds / TAO's, when TAO ran
    success: bool
    message: str


def problem_for(name: str, n: int) -> Membrane:
    return make(name, max(1, round(math.sqrt(n))))


def projected_gradient(x: np.ndarray, g: np.ndarray, lo: np.ndarray,
                       hi: np.ndarray) -> np.ndarray:
    """L-BFGS-B's projected gradient: ``x - clip(x - g, lo, hi)``."""
    return x - np.clip(x - g, lo, hi)


def start_pg(problem: Membrane) -> float:
    """``max|pg(x0)|`` on the whole vector."""
    lo, hi = problem.bounds()
    x0 = problem.x0()
    return float(np.abs(projected_gradient(x0, problem.fun_and_grad(x0)[1], lo, hi)).max())


def hpcqn_has_bounds() -> bool:
    return "bounds" in inspect.signature(hpcqn.minimize).parameters


def hpcqn_options(gtol: float) -> dict[str, Any]:
    return {"history": HISTORY, "gtol": gtol, "ftol": FTOL, "maxiter": MAXITER,
            "maxfun": MAXFUN}


# -- the solvers -------------------------------------------------------------------------
def run_scipy(problem: Membrane, gtol: float, repeats: int) -> tuple[list[Run], np.ndarray]:
    lo, hi = problem.bounds()
    bounds = scipy.optimize.Bounds(lo, hi)
    options = {"maxcor": HISTORY, "gtol": gtol, "ftol": FTOL, "maxiter": MAXITER,
               "maxfun": MAXFUN}
    runs, x = [], None
    for _ in range(repeats):
        x0 = problem.x0()
        start = time.perf_counter()
        res = scipy.optimize.minimize(problem.fun_and_grad, x0, jac=True, method="L-BFGS-B",
                                      bounds=bounds, options=options)
        seconds = time.perf_counter() - start
        runs.append(Run(int(res.nit), int(res.nfev), float(res.fun), seconds,
                        bool(res.success), str(res.message)))
        x = res.x
    return runs, x


def run_hpcqn_serial(problem: Membrane, gtol: float,
                     repeats: int) -> tuple[list[Run], np.ndarray]:
    comm = hpcqn.serial_comm()
    fun, x0, lo, hi = problem.distributed(comm)
    runs, x = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        res = hpcqn.minimize(fun, x0.copy(), comm=comm, options=hpcqn_options(gtol),
                             bounds=(lo, hi))
        seconds = time.perf_counter() - start
        runs.append(Run(int(res.nit), int(res.nfev), float(res.fun), seconds,
                        bool(res.success), str(res.message)))
        x = np.asarray(res.x)
    return runs, x


def run_hpcqn_mpi(name: str, n: int, rtol: float,
                  repeats: int) -> tuple[list[Run], np.ndarray]:
    """``repeats`` solves in ONE ``mpiexec`` launch of this script's worker mode; rank 0
    writes the last solution to a scratch file."""
    mpiexec = shutil.which("mpiexec")
    if mpiexec is None:
        raise RuntimeError("mpiexec not found on PATH (pip install mpich mpi4py)")
    with tempfile.TemporaryDirectory(prefix="bench_bounds_") as scratch:
        xout = Path(scratch) / "x.npy"
        command = [
            mpiexec, "-n", str(MPI_RANKS), sys.executable, str(Path(__file__).resolve()),
            "--worker", "--problems", name, "--sizes", str(n), "--repeats", str(repeats),
            "--rtol", repr(rtol), "--xout", str(xout),
        ]
        done = subprocess.run(command, capture_output=True, text=True, env=os.environ.copy())
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} failed with status {done.returncode}:\n"
                               f"{done.stdout}\n{done.stderr}")
        lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
        if len(lines) != repeats:
            raise RuntimeError(f"expected {repeats} result lines from the worker, got:\n"
                               f"{done.stdout}\n{done.stderr}")
        return [Run(**json.loads(line)) for line in lines], np.load(xout)


def worker(name: str, n: int, rtol: float, repeats: int, xout: Path) -> None:
    """Under mpiexec: solve ``repeats`` times; rank 0 prints one JSON line per solve and
    saves the last solution (gathered after the timed region) to ``xout``."""
    comm = hpcqn.get_comm()  # COMM_WORLD, resolved once, outside the timed region
    problem = problem_for(name, n)
    gtol = rtol * start_pg(problem)
    fun, x0, lo, hi = problem.distributed(comm)
    layout = problem.layout(comm.size)
    res = None
    for _ in range(repeats):
        comm.barrier()
        start = time.perf_counter()
        res = hpcqn.minimize(fun, x0.copy(), comm=comm, options=hpcqn_options(gtol),
                             bounds=(lo, hi))
        elapsed = time.perf_counter() - start
        seconds = comm.allreduce_named(maxes={"seconds": elapsed}).maxes["seconds"]
        if comm.rank == 0:
            run = Run(int(res.nit), int(res.nfev), float(res.fun), seconds,
                      bool(res.success), str(res.message))
            print(json.dumps(asdict(run)), flush=True)
    x = comm.allgatherv(np.ascontiguousarray(res.x), list(layout.counts))
    if comm.rank == 0:
        np.save(xout, x)


def tao_available() -> tuple[bool, str]:
    """Whether petsc4py imports, and a line saying what was found or why not."""
    try:
        import petsc4py

        petsc4py.init(sys.argv[:1])
        from petsc4py import PETSc
    except Exception as exc:  # ImportError, or a PETSc that fails to initialise
        return False, f"{type(exc).__name__}: {exc}"
    version = ".".join(map(str, PETSc.Sys.getVersion()))
    return True, f"PETSc {version}, petsc4py {petsc4py.__version__}"


def run_tao(problem: Membrane, gtol: float, repeats: int) -> tuple[list[Run], np.ndarray]:
    """TAO BLMVM on one process (``COMM_SELF``), stopping on the same projected-gradient
    rule (a user convergence test; TAO's own tolerances off)."""
    from petsc4py import PETSc

    lo, hi = problem.bounds()
    comm = PETSc.COMM_SELF
    xl = PETSc.Vec().createWithArray(lo.copy(), comm=comm)
    xu = PETSc.Vec().createWithArray(hi.copy(), comm=comm)
    reason = PETSc.TAO.ConvergedReason
    count = {"nfev": 0}

    def objgrad(tao: Any, X: Any, G: Any) -> float:
        count["nfev"] += 1
        f, g = problem.fun_and_grad(X.getArray(readonly=True))
        G.setArray(g)
        return f

    def converged(tao: Any) -> None:
        gradient = tao.getGradient()
        gradient = gradient[0] if isinstance(gradient, tuple) else gradient
        xk = tao.getSolution().getArray(readonly=True)
        pg = projected_gradient(xk, gradient.getArray(readonly=True), lo, hi)
        if np.abs(pg).max() <= gtol:
            tao.setConvergedReason(reason.CONVERGED_USER)
        elif tao.getIterationNumber() >= MAXITER:
            tao.setConvergedReason(reason.DIVERGED_MAXITS)
        elif count["nfev"] >= MAXFUN:
            tao.setConvergedReason(reason.DIVERGED_MAXFCN)
        else:
            tao.setConvergedReason(reason.CONTINUE_ITERATING)

    runs, x = [], None
    for _ in range(repeats):
        count["nfev"] = 0
        X = PETSc.Vec().createWithArray(problem.x0(), comm=comm)
        G = X.duplicate()
        tao = PETSc.TAO().create(comm=comm)
        tao.setType("blmvm")
        tao.setSolution(X)
        tao.setObjectiveGradient(objgrad, G)
        tao.setVariableBounds((xl, xu))
        tao.setTolerances(gatol=0.0, grtol=0.0, gttol=0.0)
        tao.setMaximumIterations(MAXITER)
        tao.setMaximumFunctionEvaluations(MAXFUN)
        tao.setConvergenceTest(converged)
        tao.setFromOptions()
        start = time.perf_counter()
        tao.solve()
        seconds = time.perf_counter() - start
        code = int(tao.getConvergedReason())
        names = {int(getattr(reason, k)): k for k in dir(reason) if k.isupper()}
        x = X.getArray(readonly=True).copy()
        f = problem.fun_and_grad(x)[0]
        runs.append(Run(int(tao.getIterationNumber()), count["nfev"], float(f), seconds,
                        code > 0, names.get(code, str(code))))
        tao.destroy()
        G.destroy()
        X.destroy()
    return runs, x


# -- the table -------------------------------------------------------------------------
def summarise(problem: Membrane, name: str, solver: str, ranks: int, runs: list[Run],
              x: np.ndarray, pg0: float, x_ref: np.ndarray | None,
              reference: Row | None) -> Row:
    lo, hi = problem.bounds()
    pg = projected_gradient(x, problem.fun_and_grad(x)[1], lo, hi)
    seconds = statistics.median(run.seconds for run in runs)
    first = runs[0]
    return Row(
        problem=name, n=problem.n, nx=problem.nx, ranks=ranks, solver=solver,
        nit=first.nit, nfev=first.nfev, seconds=seconds, fun=first.fun,
        dx_scipy=float(np.abs(x - x_ref).max()) if x_ref is not None else 0.0,
        pg_rel=float(np.abs(pg).max() / pg0),
        nactive=int(np.count_nonzero((x <= lo) | (x >= hi))),
        nfev_ratio=first.nfev / reference.nfev if reference else 1.0,
        time_ratio=seconds / reference.seconds if reference else 1.0,
        time_ratio_tao=None, success=all(run.success for run in runs),
        message=first.message,
    )


def print_table(rows: list[Row], tao: bool) -> None:
    tao_head = " | time / TAO" if tao else ""
    print("| problem | n | ranks | solver | nit | nfev | seconds (median) | f "
          f"| max abs(x - x_scipy) | max abs(pg) / pg0 | at bound | nfev / SciPy "
          f"| time / SciPy{tao_head} |")
    print("|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
          + ("---:|" if tao else ""))
    for r in rows:
        tao_cell = ""
        if tao:
            tao_cell = (" | -" if r.time_ratio_tao is None else f" | {r.time_ratio_tao:.2f}")
        print(f"| {r.problem} | {r.n} | {r.ranks} | {r.solver} | {r.nit} | {r.nfev} "
              f"| {r.seconds:.3f} | {r.fun:.10e} | {r.dx_scipy:.2e} | {r.pg_rel:.2e} "
              f"| {r.nactive} | {r.nfev_ratio:.2f} | {r.time_ratio:.2f}{tao_cell} |")
    for r in rows:
        if not r.success:
            print(f"note: {r.solver} on {r.ranks} rank(s), {r.problem} n = {r.n}: "
                  f"{r.message}")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--sizes", type=lambda s: int(float(s)), nargs="+", default=SIZES,
        help="problem sizes n (an nx x nx grid, nx = round(sqrt(n)); 1e5 notation accepted)",
    )
    parser.add_argument("--problems", nargs="+", default=list(PROBLEMS),
                        choices=list(PROBLEMS), help="which problems (default: both)")
    parser.add_argument("--repeats", type=int, default=3, help="timed solves per configuration")
    parser.add_argument("--rtol", type=float, default=RTOL,
                        help="stop at max|pg| <= rtol * max|pg(x0)| (default %(default)g)")
    parser.add_argument("--json", type=Path, help="also write the rows to this JSON file")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--xout", type=Path, help=argparse.SUPPRESS)
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    if args.worker:
        worker(args.problems[0], args.sizes[0], args.rtol, args.repeats, args.xout)
        return
    with_hpcqn = hpcqn_has_bounds()
    with_tao, tao_line = tao_available()
    notes = []
    if not with_hpcqn:
        notes.append("hpcqn: skipped, this hpcqn.minimize has no `bounds` parameter")
    notes.append(f"TAO BLMVM: {'ran' if with_tao else 'skipped'} ({tao_line})")
    rows: list[Row] = []
    for name in args.problems:
        for n in args.sizes:
            problem = problem_for(name, n)
            pg0 = start_pg(problem)
            gtol = args.rtol * pg0
            print(f"{name}, n = {problem.n} ({problem.nx} x {problem.nx}): gtol {gtol:.3e}; "
                  f"SciPy{', hpcqn on 1 and 2 ranks' if with_hpcqn else ''}"
                  f"{', TAO' if with_tao else ''} ({args.repeats} repeat(s) each)",
                  file=sys.stderr, flush=True)
            runs, x_ref = run_scipy(problem, gtol, args.repeats)
            reference = summarise(problem, name, "scipy L-BFGS-B", 1, runs, x_ref, pg0,
                                  x_ref, None)
            group = [reference]
            if with_hpcqn:
                runs, x = run_hpcqn_serial(problem, gtol, args.repeats)
                group.append(summarise(problem, name, "hpcqn", 1, runs, x, pg0, x_ref,
                                       reference))
                runs, x = run_hpcqn_mpi(name, n, args.rtol, args.repeats)
                group.append(summarise(problem, name, "hpcqn", MPI_RANKS, runs, x, pg0,
                                       x_ref, reference))
            if with_tao:
                runs, x = run_tao(problem, gtol, args.repeats)
                tao_row = summarise(problem, name, "TAO blmvm", 1, runs, x, pg0, x_ref,
                                    reference)
                group.append(tao_row)
                for row in group:
                    row.time_ratio_tao = row.seconds / tao_row.seconds
            rows.extend(group)
    description = machine()
    print(f"## Bound-constrained L-BFGS: MINPACK-2 torsion and obstacle; history {HISTORY}, "
          f"stop at max|pg| <= {args.rtol:g} max|pg(x0)|, ftol {FTOL:g}, maxiter {MAXITER}; "
          f"median of {args.repeats} repeat(s)\n")
    print(f"Machine: {description}\n")
    for note in notes:
        print(note)
    print()
    print_table(rows, with_tao)
    if args.json:
        report = {
            "machine": description,
            "settings": {"history": HISTORY, "rtol": args.rtol, "ftol": FTOL,
                         "maxiter": MAXITER, "maxfun": MAXFUN, "repeats": args.repeats,
                         "mpi_ranks": MPI_RANKS},
            "notes": notes,
            "rows": [asdict(r) for r in rows],
        }
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
