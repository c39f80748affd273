# ruff: noqa: E402  (one thread per process, set before NumPy and torch load)
"""Report section "the race": wall-clock time to a loss target, and the loss at a fixed
wall-clock budget, for first-order optimizers (SGD with momentum, Adam, AdamW, LAMB), the
popular matrix-preconditioned ones (``torch.optim.Muon``; SOAP and Shampoo from
``pytorch-optimizer``) and hpcqn's second-order methods (mL-BFGS, MKOR and MKOR-H with
SGD, Adam or LAMB inside, K-FAC), on 1 and on 2 MPI ranks, on three kinds of problem
(``benchmarks/race_tasks.py``):

- MLPs on a synthetic teacher-student classification set at global batches 1024, 4096
  and 8192, a deeper one and a wide one of about 5M parameters; the target is on the
  training loss;
- a character-level transformer language model on Python's source at global batches of
  256 and 1024 sequences (the regime where the MKOR and mL-BFGS papers' claims begin);
  the target is on the held-out loss;
- the digits CNN at global batch 1024 (of 1347 training images); the target is on the
  held-out loss.

Each run trains for a fixed wall-clock budget of training time (forward, backward, the
gradient average over ranks, the optimizer step; the bookkeeping between steps and the
held-out checks are not counted). A training-loss trace is each step's batch loss,
measured in its forward (an unbiased estimate of the training loss at the current
parameters), read smoothed over the last ``SMOOTH_SAMPLES`` samples; a held-out trace is
the held-out loss checked every ``check_every`` steps. The loss at the budget is the exact
training loss on a fixed subset of the training set (MLPs) or the loss on the whole
held-out set, after the last step.

Learning rates: the middle ``grid_points`` of a grid per method (see ``GRIDS``), then,
while the rate with the lowest loss at the budget on seed 0 is at an end of the rates
run, one more rate half a decade beyond that end (at most ``MAX_EXTENSIONS`` times; a
diverged run counts as worst); 2-rank problems reuse the 1-rank problem's rates (the same
global batch and so the same algorithm). The chosen rates then run on the other seeds.

    python benchmarks/report_race.py [--quick] [--seeds N] [--problems KEY,...]
                                     [--save DIR] [--resume] [--out DIR]

``--save DIR`` writes each problem's results to ``DIR/<key>.json`` as soon as it is done;
``--resume`` loads the problems already saved there instead of running them again (a
long race can be run in parts, or continued after an interruption). Needs
``pytorch-optimizer`` (``pip install -e ".[bench]"``) for SOAP and Shampoo; without it
those two are left out (and the section says so).
"""

from __future__ import annotations

import report_common as rc

rc.one_thread()  # before NumPy and torch load

import argparse
import contextlib
import dataclasses
import io
import json
import math
import statistics
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from race_tasks import (
    CLASSES,
    TEACHER_HIDDEN,
    CharLMTask,
    DigitsCNNTask,
    MLPTask,
    Task,
    batch_rows,
    matrix_parameters,
)
from torch import nn

METHODS = ("sgd", "adam", "adamw", "lamb", "muon", "soap", "shampoo", "mlbfgs", "mkor",
           "mkor_adam", "mkor_lamb", "mkor_h", "mkor_h_lamb", "kfac", "kfac_adam")
HPCQN = ("mlbfgs", "mkor", "mkor_adam", "mkor_lamb", "mkor_h", "mkor_h_lamb", "kfac",
         "kfac_adam")
EXTERNAL = ("soap", "shampoo")  # from pytorch-optimizer
HYBRID = ("mkor_h", "mkor_h_lamb")  # MKOR-H: step(loss=...)
LABELS = {"sgd": "SGD", "adam": "Adam", "adamw": "AdamW", "lamb": "LAMB",
          "muon": "Muon+AdamW", "soap": "SOAP", "shampoo": "Shampoo", "mlbfgs": "mL-BFGS",
          "mkor": "MKOR", "mkor_adam": "MKOR (Adam)", "mkor_lamb": "MKOR (LAMB)",
          "mkor_h": "MKOR-H", "mkor_h_lamb": "MKOR-H (LAMB)", "kfac": "K-FAC",
          "kfac_adam": "K-FAC (Adam)"}
# Which methods race where: the MLPs and the CNN as the ResNet experiments of the MKOR
# paper pair them (SGD inside the second-order methods), the transformer as its BERT
# experiments do (LAMB inside; Adam too, and K-FAC with Adam as in jobs/charlm.toml).
MLP_METHODS = ("sgd", "adam", "adamw", "lamb", "muon", "soap", "shampoo", "mlbfgs", "mkor",
               "mkor_h", "kfac")
CNN_METHODS = MLP_METHODS
LM_METHODS = ("sgd", "adam", "adamw", "lamb", "muon", "soap", "shampoo", "mlbfgs",
              "mkor_lamb", "mkor_adam", "mkor_h_lamb", "kfac_adam")
# Seven learning rates per method, half a decade apart, over each method's usual range
# and one step beyond it on both sides; a problem runs the middle ``grid_points`` and
# extends past an end that holds the best (``MAX_EXTENSIONS``).
_ADAM_GRID = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1)
_LAMB_GRID = (1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0)
_SGD_INSIDE = (0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0)
GRIDS: dict[str, tuple[float, ...]] = {
    "sgd": (0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0),
    "adam": _ADAM_GRID,
    "adamw": _ADAM_GRID,
    "lamb": _LAMB_GRID,
    "muon": (3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3),
    "soap": _ADAM_GRID,
    "shampoo": (3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3),
    "mlbfgs": _SGD_INSIDE,
    "mkor": _SGD_INSIDE,
    "mkor_adam": _ADAM_GRID,
    "mkor_lamb": _LAMB_GRID,
    "mkor_h": _SGD_INSIDE,
    "mkor_h_lamb": _LAMB_GRID,
    "kfac": (0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0),
    "kfac_adam": _ADAM_GRID,
}
# The options besides lr. hpcqn's: jobs/digits_mkor.toml's (MKOR/MKOR-H factor_freq 10,
# MKOR-H window 40 and threshold 0.1; K-FAC KAISA's defaults with damping 0.1, inv_freq
# 10), mL-BFGS its defaults (history 10, period 20); with Adam inside, jobs/charlm.toml's
# (K-FAC damping 0.03). LAMB and AdamW: weight decay 0.01 (AdamW's default in torch, the
# LAMB paper's; the same for the LAMB inside MKOR); the others none. Every preconditioner
# refreshed every 10 steps (SOAP's default; Shampoo's default is 1). MKOR's factor
# warm-up stays off (warmup_steps=0): it did not help on the LM or the CNN
# (benchmarks/race_mkor.py, benchmarks/results/race/mkor_warmup.md).
_MKOR = {"factor_freq": 10}
_HYBRID = {"hybrid_window": 40, "hybrid_threshold": 0.1}
_LAMB = {"optimizer": "lamb", "optimizer_options": {"weight_decay": 0.01}}
OPTIONS: dict[str, dict[str, Any]] = {
    "sgd": {"momentum": 0.9},
    "adam": {},
    "adamw": {"weight_decay": 0.01},
    "lamb": {"weight_decay": 0.01},
    "muon": {"momentum": 0.95, "nesterov": True, "weight_decay": 0.0,
             "adjust_lr_fn": "match_rms_adamw"},
    "soap": {"weight_decay": 0.0, "precondition_frequency": 10},
    "shampoo": {"preconditioning_compute_steps": 10},
    "mlbfgs": {},
    "mkor": _MKOR,
    "mkor_adam": {"optimizer": "adam", **_MKOR},
    "mkor_lamb": {**_LAMB, **_MKOR},
    "mkor_h": {**_MKOR, **_HYBRID},
    "mkor_h_lamb": {**_LAMB, **_MKOR, **_HYBRID},
    "kfac": {"inv_freq": 10, "damping": 0.1, "factor_decay": 0.95, "kl_clip": 1e-3},
    "kfac_adam": {"optimizer": "adam", "inv_freq": 10, "damping": 0.03},
}
SMOOTH_SAMPLES = 2048  # the training-loss trace is the mean batch loss over ~this many samples
MAX_WINDOW = 8  # ... but over at most this many steps
SEEDS = {True: 2, False: 3}
MAX_EXTENSIONS = {True: 1, False: 3}  # rates added past an end of the grid holding the best
# The target: the lowest of the reference methods' median loss at TARGET_AT of the budget
# (so the best first-order baseline reaches it at about that fraction of the budget).
MLP_REFERENCES = ("sgd", "adam")
FIRST_ORDER = ("sgd", "adam", "adamw", "lamb")
TARGET_AT = 0.5
TARGET_CAP = 0.9  # ... and at most this fraction of the initial loss (the first batch's)
MAX_STEPS = 200_000
RESULTS = rc.HERE / "results" / "race"


@dataclass(frozen=True)
class Problem:
    """One race: ``task`` (``benchmarks/race_tasks.py``) at global ``batch`` over
    ``ranks``, ``budget`` seconds of training per run, ``methods`` racing; the target
    from ``references``; held-out tasks checked every ``check_every`` steps;
    ``grid_points`` of each method's grid (the middle ones)."""

    key: str
    title: str
    task: Task
    batch: int
    ranks: int
    budget: float
    methods: tuple[str, ...] = MLP_METHODS
    references: tuple[str, ...] = MLP_REFERENCES
    check_every: int = 0
    lr_from: str | None = None  # a 1-rank problem whose rates and target this one reuses
    grid_points: int = 7

    @property
    def held_out(self) -> bool:
        return self.task.held_out

    @property
    def window(self) -> int:
        """Steps a training-loss trace is smoothed over (1 for held-out checks)."""
        if self.held_out:
            return 1
        return min(MAX_WINDOW, max(1, math.ceil(SMOOTH_SAMPLES / self.batch)))

    def grid(self, method: str) -> tuple[float, ...]:
        return grid_of(method, self.grid_points)

    def describe(self) -> str:
        scored = (f"target on the held-out loss, checked every {self.check_every} steps"
                  if self.held_out else
                  f"target on the training loss, smoothed over {self.window} "
                  f"step{'s' if self.window > 1 else ''}")
        return (f"{self.task.describe()}; global batch {self.batch} on {self.ranks} "
                f"rank{'s' if self.ranks > 1 else ''}, {self.budget:g} s budget per run; "
                f"{scored}")


SMALL = (32, 128, 128, CLASSES)
DEEP = (32, *([128] * 8), CLASSES)
WIDE = (256, *([1024] * 6), CLASSES)
# Width 48, 2 blocks of 4 heads, context 32: one step at batch 1024 (32,768 predicted
# characters) takes 0.3-0.5 s on one core, so a 60 s budget holds ~150 steps; width 64
# costs 2.5x per step, context 64 2x (measured on one core, torch 2.13).
LM = CharLMTask()
CNN = DigitsCNNTask()


def problems(quick: bool) -> list[Problem]:
    """The races. Full: the MLPs (7-point grids), the transformer at batch 256 (1 rank)
    and 1024 (1 and 2 ranks), the CNN at batch 1024 (1 and 2 ranks) (5-point grids).
    Quick: MLP batch 4096 on 1 and 2 ranks, the deep and the wide MLP, the transformer
    and the CNN at batch 256 on 1 and 2 ranks, the middle 3 grid points, short budgets."""
    b, points, large = (0.5, 3, 3) if quick else (1.0, 7, 5)
    mlp = [Problem(f"b{n}", f"Batch {n}, 1 rank", MLPTask(SMALL), n, 1, 1.5 * b,
                   grid_points=points) for n in (1024, 4096, 8192)]
    two = [Problem(f"b{n}_2r", f"Batch {n}, 2 ranks", MLPTask(SMALL), n, 2, 1.5 * b,
                   lr_from=f"b{n}", grid_points=points) for n in (1024, 4096, 8192)]
    deep = Problem("deep", "Deep MLP (8 hidden layers), batch 1024", MLPTask(DEEP), 1024, 1,
                   1.5 * b, grid_points=points)
    wide = Problem("wide", "Wide MLP (5.5M parameters), batch 128",
                   MLPTask(WIDE, n_train=16384, eval_samples=2048), 128, 1,
                   1.5 if quick else 4.0, grid_points=points)
    lm = dict(methods=LM_METHODS, references=FIRST_ORDER, grid_points=large)
    cnn = dict(methods=CNN_METHODS, references=FIRST_ORDER, grid_points=large)
    if quick:
        return [mlp[1], two[1], deep, wide,
                Problem("lm_b256", "Transformer LM, batch 256, 1 rank", LM, 256, 1, 3.0,
                        check_every=4, **lm),
                Problem("lm_b256_2r", "Transformer LM, batch 256, 2 ranks", LM, 256, 2, 3.0,
                        check_every=4, lr_from="lm_b256", **lm),
                Problem("cnn_b256", "Digits CNN, batch 256, 1 rank", CNN, 256, 1, 2.0,
                        check_every=4, **cnn),
                Problem("cnn_b256_2r", "Digits CNN, batch 256, 2 ranks", CNN, 256, 2, 2.0,
                        check_every=4, lr_from="cnn_b256", **cnn)]
    return [*mlp, *two, deep, wide,
            Problem("lm_b256", "Transformer LM, batch 256, 1 rank", LM, 256, 1, 30.0,
                    check_every=16, **lm),
            Problem("lm_b1024", "Transformer LM, batch 1024, 1 rank", LM, 1024, 1, 60.0,
                    check_every=4, **lm),
            Problem("lm_b1024_2r", "Transformer LM, batch 1024, 2 ranks", LM, 1024, 2, 60.0,
                    check_every=4, lr_from="lm_b1024", **lm),
            Problem("cnn_b1024", "Digits CNN, batch 1024, 1 rank", CNN, 1024, 1, 15.0,
                    check_every=4, **cnn),
            Problem("cnn_b1024_2r", "Digits CNN, batch 1024, 2 ranks", CNN, 1024, 2, 15.0,
                    check_every=4, lr_from="cnn_b1024", **cnn)]


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


def check_to_target(seconds: Sequence[float], checks: Sequence[tuple[int, float]],
                    target: float) -> tuple[int, float] | None:
    """(steps, training seconds) at the first held-out check ``(steps taken, loss)`` at
    or below ``target``; None if never. ``seconds[k]``: as for :func:`time_to_target`."""
    for steps, loss in checks:
        if loss <= target:
            return steps, float(seconds[steps - 1])
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


def beyond(lr: float, up: bool) -> float:
    """The next rate half a decade past ``lr`` on the 1-3-10 ladder of the grids (up:
    0.01 -> 0.03 -> 0.1; down: 0.1 -> 0.03 -> 0.01)."""
    decade = 10.0 ** math.floor(math.log10(lr) + 1e-9)
    on_one = lr / decade < 2.0
    factor = (3.0 if on_one else 10.0) if up else (0.3 if on_one else 1.0)
    return float(f"{decade * factor:.3g}")


def best_rate(scores: dict[float, float]) -> float:
    """The rate with the lowest loss at the budget (ties: the lower rate)."""
    return min(scores, key=lambda lr: (scores[lr], lr))


def extension(scores: dict[float, float]) -> float | None:
    """The rate to run next when the best of ``scores`` (rate -> loss at the budget; a
    diverged run is infinite) is at an end of the rates run: half a decade beyond that
    end; None when the best is inside."""
    rates = sorted(scores)
    best = best_rate(scores)
    if best == rates[0]:
        return beyond(rates[0], up=False)
    if best == rates[-1]:
        return beyond(rates[-1], up=True)
    return None


# -- runs ------------------------------------------------------------------------------------
@dataclass
class Run:
    method: str
    lr: float
    seed: int
    seconds: list[float]  # training time at the end of each step
    losses: list[float]  # each step's (global) batch loss, before the step
    final_loss: float  # the loss at the budget (training subset or held-out set)
    error: str | None = None
    checks: list[tuple[int, float]] = field(default_factory=list)  # (steps, held-out loss)
    # Where the time went (seconds over the run): "forward_backward", "step" (the gradient
    # average and the optimizer's step), hpcqn's "phases"; MKOR-H's "switched_at", MKOR's
    # and K-FAC's factor "updates".
    info: dict[str, Any] = field(default_factory=dict)

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

    def per_step(self, what: str) -> float:
        """Seconds per step of ``info[what]`` (or of the phase ``what``); NaN if absent."""
        value = self.info.get(what, self.info.get("phases", {}).get(what))
        return value / self.steps if value is not None and self.steps else math.nan

    def to_target(self, target: float, window: int, held_out: bool = False
                  ) -> tuple[int, float] | None:
        if self.error is not None:
            return None
        if held_out:
            return check_to_target(self.seconds, self.checks, target)
        return time_to_target(self.seconds, self.losses, target, window)

    def trace(self, window: int, held_out: bool) -> tuple[list[float], list[float]]:
        """(seconds, loss) of the trace the target is read on."""
        if held_out:
            return ([self.seconds[k - 1] for k, _ in self.checks],
                    [loss for _, loss in self.checks])
        return self.seconds, smoothed(self.losses, window)


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


def stats_of(runs: Sequence[Run], target: float, window: int, held_out: bool = False
             ) -> Stats:
    hits = [h for h in (r.to_target(target, window, held_out) for r in runs) if h is not None]
    return Stats(len(hits), len(runs), [k for k, _ in hits], [s for _, s in hits],
                 [s / k for k, s in hits])


def ranking(methods: dict[str, list[Run]], target: float, window: int,
            held_out: bool = False) -> list[tuple[str, Stats]]:
    """Methods that reach the target on most seeds, fastest (median seconds) first."""
    ranked = [(m, stats_of(runs, target, window, held_out)) for m, runs in methods.items()]
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
    rates: dict[str, list[float]] = field(default_factory=dict)  # 2 ranks: the 1-rank grid's

    def stats(self, method: str) -> Stats:
        return stats_of(self.runs[method], self.target, self.problem.window,
                        self.problem.held_out)

    def ranking(self) -> list[tuple[str, Stats]]:
        return ranking(self.runs, self.target, self.problem.window, self.problem.held_out)


@dataclass
class RaceResults:
    problems: list[ProblemResult]
    methods: tuple[str, ...]
    seeds: list[int]
    quick: bool
    missing: str | None  # why SOAP and Shampoo are left out, if they are
    seconds: float = 0.0


def save_result(result: ProblemResult, directory: Path) -> Path:
    """``directory/<key>.json``: everything :func:`load_result` needs."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{result.problem.key}.json"
    data = {"key": result.problem.key, "lrs": result.lrs, "seconds": result.seconds,
            "target": result.target, "error": result.error, "rates": result.rates,
            "grid": {m: [[lr, loss] for lr, loss in g.items()] for m, g in result.grid.items()},
            "runs": {m: [dataclasses.asdict(r) for r in runs] for m, runs in result.runs.items()}}
    path.write_text(json.dumps(data, default=lambda x: None if x is None else float(x)) + "\n")
    return path


def load_result(path: Path, problem: Problem) -> ProblemResult:
    data = json.loads(path.read_text())
    runs = {m: [Run(**{**r, "checks": [tuple(c) for c in r["checks"]]}) for r in rs]
            for m, rs in data["runs"].items()}
    grid = {m: {float(lr): float(loss) for lr, loss in g} for m, g in data["grid"].items()}
    return ProblemResult(problem, data["lrs"], grid, runs, data["seconds"],
                         math.nan if data["target"] is None else data["target"], data["error"],
                         data.get("rates", {}))


# -- optimizers ------------------------------------------------------------------------------
class MuonAdamW:
    """``torch.optim.Muon`` on the 2-D weight matrices of the hidden layers and
    ``torch.optim.AdamW`` on the other parameters (biases, embeddings and a head tied to
    one, LayerNorms, convolution filters), as Muon's documentation prescribes, at one
    learning rate (``adjust_lr_fn="match_rms_adamw"`` scales Muon's update to AdamW's
    RMS)."""

    def __init__(self, model: nn.Module, lr: float, **options: Any):
        matrices, others = matrix_parameters(model)
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


def make_optimizer(method: str, model: nn.Module, lr: float, comm: Any,
                   changes: dict[str, Any] | None = None) -> Any:
    """``method`` at ``lr`` with its ``OPTIONS``, updated by ``changes``."""
    options = {**OPTIONS[method], **(changes or {})}
    if method == "muon":
        return MuonAdamW(model, lr, **options)
    if method == "soap":
        from pytorch_optimizer import SOAP

        return SOAP(model.parameters(), lr=lr, **options)
    if method == "shampoo":
        from pytorch_optimizer import Shampoo

        return Shampoo(model.parameters(), lr=lr, **options)
    import hpcqn.torch as ht
    from hpcqn.torch import methods

    if method.startswith("mkor"):
        return ht.MKOR(model, comm, lr=lr, hybrid=method in HYBRID, **options)
    if method.startswith("kfac"):
        return ht.KFAC(model, comm, lr=lr, **options)
    return methods.make(method, model, comm, {**options, "lr": lr})


# -- one run ---------------------------------------------------------------------------------
def train_run(problem: Problem, method: str, lr: float, seed: int, comm: Any,
              budget: float | None = None, max_steps: int = MAX_STEPS,
              changes: dict[str, Any] | None = None) -> dict[str, Any]:
    """One run on this rank: ``budget`` seconds of training (the problem's by default) or
    ``max_steps`` steps, the method's options updated by ``changes``. Returns this rank's
    trace: ``seconds`` and ``losses`` (its own part of each global batch), ``checks``
    (held-out checks), ``final_loss`` (the task's score), ``info`` (see :class:`Run`)
    and ``error``."""
    from hpcqn.timing import PhaseTimer
    from hpcqn.torch import average_gradients

    budget = problem.budget if budget is None else budget
    task = problem.task
    data = task.data()
    x, y = data["train_x"], data["train_y"]
    n_train = x.shape[0]
    rank, size = comm.rank, comm.size
    model = task.model(seed)
    seconds: list[float] = []
    losses: list[float] = []
    checks: list[tuple[int, float]] = []
    error = None
    elapsed = forward_backward = 0.0
    generator = torch.Generator().manual_seed(1000 + seed)
    per_epoch = n_train // problem.batch
    order = torch.empty(0, dtype=torch.long)
    flags = np.zeros(2)
    opt: Any = None
    try:
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            opt = make_optimizer(method, model, lr, comm, changes)
            if method in HPCQN:
                opt.timer = PhaseTimer(comm)
            step = 0
            while step < max_steps:
                if step % per_epoch == 0:
                    order = torch.randperm(n_train, generator=generator)
                rows = batch_rows(order, step, problem.batch, per_epoch, rank, size)
                xb, yb = x[rows], y[rows]
                began = time.perf_counter()
                opt.zero_grad()
                loss = task.loss(model, xb, yb)
                loss.backward()
                value = loss.item()
                middle = time.perf_counter()
                if method not in HPCQN and size > 1:
                    average_gradients(model.parameters(), comm)
                if method in HYBRID:
                    opt.step(loss=value)
                else:
                    opt.step()
                ended = time.perf_counter()
                elapsed += ended - began
                forward_backward += middle - began
                step += 1
                seconds.append(elapsed)
                losses.append(value)
                flags[0], flags[1] = elapsed, 0.0 if math.isfinite(value) else 1.0
                if size > 1:
                    flags = np.asarray(comm.allreduce(flags, op="max"))
                if flags[1] > 0 or flags[0] >= budget:
                    break
                if problem.check_every and step % problem.check_every == 0:
                    checks.append((step, task.check(model, comm)))
    except (ArithmeticError, RuntimeError, ValueError, np.linalg.LinAlgError) as exc:
        error = f"{type(exc).__name__}: {str(exc)[:200]}"
    final = math.nan
    if size > 1:  # the score and the last check are collective: every rank or none
        failed = np.asarray(comm.allreduce(np.array([float(error is not None)]), op="max"))
        if failed[0] > 0 and error is None:
            error = "another rank failed"
    if error is None:
        final = task.score(model, comm)
        if problem.check_every and (not checks or checks[-1][0] != len(losses)):
            checks.append((len(losses), task.check(model, comm)))
    info: dict[str, Any] = {"forward_backward": forward_backward,
                            "step": elapsed - forward_backward}
    if getattr(opt, "timer", None) is not None:
        info["phases"] = dict(opt.timer.seconds)
    if method in HYBRID and opt is not None:
        info["switched_at"] = opt.switch.switched_at
    if getattr(getattr(opt, "core", None), "updates", None) is not None:
        info["updates"] = opt.core.updates  # MKOR's and K-FAC's factor update rounds
    return {"seconds": seconds, "losses": losses, "checks": checks, "final_loss": final,
            "error": error, "info": info}


def combine(method: str, lr: float, seed: int, ranks: list[dict[str, Any]]) -> Run:
    """One run from every rank's trace: the global batch loss is the mean of the ranks'
    (equal parts), the time the slowest rank's, the checks and the final loss rank 0's
    (a held-out loss is the same on every rank), the time split rank 0's."""
    n = min(len(r["losses"]) for r in ranks)
    losses = [float(np.mean([r["losses"][k] for r in ranks])) for k in range(n)]
    seconds = [max(r["seconds"][k] for r in ranks) for k in range(n)]
    errors = [r["error"] for r in ranks if r["error"]]
    checks = [(int(k), float(v)) for k, v in ranks[0].get("checks", []) if k <= n]
    return Run(method, lr, seed, seconds, losses, float(ranks[0]["final_loss"]),
               errors[0] if errors else None, checks, dict(ranks[0].get("info", {})))


def warm_up(problem: Problem, methods: Sequence[str], comm: Any) -> None:
    """Two untimed steps of every method on the problem's task at a small batch (imports,
    first calls, the data)."""
    small = dataclasses.replace(problem, batch=min(problem.batch, 16 * comm.size),
                                check_every=0)
    for method in methods:
        train_run(small, method, GRIDS[method][0], 99, comm, budget=math.inf, max_steps=2)


# -- one rank --------------------------------------------------------------------------------
def run_local(problem: Problem, methods: Sequence[str], seeds: Sequence[int],
              say: Callable[[str], None], extensions: int) -> ProblemResult:
    """The grid on seed 0, extended past an end that holds the best (``extensions``
    rounds at most), then the chosen rates on the other seeds, in this process; the
    methods take turns run by run so that a burst of load hits them alike."""
    from hpcqn.comm import serial_comm

    comm = serial_comm()
    started = time.perf_counter()
    warm_up(problem, methods, comm)
    grid_runs: dict[str, dict[float, Run]] = {m: {} for m in methods}

    def point(method: str, lr: float) -> None:
        grid_runs[method][lr] = combine(
            method, lr, seeds[0], [train_run(problem, method, lr, seeds[0], comm)])

    def scores(method: str) -> dict[float, float]:
        return {lr: run.loss_at_budget for lr, run in grid_runs[method].items()}

    grids = {m: problem.grid(m) for m in methods}
    for i in range(max(len(g) for g in grids.values())):
        for method in methods:
            if i < len(grids[method]):
                point(method, grids[method][i])
        say(f"race: {problem.key} grid point {i + 1}")
    for round_ in range(extensions):
        more = {m: lr for m in methods if (lr := extension(scores(m))) is not None}
        if not more:
            break
        for method, lr in more.items():
            point(method, lr)
        say(f"race: {problem.key} extension {round_ + 1}: "
            + ", ".join(f"{m} {lr:g}" for m, lr in more.items()))
    grid = {m: dict(sorted(scores(m).items())) for m in methods}
    lrs = {m: best_rate(grid[m]) for m in methods}
    runs = {m: [grid_runs[m][lrs[m]]] for m in methods}
    for seed in seeds[1:]:
        for method in methods:
            runs[method].append(combine(method, lrs[method], seed,
                                        [train_run(problem, method, lrs[method], seed, comm)]))
        say(f"race: {problem.key} seed {seed}")
    first = [r.losses[0] for rs in runs.values() for r in rs if r.losses]
    cap = TARGET_CAP * statistics.median(first) if first else math.inf
    target = pick_target({m: [r.trace(problem.window, problem.held_out) for r in runs[m]]
                          for m in problem.references if m in runs},
                         TARGET_AT * problem.budget, 1, cap)
    return ProblemResult(problem, lrs, grid, runs, time.perf_counter() - started, target)


# -- several ranks ---------------------------------------------------------------------------
def worker(args: argparse.Namespace) -> None:
    """Under ``mpiexec``: every (method, lr, seed) of ``--plan`` on ``--problem``."""
    import hpcqn

    rc.torch_one_thread()
    comm = hpcqn.get_comm()
    problem = problem_by_key(args.problem, args.quick)
    plan = json.loads(args.plan)
    warm_up(problem, list(dict.fromkeys(m for m, _, _ in plan)), comm)
    out = [train_run(problem, method, lr, seed, comm) for method, lr, seed in plan]
    rc.write_worker_json(args.json, comm.rank, out)


def worker_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", help="with --worker: write PREFIX.rank<r>.json")
    parser.add_argument("--problem", help="with --worker: the problem's key")
    parser.add_argument("--plan", help="with --worker: JSON list of [method, lr, seed]")
    parser.add_argument("--seeds", type=int, default=None,
                        help=f"seeds per method (default {SEEDS[False]}, quick {SEEDS[True]})")
    parser.add_argument("--problems", default=None,
                        help="comma-separated problem keys to run (default: all); a 2-rank "
                             "problem needs its 1-rank problem, run or --resume'd")
    parser.add_argument("--save", type=Path, default=None,
                        help=f"write each problem's results to DIR/<key>.json (default "
                             f"{RESULTS.relative_to(rc.ROOT)} for the full race, none for "
                             f"--quick)")
    parser.add_argument("--resume", action="store_true",
                        help="load the problems already in the --save directory")


def run_ranks(problem: Problem, methods: Sequence[str], source: ProblemResult,
              seeds: Sequence[int], say: Callable[[str], None], quick: bool) -> ProblemResult:
    """The rates and the target of the 1-rank problem ``source`` on every seed,
    relaunched under ``mpiexec -n problem.ranks`` once per seed."""
    lrs = source.lrs
    started = time.perf_counter()
    runs: dict[str, list[Run]] = {m: [] for m in methods}
    error = None
    try:
        for seed in seeds:
            plan = [(m, lrs[m], seed) for m in methods]
            # budget, warm-up, checks and the scores, with room for a loaded machine
            timeout = 300 + len(plan) * (2.5 * problem.budget + 30)
            ranks = rc.run_workers(Path(__file__), problem.ranks,
                                   ["--problem", problem.key, "--plan", json.dumps(plan)]
                                   + (["--quick"] if quick else []), timeout=timeout)
            for k, (method, lr, _) in enumerate(plan):
                runs[method].append(combine(method, lr, seed, [r[k] for r in ranks]))
            say(f"race: {problem.key} seed {seed} on {problem.ranks} ranks")
    except (FileNotFoundError, RuntimeError, OSError) as exc:
        error = f"{type(exc).__name__}: {str(exc)[-600:]}"
    return ProblemResult(problem, dict(lrs), {}, runs, time.perf_counter() - started,
                         source.target, error, {m: sorted(source.grid[m]) for m in methods})


def compute(quick: bool = False, progress: Callable[[str], None] | None = None,
            seeds: int | None = None, only: Sequence[str] | None = None,
            save: Path | None = None, resume: bool = False) -> RaceResults:
    """Every problem (or those of ``only``), method, grid point and seed; each problem's
    results saved to ``save`` (see the module docs) and, with ``resume``, loaded from
    there when present."""
    rc.torch_one_thread()
    started = time.perf_counter()
    say = progress or (lambda message: None)
    missing = external_missing()
    seed_list = list(range(seeds or SEEDS[quick]))
    chosen = problems(quick)
    if only is not None:
        unknown = set(only) - {p.key for p in chosen}
        if unknown:
            raise SystemExit(f"race: unknown problem(s) {', '.join(sorted(unknown))}; known: "
                             f"{', '.join(p.key for p in chosen)}")
        chosen = [p for p in chosen if p.key in only]
    done: dict[str, ProblemResult] = {}
    shown: list[str] = []

    def source_of(key: str) -> ProblemResult:
        if key not in done and save is not None and (save / f"{key}.json").exists():
            done[key] = load_result(save / f"{key}.json", problem_by_key(key, quick))
        if key not in done:
            raise SystemExit(f"race: {key} (whose rates a 2-rank problem reuses) was neither "
                             f"run nor saved in {save}")
        return done[key]

    for problem in chosen:
        methods = tuple(m for m in problem.methods if missing is None or m not in EXTERNAL)
        path = save / f"{problem.key}.json" if save is not None else None
        if resume and path is not None and path.exists():
            done[problem.key] = load_result(path, problem)
            say(f"race: {problem.key} loaded from {path}")
        elif problem.ranks == 1:
            done[problem.key] = run_local(problem, methods, seed_list, say,
                                          MAX_EXTENSIONS[quick])
        else:
            source = source_of(problem.lr_from or "")
            done[problem.key] = run_ranks(problem, methods, source, seed_list, say, quick)
        if path is not None:
            save_result(done[problem.key], save)
        shown.append(problem.key)
        say(f"race: {problem.key} took {done[problem.key].seconds:.0f} s")
    methods = tuple(m for m in METHODS if any(m in done[k].runs for k in shown))
    return RaceResults([done[k] for k in shown], methods, seed_list, quick, missing,
                       time.perf_counter() - started)


# -- the section -----------------------------------------------------------------------------
def grid_of(method: str, points: int) -> tuple[float, ...]:
    """The middle ``points`` rates of the method's grid."""
    grid = GRIDS[method]
    start = (len(grid) - points) // 2
    return grid[start : start + points]


def _grid_position(result: ProblemResult, method: str) -> str:
    lr = result.lrs[method]
    rates = (sorted(result.grid.get(method, {})) or result.rates.get(method)
             or list(result.problem.grid(method)))
    where = rates.index(lr) + 1 if lr in rates else 0
    edge = " edge" if where in (1, len(rates)) else ""
    return f"{lr:g} ({where}/{len(rates)}{edge})"


def _ms(value: float) -> str:
    return "-" if not math.isfinite(value) else f"{1e3 * value:.3g}"


def step_split(runs: Sequence[Run]) -> str:
    """A method's median cost per step: forward+backward, the step, and hpcqn's phases."""
    def median_of(what: str) -> float:
        values = [r.per_step(what) for r in runs if r.steps]
        values = [v for v in values if math.isfinite(v)]
        return statistics.median(values) if values else math.nan

    text = f"{_ms(median_of('forward_backward'))} + {_ms(median_of('step'))} ms"
    phases = [(name, median_of(name)) for name in
              ("statistics", "factors", "precondition", "update", "communication")]
    shown = [f"{name} {_ms(v)}" for name, v in phases if math.isfinite(v) and v > 0]
    return text + (f" ({', '.join(shown)})" if shown else "")


def explain(result: ProblemResult) -> list[str]:
    """Who is first to the target, with the seeds' spread; where an hpcqn method is not
    first, by how much and why: the ratio of steps to the target times the ratio of the
    seconds per step (the two multiply to the ratio of the times, per seed; medians here),
    the cost of a step split into forward+backward and the optimizer's step (and its
    phases), and what would close the gap: the steps it may take at its cost per step, or
    the cost per step it may have at its steps, to tie the first's median time."""
    p, order = result.problem, result.ranking()
    measure = "held-out loss" if p.held_out else "training loss"
    if result.error:
        return [f"This problem failed: {result.error}"]
    if not order:
        best = min(result.runs, key=lambda m: statistics.median(
            [r.loss_at_budget for r in result.runs[m]]))
        return [f"No method reaches {measure} {result.target:.3g} within {p.budget:g} s on "
                f"most seeds; the lowest loss at the budget is {LABELS[best]}'s."]
    first, fs = order[0]
    lines = [f"**First to {measure} {result.target:.3g}: {LABELS[first]}**, "
             f"{spread(fs.seconds, '.2f')} s (median (min-max) over {fs.reached} of "
             f"{fs.seeds} seeds), {spread(fs.steps, '.0f')} steps at "
             f"{1e3 * fs.median_per_step:.3g} ms per step (forward+backward + step: "
             f"{step_split(result.runs[first])})."]
    if len(order) > 1:
        second, ss = order[1]
        overlap = " (spreads overlap)" if min(ss.seconds) <= max(fs.seconds) else ""
        lines.append(f"Runner-up {LABELS[second]} at {ss.median_seconds / fs.median_seconds:.2f}x "
                     f"the time{overlap}.")
    for method in HPCQN:
        if method not in result.runs or method == first:
            continue
        mine = result.stats(method)
        switched = [r.info.get("switched_at") for r in result.runs[method]]
        switch = ""
        if method in HYBRID:
            steps = [r.steps for r in result.runs[method]]
            switch = (" It switched to its first-order optimizer at step(s) "
                      + ", ".join("never" if s is None else str(s) for s in switched)
                      + f" of {', '.join(str(s) for s in steps)}.")
        if not mine.majority:
            losses = [r.loss_at_budget for r in result.runs[method]]
            theirs = [r.loss_at_budget for r in result.runs[first]]
            lines.append(f"- {LABELS[method]} does not reach it on most seeds "
                         f"({mine.reached}/{mine.seeds}): loss at the budget "
                         f"{spread(losses, '.3g')} against {LABELS[first]}'s "
                         f"{spread(theirs, '.3g')}; per step "
                         f"{step_split(result.runs[method])}.{switch}")
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
        close = (f" To tie it needs {fs.median_seconds / mine.median_per_step:.0f} steps at "
                 f"its cost per step, or {1e3 * fs.median_seconds / mine.median_steps:.3g} "
                 f"ms per step at its {mine.median_steps:g} steps.")
        lines.append(f"- {LABELS[method]}: {time_ratio:.2f}x {LABELS[first]}'s time "
                     f"({spread(mine.seconds, '.2f')} s) = {step_ratio:.2f}x the steps "
                     f"({mine.median_steps:g} vs {fs.median_steps:g}) x {cost_ratio:.2f}x "
                     f"the seconds per step ({1e3 * mine.median_per_step:.3g} vs "
                     f"{1e3 * fs.median_per_step:.3g} ms): {why}. Its step: "
                     f"{step_split(result.runs[method])}.{close if time_ratio > 1 else ''}"
                     f"{switch}")
    return lines


def _table(result: ProblemResult) -> list[str]:
    head = ["method", "lr (position in the rates run)", "seeds to target", "steps to target",
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
                     _grid_position(result, method),
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
    """The trace the target is read on against training seconds, every seed, every
    method."""
    plt = rc.pyplot()
    p = result.problem
    fig, ax = plt.subplots(figsize=(8, 4.5))
    cmap = plt.get_cmap("tab20")
    for i, (method, runs) in enumerate(result.runs.items()):
        for j, run in enumerate(runs):
            seconds, values = (np.array(v) for v in run.trace(p.window, p.held_out))
            ok = np.isfinite(values) & (values > 0)
            ax.plot(seconds[ok], values[ok], color=cmap(i % 20),
                    linewidth=1.6 if method in HPCQN else 1.0,
                    linestyle="-" if method in HPCQN else "--",
                    label=LABELS[method] if j == 0 else None)
    ax.axhline(result.target, color="black", linewidth=0.8, linestyle=":")
    ax.set_yscale("log")
    ax.set_xlabel("training seconds")
    ax.set_ylabel("held-out loss" if p.held_out else "training loss (smoothed batch loss)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, ncol=3)
    ax.set_title(p.title)
    return rc.save_figure(fig, out, f"race_{p.key}.png")


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
        target = f"{result.target:.3g} ({'held-out' if p.held_out else 'training'})"
        if result.error or not order:
            rows.append([p.title, target, "failed" if result.error else "none",
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
        rows.append([p.title, target,
                     f"**{LABELS[first]}** {spread(fs.seconds, '.2f')} s", best, why,
                     lowest_at_budget(result)])
    return [*rc.table(["problem", "target loss", "first (median (min-max) s)",
                       "best hpcqn method, time over first's",
                       "why: steps ratio x s/step ratio", "lowest loss at budget (median)"],
                      rows, align="llllll"),
            "", f"An hpcqn method is first to the target on {firsts} of {len(res.problems)} "
            f"problems.", *_left_out(res)]


def _left_out(res: RaceResults) -> list[str]:
    """A line naming the race's problems this report did not run (``--problems``)."""
    ran = {r.problem.key for r in res.problems}
    missing = [p for p in problems(res.quick) if p.key not in ran]
    if not missing:
        return []
    return ["", "Not run for this report: " + "; ".join(
        f"{p.title} (`{p.key}`)" for p in missing) + "."]


def _options_text(methods: Sequence[str]) -> str:
    def value(v: Any) -> str:
        if isinstance(v, dict):
            return "{" + ", ".join(f"{k}={value(x)}" for k, x in v.items()) + "}"
        return str(v)

    return "; ".join(f"{LABELS[m]} `{', '.join(f'{k}={value(v)}' for k, v in OPTIONS[m].items())}`"
                     for m in methods if OPTIONS[m])


def render(res: RaceResults, out: Path, quick: bool = False) -> str:
    out.mkdir(parents=True, exist_ok=True)
    grids = "; ".join(f"{LABELS[m]} {{{', '.join(f'{lr:g}' for lr in GRIDS[m])}}}"
                      for m in res.methods)
    lines = [
        "## The race: wall-clock time to a target against SGD, Adam, AdamW, LAMB, Muon, "
        "SOAP and Shampoo",
        "",
        "Three kinds of problem (`benchmarks/race_tasks.py`), one thread per process. "
        "**MLPs**: float32 ReLU MLPs (He initialisation), cross-entropy on a synthetic "
        "teacher-student classification set (Gaussian inputs; labels the argmax of a "
        f"fixed random tanh teacher `d_in-{TEACHER_HIDDEN}-{CLASSES}`); the target is on "
        "the training loss: the mean batch loss over the last "
        f"~{SMOOTH_SAMPLES} samples (at most {MAX_WINDOW} steps; each batch's loss "
        "measured in its forward, before its step); the loss at the budget is the exact "
        "training loss on the first 8192 training samples (2048 for the wide MLP). "
        "**Transformer LM**: the character-level transformer of "
        "`hpcqn/experiments/charlm.py` (width 48, two pre-LayerNorm blocks of four heads, "
        "context 32, head tied to the token embedding, 64k parameters) on the source of "
        "twenty standard-library modules, the last 10 % held out; one step at batch 1024 "
        "(32,768 predicted characters) takes about 0.3-0.5 s on one core, so a 60 s "
        "budget is ~150 steps (width 64 would cost 2.5x per step for 1.7x the "
        "parameters). **Digits CNN**: `make_model(\"cnn\")` of "
        "`hpcqn/experiments/training.py` at batch 1024 of the 1347 training images. For "
        "these two the target is on the **held-out loss**, checked every `check_every` "
        "steps on the first 1024 held-out windows (LM) or the 450 held-out images (CNN), "
        "the checks not counted as training time; the loss at the budget is the loss on "
        "the whole held-out set. Each run trains for a fixed wall-clock budget of training "
        "time (forward, backward, the gradient average over ranks, the step; "
        "bookkeeping between steps not counted). Time to target: the training time at "
        "the end of the first step (MLPs) or check (LM, CNN) at or below the target. "
        "**Target**: per 1-rank problem, the lowest median (over the seeds, at their "
        "chosen rates) of the reference methods' trace at "
        f"{TARGET_AT:g} of the budget (MLPs: SGD and Adam; LM and CNN: SGD, Adam, AdamW "
        "and LAMB), so that the best first-order baseline reaches it at about half the "
        "budget and a method up to ~2x slower still reaches it within the budget, capped "
        f"at {TARGET_CAP:g} of the initial loss (the median first-batch loss); a 2-rank "
        "problem uses its 1-rank problem's target. Seeds "
        f"{res.seeds} set the initial model and the batch order; every method starts from "
        "the same model and sees the same batches. Per step, 'forward+backward + step' "
        "splits the cost: the model's forward and backward (MKOR and K-FAC record layer "
        "statistics there on their update steps), then the gradient average and the "
        "optimizer's step, with hpcqn's phases (`hpcqn.timing`).",
        "",
        f"**Learning rates**: a grid of seven per method ({grids}); each problem runs the "
        "middle ones (MLPs 7, LM and CNN 5; quick mode 3), then, while the rate with the "
        "lowest loss at the budget on "
        f"seed {res.seeds[0]} is at an end of the rates run, one more half a decade beyond "
        f"it (at most {MAX_EXTENSIONS[quick]} times; diverged counts as worst; 'edge' in "
        "the tables: still at an end). 2-rank problems reuse the 1-rank problem's rates "
        "(the same global batch, the same algorithm). **Options**: "
        + _options_text(res.methods) + ". Muon+AdamW: `torch.optim.Muon` on the 2-D "
        "weight matrices of the hidden layers, `torch.optim.AdamW` (same lr, no weight "
        "decay) on the rest (biases, embeddings and the tied head, LayerNorms, "
        "convolution filters, which `torch.optim.Muon` does not take). MKOR's factor "
        "warm-up (`warmup_steps`) is off and MKOR-H switches as on the MLPs: at a fixed "
        "step count on the LM and the CNN neither lowered the final held-out loss beyond "
        "the seeds' spread (a 50-step warm-up raised the CNN's with SGD inside; "
        "`benchmarks/race_mkor.py`, "
        "`benchmarks/results/race/mkor_warmup.md`, `mkor_switch.md`). SOAP and Shampoo: "
        "`pytorch_optimizer` 4.x. On 2 ranks the torch-only methods average the gradients "
        "with `hpcqn.torch.average_gradients` (one allreduce) before their step; hpcqn's "
        "methods get the communicator. hpcqn methods are in **bold**.",
        "",
    ]
    if res.missing:
        lines += [f"**SOAP and Shampoo are left out**: {res.missing}.", ""]
    if quick:
        lines += ["*Quick mode*: three rates per method, fewer seeds, short budgets, the LM "
                  "and the CNN at batch 256; a smoke test, not a measurement.", ""]
    lines += ["### Summary: first to the target, per problem", "", *summary(res), ""]
    for result in res.problems:
        p = result.problem
        lines += [f"### {p.title}", "", p.describe() + f". This problem took "
                  f"{result.seconds:.0f} s.", ""]
        if result.error:
            lines += [f"Failed: {result.error}", ""]
            continue
        lines += ["Median (min-max) over the seeds; steps and seconds to target over the "
                  "seeds that reached it.", "", *_table(result), "",
                  *explain(result), ""]
        if result.grid:
            lines += [f"Loss at the budget on seed {res.seeds[0]} for each rate run "
                      "(bold: chosen):", "", *_grid_table(result), ""]
        name = plot(result, out)
        lines += [f"![{p.title}: the target's trace against seconds]({name})", ""]
    lines.append(f"(race section: {res.seconds:.0f} s)")
    return "\n".join(lines) + "\n"


def _options(args: argparse.Namespace) -> dict[str, Any]:
    save = args.save if args.save is not None else (None if args.quick else RESULTS)
    if args.resume and save is None:
        raise SystemExit("race: --resume needs --save DIR (quick mode saves nothing by "
                         "default)")
    return {"seeds": args.seeds, "save": save, "resume": args.resume,
            "only": args.problems.split(",") if args.problems else None}


if __name__ == "__main__":
    rc.section_main(compute, render, __doc__, worker=worker, add_arguments=worker_arguments,
                    options=_options)
