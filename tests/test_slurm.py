"""The sbatch templates: syntax, and end to end with a stand-in ``srun`` (mpiexec with
SLURM_NTASKS ranks) and ``scontrol`` (records a requeue), with the Slurm variables set:
a plain run, a SIGUSR1 that checkpoints, requeues and resumes, and the singleton-launch
pitfall refused."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from procs import rank_pids

pytestmark = pytest.mark.slow  # the sbatch templates end to end

ROOT = Path(__file__).resolve().parents[1]
TEMPLATES = sorted((ROOT / "slurm").glob("*.sbatch"))
MPIEXEC = shutil.which("mpiexec")
needs_mpiexec = pytest.mark.skipif(MPIEXEC is None, reason="mpiexec not on PATH")


def test_templates_are_valid_bash_with_signal_and_requeue():
    assert {t.name for t in TEMPLATES} == {"cpu_mpi.sbatch", "gpu_per_task.sbatch",
                                           "multinode.sbatch"}
    for script in [*TEMPLATES, ROOT / "slurm" / "hpcqn-step.sh"]:
        subprocess.run(["bash", "-n", str(script)], check=True)
    for template in TEMPLATES:
        text = template.read_text()
        assert "#SBATCH --signal=USR1@" in text and "#SBATCH --requeue" in text
        assert "slurm/hpcqn-step.sh" in text


def slurm_env(tmp_path: Path, ntasks: int) -> dict[str, str]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    srun = bin_dir / "srun"
    srun.write_text('#!/bin/bash\n# stand-in: drop srun options, start SLURM_NTASKS ranks\n'
                    'while [[ "${1:-}" == --* ]]; do shift; done\n'
                    f'exec {MPIEXEC} -n "$SLURM_NTASKS" "$@"\n')
    scontrol = bin_dir / "scontrol"
    scontrol.write_text(f'#!/bin/bash\necho "$@" >> {tmp_path / "scontrol.log"}\n')
    for stand_in in (srun, scontrol):
        stand_in.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update({"PATH": f"{bin_dir}:{os.path.dirname(sys.executable)}:{env['PATH']}",
                "SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "test", "SLURM_NTASKS": str(ntasks),
                "SLURM_SUBMIT_DIR": str(ROOT), "SLURM_CPUS_PER_TASK": "1",
                "HPCQN_RUN_DIR": str(tmp_path / "run")})
    return env


def short_job(tmp_path: Path, epochs: int, hidden: int = 32) -> Path:
    text = (ROOT / "jobs" / "digits_mlp.toml").read_text()
    text = text.replace("epochs = 15", f"epochs = {epochs}").replace(
        "hidden = 128", f"hidden = {hidden}")
    job = tmp_path / "job.toml"
    job.write_text(text[: text.index("[methods.sgd]")])  # mL-BFGS only
    return job


@needs_mpiexec
@pytest.mark.timeout(300)
@pytest.mark.parametrize("template, ntasks", [("cpu_mpi.sbatch", 2),
                                              ("gpu_per_task.sbatch", 2),
                                              ("multinode.sbatch", 3)])
def test_template_runs_a_job(tmp_path, template, ntasks):
    pytest.importorskip("torch")
    env = slurm_env(tmp_path, ntasks)
    out = subprocess.run(["bash", str(ROOT / "slurm" / template), str(short_job(tmp_path, 2))],
                         capture_output=True, text=True, timeout=240, env=env, cwd=tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"ranks     {ntasks}" in out.stdout  # srun hpcqn info
    assert (tmp_path / "run" / "summary.json").exists()
    assert not (tmp_path / "scontrol.log").exists()


@needs_mpiexec
@pytest.mark.timeout(400)
def test_signal_checkpoints_requeues_and_the_requeued_job_resumes(tmp_path):
    pytest.importorskip("torch")
    env = slurm_env(tmp_path, 2)
    command = ["bash", str(ROOT / "slurm" / "cpu_mpi.sbatch"),
               str(short_job(tmp_path, 30, hidden=256))]
    job = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           env=env, cwd=tmp_path)
    metrics = tmp_path / "run" / "mlbfgs.jsonl"
    deadline = time.monotonic() + 120
    while not (metrics.exists() and metrics.read_text().count("\n") >= 2):
        assert job.poll() is None and time.monotonic() < deadline, job.stderr.read()
        time.sleep(0.01)
    pids = rank_pids(job)
    assert len(pids) == 2, pids
    os.kill(pids[0], signal.SIGUSR1)  # what --signal=USR1@120 delivers
    out, err = job.communicate(timeout=120)
    assert job.returncode == 3, out + err
    assert "requeueing job 4242" in out
    assert (tmp_path / "scontrol.log").read_text().split() == ["requeue", "4242"]
    env["SLURM_RESTART_COUNT"] = "1"
    again = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env,
                           cwd=tmp_path)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "restart 1" in again.stdout and "resumed from" in again.stdout
    assert len(metrics.read_text().splitlines()) == 30


def test_singleton_launch_under_slurm_is_refused(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update({"SLURM_NTASKS": "4", "SLURM_JOB_ID": "1"})
    out = subprocess.run([sys.executable, "-m", "hpcqn", "run", str(short_job(tmp_path, 1))],
                         capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        "hpcqn run: error: the launcher declared 4 processes (SLURM_NTASKS=4) but this "
        "process's MPI communicator has 1 rank(s)"), out.stderr
