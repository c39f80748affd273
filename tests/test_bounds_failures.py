"""Bad bounds on one rank only, in real ``mpiexec`` launches under a hard timeout (a
hang fails the test instead of stalling the suite): that rank raises ValueError, every
other rank RemoteRankError naming it, none waits for the others, and the ranks can go on
to a good run."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
from procs import ENV, MPIEXEC, ROOT

pytestmark = pytest.mark.skipif(MPIEXEC is None, reason="mpiexec not on PATH")
LIMIT = 30.0  # seconds every rank has to report
MESSAGES = {"order": "lower bound exceeds upper bound", "nan": "NaN", "shape": "shape",
            "scalar-order": "lower bound exceeds upper bound"}

SCRIPT = """
import sys, numpy as np, hpcqn
bad, bad_rank, entry, out = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
comm = hpcqn.get_comm()
bad_rank %= comm.size
def fun(x):
    return float(((x - 1.0) ** 2).sum()), 2.0 * (x - 1.0)
x0 = np.zeros(4 + comm.rank)  # uneven slices
lo, hi = np.full(x0.shape, -2.0), np.full(x0.shape, 0.5)
bounds = (lo, hi)
if comm.rank == bad_rank:
    if bad == "order":
        lo[1], hi[1] = 1.0, -1.0
    elif bad == "nan":
        lo[0] = np.nan
    elif bad == "shape":
        bounds = (lo, np.full(x0.size + 2, 0.5))
    elif bad == "scalar-order":
        bounds = (1.0, 0.0)
elif bad_rank != 0 and comm.rank == 0:
    bounds = None  # a rank with no bounds at all still takes part in the check
try:
    if entry == "minimize":
        hpcqn.minimize(fun, x0, comm=comm, bounds=bounds)
    else:
        hpcqn.Minimizer(x0, comm=comm, bounds=bounds)
    first = "no error"
except BaseException as exc:
    first = f"{type(exc).__name__}: {exc}"
res = hpcqn.minimize(fun, x0, comm=comm, bounds=(-2.0, 0.5), options={"gtol": 1e-10})
with open(f"{out}/rank{comm.rank}.txt", "w") as file:  # mpiexec may merge stdout lines
    file.write(f"{first}\\nthen {res.success} {float(res.x.max())}\\n")
"""


def launch(ranks: int, *args: object) -> tuple[subprocess.CompletedProcess, float]:
    start = time.perf_counter()
    out = subprocess.run([MPIEXEC, "-n", str(ranks), sys.executable, "-c", SCRIPT,
                          *map(str, args)],
                         capture_output=True, text=True, timeout=LIMIT + 30, cwd=ROOT,
                         env={**ENV, "PYTHONPATH": str(ROOT)})
    return out, time.perf_counter() - start


@pytest.mark.timeout(120)
@pytest.mark.parametrize("bad,bad_rank,ranks,entry", [
    ("order", -1, 3, "minimize"), ("nan", 0, 3, "Minimizer"), ("shape", 1, 3, "minimize"),
    ("scalar-order", -1, 2, "Minimizer"),
])
def test_bad_bounds_on_one_rank_raise_on_every_rank(bad, bad_rank, ranks, entry, tmp_path):
    out, seconds = launch(ranks, bad, bad_rank, entry, tmp_path)
    assert seconds < LIMIT, out.stdout + out.stderr
    assert out.returncode == 0, out.stdout + out.stderr
    reports = [(tmp_path / f"rank{rank}.txt").read_text().splitlines()
               for rank in range(ranks)]
    for rank, (first, then) in enumerate(reports):
        if rank == bad_rank % ranks:
            assert first.startswith("ValueError: ") and MESSAGES[bad] in first, (rank, first)
        else:  # RemoteRankError naming the bad rank and its error
            assert first.startswith(f"RemoteRankError: rank {bad_rank % ranks} failed: "
                                    f"ValueError: "), (rank, reports)
            assert MESSAGES[bad] in first, (rank, first)
        # the ranks are still in step: the good run afterwards converges (x = 0.5)
        assert then == "then True 0.5", (rank, reports)
