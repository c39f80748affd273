"""The PyTorch bridge (``hpcqn.torch.MLBFGS``) against torch's SGD and Adam: the cost of
one training iteration, the optimizer step against its memory-traffic floor, the bridge's
own overhead, and time to a target accuracy on scikit-learn's digits.

Four parts, all measured in one run of this script (one BLAS/OpenMP/torch thread per
process):

1. **Per-iteration time** of mL-BFGS (``hpcqn.torch.MLBFGS``, history 10, period 20) and
   SGD (``torch.optim.SGD``, momentum 0.9, gradients averaged over ranks with
   ``hpcqn.torch.average_gradients``) on the digits CNN (``hpcqn.experiments.training.make_model
   ("cnn")``) and on an MLP of about 5M float32 parameters on the 8x8 digits (64 -> 1110
   -> 1110 -> 1110 -> 1110 -> 1110 -> 10: four equal hidden-to-hidden layers, so that the
   per-layer blocks can be shared evenly by two ranks), global batch 128 and 1024, on 1
   rank (this process) and on 2 ranks (this script relaunched under ``mpiexec -n 2 ...
   --worker``; each rank takes its half of every global batch). Each iteration is timed
   in two parts with ``time.perf_counter``: forward + backward (``zero_grad``, the loss,
   ``backward``) and the optimizer step (``average_gradients`` + ``step`` for SGD,
   ``step`` for mL-BFGS, whose step does its own reduce-scatter and allgather). A barrier
   (not timed) precedes each part, so the step does not include waiting for a slower
   rank's backward; per iteration the max over ranks is taken, then the median over the
   timed iterations. Before the timing, mL-BFGS runs with ``period=1`` until every block
   holds its 10 pairs; ``period`` is then raised so that no pair is formed while the
   steps are timed. Then a few steps with ``period=1`` (each forms a pair, the oldest is
   dropped) give the cost of a pair-forming step, and the amortised step at period 20 is
   ``(19 * step + pair step) / 20``.
2. **Memory-traffic floor** of the mL-BFGS step on the 5M MLP, 1 rank: one step reads the
   history twice (``[S Y]' g`` and ``[S Y] c``), ``2 * 2M * n * 4`` bytes; divided by a
   STREAM-style float32 triad (NumPy, best of 5, measured in every round between the
   timed steps, median over the rounds) that is the floor. The table gives the bridge's
   step, the core step and the two history products alone over that floor (goal: step
   <= 1.15 x floor).
3. **Bridge overhead**: in the same rounds as part 2, ``opt.step()`` (the torch bridge:
   re-attaching gradients, the finiteness check, the flags, then the core step) and
   ``opt.core.step_rank_major(opt._x, opt._send)`` called directly on the same optimizer,
   each right after its own backward (not timed), which goes first alternating between
   rounds, after one untimed iteration (the first step after the triad runs slower).
   Overhead = the median of the per-round differences over the median core step (goal
   < 5%); the bridge's extra work is also timed alone.
4. **Epochs and seconds to 95% test accuracy** on the digits MLP of
   ``hpcqn.experiments.training`` (64 -> 128 -> 128 -> 10) with
   ``hpcqn.experiments.training.train``: 15 epochs, batch 64, cosine schedule, 1 rank;
   mL-BFGS lr 0.3 (history 10, period 20), SGD lr 0.3 momentum 0.9, Adam lr 0.01.
   Seconds are training time only (the per-epoch evaluation excluded), median of the repeats.

Run from the repository root (about 70 seconds on two cores with the defaults; under 20
seconds with ``--quick``)::

    python benchmarks/bench_torch.py
    python benchmarks/bench_torch.py --quick --json /tmp/bench_torch.json
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

# One thread per process, set before NumPy and torch load (inherited by mpiexec's ranks).
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
from collections.abc import Callable, Iterator  # noqa: E402
from dataclasses import asdict, dataclass  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from common import (  # noqa: E402
    forget_triad,
    history_products_timer,
    machine,
    triad_bandwidth,
)
from torch import nn  # noqa: E402

import hpcqn  # noqa: E402
from hpcqn.comm import Communicator  # noqa: E402
from hpcqn.experiments.training import digits, make_model, train  # noqa: E402
from hpcqn.torch import MLBFGS, GlobalBatches, average_gradients, broadcast_parameters  # noqa: E402

torch.set_num_threads(1)

# Part 1: per-iteration time.
HISTORY = 10
PERIOD = 20
MLBFGS_LR = 0.1  # timing only: the normalised step keeps the iterates finite
SGD_LR = 0.01
MOMENTUM = 0.9
BATCHES = (128, 1024)
MPI_RANKS = 2
MLP_HIDDEN = 1110  # 64 -> 1110 (x5 hidden layers) -> 10: 5,016,100 parameters
MLP_HIDDEN_QUICK = 256  # 283,914 parameters
MLP_HIDDEN_LAYERS = 5
SGD_WARMUP = 5
MAX_WARMUP = 5 * HISTORY  # mL-BFGS warm-up steps (period 1) allowed to fill the history
PAIR_STEPS = 3
NO_PAIR_PERIOD = 10**9

# Parts 2 and 3: the step against its floor, the bridge against the core.
FLOOR_BATCH = 128
TRIAD_N = 10_000_000
TRIAD_REPEATS = 5
TRIAD_N_LARGE = 100_000_000  # a reference beyond the last-level cache, measured once
FLOOR_GOAL = 1.15
BRIDGE_GOAL = 0.05

# Part 4: time to target.
TARGET_ACCURACY = 0.95
TRAIN_EPOCHS = 15
TRAIN_BATCH = 64
TRAIN_METHODS: list[tuple[str, str, dict[str, Any]]] = [
    ("mlbfgs", f"mL-BFGS (lr 0.3, history {HISTORY}, period {PERIOD})",
     {"lr": 0.3, "history": HISTORY, "period": PERIOD}),
    ("sgd", "SGD (lr 0.3, momentum 0.9)", {"lr": 0.3, "momentum": 0.9}),
    ("adam", "Adam (lr 0.01)", {"lr": 0.01}),
]


@dataclass
class IterTiming:
    """Part 1: one model, global batch, rank count and method. Seconds: per iteration
    the max over ranks, then the median over the timed iterations."""

    model: str
    params: int
    batch: int
    ranks: int
    method: str
    entries_per_rank: list[int] | None  # mL-BFGS: parameters each rank updates
    warmup_steps: int
    timed: int
    fwd_bwd: float
    step: float
    iteration: float  # median of fwd_bwd + step
    pair_step: float | None  # mL-BFGS: a step that forms a pair (history full)
    npairs: int | None  # mL-BFGS: pairs stored after the warm-up, over all ranks

    @property
    def amortised_step(self) -> float:
        """The step at period 20: one step in 20 forms a pair."""
        if self.pair_step is None:
            return self.step
        return ((PERIOD - 1) * self.step + self.pair_step) / PERIOD

    @property
    def amortised_iteration(self) -> float:
        return self.iteration - self.step + self.amortised_step


@dataclass
class FloorTiming:
    """Parts 2 and 3: the mL-BFGS step on the MLP, 1 rank, against the history-traffic
    floor, and the bridge against the core step (medians over ``rounds``)."""

    params: int
    blocks: int
    history: int
    warmup_steps: int
    npairs: int
    rounds: int
    bridge_step: float  # opt.step()
    core_step: float  # opt.core.step_rank_major(opt._x, opt._send)
    bridge_minus_core: float  # median of the per-round differences
    bridge_extra_alone: float  # the bridge's work before the core step, timed alone
    history_products: float  # the two history products alone, all blocks
    history_bytes: int  # 2 passes * 2M * n * 4
    triad32: float  # bytes/s, median over the rounds of each round's best of 5
    triad32_large: float  # bytes/s, TRIAD_N_LARGE entries, best of 3, after the rounds
    floor: float  # history_bytes / triad32
    bridge_over_floor: float
    core_over_floor: float
    bridge_overhead: float  # bridge_minus_core / core_step


@dataclass
class TargetRun:
    """Part 4: one method on the digits MLP."""

    method: str
    label: str
    options: dict[str, Any]
    epochs_to_target: int | None  # None: not reached in TRAIN_EPOCHS epochs
    steps_to_target: int | None
    seconds_to_target: float | None  # training time only, median of the repeats
    seconds_total: float  # all epochs, median of the repeats
    final_accuracy: float
    best_accuracy: float
    final_train_loss: float
    repeats: int


# -- models and data ---------------------------------------------------------------------
def build_model(name: str, hidden: int) -> nn.Module:
    """``cnn``, ``digits-mlp``: the digits CNN and MLP (64-128-128-10) of
    hpcqn.experiments.training; ``mlp``: 64 -> hidden (x MLP_HIDDEN_LAYERS) -> 10, ReLU,
    float32, from seed 0."""
    if name == "cnn":
        return make_model("cnn", seed=0, dtype=torch.float32)
    if name == "digits-mlp":
        return make_model("mlp", seed=0, dtype=torch.float32)
    torch.manual_seed(0)
    layers: list[nn.Module] = [nn.Flatten(), nn.Linear(64, hidden), nn.ReLU()]
    for _ in range(MLP_HIDDEN_LAYERS - 1):
        layers += [nn.Linear(hidden, hidden), nn.ReLU()]
    layers.append(nn.Linear(hidden, 10))
    return nn.Sequential(*layers).to(torch.float32)


def model_label(name: str, hidden: int) -> str:
    if name == "cnn":
        return "digits CNN"
    if name == "digits-mlp":
        return "digits MLP 64-128-128-10"
    return f"MLP 64-{hidden}x{MLP_HIDDEN_LAYERS}-10"


def endless(batches: GlobalBatches) -> Iterator[tuple[np.ndarray, float]]:
    epoch = 0
    while True:
        batches.set_epoch(epoch)
        yield from batches
        epoch += 1


def histories_full(opt: MLBFGS, comm: Communicator) -> bool:
    """Every block on every rank holds HISTORY pairs (one small reduction)."""
    core = opt.core
    full = len(core.block_state) == len(core.owned) and all(
        len(state["history"]) >= HISTORY for state in core.block_state.values())
    _, top = comm.allreduce_scalars([], [0.0 if full else 1.0])
    return bool(top[0] == 0.0)


class Trainer:
    """One model, optimizer and batch stream; times forward+backward and the step."""

    def __init__(self, comm: Communicator, data: dict[str, torch.Tensor], model_name: str,
                 hidden: int, batch: int, method: str, period: int = 1):
        self.comm, self.method = comm, method
        self.x, self.y = data["train_x"], data["train_y"]
        self.model = build_model(model_name, hidden)
        broadcast_parameters(self.model, comm)
        self.params = sum(p.numel() for p in self.model.parameters())
        self.opt: torch.optim.Optimizer
        if method == "mlbfgs":
            # min_cos=0: the timing needs full histories (the pair test costs one dot
            # product per pair, and training runs keep the default)
            self.opt = MLBFGS(self.model.parameters(), comm, lr=MLBFGS_LR, history=HISTORY,
                              period=period, min_cos=0.0)
        else:
            self.opt = torch.optim.SGD(self.model.parameters(), lr=SGD_LR, momentum=MOMENTUM)
        self.batches = endless(GlobalBatches(self.y.numel(), batch, comm, seed=0))

    def forward_backward(self) -> float:
        rows, weight = next(self.batches)
        index = torch.as_tensor(rows)
        x, y = self.x[index], self.y[index]
        start = time.perf_counter()
        self.opt.zero_grad()
        loss = nn.functional.cross_entropy(self.model(x), y) * weight
        loss.backward()
        return time.perf_counter() - start

    def step(self) -> float:
        start = time.perf_counter()
        if self.method != "mlbfgs":
            average_gradients(self.model.parameters(), self.comm)
        self.opt.step()
        return time.perf_counter() - start

    def iteration(self) -> tuple[float, float]:
        self.comm.barrier()
        fwd_bwd = self.forward_backward()
        self.comm.barrier()
        return fwd_bwd, self.step()

    def fill_history(self) -> int:
        """mL-BFGS with period 1 until every block holds HISTORY pairs; then no pair is
        formed. Returns the warm-up steps."""
        assert isinstance(self.opt, MLBFGS)
        steps = 0
        while not histories_full(self.opt, self.comm):
            if steps >= MAX_WARMUP:
                raise RuntimeError(f"histories not full after {steps} steps: "
                                   f"{self.opt.core.statistics()}")
            self.iteration()
            steps += 1
        self.opt.core.period = NO_PAIR_PERIOD
        return steps

    def check(self) -> None:
        if isinstance(self.opt, MLBFGS) and self.opt.skipped_steps:
            raise RuntimeError(f"{self.opt.skipped_steps} mL-BFGS step(s) skipped "
                               f"(non-finite gradient) in the benchmark")
        if not all(bool(torch.isfinite(p).all()) for p in self.model.parameters()):
            raise RuntimeError("a parameter is not finite in the benchmark")


# -- part 1 ------------------------------------------------------------------------------
def time_case(comm: Communicator, data: dict[str, torch.Tensor], model_name: str,
              hidden: int, batch: int, method: str, timed: int) -> IterTiming:
    trainer = Trainer(comm, data, model_name, hidden, batch, method)
    opt = trainer.opt
    if isinstance(opt, MLBFGS):
        warmup = trainer.fill_history()
        npairs, _ = comm.allreduce_scalars([opt.core.statistics()["npairs"]])
    else:
        warmup = SGD_WARMUP
        for _ in range(warmup):
            trainer.iteration()
    fwd_bwd, steps = [], []
    for _ in range(timed):
        f, s = trainer.iteration()
        fwd_bwd.append(f)
        steps.append(s)
    pair_steps: list[float] = []
    if isinstance(opt, MLBFGS):
        opt.core.period = 1  # every step forms a pair (the oldest is dropped)
        pair_steps = [trainer.iteration()[1] for _ in range(PAIR_STEPS)]
    trainer.check()
    # Per iteration, the slowest rank.
    worst = comm.allreduce(np.array(fwd_bwd + steps + pair_steps), op="max")
    fwd_bwd, steps = list(worst[:timed]), list(worst[timed : 2 * timed])
    pairs = list(worst[2 * timed :])
    return IterTiming(
        model=model_label(model_name, hidden), params=trainer.params, batch=batch,
        ranks=comm.size, method=method,
        entries_per_rank=list(opt.layout.counts) if isinstance(opt, MLBFGS) else None,
        warmup_steps=warmup, timed=timed, fwd_bwd=statistics.median(fwd_bwd),
        step=statistics.median(steps),
        iteration=statistics.median(f + s for f, s in zip(fwd_bwd, steps, strict=True)),
        pair_step=statistics.median(pairs) if pairs else None,
        npairs=int(npairs[0]) if isinstance(opt, MLBFGS) else None,
    )


MODELS = ("cnn", "mlp")  # part 1's models and batches (--models, --batches)


def cases(hidden: int) -> list[tuple[str, int, int, str]]:
    """(model, hidden, batch, method) in the order they are timed."""
    return [(name, hidden, batch, method) for name in MODELS for batch in BATCHES
            for method in ("sgd", "mlbfgs")]


def run_cases(comm: Communicator, hidden: int, timed: int,
              report: Callable[[IterTiming], None]) -> None:
    data = digits()
    for name, h, batch, method in cases(hidden):
        if comm.rank == 0:
            print(f"  {comm.size} rank(s): {model_label(name, h)}, batch {batch}, {method}",
                  file=sys.stderr, flush=True)
        report(time_case(comm, data, name, h, batch, method, timed))


def run_mpi(args: argparse.Namespace) -> list[IterTiming]:
    """Part 1 on MPI_RANKS ranks: ONE ``mpiexec`` launch of this script's worker mode."""
    mpiexec = shutil.which("mpiexec")
    if mpiexec is None:
        raise RuntimeError("mpiexec not found on PATH (pip install mpich mpi4py)")
    command = [mpiexec, "-n", str(MPI_RANKS), sys.executable, str(Path(__file__).resolve()),
               "--worker", "--hidden", str(args.hidden), "--timed", str(args.timed),
               "--models", ",".join(MODELS), "--batches", ",".join(map(str, BATCHES))]
    env = os.environ.copy()
    env.update({name: "1" for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS",
                                       "MKL_NUM_THREADS")})
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed with status {done.returncode}:\n"
                           f"{done.stderr}")
    sys.stderr.write(done.stderr)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if len(lines) != len(cases(args.hidden)):
        raise RuntimeError(f"expected {len(cases(args.hidden))} result lines from the "
                           f"worker, got:\n{done.stdout}")
    return [IterTiming(**json.loads(line)) for line in lines]


def worker(args: argparse.Namespace) -> None:
    """Under mpiexec: part 1; rank 0 prints one JSON line per case."""
    comm = hpcqn.get_comm()  # COMM_WORLD, resolved once

    def report(t: IterTiming) -> None:
        if comm.rank == 0:
            print(json.dumps(asdict(t)), flush=True)

    run_cases(comm, args.hidden, args.timed, report)


# -- parts 2 and 3 -----------------------------------------------------------------------


def history_products(opt: MLBFGS) -> Callable[[], float]:
    """A timer of the two history products of one step alone (``V @ g_b`` and
    ``c @ V`` for every block, ``V`` the block's (2M, n_b) history), through the kernels
    the step uses (``opt.core.kernels``) where it has them."""
    rng = np.random.default_rng(2)
    blocks = []
    for state in opt.core.block_state.values():
        vectors = state["history"].vectors
        g = rng.standard_normal(vectors.shape[1], dtype=np.float32)
        blocks.append((vectors, g, np.empty_like(g)))
    coeffs = np.full(2 * HISTORY, 1e-3)
    kernels = getattr(opt.core, "kernels", None)
    if kernels is None:  # an hpcqn without replaceable kernels: NumPy's
        return history_products_timer(blocks, coeffs.astype(np.float32))

    def run() -> float:
        start = time.perf_counter()
        for vectors, g, out in blocks:
            kernels.products(vectors, g)
            kernels.combine(coeffs, vectors, 0.0, g, out)
        return time.perf_counter() - start

    return run


def bridge_extra(opt: MLBFGS) -> float:
    """The work ``MLBFGS.step`` does before the core step, timed."""
    start = time.perf_counter()
    opt.prepare_step()
    return time.perf_counter() - start


def floor_and_bridge(hidden: int, rounds: int) -> FloorTiming:
    """Fill the histories, then ``rounds`` rounds of: the bridge's extra work alone, the
    history products alone, a float32 triad, one untimed iteration, then the bridge's
    step and the core step, each right after a backward (not timed; which goes first
    alternates)."""
    comm = hpcqn.serial_comm()
    trainer = Trainer(comm, digits(), "mlp", hidden, FLOOR_BATCH, "mlbfgs")
    opt = trainer.opt
    assert isinstance(opt, MLBFGS)
    warmup = trainer.fill_history()
    npairs = opt.core.statistics()["npairs"]
    products = history_products(opt)
    triad_bandwidth(TRIAD_N, np.float32, 1)  # allocate and touch the triad arrays

    def bridge() -> float:
        start = time.perf_counter()
        opt.step()
        return time.perf_counter() - start

    def core() -> float:
        start = time.perf_counter()
        if not opt.core.step_rank_major(opt._x, opt._send):
            raise RuntimeError("a direct core step was skipped")
        return time.perf_counter() - start

    bridge_s, core_s, extra_s, products_s, triad32 = [], [], [], [], []
    for k in range(rounds):
        extra_s.append(bridge_extra(opt))
        products_s.append(products())
        triad32.append(triad_bandwidth(TRIAD_N, np.float32, TRIAD_REPEATS))
        trainer.forward_backward()  # one untimed step: the first after the triad is slower
        bridge()
        for timed, seconds in ((bridge, bridge_s), (core, core_s))[:: 1 if k % 2 else -1]:
            trainer.forward_backward()  # each step right after its own backward
            seconds.append(timed())
    trainer.check()
    triad_large = triad_bandwidth(TRIAD_N_LARGE, np.float32, 3)
    forget_triad(TRIAD_N_LARGE, np.float32)

    n = trainer.params
    history_bytes = 2 * 2 * HISTORY * n * 4
    triad = statistics.median(triad32)
    floor = history_bytes / triad
    bridge_step, core_step = statistics.median(bridge_s), statistics.median(core_s)
    difference = statistics.median(b - c for b, c in zip(bridge_s, core_s, strict=True))
    return FloorTiming(
        params=n, blocks=opt.layout.nblocks, history=HISTORY, warmup_steps=warmup,
        npairs=npairs, rounds=rounds, bridge_step=bridge_step, core_step=core_step,
        bridge_minus_core=difference, bridge_extra_alone=statistics.median(extra_s),
        history_products=statistics.median(products_s), history_bytes=history_bytes,
        triad32=triad, triad32_large=triad_large, floor=floor,
        bridge_over_floor=bridge_step / floor, core_over_floor=core_step / floor,
        bridge_overhead=difference / core_step,
    )


# -- part 4 ------------------------------------------------------------------------------
def time_to_target(repeats: int) -> list[TargetRun]:
    comm = hpcqn.serial_comm()
    results = []
    for method, label, options in TRAIN_METHODS:
        print(f"  time to target: {label}", file=sys.stderr, flush=True)
        runs = [train(method, comm, "mlp", options, epochs=TRAIN_EPOCHS,
                      batch_size=TRAIN_BATCH, lr_schedule="cosine", log=False)["records"]
                for _ in range(repeats)]
        records = runs[0]
        reached = [r for r in records if r["test_accuracy"] >= TARGET_ACCURACY]
        epoch = reached[0]["epoch"] if reached else None
        seconds = None
        if epoch is not None:
            seconds = statistics.median(
                next(r["seconds"] for r in run if r["epoch"] == epoch) for run in runs)
        results.append(TargetRun(
            method=method, label=label, options=options, epochs_to_target=epoch,
            steps_to_target=reached[0]["steps"] if reached else None,
            seconds_to_target=seconds,
            seconds_total=statistics.median(run[-1]["seconds"] for run in runs),
            final_accuracy=records[-1]["test_accuracy"],
            best_accuracy=max(r["test_accuracy"] for r in records),
            final_train_loss=records[-1]["train_loss"], repeats=repeats,
        ))
    return results


# -- output ------------------------------------------------------------------------------
def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1e3:.1f}"


def print_iterations(rows: list[IterTiming]) -> None:
    print("| model (params) | batch | ranks | method | fwd+bwd ms | step ms | iteration ms "
          "| pair-forming step ms | step ms, period 20 | iteration ms, period 20 |")
    print("|---|---:|---:|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        method = "SGD" if r.method == "sgd" else "mL-BFGS"
        print(f"| {r.model} ({r.params:,}) | {r.batch} | {r.ranks} | {method} "
              f"| {_ms(r.fwd_bwd)} | {_ms(r.step)} | {_ms(r.iteration)} | {_ms(r.pair_step)} "
              f"| {_ms(r.amortised_step)} | {_ms(r.amortised_iteration)} |")


def print_ratios(rows: list[IterTiming]) -> None:
    print("| model | batch | ranks | iteration, no pair | iteration, period 20 "
          "| step, no pair | step, period 20 | mL-BFGS entries per rank "
          "| mL-BFGS warm-up steps (pairs stored) |")
    print("|---|---:|---:|---:|---:|---:|---:|---|---:|")
    keyed = {(r.model, r.batch, r.ranks, r.method): r for r in rows}
    for r in rows:
        if r.method != "mlbfgs":
            continue
        s = keyed[(r.model, r.batch, r.ranks, "sgd")]
        entries = " / ".join(f"{c:,}" for c in r.entries_per_rank or [])
        print(f"| {r.model} | {r.batch} | {r.ranks} | {r.iteration / s.iteration:.2f} "
              f"| {r.amortised_iteration / s.iteration:.2f} | {r.step / s.step:.2f} "
              f"| {r.amortised_step / s.step:.2f} | {entries} | {r.warmup_steps} ({r.npairs}) |")


def _verdict(met: bool) -> str:
    return "met" if met else "NOT met"


def print_floor(t: FloorTiming) -> None:
    print(f"| quantity | value |\n|---|---:|\n"
          f"| parameters n (float32), blocks, history M | {t.params:,}, {t.blocks}, "
          f"{t.history} |\n"
          f"| warm-up steps (period 1) until every block holds M pairs | {t.warmup_steps} "
          f"({t.npairs} pairs stored) |\n"
          f"| history read per step (2 passes x 2M x n x 4 B) "
          f"| {t.history_bytes / 1e6:.0f} MB |\n"
          f"| triad float32 (NumPy, {TRIAD_N:.0e}; best of {TRIAD_REPEATS} in each "
          f"round, median of {t.rounds}) | {t.triad32 / 1e9:.2f} GB/s |\n"
          f"| triad float32 at {TRIAD_N_LARGE:.0e} (best of 3, after the rounds; "
          f"reference only) | {t.triad32_large / 1e9:.2f} GB/s |\n"
          f"| floor = history bytes / triad | {_ms(t.floor)} ms |\n"
          f"| mL-BFGS step, bridge `opt.step()` (median of {t.rounds}, no pair formed) "
          f"| {_ms(t.bridge_step)} ms |\n"
          f"| mL-BFGS step, core `step_rank_major` (median of {t.rounds}) "
          f"| {_ms(t.core_step)} ms |\n"
          f"| the two history products alone (all blocks, median) "
          f"| {_ms(t.history_products)} ms ({t.history_products / t.floor:.2f} x floor) |\n"
          f"| core step / floor | {t.core_over_floor:.2f} |\n"
          f"| **bridge step / floor** (goal <= {FLOOR_GOAL}) | **{t.bridge_over_floor:.2f}** "
          f"({_verdict(t.bridge_over_floor <= FLOOR_GOAL)}) |")


def print_bridge(t: FloorTiming) -> None:
    print(f"| quantity | value |\n|---|---:|\n"
          f"| core step `opt.core.step_rank_major(opt._x, opt._send)` | {_ms(t.core_step)} "
          f"ms |\n"
          f"| bridge step `opt.step()` | {_ms(t.bridge_step)} ms |\n"
          f"| bridge - core, median of {t.rounds} per-round differences "
          f"| {t.bridge_minus_core * 1e3:.2f} ms |\n"
          f"| the bridge's extra work alone (re-attach, flags, finiteness check) "
          f"| {t.bridge_extra_alone * 1e3:.2f} ms ({t.bridge_extra_alone / t.core_step:.1%}) |\n"
          f"| **bridge overhead** (goal < {BRIDGE_GOAL:.0%}) | **{t.bridge_overhead:.1%}** "
          f"({_verdict(t.bridge_overhead < BRIDGE_GOAL)}) |")


def print_targets(runs: list[TargetRun]) -> None:
    reference = next(r for r in runs if r.method == "sgd")
    print(f"| method | epochs to {TARGET_ACCURACY:.0%} | steps | seconds to target "
          f"| seconds, {TRAIN_EPOCHS} epochs | final / best test accuracy "
          f"| final train loss | seconds to target / SGD |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in runs:
        ratio = "-"
        if r.seconds_to_target is not None and reference.seconds_to_target is not None:
            ratio = f"{r.seconds_to_target / reference.seconds_to_target:.2f}"
        epochs = "not reached" if r.epochs_to_target is None else str(r.epochs_to_target)
        steps = "-" if r.steps_to_target is None else str(r.steps_to_target)
        seconds = "-" if r.seconds_to_target is None else f"{r.seconds_to_target:.2f}"
        print(f"| {r.label} | {epochs} | {steps} | {seconds} | {r.seconds_total:.2f} "
              f"| {r.final_accuracy:.3f} / {r.best_accuracy:.3f} | {r.final_train_loss:.4f} "
              f"| {ratio} |")


def parse_args() -> argparse.Namespace:
    global MODELS, BATCHES
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help=f"an MLP of hidden width {MLP_HIDDEN_QUICK}, 3 timed iterations, "
                             f"1 training run per method (a smoke test, under a minute)")
    parser.add_argument("--hidden", type=int, default=None,
                        help=f"MLP hidden width (default {MLP_HIDDEN}, about 5M parameters)")
    parser.add_argument("--timed", type=int, default=None,
                        help="timed iterations per case in part 1 (default 15, 3 with --quick)")
    parser.add_argument("--rounds", type=int, default=None,
                        help="timed rounds in parts 2 and 3 (default 30, 5 with --quick)")
    parser.add_argument("--repeats", type=int, default=None,
                        help="training runs per method in part 4 (default 3, 1 with --quick)")
    parser.add_argument("--parts", default="1,2,4",
                        help="parts to run, comma-separated (2 includes 3; default all)")
    parser.add_argument("--models", default=",".join(MODELS),
                        help="part 1's models: cnn, mlp (the wide MLP), digits-mlp")
    parser.add_argument("--batches", default=",".join(map(str, BATCHES)),
                        help="part 1's global batches")
    parser.add_argument("--no-mpi", action="store_true", help="part 1 on 1 rank only")
    parser.add_argument("--json", type=Path, help="also write the results to this JSON file")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.hidden = args.hidden or (MLP_HIDDEN_QUICK if args.quick else MLP_HIDDEN)
    args.timed = args.timed or (3 if args.quick else 15)
    args.rounds = args.rounds or (5 if args.quick else 30)
    args.repeats = args.repeats or (1 if args.quick else 3)
    args.parts = {int(part) for part in args.parts.split(",")}
    MODELS = tuple(args.models.split(","))
    BATCHES = tuple(int(b) for b in args.batches.split(","))
    return args


def main() -> None:
    args = parse_args()
    if args.worker:
        worker(args)
        return
    started = time.perf_counter()
    rows: list[IterTiming] = []
    if 1 in args.parts:
        print("part 1: per-iteration time", file=sys.stderr, flush=True)
        run_cases(hpcqn.serial_comm(), args.hidden, args.timed, rows.append)
        if not args.no_mpi:
            rows += run_mpi(args)
    floor = None
    if 2 in args.parts:
        print("parts 2 and 3: the step against its floor, the bridge against the core",
              file=sys.stderr, flush=True)
        floor = floor_and_bridge(args.hidden, args.rounds)
    targets: list[TargetRun] = []
    if 4 in args.parts:
        print("part 4: time to target", file=sys.stderr, flush=True)
        targets = time_to_target(args.repeats)
    description = machine(f"torch {torch.__version__}, torch threads {torch.get_num_threads()}")
    mlp = model_label("mlp", args.hidden)

    print(f"## hpcqn.torch: mL-BFGS vs SGD and Adam on digits"
          f"{' (--quick)' if args.quick else ''}\n")
    print(f"Machine: {description}\n")
    if rows:
        print(f"### 1. Per-iteration time: mL-BFGS (history {HISTORY}, period {PERIOD}) vs SGD "
              f"(momentum {MOMENTUM})\n")
        print(f"Median of {args.timed} timed iterations (per iteration the slowest rank), after "
              f"a warm-up that fills every mL-BFGS block's history; 'step' includes the "
              f"gradient averaging (SGD: average_gradients; mL-BFGS: its reduce-scatter and "
              f"allgather); no pair is formed in the timed steps. Pair-forming step: median of "
              f"{PAIR_STEPS} steps at period 1 with the history full; 'period 20' columns: "
              f"(19 x step + pair-forming step) / 20. Batch: global (split over the ranks).\n")
        print_iterations(rows)
        print("\nmL-BFGS / SGD:\n")
        print_ratios(rows)
    if floor is not None:
        print(f"\n### 2. mL-BFGS step against its memory-traffic floor: {mlp}, 1 process\n")
        print_floor(floor)
        print(f"\n### 3. Bridge overhead: `hpcqn.torch.MLBFGS.step()` vs the core step, same "
              f"optimizer, {mlp}, 1 process, medians of {floor.rounds} alternating rounds\n")
        print_bridge(floor)
    if targets:
        print(f"\n### 4. Time to {TARGET_ACCURACY:.0%} test accuracy: digits MLP 64-128-128-10, "
              f"batch {TRAIN_BATCH}, {TRAIN_EPOCHS} epochs, cosine schedule, 1 process\n")
        print(f"Seconds: training time only (evaluation excluded), median of {args.repeats} "
              f"run(s); accuracy checked after every epoch.\n")
        print_targets(targets)
    print(f"\n(benchmark wall time {time.perf_counter() - started:.0f} s)")
    if args.json:
        report = {
            "machine": description, "quick": args.quick,
            "iterations": [{**asdict(r), "amortised_step": r.amortised_step,
                            "amortised_iteration": r.amortised_iteration} for r in rows],
            "floor_and_bridge": asdict(floor) if floor else None,
            "time_to_target": [asdict(r) for r in targets],
        }
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
