"""jobs/charlm.toml (the character transformer on Python's source, five methods) through
``hpcqn run`` in a short form: one process, ``mpiexec -n 2`` and ``torchrun
--nproc_per_node 2`` train the same steps; a torchrun job stopped by a signal
checkpoints and its rerun ends where an uninterrupted run ends. Real launchers, hard
timeouts."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from procs import ENV, ROOT, rank_pids

pytest.importorskip("torch")
pytestmark = pytest.mark.slow
MPIEXEC, TORCHRUN = shutil.which("mpiexec"), shutil.which("torchrun")
CLEAN = {k: v for k, v in ENV.items()
         if not k.startswith(("PMI_", "OMPI_", "TORCHELASTIC_")) and k not in (
             "WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}


def short_job(tmp_path: Path, epochs: int) -> Path:
    """jobs/charlm.toml on its corpus's first 60,000 characters, 16 wide."""
    text = (ROOT / "jobs" / "charlm.toml").read_text()
    for old, new in (("max_chars = 0 ", "max_chars = 60000 "), ("hidden = 64 ", "hidden = 16 "),
                     ("epochs = 2", f"epochs = {epochs}")):
        assert old in text
        text = text.replace(old, new)
    job = tmp_path / "charlm.toml"
    job.write_text(text)
    return job


def command(launcher: str, job: Path, output: Path) -> list[str]:
    run = ["-m", "hpcqn", "run", str(job), "--output", str(output)]
    if launcher == "torchrun":
        return [TORCHRUN, "--standalone", "--nproc_per_node=2", *run]
    if launcher == "mpiexec":
        return [MPIEXEC, "-n", "2", sys.executable, *run]
    return [sys.executable, *run]


def losses(summary: Path) -> dict[str, list[float]]:
    methods = json.loads(summary.read_text())["methods"]
    return {m: [e["test_loss"] for e in r["epochs"]] for m, r in methods.items()}


@pytest.mark.timeout(600)
def test_the_job_gives_the_same_losses_under_each_launcher(tmp_path):
    job = short_job(tmp_path, epochs=2)
    found = {}
    for launcher in ("python", "mpiexec", "torchrun"):
        if launcher != "python" and shutil.which(launcher) is None:
            continue
        output = tmp_path / launcher / "summary.json"
        out = subprocess.run(command(launcher, job, output), capture_output=True, text=True,
                             timeout=300, cwd=tmp_path, env=CLEAN)
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
        found[launcher] = losses(output)
    assert set(found["python"]) == {"mkor", "mkor_h", "kfac", "mlbfgs", "adamw"}
    for launcher, result in found.items():
        for method, values in result.items():
            assert len(values) == 2
            # float32 on 1 and 2 ranks: the sums round differently, the steps agree
            assert values == pytest.approx(found["python"][method], rel=2e-4), (launcher,
                                                                                  method)
        assert result["mkor"][-1] < 4.2 and result["adamw"][-1] < 4.6  # it learnt something


@pytest.mark.timeout(600)
@pytest.mark.skipif(TORCHRUN is None, reason="torchrun not on PATH")
def test_a_stopped_torchrun_job_resumes_to_the_uninterrupted_result(tmp_path):
    """SIGUSR1 to one torchrun worker while the first method trains: every worker
    checkpoints and exits 3 (torchrun, whose workers did not exit 0, exits 1); the same
    command again resumes and ends with the losses of a run that was never stopped."""
    job = short_job(tmp_path, epochs=3)
    whole = tmp_path / "whole" / "summary.json"
    out = subprocess.run(command("torchrun", job, whole), capture_output=True, text=True,
                         timeout=300, cwd=tmp_path, env=CLEAN)
    assert out.returncode == 0, out.stderr[-3000:]
    output = tmp_path / "stopped" / "summary.json"
    launcher = subprocess.Popen(command("torchrun", job, output), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, cwd=tmp_path, env=CLEAN)
    metrics = output.parent / "mkor.jsonl"
    deadline = time.monotonic() + 240
    while not (metrics.exists() and metrics.read_text().count("\n") >= 1):
        assert launcher.poll() is None and time.monotonic() < deadline, launcher.stderr.read()
        time.sleep(0.01)
    pids = rank_pids(launcher)
    assert len(pids) == 2, pids
    os.kill(pids[1], signal.SIGUSR1)
    stdout, stderr = launcher.communicate(timeout=240)
    assert launcher.returncode != 0
    assert "exitcode  : 3" in stderr, stderr[-3000:]
    assert "checkpoint written" in stdout, stdout[-3000:]
    again = subprocess.run(command("torchrun", job, output), capture_output=True, text=True,
                           timeout=300, cwd=tmp_path, env=CLEAN)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resumed from" in again.stdout
    assert losses(output) == losses(whole)
