"""A SIGTERM or SIGINT in the first seconds of ``hpcqn run`` (before any step: while torch
or MPI load, while the job is read) is a stop like any other: exit 3 (what the Slurm
templates requeue) with one line saying nothing was done, never a traceback, under
mpiexec never "BAD TERMINATION".

The signal is sent at a known moment: a ``sitecustomize`` module (on ``PYTHONPATH``, so
the test changes nothing in hpcqn) makes each process pause the first time it imports a
chosen module, after writing its pid to a marker directory; the test waits for every
rank's marker and signals them during the pause. Real processes, real signals, real
mpiexec, timeouts on everything."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from procs import ENV, MPIEXEC, ROOT

from hpcqn.checkpoint import read_manifest

pytestmark = pytest.mark.slow  # real signals to whole launches

needs_mpiexec = pytest.mark.skipif(MPIEXEC is None, reason="mpiexec not on PATH")
PAUSE_SECONDS = 4.0
PAUSE_HOOK = """
import os, sys, time

class _PauseOnImport:
    '''Pause once, on the first import of HPCQN_TEST_PAUSE_ON, after writing the pid.'''

    def find_spec(self, name, path=None, target=None):
        if name == os.environ["HPCQN_TEST_PAUSE_ON"]:
            sys.meta_path.remove(self)
            marker = os.path.join(os.environ["HPCQN_TEST_MARKERS"], str(os.getpid()))
            with open(marker, "w"):
                pass
            time.sleep(float(os.environ["HPCQN_TEST_PAUSE_SECONDS"]))
        return None

if os.environ.get("HPCQN_TEST_PAUSE_ON"):
    sys.meta_path.insert(0, _PauseOnImport())
"""
NOTHING_DONE = "before the first step: nothing was done, nothing to resume"


JOB = ('[job]\nkind = "minimize"\n[problem]\nname = "extended_rosenbrock"\nn = 2000\n'
       '[options]\ngtol = 1e-7\ndisp = 10\n')


def job_file(tmp_path: Path) -> Path:
    job = tmp_path / "job.toml"
    if not job.exists():
        job.write_text(JOB)
    return job


def stop_early(tmp_path: Path, module: str, signum: int, ranks: int = 0,
               which: str = "all") -> tuple[subprocess.CompletedProcess, float, Path]:
    """``hpcqn run`` (under ``mpiexec -n ranks`` when given) paused at the first import of
    ``module`` on every rank, then ``signum`` sent to every rank (``which="all"``) or to
    one; returns the finished process, the seconds from the signal to its exit, and the
    run directory."""
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(PAUSE_HOOK)
    markers = tmp_path / "markers"
    markers.mkdir()
    run_dir = tmp_path / "run"
    env = {**ENV, "PYTHONPATH": os.pathsep.join([str(hook), ENV.get("PYTHONPATH", "")]),
           "HPCQN_TEST_PAUSE_ON": module, "HPCQN_TEST_MARKERS": str(markers),
           "HPCQN_TEST_PAUSE_SECONDS": str(PAUSE_SECONDS)}
    command = [sys.executable, "-m", "hpcqn", "run", str(job_file(tmp_path)), "--output",
               str(run_dir / "summary.json")]
    if ranks:
        command = [MPIEXEC, "-n", str(ranks), *command]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, cwd=ROOT, env=env)
    deadline = time.monotonic() + 120
    while len(list(markers.iterdir())) < max(ranks, 1):
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()
        time.sleep(0.01)
    pids = sorted(int(p.name) for p in markers.iterdir())
    sent = time.monotonic()
    for pid in pids if which == "all" else pids[-1:]:
        os.kill(pid, signum)
    try:
        out, err = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
    seconds = time.monotonic() - sent
    result = subprocess.CompletedProcess(command, process.returncode, out, err)
    last = (err.strip() or out.strip()).splitlines()[-1:] or [""]
    print(f"CASE {module} {signal.Signals(signum).name} ranks={ranks or 1} to={which}: "
          f"{seconds:.2f} s, exit {process.returncode}: {last[0][:160]}")
    return result, seconds, run_dir


def assert_stopped_before_any_step(out: subprocess.CompletedProcess, run_dir: Path,
                                   signum: int, here: bool = True) -> None:
    """Exit 3, one line from rank 0 naming the signal (``here``: rank 0 had it, else
    "a signal on another rank"), nothing on stderr, no checkpoint, no lock left."""
    text = out.stdout + out.stderr
    assert out.returncode == 3, text
    assert "Traceback" not in text and "BAD TERMINATION" not in text, text
    names = [signal.Signals(signum).name] + ([] if here else ["a signal on another rank"])
    assert any(f"stopped by {name} {NOTHING_DONE}" in out.stdout for name in names), text
    assert out.stdout.count("stopped by") == 1  # rank 0 only
    assert out.stderr == "", out.stderr
    assert not (run_dir / "checkpoints" / "latest").exists()  # nothing was saved
    assert not (run_dir / "lock").exists()


@pytest.mark.timeout(300)
@pytest.mark.parametrize("module, signum", [("torch", signal.SIGTERM),
                                            ("hpcqn.experiments.jobs", signal.SIGINT),
                                            ("mpi4py", signal.SIGTERM)])
def test_an_early_signal_stops_a_serial_run_with_exit_3_and_one_line(tmp_path, module,
                                                                      signum):
    out, seconds, run_dir = stop_early(tmp_path, module, signum)
    assert_stopped_before_any_step(out, run_dir, signum)
    assert seconds < PAUSE_SECONDS + 30
    again = subprocess.run(out.args, capture_output=True, text=True, timeout=120, cwd=ROOT,
                           env=ENV)  # the same command, as a requeued job runs it
    assert again.returncode == 0, again.stderr


@needs_mpiexec
@pytest.mark.timeout(300)
@pytest.mark.parametrize("module, signum, which", [("torch", signal.SIGTERM, "all"),
                                                   ("torch", signal.SIGINT, "one"),
                                                   ("mpi4py", signal.SIGTERM, "one")])
def test_an_early_signal_stops_every_rank_with_exit_3_and_one_line(tmp_path, module, signum,
                                                                   which):
    """Signalled on every rank (as Slurm signals every task) or on one only: the ranks
    agree on it at their first agreement, and every rank exits 3."""
    out, seconds, run_dir = stop_early(tmp_path, module, signum, ranks=2, which=which)
    assert_stopped_before_any_step(out, run_dir, signum, here=which == "all")
    assert seconds < PAUSE_SECONDS + 60


@pytest.mark.timeout(300)
def test_a_signal_while_the_package_imports(tmp_path):
    """While hpcqn's own package loads NumPy: the command's flag is installed by the
    package's first lines (hpcqn/__init__.py), before it."""
    out, _, run_dir = stop_early(tmp_path, "numpy", signal.SIGTERM)
    assert_stopped_before_any_step(out, run_dir, signal.SIGTERM)


@pytest.mark.timeout(300)
def test_an_early_signal_leaves_the_checkpoint_to_resume_from_as_it_was(tmp_path):
    """A run that stopped at maxiter with checkpoints, run again and signalled while
    torch loads: exit 3, one line naming the checkpoint's step, and the checkpoint
    directory byte for byte as it was."""
    (tmp_path / "job.toml").write_text(JOB.replace("disp = 10", "maxiter = 4\n"
                                                   "checkpoint_every = 2"))
    first = subprocess.run([sys.executable, "-m", "hpcqn", "run", str(tmp_path / "job.toml"),
                            "--output", str(tmp_path / "run" / "summary.json")],
                           capture_output=True, text=True, timeout=120, cwd=ROOT, env=ENV)
    assert first.returncode == 1, first.stderr
    checkpoints = tmp_path / "run" / "checkpoints"
    before = {p: p.read_bytes() for p in sorted(checkpoints.rglob("*")) if p.is_file()}
    step = read_manifest(checkpoints).step
    out, _, _ = stop_early(tmp_path, "torch", signal.SIGTERM)
    assert out.returncode == 3 and "Traceback" not in out.stderr, out.stderr
    assert (f"stopped by SIGTERM before the first step after the checkpoint of step {step}: "
            "nothing new was done, that checkpoint is unchanged") in out.stdout
    assert {p: p.read_bytes() for p in sorted(checkpoints.rglob("*")) if p.is_file()} == before
