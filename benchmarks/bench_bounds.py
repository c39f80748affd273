"""Bound-constrained hpcqn against PETSc TAO's BLMVM (and SciPy's L-BFGS-B) on two
MINPACK-2 membrane problems: elastic-plastic torsion and the obstacle problem.

For each problem (``--problems``: torsion, obstacle; see
:mod:`hpcqn.experiments.minpack2`) and size n (``--sizes``; an ``nx x nx`` grid with
``nx = round(sqrt(n))``: 32, 100, 316, 1000 for the default 1e3 ... 1e6) it solves the
same problem, from the same start (the problem's standard point) and with the same
stopping rule, with:

* ``hpcqn.minimize(..., bounds=(lo, hi))`` on one rank (``hpcqn.serial_comm()``, in this
  process) and on ``--ranks`` MPI ranks (this script relaunched under ``mpiexec -n P
  ... --worker``; the unknown split by grid rows, the objective exchanging one halo row
  with each neighbouring rank by ``Sendrecv``);
* TAO's ``blmvm`` on the same rank counts, when Debian's petsc4py is there
  (``benchmarks/tao_solve.py`` under ``mpiexec.openmpi`` and ``/usr/bin/python3``: see
  ``common.tao_available``; otherwise the table says it was skipped, and why). It calls
  the same Python objective (``Membrane.block``, loaded by path), halo rows by a PETSc
  scatter;
* SciPy's ``L-BFGS-B`` on the whole vector, once, for n up to ``--scipy-max-n``.

The stopping rule is TAO's ``gttol`` test: ``||P g(x)||_2 <= rtol ||P g(x0)||_2``
(``--rtol``, default 1e-5), ``P g`` the gradient with the variables held at a bound
zeroed (``x_i = lo_i`` and ``g_i > 0``, or ``x_i = hi_i`` and ``g_i < 0``): hpcqn's option
``gttol`` (``gtol`` and ``ftol`` 0), TAO's ``gttol`` (``gatol = grtol = 0``), SciPy through a
callback that raises ``StopIteration`` (``gtol`` and ``ftol`` 0; its extra work counts in
SciPy's time). History 5 for all (``--history``), maxiter and maxfun 100000.

Timing. ``--repeats`` rounds, each running hpcqn on 1 rank, TAO on 1 rank, hpcqn on P
ranks, TAO on P ranks in that order (interleaved, so that a change of the machine's load
hits all alike); medians over the rounds. Only the solve is timed, wall and CPU (after a
barrier; the slowest rank's time), and inside it the objective (the halo exchange and
the block's evaluation; the slowest rank's sum): ``own ms/it`` is ``(solve - objective)
/ nit``, the solver's own time per iteration. On a shared machine the CPU times are the
ones other processes' load disturbs least (wall time counts the waits for a core; with
more ranks than free cores, MPI's busy waiting counts in both). Every timed solve
follows an untimed one of 3 iterations in the same process (first-call costs out of the
timing). Counts come from the first round (the runs are deterministic). Each row also
gives f, ``||P g||_2 / ||P g0||_2`` of its final x (a variable within 64 ulps of a bound
counting as at it: TAO leaves some a few ulps inside) and ``max|x - x_ref|`` (against TAO
on 1 rank when it ran, else SciPy), every one computed on the whole vector; and the
ratios of time and own time per iteration to TAO's on the same rank count. One
BLAS/OpenMP thread per process. The machine's load average is printed before and after.

Run from the repository root::

    python benchmarks/bench_bounds.py --sizes 1e3 1e4 1e5 --repeats 5
    python benchmarks/bench_bounds.py --sizes 1e6 --repeats 1 --problems torsion
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
from common import (  # noqa: E402
    Run,
    TimedObjective,
    load_average,
    machine,
    run_tao,
    tao_available,
)

import hpcqn  # noqa: E402
from hpcqn.experiments.minpack2 import PROBLEMS, Membrane, make  # noqa: E402

HISTORY = 5
RTOL = 1e-5
MAXITER = 100_000
MAXFUN = 100_000
MPI_RANKS = 2
SIZES = [1_000, 10_000, 100_000, 1_000_000]
SCIPY_MAX_N = 100_000


@dataclass
class Row:
    """The medians over the rounds of one solver on one problem, size and rank count."""

    problem: str
    n: int
    nx: int
    ranks: int
    solver: str
    nit: int
    nfev: int
    seconds: float
    callback_seconds: float
    own_per_iteration: float  # (seconds - callback_seconds) / nit
    cpu_seconds: float
    own_cpu_per_iteration: float  # (cpu_seconds - callback_cpu_seconds) / nit
    fun: float
    pg_rel: float  # ||P g(x)||_2 / ||P g(x0)||_2, on the whole vector
    dx_ref: float  # max |x - x_ref|
    nactive: int  # variables at a bound
    time_ratio_tao: float | None  # seconds / TAO's on the same rank count
    own_ratio_tao: float | None  # own time per iteration / TAO's
    cpu_ratio_tao: float | None  # CPU seconds / TAO's
    own_cpu_ratio_tao: float | None  # own CPU time per iteration / TAO's
    success: bool
    message: str


def problem_for(name: str, n: int) -> Membrane:
    return make(name, max(1, round(math.sqrt(n))))


def free_gradient(x: np.ndarray, g: np.ndarray, lo: np.ndarray, hi: np.ndarray,
                  snap: float = 0.0) -> np.ndarray:
    """``P g``: ``g`` with the variables held at a bound zeroed (TAO's
    ``VecBoundGradientProjection``, hpcqn's free gradient); with ``snap`` > 0 a variable
    within ``snap * max(1, |bound|)`` of a bound counts as at it."""
    near_lo = x <= lo + snap * np.maximum(1.0, np.abs(lo))
    near_hi = x >= hi - snap * np.maximum(1.0, np.abs(hi))
    held = (near_lo & (g > 0)) | (near_hi & (g < 0))
    return np.where(held, 0.0, g)


# The final check of a solution: TAO's BLMVM leaves some variables a few ulps inside
# their bound (up to about ten seen, where its own test counted them held): a variable
# within 64 ulps of a bound counts as at it.
SNAP = 64 * float(np.finfo(np.float64).eps)


def pg_norm(problem: Membrane, x: np.ndarray, snap: float = 0.0) -> float:
    """``||P g(x)||_2`` on the whole vector."""
    lo, hi = problem.bounds()
    return float(np.linalg.norm(free_gradient(x, problem.fun_and_grad(x)[1], lo, hi, snap)))


def hpcqn_options(rtol: float, history: int) -> dict[str, Any]:
    return {"history": history, "gtol": 0.0, "gttol": rtol, "ftol": 0.0,
            "maxiter": MAXITER, "maxfun": MAXFUN}


# -- the solvers -------------------------------------------------------------------------
def run_scipy(problem: Membrane, rtol: float, history: int) -> tuple[Run, np.ndarray]:
    """SciPy's L-BFGS-B, stopped by a callback at the rule (the last evaluated gradient
    is that of the accepted point; it is recomputed only when it is not)."""
    lo, hi = problem.bounds()
    objective = TimedObjective(problem.fun_and_grad)
    last: dict[str, np.ndarray] = {}

    def fun(x: np.ndarray) -> tuple[float, np.ndarray]:
        f, g = objective(x)
        last["x"], last["g"] = x.copy(), g
        return f, g

    target = rtol * pg_norm(problem, problem.x0())

    def callback(intermediate_result: Any) -> None:
        x = intermediate_result.x
        g = last["g"] if np.array_equal(last.get("x"), x) else problem.fun_and_grad(x)[1]
        if np.linalg.norm(free_gradient(x, g, lo, hi)) <= target:
            raise StopIteration

    options = {"maxcor": history, "gtol": 0.0, "ftol": 0.0, "maxiter": MAXITER,
               "maxfun": MAXFUN}
    start, cpu = time.perf_counter(), time.process_time()
    res = scipy.optimize.minimize(fun, problem.x0(), jac=True, method="L-BFGS-B",
                                  bounds=scipy.optimize.Bounds(lo, hi), options=options,
                                  callback=callback)
    cpu = time.process_time() - cpu
    seconds = time.perf_counter() - start
    return Run(int(res.nit), int(res.nfev), float(res.fun), seconds, bool(res.status in (0, 99)),
               str(res.message), objective.seconds, cpu, objective.cpu_seconds), res.x


def run_hpcqn_serial(problem: Membrane, rtol: float, history: int) -> tuple[Run, np.ndarray]:
    comm = hpcqn.serial_comm()
    fun, x0, lo, hi = problem.distributed(comm)
    warm_up = {**hpcqn_options(rtol, history), "maxiter": 3}
    hpcqn.minimize(fun, x0.copy(), comm=comm, options=warm_up, bounds=(lo, hi))
    objective = TimedObjective(fun)
    start, cpu = time.perf_counter(), time.process_time()
    res = hpcqn.minimize(objective, x0.copy(), comm=comm, options=hpcqn_options(rtol, history),
                         bounds=(lo, hi))
    cpu = time.process_time() - cpu
    seconds = time.perf_counter() - start
    return Run(int(res.nit), int(res.nfev), float(res.fun), seconds, bool(res.success),
               str(res.message), objective.seconds, cpu, objective.cpu_seconds), \
        np.asarray(res.x)


def run_hpcqn_mpi(name: str, n: int, rtol: float, history: int,
                  ranks: int) -> tuple[Run, np.ndarray]:
    """One solve in an ``mpiexec`` launch of this script's worker mode; rank 0 writes the
    solution to a scratch file."""
    mpiexec = shutil.which("mpiexec")
    if mpiexec is None:
        raise RuntimeError("mpiexec not found on PATH (pip install mpich mpi4py)")
    with tempfile.TemporaryDirectory(prefix="bench_bounds_") as scratch:
        xout = Path(scratch) / "x.npy"
        command = [
            mpiexec, "-n", str(ranks), sys.executable, str(Path(__file__).resolve()),
            "--worker", "--problems", name, "--sizes", str(n), "--rtol", repr(rtol),
            "--history", str(history), "--xout", str(xout),
        ]
        done = subprocess.run(command, capture_output=True, text=True, env=os.environ.copy())
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} failed with status {done.returncode}:\n"
                               f"{done.stdout}\n{done.stderr}")
        lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
        return Run(**json.loads(lines[0])), np.load(xout)


def worker(name: str, n: int, rtol: float, history: int, xout: Path) -> None:
    """Under mpiexec: one solve; rank 0 prints its JSON line and saves the solution
    (gathered after the timed region) to ``xout``."""
    comm = hpcqn.get_comm()  # COMM_WORLD, resolved once, outside the timed region
    problem = problem_for(name, n)
    fun, x0, lo, hi = problem.distributed(comm)
    warm_up = {**hpcqn_options(rtol, history), "maxiter": 3}
    hpcqn.minimize(fun, x0.copy(), comm=comm, options=warm_up, bounds=(lo, hi))
    objective = TimedObjective(fun)
    layout = problem.layout(comm.size)
    comm.barrier()
    start, cpu = time.perf_counter(), time.process_time()
    res = hpcqn.minimize(objective, x0.copy(), comm=comm, options=hpcqn_options(rtol, history),
                         bounds=(lo, hi))
    cpu = time.process_time() - cpu
    elapsed = time.perf_counter() - start
    slowest = comm.allreduce_named(maxes={"seconds": elapsed, "callback": objective.seconds,
                                          "cpu": cpu,
                                          "callback_cpu": objective.cpu_seconds}).maxes
    x = comm.allgatherv(np.ascontiguousarray(res.x), list(layout.counts))
    if comm.rank == 0:
        run = Run(int(res.nit), int(res.nfev), float(res.fun), slowest["seconds"],
                  bool(res.success), str(res.message), slowest["callback"], slowest["cpu"],
                  slowest["callback_cpu"])
        print(json.dumps(asdict(run)), flush=True)
        np.save(xout, x)


def run_tao_membrane(problem: Membrane, name: str, rtol: float, history: int,
                     ranks: int) -> tuple[Run, np.ndarray]:
    """TAO BLMVM on ``ranks`` ranks (the grid rows split as hpcqn splits them)."""
    with tempfile.TemporaryDirectory(prefix="bench_bounds_tao_") as scratch:
        xout = Path(scratch) / "x.npy"
        rows = ",".join(map(str, problem.row_counts(ranks)))
        line = run_tao(ranks, ["--problem", name, "--n", str(problem.n), "--nx",
                               str(problem.nx), "--rows", rows, "--gttol", repr(rtol),
                               "--history", str(history), "--maxiter", str(MAXITER),
                               "--maxfun", str(MAXFUN), "--xout", str(xout), "--warm-up"])[0]
        return Run(line["nit"], line["nfev"], line["fun"], line["seconds"], line["success"],
                   line["message"], line["callback_seconds"], line["cpu_seconds"],
               line["callback_cpu_seconds"]), np.load(xout)


# -- the table -------------------------------------------------------------------------
def summarise(problem: Membrane, name: str, solver: str, ranks: int, runs: list[Run],
              x: np.ndarray, pg0: float, x_ref: np.ndarray | None) -> Row:
    lo, hi = problem.bounds()
    first = runs[0]
    return Row(
        problem=name, n=problem.n, nx=problem.nx, ranks=ranks, solver=solver,
        nit=first.nit, nfev=first.nfev,
        seconds=statistics.median(run.seconds for run in runs),
        callback_seconds=statistics.median(run.callback_seconds for run in runs),
        own_per_iteration=statistics.median(run.own_per_iteration for run in runs),
        cpu_seconds=statistics.median(run.cpu_seconds for run in runs),
        own_cpu_per_iteration=statistics.median(run.own_cpu_per_iteration for run in runs),
        fun=first.fun, pg_rel=pg_norm(problem, x, SNAP) / pg0,
        dx_ref=float(np.abs(x - x_ref).max()) if x_ref is not None else 0.0,
        nactive=int(np.count_nonzero((x <= lo) | (x >= hi))),
        time_ratio_tao=None, own_ratio_tao=None,
        cpu_ratio_tao=None, own_cpu_ratio_tao=None, success=all(run.success for run in runs),
        message=first.message,
    )


def print_table(rows: list[Row]) -> None:
    print("| problem | n | ranks | solver | nit | nfev | wall s | own wall ms/it "
          "| wall / TAO | own wall / TAO | CPU s | own CPU ms/it | CPU / TAO | own CPU / TAO "
          "| f | P g rel | max abs(x - x_ref) | at bound |")
    print("|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:"
          "|---:|")

    def ratio(value: float | None) -> str:
        return "-" if value is None else f"{value:.2f}"

    for r in rows:
        print(f"| {r.problem} | {r.n} | {r.ranks} | {r.solver} | {r.nit} | {r.nfev} "
              f"| {r.seconds:.4f} | {r.own_per_iteration * 1e3:.3f} "
              f"| {ratio(r.time_ratio_tao)} | {ratio(r.own_ratio_tao)} "
              f"| {r.cpu_seconds:.4f} | {r.own_cpu_per_iteration * 1e3:.3f} "
              f"| {ratio(r.cpu_ratio_tao)} | {ratio(r.own_cpu_ratio_tao)} | {r.fun:.10e} "
              f"| {r.pg_rel:.2e} | {r.dx_ref:.2e} | {r.nactive} |")
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
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds")
    parser.add_argument("--rtol", type=float, default=RTOL,
                        help="stop at ||P g||_2 <= rtol ||P g0||_2 (default %(default)g)")
    parser.add_argument("--history", type=int, default=HISTORY)
    parser.add_argument("--ranks", type=int, default=MPI_RANKS,
                        help="the MPI rank count besides 1 (default %(default)s)")
    parser.add_argument("--scipy-max-n", type=lambda s: int(float(s)), default=SCIPY_MAX_N,
                        help="run SciPy up to this n (default %(default)s)")
    parser.add_argument("--no-tao", action="store_true", help="skip TAO")
    parser.add_argument("--json", type=Path, help="also write the rows to this JSON file")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--xout", type=Path, help=argparse.SUPPRESS)
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    if args.worker:
        worker(args.problems[0], args.sizes[0], args.rtol, args.history, args.xout)
        return
    with_tao, tao_line = (False, "--no-tao") if args.no_tao else tao_available()
    notes = [f"TAO BLMVM: {'ran' if with_tao else 'skipped'} ({tao_line})",
             f"load average at the start: {load_average()}"]
    rank_counts = [1] if args.ranks == 1 else [1, args.ranks]
    rows: list[Row] = []
    for name in args.problems:
        for n in args.sizes:
            problem = problem_for(name, n)
            pg0 = pg_norm(problem, problem.x0())
            print(f"{name}, n = {problem.n} ({problem.nx} x {problem.nx}): {args.repeats} "
                  f"round(s) of hpcqn{' and TAO' if with_tao else ''} on ranks {rank_counts}",
                  file=sys.stderr, flush=True)
            runs: dict[tuple[str, int], list[Run]] = {}
            solutions: dict[tuple[str, int], np.ndarray] = {}
            for _ in range(args.repeats):
                for ranks in rank_counts:
                    if ranks == 1:
                        run, x = run_hpcqn_serial(problem, args.rtol, args.history)
                    else:
                        run, x = run_hpcqn_mpi(name, n, args.rtol, args.history, ranks)
                    runs.setdefault(("hpcqn", ranks), []).append(run)
                    solutions[("hpcqn", ranks)] = x
                    if with_tao:
                        run, x = run_tao_membrane(problem, name, args.rtol, args.history,
                                                  ranks)
                        runs.setdefault(("TAO blmvm", ranks), []).append(run)
                        solutions[("TAO blmvm", ranks)] = x
            if problem.n <= args.scipy_max_n:
                run, x = run_scipy(problem, args.rtol, args.history)
                runs[("scipy L-BFGS-B", 1)], solutions[("scipy L-BFGS-B", 1)] = [run], x
            reference = solutions.get(("TAO blmvm", 1), solutions.get(("scipy L-BFGS-B", 1)))
            group = [summarise(problem, name, solver, ranks, found, solutions[(solver, ranks)],
                               pg0, reference)
                     for (solver, ranks), found in sorted(runs.items(),
                                                          key=lambda item: item[0][1])]
            for row in group:
                tao = next((r for r in group if r.solver == "TAO blmvm" and r.ranks == row.ranks),
                           None)
                if tao is not None:
                    row.time_ratio_tao = row.seconds / tao.seconds
                    row.own_ratio_tao = row.own_per_iteration / tao.own_per_iteration
                    row.cpu_ratio_tao = row.cpu_seconds / tao.cpu_seconds
                    row.own_cpu_ratio_tao = row.own_cpu_per_iteration / tao.own_cpu_per_iteration
            rows.extend(group)
    notes.append(f"load average at the end: {load_average()}")
    description = machine()
    print(f"## Bound-constrained L-BFGS: MINPACK-2 torsion and obstacle; history "
          f"{args.history}, stop at ||P g||_2 <= {args.rtol:g} ||P g0||_2; median of "
          f"{args.repeats} interleaved round(s)\n")
    print(f"Machine: {description}\n")
    for note in notes:
        print(note)
    print()
    print_table(rows)
    if args.json:
        report = {
            "machine": description,
            "settings": {"history": args.history, "rtol": args.rtol, "maxiter": MAXITER,
                         "maxfun": MAXFUN, "repeats": args.repeats, "ranks": rank_counts},
            "notes": notes,
            "rows": [asdict(r) for r in rows],
        }
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
