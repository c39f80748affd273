"""The cost of K-FAC's layer hooks (:class:`hpcqn.torch.capture.LayerCapture`) on the
digits MLP and CNN at batch 64, all measured in one run of this script (one process,
one thread):

* **plain**: ``zero_grad`` + forward + loss + ``backward()`` of a model without hooks;
* **hooked**: the same on an equal model with :class:`hpcqn.torch.KFAC`'s hooks
  recording (a factor step: ``opt.zero_grad()`` + forward + loss + ``backward()``);
* **statistics**: building this rank's sums ``sum a a^T`` and ``sum g g^T`` from what the
  hooks recorded (``opt._statistics()``, the step's *statistics* phase without its
  allreduce), after a hooked forward/backward.

The two models take turns block by block (``--blocks`` blocks of ``--steps`` steps each,
on the same batches), and the median block mean of each is kept, so that a burst of load
from other processes hits both alike. Printed: milliseconds per step, ``hooked / plain``
and ``(hooked + statistics) / plain``.

Run from the repository root (about half a minute)::

    python benchmarks/bench_kfac_hooks.py [--steps 100] [--blocks 7] [--json FILE]
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

# One thread per process, set before NumPy loads its BLAS.
for _name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_name, "1")
# Import hpcqn from this checkout, also when it is not installed.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from typing import Any  # noqa: E402

import torch  # noqa: E402

import hpcqn  # noqa: E402
import hpcqn.torch as ht  # noqa: E402
from hpcqn.experiments.training import digits, loss_of, make_model  # noqa: E402

MODELS = ("mlp", "cnn")
BATCH = 64


def measure(model_name: str, steps: int, blocks: int, batch: int = BATCH) -> dict[str, Any]:
    data = digits(0)
    plain = make_model(model_name, 128, 0)
    hooked = make_model(model_name, 128, 0)
    opt = ht.KFAC(hooked, hpcqn.serial_comm(), lr=0.01)
    assert opt.capture.active  # step 0 is a factor step: the hooks record
    n = data["train_y"].numel()
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, n, (batch,), generator=gen) for _ in range(steps)]
    clock = time.perf_counter

    def plain_block() -> float:
        start = clock()
        for index in batches:
            plain.zero_grad()
            loss_of(plain, data["train_x"][index], data["train_y"][index], False).backward()
        return (clock() - start) / steps

    def hooked_block() -> tuple[float, float]:
        fwd_bwd = stats = 0.0
        for index in batches:
            start = clock()
            opt.zero_grad()
            loss_of(hooked, data["train_x"][index], data["train_y"][index], False).backward()
            middle = clock()
            opt._statistics()
            fwd_bwd, stats = fwd_bwd + middle - start, stats + clock() - middle
        return fwd_bwd / steps, stats / steps

    plain_block()
    hooked_block()  # warm-up
    plain_times, hooked_times, stats_times = [], [], []
    for _ in range(blocks):
        plain_times.append(plain_block())
        h, s = hooked_block()
        hooked_times.append(h)
        stats_times.append(s)
    p, h, s = (statistics.median(t) for t in (plain_times, hooked_times, stats_times))
    return {"model": model_name, "batch": batch, "steps": steps, "blocks": blocks,
            "plain_ms": 1e3 * p, "hooked_ms": 1e3 * h, "statistics_ms": 1e3 * s,
            "hooked_over_plain": h / p, "with_statistics_over_plain": (h + s) / p}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=100, help="steps per block")
    parser.add_argument("--blocks", type=int, default=7, help="blocks per model")
    parser.add_argument("--batch", type=int, default=BATCH)
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = [measure(m, args.steps, args.blocks, args.batch) for m in MODELS]
    print(f"torch {torch.__version__}, batch {args.batch}, {args.blocks} blocks of "
          f"{args.steps} steps (median block)")
    print(f"{'model':6s} {'plain ms':>9s} {'hooked ms':>10s} {'stats ms':>9s} "
          f"{'hooked/plain':>13s} {'(hooked+stats)/plain':>21s}")
    for r in rows:
        print(f"{r['model']:6s} {r['plain_ms']:9.3f} {r['hooked_ms']:10.3f} "
              f"{r['statistics_ms']:9.3f} {r['hooked_over_plain']:13.2f} "
              f"{r['with_statistics_over_plain']:21.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
