"""hpcqn's distributed L-BFGS against SciPy's L-BFGS-B on the extended Rosenbrock problem.

For each size n it solves the same problem, from the same start and with the same
stopping rules (history 10, gtol 1e-5, SciPy's default ftol, maxiter 15000), with:

* SciPy's ``L-BFGS-B`` (serial, whole vector),
* ``hpcqn.minimize`` on one rank (``hpcqn.serial_comm()``, in this process),
* ``hpcqn.minimize`` on two MPI ranks: this script relaunches itself under
  ``mpiexec -n 2 ... --worker``.

Only the solve is timed (the ``scipy.optimize.minimize`` or ``hpcqn.minimize`` call,
after a barrier on MPI runs, the slowest rank's time); the table shows the median of
``--repeats`` runs and every ratio against SciPy measured in this one run. Every run has
one BLAS/OpenMP thread per process. For context it also measures a STREAM-style triad
bandwidth and the bandwidth implied by a simple traffic model of one hpcqn iteration.

Run from the repository root (about 2 minutes on two cores with the defaults)::

    python benchmarks/bench_minimize.py
    python benchmarks/bench_minimize.py --sizes 100000 --repeats 1 --json /tmp/bench.json
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
import json  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402
from dataclasses import asdict, dataclass  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
import scipy  # noqa: E402
import scipy.optimize  # noqa: E402
from common import Run, machine, triad_bandwidth  # noqa: E402

import hpcqn  # noqa: E402
from hpcqn.experiments.problems import make_problem  # noqa: E402

PROBLEM = "extended_rosenbrock"
HISTORY = 10
GTOL = 1e-5
FTOL = 2.220446049250313e-09  # SciPy's L-BFGS-B default (factr 1e7 times machine eps)
MAXITER = 15000
MPI_RANKS = 2
TRIAD_N = 10_000_000
TRIAD_REPEATS = 5




@dataclass
class Row:
    """The median of the repeats of one solver at one size, and its ratios to SciPy."""

    n: int
    solver: str
    ranks: int
    nit: int
    nfev: int
    fun: float
    seconds: float
    seconds_per_iter: float
    time_ratio: float  # seconds / SciPy's seconds
    per_iter_ratio: float  # seconds per iteration / SciPy's
    success: bool


def hpcqn_options() -> dict[str, Any]:
    return {"history": HISTORY, "gtol": GTOL, "ftol": FTOL, "maxiter": MAXITER}


def run_scipy(n: int, repeats: int) -> list[Run]:
    problem = make_problem(PROBLEM, n=n)
    options = {"maxcor": HISTORY, "gtol": GTOL, "ftol": FTOL, "maxiter": MAXITER}
    runs = []
    for _ in range(repeats):
        x0 = problem.x0()
        start = time.perf_counter()
        res = scipy.optimize.minimize(
            problem.value_and_grad, x0, jac=True, method="L-BFGS-B", options=options
        )
        seconds = time.perf_counter() - start
        runs.append(Run(res.nit, res.nfev, float(res.fun), seconds, bool(res.success)))
    return runs


def run_hpcqn_serial(n: int, repeats: int) -> list[Run]:
    comm = hpcqn.serial_comm()
    fun, x0 = make_problem(PROBLEM, n=n).distributed(comm)
    runs = []
    for _ in range(repeats):
        start = time.perf_counter()
        res = hpcqn.minimize(fun, x0, comm=comm, options=hpcqn_options())
        seconds = time.perf_counter() - start
        runs.append(Run(res.nit, res.nfev, float(res.fun), seconds, bool(res.success)))
    return runs


def run_hpcqn_mpi(n: int, repeats: int) -> list[Run]:
    """``repeats`` solves in ONE ``mpiexec`` launch of this script's worker mode."""
    mpiexec = shutil.which("mpiexec")
    if mpiexec is None:
        raise RuntimeError("mpiexec not found on PATH (pip install mpich mpi4py)")
    command = [
        mpiexec, "-n", str(MPI_RANKS), sys.executable, str(Path(__file__).resolve()),
        "--worker", "--sizes", str(n), "--repeats", str(repeats),
    ]
    done = subprocess.run(command, capture_output=True, text=True, env=os.environ.copy())
    if done.returncode != 0:
        raise RuntimeError(
            f"{' '.join(command)} failed with status {done.returncode}:\n{done.stderr}"
        )
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if len(lines) != repeats:
        raise RuntimeError(f"expected {repeats} result lines from the worker, got:\n{done.stdout}")
    return [Run(**json.loads(line)) for line in lines]


def worker(n: int, repeats: int) -> None:
    """Under mpiexec: solve ``repeats`` times; rank 0 prints one JSON line per solve."""
    comm = hpcqn.get_comm()  # COMM_WORLD, resolved once, outside the timed region
    fun, x0 = make_problem(PROBLEM, n=n).distributed(comm)
    for _ in range(repeats):
        comm.barrier()
        start = time.perf_counter()
        res = hpcqn.minimize(fun, x0, comm=comm, options=hpcqn_options())
        elapsed = time.perf_counter() - start
        seconds = comm.allreduce_named(maxes={"seconds": elapsed}).maxes["seconds"]
        if comm.rank == 0:
            run = Run(res.nit, res.nfev, float(res.fun), seconds, bool(res.success))
            print(json.dumps(asdict(run)), flush=True)


def summarise(n: int, solver: str, ranks: int, runs: list[Run], reference: Row | None) -> Row:
    """Median seconds over ``runs``; counts and f from the first (the runs are deterministic)."""
    seconds = statistics.median(run.seconds for run in runs)
    first = runs[0]
    per_iter = seconds / max(first.nit, 1)
    return Row(
        n=n, solver=solver, ranks=ranks, nit=first.nit, nfev=first.nfev, fun=first.fun,
        seconds=seconds, seconds_per_iter=per_iter,
        time_ratio=seconds / reference.seconds if reference else 1.0,
        per_iter_ratio=per_iter / reference.seconds_per_iter if reference else 1.0,
        success=all(run.success for run in runs),
    )


def history_bytes_per_iteration(n: int) -> int:
    """A lower bound on hpcqn's memory traffic per iteration: the 2(M+1) float64 history
    rows are read twice (forming the direction, and the new Gram products); the
    objective, the line search and temporaries are not counted."""
    return 2 * 2 * (HISTORY + 1) * 8 * n


def print_table(rows: list[Row]) -> None:
    print(
        "| n | solver | ranks | nit | nfev | f | seconds (median) | s/iter "
        "| time / SciPy | (s/iter) / SciPy |"
    )
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r.n} | {r.solver} | {r.ranks} | {r.nit} | {r.nfev} | {r.fun:.3e} "
            f"| {r.seconds:.3f} | {r.seconds_per_iter * 1e3:.2f} ms | {r.time_ratio:.2f} "
            f"| {r.per_iter_ratio:.2f} |"
        )
    for r in rows:
        if not r.success:
            print(f"note: {r.solver} on {r.ranks} rank(s) at n = {r.n} did not converge")


def print_bandwidth(rows: list[Row], triad: float) -> None:
    print(f"\nSTREAM-style triad (NumPy, 1 process, {TRIAD_N:.0e} float64, best of "
          f"{TRIAD_REPEATS}): {triad / 1e9:.2f} GB/s")
    print("hpcqn history traffic per iteration (lower bound: 2 passes over 2(M+1) rows):")
    for r in rows:
        if r.solver == "hpcqn":
            moved = history_bytes_per_iteration(r.n)
            rate = moved / r.seconds_per_iter
            print(
                f"  n {r.n}, {r.ranks} rank(s): {moved / 1e6:.0f} MB/iter, "
                f">= {rate / 1e9:.2f} GB/s in all ({rate / triad:.0%} of one core's triad)"
            )


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--sizes", type=lambda s: int(float(s)), nargs="+", default=[100_000, 1_000_000],
        help="problem sizes n (even; 1e5 notation accepted)",
    )
    parser.add_argument("--repeats", type=int, default=3, help="timed solves per configuration")
    parser.add_argument("--json", type=Path, help="also write the rows to this JSON file")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    if args.worker:
        for n in args.sizes:
            worker(n, args.repeats)
        return
    rows: list[Row] = []
    for n in args.sizes:
        print(f"n = {n}: SciPy L-BFGS-B, hpcqn on 1 rank, hpcqn on {MPI_RANKS} ranks "
              f"({args.repeats} repeat(s) each)", file=sys.stderr, flush=True)
        reference = summarise(n, "scipy L-BFGS-B", 1, run_scipy(n, args.repeats), None)
        rows.append(reference)
        rows.append(summarise(n, "hpcqn", 1, run_hpcqn_serial(n, args.repeats), reference))
        rows.append(summarise(n, "hpcqn", MPI_RANKS, run_hpcqn_mpi(n, args.repeats), reference))
    triad = triad_bandwidth(TRIAD_N, np.float64, TRIAD_REPEATS)
    description = machine()
    print(f"## hpcqn.minimize vs SciPy L-BFGS-B: {PROBLEM}, history {HISTORY}, gtol {GTOL}, "
          f"ftol {FTOL}, maxiter {MAXITER}; median of {args.repeats} repeat(s)\n")
    print(f"Machine: {description}\n")
    print_table(rows)
    print_bandwidth(rows, triad)
    if args.json:
        report = {"machine": description, "triad_bytes_per_second": triad,
                  "rows": [asdict(r) for r in rows]}
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
