"""hpcqn's distributed L-BFGS against PETSc TAO's LMVM (and SciPy's L-BFGS-B) on the
separable Moré-Garbow-Hillstrom functions: extended Rosenbrock, Powell and Wood.

For each function (``--problems``; :mod:`hpcqn.experiments.mgh`) and size n (``--sizes``,
default 1e3 ... 1e6) it solves the same problem, from the same start and with the same
stopping rule, with:

* ``hpcqn.minimize`` on one rank (``hpcqn.serial_comm()``, in this process) and on
  ``--ranks`` MPI ranks (this script relaunched under ``mpiexec -n P ... --worker``; each
  rank evaluates its slice of whole blocks, no communication in the objective);
* TAO's ``lmvm`` on the same rank counts, when Debian's petsc4py is there
  (``benchmarks/tao_solve.py`` under ``mpiexec.openmpi`` and ``/usr/bin/python3``, the same
  Python objective loaded by path; otherwise the table says it was skipped, and why);
* SciPy's ``L-BFGS-B`` on the whole vector, once, for n up to ``--scipy-max-n``.

The stopping rule is TAO's ``gttol`` test, ``||g(x)||_2 <= rtol ||g(x0)||_2`` (``--rtol``,
default 1e-7): hpcqn's option ``gttol`` (``gtol`` and ``ftol`` 0), TAO's ``gttol``
(``gatol = grtol = 0``), SciPy through a callback that raises ``StopIteration``. History 5
(``--history``), maxiter and maxfun 100000.

Timing as in bench_bounds.py: ``--repeats`` interleaved rounds (hpcqn 1 rank, TAO 1 rank,
hpcqn P ranks, TAO P ranks), medians; the solve timed, wall and CPU, after a barrier (the
slowest rank), the objective timed inside it, ``own ms/it = (solve - objective) / nit``;
an untimed 3-iteration solve first in every process. One BLAS/OpenMP thread per process;
the load average before and after.

Run from the repository root::

    python benchmarks/bench_minimize.py --sizes 1e3 1e4 1e5 --repeats 5
    python benchmarks/bench_minimize.py --sizes 1e6 --repeats 1
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
from hpcqn.experiments import mgh  # noqa: E402
from hpcqn.experiments.problems import make_problem  # noqa: E402

PROBLEMS = list(mgh.FUNCTIONS)
HISTORY = 5
RTOL = 1e-7
MAXITER = 100_000
MAXFUN = 100_000
MPI_RANKS = 2
SIZES = [1_000, 10_000, 100_000, 1_000_000]
SCIPY_MAX_N = 100_000


@dataclass
class Row:
    """The medians over the rounds of one solver on one function, size and rank count."""

    problem: str
    n: int
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
    g_rel: float  # ||g(x)||_2 / ||g(x0)||_2 of the first round's solution
    time_ratio_tao: float | None
    own_ratio_tao: float | None
    cpu_ratio_tao: float | None
    own_cpu_ratio_tao: float | None
    success: bool
    message: str


def hpcqn_options(rtol: float, history: int) -> dict[str, Any]:
    return {"history": history, "gtol": 0.0, "gttol": rtol, "ftol": 0.0,
            "maxiter": MAXITER, "maxfun": MAXFUN}


def gradient_norm(name: str, x: np.ndarray) -> float:
    return float(np.linalg.norm(mgh.FUNCTIONS[name](x)[1]))


# -- the solvers -------------------------------------------------------------------------
def run_scipy(name: str, n: int, rtol: float, history: int) -> tuple[Run, float]:
    """SciPy's L-BFGS-B stopped by a callback at the rule (the last evaluated gradient is
    the accepted point's; recomputed only when it is not)."""
    function = mgh.FUNCTIONS[name]
    objective = TimedObjective(function)
    last: dict[str, np.ndarray] = {}
    x0 = mgh.start(name, n)
    target = rtol * gradient_norm(name, x0)

    def fun(x: np.ndarray) -> tuple[float, np.ndarray]:
        f, g = objective(x)
        last["x"], last["g"] = x.copy(), g
        return f, g

    def callback(intermediate_result: Any) -> None:
        x = intermediate_result.x
        g = last["g"] if np.array_equal(last.get("x"), x) else function(x)[1]
        if np.linalg.norm(g) <= target:
            raise StopIteration

    options = {"maxcor": history, "gtol": 0.0, "ftol": 0.0, "maxiter": MAXITER,
               "maxfun": MAXFUN}
    start, cpu = time.perf_counter(), time.process_time()
    res = scipy.optimize.minimize(fun, x0, jac=True, method="L-BFGS-B", options=options,
                                  callback=callback)
    cpu = time.process_time() - cpu
    seconds = time.perf_counter() - start
    return Run(int(res.nit), int(res.nfev), float(res.fun), seconds,
               bool(res.status in (0, 99)), str(res.message), objective.seconds, cpu,
               objective.cpu_seconds), gradient_norm(name, res.x)


def solve(comm: Any, name: str, n: int, rtol: float, history: int) -> tuple[Run, Any]:
    """One timed hpcqn solve on ``comm`` (after an untimed 3-iteration one): the run (this
    rank's times) and the result."""
    fun, x0 = make_problem(name, n=n).distributed(comm)
    hpcqn.minimize(fun, x0, comm=comm, options={**hpcqn_options(rtol, history), "maxiter": 3})
    objective = TimedObjective(fun)
    comm.barrier()
    start, cpu = time.perf_counter(), time.process_time()
    res = hpcqn.minimize(objective, x0, comm=comm, options=hpcqn_options(rtol, history))
    cpu = time.process_time() - cpu
    seconds = time.perf_counter() - start
    return Run(int(res.nit), int(res.nfev), float(res.fun), seconds, bool(res.success),
               str(res.message), objective.seconds, cpu, objective.cpu_seconds), res


def run_hpcqn_serial(name: str, n: int, rtol: float, history: int) -> tuple[Run, float]:
    run, res = solve(hpcqn.serial_comm(), name, n, rtol, history)
    return run, gradient_norm(name, np.asarray(res.x))


def run_hpcqn_mpi(name: str, n: int, rtol: float, history: int,
                  ranks: int) -> tuple[Run, float]:
    """One solve in an ``mpiexec`` launch of this script's worker mode."""
    mpiexec = shutil.which("mpiexec")
    if mpiexec is None:
        raise RuntimeError("mpiexec not found on PATH (pip install mpich mpi4py)")
    command = [mpiexec, "-n", str(ranks), sys.executable, str(Path(__file__).resolve()),
               "--worker", "--problems", name, "--sizes", str(n), "--rtol", repr(rtol),
               "--history", str(history)]
    done = subprocess.run(command, capture_output=True, text=True, env=os.environ.copy())
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed with status {done.returncode}:\n"
                           f"{done.stdout}\n{done.stderr}")
    line = json.loads(next(line for line in done.stdout.splitlines() if line.startswith("{")))
    g_norm = line.pop("g_norm")
    return Run(**line), g_norm


def worker(name: str, n: int, rtol: float, history: int) -> None:
    """Under mpiexec: one solve; rank 0 prints its JSON line (slowest rank's times and the
    final gradient's norm)."""
    comm = hpcqn.get_comm()
    run, res = solve(comm, name, n, rtol, history)
    reduced = comm.allreduce_named(sums={"gg": float(res.jac @ res.jac)},
                                   maxes={"seconds": run.seconds,
                                          "callback": run.callback_seconds,
                                          "cpu": run.cpu_seconds,
                                          "callback_cpu": run.callback_cpu_seconds})
    if comm.rank == 0:
        slowest = reduced.maxes
        run.seconds, run.callback_seconds = slowest["seconds"], slowest["callback"]
        run.cpu_seconds, run.callback_cpu_seconds = slowest["cpu"], slowest["callback_cpu"]
        print(json.dumps({**asdict(run), "g_norm": reduced.sums["gg"] ** 0.5}), flush=True)


def run_tao_lmvm(name: str, n: int, rtol: float, history: int, ranks: int) -> tuple[Run, float]:
    """TAO LMVM on ``ranks`` ranks (the slices split as hpcqn splits them)."""
    counts = ",".join(map(str, make_problem(name, n=n).layout(ranks).counts))
    with_x = Path(os.environ.get("TMPDIR", "/tmp")) / f"bench_minimize_tao_{os.getpid()}.npy"
    try:
        line = run_tao(ranks, ["--problem", name, "--n", str(n), "--counts", counts,
                               "--gttol", repr(rtol), "--history", str(history),
                               "--maxiter", str(MAXITER), "--maxfun", str(MAXFUN),
                               "--xout", str(with_x), "--warm-up"])[0]
        g_norm = gradient_norm(name, np.load(with_x))
    finally:
        with_x.unlink(missing_ok=True)
    return Run(line["nit"], line["nfev"], line["fun"], line["seconds"], line["success"],
               line["message"], line["callback_seconds"], line["cpu_seconds"],
               line["callback_cpu_seconds"]), g_norm


# -- the table -------------------------------------------------------------------------
def summarise(name: str, n: int, solver: str, ranks: int, runs: list[Run], g_norm: float,
              g0_norm: float) -> Row:
    first = runs[0]
    return Row(problem=name, n=n, ranks=ranks, solver=solver, nit=first.nit, nfev=first.nfev,
               seconds=statistics.median(run.seconds for run in runs),
               callback_seconds=statistics.median(run.callback_seconds for run in runs),
               own_per_iteration=statistics.median(run.own_per_iteration for run in runs),
               cpu_seconds=statistics.median(run.cpu_seconds for run in runs),
               own_cpu_per_iteration=statistics.median(run.own_cpu_per_iteration
                                                       for run in runs),
               fun=first.fun, g_rel=g_norm / g0_norm, time_ratio_tao=None, own_ratio_tao=None,
               cpu_ratio_tao=None, own_cpu_ratio_tao=None,
               success=all(run.success for run in runs), message=first.message)


def print_table(rows: list[Row]) -> None:
    print("| problem | n | ranks | solver | nit | nfev | wall s | own wall ms/it "
          "| wall / TAO | own wall / TAO | CPU s | own CPU ms/it | CPU / TAO | own CPU / TAO "
          "| f | g rel |")
    print("|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")

    def ratio(value: float | None) -> str:
        return "-" if value is None else f"{value:.2f}"

    for r in rows:
        print(f"| {r.problem} | {r.n} | {r.ranks} | {r.solver} | {r.nit} | {r.nfev} "
              f"| {r.seconds:.4f} | {r.own_per_iteration * 1e3:.3f} "
              f"| {ratio(r.time_ratio_tao)} | {ratio(r.own_ratio_tao)} "
              f"| {r.cpu_seconds:.4f} | {r.own_cpu_per_iteration * 1e3:.3f} "
              f"| {ratio(r.cpu_ratio_tao)} | {ratio(r.own_cpu_ratio_tao)} | {r.fun:.6e} "
              f"| {r.g_rel:.2e} |")
    for r in rows:
        if not r.success:
            print(f"note: {r.solver} on {r.ranks} rank(s), {r.problem} n = {r.n}: "
                  f"{r.message}")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=lambda s: int(float(s)), nargs="+", default=SIZES,
                        help="problem sizes n (multiples of 4; 1e5 notation accepted)")
    parser.add_argument("--problems", nargs="+", default=PROBLEMS, choices=PROBLEMS)
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds")
    parser.add_argument("--rtol", type=float, default=RTOL,
                        help="stop at ||g||_2 <= rtol ||g0||_2 (default %(default)g)")
    parser.add_argument("--history", type=int, default=HISTORY)
    parser.add_argument("--ranks", type=int, default=MPI_RANKS,
                        help="the MPI rank count besides 1 (default %(default)s)")
    parser.add_argument("--scipy-max-n", type=lambda s: int(float(s)), default=SCIPY_MAX_N)
    parser.add_argument("--no-tao", action="store_true", help="skip TAO")
    parser.add_argument("--json", type=Path, help="also write the rows to this JSON file")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    if args.worker:
        worker(args.problems[0], args.sizes[0], args.rtol, args.history)
        return
    with_tao, tao_line = (False, "--no-tao") if args.no_tao else tao_available()
    notes = [f"TAO LMVM: {'ran' if with_tao else 'skipped'} ({tao_line})",
             f"load average at the start: {load_average()}"]
    rank_counts = [1] if args.ranks == 1 else [1, args.ranks]
    rows: list[Row] = []
    for name in args.problems:
        for n in args.sizes:
            g0_norm = gradient_norm(name, mgh.start(name, n))
            print(f"{name}, n = {n}: {args.repeats} round(s) of hpcqn"
                  f"{' and TAO' if with_tao else ''} on ranks {rank_counts}",
                  file=sys.stderr, flush=True)
            runs: dict[tuple[str, int], list[Run]] = {}
            norms: dict[tuple[str, int], float] = {}
            for _ in range(args.repeats):
                for ranks in rank_counts:
                    if ranks == 1:
                        run, norm = run_hpcqn_serial(name, n, args.rtol, args.history)
                    else:
                        run, norm = run_hpcqn_mpi(name, n, args.rtol, args.history, ranks)
                    runs.setdefault(("hpcqn", ranks), []).append(run)
                    norms.setdefault(("hpcqn", ranks), norm)
                    if with_tao:
                        run, norm = run_tao_lmvm(name, n, args.rtol, args.history, ranks)
                        runs.setdefault(("TAO lmvm", ranks), []).append(run)
                        norms.setdefault(("TAO lmvm", ranks), norm)
            if n <= args.scipy_max_n:
                run, norm = run_scipy(name, n, args.rtol, args.history)
                runs[("scipy L-BFGS-B", 1)], norms[("scipy L-BFGS-B", 1)] = [run], norm
            group = [summarise(name, n, solver, ranks, found, norms[(solver, ranks)], g0_norm)
                     for (solver, ranks), found in sorted(runs.items(),
                                                          key=lambda item: item[0][1])]
            for row in group:
                tao = next((r for r in group if r.solver == "TAO lmvm" and r.ranks == row.ranks),
                           None)
                if tao is not None:
                    row.time_ratio_tao = row.seconds / tao.seconds
                    row.own_ratio_tao = row.own_per_iteration / tao.own_per_iteration
                    row.cpu_ratio_tao = row.cpu_seconds / tao.cpu_seconds
                    row.own_cpu_ratio_tao = row.own_cpu_per_iteration / tao.own_cpu_per_iteration
            rows.extend(group)
    notes.append(f"load average at the end: {load_average()}")
    description = machine()
    print(f"## Unconstrained L-BFGS: {', '.join(args.problems)}; history {args.history}, "
          f"stop at ||g||_2 <= {args.rtol:g} ||g0||_2; median of {args.repeats} interleaved "
          f"round(s)\n")
    print(f"Machine: {description}\n")
    for note in notes:
        print(note)
    print()
    print_table(rows)
    if args.json:
        report = {"machine": description,
                  "settings": {"history": args.history, "rtol": args.rtol, "maxiter": MAXITER,
                               "repeats": args.repeats, "ranks": rank_counts},
                  "notes": notes, "rows": [asdict(r) for r in rows]}
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
