"""hpcqn.torch where people launch it: ``torchrun`` (torch.distributed over gloo) and
``mpiexec``, with and without ``DistributedDataParallel``, each launch against a
one-process run on the global batch (tests/distributed_worker.py); a launch that would
leave every process alone is refused; an uncaught failure on one rank of a plain user
loop (no ``abort_on_failure``) ends every rank. Real launchers, hard timeouts: a hang
fails the test."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hpcqn.transport import LaunchError, check_launch, declared_processes

pytest.importorskip("torch")

ROOT = Path(__file__).resolve().parents[1]
MPIEXEC = shutil.which("mpiexec")
TORCHRUN = shutil.which("torchrun")
WORKER = str(ROOT / "tests" / "distributed_worker.py")
# No launcher variables from an outer launch (these tests start their own).
ENV = {k: v for k, v in os.environ.items()
       if not k.startswith(("SLURM_", "PMI_", "PMIX_", "OMPI_", "TORCHELASTIC_"))
       and k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
                     "MASTER_PORT", "GROUP_RANK", "ROLE_RANK")}
ENV.update({"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)})
LIMIT = 240  # seconds for one launch of the worker (every optimizer, both DDP modes)
FAIL_LIMIT = 30.0  # seconds a failing launch may take to stop every rank


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def command(launcher: str, ranks: int, *args: str) -> list[str]:
    if launcher == "torchrun":
        return [TORCHRUN, "--standalone", f"--nproc_per_node={ranks}", *args]
    if launcher == "mpiexec":
        return [MPIEXEC, "-n", str(ranks), sys.executable, *args]
    return [sys.executable, *args]


def run(launcher: str, ranks: int, *args: str, env: dict | None = None,
        timeout: float = LIMIT) -> tuple[subprocess.CompletedProcess, float]:
    if launcher == "torchrun" and TORCHRUN is None or launcher == "mpiexec" and MPIEXEC is None:
        pytest.skip(f"{launcher} not on PATH")
    full = {**ENV, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), **(env or {})}
    start = time.perf_counter()
    out = subprocess.run(command(launcher, ranks, *args), capture_output=True, text=True,
                         env=full, timeout=timeout, cwd=ROOT)
    return out, time.perf_counter() - start


@pytest.mark.slow
@pytest.mark.parametrize("ranks", [1, 2, 3])
@pytest.mark.parametrize("launcher", ["torchrun", "mpiexec"])
def test_every_optimizer_with_and_without_ddp_equals_one_process(launcher, ranks):
    """SGD (average_gradients), mL-BFGS, MKOR, MKOR-H and K-FAC, with and without DDP,
    over torch.distributed (torchrun) or MPI with DDP on gloo beside it (mpiexec):
    float64 parameters within 1e-10 of one process on the global batch of 25 (uneven
    over 2 and 3 ranks), MKOR-H switching at the reference's step on every rank."""
    out, _ = run(launcher, ranks, WORKER, "--atol", "1e-10")
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    cases = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    assert len(cases) == 10, out.stdout
    expected = "torch.distributed" if launcher == "torchrun" else "MPI"
    for case in cases:
        assert case["transport"] == expected and case["ranks"] == ranks
        assert case["max_diff"] <= 1e-10, case
    switches = {case["ddp"]: case["switched_at"] for case in cases
                if case["optimizer"] == "mkor_h"}
    assert switches[False] == switches[True] == [4] * ranks


@pytest.mark.slow
@pytest.mark.parametrize("ranks", [2, 3])
def test_torchrun_without_init_process_group_is_refused_on_every_process(ranks):
    """Before: every process trained alone as a one-rank world. Now construction fails on
    every process with one line naming WORLD_SIZE and how to launch."""
    out, seconds = run("torchrun", ranks, WORKER, "--transport", "uninitialised",
                       timeout=FAIL_LIMIT + 30)
    assert out.returncode != 0 and "constructed" not in out.stdout
    lines = [line for line in out.stderr.splitlines()
             if line.startswith("hpcqn.transport.LaunchError")]
    assert len(lines) == ranks, out.stderr[-3000:]
    assert f"WORLD_SIZE={ranks}" in lines[0] and "init_process_group" in lines[0]
    assert seconds < FAIL_LIMIT


@pytest.mark.parametrize(("variable", "value"), [("WORLD_SIZE", "3"), ("SLURM_NTASKS", "2"),
                                                 ("OMPI_COMM_WORLD_SIZE", "2")])
def test_a_process_alone_in_a_declared_launch_is_refused(variable, value):
    """One plain ``python`` process under a variable that declares more processes (as
    torchrun, srun and Open MPI's mpirun set it)."""
    out, _ = run("python", 1, "-c", "import hpcqn; hpcqn.get_comm()", env={variable: value},
                 timeout=60)
    assert out.returncode == 1
    assert f"LaunchError: hpcqn: the launcher declared {value} processes ({variable}=" \
           f"{value})" in out.stderr


def test_declared_process_counts_are_read_from_each_launcher():
    assert declared_processes({}) == []
    found = declared_processes({"WORLD_SIZE": "4", "PMI_SIZE": "4", "SLURM_NTASKS": "8",
                                "SLURM_STEP_NUM_TASKS": "4", "OMPI_COMM_WORLD_SIZE": "x"})
    assert [(d.variable, d.count) for d in found] == [("WORLD_SIZE", 4), ("PMI_SIZE", 4),
                                                      ("SLURM_STEP_NUM_TASKS", 4)]
    assert declared_processes({"SLURM_NTASKS": "8", "HPCQN_IGNORE_SLURM": "1"}) == []
    check_launch(4, "MPI", {"WORLD_SIZE": "4", "SLURM_NTASKS": "2"})  # fewer is fine
    with pytest.raises(LaunchError, match=r"declared 8 processes \(SLURM_NTASKS=8\)"):
        check_launch(4, "MPI", {"SLURM_NTASKS": "8"})


USER_LOOP = """
import os, sys, time, torch, hpcqn, hpcqn.torch as ht
if "TORCHELASTIC_RUN_ID" in os.environ:
    torch.distributed.init_process_group("gloo")
torch.set_num_threads(1)
kind = sys.argv[1]
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
opt = ht.MKOR(model, lr=0.1)          # no abort_on_failure anywhere
comm = opt.comm
x, y = torch.randn(32, 8), torch.randint(0, 2, (32,))
for step in range(100000):
    opt.zero_grad()
    if comm.rank == comm.size - 1 and step == 3:
        if kind == "error":
            raise RuntimeError(f"data loader blew up on rank {comm.rank}")
        if kind == "exit":
            sys.exit(5)
    torch.nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
"""


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["error", "exit"])
@pytest.mark.parametrize("launcher", ["mpiexec", "torchrun"])
def test_a_failure_on_one_rank_of_a_plain_loop_ends_every_rank(launcher, kind):
    """A user loop with no wrapper: an exception (or sys.exit(5)) on the last rank while
    the others wait in the next step's allreduce. Before: every rank hung. Now: the
    traceback printed once, every rank stopped within 30 s, a non-zero exit."""
    args = ("-c", USER_LOOP, kind) if launcher == "mpiexec" else ("--no-python", sys.executable,
                                                                   "-c", USER_LOOP, kind)
    out, seconds = run(launcher, 2, *args, timeout=FAIL_LIMIT + 30)
    assert out.returncode != 0
    assert seconds < FAIL_LIMIT, seconds
    if kind == "error":
        assert out.stderr.count("RuntimeError: data loader blew up on rank 1") == 1, out.stderr
        assert "uncaught RuntimeError; stopping every rank (exit 4)" in out.stderr
    else:
        assert "exited with sys.exit(5)" in out.stderr, out.stderr


@pytest.mark.slow
def test_the_abort_can_be_turned_off():
    """HPCQN_ABORT_ON_FAILURE=0: hpcqn leaves sys.excepthook and sys.exit alone."""
    script = ("import sys, hpcqn; c = hpcqn.get_comm(); c.rank or "
              "print(c.size, sys.excepthook is sys.__excepthook__, sys.exit.__module__)")
    on, _ = run("mpiexec", 2, "-c", script, timeout=60)
    off, _ = run("mpiexec", 2, "-c", script, env={"HPCQN_ABORT_ON_FAILURE": "0"}, timeout=60)
    assert on.stdout.strip() == "2 False hpcqn.comm", on.stdout + on.stderr
    assert off.stdout.strip() == "2 True sys", off.stdout + off.stderr


FSDP = """
import torch, torch.distributed as dist, torch.nn as nn, hpcqn.torch as ht
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FullyShardedDataParallel, fully_shard
dist.init_process_group("gloo")
for name in ("FullyShardedDataParallel", "fully_shard"):
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    if name == "fully_shard":
        fully_shard(model, mesh=init_device_mesh("cpu", (dist.get_world_size(),)))
    else:
        model = FullyShardedDataParallel(model, device_id=torch.device("cpu"))
    for make in (ht.MKOR, ht.KFAC):
        try:
            make(model)
        except TypeError as exc:
            print(dist.get_rank(), name, make.__name__, "refused:", exc, flush=True)
"""


@pytest.mark.slow
def test_an_fsdp_model_is_refused_on_every_rank():
    """FSDP (both of torch's: the wrapper class and fully_shard) shards each layer's
    weight across ranks; MKOR and K-FAC refuse it with a TypeError naming DDP instead."""
    out, _ = run("torchrun", 2, "--no-python", sys.executable, "-c", FSDP, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    refused = [line for line in out.stdout.splitlines() if "refused: an FSDP-sharded model" in
               line and "DistributedDataParallel" in line]
    assert len(refused) == 8, out.stdout
