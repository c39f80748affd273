"""MKOR and MKOR-H against SGD with momentum and Adam: epochs and seconds to a target on
the digits CNN and the digits autoencoder, with the methods and learning rates of the
shipped jobs (``jobs/digits_mkor.toml``, ``jobs/digits_autoencoder.toml``), over several
seeds, in one process.

    python benchmarks/bench_mkor.py [--quick] [--seeds 3] [--json PATH]

Seconds are training time only (evaluation excluded), read at the end of the epoch in
which the target was first met; every method runs once untimed first (warm-up).
"""

from __future__ import annotations

import os

for _name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_name, "1")

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from dataclasses import asdict, dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

import hpcqn  # noqa: E402
from hpcqn.experiments.jobs import load_job  # noqa: E402
from hpcqn.experiments.training import train  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
LABELS = {"mkor": "MKOR", "mkor_h": "MKOR-H", "sgd": "SGD (momentum 0.9)", "adam": "Adam"}
# (job file, metric, target, better): the CNN is judged on training loss and on test
# accuracy, the autoencoder on training loss (the job's target, and a lower one).
CASES = [
    ("digits_mkor", "train_loss", 0.01, "below"),
    ("digits_mkor", "train_loss", 0.005, "below"),
    ("digits_mkor", "test_accuracy", 0.98, "above"),
    ("digits_autoencoder", "train_loss", 0.03, "below"),
    ("digits_autoencoder", "train_loss", 0.025, "below"),
]


@dataclass
class Run:
    job: str
    method: str
    seed: int
    epochs: list[int]
    train_loss: list[float]
    test_metric: list[float]
    seconds: list[float]
    switched_at_step: int | None


def run_job(job: str, method: str, seed: int, epochs: int | None) -> Run:
    config = load_job(ROOT / "jobs" / f"{job}.toml")
    model, options = config["model"], config["train"]
    out = train(method, hpcqn.serial_comm(), model["name"], config["methods"][method],
                epochs=epochs or int(options["epochs"]), batch_size=int(options["batch_size"]),
                seed=seed, lr_schedule=options["lr_schedule"], log=False,
                hidden=int(model.get("hidden", 128)))
    records = out["records"]
    test_key = "test_loss" if model["name"] == "autoencoder" else "test_accuracy"
    return Run(job, method, seed, [r["epoch"] for r in records],
               [r["train_loss"] for r in records], [r[test_key] for r in records],
               [r["seconds"] for r in records], records[-1].get("switched_at_step"))


def to_target(run: Run, metric: str, target: float, better: str) -> tuple[int, float] | None:
    values = run.train_loss if metric == "train_loss" else run.test_metric
    for epoch, value, seconds in zip(run.epochs, values, run.seconds, strict=True):
        if (value <= target) if better == "below" else (value >= target):
            return epoch, seconds
    return None


def spread(values: list[float], fmt: str) -> str:
    if not values:
        return "-"
    middle = format(statistics.median(values), fmt)
    if len(values) == 1 or min(values) == max(values):
        return middle
    return f"{middle} ({format(min(values), fmt)}-{format(max(values), fmt)})"


def report(runs: list[Run]) -> None:
    for job, metric, target, better in CASES:
        mine = [r for r in runs if r.job == job]
        print(f"\n### {job}: to {metric.replace('_', ' ')} {'<=' if better == 'below' else '>='}"
              f" {target}\n")
        print("Median over seeds (min-max); 'reached' counts the seeds that met the target "
              "within the job's epochs.\n")
        print("| method | reached | epochs to target | seconds to target | seconds per epoch "
              "| final train loss | final test metric | MKOR-H switch step |")
        print("|---|---:|---:|---:|---:|---:|---:|---|")
        sgd_seconds = None
        rows = []
        for method in LABELS:
            of_method = [r for r in mine if r.method == method]
            if not of_method:
                continue
            hits = [h for h in (to_target(r, metric, target, better) for r in of_method) if h]
            epochs = [float(h[0]) for h in hits]
            seconds = [h[1] for h in hits]
            per_epoch = [r.seconds[-1] / r.epochs[-1] for r in of_method]
            switches = sorted({str(r.switched_at_step) for r in of_method}) if method == \
                "mkor_h" else ["-"]
            rows.append((method, len(hits), epochs, seconds))
            if method == "sgd" and seconds:
                sgd_seconds = statistics.median(seconds)
            print(f"| {LABELS[method]} | {len(hits)}/{len(of_method)} | {spread(epochs, '.0f')} "
                  f"| {spread(seconds, '.2f')} | {spread(per_epoch, '.3f')} "
                  f"| {spread([r.train_loss[-1] for r in of_method], '.4f')} "
                  f"| {spread([r.test_metric[-1] for r in of_method], '.4f')} "
                  f"| {', '.join(switches)} |")
        verdicts = []
        mkor = next((row for row in rows if row[0] == "mkor"), None)
        if mkor and mkor[2]:
            for method, _, epochs, _seconds in rows:
                if method in ("sgd", "adam"):
                    fewer = not epochs or statistics.median(mkor[2]) < statistics.median(epochs)
                    verdicts.append(f"fewer epochs than {LABELS[method]}: "
                                    f"{'yes' if fewer else 'NO'}")
            if sgd_seconds is not None:
                faster = statistics.median(mkor[3]) < sgd_seconds
                verdicts.append(f"fewer seconds than SGD: {'yes' if faster else 'NO'} "
                                f"({statistics.median(mkor[3]) / sgd_seconds:.2f}x SGD's)")
            else:
                verdicts.append("fewer seconds than SGD: yes (SGD did not reach the target)")
        else:
            verdicts.append("MKOR did not reach the target")
        print("\nMKOR (medians): " + "; ".join(verdicts) + ".")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="one seed and at most 4 epochs (a smoke test)")
    parser.add_argument("--seeds", type=int, default=3, help="seeds per method (default 3)")
    parser.add_argument("--json", type=Path, help="also write the runs to this JSON file")
    args = parser.parse_args()
    torch.set_num_threads(1)
    seeds = [0] if args.quick else list(range(args.seeds))
    epochs = 4 if args.quick else None
    started = time.perf_counter()
    runs: list[Run] = []
    for job in dict.fromkeys(case[0] for case in CASES):
        for method in LABELS:
            run_job(job, method, 99, 1)  # warm-up, untimed
            for seed in seeds:
                print(f"  {job} {method} seed {seed}", file=sys.stderr, flush=True)
                runs.append(run_job(job, method, seed, epochs))
    print(f"## MKOR and MKOR-H vs SGD and Adam on digits{' (--quick)' if args.quick else ''}\n")
    print(f"Machine: {machine(f'torch {torch.__version__}, torch threads 1')}\n")
    print(f"One process; seeds {seeds} (the seed sets the train/test split, the initial "
          f"model and the batch order); methods and learning rates from the job files "
          f"(each method's best of a small grid).")
    report(runs)
    print(f"\n(benchmark wall time {time.perf_counter() - started:.0f} s)")
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in runs], indent=2) + "\n")


if __name__ == "__main__":
    main()
