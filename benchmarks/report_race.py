# ruff: noqa: E402  (one thread per process, set before NumPy and torch load)
"""Report section "the race": wall-clock time to a training-loss target, and the loss at
a fixed wall-clock budget, for first-order optimizers (SGD with momentum, Adam), the
popular matrix-preconditioned ones (``torch.optim.Muon``; SOAP and Shampoo from
``pytorch-optimizer``) and hpcqn's second-order methods (mL-BFGS, MKOR, MKOR-H, K-FAC),
on large global batches (1024, 4096, 8192) on 1 and on 2 MPI ranks, a deeper network and
a wide MLP of about 5M parameters.

Every problem is a float32 ReLU MLP trained with cross-entropy on a synthetic
teacher-student classification set (Gaussian inputs, labels the argmax of a fixed random
tanh teacher network), so the data ships with the package (no download). Each run trains
for a fixed wall-clock budget of training time (forward, backward, the gradient average
over ranks, the optimizer step; the bookkeeping between steps is not counted); the
training loss of each step's batch, measured in its forward, is the trace (an unbiased
estimate of the training loss at the current parameters), read smoothed over the last
``SMOOTH_SAMPLES`` samples; the loss at the budget is the exact training loss on a fixed
subset of the training set after the last step.

Learning rates: a fixed grid of ``len(GRIDS[m])`` points per method (see ``GRIDS``), the
rate with the lowest loss at the budget on seed 0 wins (a diverged run counts as worst);
2-rank problems reuse the 1-rank problem's rates (the same global batch and so the same
algorithm). The chosen rates then run on the other seeds.

    python benchmarks/report_race.py [--quick] [--seeds N] [--out DIR]

Needs ``pytorch-optimizer`` (``pip install -e ".[bench]"``) for SOAP and Shampoo; without
it those two are left out (and the section says so).
"""

from __future__ import annotations

import report_common as rc

rc.one_thread()  # before NumPy and torch load

import argparse
import contextlib
import io
import json
import math
import statistics
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

METHODS = ("sgd", "adam", "muon", "soap", "shampoo", "mlbfgs", "mkor", "mkor_h", "kfac")
HPCQN = ("mlbfgs", "mkor", "mkor_h", "kfac")
EXTERNAL = ("soap", "shampoo")  # from pytorch-optimizer
LABELS = {"sgd": "SGD", "adam": "Adam", "muon": "Muon+AdamW", "soap": "SOAP",
          "shampoo": "Shampoo", "mlbfgs": "mL-BFGS", "mkor": "MKOR", "mkor_h": "MKOR-H",
          "kfac": "K-FAC"}
# Seven learning rates per method, half a decade apart, over each method's usual range
# and one step beyond it on both sides (an earlier five-point grid put most choices on
# its upper edge); quick mode runs the middle three.
GRIDS: dict[str, tuple[float, ...]] = {
    "sgd": (0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0),
    "adam": (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1),
    "muon": (3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3),
    "soap": (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1),
    "shampoo": (3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3),
    "mlbfgs": (0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0),
    "mkor": (0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0),
    "mkor_h": (0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0),
    "kfac": (0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0),
}
# The options besides lr. hpcqn's: jobs/digits_mkor.toml's (MKOR/MKOR-H factor_freq 10,
# MKOR-H window 40 and threshold 0.1; K-FAC KAISA's defaults with damping 0.1, inv_freq 10),
# mL-BFGS its defaults (history 10, period 20). The others: no weight decay anywhere;
# every preconditioner refreshed every 10 steps (SOAP's default; Shampoo's default is 1).
OPTIONS: dict[str, dict[str, Any]] = {
    "sgd": {"momentum": 0.9},
    "adam": {},
    "muon": {"momentum": 0.95, "nesterov": True, "weight_decay": 0.0,
             "adjust_lr_fn": "match_rms_adamw"},
    "soap": {"weight_decay": 0.0, "precondition_frequency": 10},
    "shampoo": {"preconditioning_compute_steps": 10},
    "mlbfgs": {},
    "mkor": {"factor_freq": 10},
    "mkor_h": {"factor_freq": 10, "hybrid_window": 40, "hybrid_threshold": 0.1},
    "kfac": {"inv_freq": 10, "damping": 0.1, "factor_decay": 0.95, "kl_clip": 1e-3},
}
SMOOTH_SAMPLES = 2048  # the trace is the mean batch loss over the last ~this many samples
MAX_WINDOW = 8  # ... but over at most this many steps
SEEDS = {True: 2, False: 3}
# The target: the lower of SGD's and Adam's median smoothed loss at TARGET_AT of the budget
# (so the better first-order baseline reaches it at about that fraction of the budget).
REFERENCES = ("sgd", "adam")
TARGET_AT = 0.5
TARGET_CAP = 0.9  # ... and at most this fraction of the initial loss (the first batch's)
TEACHER_HIDDEN, CLASSES = 64, 10
MAX_STEPS = 200_000


@dataclass(frozen=True)
class Problem:
    """One race: an MLP of ``widths`` (input, hidden..., CLASSES), global ``batch`` over
    ``ranks``, ``budget`` seconds of training per run; ``grid_points`` of each method's
    grid (the middle ones)."""

    key: str
    title: str
    widths: tuple[int, ...]
    batch: int
    ranks: int
    budget: float
    n_train: int = 32768
    eval_samples: int = 8192
    lr_from: str | None = None  # a 1-rank problem whose rates and target this one reuses
    grid_points: int = 7

    @property
    def params(self) -> int:
        return sum(a * b + b for a, b in zip(self.widths[:-1], self.widths[1:], strict=True))

    @property
    def window(self) -> int:
        """Steps the trace is smoothed over."""
        return min(MAX_WINDOW, max(1, math.ceil(SMOOTH_SAMPLES / self.batch)))

    def describe(self) -> str:
        shape = "-".join(str(w) for w in self.widths)
        return (f"MLP {shape} ({self.params / 1e6:.2f}M parameters), global batch "
                f"{self.batch} on {self.ranks} rank{'s' if self.ranks > 1 else ''}, "
                f"{self.n_train} training samples, {self.budget:g} s budget per run")


SMALL = (32, 128, 128, CLASSES)
DEEP = (32, *([128] * 8), CLASSES)
WIDE = (256, *([1024] * 6), CLASSES)
WARM = Problem("warm", "warm-up", (16, 32, 32, CLASSES), 64, 1, math.inf, n_train=256,
               eval_samples=64)


def problems(quick: bool) -> list[Problem]:
    """The races (full: the whole 7-point grids; quick: batch 4096 on 1 and 2 ranks, the
    deep and the wide MLP, the middle 3 grid points, shorter budgets)."""
    b, points = (0.5, 3) if quick else (1.0, 7)
    large = [Problem(f"b{n}", f"Batch {n}, 1 rank", SMALL, n, 1, 1.5 * b, grid_points=points)
             for n in (1024, 4096, 8192)]
    two = [Problem(f"b{n}_2r", f"Batch {n}, 2 ranks", SMALL, n, 2, 1.5 * b, lr_from=f"b{n}",
                   grid_points=points) for n in (1024, 4096, 8192)]
    deep = Problem("deep", "Deep MLP (8 hidden layers), batch 1024", DEEP, 1024, 1, 1.5 * b,
                   grid_points=points)
    wide = Problem("wide", "Wide MLP (5.5M parameters), batch 128", WIDE, 128, 1,
                   1.5 if quick else 4.0, n_train=16384, eval_samples=2048, grid_points=points)
    if quick:
        return [large[1], two[1], deep, wide]
    return [*large, *two, deep, wide]


def problem_by_key(key: str, quick: bool) -> Problem:
    return {p.key: p for p in problems(quick)}[key]


# -- traces (pure; tested in tests/test_report_race.py) -------------------------------------
def smoothed(losses: Sequence[float], window: int) -> list[float]:
    """The trailing mean of ``losses`` over ``window`` steps (NaN before a full window);
    a non-finite loss makes every window holding it non-finite."""
    out, total, bad = [], 0.0, 0
    for k, value in enumerate(losses):
        if math.isfinite(value):
            total += value
        else:
            bad += 1
        if k >= window:
            old = losses[k - window]
            if math.isfinite(old):
                total -= old
            else:
                bad -= 1
        if k + 1 < window:
            out.append(math.nan)
        else:
            out.append(math.nan if bad else total / window)
    return out


def time_to_target(seconds: Sequence[float], losses: Sequence[float], target: float,
                   window: int) -> tuple[int, float] | None:
    """(steps, training seconds) at the end of the first step whose smoothed loss (the
    mean of the last ``window`` batch losses) is at or below ``target``; None if never.
    ``seconds[k]`` is the training time at the end of step ``k + 1``."""
    for k, value in enumerate(smoothed(losses, window)):
        if value <= target:  # NaN compares False
            return k + 1, float(seconds[k])
    return None


def loss_at_time(seconds: Sequence[float], losses: Sequence[float], at: float,
                 window: int) -> float:
    """The smoothed loss at the end of the first step that ends at or after ``at``
    seconds (the last step's if none does; NaN for an empty trace)."""
    values = smoothed(losses, window)
    for k, t in enumerate(seconds):
        if t >= at:
            return values[k]
    return values[-1] if values else math.nan


def pick_target(traces: dict[str, Sequence[tuple[Sequence[float], Sequence[float]]]],
                at: float, window: int, cap: float = math.inf) -> float:
    """The race's target: for each reference method (``traces``: its seeds' (seconds,
    losses)), the median over its seeds of the smoothed loss at ``at`` seconds (where most
    seeds have a finite one); the lowest of those and ``cap`` (NaN where none is finite
    and ``cap`` is infinite)."""
    levels = []
    for runs in traces.values():
        values = [loss_at_time(s, v, at, window) for s, v in runs]
        finite = [x for x in values if math.isfinite(x)]
        if len(finite) * 2 > len(values):
            levels.append(statistics.median(finite))
    levels.append(cap)
    lowest = min(levels)
    return lowest if math.isfinite(lowest) else math.nan


def spread(values: Sequence[float], fmt: str) -> str:
    """``median (min-max)``; '-' when empty."""
    if not values:
        return "-"
    middle = format(statistics.median(values), fmt)
    low, high = format(min(values), fmt), format(max(values), fmt)
    return middle if low == high else f"{middle} ({low}-{high})"


# -- runs ------------------------------------------------------------------------------------
@dataclass
class Run:
    method: str
    lr: float
    seed: int
    seconds: list[float]  # training time at the end of each step
    losses: list[float]  # each step's (global) batch loss, before the step
    final_loss: float  # exact training loss on the evaluation subset after the last step
    error: str | None = None

    @property
    def diverged(self) -> bool:
        return self.error is not None or not math.isfinite(self.final_loss)

    @property
    def steps(self) -> int:
        return len(self.losses)

    @property
    def loss_at_budget(self) -> float:
        return math.inf if self.diverged else self.final_loss

    @property
    def seconds_per_step(self) -> float:
        return self.seconds[-1] / len(self.seconds) if self.seconds else math.nan

    def to_target(self, target: float, window: int) -> tuple[int, float] | None:
        if self.error is not None:
            return None
        return time_to_target(self.seconds, self.losses, target, window)


@dataclass
class Stats(rc.SeedsToTarget):
    """One method's seeds against a problem's target."""

    reached: int
    seeds: int
    steps: list[int]
    seconds: list[float]
    per_step: list[float]  # seconds per step up to the target, the seeds that reached it

    @property
    def median_steps(self) -> float:
        return statistics.median(self.steps) if self.steps else math.inf

    @property
    def median_per_step(self) -> float:
        return statistics.median(self.per_step) if self.per_step else math.nan


def stats_of(runs: Sequence[Run], target: float, window: int) -> Stats:
    hits = [h for h in (r.to_target(target, window) for r in runs) if h is not None]
    return Stats(len(hits), len(runs), [k for k, _ in hits], [s for _, s in hits],
                 [s / k for k, s in hits])


def ranking(methods: dict[str, list[Run]], target: float, window: int
            ) -> list[tuple[str, Stats]]:
    """Methods that reach the target on most seeds, fastest (median seconds) first."""
    ranked = [(m, stats_of(runs, target, window)) for m, runs in methods.items()]
    return sorted([(m, s) for m, s in ranked if s.majority],
                  key=lambda item: item[1].median_seconds)


@dataclass
class ProblemResult:
    problem: Problem
    lrs: dict[str, float]
    grid: dict[str, dict[float, float]]  # method -> lr -> loss at budget (seed 0); 1 rank
    runs: dict[str, list[Run]]
    seconds: float
    target: float = math.nan
    error: str | None = None

    def stats(self, method: str) -> Stats:
        return stats_of(self.runs[method], self.target, self.problem.window)

    def ranking(self) -> list[tuple[str, Stats]]:
        return ranking(self.runs, self.target, self.problem.window)


@dataclass
class RaceResults:
    problems: list[ProblemResult]
    methods: tuple[str, ...]
    seeds: list[int]
    quick: bool
    missing: str | None  # why SOAP and Shampoo are left out, if they are
    seconds: float = 0.0


# -- data, models, optimizers ----------------------------------------------------------------
_DATA: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}


def dataset(d_in: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` Gaussian inputs of dimension ``d_in`` and their labels, the argmax of a fixed
    random teacher ``d_in -> 64 (tanh) -> 10`` (the same for every seed and run)."""
    key = (d_in, n)
    if key not in _DATA:
        g = torch.Generator().manual_seed(20240 + d_in)
        x = torch.randn(n, d_in, generator=g)
        w1 = torch.randn(d_in, TEACHER_HIDDEN, generator=g) * (2.0 / math.sqrt(d_in))
        w2 = torch.randn(TEACHER_HIDDEN, CLASSES, generator=g)
        y = (torch.tanh(x @ w1) @ w2).argmax(dim=1)
        _DATA[key] = (x.contiguous(), y)
    return _DATA[key]


def build_model(widths: Sequence[int], seed: int) -> nn.Module:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for k, (a, b) in enumerate(zip(widths[:-1], widths[1:], strict=True)):
        layers.append(nn.Linear(a, b))
        if k < len(widths) - 2:  # He initialisation before a ReLU (the last: torch's)
            nn.init.kaiming_normal_(layers[-1].weight, nonlinearity="relu")
            nn.init.zeros_(layers[-1].bias)
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class MuonAdamW:
    """``torch.optim.Muon`` on the 2-D weight matrices and ``torch.optim.AdamW`` on the
    other parameters (the biases), as Muon's documentation prescribes, at one learning
    rate (``adjust_lr_fn="match_rms_adamw"`` scales Muon's update to AdamW's RMS)."""

    def __init__(self, model: nn.Module, lr: float, **options: Any):
        matrices = [p for p in model.parameters() if p.ndim == 2]
        others = [p for p in model.parameters() if p.ndim != 2]
        self.parts = [torch.optim.Muon(matrices, lr=lr, **options),
                      torch.optim.AdamW(others, lr=lr, weight_decay=0.0)]

    def zero_grad(self, set_to_none: bool = True) -> None:
        for part in self.parts:
            part.zero_grad(set_to_none=set_to_none)

    def step(self) -> None:
        for part in self.parts:
            part.step()


def external_missing() -> str | None:
    """Why SOAP and Shampoo cannot run here, or None."""
    try:
        import pytorch_optimizer  # noqa: F401
    except ImportError as exc:
        return (f"pytorch-optimizer is not installed ({exc}); install the benchmark extra, "
                f"`pip install -e \".[bench]\"`")
    return None


def make_optimizer(method: str, model: nn.Module, lr: float, comm: Any) -> Any:
    options = OPTIONS[method]
    if method == "muon":
        return MuonAdamW(model, lr, **options)
    if method == "soap":
        from pytorch_optimizer import SOAP

        return SOAP(model.parameters(), lr=lr, **options)
    if method == "shampoo":
        from pytorch_optimizer import Shampoo

        return Shampoo(model.parameters(), lr=lr, **options)
    from hpcqn.torch import methods

    return methods.make(method, model, comm, {**options, "lr": lr})


def train_run(problem: Problem, method: str, lr: float, seed: int, comm: Any,
              budget: float | None = None, max_steps: int = MAX_STEPS) -> dict[str, Any]:
    """One run on this rank: ``budget`` seconds of training (the problem's by default) or
    ``max_steps`` steps. Returns this rank's trace: ``seconds`` and ``losses`` (its own
    part of each global batch), ``final_loss`` (rank 0's evaluation) and ``error``."""
    from hpcqn.torch import average_gradients

    budget = problem.budget if budget is None else budget
    x, y = dataset(problem.widths[0], problem.n_train)
    rank, size = comm.rank, comm.size
    model = build_model(problem.widths, seed)
    seconds: list[float] = []
    losses: list[float] = []
    error = None
    elapsed = 0.0
    generator = torch.Generator().manual_seed(1000 + seed)
    per_epoch = problem.n_train // problem.batch
    order = torch.empty(0, dtype=torch.long)
    flags = np.zeros(2)
    try:
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            opt = make_optimizer(method, model, lr, comm)
            step = 0
            while step < max_steps:
                if step % per_epoch == 0:
                    order = torch.randperm(problem.n_train, generator=generator)
                start = (step % per_epoch) * problem.batch
                rows = order[start + rank : start + problem.batch : size]
                xb, yb = x[rows], y[rows]
                began = time.perf_counter()
                opt.zero_grad()
                loss = nn.functional.cross_entropy(model(xb), yb)
                loss.backward()
                value = loss.item()
                if method not in HPCQN and size > 1:
                    average_gradients(model.parameters(), comm)
                if method == "mkor_h":
                    opt.step(loss=value)
                else:
                    opt.step()
                elapsed += time.perf_counter() - began
                step += 1
                seconds.append(elapsed)
                losses.append(value)
                flags[0], flags[1] = elapsed, 0.0 if math.isfinite(value) else 1.0
                if size > 1:
                    flags = np.asarray(comm.allreduce(flags, op="max"))
                if flags[1] > 0 or flags[0] >= budget:
                    break
    except (ArithmeticError, RuntimeError, ValueError, np.linalg.LinAlgError) as exc:
        error = f"{type(exc).__name__}: {str(exc)[:200]}"
    final = math.nan
    if error is None and rank == 0:
        n = min(problem.eval_samples, problem.n_train)
        with torch.no_grad():
            final = float(nn.functional.cross_entropy(model(x[:n]), y[:n]))
    return {"seconds": seconds, "losses": losses, "final_loss": final, "error": error}


def combine(method: str, lr: float, seed: int, ranks: list[dict[str, Any]]) -> Run:
    """One run from every rank's trace: the global batch loss is the mean of the ranks'
    (equal parts), the time the slowest rank's, the final loss rank 0's."""
    n = min(len(r["losses"]) for r in ranks)
    losses = [float(np.mean([r["losses"][k] for r in ranks])) for k in range(n)]
    seconds = [max(r["seconds"][k] for r in ranks) for k in range(n)]
    errors = [r["error"] for r in ranks if r["error"]]
    return Run(method, lr, seed, seconds, losses, float(ranks[0]["final_loss"]),
               errors[0] if errors else None)


def warm_up(methods: Sequence[str], comm: Any) -> None:
    """A few untimed steps of every method on a tiny MLP (imports, first calls)."""
    for method in methods:
        train_run(WARM, method, GRIDS[method][0], 99, comm, budget=math.inf, max_steps=3)


# -- one rank --------------------------------------------------------------------------------
def run_local(problem: Problem, methods: Sequence[str], grids: dict[str, Sequence[float]],
              seeds: Sequence[int], say: Callable[[str], None]) -> ProblemResult:
    """The grid on seed 0, then the chosen rates on the other seeds, in this process; the
    methods take turns run by run so that a burst of load hits them alike."""
    from hpcqn.comm import serial_comm

    comm = serial_comm()
    started = time.perf_counter()
    warm_up(methods, comm)
    grid_runs: dict[str, dict[float, Run]] = {m: {} for m in methods}
    for i in range(max(len(grids[m]) for m in methods)):
        for method in methods:
            if i < len(grids[method]):
                lr = grids[method][i]
                grid_runs[method][lr] = combine(
                    method, lr, seeds[0], [train_run(problem, method, lr, seeds[0], comm)])
        say(f"race: {problem.key} grid point {i + 1}")
    scores = {m: {lr: run.loss_at_budget for lr, run in grid_runs[m].items()} for m in methods}
    lrs = {m: min(scores[m], key=lambda lr, m=m: (scores[m][lr], lr)) for m in methods}
    runs = {m: [grid_runs[m][lrs[m]]] for m in methods}
    for seed in seeds[1:]:
        for method in methods:
            runs[method].append(combine(method, lrs[method], seed,
                                        [train_run(problem, method, lrs[method], seed, comm)]))
        say(f"race: {problem.key} seed {seed}")
    first = [r.losses[0] for rs in runs.values() for r in rs if r.losses]
    cap = TARGET_CAP * statistics.median(first) if first else math.inf
    target = pick_target({m: [(r.seconds, r.losses) for r in runs[m]] for m in REFERENCES
                          if m in runs}, TARGET_AT * problem.budget, problem.window, cap)
    return ProblemResult(problem, lrs, scores, runs, time.perf_counter() - started, target)


# -- several ranks ---------------------------------------------------------------------------
def worker(args: argparse.Namespace) -> None:
    """Under ``mpiexec``: every (method, lr, seed) of ``--plan`` on ``--problem``."""
    import hpcqn

    rc.torch_one_thread()
    comm = hpcqn.get_comm()
    problem = problem_by_key(args.problem, args.quick)
    plan = json.loads(args.plan)
    warm_up(list(dict.fromkeys(m for m, _, _ in plan)), comm)
    out = [train_run(problem, method, lr, seed, comm) for method, lr, seed in plan]
    rc.write_worker_json(args.json, comm.rank, out)


def worker_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", help="with --worker: write PREFIX.rank<r>.json")
    parser.add_argument("--problem", help="with --worker: the problem's key")
    parser.add_argument("--plan", help="with --worker: JSON list of [method, lr, seed]")
    parser.add_argument("--seeds", type=int, default=None,
                        help=f"seeds per method (default {SEEDS[False]}, quick {SEEDS[True]})")


def run_ranks(problem: Problem, methods: Sequence[str], lrs: dict[str, float],
              target: float, seeds: Sequence[int], say: Callable[[str], None], quick: bool
              ) -> ProblemResult:
    """The chosen rates on every seed, relaunched under ``mpiexec -n problem.ranks``."""
    started = time.perf_counter()
    plan = [(m, lrs[m], s) for s in seeds for m in methods]
    runs: dict[str, list[Run]] = {m: [] for m in methods}
    error = None
    try:
        ranks = rc.run_workers(Path(__file__), problem.ranks,
                               ["--problem", problem.key, "--plan", json.dumps(plan)]
                               + (["--quick"] if quick else []), timeout=900)
        for k, (method, lr, seed) in enumerate(plan):
            runs[method].append(combine(method, lr, seed, [r[k] for r in ranks]))
    except (FileNotFoundError, RuntimeError, OSError) as exc:
        error = f"{type(exc).__name__}: {str(exc)[-600:]}"
    say(f"race: {problem.key} done on {problem.ranks} ranks")
    return ProblemResult(problem, dict(lrs), {}, runs, time.perf_counter() - started, target,
                         error)


def compute(quick: bool = False, progress: Callable[[str], None] | None = None,
            seeds: int | None = None) -> RaceResults:
    """Every problem, method, grid point and seed."""
    rc.torch_one_thread()
    started = time.perf_counter()
    say = progress or (lambda message: None)
    missing = external_missing()
    methods = tuple(m for m in METHODS if missing is None or m not in EXTERNAL)
    seed_list = list(range(seeds or SEEDS[quick]))
    done: dict[str, ProblemResult] = {}
    for problem in problems(quick):
        if problem.ranks == 1:
            grids = {m: grid_of(m, problem.grid_points) for m in methods}
            done[problem.key] = run_local(problem, methods, grids, seed_list, say)
        else:
            source = done[problem.lr_from]
            done[problem.key] = run_ranks(problem, methods, source.lrs, source.target,
                                          seed_list, say, quick)
        say(f"race: {problem.key} took {done[problem.key].seconds:.0f} s")
    return RaceResults(list(done.values()), methods, seed_list, quick, missing,
                       time.perf_counter() - started)


# -- the section -----------------------------------------------------------------------------
def grid_of(method: str, points: int) -> tuple[float, ...]:
    """The middle ``points`` rates of the method's grid."""
    grid = GRIDS[method]
    start = (len(grid) - points) // 2
    return grid[start : start + points]


def _grid_position(method: str, lr: float, points: int) -> str:
    grid = grid_of(method, points)
    where = grid.index(lr) + 1 if lr in grid else 0
    edge = " edge" if where in (1, len(grid)) else ""
    return f"{lr:g} ({where}/{len(grid)}{edge})"


def explain(result: ProblemResult) -> list[str]:
    """Who is first to the target, with the seeds' spread; where an hpcqn method is not
    first, by how much and why: the ratio of steps to the target times the ratio of the
    seconds per step (the two multiply to the ratio of the times, per seed; medians here)."""
    p, order = result.problem, result.ranking()
    if result.error:
        return [f"This problem failed: {result.error}"]
    if not order:
        best = min(result.runs, key=lambda m: statistics.median(
            [r.loss_at_budget for r in result.runs[m]]))
        return [f"No method reaches training loss {result.target:.3g} within {p.budget:g} s on "
                f"most seeds; the lowest loss at the budget is {LABELS[best]}'s."]
    first, fs = order[0]
    lines = [f"**First to training loss {result.target:.3g}: {LABELS[first]}**, "
             f"{spread(fs.seconds, '.2f')} s (median (min-max) over {fs.reached} of "
             f"{fs.seeds} seeds), {spread(fs.steps, '.0f')} steps at "
             f"{1e3 * fs.median_per_step:.3g} ms per step."]
    if len(order) > 1:
        second, ss = order[1]
        overlap = " (spreads overlap)" if min(ss.seconds) <= max(fs.seconds) else ""
        lines.append(f"Runner-up {LABELS[second]} at {ss.median_seconds / fs.median_seconds:.2f}x "
                     f"the time{overlap}.")
    for method in HPCQN:
        if method not in result.runs or method == first:
            continue
        mine = result.stats(method)
        if not mine.majority:
            losses = [r.loss_at_budget for r in result.runs[method]]
            theirs = [r.loss_at_budget for r in result.runs[first]]
            ms = [1e3 * r.seconds_per_step for r in result.runs[method] if r.steps]
            lines.append(f"- {LABELS[method]} does not reach it on most seeds "
                         f"({mine.reached}/{mine.seeds}): loss at the budget "
                         f"{spread(losses, '.3g')} against {LABELS[first]}'s "
                         f"{spread(theirs, '.3g')}; {spread(ms, '.3g')} ms per step over "
                         f"the budget.")
            continue
        time_ratio = mine.median_seconds / fs.median_seconds
        step_ratio = mine.median_steps / fs.median_steps
        cost_ratio = mine.median_per_step / fs.median_per_step
        if step_ratio > 1 and cost_ratio > 1:
            why = "more steps, and each costs more"
        elif cost_ratio > 1:
            why = ("as many steps, but each costs more" if step_ratio == 1
                   else "fewer steps, but each costs more")
        elif step_ratio > 1:
            why = "cheaper steps, but more of them"
        else:
            why = "medians of different seeds (the spreads decide)"
        lines.append(f"- {LABELS[method]}: {time_ratio:.2f}x {LABELS[first]}'s time "
                     f"({spread(mine.seconds, '.2f')} s) = {step_ratio:.2f}x the steps "
                     f"({mine.median_steps:g} vs {fs.median_steps:g}) x {cost_ratio:.2f}x "
                     f"the seconds per step ({1e3 * mine.median_per_step:.3g} vs "
                     f"{1e3 * fs.median_per_step:.3g} ms): {why}.")
    return lines


def _table(result: ProblemResult) -> list[str]:
    head = ["method", "lr (grid position)", "seeds to target", "steps to target",
            "seconds to target", "ms / step", "loss at budget", "steps in budget"]
    rows = []
    order = [m for m, _ in result.ranking()]
    for method in [*order, *(m for m in result.runs if m not in order)]:
        runs = result.runs[method]
        s = result.stats(method)
        diverged = sum(r.diverged for r in runs)
        losses = [r.loss_at_budget for r in runs if not r.diverged]
        loss = spread(losses, ".3g") + (f" ({diverged} diverged)" if diverged else "")
        rows.append([f"**{LABELS[method]}**" if method in HPCQN else LABELS[method],
                     _grid_position(method, result.lrs[method], result.problem.grid_points),
                     f"{s.reached}/{s.seeds}", spread(s.steps, ".0f"),
                     spread(s.seconds, ".2f"),
                     spread([1e3 * r.seconds_per_step for r in runs if r.steps], ".3g"),
                     loss, spread([r.steps for r in runs], ".0f")])
    return rc.table(head, rows, align="llrrrrrr")


def _grid_table(result: ProblemResult) -> list[str]:
    rows, width = [], max(len(g) for g in result.grid.values())
    for method, scores in result.grid.items():
        cells = [LABELS[method]]
        for lr, loss in scores.items():
            text = f"{lr:g}: " + ("diverged" if not math.isfinite(loss) else f"{loss:.3g}")
            cells.append(f"**{text}**" if lr == result.lrs[method] else text)
        cells += [""] * (width + 1 - len(cells))
        rows.append(cells)
    return rc.table(["method", *(f"lr {i + 1}" for i in range(width))], rows)


def plot(result: ProblemResult, out: Path) -> str:
    """Smoothed training loss against training seconds, every seed, every method."""
    plt = rc.pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.5))
    cmap = plt.get_cmap("tab10")
    for i, (method, runs) in enumerate(result.runs.items()):
        for j, run in enumerate(runs):
            values = np.array(smoothed(run.losses, result.problem.window))
            ok = np.isfinite(values) & (values > 0)
            ax.plot(np.array(run.seconds)[ok], values[ok], color=cmap(i % 10),
                    linewidth=1.6 if method in HPCQN else 1.0,
                    linestyle="-" if method in HPCQN else "--",
                    label=LABELS[method] if j == 0 else None)
    ax.axhline(result.target, color="black", linewidth=0.8, linestyle=":")
    ax.set_yscale("log")
    ax.set_xlabel("training seconds")
    ax.set_ylabel("training loss (smoothed batch loss)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, ncol=3)
    ax.set_title(result.problem.title)
    return rc.save_figure(fig, out, f"race_{result.problem.key}.png")


def lowest_at_budget(result: ProblemResult) -> str:
    """The method with the lowest median loss at the budget, and that loss."""
    medians = {m: statistics.median([r.loss_at_budget for r in runs])
               for m, runs in result.runs.items() if runs}
    if not medians:
        return "-"
    best = min(medians, key=medians.__getitem__)
    return f"{LABELS[best]} {medians[best]:.3g}"


def summary(res: RaceResults) -> list[str]:
    rows = []
    firsts = 0
    for result in res.problems:
        p, order = result.problem, result.ranking()
        if result.error or not order:
            rows.append([p.title, f"{result.target:.3g}", "failed" if result.error else "none",
                         "-", "-", lowest_at_budget(result) if not result.error else "-"])
            continue
        firsts += order[0][0] in HPCQN
        first, fs = order[0]
        hp = [(m, s) for m, s in order if m in HPCQN]
        if first in HPCQN:
            best = "(first)"
            why = "-"
        elif hp:
            m, s = hp[0]
            best = f"{LABELS[m]}, {s.median_seconds / fs.median_seconds:.2f}x"
            why = (f"{s.median_steps / fs.median_steps:.2f}x steps x "
                   f"{s.median_per_step / fs.median_per_step:.2f}x s/step")
        else:
            best, why = "none reaches it", "-"
        rows.append([p.title, f"{result.target:.3g}",
                     f"**{LABELS[first]}** {spread(fs.seconds, '.2f')} s", best, why,
                     lowest_at_budget(result)])
    return [*rc.table(["problem", "target loss", "first (median (min-max) s)",
                       "best hpcqn method, time over first's",
                       "why: steps ratio x s/step ratio", "lowest loss at budget (median)"],
                      rows, align="llllll"),
            "", f"An hpcqn method is first to the target on {firsts} of {len(res.problems)} "
            f"problems."]


def render(res: RaceResults, out: Path, quick: bool = False) -> str:
    out.mkdir(parents=True, exist_ok=True)
    grids = "; ".join(f"{LABELS[m]} {{{', '.join(f'{lr:g}' for lr in GRIDS[m])}}}"
                      for m in res.methods)
    options = "; ".join(f"{LABELS[m]} `{', '.join(f'{k}={v}' for k, v in OPTIONS[m].items())}`"
                        for m in res.methods if OPTIONS[m])
    lines = [
        "## The race: wall-clock time to a target against SGD, Adam, Muon, SOAP and Shampoo",
        "",
        "Float32 ReLU MLPs (He initialisation), cross-entropy on a synthetic teacher-student "
        "classification set "
        f"(Gaussian inputs; labels the argmax of a fixed random tanh teacher "
        f"`d_in-{TEACHER_HIDDEN}-{CLASSES}`), one thread per process. Each run trains for a "
        "fixed wall-clock budget of training time (forward, backward, the gradient average "
        "over ranks, the step; bookkeeping between steps not counted). Time to target: the "
        "training time at the end of the first step where the mean batch loss over the last "
        f"~{SMOOTH_SAMPLES} samples (at most {MAX_WINDOW} steps; each batch's loss measured "
        "in its forward, before its step) is at or below the target. **Target**: per "
        "1-rank problem, the lower of SGD's and Adam's median (over the seeds, at their "
        f"chosen rates) smoothed loss at {TARGET_AT:g} of the budget, so that the better "
        "first-order baseline reaches it at about half the budget and a method up to ~2x "
        f"slower still reaches it within the budget, capped at {TARGET_CAP:g} of the "
        "initial loss (the median first-batch loss); a 2-rank problem uses its 1-rank "
        "problem's target. Loss at budget: the exact training loss on the "
        "first 8192 training samples (2048 for the wide MLP) after the last step. Seeds "
        f"{res.seeds} set the initial model and the batch order; every method starts from "
        "the same model and sees the same batches.",
        "",
        f"**Learning rates**: a fixed grid of seven per method ({grids}); "
        f"{'in quick mode the middle three; ' if quick else ''}the rate with the lowest "
        "loss at the budget on "
        f"seed {res.seeds[0]} is "
        "chosen (diverged counts as worst; 'edge' in the tables: the chosen rate is at the "
        "end of the grid run). 2-rank problems reuse the 1-rank problem's rates (the same "
        "global batch, the same algorithm). **Options**: " + options + ". Muon+AdamW: "
        "`torch.optim.Muon` on every 2-D weight matrix, `torch.optim.AdamW` (same lr, no "
        "weight decay) on the biases. SOAP and Shampoo: `pytorch_optimizer` "
        "4.x. On 2 ranks the torch-only methods average the gradients with "
        "`hpcqn.torch.average_gradients` (one allreduce) before their step; hpcqn's "
        "methods get the communicator. hpcqn methods are in **bold**.",
        "",
    ]
    if res.missing:
        lines += [f"**SOAP and Shampoo are left out**: {res.missing}.", ""]
    if quick:
        lines += ["*Quick mode*: three rates per method, fewer seeds, shorter budgets, "
                  "four problems; a smoke test, not a measurement.", ""]
    lines += ["### Summary: first to the target, per problem", "", *summary(res), ""]
    for result in res.problems:
        p = result.problem
        lines += [f"### {p.title}", "", p.describe() + f"; smoothing window {p.window} "
                  f"step{'s' if p.window > 1 else ''}. This problem took "
                  f"{result.seconds:.0f} s.", ""]
        if result.error:
            lines += [f"Failed: {result.error}", ""]
            continue
        lines += ["Median (min-max) over the seeds; steps and seconds to target over the "
                  "seeds that reached it.", "", *_table(result), "",
                  *explain(result), ""]
        if result.grid:
            lines += [f"Loss at the budget on seed {res.seeds[0]} for each rate of the grid "
                      "(bold: chosen):", "", *_grid_table(result), ""]
        name = plot(result, out)
        lines += [f"![{p.title}: smoothed training loss against seconds]({name})", ""]
    lines.append(f"(race section: {res.seconds:.0f} s)")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    rc.section_main(compute, render, __doc__, worker=worker, add_arguments=worker_arguments,
                    options=lambda args: {"seeds": args.seeds})
