"""mL-BFGS against SGD and Adam on an ill-conditioned convex problem at a constant rate:
multinomial logistic regression on scikit-learn's digits (standardised pixels,
``hpcqn.experiments.problems.DigitsSoftmax``, 650 parameters, one block per class,
``l2 = 1e-4``), batch 60, 20 epochs, the learning rate held constant, through
``hpcqn.minimize_stochastic`` (what ``jobs/logreg_mlbfgs.toml`` runs, there with a cosine
schedule). Score: the full training objective after the last step, the median over the
data seeds 0, 1, 2 (each seed its own train/test split and batch order); its gap to
``f*`` (full-batch L-BFGS to ``gtol 1e-10``, per seed).

Every configuration gets its best rate on a ladder of rates about 1.5x apart
(``1, 1.5, 2, 3, 5, 7`` per decade): a window of ``WINDOW`` rungs first, then one more
rung beyond whichever end holds the best, until the best is inside (a diverged run scores
worst). Configurations:

1. SGD (momentum 0.9), Adam, and mL-BFGS: the paper's plain step (no normalisation, no
   heavy ball), the default (the released code's: direction normalised to length 1,
   heavy ball 0.9), ``normalize_to="gradient"`` (the direction rescaled to the gradient's
   norm, heavy ball 0.9), with the default ``history``, ``period``, ``beta`` (10, 20,
   0.99), and both normalisations with ``beta=0.9``.
2. Why: at each one's best rate, the mean step length ``|x_{t+1} - x_t|`` over the last
   epoch, the curvature pairs stored and skipped, and the objective after 20 and after 60
   epochs at that same constant rate (a fixed step length is a floor on how close
   constant-rate iterates stay to ``x*``).
3. mL-BFGS's pair options at their best rates: ``period`` x ``beta`` for both
   normalisations (``history`` 10), which chose ``normalize_to``'s default and the
   job's settings.

Writes ``benchmarks/results/sweep_logreg.md`` (the tables) and
``benchmarks/results/sweep_logreg.jsonl`` (one line per run); ``--quick`` writes them to
a temporary directory unless ``--out`` is given. One process, one thread;
about five minutes on two shared cores::

    python benchmarks/sweep_logreg.py
    python benchmarks/sweep_logreg.py --quick      # one seed, parts 1 and 2 only
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

for _name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_name, "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402

from hpcqn import serial_comm  # noqa: E402
from hpcqn.experiments.problems import DigitsSoftmax  # noqa: E402
from hpcqn.stochastic import minimize_stochastic  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
BATCH, EPOCHS, LONG_EPOCHS, L2 = 60, 20, 60, 1e-4
SEEDS = (0, 1, 2)
MANTISSAS = (1.0, 1.5, 2.0, 3.0, 5.0, 7.0)  # the ladder's rungs per decade
WINDOW = 4  # rungs tried first
MAX_EXTENSIONS = 8


def rung(k: int) -> float:
    """The ``k``-th rate of the ladder (``rung(0) = 1``; 6 rungs per decade)."""
    decade, index = divmod(k, len(MANTISSAS))
    return float(f"{MANTISSAS[index] * 10.0 ** decade:.3g}")


def nearest_rung(lr: float) -> int:
    return min(range(-60, 30), key=lambda k: abs(math.log(rung(k) / lr)))


@dataclass
class Config:
    key: str
    label: str
    method: str
    options: dict[str, Any]
    start: float  # the rate at the window's low end

    def run(self, lr: float, seed: int, problem: DigitsSoftmax, epochs: int = EPOCHS
            ) -> dict[str, Any]:
        """One run: the final objective, its gap, the mean step length over the last
        epoch and the seconds."""
        steps_per_epoch = problem.train_y.size // BATCH
        last = {"x": problem.x0(), "lengths": []}

        def watch(state: Any) -> None:
            if state.epoch_end:
                return
            if state.nit > (epochs - 1) * steps_per_epoch:
                last["lengths"].append(float(np.linalg.norm(state.x - last["x"])))
            last["x"] = state.x.copy()

        began = time.perf_counter()
        with np.errstate(all="ignore"):
            result = minimize_stochastic(
                problem.batch_loss, problem.x0(), problem.batches(BATCH), method=self.method,
                comm=serial_comm(), callback=watch,
                options={"epochs": epochs, "lr": lr, "disp": False,
                         "blocks": problem.block_sizes, **self.options})
            loss = problem.train_loss(result.x)
        pairs = (result.optimizer.statistics() if self.method == "mlbfgs"
                 else {"npairs": 0, "skipped_pairs": 0})
        return {"config": self.key, "lr": lr, "seed": seed, "epochs": epochs,
                "loss": loss if math.isfinite(loss) else math.inf,
                "step_length": statistics.fmean(last["lengths"]) if last["lengths"] else 0.0,
                "pairs": pairs["npairs"], "skipped_pairs": pairs["skipped_pairs"],
                "seconds": time.perf_counter() - began}


@dataclass
class Search:
    config: Config
    scores: dict[float, float] = field(default_factory=dict)  # lr -> median loss
    runs: list[dict[str, Any]] = field(default_factory=list)

    @property
    def best(self) -> float:
        return min(self.scores, key=lambda lr: (self.scores[lr], lr))

    def at_edge(self) -> bool:
        rates = sorted(self.scores)
        return self.best in (rates[0], rates[-1])


def search(config: Config, problems: dict[int, DigitsSoftmax], log: Any) -> Search:
    """The config's best rate: ``WINDOW`` rungs from ``config.start``, extended one rung
    at a time past the end that holds the best."""
    found = Search(config)

    def score(k: int) -> None:
        lr = rung(k)
        runs = [config.run(lr, seed, problems[seed]) for seed in problems]
        found.runs += runs
        found.scores[lr] = statistics.median(r["loss"] for r in runs)
        log(json.dumps(runs))

    first = nearest_rung(config.start)
    for k in range(first, first + WINDOW):
        score(k)
    for _ in range(MAX_EXTENSIONS):
        if not found.at_edge():
            break
        rates = sorted(found.scores)
        score(nearest_rung(rates[0]) - 1 if found.best == rates[0]
              else nearest_rung(rates[-1]) + 1)
    return found


# -- the tables ------------------------------------------------------------------------------
def _grid_text(found: Search) -> str:
    return ", ".join(f"**{lr:g}: {loss:.5f}**" if lr == found.best else f"{lr:g}: {loss:.5f}"
                     for lr, loss in sorted(found.scores.items()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="seed 0 only, parts 1 and 2")
    parser.add_argument("--out", type=Path, default=None,
                        help=f"default {RESULTS} (quick: a temporary directory)")
    args = parser.parse_args()
    if args.out is None:
        args.out = Path(tempfile.mkdtemp(prefix="sweep_logreg_")) if args.quick else RESULTS
    started = time.perf_counter()
    seeds = SEEDS[:1] if args.quick else SEEDS
    problems = {s: DigitsSoftmax(l2=L2, seed=s) for s in seeds}
    optimum = {s: p.optimum() for s, p in problems.items()}
    args.out.mkdir(parents=True, exist_ok=True)
    raw = (args.out / "sweep_logreg.jsonl").open("w")

    def log(line: str) -> None:
        raw.write("".join(json.dumps(r) + "\n" for r in json.loads(line)))
        raw.flush()

    mlbfgs = {"history": 10, "period": 20, "beta": 0.99}
    configs = [
        Config("sgd", "SGD (momentum 0.9)", "sgd", {"momentum": 0.9}, 0.1),
        Config("adam", "Adam", "adam", {}, 0.01),
        Config("plain", "mL-BFGS, plain steps (the paper's)", "mlbfgs",
               {**mlbfgs, "normalize_direction": False, "direction_momentum": 0.0}, 0.03),
        Config("unit", "mL-BFGS, normalised to 1 + heavy ball 0.9 (the released code's)",
               "mlbfgs", {**mlbfgs, "normalize_to": "unit"}, 0.02),
        Config("gradient", "mL-BFGS, normalised to the gradient's norm + heavy ball 0.9",
               "mlbfgs", {**mlbfgs, "normalize_to": "gradient"}, 0.15),
        Config("unit_b0.9", "mL-BFGS, normalised to 1, beta 0.9", "mlbfgs",
               {**mlbfgs, "beta": 0.9, "normalize_to": "unit"}, 0.02),
        Config("gradient_b0.9", "mL-BFGS, normalised to the gradient's norm, beta 0.9 "
               "(jobs/logreg_mlbfgs.toml)", "mlbfgs",
               {**mlbfgs, "beta": 0.9, "normalize_to": "gradient"}, 0.15),
    ]
    found = {}
    for config in configs:
        found[config.key] = search(config, problems, log)
        print(f"[{time.perf_counter() - started:6.1f} s] {config.key}: best lr "
              f"{found[config.key].best:g}", file=sys.stderr, flush=True)
    sgd = found["sgd"].scores[found["sgd"].best]
    fstar = statistics.median(optimum.values())
    lines = [
        "# mL-BFGS on logistic regression at a constant rate",
        "",
        f"Digits softmax regression (650 parameters, 10 blocks, l2 {L2:g}), batch {BATCH}, "
        f"{EPOCHS} epochs, constant rate, one process; data seeds {list(seeds)}; score: the "
        "full training objective after the last step, median over the seeds (f* median "
        f"{fstar:.6f}). Best rate of a ladder 1-1.5-2-3-5-7 per decade, never at an edge "
        "of the rates run. `python benchmarks/sweep_logreg.py"
        f"{' --quick' if args.quick else ''}`.",
        "",
        "## 1. Each method at its best rate",
        "",
        "| method | best lr | final loss (median) | gap to f* | loss / SGD's | rates run "
        "(median final loss) |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for f in found.values():
        best = f.scores[f.best]
        lines.append(f"| {f.config.label} | {f.best:g} | {best:.5f} | {best - fstar:.2e} | "
                     f"{best / sgd:.3f} | {_grid_text(f)} |")
    lines += ["", "## 2. Why: the step length at the best rate, and longer runs at it", "",
              "Mean `|x_{t+1} - x_t|` over the last of 20 epochs, the curvature pairs "
              "stored and skipped over the 10 blocks (medians over the seeds); the "
              f"objective after {EPOCHS} and {LONG_EPOCHS} epochs at the same constant rate.",
              "", f"| method | lr | step length, epoch {EPOCHS} | pairs stored / skipped "
              f"| loss, {EPOCHS} epochs | loss, {LONG_EPOCHS} epochs |",
              "|---|---:|---:|---:|---:|---:|"]
    for f in found.values():
        runs = [r for r in f.runs if r["lr"] == f.best]
        longer = [f.config.run(f.best, s, problems[s], LONG_EPOCHS) for s in seeds]
        log(json.dumps(longer))
        lines.append(f"| {f.config.label} | {f.best:g} | "
                     f"{statistics.median(r['step_length'] for r in runs):.3g} | "
                     f"{statistics.median(r['pairs'] for r in runs):g} / "
                     f"{statistics.median(r['skipped_pairs'] for r in runs):g} | "
                     f"{statistics.median(r['loss'] for r in runs):.5f} | "
                     f"{statistics.median(r['loss'] for r in longer):.5f} |")
    if not args.quick:
        lines += ["", "## 3. mL-BFGS: period x beta at each one's best rate (history 10)", "",
                  "| normalize_to | period | beta | best lr | final loss | loss / SGD's |",
                  "|---|---:|---:|---:|---:|---:|"]
        for to, start in (("unit", 0.02), ("gradient", 0.15)):
            for period in (5, 10, 20, 50):
                for beta in (0.9, 0.99, 0.999):
                    config = Config(f"{to}_p{period}_b{beta}", "", "mlbfgs",
                                    {"history": 10, "period": period, "beta": beta,
                                     "normalize_to": to}, start)
                    f = search(config, problems, log)
                    best = f.scores[f.best]
                    lines.append(f"| {to} | {period} | {beta:g} | {f.best:g} | {best:.5f} | "
                                 f"{best / sgd:.3f} |")
                    print(f"[{time.perf_counter() - started:6.1f} s] {config.key}",
                          file=sys.stderr, flush=True)
    lines += ["", f"(sweep: {time.perf_counter() - started:.0f} s)"]
    raw.close()
    text = "\n".join(lines) + "\n"
    (args.out / "sweep_logreg.md").write_text(text)
    sys.stdout.write(text)


if __name__ == "__main__":
    main()
