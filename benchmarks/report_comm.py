# ruff: noqa: E402  (one thread per process, set before NumPy and torch load)
"""Report section: communication bytes per optimizer step per rank, counted by the
communicator on 1, 2 and 4 MPI ranks, checked against a cost model per method, and the
model extrapolated to 64 and 1024 ranks.

The counts come from ``mpiexec -n P python benchmarks/report_comm.py --worker --json
PREFIX`` (every rank writes ``PREFIX.rank<r>.json``), launched by :func:`run`.

    python benchmarks/report_comm.py [--quick] [--out DIR]
"""

from __future__ import annotations

import report_common as rc

rc.one_thread()  # before NumPy and torch load

import argparse
import json
import math
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

import hpcqn
from hpcqn.comm import Communicator
from hpcqn.experiments.training import make_model
from hpcqn.torch import KFAC, MKOR, MLBFGS, average_gradients

METHODS = ("sgd", "mlbfgs", "mkor", "mkor_owner", "kfac", "kfac_owner")
RANKS = (1, 2, 4)
EXTRAPOLATE = (64, 1024)
GLOBAL_BATCH = 64
INV_FREQ = 10  # MKOR's factor updates, K-FAC's inversions
FACTOR_FREQ = 1  # K-FAC's factor (statistics) steps
PERIOD = 20  # mL-BFGS
WARMUP = 2
STEPS = {True: 20, False: 60}  # multiples of INV_FREQ and PERIOD
SCALARS = 3  # per layer in the fused statistics buffer of MKOR and K-FAC
SCALAR_BYTES = 16  # mL-BFGS's direction-norm reduction: a flag and one float64
KINDS = ("allreduce", "reduce_scatter", "allgatherv")


# -- measuring (every rank) ------------------------------------------------------------------
def build(method: str, model: nn.Module, comm: Communicator) -> torch.optim.Optimizer:
    if method == "sgd":
        return torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    if method == "mlbfgs":
        return MLBFGS(model.parameters(), comm, lr=0.1, history=10, period=PERIOD)
    placement = "owner" if method.endswith("_owner") else "redundant"
    if method.startswith("mkor"):
        return MKOR(model, comm, optimizer="sgd", lr=0.01, factor_freq=INV_FREQ,
                    placement=placement)
    return KFAC(model, comm, optimizer="sgd", lr=0.1, inv_freq=INV_FREQ,
                factor_freq=FACTOR_FREQ, placement=placement)


def measure(comm: Communicator, steps: int) -> dict[str, dict[str, dict[str, int]]]:
    """Per method: this rank's counters (calls, bytes sent, bytes received per kind of
    collective) over ``steps`` steps after ``WARMUP`` uncounted ones."""
    torch.manual_seed(1000 + comm.rank)  # each rank its own random part of the batch
    rows = GLOBAL_BATCH // comm.size
    x, y = torch.randn(rows, 64), torch.randint(0, 10, (rows,))
    counted: dict[str, dict[str, dict[str, int]]] = {}
    for method in METHODS:
        model = make_model("mlp", seed=0)
        opt = build(method, model, comm)
        for step in range(WARMUP + steps):
            if step == WARMUP:
                comm.reset_counters()
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            if method == "sgd":
                average_gradients(model.parameters(), comm)
            opt.step()
        counted[method] = {kind: {"calls": c.calls, "sent": c.nbytes,
                                  "received": c.nbytes_received}
                           for kind, c in comm.counters.items()}
    return counted


def worker(args: argparse.Namespace) -> None:
    rc.torch_one_thread()
    comm = hpcqn.get_comm()
    counted = measure(comm, args.steps)
    Path(f"{args.json}.rank{comm.rank}.json").write_text(json.dumps(counted))


def worker_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", help="with --worker: write PREFIX.rank<r>.json")
    parser.add_argument("--steps", type=int, default=STEPS[True],
                        help="with --worker: counted steps per method")


@dataclass
class Counted:
    """Mean over the ranks of bytes per step per rank, per method and kind."""

    ranks: int
    sent: dict[str, dict[str, float]]
    received: dict[str, dict[str, float]]
    calls: dict[str, dict[str, float]]
    max_sent: dict[str, float]  # the busiest rank's total sent per step


def merge(per_rank: list[dict[str, Any]], steps: int) -> Counted:
    ranks = len(per_rank)
    sent: dict[str, dict[str, float]] = {}
    received: dict[str, dict[str, float]] = {}
    calls: dict[str, dict[str, float]] = {}
    max_sent: dict[str, float] = {}
    for method in METHODS:
        kinds = sorted({k for rank in per_rank for k in rank[method]})
        sent[method], received[method], calls[method] = {}, {}, {}
        for kind in kinds:
            values = [rank[method].get(kind, {"calls": 0, "sent": 0, "received": 0})
                      for rank in per_rank]
            sent[method][kind] = statistics.fmean(v["sent"] for v in values) / steps
            received[method][kind] = statistics.fmean(v["received"] for v in values) / steps
            calls[method][kind] = statistics.fmean(v["calls"] for v in values) / steps
        max_sent[method] = max(sum(v["sent"] for v in rank[method].values())
                               for rank in per_rank) / steps
    return Counted(ranks, sent, received, calls, max_sent)


def count(ranks: int, steps: int) -> Counted:
    """Launch ``mpiexec -n ranks`` on this file's worker and merge its ranks' counts."""
    with tempfile.TemporaryDirectory(prefix="hpcqn_comm_") as tmp:
        prefix = str(Path(tmp) / "comm")
        rc.run_mpi(Path(__file__).resolve(), ranks,
                   ["--worker", "--json", prefix, "--steps", str(steps)])
        per_rank = [json.loads(Path(f"{prefix}.rank{r}.json").read_text())
                    for r in range(ranks)]
    return merge(per_rank, steps)


# -- the cost model --------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelShape:
    """What the cost model needs of a model: parameters, tensors, layer shapes."""

    n: int
    tensors: int
    shapes: tuple[tuple[int, int], ...]  # (d_out, d_in) with the bias column

    @classmethod
    def of(cls, model: nn.Module) -> ModelShape:
        params = [p for p in model.parameters() if p.requires_grad]
        shapes = tuple((m.out_features, m.in_features + (m.bias is not None))
                       for m in model.modules() if isinstance(m, nn.Linear))
        return cls(sum(p.numel() for p in params), len(params), shapes)

    @property
    def sum_d(self) -> int:
        return sum(o + i for o, i in self.shapes)

    @property
    def sum_d2(self) -> int:
        return sum(o * o + i * i for o, i in self.shapes)


@dataclass(frozen=True)
class Term:
    """One collective of a step: its kind, the whole vector's bytes (``payload``), how
    often per step, and whether hpcqn skips it on one rank."""

    kind: str  # allreduce, reduce_scatter, allgatherv, scalars
    payload: float
    per_step: float = 1.0
    parallel_only: bool = True

    def active(self, ranks: int) -> bool:
        return ranks > 1 or not self.parallel_only

    def sent(self, ranks: int) -> float:
        """Bytes this rank hands to the collective (mean over ranks)."""
        if not self.active(ranks):
            return 0.0
        share = self.payload / ranks if self.kind == "allgatherv" else self.payload
        return share * self.per_step

    def received(self, ranks: int) -> float:
        if not self.active(ranks):
            return 0.0
        if self.kind == "reduce_scatter":
            share = self.payload / ranks
        elif self.kind == "scalars":
            share = self.payload * ranks
        else:
            share = self.payload
        return share * self.per_step

    def wire(self, ranks: int) -> float:
        """Bytes this rank sends on the wire in a ring algorithm (a model)."""
        if ranks == 1:
            return 0.0
        factor = {"allreduce": 2.0 * (ranks - 1) / ranks, "reduce_scatter": (ranks - 1) / ranks,
                  "allgatherv": (ranks - 1) / ranks, "scalars": ranks - 1.0}[self.kind]
        return factor * self.payload * self.per_step

    @property
    def counter(self) -> str:
        """The communicator's counter this term lands in."""
        return "allreduce" if self.kind == "scalars" else self.kind


def terms(method: str, shape: ModelShape, ranks: int) -> list[Term]:
    """The collectives of one step of ``method`` (ranks enter the mL-BFGS flag slots)."""
    n, t = shape.n, shape.tensors
    layers = len(shape.shapes)
    gradients = Term("allreduce", 4.0 * (n + t))  # average_gradients: values + one flag each
    if method == "sgd":
        return [gradients]
    if method == "mlbfgs":
        return [Term("reduce_scatter", 4.0 * (n + ranks)),  # gradient + one flag per rank
                Term("allgatherv", 4.0 * n, parallel_only=False),  # the new parameters
                Term("scalars", SCALAR_BYTES, parallel_only=False)]  # the direction's norm
    owner = [Term("allgatherv", 4.0 * n, parallel_only=False)] if method.endswith(
        "_owner") else []
    if method.startswith("mkor"):
        stats = Term("allreduce", 4.0 * (shape.sum_d + SCALARS * layers), 1.0 / INV_FREQ)
    else:
        stats = Term("allreduce", 4.0 * (shape.sum_d2 + SCALARS * layers), 1.0 / FACTOR_FREQ)
    return [gradients, stats, *owner]


FORMULAS = {
    "sgd": "4(n + T) [allreduce]",
    "mlbfgs": "4(n + P) [reduce-scatter, P > 1] + 4n/P [allgatherv, own blocks; receives "
              "4n] + 16 [norm: allgather of 2 float64; receives 16P]",
    "mkor": f"4(n + T) + 4(Σ(d_in + d_out) + 3L)/{INV_FREQ} [allreduces, P > 1]",
    "mkor_owner": "MKOR's + 4n/P [allgatherv of preconditioned gradients; receives 4n]",
    "kfac": f"4(n + T) + 4(Σ(d_in² + d_out²) + 3L)/{FACTOR_FREQ} [allreduces, P > 1]",
    "kfac_owner": "K-FAC's + 4n/P [allgatherv of preconditioned gradients; receives 4n]",
}


def model_bytes(method: str, shape: ModelShape, ranks: int,
                what: Callable[[Term, int], float]) -> float:
    return sum(what(term, ranks) for term in terms(method, shape, ranks))


# -- the section -----------------------------------------------------------------------------
@dataclass
class CommResults:
    shape: ModelShape
    counted: dict[int, Counted] = field(default_factory=dict)
    steps: int = 0
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0


def compute(quick: bool, progress: Any = None) -> CommResults:
    rc.torch_one_thread()
    started = time.perf_counter()
    steps = STEPS[quick]
    res = CommResults(ModelShape.of(make_model("mlp", seed=0)), steps=steps)
    if rc.mpiexec() is None:
        res.notes.append("`mpiexec` is not on this machine's PATH: only P = 1 was counted "
                         "(in this process); the larger rank counts are the model's alone.")
        counted = measure(hpcqn.serial_comm(), steps)
        res.counted[1] = merge([counted], steps)
    else:
        for ranks in RANKS:
            if progress:
                progress(f"comm: mpiexec -n {ranks}")
            res.counted[ranks] = count(ranks, steps)
    res.seconds = time.perf_counter() - started
    return res


def _relative(counted: float, model: float) -> str:
    if model == 0:
        return "0" if counted == 0 else "inf"
    return f"{(counted - model) / model:+.1e}"


def _check_table(res: CommResults) -> list[str]:
    head = ["method", "P", "calls per step by kind", "sent counted", "sent model",
            "rel. diff", "received counted", "received model", "rel. diff",
            "busiest rank sent"]
    rows = []
    for method in METHODS:
        for ranks, c in res.counted.items():
            sent, received = sum(c.sent[method].values()), sum(c.received[method].values())
            model_sent = model_bytes(method, res.shape, ranks, Term.sent)
            model_received = model_bytes(method, res.shape, ranks, Term.received)
            calls = ", ".join(f"{k} {v:.2g}" for k, v in c.calls[method].items() if v) or "none"
            rows.append([rc.LABELS[method], str(ranks), calls, f"{sent:,.1f} B",
                         f"{model_sent:,.1f} B", _relative(sent, model_sent),
                         f"{received:,.1f} B", f"{model_received:,.1f} B",
                         _relative(received, model_received),
                         f"{c.max_sent[method]:,.1f} B"])
    return rc.table(head, rows, left=3)


def _extrapolation_table(res: CommResults) -> list[str]:
    head = ["method", "formula (sent per rank per step)"]
    for ranks in EXTRAPOLATE:
        head += [f"P={ranks} sent (model)", f"P={ranks} received (model)",
                 f"P={ranks} on the wire, ring (model)"]
    head.append("sent / SGD's at P=1024 (model)")
    rows = []
    sgd = model_bytes("sgd", res.shape, EXTRAPOLATE[-1], Term.sent)
    for method in METHODS:
        row = [rc.LABELS[method], FORMULAS[method]]
        for ranks in EXTRAPOLATE:
            row += [rc.human_bytes(model_bytes(method, res.shape, ranks, what))
                    for what in (Term.sent, Term.received, Term.wire)]
        row.append(rc.ratio(model_bytes(method, res.shape, EXTRAPOLATE[-1], Term.sent), sgd))
        rows.append(row)
    return rc.table(head, rows, left=2)


def _positive(value: float) -> float:
    """``value``, or NaN where it is 0 (not drawn on a log axis)."""
    return value if value > 0 else math.nan


def plot(res: CommResults, out: Path) -> str:
    plt = rc.pyplot()
    grid = [2**k for k in range(11)]  # 1 .. 1024
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.8), sharey=True)
    for method in METHODS:
        color = rc.COLORS[method]
        left.plot(grid, [_positive(model_bytes(method, res.shape, p, Term.sent)) for p in grid],
                  "-", color=color, lw=1.2, label=rc.LABELS[method])
        counted = sorted(res.counted.items())
        left.plot([p for p, _ in counted],
                  [_positive(sum(c.sent[method].values())) for _, c in counted],
                  "o", color=color, ms=7, mfc="none", mew=1.6)
        right.plot(grid[1:], [model_bytes(method, res.shape, p, Term.wire) for p in grid[1:]],
                   "--", color=color, label=rc.LABELS[method])
    left.set_title("payload handed to collectives per rank (o: counted, line: model)")
    right.set_title("bytes on the wire per rank, ring algorithms (model)")
    for ax in (left, right):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("ranks P")
        ax.axvspan(max(RANKS), max(EXTRAPOLATE), color="#eeeeee", zorder=0)
        ax.grid(True, which="both", alpha=0.3)
    left.set_ylabel("bytes per step per rank")
    left.legend(fontsize=7)
    fig.suptitle(f"Digits MLP ({res.shape.n:,} parameters): communication per step "
                 f"(shaded: extrapolated; 0 bytes, e.g. SGD on one rank, not drawn)")
    return rc.save_figure(fig, out, "comm_bytes_vs_ranks.png")


def render(res: CommResults, out: Path, quick: bool) -> str:
    name = plot(res, out)
    s = res.shape
    shapes = ", ".join(f"{o}x{i}" for o, i in s.shapes)
    worst = max((abs((sum(c.sent[m].values()) - model_bytes(m, s, p, Term.sent))
                     / model_bytes(m, s, p, Term.sent))
                 for p, c in res.counted.items() for m in METHODS
                 if model_bytes(m, s, p, Term.sent) > 0), default=math.nan)
    where = "under `mpiexec -n P`" if rc.mpiexec() is not None else "in this process"
    kfac_over_mkor = (s.sum_d2 + SCALARS * len(s.shapes)) / (
        (s.sum_d + SCALARS * len(s.shapes)) / INV_FREQ)
    lines = [
        "## Communication per step vs ranks",
        "",
        f"The digits MLP of `hpcqn.experiments.training.make_model(\"mlp\")` (64-128-128-10: n = "
        f"{s.n:,} parameters in T = {s.tensors} tensors; L = {len(s.shapes)} layers of "
        f"d_out x d_in = {shapes} with the bias column; Σ(d_in + d_out) = {s.sum_d:,}, "
        f"Σ(d_in² + d_out²) = {s.sum_d2:,}), float32, global batch {GLOBAL_BATCH} of random "
        f"inputs split over the ranks. For P = {', '.join(map(str, sorted(res.counted)))} "
        f"every method runs {where} (one thread per rank): {WARMUP} uncounted "
        f"steps, then the communicator's counters (`comm.counters`) are reset and "
        f"{res.steps} steps counted (a multiple of MKOR's `factor_freq` and K-FAC's "
        f"`inv_freq` {INV_FREQ} and of mL-BFGS's "
        f"`period` {PERIOD}, so the infrequent collectives appear in their true "
        f"proportion). *Sent* is the payload a rank hands to collectives (`nbytes`, summed "
        f"over the kinds), *received* what it gets back (`nbytes_received`), both per step "
        f"and averaged over the ranks; *busiest rank* is the largest sent total (owner "
        f"placement and mL-BFGS's blocks are uneven). Methods: SGD with momentum with "
        f"`hpcqn.torch.average_gradients` (one allreduce of the flattened gradients plus a "
        f"flag per tensor); `hpcqn.torch.MLBFGS` (reduce-scatter of the gradient with a "
        f"flag slot per rank, allgatherv of the updated parameters, and a small allgather "
        f"for the direction's global norm); `hpcqn.torch.MKOR` (factor_freq {INV_FREQ}) and "
        f"`hpcqn.torch.KFAC` (factor_freq {FACTOR_FREQ}, inv_freq {INV_FREQ}), each with "
        f"redundant and owner placement (owner: one allgatherv shares the preconditioned "
        f"gradients). On one rank hpcqn skips the gradient reductions (the sums are local) "
        f"but still counts the calls that copy locally (mL-BFGS's allgatherv and norm, "
        f"owner mode's allgatherv).",
        "",
        *(note + "\n" for note in res.notes),
        "**Cost model** (bytes sent per rank per step; n parameters, T tensors, L layers, "
        "P ranks; `[P > 1]` terms vanish on one rank):",
        "",
        *(f"- {rc.LABELS[m]}: {FORMULAS[m]}" for m in METHODS),
        "",
        f"Counted against the model (the largest relative difference of the sent totals "
        f"is {worst:.1e}):",
        "",
        *_check_table(res),
        "",
        f"**Model extrapolation** to P = {' and '.join(map(str, EXTRAPOLATE))} (nothing "
        f"here was run at these sizes): the same formulas. *On the wire* is a separate "
        f"model of what a ring algorithm sends per rank: 2(P-1)/P x payload for an "
        f"allreduce, (P-1)/P x the whole vector for a reduce-scatter or an allgather, "
        f"(P-1) x 16 B for the small allgather; real MPI libraries switch algorithms by "
        f"message size (recursive doubling for small messages, so few-kB reductions cost "
        f"latency, not bandwidth).",
        "",
        *_extrapolation_table(res),
        "",
        f"![Bytes per step per rank vs ranks]({name})",
        "",
        "**How to read it.** Data-parallel payloads do not shrink with P: every method "
        "moves about one gradient (4n bytes) per step per rank, and a ring's wire bytes "
        "approach 2 x 4n for an allreduce. mL-BFGS's reduce-scatter + allgatherv moves "
        "the same wire bytes as SGD's allreduce (2(P-1)/P x 4n), so it adds no volume; "
        "MKOR adds O(Σ d) numbers every factor_freq steps (negligible), while K-FAC's "
        f"factor allreduce is O(Σ d²) every factor step: here {kfac_over_mkor:.0f}x "
        "MKOR's statistics traffic per step, and for this small MLP more than the "
        "gradient itself (MKOR's line lies on SGD's). Owner placement adds an "
        "allgatherv of the preconditioned gradients (each rank sends its share 4n/P "
        "and receives all 4n) in exchange "
        "for 1/P of the factor memory and work.",
        "",
        f"(comm section: {res.seconds:.0f} s)",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    rc.section_main(compute, render, __doc__, worker=worker,
                    add_arguments=worker_arguments)
