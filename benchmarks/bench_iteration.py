"""Per-iteration time (zero_grad, forward, backward, step) of every hpcqn.torch method
against SGD on the digits MLP and CNN at batch 64, one process, one thread.

    python benchmarks/bench_iteration.py [--iterations 160] [--rounds 3]

Each method trains a fresh model over consecutive digits batches; the median of the
iterations after the first quarter is its time in a round, the methods alternate within
a round, and the table shows the median over rounds and the ratio to SGD's in the same
run. Options: lr 0.1 for all, SGD momentum 0.9, everything else each method's default.
"""

from __future__ import annotations

import os

for _name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_name, "1")

import argparse  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import hpcqn  # noqa: E402
from hpcqn.experiments.training import digits, loss_of, make_model  # noqa: E402
from hpcqn.torch.methods import make  # noqa: E402

OPTIONS = {"sgd": {"lr": 0.1, "momentum": 0.9}, "mlbfgs": {"lr": 0.1}, "mkor": {"lr": 0.1},
           "mkor_h": {"lr": 0.1}, "kfac": {"lr": 0.1}}
BATCH = 64


def seconds_per_iteration(method: str, model_name: str, data: dict, iterations: int) -> float:
    model = make_model(model_name, seed=0)
    opt = make(method, model, hpcqn.serial_comm(), OPTIONS[method])
    x_all, y_all = data["train_x"], data["train_y"]
    times = []
    for it in range(iterations):
        start = (it * BATCH) % (x_all.shape[0] - BATCH)
        xb, yb = x_all[start:start + BATCH], y_all[start:start + BATCH]
        begin = time.perf_counter()
        opt.zero_grad()
        loss = loss_of(model, xb, yb, "classify")
        loss.backward()
        opt.step(loss=loss) if method == "mkor_h" else opt.step()
        times.append(time.perf_counter() - begin)
    return statistics.median(times[iterations // 4:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--iterations", type=int, default=160)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    data = digits(0)
    print(f"| model | batch | {' | '.join(OPTIONS)} |")
    print(f"|---|---:|{'---:|' * len(OPTIONS)}")
    for model_name in ("mlp", "cnn"):
        rounds: dict[str, list[float]] = {m: [] for m in OPTIONS}
        for _ in range(args.rounds):
            for method in OPTIONS:
                rounds[method].append(seconds_per_iteration(method, model_name, data,
                                                            args.iterations))
        sgd = statistics.median(rounds["sgd"])
        cells = [f"{statistics.median(v) * 1e3:.2f} ms ({statistics.median(v) / sgd:.2f}x)"
                 for v in rounds.values()]
        print(f"| digits {model_name} | {BATCH} | {' | '.join(cells)} |", flush=True)


if __name__ == "__main__":
    main()
