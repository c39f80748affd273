# ruff: noqa: E402  (one thread per process, set before NumPy and torch load)
"""MKOR's options on the race's problems, at a fixed number of steps: the released
code's factor warm-up (``warmup_steps``: factor updates at every step first, then every
``factor_freq``) and MKOR-H's switch to its inner optimizer.

1. ``--study warmup``: MKOR with ``warmup_steps`` 0 (the default), 10 (the released
   ResNet-50 example's) and 50, and with ``factor_freq=1`` (updates at every step: the
   most a warm-up can give), on the transformer LM (LAMB and Adam inside) and the digits
   CNN (SGD and Adam inside), each at the race's quick-mode rate for it, seeds 0-2, and
   the inner optimizer alone; the held-out loss after ``STEPS`` steps (and at two
   earlier checks), the training seconds and the factor updates done.
2. ``--study switch``: MKOR-H (LAMB inside) on the transformer LM with switch thresholds
   0.05, 0.1 (the race's) and 0.2 over a window of 40 steps, against MKOR (LAMB) and
   LAMB alone: the step it switches at, the held-out loss and the seconds.

Both at the race's quick-mode batch (256) on one process, one thread; the runs are the
race's (``benchmarks/report_race.py``, ``train_run``), stopped after a step count instead
of a time budget. Writes ``benchmarks/results/race/mkor_<study>.md``::

    python benchmarks/race_mkor.py --study warmup     # about 5 minutes on two cores
    python benchmarks/race_mkor.py --study switch     # about 4 minutes
"""

from __future__ import annotations

import report_common as rc

rc.one_thread()

import argparse
import dataclasses
import math
import sys
import time
from pathlib import Path
from typing import Any

import report_race as rr

STEPS = {"lm": 60, "cnn": 120}
SWITCH_STEPS = 240
SEEDS = (0, 1, 2)
# The rates: the quick race's choices at batch 256 (benchmarks/results/race/README.md).
RATES = {("lm", "mkor_lamb"): 0.03, ("lm", "mkor_adam"): 0.003, ("cnn", "mkor"): 0.1,
         ("cnn", "mkor_adam"): 0.01, ("lm", "lamb"): 0.03, ("lm", "mkor_h_lamb"): 0.03,
         ("lm", "adam"): 0.003, ("cnn", "sgd"): 0.1, ("cnn", "adam"): 0.01}
INNER = {"mkor_lamb": "lamb", "mkor_adam": "adam", "mkor": "sgd"}  # what MKOR steps with
WARMUPS = ({"warmup_steps": 0}, {"warmup_steps": 10}, {"warmup_steps": 50},
           {"factor_freq": 1})


def problem(kind: str, steps: int) -> rr.Problem:
    """The quick race's batch-256 problem of ``kind``, checked four times in ``steps``."""
    base = rr.problem_by_key(f"{kind}_b256", quick=True)
    return dataclasses.replace(base, budget=math.inf, check_every=steps // 4)


def one(p: rr.Problem, method: str, lr: float, seed: int, steps: int,
        changes: dict[str, Any]) -> rr.Run:
    from hpcqn.comm import serial_comm

    out = rr.train_run(p, method, lr, seed, serial_comm(), max_steps=steps, changes=changes)
    return rr.combine(method, lr, seed, [out])


def checks_at(runs: list[rr.Run], steps: int) -> list[list[float]]:
    """Each run's held-out checks after a quarter, half and all of ``steps``."""
    return [[dict(r.checks).get(k, math.nan) for r in runs]
            for k in (steps // 4, steps // 2, steps)]


def label(changes: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in changes.items()) or "defaults"


def median_text(values: list[float], fmt: str) -> str:
    finite = [v for v in values if math.isfinite(v)]
    return rr.spread(finite, fmt) + (f" ({len(values) - len(finite)} diverged)"
                                     if len(finite) < len(values) else "")


def warmup_study(say: Any) -> list[str]:
    lines = ["## MKOR's factor warm-up", "",
             f"Held-out loss (median (min-max) over seeds {list(SEEDS)}) at the checks "
             f"after a quarter, half and all of the steps ({rr.LM.check_windows} held-out "
             "windows for the LM, all 450 held-out images for the CNN), and on the whole "
             "held-out set at the end; training seconds for all the steps; factor updates "
             "done (the statistics and Sherman-Morrison rounds).", ""]
    from hpcqn.comm import serial_comm

    for kind, methods in (("lm", ("mkor_lamb", "mkor_adam")), ("cnn", ("mkor", "mkor_adam"))):
        steps = STEPS[kind]
        p = problem(kind, steps)
        rr.warm_up(p, [*methods, *(INNER[m] for m in methods)], serial_comm())
        lines += [f"### {p.title.split(',')[0]}, batch {p.batch}, {steps} steps", "",
                  "| method | lr | options | check, 1/4 | check, 1/2 | check, end | "
                  "held-out set, end | seconds | factor updates |",
                  "|---|---:|---|---:|---:|---:|---:|---:|---:|"]
        for method in methods:
            # its inner optimizer alone first, at its own rate, for reference
            for name, changes in ((INNER[method], {}), *((method, c) for c in WARMUPS)):
                lr = RATES[(kind, name)]
                runs = [one(p, name, lr, seed, steps, changes) for seed in SEEDS]
                at = checks_at(runs, steps)
                updates = [r.info["updates"] for r in runs if "updates" in r.info]
                lines.append(
                    f"| {rr.LABELS[name]} | {lr:g} | {label(changes) if name == method else '-'} | "
                    + " | ".join(median_text(v, ".4g") for v in at) + " | "
                    f"{median_text([r.loss_at_budget for r in runs], '.4g')} | "
                    f"{rr.spread([r.seconds[-1] for r in runs if r.seconds], '.2f')} | "
                    f"{rr.spread(updates, '.0f')} |")
                say(f"warmup: {kind} {name} {label(changes)}")
        lines.append("")
    return lines


def switch_study(say: Any) -> list[str]:
    from hpcqn.comm import serial_comm

    p = problem("lm", SWITCH_STEPS)
    configs = [("lamb", {}), ("mkor_lamb", {}),
               *(("mkor_h_lamb", {"hybrid_threshold": t}) for t in (0.05, 0.1, 0.2))]
    rr.warm_up(p, list(dict.fromkeys(m for m, _ in configs)), serial_comm())
    lines = ["## MKOR-H's switch on the transformer LM", "",
             f"Batch {p.batch}, {SWITCH_STEPS} steps, seeds {list(SEEDS[:2])}; MKOR-H: window "
             f"{rr.OPTIONS['mkor_h_lamb']['hybrid_window']} steps, switching for good once the "
             "windowed mean loss falls by less than the threshold (relative) from one "
             "window to the next. Held-out loss at the checks after a quarter, half and all "
             f"of the steps ({rr.LM.check_windows} held-out windows) and on the whole "
             "held-out set at the end.", "",
             "| method | options | switched at step | check, 1/4 | check, 1/2 | check, end | "
             "held-out set, end | seconds |", "|---|---|---|---:|---:|---:|---:|---:|"]
    for method, changes in configs:
        lr = RATES[("lm", method)]
        runs = [one(p, method, lr, seed, SWITCH_STEPS, changes) for seed in SEEDS[:2]]
        at = checks_at(runs, SWITCH_STEPS)
        switched = ", ".join("never" if r.info.get("switched_at") is None
                             else str(r.info["switched_at"]) for r in runs)
        lines.append(f"| {rr.LABELS[method]} | {label(changes)} | "
                     f"{switched if method in rr.HYBRID else '-'} | "
                     + " | ".join(median_text(v, ".4g") for v in at) + " | "
                     f"{median_text([r.loss_at_budget for r in runs], '.4g')} | "
                     f"{rr.spread([r.seconds[-1] for r in runs if r.seconds], '.2f')} |")
        say(f"switch: {method} {label(changes)}")
    return lines + [""]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--study", choices=("warmup", "switch"), required=True)
    parser.add_argument("--out", type=Path, default=rr.RESULTS)
    args = parser.parse_args()
    rc.torch_one_thread()
    started = time.perf_counter()

    def say(message: str) -> None:
        print(f"[{time.perf_counter() - started:6.1f} s] {message}", file=sys.stderr,
              flush=True)

    lines = (warmup_study if args.study == "warmup" else switch_study)(say)
    lines += [f"`python benchmarks/race_mkor.py --study {args.study}`: "
              f"{time.perf_counter() - started:.0f} s, one process.", ""]
    args.out.mkdir(parents=True, exist_ok=True)
    text = "\n".join(lines)
    (args.out / f"mkor_{args.study}.md").write_text(text)
    sys.stdout.write(text)


if __name__ == "__main__":
    main()
