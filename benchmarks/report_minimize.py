# ruff: noqa: E402  (one thread per process, set before NumPy and torch load)
"""Report section: ``hpcqn.minimize`` against SciPy's L-BFGS-B and ``torch.optim.LBFGS``
on the deterministic test problems of :mod:`hpcqn.experiments.problems`, one process, float64.

Every solver calls the same NumPy objective (``Problem.value_and_grad``; hpcqn through
``Problem.distributed`` on one rank), from the same start, with history 10 and the same
stopping tests as far as the APIs allow (see :func:`render`).

    python benchmarks/report_minimize.py [--quick] [--out DIR]
"""

from __future__ import annotations

import report_common as rc

rc.one_thread()  # before NumPy and torch load

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import scipy.optimize
import torch

import hpcqn
from hpcqn.experiments.problems import make_problem

HISTORY = 10
GTOL = 1e-5  # max |g_i| (SciPy's gtol, torch's tolerance_grad)
FTOL = 2.220446049250313e-09  # SciPy's L-BFGS-B default relative decrease
MAXITER = 15000
MAXFUN = 15000
# (problem, sizes in quick mode, sizes in full mode); logistic has its data's 31 weights.
PROBLEMS = (
    ("extended_rosenbrock", (10_000, 100_000), (100_000, 1_000_000)),
    ("extended_powell", (10_000, 100_000), (100_000, 1_000_000)),
    ("extended_wood", (10_000, 100_000), (100_000, 1_000_000)),
    ("broyden_tridiagonal", (10_000, 100_000), (100_000, 1_000_000)),
    ("quadratic", (10_000, 100_000), (100_000, 1_000_000)),
    ("logistic", (31,), (31,)),
)
SOLVERS = ("scipy", "hpcqn", "torch")
REPEATS = {True: 1, False: 3}
SHORT_STOP = 1e-6  # a final f this much above SciPy's (relative) is flagged


@dataclass
class Solve:
    problem: str
    n: int
    solver: str
    nit: int
    nfev: int
    fun: float
    gnorm_inf: float
    gnorm2: float
    seconds: float  # median over the repeats
    stop: str
    repeats: int
    options: str = ""


@dataclass
class MinimizeResults:
    solves: list[Solve] = field(default_factory=list)
    seconds: float = 0.0

    def find(self, problem: str, n: int, solver: str) -> Solve | None:
        for s in self.solves:
            if (s.problem, s.n, s.solver) == (problem, n, solver):
                return s
        return None


# -- the solvers -----------------------------------------------------------------------------
def solve_scipy(problem: Any) -> tuple[np.ndarray, int, int, str, float]:
    options = {"maxcor": HISTORY, "gtol": GTOL, "ftol": FTOL, "maxiter": MAXITER,
               "maxfun": MAXFUN}
    x0 = problem.x0()
    start = time.perf_counter()
    res = scipy.optimize.minimize(problem.value_and_grad, x0, jac=True, method="L-BFGS-B",
                                  options=options)
    seconds = time.perf_counter() - start
    return res.x, int(res.nit), int(res.nfev), str(res.message), seconds


def solve_hpcqn(problem: Any) -> tuple[np.ndarray, int, int, str, float]:
    comm = hpcqn.serial_comm()
    fun, x0 = problem.distributed(comm)
    options = {"history": HISTORY, "gtol": GTOL, "ftol": FTOL, "maxiter": MAXITER,
               "maxfun": MAXFUN}
    start = time.perf_counter()
    res = hpcqn.minimize(fun, x0, comm=comm, options=options)
    seconds = time.perf_counter() - start
    return np.asarray(res.x), int(res.nit), int(res.nfev), str(res.message), seconds


def torch_tolerance_change(f_reference: float) -> float:
    """torch's ``tolerance_change`` is absolute (``|f_k - f_k+1| < tol``, and the step's
    max-norm); SciPy's ftol is relative to ``max(|f_k|, |f_k+1|, 1)``: matched at SciPy's
    final f."""
    return FTOL * max(1.0, abs(f_reference))


def solve_torch(problem: Any, tolerance_change: float) -> tuple[np.ndarray, int, int, str,
                                                                  float]:
    x = torch.from_numpy(problem.x0().copy())
    opt = torch.optim.LBFGS([x], lr=1.0, max_iter=MAXITER, max_eval=MAXFUN,
                            tolerance_grad=GTOL, tolerance_change=tolerance_change,
                            history_size=HISTORY, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        f, g = problem.value_and_grad(x.numpy())
        x.grad = torch.from_numpy(g)
        return torch.tensor(f, dtype=torch.float64)

    start = time.perf_counter()
    opt.step(closure)
    seconds = time.perf_counter() - start
    state = opt.state[x]
    nit, nfev = int(state["n_iter"]), int(state["func_evals"])
    if float(x.grad.abs().max()) <= GTOL:
        stop = "max |g| <= tolerance_grad"
    elif nit >= MAXITER:
        stop = "max_iter reached"
    elif nfev >= MAXFUN:
        stop = "max_eval reached"
    else:
        stop = "tolerance_change (f change or step)"
    return x.numpy().copy(), nit, nfev, stop, seconds


def solve(name: str, n: int, solver: str, repeats: int, tolerance_change: float) -> Solve:
    problem = make_problem(name, n=n)
    times = []
    for _ in range(repeats):
        if solver == "scipy":
            x, nit, nfev, stop, seconds = solve_scipy(problem)
        elif solver == "hpcqn":
            x, nit, nfev, stop, seconds = solve_hpcqn(problem)
        else:
            x, nit, nfev, stop, seconds = solve_torch(problem, tolerance_change)
        times.append(seconds)
    f, g = problem.value_and_grad(x)  # untimed: every solver's end point, the same way
    options = f"tolerance_change {tolerance_change:.3g}" if solver == "torch" else ""
    return Solve(name, n, solver, nit, nfev, float(f), float(np.max(np.abs(g))),
                 float(np.linalg.norm(g)), rc.median(times), stop, repeats, options)


def compute(quick: bool, progress: Any = None) -> MinimizeResults:
    rc.torch_one_thread()
    started = time.perf_counter()
    res = MinimizeResults()
    repeats = REPEATS[quick]
    for name, quick_sizes, full_sizes in PROBLEMS:
        for n in quick_sizes if quick else full_sizes:
            if progress:
                progress(f"minimize: {name}, n = {n}")
            reference = solve(name, n, "scipy", repeats, 0.0)
            res.solves.append(reference)
            for solver in SOLVERS[1:]:
                res.solves.append(solve(name, n, solver, repeats,
                                        torch_tolerance_change(reference.fun)))
    res.seconds = time.perf_counter() - started
    return res


# -- the section -----------------------------------------------------------------------------
def _table(res: MinimizeResults) -> list[str]:
    head = ["problem", "n", "solver", "iterations", "function evaluations", "final f",
            "(f - SciPy's f) / max(1, \\|SciPy's f\\|)", "final max\\|g\\|",
            "final \\|g\\|₂", "seconds", "seconds / SciPy", "why it stopped"]
    rows = []
    for s in res.solves:
        ref = res.find(s.problem, s.n, "scipy")
        gap = "-" if ref is None or s is ref else f"{f_gap(s, ref):+.1e}"
        rows.append([s.problem, f"{s.n:,}", rc.LABELS[s.solver], str(s.nit), str(s.nfev),
                     f"{s.fun:.6g}", gap, f"{s.gnorm_inf:.2e}", f"{s.gnorm2:.2e}",
                     f"{s.seconds:.3g}", rc.ratio(s.seconds, ref.seconds if ref else None),
                     s.stop.replace("|", "\\|")])
    return rc.table(head, rows, align="lrlrrrrrrrrl")


def f_gap(solve: Solve, reference: Solve) -> float:
    """How much higher ``solve`` ended than ``reference``, relative to max(1, |f_ref|)."""
    return (solve.fun - reference.fun) / max(1.0, abs(reference.fun))


def plot(res: MinimizeResults, out: Path) -> str:
    """Seconds over SciPy's per problem and size, one bar per solver."""
    plt = rc.pyplot()
    cases = sorted({(s.problem, s.n) for s in res.solves},
                   key=lambda c: ([p for p, _, _ in PROBLEMS].index(c[0]), c[1]))
    fig, ax = plt.subplots(figsize=(max(7.0, 0.9 * len(cases) + 2), 4.5))
    width = 0.38
    positions = np.arange(len(cases))
    for k, solver in enumerate(SOLVERS[1:]):
        ratios = []
        for problem, n in cases:
            mine, ref = res.find(problem, n, solver), res.find(problem, n, "scipy")
            ratios.append(mine.seconds / ref.seconds if mine and ref and ref.seconds else
                          math.nan)
        ax.bar(positions + (k - 0.5) * width, ratios, width, color=rc.COLORS[solver],
               label=rc.LABELS[solver])
    ax.axhline(1.0, color="black", lw=0.8, label="SciPy L-BFGS-B")
    ax.set_yscale("log")
    ax.set_xticks(positions)
    ax.set_xticklabels([f"{p}\nn={n:,}" for p, n in cases], fontsize=7, rotation=30,
                       ha="right")
    ax.set_ylabel("solve seconds / SciPy's")
    ax.set_title("L-BFGS (history 10, float64, one process): time to the stopping test")
    ax.grid(True, axis="y", which="both", alpha=0.3)
    ax.legend(fontsize=8)
    return rc.save_figure(fig, out, "minimize_vs_scipy.png")


def render(res: MinimizeResults, out: Path, quick: bool) -> str:
    name = plot(res, out)
    sizes = sorted({s.n for s in res.solves if s.problem != "logistic"})
    lines = [
        "## hpcqn.minimize vs SciPy L-BFGS-B and torch.optim.LBFGS",
        "",
        f"The deterministic problems of `hpcqn.experiments.problems` (extended Rosenbrock, "
        f"Powell and Wood, Broyden tridiagonal: Moré-Garbow-Hillstrom; a diagonal quadratic of "
        f"condition 1e4; L2-regularised logistic regression on the breast-cancer data, 31 "
        f"weights) at n = {', '.join(f'{n:,}' for n in sizes)}"
        f"{' (quick mode)' if quick else ''}, float64, one process, one thread, from the "
        f"problem's standard start. All three solvers call the same NumPy objective "
        f"(`Problem.value_and_grad`; hpcqn through `Problem.distributed` on one rank, "
        f"which is the same function for these problems) and keep {HISTORY} pairs. "
        f"Stopping tests: **SciPy** `L-BFGS-B` with `maxcor={HISTORY}, gtol={GTOL:g}, "
        f"ftol={FTOL:.3g}` (its default: relative decrease `(f_k - f_k+1) / max(|f_k|, "
        f"|f_k+1|, 1)`), `maxiter={MAXITER}, maxfun={MAXFUN}`; **hpcqn** `minimize` with "
        f"the same names and values (`history`, `gtol` on max|g|, `ftol` the same relative "
        f"test, strong-Wolfe line search); **torch** `LBFGS(lr=1, history_size={HISTORY}, "
        f"line_search_fn='strong_wolfe', tolerance_grad={GTOL:g}, max_iter={MAXITER}, "
        f"max_eval={MAXFUN})`, all in one `step(closure)` call, on a float64 tensor "
        f"sharing memory with NumPy. torch's `tolerance_grad` is the same max-norm test as "
        f"gtol; its `tolerance_change` is absolute (it stops when `|f_k - f_k+1|` or the "
        f"step's max-norm falls below it), so it is set to `ftol x max(1, |f*|)` with "
        f"`f*` SciPy's final f on the same problem: the relative test at SciPy's end "
        f"point (for the problems whose minimum is 0 this is ftol itself). Seconds: the "
        f"solver call alone (`time.perf_counter`), median of {REPEATS[quick]} run(s); the "
        f"final f and gradient norms are recomputed from each solver's end point, "
        f"untimed.",
        "",
        "**How to read it.** Iterations and evaluations show whether the solvers take the "
        "same path (SciPy and hpcqn use Moré-Thuente line searches of the same kind; "
        "torch's strong-Wolfe search is a cubic-interpolation search with different "
        "defaults); seconds / SciPy is the cost of hpcqn's (and torch's) per-iteration "
        "overhead at the same work. A final max|g| above the gtol means the solver "
        "stopped on ftol (or tolerance_change), as SciPy often does. torch's "
        "tolerance_change also stops on a short step (max|t d| below it), which can end "
        "it early on an ill-conditioned problem: the f-gap column shows where it did.",
        "",
        *_table(res),
        "",
        f"![Solve time over SciPy's per problem]({name})",
        "",
    ]
    # Times compare only where the solver got SciPy's result: a solver that stopped far
    # above it did less work, and its short time would flatter the mean.
    by_solver: dict[str, list[float]] = {"hpcqn": [], "torch": []}
    left_out: dict[str, int] = {"hpcqn": 0, "torch": 0}
    for s in res.solves:
        ref = res.find(s.problem, s.n, "scipy")
        if s.solver in by_solver and ref and ref.seconds > 0:
            if f_gap(s, ref) > SHORT_STOP:
                left_out[s.solver] += 1
            else:
                by_solver[s.solver].append(s.seconds / ref.seconds)
    short = [f"{rc.LABELS[s.solver]} on {s.problem} (n = {s.n:,}): "
             f"{f_gap(s, ref):+.1e}" for s in res.solves
             if s.solver != "scipy" and (ref := res.find(s.problem, s.n, "scipy")) is not None
             and f_gap(s, ref) > SHORT_STOP]
    if short:
        lines += [f"Stopped clearly above SciPy's final f (relative gap > {SHORT_STOP:g}), so "
                  f"its time is not for the same result: " + "; ".join(short) + ".", ""]
    lines.append(
        "Geometric mean of seconds / SciPy over the cases that reached SciPy's final f: "
        + ", ".join(f"{rc.LABELS[k]} {math.exp(np.mean(np.log(v))):.2f} ({len(v)} cases"
                    + (f"; {left_out[k]} left out: stopped above SciPy's f" if left_out[k] else "")
                    + ")"
                    for k, v in by_solver.items() if v) + ".")
    lines += ["", f"(minimize section: {res.seconds:.0f} s)", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    rc.section_main(compute, render, __doc__)
