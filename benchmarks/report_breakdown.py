# ruff: noqa: E402  (one thread per process, set before NumPy loads)
"""Report section: where one training iteration's time goes, per optimizer, on the digits
CNN, MLP and autoencoder, on 1 process and on 2 MPI ranks.

Forward and backward are timed around ``loss.backward()``; the hpcqn optimizers' steps
are split by :class:`hpcqn.timing.PhaseTimer` (statistics, factors, precondition,
update, and communication: the collectives, the wait for the other ranks included, and
the copies around them); torch's SGD and Adam get the gradient allreduce
(:func:`hpcqn.torch.average_gradients`) as communication and ``step()`` as update.
"other" is the step's wall time outside the named phases. Bytes per step per rank come
from the communicator's counters.

    python benchmarks/report_breakdown.py [--quick] [--out DIR]

(the 2-rank part launches ``mpiexec -n 2`` on this file with ``--worker``).
"""

from __future__ import annotations

import report_common as rc

rc.one_thread()  # before NumPy loads its BLAS

import argparse
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from report_convergence import LABELS, METHODS, method_options

from hpcqn.timing import PhaseTimer

# (model, job file for the options and learning rate, hidden width)
MODELS = (("cnn", "digits_cnn", 128), ("mlp", "digits_mlp", 128),
          ("autoencoder", "digits_autoencoder", 32))
TITLES = {"cnn": "Digits CNN", "mlp": "Digits MLP", "autoencoder": "Digits autoencoder"}
PHASES = ("statistics", "factors", "precondition", "communication", "update", "other")
COLUMNS = ("fwd_bwd", *PHASES)
BATCH = 64
WARMUP = 20
# timed steps per block and blocks: quick, full (the median block is kept)
SCHEDULE = {True: (50, 3), False: (100, 5)}
RANKS = 2
COLORS = {"fwd_bwd": "#9e9e9e", "statistics": "#1f77b4", "factors": "#d62728",
          "precondition": "#ff7f0e", "communication": "#2ca02c", "update": "#9467bd",
          "other": "#e5c07b"}


@dataclass
class BreakdownResults:
    """Per (model, ranks, method): the per-step means over the ranks (milliseconds,
    bytes per rank)."""

    rows: list[dict[str, Any]]
    ranks: list[int]
    steps: int
    blocks: int
    warmup: int
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    def row(self, model: str, method: str, ranks: int = 1) -> dict[str, Any] | None:
        for row in self.rows:
            if (row["model"], row["method"], row["ranks"]) == (model, method, ranks):
                return row
        return None



# -- measuring (every rank) ------------------------------------------------------------------
def options_for(job_file: str, method: str) -> dict[str, Any]:
    """The job file's options with its learning rate (0.01 where it names none)."""
    options, _ = method_options(job_file, method, with_lr=True)
    options.setdefault("lr", 0.01)
    return options


def _is_update_step(optimizer: Any, method: str, step: int) -> bool:
    """Whether step ``step`` (counted from 0) refreshes the curvature: K-FAC's inversions,
    MKOR's factor updates, mL-BFGS's new curvature pair."""
    if method == "kfac":
        return bool(optimizer.core.is_inverse_step(step))
    if method in ("mkor", "mkor_h"):
        return bool(optimizer.core.is_update_step(step))
    if method == "mlbfgs":
        return step > 0 and step % optimizer.core.period == 0
    return False


def measure(model_name: str, job_file: str, hidden: int, method: str, comm: Any,
            steps: int, blocks: int, warmup: int = WARMUP) -> dict[str, Any]:
    """Per-step means (ms) of each phase on this rank, global batch :data:`BATCH` split
    over the ranks: ``warmup`` untimed steps, then ``blocks`` blocks of ``steps`` steps;
    the block with the median iteration time is kept (robust to a busy machine)."""
    import torch

    from hpcqn.experiments.training import (
        SELF_AVERAGING,
        TASKS,
        digits,
        loss_of,
        make_model,
    )
    from hpcqn.torch import average_gradients, methods
    from hpcqn.torch.data import GlobalBatches

    data = digits(0)
    model = make_model(model_name, hidden, 0)
    optimizer = methods.make(method, model, comm, options_for(job_file, method))
    own = method in SELF_AVERAGING
    timer = PhaseTimer(comm)
    if own:
        optimizer.timer = timer
    batches = GlobalBatches(data["train_y"].numel(), BATCH, comm, seed=0)
    task = TASKS[model_name]

    def stream() -> Iterator[tuple[Any, float]]:
        epoch = 0
        while True:
            batches.set_epoch(epoch)
            yield from batches
            epoch += 1

    source = stream()
    clock = time.perf_counter

    def one_step() -> dict[str, float]:
        """Seconds of one iteration: forward+backward, each phase, step and iteration."""
        rows, weight = next(source)
        index = torch.as_tensor(rows)
        start = clock()
        optimizer.zero_grad()
        loss = loss_of(model, data["train_x"][index], data["train_y"][index],
                       task) * weight
        loss.backward()
        value = loss.item()
        backward_done = clock()
        phases = dict.fromkeys(PHASES, 0.0)
        if own:
            timer.reset()
            if method == "mkor_h":
                optimizer.step(loss=value)
            else:
                optimizer.step()
            done = clock()
            phases.update(timer.seconds)
        else:
            average_gradients(model.parameters(), comm)
            averaged = clock()
            optimizer.step()
            done = clock()
            phases["communication"], phases["update"] = averaged - backward_done, done - averaged
        phases["other"] = (done - backward_done) - sum(phases.values())
        return {"fwd_bwd": backward_done - start, **phases, "step": done - backward_done,
                "iteration": done - start}

    for _ in range(warmup):
        one_step()
    index = warmup
    kept: list[dict[str, Any]] = []
    for _ in range(blocks):
        comm.reset_counters()
        sums = dict.fromkeys((*COLUMNS, "step", "iteration"), 0.0)
        by_kind: dict[bool, list[float]] = {True: [], False: []}
        for _ in range(steps):
            update_step = _is_update_step(optimizer, method, index)
            seconds = one_step()
            index += 1
            for name, value in seconds.items():
                sums[name] += value
            by_kind[update_step].append(seconds["iteration"])
        counters = comm.counters.values()
        kept.append({
            **{f"{k}_ms": 1e3 * v / steps for k, v in sums.items()},
            "update_steps": len(by_kind[True]),
            "update_iteration_ms": (1e3 * statistics.fmean(by_kind[True]) if by_kind[True]
                                    else None),
            "plain_iteration_ms": (1e3 * statistics.fmean(by_kind[False]) if by_kind[False]
                                   else None),
            "bytes_sent": sum(c.nbytes for c in counters) / steps,
            "bytes_received": sum(c.nbytes_received for c in counters) / steps,
        })
    kept.sort(key=lambda block: block["iteration_ms"])
    switch = getattr(optimizer, "switch", None)
    return {"model": model_name, "method": method, "ranks": comm.size, "rank": comm.rank,
            "steps": steps, "blocks": blocks, **kept[len(kept) // 2],
            "switched_at": None if switch is None else switch.switched_at}


def measure_all(comm: Any, steps: int, blocks: int,
                progress: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
    rows = []
    for model_name, job_file, hidden in MODELS:
        for method in METHODS:
            rows.append(measure(model_name, job_file, hidden, method, comm, steps, blocks))
            if progress is not None:
                progress(f"breakdown: {model_name} {LABELS[method]} on {comm.size} rank(s)")
    return rows


def merge(per_rank: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """One row per (model, method): the mean over the ranks of every number."""
    merged = []
    for rows in zip(*per_rank, strict=True):
        out = dict(rows[0])
        del out["rank"]
        for key, value in rows[0].items():
            if isinstance(value, float):
                values = [r[key] for r in rows if r[key] is not None]
                out[key] = statistics.fmean(values) if values else None
        merged.append(out)
    return merged


def worker(args: argparse.Namespace) -> None:
    """One rank of ``mpiexec -n RANKS ... --worker``: measure, write its rows."""
    from hpcqn.comm import get_comm

    rc.torch_one_thread()
    comm = get_comm()
    rc.write_worker_json(args.json, comm.rank, measure_all(comm, args.steps, args.blocks))


def worker_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", help="with --worker: write PREFIX.rank<r>.json")
    parser.add_argument("--steps", type=int, default=SCHEDULE[False][0],
                        help="with --worker: timed steps per block")
    parser.add_argument("--blocks", type=int, default=SCHEDULE[False][1],
                        help="with --worker: blocks of timed steps")


def compute(quick: bool = False, progress: Callable[[str], None] | None = None
            ) -> BreakdownResults:
    """1 process here, then :data:`RANKS` ranks under mpiexec (when there is one)."""
    from hpcqn.comm import get_comm

    rc.torch_one_thread()
    started = time.perf_counter()
    say = progress or (lambda message: None)
    steps, blocks = SCHEDULE[quick]
    comm = get_comm()
    if comm.size != 1:
        raise RuntimeError("report_breakdown.compute() runs in one process; it launches "
                           "the multi-rank part itself")
    rows = measure_all(comm, steps, blocks, say)
    res = BreakdownResults(rows, [1], steps, blocks, WARMUP)
    try:
        per_rank = rc.run_workers(Path(__file__).resolve(), RANKS,
                                  ["--steps", str(steps), "--blocks", str(blocks)],
                                  timeout=900)
    except FileNotFoundError:
        res.notes.append(f"No `mpiexec` on this machine's PATH: the {RANKS}-rank breakdown "
                         f"was not measured.")
        say("breakdown: no mpiexec, skipping the multi-rank part")
    else:
        res.rows += merge(per_rank)
        res.ranks.append(RANKS)
        say(f"breakdown: {RANKS} ranks done")
    res.seconds = time.perf_counter() - started
    return res


# -- the section -----------------------------------------------------------------------------
def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def table(res: BreakdownResults, model: str, ranks: int) -> list[str]:
    head = ["method", "fwd+bwd", "statistics", "factors", "precondition", "communication",
            "update", "other", "step total", "iteration total", "iteration / SGD",
            "bytes sent / received per step", "iteration: update steps", "other steps"]
    sgd = res.row(model, "sgd", ranks)
    rows = []
    for method in METHODS:
        row = res.row(model, method, ranks)
        if row is None:
            continue
        rows.append([
            LABELS[method], *(_ms(row[f"{c}_ms"]) for c in COLUMNS),
            _ms(row["step_ms"]), _ms(row["iteration_ms"]),
            f"{row['iteration_ms'] / sgd['iteration_ms']:.2f}" if sgd else "-",
            f"{rc.human_bytes(row['bytes_sent'])} / {rc.human_bytes(row['bytes_received'])}",
            (f"{_ms(row['update_iteration_ms'])} ({row['update_steps']})"
             if row["update_steps"] else "-"),
            _ms(row["plain_iteration_ms"]) if row["update_steps"] else "-"])
    return rc.table(head, rows)


def plot(res: BreakdownResults, model: str, out: Path) -> str:
    """Stacked bars of the per-iteration phases, one panel per rank count."""
    fig, axes = rc.pyplot().subplots(1, len(res.ranks), figsize=(6 * len(res.ranks), 4.2),
                             squeeze=False, sharey=True)
    for ax, ranks in zip(axes[0], res.ranks, strict=True):
        methods = [m for m in METHODS if res.row(model, m, ranks) is not None]
        bottom = [0.0] * len(methods)
        for column in COLUMNS:
            heights = [max(0.0, res.row(model, m, ranks)[f"{column}_ms"]) for m in methods]
            ax.bar([LABELS[m] for m in methods], heights, bottom=bottom, color=COLORS[column],
                   label="forward+backward" if column == "fwd_bwd" else column)
            bottom = [b + h for b, h in zip(bottom, heights, strict=True)]
        ax.set_title(f"{ranks} rank{'s' if ranks > 1 else ''}")
        ax.set_ylabel("ms per iteration (mean)")
        ax.grid(True, axis="y", alpha=0.3)
    axes[0][-1].legend(fontsize=8)
    fig.suptitle(f"{TITLES[model]}: time per iteration by phase, global batch {BATCH}")
    return rc.save_figure(fig, out, f"breakdown_{model}.png")


def dominant_phase(row: dict[str, Any]) -> tuple[str, float]:
    """The optimizer-step phase with the most time, and its share of the step."""
    name = max(PHASES, key=lambda p: row[f"{p}_ms"])
    return name, row[f"{name}_ms"] / row["step_ms"] if row["step_ms"] > 0 else 0.0


def render(res: BreakdownResults, out: Path, quick: bool = False) -> str:
    """The Markdown section; writes one PNG per model into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    means = (f"On {max(res.ranks)} ranks the numbers are means over the ranks. "
             if max(res.ranks) > 1 else "")
    lines = [
        "## Step-time breakdown",
        "",
        f"Milliseconds per training iteration: {res.warmup} untimed steps, then "
        f"{res.blocks} blocks of {res.steps} steps; the means of the block with the median "
        f"iteration time are shown (a shared machine's bursts of load hit single blocks). "
        f"Global batch {BATCH} (split over the ranks), float32, "
        f"one thread per rank; each method with its job file's options and learning rate. "
        f"{means}"
        "*fwd+bwd*: forward and backward (for K-FAC and MKOR this includes the hooks that "
        "record layer inputs and output gradients); the optimizer step is split by "
        "`hpcqn.timing.PhaseTimer` (hpcqn's optimizers) into *statistics* (per-layer "
        "vectors or factors from the recorded rows; mL-BFGS's momentum averages), "
        "*factors* (curvature updates: K-FAC's running averages and inversions, MKOR's "
        "Sherman-Morrison updates, mL-BFGS's new pairs), *precondition*, *update* (the "
        "first-order step) and *communication* (the step's time inside the "
        "communicator's collectives, waiting for the other rank included, plus the "
        "copies around them that the optimizers time with it: K-FAC's and MKOR's "
        "gradient averaging through a flat buffer, mL-BFGS's division of the summed "
        "gradient by the rank count); for SGD and Adam, communication is "
        "`hpcqn.torch.average_gradients` and update is `step()`. *other*: the rest of "
        "the step (the torch bridge's work before the core step, such as mL-BFGS's "
        "`prepare_step`, MKOR-H's one-number loss allreduce for its switch, and Python "
        "overhead). *Update steps*: the steps that refresh the "
        "curvature (K-FAC's inversions and MKOR's factor updates every `factor_freq` steps, "
        "mL-BFGS's pair every `period` steps), with their count in the block; bytes are "
        "per rank, from the communicator's counters (on one process they count the "
        "payload handed to collectives that then only copy locally, as mL-BFGS's do).",
        "",
    ]
    lines += [note + "\n" for note in res.notes]
    for model, _, _ in MODELS:
        lines += [f"### {TITLES[model]}", ""]
        for ranks in res.ranks:
            lines += [f"{ranks} rank{'s' if ranks > 1 else ''}:", "", *table(res, model, ranks),
                      ""]
        switched = [f"{r['ranks']} rank(s): step {r['switched_at']}" for r in res.rows
                    if r["model"] == model and r["method"] == "mkor_h" and r["switched_at"]]
        if switched:
            lines += [f"MKOR-H switched to its first-order optimizer during the measurement "
                      f"({'; '.join(switched)}).", ""]
        name = plot(res, model, out)
        lines += [f"![{TITLES[model]}: time per iteration by phase]({name})", ""]
    lines.append(f"(breakdown section: {res.seconds:.0f} s)")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    rc.section_main(compute, render, __doc__, worker=worker,
                    add_arguments=worker_arguments)
