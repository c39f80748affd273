"""What the report sections share: one thread per process, the import path, method
labels and colours, number formatting, Markdown tables, matplotlib (Agg) figures,
launching a section's worker under ``mpiexec``, the machine's memory, and the command
line every section module offers on its own::

    python benchmarks/report_<name>.py [--quick] [--out DIR]

A section module has ``compute(quick, progress=None)`` (measures; returns its results)
and ``render(results, out, quick)`` (returns its Markdown, writes its PNGs into
``out``); ``benchmarks/report.py`` calls both. Importing this module puts
``benchmarks/`` and the repository root on ``sys.path`` (so that ``common`` and
``hpcqn`` import from this checkout) and loads nothing heavy; a section imports it first
and calls :func:`one_thread` before NumPy and torch load.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
for _path in (str(ROOT), str(HERE)):
    if _path not in sys.path:
        sys.path.insert(0, _path)

DEFAULT_OUT = HERE / "results" / "report"
THREAD_ENV = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}

LABELS = {
    "sgd": "SGD (momentum 0.9)", "adam": "Adam", "mlbfgs": "mL-BFGS", "mkor": "MKOR",
    "mkor_owner": "MKOR (owner placement)", "kfac": "K-FAC",
    "kfac_owner": "K-FAC (owner placement)", "scipy": "SciPy L-BFGS-B",
    "hpcqn": "hpcqn.minimize", "torch": "torch.optim.LBFGS",
}
COLORS = {
    "sgd": "#7f7f7f", "adam": "#9467bd", "mlbfgs": "#1f77b4", "mkor": "#d62728",
    "mkor_owner": "#ff9896", "kfac": "#2ca02c", "kfac_owner": "#98df8a",
    "scipy": "#7f7f7f", "hpcqn": "#1f77b4", "torch": "#ff7f0e",
}


def one_thread() -> None:
    """One OpenMP/BLAS thread per process where not set otherwise (call it before NumPy
    loads its BLAS; ``mpiexec`` ranks inherit it)."""
    for name, value in THREAD_ENV.items():
        os.environ.setdefault(name, value)


# -- numbers and tables ----------------------------------------------------------------------
def ms(seconds: float | None, digits: int = 3) -> str:
    """Seconds as milliseconds with ``digits`` significant digits ('-' for None)."""
    if seconds is None:
        return "-"
    value = seconds * 1e3
    return f"{value:.{digits}g}" if value < 10 ** digits else f"{value:.0f}"


def human_bytes(n: float | None) -> str:
    """``n`` bytes with a decimal unit (B, kB, MB, GB)."""
    if n is None:
        return "-"
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.3g} {unit}"
    return f"{n:.0f} B"


def ratio(a: float | None, b: float | None) -> str:
    """``a / b`` with three significant digits, '-' when either is missing or ``b`` is 0."""
    if a is None or b is None or b == 0:
        return "-"
    return f"{a / b:.3g}"


def table(head: Sequence[str], rows: Sequence[Sequence[str]], left: int = 1,
          align: str | None = None) -> list[str]:
    """A Markdown table; the first ``left`` columns left-aligned, the others right, or
    ``align`` one letter per column (``l`` or ``r``)."""
    letters = align or "l" * left + "r" * (len(head) - left)
    if len(letters) != len(head):
        raise ValueError(f"align {letters!r} does not fit {len(head)} columns")
    rules = ["---" if a == "l" else "---:" for a in letters]
    return ["| " + " | ".join(head) + " |", "|" + "|".join(rules) + "|",
            *("| " + " | ".join(str(c) for c in row) + " |" for row in rows)]


def mean_seconds(fn: Callable[[], Any], calls: int) -> float:
    """The mean wall time of ``calls`` back-to-back calls of ``fn``."""
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


# -- figures ---------------------------------------------------------------------------------
def pyplot() -> Any:
    """``matplotlib.pyplot`` on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, out: Path, name: str) -> str:
    """Write ``fig`` as ``out/name`` (PNG), close it and return ``name`` (the link)."""
    out.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(out / name, dpi=110)
    pyplot().close(fig)
    return name


# -- MPI -------------------------------------------------------------------------------------
def mpiexec() -> str | None:
    """The ``mpiexec`` on PATH, or None."""
    return shutil.which("mpiexec")


def run_mpi(script: Path, ranks: int, args: Sequence[str], timeout: float = 600.0) -> str:
    """Run ``mpiexec -n ranks python script args...`` with one thread per rank; returns
    its stdout, raises RuntimeError (with the output's tail) when it fails and
    FileNotFoundError when there is no ``mpiexec``."""
    launcher = mpiexec()
    if launcher is None:
        raise FileNotFoundError("mpiexec is not on PATH")
    command = [launcher, "-n", str(ranks), sys.executable, str(script), *args]
    done = subprocess.run(command, env={**os.environ, **THREAD_ENV}, capture_output=True,
                          text=True, timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({done.returncode}):\n"
                           f"{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
    return done.stdout


def run_workers(script: Path, ranks: int, args: Sequence[str], timeout: float = 600.0
                ) -> list[Any]:
    """:func:`run_mpi` of ``script --worker --json PREFIX args...``; returns what each
    rank wrote with :func:`write_worker_json`, in rank order."""
    with tempfile.TemporaryDirectory(prefix=f"hpcqn_{Path(script).stem}_") as tmp:
        prefix = str(Path(tmp) / "worker")
        run_mpi(script, ranks, ["--worker", "--json", prefix, *args], timeout)
        return [json.loads(Path(f"{prefix}.rank{r}.json").read_text()) for r in range(ranks)]


def write_worker_json(prefix: str, rank: int, data: Any) -> None:
    """A worker rank's results, for :func:`run_workers` to read."""
    Path(f"{prefix}.rank{rank}.json").write_text(json.dumps(data))


# -- the machine -----------------------------------------------------------------------------
def memory() -> str:
    """The machine's memory (MemTotal of /proc/meminfo), e.g. ``'7.8 GiB'``."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemTotal:"):
                    return f"{int(line.split()[1]) / 2**20:.1f} GiB"
    except (OSError, ValueError, IndexError):
        pass
    return "unknown"


# -- the command line ------------------------------------------------------------------------
def section_main(compute: Callable[..., Any], render: Callable[[Any, Path, bool], str],
                 description: str,
                 worker: Callable[[argparse.Namespace], None] | None = None,
                 add_arguments: Callable[[argparse.ArgumentParser], None] | None = None,
                 options: Callable[[argparse.Namespace], dict[str, Any]] | None = None
                 ) -> None:
    """``python report_X.py [--quick] [--out DIR]``: ``compute`` (progress on stderr),
    then print ``render``'s Markdown (the PNGs go to DIR); ``description`` is the
    module's docstring (its first paragraph is the help's). ``add_arguments`` adds
    options, ``options(args)`` turns them into keywords of ``compute``; with ``worker``,
    ``--worker`` calls it instead (the section's own ``mpiexec`` launches)."""
    parser = argparse.ArgumentParser(description=" ".join(description.split("\n\n")[0].split()))
    parser.add_argument("--quick", action="store_true", help="the short version")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT,
                        help=f"directory for the PNGs (default {DEFAULT_OUT})")
    if worker is not None:
        parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    if add_arguments is not None:
        add_arguments(parser)
    args = parser.parse_args()
    if worker is not None and args.worker:
        worker(args)
        return
    started = time.perf_counter()

    def progress(message: str) -> None:
        print(f"[{time.perf_counter() - started:7.1f} s] {message}", file=sys.stderr,
              flush=True)

    results = compute(args.quick, progress=progress, **(options(args) if options else {}))
    sys.stdout.write(render(results, args.out, args.quick).rstrip() + "\n")
    progress(f"{Path(sys.argv[0]).name}: done")


def torch_one_thread() -> None:
    """One torch thread in this process (intra- and inter-op, where still allowed)."""
    import torch

    torch.set_num_threads(1)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # already set, or parallel work has started
        pass


class SeedsToTarget:
    """What the sections' per-method target records share (mixed into their dataclasses,
    which hold ``reached`` of ``seeds`` runs that met the target and ``seconds`` to it,
    one entry per run that did)."""

    reached: int
    seeds: int
    seconds: list[float]

    @property
    def majority(self) -> bool:
        return self.reached * 2 > self.seeds

    @property
    def median_seconds(self) -> float:
        return statistics.median(self.seconds) if self.seconds else math.inf
