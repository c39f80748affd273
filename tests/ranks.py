"""Run pytest on every rank of a launch, one log and one JUnit report per rank, and print
one summary per launch instead of every rank's output interleaved.

    python tests/ranks.py run LOGDIR -- PYTEST-ARGS      # on each rank, under a launcher
    python tests/ranks.py summary LOGDIR "2 MPI ranks"   # after the launch

``run`` takes the rank from the launcher's environment (torchrun's ``RANK``, MPICH's
``PMI_RANK``, Open MPI's ``OMPI_COMM_WORLD_RANK``), writes the rank's pytest output to
``LOGDIR/rank-R.log`` and its results to ``LOGDIR/rank-R.xml``, and exits with pytest's
status. ``summary`` prints one line (``2 MPI ranks: 312 passed, 4 skipped on every
rank``), or the ranks' counts when they differ, and for every failure the test, the ranks
it failed on, and the end of its report; its status is 1 when any rank failed or left no
report (a rank that crashed or hung).
"""

from __future__ import annotations

import os
import sys
import xml.etree.ElementTree as ElementTree
from collections import Counter
from pathlib import Path


def rank() -> int:
    for name in ("RANK", "PMI_RANK", "OMPI_COMM_WORLD_RANK"):
        value = os.environ.get(name)
        if value is not None and value.isdigit():
            return int(value)
    return 0


def run(logdir: Path, pytest_args: list[str]) -> int:
    """Become this rank's pytest (the same process: an MPI launcher's connection, a file
    descriptor, stays open), its output going to the rank's log."""
    logdir.mkdir(parents=True, exist_ok=True)
    r = rank()
    log = os.open(logdir / f"rank-{r}.log", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(log, 1)
    os.dup2(log, 2)
    os.execv(sys.executable, [sys.executable, "-m", "pytest", *pytest_args,
                              f"--junitxml={logdir / f'rank-{r}.xml'}"])
    return 1  # pragma: no cover - execv does not return


def outcomes(report: Path) -> dict[str, tuple[str, str]]:
    """Test id -> (outcome, message) from one JUnit report."""
    found = {}
    for case in ElementTree.parse(report).getroot().iter("testcase"):
        test = f"{case.get('classname')}::{case.get('name')}"
        outcome, message = "passed", ""
        for child in case:
            if child.tag in ("failure", "error"):
                outcome, message = "failed", (child.get("message") or "") + "\n" + (
                    child.text or "")
            elif child.tag == "skipped":
                outcome = "skipped"
        found[test] = (outcome, message)
    return found


def summary(logdir: Path, what: str) -> int:
    logs = sorted(logdir.glob("rank-*.log"), key=lambda p: int(p.stem.split("-")[1]))
    reports = {int(p.stem.split("-")[1]): p for p in logdir.glob("rank-*.xml")}
    status = 0
    per_rank = {}
    for log in logs:
        r = int(log.stem.split("-")[1])
        if r not in reports:
            status = 1
            tail = "\n    ".join(log.read_text(errors="replace").splitlines()[-15:])
            print(f"{what}: rank {r} left no report (crashed or stopped); its log ends:\n"
                  f"    {tail}")
            continue
        per_rank[r] = outcomes(reports[r])
    counts = {r: Counter(o for o, _ in found.values()) for r, found in per_rank.items()}
    shown = {r: ", ".join(f"{n} {o}" for o, n in sorted(c.items())) for r, c in counts.items()}
    if len(set(shown.values())) == 1 and len(shown) == len(logs):
        print(f"{what}: {next(iter(shown.values()))} on every rank")
    else:
        for r, text in sorted(shown.items()):
            print(f"{what}: rank {r}: {text}")
    failed: dict[str, list[int]] = {}
    for r, found in per_rank.items():
        for test, (outcome, _) in found.items():
            if outcome == "failed":
                failed.setdefault(test, []).append(r)
    for test, ranks in sorted(failed.items()):
        status = 1
        message = per_rank[ranks[0]][test][1].strip().splitlines()
        print(f"  FAILED {test} on rank(s) {', '.join(map(str, ranks))}:")
        print("    " + "\n    ".join(message[-20:]))
    return status


def main(argv: list[str]) -> int:
    if len(argv) >= 2 and argv[0] == "run":
        rest = argv[2:]
        return run(Path(argv[1]), rest[1:] if rest[:1] == ["--"] else rest)
    if len(argv) == 3 and argv[0] == "summary":
        return summary(Path(argv[1]), argv[2])
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
