"""mL-BFGS (``hpcqn.MLBFGS``) against SGD and Adam: time to target on digits, and the cost
of one optimizer step at n = 1e7.

Three parts, all measured in one run of this script (one process, one BLAS thread):

1. **Time to target** on multinomial logistic regression on scikit-learn's digits
   (``hpcqn.experiments.problems.DigitsSoftmax``: 650 parameters, one block per class) with
   ``hpcqn.minimize_stochastic``: batch 60, 20 epochs, cosine learning-rate schedule, the
   same batches for every run. Each method gets a small learning-rate grid (SGD with
   momentum 0.9; Adam; mL-BFGS with beta 0.99, period 20, history 10, with plain steps
   and with the default ``normalize_direction`` and ``direction_momentum=0.9``). The
   target is a full training loss within 0.01 of ``f*``, the L-BFGS-B optimum computed
   here with SciPy. The full
   loss is evaluated every 5 steps in the callback until the target is reached (so steps
   to target are rounded up to a multiple of 5), and the time spent evaluating it is
   subtracted from the seconds. Per method, the best learning rate (fewest steps to
   target, ties by final loss) is reported with its ratios to SGD's best; a second table
   shows every configuration.
2. **Step throughput** of mL-BFGS at n = 1e7 float32, history M = 10, ten blocks of 1e6
   on one rank: after a warm-up with ``period=1`` that fills every block's history (random
   gradients from a few fixed vectors plus a small quadratic term), ``period`` is raised
   so that no pair is formed while the steps are timed. One step reads the history twice
   (``[S Y]' g`` and ``[S Y] c``): ``2 * 2M * n * 4`` bytes, divided by the median step
   time and compared with a STREAM-style triad (NumPy, float32; float64 for reference).
   The two history products are also timed alone, and one step that forms a pair.
3. **mL-BFGS step time over SGD step time** (momentum 0.9, same layout, same gradients).

The timed steps of parts 2 and 3 are interleaved (one mL-BFGS step, one SGD step, the
history products alone, a float32 triad best of 5; ``--steps`` rounds, medians reported):
on a shared machine the memory bandwidth can drop by half for seconds at a time, and
interleaving keeps every ratio within one set of conditions.

Run from the repository root (about 25 seconds on two cores with the defaults)::

    python benchmarks/bench_mlbfgs.py
    python benchmarks/bench_mlbfgs.py --quick --json /tmp/bench_mlbfgs.json
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

# One thread per process, set before NumPy loads its BLAS.
for _name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_name, "1")
# Import hpcqn from this checkout, also when it is not installed.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from dataclasses import asdict, dataclass  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
import scipy  # noqa: E402
import scipy.optimize  # noqa: E402
from common import history_products_timer, machine, triad_bandwidth  # noqa: E402

import hpcqn  # noqa: E402
from hpcqn.experiments.problems import DigitsSoftmax  # noqa: E402
from hpcqn.layout import BlockLayout  # noqa: E402
from hpcqn.optimizers.blockwise import BlockOptimizer  # noqa: E402
from hpcqn.optimizers.first_order import SGD  # noqa: E402
from hpcqn.optimizers.mlbfgs import MLBFGS  # noqa: E402
from hpcqn.stochastic import minimize_stochastic  # noqa: E402

# Part 1: the digits job.
EPOCHS = 20
BATCH = 60
TARGET_GAP = 0.01
EVAL_EVERY = 5
MLBFGS_BASE = {"beta": 0.99, "period": 20, "history": 10}
# (label, method, fixed options, learning-rate grid, the one lr of --quick)
METHODS: list[tuple[str, str, dict[str, Any], list[float], float]] = [
    ("sgd (momentum 0.9)", "sgd", {"momentum": 0.9}, [0.1, 0.3, 1.0], 0.3),
    ("adam", "adam", {}, [0.01, 0.03, 0.1], 0.03),
    ("mlbfgs, plain steps (the paper's update)", "mlbfgs",
     {**MLBFGS_BASE, "normalize_direction": False, "direction_momentum": 0.0},
     [0.03, 0.1, 0.3], 0.1),
    ("mlbfgs, normalised + heavy-ball 0.9 (default)", "mlbfgs",
     {**MLBFGS_BASE, "normalize_direction": True, "direction_momentum": 0.9},
     [0.03, 0.1, 0.3], 0.1),
]

# Parts 2 and 3: one optimizer step on a large vector.
HISTORY = 10
BLOCKS = 10  # chunks of n / BLOCKS
NOISE_VECTORS = 3
CURVATURE = 1.0  # g = CURVATURE * x + noise_k: a quadratic term, so pairs have s.y > 0
STEP_LR = 1e-3
TRIAD_N = 10_000_000
TRIAD_REPEATS = 5


@dataclass
class Config:
    """One configuration of part 1: the median seconds of the repeats, the rest from the
    first run (the runs are deterministic)."""

    label: str
    method: str
    lr: float
    options: dict[str, Any]
    steps_to_target: int | None  # None: not reached in EPOCHS epochs
    seconds_to_target: float | None  # evaluation time excluded
    seconds_total: float  # all EPOCHS epochs, evaluation time excluded
    nit: int
    final_gap: float  # train_loss(x) - f* after EPOCHS epochs
    test_accuracy: float
    npairs: int | None  # mL-BFGS: pairs stored over all blocks


@dataclass
class StepTiming:
    """Parts 2 and 3: one optimizer step on n float32 entries."""

    n: int
    blocks: int
    history: int
    warmup_steps: int
    npairs: int
    skipped_pairs: int
    timed_steps: int
    mlbfgs_step_seconds: float  # median, no pair formed
    mlbfgs_pair_step_seconds: float  # median of a few steps that each form a pair
    history_gemv_seconds: float  # the two history products alone, all blocks, median
    sgd_step_seconds: float  # median
    history_bytes: int  # 2 passes * 2M * n * 4
    history_bandwidth: float  # history_bytes / mlbfgs_step_seconds
    triad32: float  # bytes/s: median over the rounds of each round's best of 5
    triad64: float  # bytes/s
    fraction_of_triad32: float
    step_ratio_vs_sgd: float


# -- part 1 ------------------------------------------------------------------------------
def optimum(problem: DigitsSoftmax) -> float:
    """``f*``: SciPy L-BFGS-B on the full training objective."""
    full = (np.arange(problem.train_y.size), 1.0 / problem.train_y.size)
    res = scipy.optimize.minimize(
        problem.train_loss, problem.x0(), jac=lambda w: problem.batch_loss(w, full)[1],
        method="L-BFGS-B", options={"gtol": 1e-10, "maxiter": 5000},
    )
    return float(res.fun)


def train_once(problem: DigitsSoftmax, method: str, options: dict[str, Any], fstar: float,
               epochs: int = EPOCHS) -> tuple[Any, int | None, float | None, float]:
    """One training run: (result, steps to target, seconds to target, seconds in all),
    the seconds without the time spent evaluating the full training loss."""
    comm = hpcqn.serial_comm()
    evaluating = 0.0
    reached: list[tuple[int, float]] = []
    start = 0.0

    def callback(res: Any) -> None:
        nonlocal evaluating
        if res.epoch_end or res.nit % EVAL_EVERY or reached:
            return
        before = time.perf_counter()
        gap = problem.train_loss(res.x) - fstar
        if gap <= TARGET_GAP:
            reached.append((res.nit, before - start - evaluating))
        evaluating += time.perf_counter() - before

    start = time.perf_counter()
    res = minimize_stochastic(
        problem.batch_loss, problem.x0(), problem.batches(BATCH, comm.rank, comm.size),
        method=method, comm=comm, callback=callback,
        options={"epochs": epochs, "blocks": problem.block_sizes, "disp": False,
                 "lr_schedule": "cosine", **options},
    )
    total = time.perf_counter() - start - evaluating
    steps, seconds = reached[0] if reached else (None, None)
    return res, steps, seconds, total


def run_config(problem: DigitsSoftmax, label: str, method: str, options: dict[str, Any],
               lr: float, fstar: float, repeats: int) -> Config:
    runs = [train_once(problem, method, {**options, "lr": lr}, fstar) for _ in range(repeats)]
    res, steps, _, _ = runs[0]
    to_target = [r[2] for r in runs if r[2] is not None]
    stats = res.optimizer.statistics() if method == "mlbfgs" else None
    return Config(
        label=label, method=method, lr=lr, options=options, steps_to_target=steps,
        seconds_to_target=statistics.median(to_target) if to_target else None,
        seconds_total=statistics.median(r[3] for r in runs), nit=int(res.nit),
        final_gap=problem.train_loss(res.x) - fstar,
        test_accuracy=problem.test_accuracy(res.x),
        npairs=stats["npairs"] if stats else None,
    )


def best_of(configs: list[Config]) -> Config:
    """Fewest steps to target; ties (and runs that never reach it) by final loss."""
    return min(configs, key=lambda c: (c.steps_to_target or math.inf, c.final_gap))


# -- parts 2 and 3 -----------------------------------------------------------------------


def gradient(x: np.ndarray, noise: list[np.ndarray], k: int, out: np.ndarray) -> np.ndarray:
    """``CURVATURE * x + noise[k % len(noise)]`` into ``out``."""
    np.multiply(x, np.float32(CURVATURE), out=out)
    out += noise[k % len(noise)]
    return out


def timed_step(opt: BlockOptimizer, x: np.ndarray, noise: list[np.ndarray], k: int,
               g: np.ndarray) -> float:
    """Seconds of one ``opt.step`` on the ``k``-th gradient (made outside the timing)."""
    gradient(x, noise, k, g)
    start = time.perf_counter()
    if not opt.step(x, g):
        raise RuntimeError("a benchmark step was skipped (non-finite gradient)")
    return time.perf_counter() - start


def history_products(opt: MLBFGS, g: np.ndarray) -> Callable[[], float]:
    """A timer of the two history products of one step alone (``V @ g_b`` and
    ``c @ V`` for every block, ``V`` the block's (2M, n_b) history array): a floor
    under the step time."""
    blocks = []
    for b, state in opt.block_state.items():
        vectors = state["history"].vectors
        start = opt.layout.offsets[b]
        g_block = g[start : start + opt.layout.sizes[b]]
        blocks.append((vectors, g_block, np.empty(vectors.shape[1], g.dtype)))
    return history_products_timer(blocks, np.full(2 * opt.history, 1e-3, dtype=g.dtype))


def step_timing(n: int, steps: int) -> StepTiming:
    """Fill mL-BFGS's histories, then time ``steps`` rounds of: one mL-BFGS step, one
    SGD step, the history products alone and a float32 triad (best of TRIAD_REPEATS
    passes: the first pass after a step runs about 20% slower), interleaved so that all
    are measured under the same machine conditions."""
    layout = BlockLayout.chunks(n, n // BLOCKS, 1)
    rng = np.random.default_rng(1)
    noise = [rng.standard_normal(n, dtype=np.float32) for _ in range(NOISE_VECTORS)]
    x = np.zeros(n, dtype=np.float32)
    g = np.empty_like(x)
    # min_cos=0: the timing needs full histories (random gradients give pairs near
    # orthogonality; the pair test costs one dot product per pair)
    opt = MLBFGS(layout, hpcqn.serial_comm(), lr=STEP_LR, history=HISTORY, period=1,
                 beta=0.9, min_cos=0.0)
    warmup = 0
    while min((len(s["history"]) for s in opt.block_state.values()), default=0) < HISTORY:
        if warmup >= 5 * HISTORY:
            raise RuntimeError(f"histories not full after {warmup} steps: "
                               f"{opt.statistics()}")
        timed_step(opt, x, noise, warmup, g)
        warmup += 1
    stats = opt.statistics()
    if stats["npairs"] <= 0:
        raise RuntimeError(f"no curvature pair was accepted: {stats}")
    opt.period = 10**9  # no pair formed while timing

    sgd_x = np.zeros(n, dtype=np.float32)
    sgd = SGD(layout, hpcqn.serial_comm(), lr=STEP_LR, momentum=0.9)
    timed_step(sgd, sgd_x, noise, 0, g)  # first step: allocates the velocity
    products = history_products(opt, g)
    triad_bandwidth(TRIAD_N, np.float32, 1)  # allocate and touch the triad arrays

    mlbfgs_seconds, sgd_seconds, gemv_seconds, triad32 = [], [], [], []
    for k in range(steps):
        mlbfgs_seconds.append(timed_step(opt, x, noise, warmup + k, g))
        sgd_seconds.append(timed_step(sgd, sgd_x, noise, 1 + k, g))
        gemv_seconds.append(products())
        triad32.append(triad_bandwidth(TRIAD_N, np.float32, TRIAD_REPEATS))
    triad64 = triad_bandwidth(TRIAD_N, np.float64, TRIAD_REPEATS)
    opt.period = 1  # a few steps that each form a pair (history full: oldest dropped)
    pair_seconds = [timed_step(opt, x, noise, warmup + steps + k, g) for k in range(3)]
    if not (np.isfinite(x).all() and np.isfinite(sgd_x).all()):
        raise RuntimeError("an iterate is not finite in the throughput benchmark")

    step = statistics.median(mlbfgs_seconds)
    sgd_step = statistics.median(sgd_seconds)
    history_bytes = 2 * 2 * HISTORY * n * 4
    best32 = statistics.median(triad32)
    return StepTiming(
        n=n, blocks=layout.nblocks, history=HISTORY, warmup_steps=warmup,
        npairs=stats["npairs"], skipped_pairs=stats["skipped_pairs"], timed_steps=steps,
        mlbfgs_step_seconds=step, mlbfgs_pair_step_seconds=statistics.median(pair_seconds),
        history_gemv_seconds=statistics.median(gemv_seconds), sgd_step_seconds=sgd_step,
        history_bytes=history_bytes, history_bandwidth=history_bytes / step,
        triad32=best32, triad64=triad64, fraction_of_triad32=history_bytes / step / best32,
        step_ratio_vs_sgd=step / sgd_step,
    )


# -- output ------------------------------------------------------------------------------
def _steps(c: Config) -> str:
    return str(c.steps_to_target) if c.steps_to_target is not None else "not reached"


def _seconds(c: Config) -> str:
    return f"{c.seconds_to_target:.3f}" if c.seconds_to_target is not None else "-"


def print_best(best: list[Config], reference: Config) -> None:
    print("| method | best lr | steps to target | seconds to target | final gap "
          "| test accuracy | steps / SGD | seconds / SGD |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for c in best:
        if c.steps_to_target is not None and reference.steps_to_target is not None:
            step_ratio = f"{c.steps_to_target / reference.steps_to_target:.2f}"
            time_ratio = f"{c.seconds_to_target / reference.seconds_to_target:.2f}"
        else:
            step_ratio = time_ratio = "-"
        print(f"| {c.label} | {c.lr:g} | {_steps(c)} | {_seconds(c)} | {c.final_gap:.2e} "
              f"| {c.test_accuracy:.3f} | {step_ratio} | {time_ratio} |")


def print_grid(configs: list[Config]) -> None:
    print(f"| method | lr | gap after {EPOCHS} epochs | steps to target | seconds to target "
          f"| seconds, {EPOCHS} epochs | test accuracy | pairs |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for c in configs:
        pairs = "" if c.npairs is None else str(c.npairs)
        print(f"| {c.label} | {c.lr:g} | {c.final_gap:.2e} | {_steps(c)} | {_seconds(c)} "
              f"| {c.seconds_total:.3f} | {c.test_accuracy:.3f} | {pairs} |")


def print_steps(t: StepTiming) -> None:
    print(f"| quantity | value |\n|---|---:|\n"
          f"| n (float32), blocks, history M | {t.n:.0e}, {t.blocks}, {t.history} |\n"
          f"| warm-up steps (period 1) until every block holds M pairs | {t.warmup_steps} "
          f"({t.npairs} pairs stored, {t.skipped_pairs} skipped) |\n"
          f"| mL-BFGS step, median of {t.timed_steps} (no pair formed) "
          f"| {t.mlbfgs_step_seconds * 1e3:.1f} ms |\n"
          f"| history read per step (2 passes x 2M x n x 4 B) "
          f"| {t.history_bytes / 1e9:.2f} GB |\n"
          f"| achieved history bandwidth | {t.history_bandwidth / 1e9:.2f} GB/s |\n"
          f"| triad float32 (NumPy, {TRIAD_N:.0e}; best of {TRIAD_REPEATS} after each timed "
          f"step, median of {t.timed_steps}) "
          f"| {t.triad32 / 1e9:.2f} GB/s |\n"
          f"| triad float64 (NumPy, {TRIAD_N:.0e}, best of {TRIAD_REPEATS}, after the steps) "
          f"| {t.triad64 / 1e9:.2f} GB/s |\n"
          f"| **history bandwidth / float32 triad** (goal > 50%) "
          f"| **{t.fraction_of_triad32:.0%}** |\n"
          f"| the two history products alone (all blocks, median) "
          f"| {t.history_gemv_seconds * 1e3:.1f} ms "
          f"({t.history_gemv_seconds / t.mlbfgs_step_seconds:.0%} of the step; "
          f"{t.history_bytes / t.history_gemv_seconds / t.triad32:.0%} of triad) |\n"
          f"| mL-BFGS step that also forms a pair (history full), median of 3 "
          f"| {t.mlbfgs_pair_step_seconds * 1e3:.1f} ms |")


def print_ratio(t: StepTiming) -> None:
    amortised = (19 * t.mlbfgs_step_seconds + t.mlbfgs_pair_step_seconds) / 20
    print(f"| optimizer | step (median of {t.timed_steps}, interleaved) | / SGD |\n"
          f"|---|---:|---:|\n"
          f"| SGD (momentum 0.9) | {t.sgd_step_seconds * 1e3:.1f} ms | 1.00 |\n"
          f"| mL-BFGS (M {t.history}, no pair formed) | {t.mlbfgs_step_seconds * 1e3:.1f} ms "
          f"| {t.step_ratio_vs_sgd:.2f} |\n"
          f"| mL-BFGS, amortised at period 20 (1 step in 20 forms a pair) "
          f"| {amortised * 1e3:.1f} ms | {amortised / t.sgd_step_seconds:.2f} |")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="one lr per method, n = 1e6 for the step timings (a smoke test)")
    parser.add_argument("--n", type=lambda s: int(float(s)), default=None,
                        help="size of the step timings (default 1e7, 1e6 with --quick)")
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed runs per digits configuration (default 3, 1 with --quick)")
    parser.add_argument("--steps", type=int, default=10, help="timed optimizer steps")
    parser.add_argument("--json", type=Path, help="also write the results to this JSON file")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    n = args.n or (1_000_000 if args.quick else 10_000_000)
    repeats = args.repeats or (1 if args.quick else 3)
    problem = DigitsSoftmax()
    fstar = optimum(problem)
    train_once(problem, "sgd", {"lr": 0.1}, fstar, epochs=1)  # warm caches and imports

    configs: list[Config] = []
    best: list[Config] = []
    for label, method, options, grid, quick_lr in METHODS:
        print(f"digits: {label}", file=sys.stderr, flush=True)
        rows = [run_config(problem, label, method, options, lr, fstar, repeats)
                for lr in ([quick_lr] if args.quick else grid)]
        configs.extend(rows)
        best.append(best_of(rows))
    print(f"step timings at n = {n}", file=sys.stderr, flush=True)
    timing = step_timing(n, args.steps)
    description = machine()

    print(f"## mL-BFGS vs SGD and Adam{' (--quick)' if args.quick else ''}\n")
    print(f"Machine: {description}\n")
    print(f"### 1. Time to target: digits softmax ({problem.n} parameters, "
          f"{len(problem.block_sizes)} blocks), batch {BATCH}, {EPOCHS} epochs, cosine "
          f"schedule, 1 process\n")
    print(f"f* = {fstar:.10f} (SciPy L-BFGS-B, gtol 1e-10); target: full training loss <= "
          f"f* + {TARGET_GAP}, checked every {EVAL_EVERY} steps; seconds exclude the "
          f"checks, median of {repeats} run(s); ratios against SGD's best lr.\n")
    print_best(best, best[0])
    print(f"\nEvery configuration (mL-BFGS: beta {MLBFGS_BASE['beta']}, period "
          f"{MLBFGS_BASE['period']}, history {MLBFGS_BASE['history']}):\n")
    print_grid(configs)
    print(f"\n### 2. mL-BFGS step throughput at n = {n:.0e} float32, 1 process\n")
    print_steps(timing)
    print(f"\n### 3. mL-BFGS step over SGD step at n = {n:.0e} float32, same layout and "
          f"gradients\n")
    print_ratio(timing)
    if args.json:
        report = {
            "machine": description, "quick": args.quick, "fstar": fstar,
            "best": [asdict(c) for c in best], "configs": [asdict(c) for c in configs],
            "step_timing": asdict(timing),
        }
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
