"""Report section: how each optimizer's step time scales with the model size, against
SGD's step and against each method's memory-traffic floor.

A float32 MLP of ``LAYERS`` equal square ``Linear(w, w)`` layers (ReLU between them,
cross-entropy over ``w`` classes on random inputs, batch ``BATCH``) with ``w`` chosen so
that the parameter count is about ``n``, one process, one thread. For every method the
steps ``optimizer.step()`` are timed one by one with ``time.perf_counter`` (forward and
backward are timed too, apart); see :func:`render` for what the section states.

    python benchmarks/report_scaling.py [--quick] [--out DIR]
"""

# ruff: noqa: E402  (one thread per process, set before NumPy and torch load)
from __future__ import annotations

import report_common as rc

rc.one_thread()  # before NumPy and torch load

import gc
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from common import triad_bandwidth
from torch import nn

import hpcqn
from hpcqn.torch import KFAC, MKOR, MLBFGS

LAYERS = 4
BATCH = 32
METHODS = ("sgd", "adam", "mlbfgs", "mkor", "kfac")
HISTORY, PERIOD = 10, 20  # mL-BFGS, as jobs/digits_mlp.toml's [methods.mlbfgs] runs it
INV_FREQ = 10  # MKOR and K-FAC
STEPS = 20  # timed steps per round: a multiple of INV_FREQ and of PERIOD
SIZES = {True: (100_000, 300_000, 1_000_000, 3_000_000),
         False: (100_000, 300_000, 1_000_000, 3_000_000, 10_000_000)}
ROUNDS = {True: 2, False: 3}  # rounds of STEPS timed steps below ONE_ROUND parameters
ONE_ROUND = 3_000_000
FIRST_ORDER_WARMUP = 3
MAX_HISTORY_WARMUP = 5 * HISTORY
TRIAD_N = 20_000_000  # float32 entries per array: 80 MB, beyond the last-level cache
GEMM_D = 1024


@dataclass
class MethodTiming:
    method: str
    steps: list[float] = field(default_factory=list)  # seconds, every timed step
    updates: list[bool] = field(default_factory=list)  # whether it refreshed curvature
    fwd_bwd: list[float] = field(default_factory=list)
    warmup: int = 0

    @property
    def mean(self) -> float:
        """The plain mean over all timed steps (whole rounds, update steps included)."""
        return float(np.mean(self.steps))

    @property
    def amortised(self) -> float:
        """The median update step and the median other step, weighted by their shares of
        the timed steps: the amortised step, robust to a burst of load on one step."""
        share = sum(self.updates) / len(self.updates)
        plain = self.plain
        return (self.update or 0.0) * share + (plain or 0.0) * (1.0 - share)

    def _where(self, update: bool) -> float | None:
        chosen = [s for s, u in zip(self.steps, self.updates, strict=True) if u == update]
        return float(np.median(chosen)) if chosen else None

    @property
    def plain(self) -> float | None:
        """The median of the steps that refresh no curvature."""
        return self._where(False)

    @property
    def update(self) -> float | None:
        return self._where(True)


@dataclass
class SizeResult:
    n_target: int
    width: int
    params: int
    shapes: list[tuple[int, int]]  # (d_out, d_in) with the bias column
    rounds: int
    methods: dict[str, MethodTiming] = field(default_factory=dict)


@dataclass
class ScalingResults:
    sizes: list[SizeResult]
    triad: float  # bytes/s, float32, median over the measurements
    triads: list[float]
    gemm: float  # flop/s of a float32 GEMM_D matmul, one thread
    seconds: float


# -- the model and the methods ---------------------------------------------------------------
def width_for(n: int) -> int:
    """``w`` with ``LAYERS * (w^2 + w)`` closest to ``n``."""
    return max(2, round((-1.0 + math.sqrt(1.0 + 4.0 * n / LAYERS)) / 2.0))


def build_model(width: int) -> nn.Module:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for k in range(LAYERS):
        layers.append(nn.Linear(width, width))
        if k < LAYERS - 1:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers).to(torch.float32)


def build_optimizer(method: str, model: nn.Module) -> torch.optim.Optimizer:
    comm = hpcqn.serial_comm()
    if method == "sgd":
        return torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    if method == "adam":
        return torch.optim.Adam(model.parameters(), lr=1e-3)
    if method == "mlbfgs":  # period 1 while the histories fill (see fill_history)
        # min_cos=0: the timing needs full histories, and pairs formed on this fixed
        # random batch may be nearly orthogonal; the test costs one dot per pair.
        return MLBFGS(model.parameters(), comm, lr=0.1, history=HISTORY, period=1,
                      min_cos=0.0)
    if method == "mkor":
        return MKOR(model, comm, optimizer="sgd", lr=0.01, factor_freq=INV_FREQ)
    if method == "kfac":
        return KFAC(model, comm, optimizer="sgd", lr=0.1, inv_freq=INV_FREQ, factor_freq=1,
                    factor_decay=0.95, damping=1e-3, kl_clip=1e-3, method="inverse",
                    placement="redundant")
    raise ValueError(f"unknown method {method!r}")


def _pairs(opt: MLBFGS) -> int:
    stats = opt.core.statistics()
    return stats["npairs"] + stats["skipped_pairs"]


def is_update(method: str, opt: Any) -> bool:
    """Whether the next step refreshes the curvature (MKOR's factor updates, K-FAC's
    inversions); mL-BFGS's pair steps are found after the fact (see :func:`time_method`)."""
    if method == "mkor":
        return bool(opt.core.is_update_step(opt.steps))
    if method == "kfac":
        return bool(opt.core.is_inverse_step(opt.steps))
    return False


class Loop:
    """One model, optimizer and fixed random batch; times forward+backward and step."""

    def __init__(self, method: str, width: int):
        self.method = method
        self.model = build_model(width)
        self.opt = build_optimizer(method, self.model)
        generator = torch.Generator().manual_seed(1)
        self.x = torch.randn(BATCH, width, generator=generator)
        self.y = torch.randint(0, width, (BATCH,), generator=generator)

    def forward_backward(self) -> float:
        start = time.perf_counter()
        self.opt.zero_grad()
        nn.functional.cross_entropy(self.model(self.x), self.y).backward()
        return time.perf_counter() - start

    def step(self) -> float:
        start = time.perf_counter()
        self.opt.step()
        return time.perf_counter() - start

    def fill_history(self) -> int:
        """mL-BFGS at period 1 until every block holds HISTORY pairs, then period PERIOD
        (one pair-forming step in every PERIOD consecutive steps); returns the steps."""
        assert isinstance(self.opt, MLBFGS)
        core, steps = self.opt.core, 0
        while not (len(core.block_state) == len(core.owned) and all(
                len(s["history"]) >= HISTORY for s in core.block_state.values())):
            if steps >= MAX_HISTORY_WARMUP:
                raise RuntimeError(f"mL-BFGS histories not full after {steps} steps: "
                                   f"{core.statistics()}")
            self.forward_backward()
            self.step()
            steps += 1
        core.period = PERIOD
        return steps

    def check(self) -> None:
        if not all(bool(torch.isfinite(p).all()) for p in self.model.parameters()):
            raise RuntimeError(f"{self.method}: a parameter is not finite after the timing")


def time_method(method: str, width: int, rounds: int) -> MethodTiming:
    loop = Loop(method, width)
    timing = MethodTiming(method)
    if method == "mlbfgs":
        timing.warmup = loop.fill_history()
    else:  # MKOR and K-FAC: the timed rounds start at an update step
        timing.warmup = INV_FREQ if method in ("mkor", "kfac") else FIRST_ORDER_WARMUP
        for _ in range(timing.warmup):
            loop.forward_backward()
            loop.step()
    for _ in range(rounds * STEPS):
        timing.fwd_bwd.append(loop.forward_backward())
        update = is_update(method, loop.opt)
        before = _pairs(loop.opt) if method == "mlbfgs" else 0
        timing.steps.append(loop.step())
        if method == "mlbfgs":
            update = _pairs(loop.opt) > before
        timing.updates.append(update)
    loop.check()
    return timing


# -- floors ----------------------------------------------------------------------------------
def floor_bytes(method: str, n: int, shapes: list[tuple[int, int]]) -> int:
    """Bytes one step must move at least (float32), as the section explains."""
    if method == "sgd":
        return 5 * n * 4
    if method == "adam":
        return 7 * n * 4
    if method == "mlbfgs":
        return 2 * 2 * HISTORY * n * 4 + 11 * n * 4
    factors = sum(o * o + i * i for o, i in shapes)
    return factors * 4 + 7 * n * 4  # mkor, kfac


def precondition_flops(shapes: list[tuple[int, int]]) -> int:
    """``L G R`` per layer: ``2 (d_out^2 d_in + d_out d_in^2)`` flops."""
    return sum(2 * (o * o * i + o * i * i) for o, i in shapes)


def gemm_rate() -> float:
    """Flop/s of a float32 ``GEMM_D`` x ``GEMM_D`` matmul (NumPy, best of 3)."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((GEMM_D, GEMM_D), dtype=np.float32)
    b = rng.standard_normal((GEMM_D, GEMM_D), dtype=np.float32)
    a @ b
    best = min(rc.mean_seconds(lambda: a @ b, 1) for _ in range(3))
    return 2.0 * GEMM_D**3 / best


def floor_seconds(method: str, size: SizeResult, triad: float) -> float:
    return floor_bytes(method, size.params, size.shapes) / triad


# -- measuring -------------------------------------------------------------------------------
def compute(quick: bool, progress: Any = None) -> ScalingResults:
    rc.torch_one_thread()
    started = time.perf_counter()
    say = progress or (lambda message: None)
    triads = [triad_bandwidth(TRIAD_N, np.float32, 5)]
    gemm = gemm_rate()
    for method in METHODS:  # discarded: the first steps of a process run slower
        time_method(method, width_for(SIZES[quick][0]), 1)
    sizes = []
    for n_target in SIZES[quick]:
        width = width_for(n_target)
        rounds = ROUNDS[quick] if n_target < ONE_ROUND else 1
        shapes = [(width, width + 1)] * LAYERS
        size = SizeResult(n_target, width, LAYERS * (width * width + width), shapes, rounds)
        for method in METHODS:
            say(f"scaling: n = {size.params:,}, {method}")
            size.methods[method] = time_method(method, width, rounds)
            gc.collect()
        triads.append(triad_bandwidth(TRIAD_N, np.float32, 5))
        sizes.append(size)
    return ScalingResults(sizes, float(np.median(triads)), triads, gemm,
                          time.perf_counter() - started)


# -- the section -----------------------------------------------------------------------------
def _table(res: ScalingResults) -> list[str]:
    head = ["n (width)", "method", "step ms, amortised", "step ms, mean of all",
            "step ms, no update", "step ms, update steps", "step / SGD step",
            "no-update step / SGD step", "fwd+bwd ms", "memory floor ms",
            "step / memory floor", "GEMM floor ms"]
    rows = []
    for size in res.sizes:
        sgd = size.methods["sgd"].amortised
        for method, t in size.methods.items():
            floor = floor_seconds(method, size, res.triad)
            gemm = (precondition_flops(size.shapes) / res.gemm
                    if method in ("mkor", "kfac") else None)
            updates = sum(t.updates)
            rows.append([
                f"{size.params:,} ({size.width})", rc.LABELS[method], rc.ms(t.amortised),
                rc.ms(t.mean), rc.ms(t.plain),
                f"{rc.ms(t.update)} ({updates})" if updates else "-",
                rc.ratio(t.amortised, sgd), rc.ratio(t.plain, sgd),
                rc.ms(float(np.median(t.fwd_bwd))), rc.ms(floor),
                rc.ratio(t.amortised, floor),
                rc.ms(gemm)])
    return rc.table(head, rows, left=2)


def plot(res: ScalingResults, out: Path) -> str:
    plt = rc.pyplot()
    fig, ax = plt.subplots(figsize=(10.5, 5))
    ns = [s.params for s in res.sizes]
    for method in METHODS:
        color = rc.COLORS[method]
        ratios = [s.methods[method].amortised / s.methods["sgd"].amortised
                  for s in res.sizes]
        ax.plot(ns, ratios, "o-", color=color, label=f"{rc.LABELS[method]}: step / SGD step")
        floors = [floor_seconds(method, s, res.triad) / s.methods["sgd"].amortised
                  for s in res.sizes]
        ax.plot(ns, floors, "--", color=color, alpha=0.8,
                label=f"{rc.LABELS[method]}: memory floor / SGD step")
        if method in ("mkor", "kfac"):
            gemm = [precondition_flops(s.shapes) / res.gemm / s.methods["sgd"].amortised
                    for s in res.sizes]
            ax.plot(ns, gemm, ":", color=color, alpha=0.8,
                    label=f"{rc.LABELS[method]}: GEMM floor / SGD step")
    ax.axhline(1.0, color="black", lw=0.6)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("parameters n (float32)")
    ax.set_ylabel("time per optimizer step / SGD's step")
    ax.set_title(f"Optimizer step vs model size: MLP of {LAYERS} equal layers, batch {BATCH}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return rc.save_figure(fig, out, "scaling_step_ratio.png")


def render(res: ScalingResults, out: Path, quick: bool) -> str:
    name = plot(res, out)
    triads = ", ".join(f"{t / 1e9:.1f}" for t in res.triads)
    largest = res.sizes[-1]
    lines = [
        "## Optimizer step vs model size",
        "",
        f"An MLP of {LAYERS} equal square layers `Linear(w, w)` (ReLU between, cross-entropy "
        f"over `w` classes on a fixed random batch of {BATCH}; n = {LAYERS}(w² + w) "
        f"parameters, float32), one process, one thread. Per method and size: a warm-up "
        f"(SGD, Adam: {FIRST_ORDER_WARMUP} steps; MKOR and K-FAC: {INV_FREQ} steps, so that "
        f"the timed steps start at a curvature update; mL-BFGS: period 1 until every block "
        f"(one per layer) holds {HISTORY} pairs, then period {PERIOD}), then "
        f"{ROUNDS[quick]} rounds of {STEPS} timed steps ({ONE_ROUND / 1e6:g}M parameters "
        f"and more: 1 round), each `optimizer.step()` "
        f"timed alone with `time.perf_counter` after its forward and backward. "
        f"{STEPS} is a multiple of MKOR's `factor_freq` and K-FAC's `inv_freq` {INV_FREQ} and of "
        f"mL-BFGS's `period` {PERIOD}, so the timed steps hold the update steps in their "
        f"true share. *Update steps*: the median of MKOR's factor updates, K-FAC's "
        f"inversions, or the steps that form an mL-BFGS pair (their count in brackets); "
        f"*no update*: the median of the other steps; *amortised*: the two medians "
        f"weighted by their shares (what the ratios use: a burst of load from other "
        f"processes on this shared machine moves a mean, not a median); *mean of all*: "
        f"the plain mean of the timed steps, for comparison. Options: SGD lr 0.01 "
        f"momentum 0.9; Adam lr 1e-3; `hpcqn.torch.MLBFGS` lr 0.1, history {HISTORY}, "
        f"period {PERIOD} (defaults otherwise: normalised direction, heavy-ball 0.9); "
        f"`hpcqn.torch.MKOR` SGD lr 0.01, inv_freq {INV_FREQ}; `hpcqn.torch.KFAC` SGD "
        f"lr 0.1, inv_freq {INV_FREQ}, factor_freq 1, factor_decay 0.95, damping 1e-3, "
        f"kl_clip 1e-3, inverse method, redundant placement. MKOR's and K-FAC's steps "
        f"include turning the recorded layer rows into statistics (their hooks' recording "
        f"is in forward+backward).",
        "",
        "**Floors.** *Memory floor* = the bytes a step must move / the float32 triad "
        f"bandwidth measured in this run (NumPy `a = b + s c`, {TRIAD_N:.0e} entries, best "
        f"of 5, before the first size and after each size: {triads} GB/s, median "
        f"{res.triad / 1e9:.1f} GB/s; `common.triad_bandwidth` counts 3 arrays while NumPy "
        f"makes two passes, so this is below a fused triad's rate: the floors are "
        f"somewhat high, and a step can come in under its floor). Bytes per step: SGD "
        f"with momentum 5n x 4 B (read p, g, buf; write p, buf); Adam 7n x 4 B (read "
        f"p, g, m, v; write p, m, v); "
        f"mL-BFGS 2 x 2M x n x 4 B (the history of M = {HISTORY} pairs read twice: "
        f"`[S Y]ᵀ g`, then `[S Y] c`) + 11n x 4 B (read θ, g, both momenta and the "
        f"direction's heavy-ball buffer, write those four back, write the direction and "
        f"read it again after its global norm); MKOR and K-FAC read both factor matrices "
        f"of every layer, Σ (d_in² + d_out²) x 4 B, + 7n x 4 B (read the gradient, write "
        f"the preconditioned one, then the inner SGD-momentum update's 5n). MKOR and "
        f"K-FAC are compute-bound matrix products, so their memory floor is a loose lower "
        f"bound only; the *GEMM floor* (dotted in the plot) is the preconditioning's "
        f"2 Σ (d_out² d_in + d_out d_in²) flops over a float32 {GEMM_D}x{GEMM_D} NumPy "
        f"matmul's rate measured here ({res.gemm / 1e9:.1f} GFLOP/s, one thread); it "
        f"leaves out the amortised factor work.",
        "",
        "**How to read it.** A ratio near the dashed line of the same colour means the "
        "method runs at memory speed and cannot get much faster on this machine; SGD's own "
        "ratio to its floor says how far a fused 5n-pass update is from the triad (below "
        "about a million parameters the vectors partly stay in the caches, so a step can "
        "beat the DRAM triad's floor: a ratio below 1). As n "
        "grows the first-order steps and mL-BFGS (O(Mn) work) keep a roughly constant "
        "ratio to SGD, while MKOR and K-FAC grow with the layer width w "
        "(O(w³) per layer for O(w²) parameters: their ratio to SGD rises about "
        "linearly in w = sqrt(n / layers)).",
        "",
        *_table(res),
        "",
        f"![Optimizer step time over SGD's vs parameters]({name})",
        "",
    ]
    step = {m: t.amortised for m, t in largest.methods.items()}
    gemm = precondition_flops(largest.shapes) / res.gemm
    lines.append(
        f"At n = {largest.params:,}: mL-BFGS's step is {step['mlbfgs'] / step['sgd']:.1f}x "
        f"SGD's and {step['mlbfgs'] / floor_seconds('mlbfgs', largest, res.triad):.2f}x its "
        f"memory floor; MKOR's is {step['mkor'] / step['sgd']:.0f}x and K-FAC's "
        f"{step['kfac'] / step['sgd']:.0f}x SGD's (MKOR {step['mkor'] / gemm:.2f}x, K-FAC "
        f"{step['kfac'] / gemm:.2f}x their GEMM floor).")
    lines += ["", f"(scaling section: {res.seconds:.0f} s)", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    rc.section_main(compute, render, __doc__)
