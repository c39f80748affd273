"""PETSc TAO's LMVM / BLMVM on hpcqn's test objectives, for the comparison columns of
bench_bounds.py and bench_minimize.py.

This script runs OUTSIDE hpcqn's environment: it needs only NumPy and petsc4py (Debian's
``python3-petsc4py``, PETSc 3.18 over Open MPI), and is launched by those benchmarks as
``mpiexec.openmpi -n P /usr/bin/python3 benchmarks/tao_solve.py ...``. It evaluates the
very same Python objectives as hpcqn's runs: it loads
``hpcqn/experiments/minpack2.py`` and ``hpcqn/experiments/mgh.py`` by path (both import
only NumPy), so nothing of hpcqn's package is imported.

* ``--problem torsion|obstacle``: the MINPACK-2 membrane on an ``nx x nx`` grid, split by
  the grid rows ``--rows`` (one count per rank, as hpcqn splits them), bounds
  ``(lo, hi)``, TAO ``blmvm``. The halo rows travel by a PETSc ``VecScatter`` (hpcqn's
  callback uses two ``Sendrecv``); the block's value and gradient come from
  ``Membrane.block``, the function hpcqn's callback calls.
* ``--problem extended_rosenbrock|extended_powell|extended_wood``: ``--n`` variables split
  at block boundaries (``--counts``), TAO ``lmvm``; each rank evaluates its slice.

The stopping rule is TAO's own ``gttol`` test, ``||P g||_2 < gttol ||P g0||_2`` (``P g``:
the gradient with the variables held at a bound zeroed, TAO's
``VecBoundGradientProjection``; plain ``g`` unconstrained), ``gatol = grtol = 0``; the
history length is set by ``-tao_(b)lmvm_mat_lmvm_hist_size``. ``--warm-up`` runs an
untimed solve of 3 iterations first (first-call costs out of the timing).

Each solve is timed, wall and CPU (``tao.solve()``, after a barrier; the slowest rank's
time) and so is the objective inside it: ``callback`` seconds are the time in the halo
exchange and the evaluation of the rank's block (the slowest rank's sum), not petsc4py's
conversions or the reduction of ``f`` that TAO's interface needs (those count as TAO's
own). Rank 0 prints one JSON line per solve and, with ``--xout``, saves the last solution
(the whole vector, ``.npy``).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

EXPERIMENTS = Path(__file__).resolve().parents[1] / "hpcqn" / "experiments"
MEMBRANES = ("torsion", "obstacle")


def load(name: str) -> Any:
    """``hpcqn/experiments/<name>.py`` as a module of its own (no hpcqn package)."""
    spec = importlib.util.spec_from_file_location(f"tao_side_{name}", EXPERIMENTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--problem", required=True)
    parser.add_argument("--n", type=int, required=True, help="variables (membranes: nx^2)")
    parser.add_argument("--nx", type=int, help="grid width of a membrane")
    parser.add_argument("--rows", help="membranes: grid rows per rank, comma-separated")
    parser.add_argument("--counts", help="separable functions: entries per rank")
    parser.add_argument("--gttol", type=float, required=True)
    parser.add_argument("--history", type=int, default=5)
    parser.add_argument("--maxiter", type=int, default=100_000)
    parser.add_argument("--maxfun", type=int, default=100_000)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--xout", type=Path)
    parser.add_argument("--warm-up", action="store_true",
                        help="an untimed solve of 3 iterations first (first-call costs)")
    return parser.parse_args()


class Objective:
    """This rank's part of the objective as TAO calls it, timing the callback."""

    def __init__(self, args: argparse.Namespace, comm: Any, PETSc: Any):
        rank, size = comm.getRank(), comm.getSize()
        self.PETSc, self.comm = PETSc, comm
        self.seconds = self.cpu_seconds = 0.0
        self.calls = 0
        if args.problem in MEMBRANES:
            minpack2 = load("minpack2")
            problem = minpack2.make(args.problem, args.nx)
            rows = [int(r) for r in args.rows.split(",")]
            if len(rows) != size or sum(rows) != problem.ny:
                raise SystemExit(f"--rows {args.rows} do not split {problem.ny} rows over "
                                 f"{size} ranks")
            nx = problem.nx
            counts = [r * nx for r in rows]
            start = sum(counts[:rank])
            part = slice(start, start + counts[rank])
            lo, hi = (side[part].copy() for side in problem.bounds())
            self.x0 = problem.x0()[part].copy()
            self.bounds = (lo, hi)
            owners = [r for r, count in enumerate(rows) if count > 0]
            self.last = bool(rows[rank]) and rank == owners[-1]
            self.problem, self.nx, self.rows = problem, nx, rows[rank]
            self.counts = counts
        else:
            self.problem = None
            mgh = load("mgh")
            counts = [int(c) for c in args.counts.split(",")]
            if len(counts) != size or sum(counts) != args.n:
                raise SystemExit(f"--counts {args.counts} do not split {args.n} over {size}")
            start = sum(counts[:rank])
            self.x0 = mgh.start(args.problem, args.n)[start:start + counts[rank]].copy()
            self.bounds = None
            self.function = mgh.FUNCTIONS[args.problem]
            self.counts = counts
        self.n_local = counts[rank]
        self.halo = None
        self.f_parts = PETSc.Vec().createMPI((1, PETSc.DECIDE), comm=comm)

    def vector(self, array: np.ndarray | None = None) -> Any:
        vec = self.PETSc.Vec().createMPI((self.n_local, self.PETSc.DECIDE), comm=self.comm)
        if array is not None:
            vec.getArray()[...] = array
        return vec

    def setup_halo(self, X: Any) -> None:
        """A scatter of the grid rows just below and above this rank's block (those that
        exist) into a local vector of two rows (zeros where there is no such row)."""
        if self.problem is None:
            return
        PETSc, nx = self.PETSc, self.nx
        start, end = X.getOwnershipRange()
        sources, targets = [], []
        if self.rows:
            if start > 0:
                sources += range(start - nx, start)
                targets += range(nx)
            if end < X.getSize():
                sources += range(end, end + nx)
                targets += range(nx, 2 * nx)
        self.halo = PETSc.Vec().createSeq(2 * nx, comm=PETSc.COMM_SELF)
        self.halo.set(0.0)
        source = PETSc.IS().createGeneral(np.array(sources, dtype=PETSc.IntType),
                                          comm=PETSc.COMM_SELF)
        target = PETSc.IS().createGeneral(np.array(targets, dtype=PETSc.IntType),
                                          comm=PETSc.COMM_SELF)
        self.scatter = PETSc.Scatter().create(X, source, self.halo, target)

    def objgrad(self, tao: Any, X: Any, G: Any) -> float:
        x = X.getArray(readonly=True)
        start, cpu = time.perf_counter(), time.process_time()
        if self.problem is not None:
            if self.rows:
                self.scatter.scatter(X, self.halo, addv=self.PETSc.InsertMode.INSERT,
                                     mode=self.PETSc.ScatterMode.FORWARD)
                halo = self.halo.getArray(readonly=True)
                f_part, g = self.problem.block(x, halo[:self.nx], halo[self.nx:], self.last)
            else:
                f_part, g = 0.0, np.zeros(0)
        else:
            f_part, g = self.function(x) if x.size else (0.0, np.zeros(0))
        self.cpu_seconds += time.process_time() - cpu
        self.seconds += time.perf_counter() - start
        self.calls += 1
        G.getArray()[...] = g
        self.f_parts.getArray()[...] = f_part
        return self.f_parts.sum()


def slowest(PETSc: Any, comm: Any, value: float) -> float:
    """The largest of every rank's ``value`` (a Vec of one entry per rank)."""
    holder = PETSc.Vec().createMPI((1, PETSc.DECIDE), comm=comm)
    holder.getArray()[...] = value
    top = holder.max()[1]
    holder.destroy()
    return float(top)


def main() -> None:
    args = parse_args()
    import petsc4py

    history_option = "tao_{}_mat_lmvm_hist_size"
    petsc4py.init(sys.argv[:1])
    from petsc4py import PETSc

    comm = PETSc.COMM_WORLD
    rank = comm.getRank()
    objective = Objective(args, comm, PETSc)
    kind = "blmvm" if objective.bounds is not None else "lmvm"
    PETSc.Options()[history_option.format(kind)] = args.history
    reasons = getattr(PETSc.TAO, "ConvergedReason", None) or PETSc.TAO.Reason  # by version
    reason_names = {int(getattr(reasons, k)): k for k in dir(reasons) if k.isupper()}
    X = None
    rounds = [(3, False)] if args.warm_up else []
    rounds += [(args.maxiter, True)] * args.repeats
    for maxiter, timed in rounds:
        X = objective.vector(objective.x0)
        G = X.duplicate()
        objective.setup_halo(X)
        tao = PETSc.TAO().create(comm=comm)
        tao.setType(kind)
        tao.setSolution(X)
        tao.setObjectiveGradient(objective.objgrad, G)
        if objective.bounds is not None:
            lower, upper = (objective.vector(side) for side in objective.bounds)
            tao.setVariableBounds((lower, upper))
        tao.setTolerances(gatol=0.0, grtol=0.0, gttol=args.gttol)
        tao.setMaximumIterations(maxiter)
        tao.setMaximumFunctionEvaluations(args.maxfun)
        tao.setFromOptions()
        tao.setUp()
        objective.seconds = objective.cpu_seconds = 0.0
        objective.calls = 0
        comm.barrier()
        start, cpu = time.perf_counter(), time.process_time()
        tao.solve()
        cpu = time.process_time() - cpu
        elapsed = time.perf_counter() - start
        seconds, callback_seconds, cpu_seconds, callback_cpu_seconds = (
            slowest(PETSc, comm, value)
            for value in (elapsed, objective.seconds, cpu, objective.cpu_seconds))
        nit, f, gnorm, _, _, code = tao.getSolutionStatus()
        code = int(code)
        if rank == 0 and timed:
            print(json.dumps({
                "nit": int(nit), "nfev": objective.calls,
                "fun": float(f), "seconds": seconds,
                "callback_seconds": callback_seconds, "cpu_seconds": cpu_seconds,
                "callback_cpu_seconds": callback_cpu_seconds, "success": code > 0,
                "message": reason_names.get(code, str(code)), "gnorm": float(gnorm),
            }), flush=True)
        tao.destroy()
        G.destroy()
    if args.xout is not None and X is not None:
        scatter, whole = PETSc.Scatter().toZero(X)
        scatter.scatter(X, whole, addv=PETSc.InsertMode.INSERT,
                        mode=PETSc.ScatterMode.FORWARD)
        if rank == 0:
            np.save(args.xout, whole.getArray(readonly=True).copy())


if __name__ == "__main__":
    main()
