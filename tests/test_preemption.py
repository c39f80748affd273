"""Preemption and elastic restart with real processes: mpiexec, a real SIGUSR1 sent to
one rank, checkpoints saved on 2 ranks and resumed on 1 and on 3, and the sbatch
templates run end to end with a stand-in srun (timeouts on everything)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from procs import rank_pids

pytest.importorskip("torch")

ROOT = Path(__file__).resolve().parents[1]
MPIEXEC = shutil.which("mpiexec")
pytestmark = [pytest.mark.skipif(MPIEXEC is None, reason="mpiexec not on PATH"),
              pytest.mark.slow]  # real signals to whole launches
ENV = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
ENV.update({"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"})

ELASTIC = """
import sys, signal, numpy as np, torch, hpcqn
from hpcqn.signals import Preempted
from hpcqn.experiments.training import train
torch.set_num_threads(1)
method, directory, out, stop_at = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
options = {"mlbfgs": {"lr": 0.1, "period": 3}, "mkor": {"lr": 0.05, "factor_freq": 3,
           "placement": "owner"}, "sgd": {"lr": 0.1, "momentum": 0.9}}[method]

class StopAt:  # as tests/stops.py: SIGUSR1 from the step-th read of signum on
    def __init__(self, step):
        self.step, self.reads = step, 0
    @property
    def signum(self):
        self.reads += 1
        return signal.SIGUSR1 if self.reads >= self.step else None

comm = hpcqn.get_comm()
try:
    result = train(method, comm, "mlp", options, epochs=2, batch_size=60,
                   dtype=torch.float64, log=False, hidden=24, checkpoint_dir=directory,
                   stop=StopAt(stop_at) if stop_at else None)
except Preempted:
    sys.exit(3)
if comm.rank == 0:
    x = torch.nn.utils.parameters_to_vector(result["model"].parameters()).detach().numpy()
    np.save(out, x)
"""


def mpirun(ranks: int, *args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run([MPIEXEC, "-n", str(ranks), sys.executable, *args],
                          capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=ENV)


@pytest.mark.timeout(600)
@pytest.mark.parametrize("method", ["mlbfgs", "mkor", "sgd"])
def test_saved_on_two_ranks_resumed_on_one_and_three(tmp_path, method):
    script = tmp_path / "elastic.py"
    script.write_text(ELASTIC)
    straight = mpirun(1, str(script), method, str(tmp_path / "none"),
                      str(tmp_path / "straight.npy"), "0")
    assert straight.returncode == 0, straight.stderr
    reference = np.load(tmp_path / "straight.npy")
    for ranks in (1, 3):
        directory = tmp_path / f"ckpt-{ranks}"
        stopped = mpirun(2, str(script), method, str(directory), "-", "9")  # mid-epoch
        assert stopped.returncode == 3, stopped.stderr
        resumed = mpirun(ranks, str(script), method, str(directory),
                         str(tmp_path / f"resumed-{ranks}.npy"), "0")
        assert resumed.returncode == 0, resumed.stderr
        np.testing.assert_allclose(np.load(tmp_path / f"resumed-{ranks}.npy"), reference,
                                   rtol=1e-10, atol=1e-12)


def job_file(tmp_path: Path, epochs: int) -> Path:
    text = (ROOT / "jobs" / "digits_mlp.toml").read_text()
    text = text.replace("epochs = 15", f"epochs = {epochs}").replace("hidden = 128",
                                                                     "hidden = 256")
    start = text.index("[methods.sgd]")
    job = tmp_path / "job.toml"
    job.write_text(text[:start])  # mL-BFGS only
    return job


@pytest.mark.timeout(600)
def test_sigusr1_to_one_rank_checkpoints_everywhere_and_resumes_exactly(tmp_path):
    job = job_file(tmp_path, epochs=30)
    command = [MPIEXEC, "-n", "2", sys.executable, "-m", "hpcqn", "run", str(job),
               "--output", str(tmp_path / "run" / "summary.json")]
    unbroken = subprocess.run([*command[:-1], str(tmp_path / "unbroken" / "summary.json")],
                              capture_output=True, text=True, timeout=300, cwd=ROOT, env=ENV)
    assert unbroken.returncode == 0, unbroken.stderr
    launcher = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, cwd=ROOT, env=ENV)
    metrics = tmp_path / "run" / "mlbfgs.jsonl"
    deadline = time.monotonic() + 120
    while not (metrics.exists() and metrics.read_text().count("\n") >= 2):
        assert launcher.poll() is None and time.monotonic() < deadline, launcher.stderr.read()
        time.sleep(0.01)
    pids = rank_pids(launcher)
    assert len(pids) == 2, pids
    os.kill(pids[1], signal.SIGUSR1)  # one rank only
    out, err = launcher.communicate(timeout=120)
    assert launcher.returncode == 3, err
    assert "stopped by" in out and "run the same command to resume" in out
    stopped_at = len(metrics.read_text().splitlines())
    assert stopped_at < 30
    resumed = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=ROOT,
                             env=ENV)
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stdout
    ours = [json.loads(line) for line in metrics.read_text().splitlines()]
    theirs = [json.loads(line) for line in
              (tmp_path / "unbroken" / "mlbfgs.jsonl").read_text().splitlines()]
    assert [r["train_loss"] for r in ours] == [r["train_loss"] for r in theirs]
    assert [r["test_accuracy"] for r in ours] == [r["test_accuracy"] for r in theirs]
