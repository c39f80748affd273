# ruff: noqa: E402  (one thread per process, set before NumPy loads)
"""Report section: epochs and wall-clock seconds to a target for SGD with momentum, Adam,
K-FAC, mL-BFGS, MKOR and MKOR-H on the digits CNN, the digits MLP and the digits
autoencoder, one process.

Each method's learning rate comes from one grid shared by all methods and jobs, chosen
on seeds 0 and 1 by the lowest final training loss of the worse of the two (a run that
diverges, i.e. ends with a non-finite loss or raises, counts as worst); the chosen rate
then runs on every seed.
The other options come from the job files (``jobs/*.toml``).

    python benchmarks/report_convergence.py [--quick] [--seeds N] [--out DIR]
"""

from __future__ import annotations

import report_common as rc

rc.one_thread()  # before NumPy loads its BLAS

import contextlib
import io
import math
import statistics
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

METHODS = ("sgd", "adam", "kfac", "mlbfgs", "mkor", "mkor_h")
SECOND_ORDER = ("kfac", "mlbfgs", "mkor", "mkor_h")
LABELS = {"sgd": "SGD", "adam": "Adam", "kfac": "K-FAC", "mlbfgs": "mL-BFGS",
          "mkor": "MKOR", "mkor_h": "MKOR-H"}
# K-FAC's options as KAISA's defaults; a job file's [methods.kfac] overrides them.
KFAC_DEFAULTS: dict[str, Any] = {"inv_freq": 10, "factor_decay": 0.95, "kl_clip": 1e-3}
GRID = (0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0)
QUICK_GRID = (0.03, 0.1, 0.3, 1.0)
SELECTION_SEEDS = 2  # the learning rate is chosen on this many seeds (the first ones)
# Where a job's own file has no [methods.X], the MKOR job's (the CNN with every method) is used.
FALLBACK_JOB = "digits_mkor"


@dataclass(frozen=True)
class Target:
    """``metric`` (``train_loss`` or ``test_accuracy``) at or past ``value``."""

    metric: str
    value: float

    @property
    def lower_is_better(self) -> bool:
        return self.metric != "test_accuracy"

    def met(self, record: dict[str, Any]) -> bool:
        value = record.get(self.metric, math.nan)
        return value <= self.value if self.lower_is_better else value >= self.value

    def label(self) -> str:
        name = self.metric.replace("_", " ")
        return f"{name} {'≤' if self.lower_is_better else '≥'} {self.value:g}"


@dataclass(frozen=True)
class Job:
    """One training job: model, schedule, targets and each method's options (no lr)."""

    key: str
    title: str
    job_file: str
    model: str
    hidden: int
    epochs: int
    batch_size: int
    lr_schedule: str
    targets: tuple[Target, ...]
    options: dict[str, dict[str, Any]]
    sources: dict[str, str]

    @property
    def test_metric(self) -> str:
        return "test_loss" if self.model == "autoencoder" else "test_accuracy"


@dataclass
class Run:
    seed: int
    lr: float
    records: list[dict[str, Any]]
    error: str | None = None

    @property
    def diverged(self) -> bool:
        return self.error is not None or not self.records or not all(
            math.isfinite(r["train_loss"]) for r in self.records)

    @property
    def final_loss(self) -> float:
        """The last training loss; infinite for a diverged run (the worst)."""
        return math.inf if self.diverged else float(self.records[-1]["train_loss"])

    def to_target(self, target: Target) -> tuple[int, float] | None:
        """(epoch, training seconds) at the end of the first epoch that met the target."""
        for record in self.records:
            if target.met(record):
                return int(record["epoch"]), float(record["seconds"])
        return None


@dataclass
class TargetStats(rc.SeedsToTarget):
    """One method's seeds against one target."""

    reached: int
    seeds: int
    epochs: list[float]
    seconds: list[float]

    @property
    def median_epochs(self) -> float:
        return statistics.median(self.epochs) if self.epochs else math.inf


@dataclass
class MethodResult:
    method: str
    lr: float
    grid: dict[float, float]  # lr -> worst final training loss over the selection seeds
    runs: list[Run]

    def stats(self, target: Target) -> TargetStats:
        hits = [h for h in (r.to_target(target) for r in self.runs) if h is not None]
        return TargetStats(len(hits), len(self.runs), [float(e) for e, _ in hits],
                           [s for _, s in hits])

    def final(self, key: str) -> list[float]:
        return [float(r.records[-1][key]) for r in self.runs if r.records]

    def seconds_per_epoch(self) -> list[float]:
        return [r.records[-1]["seconds"] / r.records[-1]["epoch"] for r in self.runs
                if r.records]


@dataclass
class JobResult:
    job: Job
    methods: dict[str, MethodResult]
    seconds: float

    def ranking(self, target: Target) -> list[tuple[str, TargetStats]]:
        """Methods that reach the target on most seeds, fastest (median seconds) first."""
        ranked = [(m, r.stats(target)) for m, r in self.methods.items()]
        return sorted([(m, s) for m, s in ranked if s.majority],
                      key=lambda item: item[1].median_seconds)


@dataclass
class ConvergenceResults:
    jobs: list[JobResult]
    grid: tuple[float, ...]
    seeds: list[int]
    quick: bool
    seconds: float = 0.0



# -- jobs ------------------------------------------------------------------------------------
def _load(name: str) -> dict[str, Any]:
    from hpcqn.experiments.jobs import load_job

    return load_job(rc.ROOT / "jobs" / f"{name}.toml")


def method_options(job_file: str, method: str, with_lr: bool = False) -> tuple[dict[str, Any],
                                                                                str]:
    """A method's options from the job file's ``[methods.X]`` (without ``lr`` unless
    ``with_lr``), else from the MKOR job's, else none; K-FAC on top of KAISA's defaults;
    SGD always with momentum 0.9. Returns the options and where they came from."""
    options: dict[str, Any] = {}
    source = "defaults"
    for name in dict.fromkeys((job_file, FALLBACK_JOB)):
        methods = _load(name).get("methods", {})
        if method in methods:
            options = dict(methods[method])
            source = f"jobs/{name}.toml"
            break
    if not with_lr:
        options.pop("lr", None)
    if method == "kfac":
        options = {**KFAC_DEFAULTS, **options}
    if method == "sgd":
        options.setdefault("momentum", 0.9)
    return options, source


def jobs() -> list[Job]:
    """The three digits jobs, with epochs, batch size and schedule from their job files
    and the training-loss targets of this report."""
    specs = [("cnn", "Digits CNN", "digits_cnn", 0.01),
             ("mlp", "Digits MLP", "digits_mlp", 0.01),
             ("autoencoder", "Digits autoencoder", "digits_autoencoder", 0.03)]
    out = []
    for key, title, job_file, loss_target in specs:
        config = _load(job_file)
        train = config["train"]
        targets = [Target("train_loss", loss_target)]
        if "target_accuracy" in train:
            targets.append(Target("test_accuracy", float(train["target_accuracy"])))
        options, sources = {}, {}
        for method in METHODS:
            options[method], sources[method] = method_options(job_file, method)
        out.append(Job(key, title, job_file, config["model"]["name"],
                       int(config["model"].get("hidden", 128)), int(train["epochs"]),
                       int(train["batch_size"]), str(train.get("lr_schedule", "constant")),
                       tuple(targets), options, sources))
    return out


# -- running ---------------------------------------------------------------------------------
def train_once(job: Job, method: str, lr: float, seed: int, epochs: int | None = None) -> Run:
    """One training run in this process; a run that raises (e.g. a factorisation of
    non-finite factors) is kept as diverged with the error. The warnings of diverging
    runs (overflow, non-finite statistics) are silenced: the grid has such runs by
    design, and their final loss says what happened."""
    from hpcqn.comm import get_comm
    from hpcqn.experiments.training import train

    options = {**job.options[method], "lr": lr}
    try:
        # stdout: MKOR-H's line when it switches (the records hold the step)
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            out = train(method, get_comm(), model_name=job.model, options=options,
                        epochs=epochs or job.epochs, batch_size=job.batch_size, seed=seed,
                        lr_schedule=job.lr_schedule, log=False, hidden=job.hidden)
    except (ArithmeticError, RuntimeError, ValueError, np.linalg.LinAlgError) as exc:
        return Run(seed, lr, [], f"{type(exc).__name__}: {exc}")
    return Run(seed, lr, [dict(r) for r in out["records"]])


def run_job(job: Job, grid: Sequence[float], seeds: Sequence[int],
            progress: Callable[[str], None]) -> JobResult:
    """Every method on every grid point and selection seed, then the chosen rates on the
    other seeds. The methods take turns run by run, so that a burst of load from other
    processes slows them alike."""
    started = time.perf_counter()
    for method in METHODS:
        train_once(job, method, grid[0], 99, epochs=1)  # warm-up, not counted
    selection = list(seeds[:SELECTION_SEEDS])
    grid_runs: dict[str, dict[float, list[Run]]] = {m: {} for m in METHODS}
    for lr in grid:
        for seed in selection:
            for method in METHODS:
                grid_runs[method].setdefault(lr, []).append(train_once(job, method, lr, seed))
        progress(f"convergence: {job.key} lr {lr:g} on seeds {selection}")
    chosen, scores = {}, {}
    for method in METHODS:
        scores[method] = {lr: max(run.final_loss for run in runs)
                          for lr, runs in grid_runs[method].items()}
        # lowest worst-case final loss; all diverged: the smallest rate
        chosen[method] = min(grid, key=lambda lr, m=method: (scores[m][lr], lr))
    runs = {m: list(grid_runs[m][chosen[m]]) for m in METHODS}
    for seed in seeds[len(selection):]:
        for method in METHODS:
            runs[method].append(train_once(job, method, chosen[method], seed))
        progress(f"convergence: {job.key} seed {seed} at the chosen rates")
    methods = {m: MethodResult(m, chosen[m], scores[m], runs[m]) for m in METHODS}
    progress(f"convergence: {job.key} done; rates "
             + ", ".join(f"{LABELS[m]} {chosen[m]:g}" for m in METHODS))
    return JobResult(job, methods, time.perf_counter() - started)


def compute(quick: bool = False, seeds: int = 3,
            progress: Callable[[str], None] | None = None) -> ConvergenceResults:
    """Every job, method, grid point and seed."""
    rc.torch_one_thread()
    started = time.perf_counter()
    say = progress or (lambda message: None)
    grid = QUICK_GRID if quick else GRID
    seed_list = list(range(max(1, seeds)))
    done = [run_job(job, grid, seed_list, say) for job in jobs()]
    return ConvergenceResults(done, tuple(grid), seed_list, quick,
                              time.perf_counter() - started)


# -- the section -----------------------------------------------------------------------------
def spread(values: Sequence[float], fmt: str) -> str:
    """Median (min-max) of the values; ``-`` when there are none."""
    finite = [v for v in values if math.isfinite(v)]
    if not values:
        return "-"
    if len(finite) < len(values):
        return f"{format(statistics.median(finite), fmt) if finite else 'nan'} " \
               f"({len(values) - len(finite)} non-finite)"
    middle = format(statistics.median(values), fmt)
    if len(values) == 1 or min(values) == max(values):
        return middle
    return f"{middle} ({format(min(values), fmt)}-{format(max(values), fmt)})"


def _seconds(stats: TargetStats) -> str:
    return f"{stats.median_seconds:.2f} s, {stats.median_epochs:g} epochs"


def verdict(result: JobResult, target: Target) -> str:
    """Which method reaches the target first in wall-clock, by how much against SGD and
    Adam, and whether each second-order method beats SGD and Adam (medians over the
    seeds that reached the target; a method counts only when most seeds reach it)."""
    ranking = result.ranking(target)
    if not ranking:
        return f"No method reaches {target.label()} on most seeds."
    best, fastest = ranking[0]
    stats = {m: r.stats(target) for m, r in result.methods.items()}
    parts = [f"Fastest to {target.label()} in wall-clock: **{LABELS[best]}** "
             f"({_seconds(fastest)}, medians)"]
    for first in ("sgd", "adam"):
        theirs = stats[first]
        if first == best:
            continue
        if theirs.majority:
            ratio = theirs.median_seconds / fastest.median_seconds
            parts.append(f"{LABELS[first]} takes {ratio:.2f}x as long ({_seconds(theirs)})")
        else:
            parts.append(f"{LABELS[first]} reaches it on {theirs.reached}/{theirs.seeds} seeds")
    lines = ["; ".join(parts) + "."]
    for method in SECOND_ORDER:
        mine = stats[method]
        if not mine.majority:
            lines.append(f"{LABELS[method]} does NOT reach it on most seeds "
                         f"({mine.reached}/{mine.seeds}).")
            continue
        slower = [f"{LABELS[f]} ({mine.median_seconds / stats[f].median_seconds:.2f}x its time)"
                  for f in ("sgd", "adam")
                  if stats[f].majority and mine.median_seconds >= stats[f].median_seconds]
        if slower:
            lines.append(f"{LABELS[method]} ({_seconds(mine)}) does NOT beat "
                         f"{' or '.join(slower)}.")
        else:
            lines.append(f"{LABELS[method]} ({_seconds(mine)}) beats SGD and Adam.")
    return " ".join(lines)


def _table(result: JobResult) -> list[str]:
    job = result.job
    metric = job.test_metric.replace("_", " ")
    head = ["method", "lr"]
    for target in job.targets:
        head += [f"seeds to {target.label()}", "epochs", "seconds"]
    head += ["final train loss", f"final {metric}", "seconds / epoch"]
    rows = []
    for method, mine in result.methods.items():
        row = [LABELS[method], f"{mine.lr:g}"]
        for target in job.targets:
            s = mine.stats(target)
            row += [f"{s.reached}/{s.seeds}", spread(s.epochs, ".0f"), spread(s.seconds, ".2f")]
        row += [spread(mine.final("train_loss"), ".3g"),
                spread(mine.final(job.test_metric), ".3g" if job.model == "autoencoder"
                       else ".4f"),
                spread(mine.seconds_per_epoch(), ".3f")]
        rows.append(row)
    return rc.table(head, rows, left=2)


def _grid_table(result: JobResult, grid: Sequence[float]) -> list[str]:
    rows = []
    for method, mine in result.methods.items():
        cells = [LABELS[method]]
        for lr in grid:
            loss = mine.grid[lr]
            text = "diverged" if not math.isfinite(loss) else f"{loss:.3g}"
            cells.append(f"**{text}**" if lr == mine.lr else text)
        rows.append(cells)
    return rc.table(["method", *(f"lr {lr:g}" for lr in grid)], rows)


def _curves(runs: list[Run], key: str) -> tuple[np.ndarray, np.ndarray, np.ndarray,
                                                np.ndarray] | None:
    """Epochs (or median seconds), median, min and max of ``key`` over the runs that
    finished all epochs."""
    done = [r for r in runs if r.records]
    if not done:
        return None
    n = min(len(r.records) for r in done)
    values = np.array([[rec["train_loss"] for rec in r.records[:n]] for r in done], float)
    x = np.array([[rec[key] for rec in r.records[:n]] for r in done], float)
    return (np.median(x, axis=0), np.median(values, axis=0), values.min(axis=0),
            values.max(axis=0))


def plot(result: JobResult, out: Path) -> str:
    """Training loss against epochs and against seconds (median over seeds, min-max
    band, log scale) for every method; returns the PNG's file name."""
    fig, axes = rc.pyplot().subplots(1, 2, figsize=(12, 4.2))
    loss_target = next((t for t in result.job.targets if t.metric == "train_loss"), None)
    for ax, key, xlabel in ((axes[0], "epoch", "epoch"),
                            (axes[1], "seconds", "training seconds (median over seeds)")):
        for method, mine in result.methods.items():
            curve = _curves(mine.runs, key)
            if curve is None:
                continue
            x, median, low, high = curve
            with np.errstate(invalid="ignore"):
                ok = np.isfinite(median) & (median > 0)
            line, = ax.plot(x[ok], median[ok], label=f"{LABELS[method]} (lr {mine.lr:g})")
            ax.fill_between(x[ok], low[ok], high[ok], color=line.get_color(), alpha=0.2)
        if loss_target is not None:
            ax.axhline(loss_target.value, color="black", linestyle="--", linewidth=0.8,
                       label=f"target {loss_target.value:g}")
        ax.set_yscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("training loss")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{result.job.title}: training loss, median over "
                 f"{len(next(iter(result.methods.values())).runs)} seeds (band: min-max)")
    return rc.save_figure(fig, out, f"convergence_{result.job.key}.png")


def _switches(mine: MethodResult) -> str:
    """When MKOR-H handed over to its first-order optimizer, per seed."""
    steps = [r.records[-1].get("switched_at_step") if r.records else None for r in mine.runs]
    if not any(steps):
        return "MKOR-H did not switch to its first-order optimizer on any seed."
    return ("MKOR-H switched to its first-order optimizer after step "
            + ", ".join(f"{s} (seed {r.seed})" if s else f"never (seed {r.seed})"
                        for s, r in zip(steps, mine.runs, strict=True)) + ".")


def _options(options: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in options.items()) or "defaults"


def render(res: ConvergenceResults, out: Path, quick: bool = False) -> str:
    """The Markdown section; writes one PNG per job into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    lines = [
        "## Convergence: epochs and seconds to a target",
        "",
        f"One process, float32, the digits data set (1347 training and 450 test images, "
        f"8x8); seeds {res.seeds} (the seed sets the train/test split, the initial model "
        f"and the batch order). Every method starts from the same model and sees the same "
        f"batches. Seconds are training time only (the per-epoch evaluation excluded), read "
        f"at the end of the first epoch that meets the target, so they come in whole epochs.",
        "",
        f"**Learning rates**: one grid for every method and job, "
        f"{{{', '.join(f'{lr:g}' for lr in res.grid)}}}"
        + (" (the quick grid; the full report uses "
           f"{{{', '.join(f'{lr:g}' for lr in GRID)}}})" if res.quick else "")
        + f". Rule: on seeds {res.seeds[:SELECTION_SEEDS]}, the rate whose worse final "
          "training loss of the two is lowest; a run that diverges (non-finite loss, or an "
          "error) counts as worst. The chosen rate then runs on the other seeds too (the "
          "selection runs are reused). Each method runs one untimed epoch first (warm-up); "
          "the methods take turns run by run, so that load from other processes hits "
          "them alike.",
        "",
        "**Other options** come from the job files (`[methods.X]` without `lr`; where a "
        f"job's file has no such table, `jobs/{FALLBACK_JOB}.toml`'s): SGD with momentum "
        f"0.9; K-FAC on `{_options(KFAC_DEFAULTS)}` (KAISA's) and hpcqn's default damping "
        "0.03, overridden by the job file (damping, inv_freq); MKOR-H's switch window and "
        "threshold as in the job files. "
        "Targets: a training-loss target per job that most methods reach (the "
        "autoencoder's is its job file's), and the classifiers' test-accuracy target "
        "from their job files.",
        "",
    ]
    if res.quick:
        lines += ["*Quick mode*: the smaller learning-rate grid above; epochs as in the "
                  "full report.", ""]
    for result in res.jobs:
        job = result.job
        options = "; ".join(f"{LABELS[m]} `{_options(job.options[m])}` ({job.sources[m]})"
                            for m in METHODS)
        lines += [
            f"### {job.title}",
            "",
            f"Model `{job.model}`" + (f" (hidden {job.hidden})" if job.model != "cnn" else "")
            + f", {job.epochs} epochs, batch {job.batch_size}, {job.lr_schedule} learning-rate "
              f"schedule (from `jobs/{job.job_file}.toml`); targets: "
            + ", ".join(t.label() for t in job.targets)
            + f". Options: {options}. This job took {result.seconds:.0f} s to run.",
            "",
            "Median over seeds (min-max); 'seeds to ...' counts the seeds that met the "
            "target within the epochs; epochs and seconds are over those seeds.",
            "",
            *_table(result),
            "",
        ]
        lines += [verdict(result, target) + "\n" for target in job.targets]
        lines.append(_switches(result.methods["mkor_h"]) + "\n")
        lines += [f"Worse final training loss of seeds {res.seeds[:SELECTION_SEEDS]} for "
                  f"every rate of the grid (bold: chosen):",
                  "", *_grid_table(result, res.grid), ""]
        name = plot(result, out)
        lines += [f"![{job.title}: training loss against epochs and seconds]({name})", ""]
    lines.append(f"(convergence section: {res.seconds:.0f} s)")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    rc.section_main(
        compute, render, __doc__,
        add_arguments=lambda parser: parser.add_argument(
            "--seeds", type=int, default=3, help="seeds per method (default 3)"),
        options=lambda args: {"seeds": args.seeds})
