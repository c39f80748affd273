"""Every script in examples/ runs in its ``--short`` mode, alone and, where it is
distributed, under ``mpiexec -n 2`` and ``torchrun --standalone --nproc_per_node 2``, each
launch with a hard timeout. The references are independent of the code under test: SciPy's
L-BFGS-B on the whole problem (the examples' ``--check``), and the one-process run, which
every two-process launch must reproduce (data-parallel steps are the same to rounding)."""

from __future__ import annotations

import math
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # whole launches of the examples
ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
MPIEXEC = shutil.which("mpiexec")
TORCHRUN = str(Path(sys.executable).parent / "torchrun")
LIMIT = 180  # seconds for one launch
# A clean launch: no variables of an outer launcher, one thread per process.
ENV = {k: v for k, v in os.environ.items()
       if not k.startswith(("SLURM_", "PMI_", "PMIX_", "OMPI_", "TORCHELASTIC_"))
       and k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
                     "MASTER_PORT", "GROUP_RANK", "ROLE_RANK")}
ENV.update({"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
            "PYTHONPATH": str(ROOT)})


def _free_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def launch(launcher: str, script: str, *args: str) -> str:
    """Run ``examples/script`` with ``args`` alone (``launcher`` "python") or on two
    processes; returns its standard output (the test fails on a non-zero exit)."""
    path = str(EXAMPLES / script)
    env = dict(ENV)
    if launcher == "mpiexec":
        if MPIEXEC is None:
            pytest.skip("mpiexec not on PATH")
        command = [MPIEXEC, "-n", "2", sys.executable, path, *args]
    elif launcher == "torchrun":
        env.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": _free_port()})
        command = [TORCHRUN, "--standalone", "--nproc_per_node", "2", path, *args]
    else:
        command = [sys.executable, path, *args]
    out = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT,
                         timeout=LIMIT)
    assert out.returncode == 0, (f"{' '.join(command)} exited {out.returncode}\n"
                                 f"{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    return out.stdout


def fields(output: str, prefix: str) -> list[dict[str, str]]:
    """The ``key=value`` pairs of every output line starting with ``prefix``."""
    return [dict(re.findall(r"(\w+)=(\S+)", line)) for line in output.splitlines()
            if line.startswith(prefix)]


def test_every_example_is_tested() -> None:
    tested = {"halo_bounds.py", "time_loop.py", "digits_cnn.py", "transformer_lm.py"}
    assert {p.name for p in EXAMPLES.glob("*.py")} == tested


@pytest.mark.parametrize("script, agree", [
    ("halo_bounds.py", ("nactive",)),
    ("time_loop.py", ("steps",)),
])
def test_simulation_examples_match_scipy_on_one_and_two_ranks(script, agree):
    """The distributed solve agrees with SciPy's L-BFGS-B on the whole problem, and two
    ranks give one rank's objective value (to rounding) and the same active set."""
    results = {}
    for launcher in ("python", "mpiexec"):
        out = launch(launcher, script, "--short", "--check")
        (check,) = fields(out, "check:")
        (results[launcher],) = fields(out, "result:")
        difference = float(check["max_difference"])
        assert difference < 1e-5, (launcher, check)
    value = "f" if script == "halo_bounds.py" else "J"
    assert math.isclose(float(results["mpiexec"][value]), float(results["python"][value]),
                        rel_tol=1e-9)
    for key in agree:
        assert results["mpiexec"][key] == results["python"][key]


def test_digits_cnn_trains_every_optimizer_alike_under_every_launcher():
    """Every optimizer, float64: two processes under mpiexec (MPI) and under torchrun
    (torch.distributed, gloo) end at the one-process run's training loss to rounding,
    and every optimizer lowered the loss from its start (ln 10 for ten classes)."""
    runs = {launcher: {r["optimizer"]: float(r["loss"])
                       for r in fields(launch(launcher, "digits_cnn.py", "--short", "--dtype",
                                              "float64"), "result:")}
            for launcher in ("python", "mpiexec", "torchrun")}
    assert sorted(runs["python"]) == sorted(("mlbfgs", "mkor", "mkor_h", "kfac", "sgd", "adam",
                                             "adamw", "lamb"))
    for launcher in ("mpiexec", "torchrun"):
        for name, loss in runs["python"].items():
            assert math.isclose(runs[launcher][name], loss, rel_tol=1e-8), (launcher, name)
    assert all(loss < math.log(10) for loss in runs["python"].values()), runs["python"]


def test_transformer_lm_short_run_under_every_launcher():
    """The character transformer (examples/transformer_lm.py) with MKOR: two processes
    under mpiexec and torchrun (with DDP) end at the one-process run's losses (float32:
    to 1e-3), which fall from the first epoch to the second."""
    pattern = re.compile(r"epoch (\d+): train loss (\S+)\s+validation loss (\S+)")

    def losses(out: str) -> list[tuple[float, float]]:
        return [(float(m.group(2)), float(m.group(3))) for m in pattern.finditer(out)]

    alone = losses(launch("python", "transformer_lm.py", "--short", "--optimizer", "mkor"))
    assert len(alone) == 2 and alone[1][0] < alone[0][0] and alone[1][1] < alone[0][1]
    for launcher, extra in (("mpiexec", ()), ("torchrun", ("--ddp",))):
        two = losses(launch(launcher, "transformer_lm.py", "--short", "--optimizer", "mkor",
                            *extra))
        assert len(two) == 2
        for (train, val), (train1, val1) in zip(two, alone, strict=True):
            assert math.isclose(train, train1, rel_tol=1e-3), (launcher, two, alone)
            assert math.isclose(val, val1, rel_tol=1e-3), (launcher, two, alone)
