# ruff: noqa: E402  (the thread settings go first, before NumPy and torch load)
"""The benchmark report in one command: every section, one Markdown file with tables, and
PNG plots beside it.

    python benchmarks/report.py [--quick] [--out DIR] [--seeds N] [--sections a,b,...]

Writes ``DIR/README.md`` (default ``benchmarks/results/report``), the sections' PNGs and
``DIR/results.json`` (the numbers behind the summary). Sections, in order: convergence
(epochs and seconds to a target), breakdown (where a step's time goes), scaling,
factors, minimize, comm, race (hpcqn's methods against SGD, Adam, AdamW, LAMB, Muon,
SOAP and Shampoo on MLPs, a transformer language model and a CNN); each is
``benchmarks/report_<name>.py`` with
``compute(quick, progress=None)`` and ``render(results, out, quick) -> str`` (see
``benchmarks/report_common.py``). The summary at the top is computed from the
convergence and breakdown results. ``--quick`` is the short version (about twenty
minutes on two cores, thirteen of them the race). The full race takes hours (about 4.5 on
two idle cores, most of it the transformer): each of its problems is saved in
``benchmarks/results/race/`` as it finishes; run it in parts with
``python benchmarks/report_race.py --problems KEY,... --resume`` (see that module), then
``--resume-race`` here takes the saved problems instead of running them again. Every
process runs one thread (``OMP_NUM_THREADS=1``, ``torch.set_num_threads(1)``).
"""

from __future__ import annotations

import os

for _name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_name] = "1"

import argparse
import dataclasses
import datetime
import importlib
import json
import math
import re
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

torch.set_num_threads(1)
torch.set_num_interop_threads(1)

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import report_common as rc
from common import machine

SECTIONS = ("convergence", "breakdown", "scaling", "factors", "minimize", "comm", "race")
# Methods whose layer hooks record statistics during forward and backward.
HOOKED = ("kfac", "mkor", "mkor_h")
SUMMARY_TITLE = "Summary: what reaches the target first here, by how much, and why"
# The summary marks a method whose two measures of the cost per step (the convergence
# runs' time per epoch, the breakdown's iteration time, each over the reference's)
# differ by more than this factor.
DISAGREE = 1.5


def load_sections(names: list[str]) -> dict[str, ModuleType]:
    """Import ``report_<name>`` for every section; a missing one is an error (before any
    benchmark runs)."""
    modules, missing = {}, []
    for name in names:
        module_name = f"report_{name}"
        try:
            modules[name] = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name != module_name:
                raise
            missing.append(f"benchmarks/{module_name}.py")
            continue
        for function in ("compute", "render"):
            if not callable(getattr(modules[name], function, None)):
                raise SystemExit(f"report: benchmarks/{module_name}.py has no {function}()")
    if missing:
        raise SystemExit(f"report: missing section module(s): {', '.join(missing)} "
                         f"(run a subset with --sections)")
    return modules


# -- the summary -----------------------------------------------------------------------------
def _ratio(mine: float, theirs: float) -> str:
    return f"{mine / theirs:.2f}x"


def _reached(stats: Any) -> str:
    return f"not reached ({stats.reached}/{stats.seeds} seeds)"


def summary(conv: Any | None, breakdown: Any | None, busy: str = "") -> list[str]:
    """The summary section's lines, computed from the convergence results (which method
    reaches each target first, by how much) and the breakdown (why: the step-time
    phases of the second-order methods)."""
    lines = [f"## {SUMMARY_TITLE}", ""]
    if conv is None:
        return lines + ["The convergence section did not run, so there is nothing to "
                        "summarise.", ""]
    from report_convergence import LABELS, SECOND_ORDER

    lines += [
        "Wall-clock training seconds to each target, one process, medians over the seeds "
        "that reached it; a method counts only where most seeds reach the target. "
        "'x' columns: that method's median seconds over the fastest one's." + busy,
        "",
        "| job | target | first | runner-up | SGD | Adam | fewest epochs |",
        "|---|---|---|---|---|---|---|",
    ]
    close = 0
    wins = {"first-order": 0, "second-order": 0}
    for result in conv.jobs:
        for target in result.job.targets:
            ranking = result.ranking(target)
            if not ranking:
                lines.append(f"| {result.job.title} | {target.label()} | none | - | - | - | - |")
                continue
            best, fastest = ranking[0]
            wins["second-order" if best in SECOND_ORDER else "first-order"] += 1
            runner = "-"
            if len(ranking) > 1:
                second = ranking[1][1]
                runner = (f"{LABELS[ranking[1][0]]}, "
                          f"{_ratio(second.median_seconds, fastest.median_seconds)}")
                if min(second.seconds) <= max(fastest.seconds):
                    runner += " (spreads overlap)"
                    close += 1
            cells = []
            for first in ("sgd", "adam"):
                stats = result.methods[first].stats(target)
                if first == best:
                    cells.append("(first)")
                elif stats.majority:
                    cells.append(_ratio(stats.median_seconds, fastest.median_seconds))
                else:
                    cells.append(_reached(stats))
            fewest = min(ranking, key=lambda item: item[1].median_epochs)
            lines.append(f"| {result.job.title} | {target.label()} | **{LABELS[best]}** "
                         f"({fastest.median_seconds:.2f} s, {fastest.median_epochs:g} epochs) "
                         f"| {runner} | {cells[0]} | {cells[1]} | {LABELS[fewest[0]]} "
                         f"({fewest[1].median_epochs:g}) |")
    total = sum(wins.values())
    lines += ["", f"First-order methods (SGD, Adam) are first on {wins['first-order']} of "
              f"{total} targets reached, second-order ones (K-FAC, mL-BFGS, MKOR, MKOR-H) on "
              f"{wins['second-order']}."]
    if close:
        lines[-1] += (f" On {close} of them the runner-up's fastest seed was no slower than "
                      f"the first's slowest (*spreads overlap*): there the order of the two "
                      f"is within this machine's run-to-run noise.")
    lines += ["", *_against_first_order(conv, LABELS, SECOND_ORDER), "",
              "**Why** (time to target = epochs x seconds per epoch; the step phases are the "
              "breakdown section's, one process):", ""]
    for result in conv.jobs:
        reached = [t for t in result.job.targets if result.ranking(t)]
        if not reached:
            lines.append(f"- **{result.job.title}**: no method reaches a target on most "
                         f"seeds.")
        lines += ["- " + _why(result, target, breakdown, LABELS, SECOND_ORDER)
                  for target in reached]
    if any(line.startswith("- ") and " †" in line for line in lines):
        lines += ["", f"† The time per epoch of the convergence runs and the breakdown's "
                  f"iteration time (against the same reference) differ by more than "
                  f"{DISAGREE:g}x: load from other processes slowed one of the "
                  f"measurements, so that method's wall-clock ranking above is less certain "
                  f"than its epoch count; the breakdown's median blocks are the steadier "
                  f"measure of the cost per step."]
    if breakdown is not None and 2 in breakdown.ranks:
        lines += ["", _two_ranks(breakdown, LABELS, SECOND_ORDER)]
    lines.append("")
    return lines


def _against_first_order(conv: Any, labels: dict[str, str],
                         second_order: tuple[str, ...]) -> list[str]:
    """Per second-order method: on how many targets it is faster (median seconds) than
    both SGD and Adam, plainly."""
    targets = [(result, target) for result in conv.jobs for target in result.job.targets]
    lines = []
    for method in second_order:
        beats, slower, missed = 0, 0, 0
        for result, target in targets:
            mine = result.methods[method].stats(target)
            if not mine.majority:
                missed += 1
                continue
            theirs = [result.methods[f].stats(target) for f in ("sgd", "adam")]
            if all(not t.majority or mine.median_seconds < t.median_seconds for t in theirs):
                beats += 1
            else:
                slower += 1
        verdict = (f"is **not** faster than SGD and Adam on any of the {len(targets)} "
                   f"targets" if beats == 0 else
                   f"is faster than both SGD and Adam on {beats} of the {len(targets)} "
                   f"targets")
        lines.append(f"- {labels[method]} {verdict} (slower than SGD or Adam on {slower}; "
                     f"not reached on most seeds on {missed}).")
    return ["Second-order methods against the first-order ones in wall-clock time to "
            "target:", "", *lines]


def _why(result: Any, target: Any, breakdown: Any | None, labels: dict[str, str],
         second_order: tuple[str, ...]) -> str:
    """For one job and a target some method reaches: each second-order method's epochs
    and time per epoch against the reference (SGD if it reaches the target, else the
    fastest method), what they multiply to, and from the breakdown its iteration time
    against the reference's and its optimizer step's largest phase."""
    job, ranking = result.job, result.ranking(target)
    head = f"**{job.title}**, {target.label()}: "
    stats = {m: r.stats(target) for m, r in result.methods.items()}
    per_epoch = {m: _median(r.seconds_per_epoch()) for m, r in result.methods.items()}
    reference = "sgd" if stats["sgd"].majority else ranking[0][0]
    ref = stats[reference]
    name = labels[reference]
    parts = [f"reference {name}, {ref.median_epochs:g} epochs at "
             f"{per_epoch[reference]:.3f} s each"]
    theirs = breakdown.row(job.key, reference, 1) if breakdown is not None else None
    for method in second_order:
        if method == reference:
            continue
        mine = stats[method]
        per_epoch_ratio = per_epoch[method] / per_epoch[reference]
        if mine.majority:
            text = (f"{labels[method]} {mine.median_epochs:g} epochs "
                    f"({mine.median_epochs / ref.median_epochs:.2f}x) at "
                    f"{per_epoch_ratio:.2f}x the time per epoch: "
                    f"{mine.median_seconds / ref.median_seconds:.2f}x {name}'s time")
        else:
            text = (f"{labels[method]} not reached ({mine.reached}/{mine.seeds} seeds), "
                    f"{per_epoch_ratio:.2f}x the time per epoch")
        row = breakdown.row(job.key, method, 1) if breakdown is not None else None
        if row is not None and theirs is not None and row["step_ms"] > 0:
            from report_breakdown import dominant_phase

            phase, share = dominant_phase(row)
            iteration_ratio = row["iteration_ms"] / theirs["iteration_ms"]
            text += (f" (iteration {iteration_ratio:.1f}x {name}'s, step mostly *{phase}* "
                     f"{100 * share:.0f}%")
            if method in HOOKED:
                text += (f", fwd+bwd with hooks {row['fwd_bwd_ms'] / theirs['fwd_bwd_ms']:.1f}x"
                         f" {name}'s")
            text += ")"
            if _disagree(per_epoch_ratio, iteration_ratio):
                text += " †"
        parts.append(text)
    return head + "; ".join(parts) + "."


def _disagree(per_epoch_ratio: float, iteration_ratio: float) -> bool:
    """Whether the convergence runs' time-per-epoch ratio and the breakdown's iteration
    ratio (the same two methods) differ by more than :data:`DISAGREE`."""
    if not (math.isfinite(per_epoch_ratio) and per_epoch_ratio > 0 and iteration_ratio > 0):
        return False
    return max(per_epoch_ratio / iteration_ratio, iteration_ratio / per_epoch_ratio) > DISAGREE


def _two_ranks(breakdown: Any, labels: dict[str, str], second_order: tuple[str, ...]) -> str:
    """Iteration time over SGD's and the communication share, per model, on 2 ranks."""
    from report_breakdown import MODELS, TITLES

    pieces = []
    for model, _, _ in MODELS:
        sgd = breakdown.row(model, "sgd", 2)
        if sgd is None:
            continue
        ratios = []
        for method in second_order:
            row = breakdown.row(model, method, 2)
            if row is not None:
                ratios.append(f"{labels[method]} {row['iteration_ms'] / sgd['iteration_ms']:.1f}x"
                              f" ({_share(row)})")
        pieces.append(f"{TITLES[model]}: SGD's iteration {sgd['iteration_ms']:.2f} ms "
                      f"({_share(sgd)}); " + ", ".join(ratios))
    return ("On 2 ranks (same global batch), iteration time over SGD's, and the share of "
            "the iteration spent in communication: " + "; ".join(pieces) + ".")


def _share(row: dict[str, Any]) -> str:
    return f"communication {100 * row['communication_ms'] / row['iteration_ms']:.0f}%"


def _median(values: list[float]) -> float:
    finite = sorted(v for v in values if math.isfinite(v))
    if not finite:
        return math.nan
    middle = len(finite) // 2
    return finite[middle] if len(finite) % 2 else 0.5 * (finite[middle - 1] + finite[middle])


# -- the document ----------------------------------------------------------------------------
def slug(heading: str, seen: dict[str, int]) -> str:
    """GitHub's anchor for a heading (repeats get ``-1``, ``-2``, ...)."""
    base = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
    count = seen.get(base, 0)
    seen[base] = count + 1
    return base if count == 0 else f"{base}-{count}"


def contents(body: str) -> list[str]:
    """A table of contents of the ``##`` and ``###`` headings outside code blocks."""
    lines, seen, fenced = ["## Contents", ""], {}, False
    for line in body.splitlines():
        if line.startswith("```"):
            fenced = not fenced
            continue
        match = re.match(r"(#{2,3}) (.+)", line)
        if match and not fenced:
            indent = "  " * (len(match.group(1)) - 2)
            title = match.group(2).strip()
            lines.append(f"{indent}- [{title}](#{slug(title, seen)})")
    return lines + [""]


def revision() -> str:
    """The checkout's git commit, and whether its tracked files had uncommitted changes,
    in words (called before any section runs)."""
    import subprocess

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=HERE, capture_output=True, text=True,
                              timeout=30, check=True).stdout.strip()

    try:
        commit = git("rev-parse", "--short", "HEAD")
        # Tracked files only: the report's own output is new files in the checkout.
        dirty = bool(git("status", "--porcelain", "--untracked-files=no", "--", ".."))
    except (OSError, subprocess.SubprocessError):
        return "outside a git checkout"
    return f"at commit {commit}" + (" with uncommitted changes" if dirty else "")


def _json_default(value: Any) -> Any:
    if dataclasses.is_dataclass(value):
        return dataclasses.asdict(value)
    return str(value)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="the short version (about twenty minutes on two cores)")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "report",
                        help="directory for README.md and the plots")
    parser.add_argument("--seeds", type=int, default=3,
                        help="seeds per method in the convergence section (default 3)")
    parser.add_argument("--sections", default=",".join(SECTIONS),
                        help=f"comma-separated subset of {','.join(SECTIONS)} (default: all)")
    parser.add_argument("--resume-race", action="store_true",
                        help="the full race: take the problems already saved in "
                             "benchmarks/results/race/ (by report_race.py) instead of "
                             "running them again")
    parser.add_argument("--race-problems", default=None,
                        help="comma-separated subset of the race's problems (default: all); "
                             "the report names the ones left out")
    args = parser.parse_args()
    names = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = sorted(set(names) - set(SECTIONS))
    if unknown or not names:
        parser.error(f"--sections: unknown {unknown}; known: {', '.join(SECTIONS)}")
    if args.seeds < 1:
        parser.error("--seeds must be at least 1")
    names = [s for s in SECTIONS if s in names]

    started = time.perf_counter()
    checkout = revision()
    loads = [os.getloadavg()[0]]  # at the start and after every section

    def log(message: str) -> None:
        print(f"[{time.perf_counter() - started:7.1f} s] {message}", flush=True)

    modules = load_sections(names)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    threads = (f"torch {torch.__version__}, torch threads {torch.get_num_threads()} "
               f"(inter-op {torch.get_num_interop_threads()})")
    log(f"report{' (--quick)' if args.quick else ''}: sections {', '.join(names)} -> {out}")
    log(f"machine: {machine(threads)}")

    results: dict[str, Any] = {}
    texts, seconds = {}, {}
    for name, module in modules.items():
        log(f"{name}: started")
        began = time.perf_counter()
        extra = {"seeds": args.seeds} if name == "convergence" else {}
        if name == "race" and not args.quick:  # hours: saved per problem, resumable
            extra = {"save": module.RESULTS, "resume": args.resume_race}
        if name == "race" and args.race_problems:
            extra["only"] = [k.strip() for k in args.race_problems.split(",") if k.strip()]
        results[name] = module.compute(args.quick, progress=log, **extra)
        texts[name] = module.render(results[name], out, args.quick).rstrip() + "\n"
        seconds[name] = time.perf_counter() - began
        loads.append(os.getloadavg()[0])
        log(f"{name}: done in {seconds[name]:.0f} s")

    conv, breakdown = results.get("convergence"), results.get("breakdown")
    total = time.perf_counter() - started
    cores = os.cpu_count() or 1
    load = (f"1-minute load average {min(loads):.2f} to {max(loads):.2f} on {cores} cores "
            f"(at the start and after each section)")
    command = "python benchmarks/report.py" + (" --quick" if args.quick else "") + \
        (f" --seeds {args.seeds}" if args.seeds != 3 else "") + \
        (" --resume-race" if args.resume_race else "") + \
        (f" --race-problems {args.race_problems}" if args.race_problems else "") + \
        (f" --sections {','.join(names)}" if names != list(SECTIONS) else "")
    timing = ["## Run time", "", "| section | seconds |", "|---|---:|",
              *(f"| {name} | {seconds[name]:.0f} |" for name in names),
              f"| **total** (start-up and writing included) | **{total:.0f}** |", ""]
    busy = (f" **The machine was busy** (1-minute load average up to {max(loads):.1f} on {cores} "
            f"cores): other processes shared the cores, so the timings are noisier than on an "
            f"idle machine; the seeds' min-max in the sections shows how much."
            if max(loads) > cores else "")
    body = "\n".join([*summary(conv, breakdown, busy), *(texts[n] for n in names), *timing])
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    head = [
        "# hpcqn benchmark report",
        "",
        f"Generated by `{command}` (from the repository root, {checkout}) on {now}; "
        f"total wall time {total:.0f} s"
        + (" (quick mode: smaller grids and fewer steps, see each section)." if args.quick
           else "."),
        "",
        f"**Machine**: {machine(threads)} | {rc.memory()} memory; {load}.",
        "",
    ]
    (out / "README.md").write_text("\n".join([*head, *contents(body), body]))
    (out / "results.json").write_text(json.dumps(
        {"command": command, "seconds": {**seconds, "total": total},
         "convergence": conv, "breakdown": breakdown},
        default=_json_default, indent=1) + "\n")
    log(f"wrote {out / 'README.md'}; total wall time {total:.0f} s")


if __name__ == "__main__":
    main()
