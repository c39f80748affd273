"""Learning-rate grid of examples/transformer_lm.py: every optimizer at each rate of its
grid, the validation loss after the example's epochs and the median step time, one JSON
line per run in ``benchmarks/results/charlm_sweep.jsonl``; then, per optimizer, the best
rate (flagged when it sits at an edge of the grid) and its step time over AdamW's.

    python benchmarks/sweep_charlm.py                       # the whole grid, one process
    python benchmarks/sweep_charlm.py --optimizers mkor --epochs 1
    python benchmarks/sweep_charlm.py --summary             # the table from the results
    python benchmarks/sweep_charlm.py --timing              # step times at the best rates

``--timing`` runs every optimizer once more at its best rate of the grid, one after the
other in one invocation (on a machine with nothing else running), for ``--epochs``
epochs, and writes ``benchmarks/results/charlm_timing.txt``: the median step time and
its ratio to AdamW's.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "charlm_sweep.jsonl"
TIMING = ROOT / "benchmarks" / "results" / "charlm_timing.txt"
GRIDS = {"adamw": (3e-4, 1e-3, 3e-3, 1e-2), "mkor": (1e-3, 3e-3, 1e-2),
         "mkor_h": (1e-3, 3e-3, 1e-2), "kfac": (1e-3, 3e-3, 1e-2),
         "mlbfgs": (0.01, 0.03, 0.1)}
EPOCH = re.compile(r"epoch (\d+): train loss ([\d.naninf]+)\s+validation loss ([\d.naninf]+)"
                   r"\s+step ([\d.]+) ms")


def run(optimizer: str, lr: float, epochs: int, extra: list[str]) -> dict:
    command = [sys.executable, str(ROOT / "examples" / "transformer_lm.py"), "--optimizer",
               optimizer, "--lr", str(lr), "--epochs", str(epochs), *extra]
    out = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=7200)
    epochs_seen = [m.groups() for m in EPOCH.finditer(out.stdout)]
    if out.returncode or not epochs_seen:
        return {"optimizer": optimizer, "lr": lr, "failed": out.stderr[-500:]}
    last = epochs_seen[-1]
    return {"optimizer": optimizer, "lr": lr, "epochs": int(last[0]),
            "train_loss": float(last[1]), "validation_loss": float(last[2]),
            "step_ms": float(last[3]), "args": extra}


def best_rates(records: list[dict]) -> dict[str, dict]:
    """Each optimizer's record with the lowest validation loss."""
    best: dict[str, dict] = {}
    for r in records:
        if "validation_loss" not in r or r["validation_loss"] != r["validation_loss"]:
            continue
        if r["optimizer"] not in best or r["validation_loss"] < best[r["optimizer"]][
                "validation_loss"]:
            best[r["optimizer"]] = r
    return best


def summary(records: list[dict]) -> str:
    best = best_rates(records)
    adamw = best.get("adamw", {}).get("step_ms")
    lines = ["| optimizer | best lr (grid) | validation loss | step ms | step / AdamW's |",
             "|---|---|---|---|---|"]
    for name, r in sorted(best.items(), key=lambda item: item[1]["validation_loss"]):
        grid = sorted({x["lr"] for x in records if x["optimizer"] == name})
        edge = " (edge)" if r["lr"] in (grid[0], grid[-1]) else ""
        ratio = f"{r['step_ms'] / adamw:.2f}" if adamw else "-"
        lines.append(f"| {name} | {r['lr']:g}{edge} ({', '.join(f'{g:g}' for g in grid)}) | "
                     f"{r['validation_loss']:.4f} | {r['step_ms']:.1f} | {ratio} |")
    return "\n".join(lines)


def timing(epochs: int, extra: list[str]) -> None:
    import os
    import platform

    best = best_rates([json.loads(line) for line in RESULTS.read_text().splitlines()])
    rows = [run(name, best[name]["lr"], epochs, extra) for name in GRIDS]
    adamw = next(r["step_ms"] for r in rows if r["optimizer"] == "adamw")
    lines = ["## Transformer example: step time at each optimizer's best rate", "",
             f"Command: python benchmarks/sweep_charlm.py --timing --epochs {epochs}; one "
             f"process, {platform.processor() or platform.machine()}, load average at the "
             f"end {os.getloadavg()[0]:.2f}; median step of {epochs} epoch(s) of "
             f"examples/transformer_lm.py (batch 64, width 64).", "",
             "| optimizer | lr | step ms | step / AdamW's | validation loss |",
             "|---|---|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['optimizer']} | {r['lr']:g} | {r['step_ms']:.1f} | "
                     f"{r['step_ms'] / adamw:.2f} | {r['validation_loss']:.4f} |")
    TIMING.write_text("\n".join(lines) + "\n")
    print(TIMING.read_text())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--optimizers", default=",".join(GRIDS))
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--summary", action="store_true")
    parser.add_argument("--timing", action="store_true")
    parser.add_argument("extra", nargs="*", help="more arguments for the example")
    args = parser.parse_args()
    if args.timing:
        timing(args.epochs, args.extra)
        return
    if not args.summary:
        for name in args.optimizers.split(","):
            for lr in GRIDS[name]:
                record = run(name, lr, args.epochs, args.extra)
                print(json.dumps(record), flush=True)
                with RESULTS.open("a") as stream:
                    stream.write(json.dumps(record) + "\n")
    print(summary([json.loads(line) for line in RESULTS.read_text().splitlines()]))


if __name__ == "__main__":
    main()
