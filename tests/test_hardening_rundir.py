"""``hpcqn run`` on hostile input ends in one line and exit 2, within a timeout, serially
and under ``mpiexec -n 2``: a run directory whose checkpoints were damaged or replaced
(a FIFO manifest, a symlinked or missing step directory, a manifest that is a JSON list,
an x or a model weight of the wrong shape, a FIFO lock, ``latest``, ``job.toml`` or
metrics file, a metrics file that is not JSON lines), a job file that is a
FIFO or a device, and a job file whose values pass the schema but cannot be allocated
(``history = 2**63 - 1``, ``n = 1e11``, an enormous model) or nest 5000 levels deep.
Real processes; each case prints its seconds, exit code and message."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from procs import ENV, MPIEXEC, ROOT

from hpcqn import checkpoint as ck

pytestmark = pytest.mark.slow  # a launch of hpcqn run per case

needs_mpiexec = pytest.mark.skipif(MPIEXEC is None, reason="mpiexec not on PATH")
RANKS = [1, pytest.param(2, marks=needs_mpiexec)]
MINIMIZE = ('[job]\nkind = "minimize"\n[problem]\nname = "extended_rosenbrock"\nn = 200\n'
            '[options]\nmaxiter = 4\ncheckpoint_every = 2\n')
STOCHASTIC = ('[job]\nkind = "stochastic"\n[problem]\nname = "digits_softmax"\n[train]\n'
              'epochs = 1\nbatch_size = 60\n[methods.mlbfgs]\nlr = 0.1\n')
TORCH = ('[job]\nkind = "torch"\n[model]\nname = "mlp"\nhidden = 8\n[train]\nepochs = 1\n'
         'dtype = "float64"\n[methods.mlbfgs]\nlr = 0.1\n')
# A job that leaves checkpoints, its exit code, where they are, and an array of its state.
KINDS = {"minimize": (MINIMIZE, 1, "checkpoints", ("solver", "x")),
         "stochastic": (STOCHASTIC, 0, "checkpoints/mlbfgs", ("x",)),
         "torch": (TORCH, 0, "checkpoints/mlbfgs", ("model", "1.weight"))}


def hpcqn_run(job: Path, output: Path, ranks: int, timeout: float = 60
              ) -> tuple[subprocess.CompletedProcess, float]:
    command = [sys.executable, "-m", "hpcqn", "run", str(job), "--output", str(output)]
    if ranks > 1:
        command = [MPIEXEC, "-n", str(ranks), *command]
    start = time.monotonic()
    out = subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                         env=ENV)
    return out, time.monotonic() - start


def assert_one_line(out: subprocess.CompletedProcess, seconds: float, case: str,
                    fragment: str) -> None:
    """Exit 2 and exactly one line on stderr (rank 0's) naming the problem; no
    traceback anywhere."""
    last = (out.stderr.strip() or out.stdout.strip()).splitlines()[-1:] or [""]
    print(f"CASE {case}: {seconds:.2f} s, exit {out.returncode}: {last[0][:200]}")
    text = out.stdout + out.stderr
    assert out.returncode == 2, text
    assert "Traceback" not in text and "BAD TERMINATION" not in text, text
    lines = out.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("hpcqn run: error: "), out.stderr
    assert fragment in lines[0], lines[0]


@pytest.fixture(scope="module")
def finished_runs(tmp_path_factory) -> dict[tuple[str, int], Path]:
    """Runs that left checkpoints, made once per kind on one and on two ranks: a
    minimize run (stopped at maxiter, exit 1) and a stochastic one (finished, exit 0;
    run again it reads its checkpoint's manifest and its metrics file)."""
    runs = {}
    for kind, (text, code, _, _) in KINDS.items():
        if kind == "torch" and importlib.util.find_spec("torch") is None:
            continue
        for ranks in (1, 2):
            if ranks > 1 and MPIEXEC is None:
                continue
            base = tmp_path_factory.mktemp(f"{kind}{ranks}")
            (base / "job.toml").write_text(text)
            out, _ = hpcqn_run(base / "job.toml", base / "run" / "summary.json", ranks, 120)
            assert out.returncode == code, out.stderr
            runs[kind, ranks] = base
    return runs


def fifo(path: Path) -> None:
    path.unlink()
    os.mkfifo(path)


KIND = {"name": "minimize"}  # the kind of run being tampered with


def checkpoints(run: Path) -> Path:
    return run / KINDS[KIND["name"]][2]


def step_dir(run: Path) -> Path:
    return ck.latest(checkpoints(run))


def wrong_shape(run: Path) -> None:
    """The checkpoint saved again, valid in every way the loader checks, with x (a
    weight of the model) of another shape: a checkpoint of another problem size or
    model put in its place."""
    import hpcqn

    saved = ck.load(checkpoints(run), hpcqn.serial_comm(), path=step_dir(run))
    manifest = ck.read_manifest(checkpoints(run))
    directory = checkpoints(run)
    *parents, name = KINDS[KIND["name"]][3]
    for r, state in enumerate(saved.states):
        node = state
        for key in parents:
            node = node[key]
        node[name] = (np.zeros(7) if isinstance(node[name], np.ndarray)
                      else node[name].new_zeros(7))
        ck.write_state(step_dir(run) / ck.rank_file(r), state, rank=r,
                       nranks=saved.nranks, step=saved.step)
    data = json.loads((step_dir(run) / ck.MANIFEST).read_text())
    for r, entry in enumerate(data["files"]):
        content = (step_dir(run) / ck.rank_file(r)).read_bytes()
        entry["bytes"] = len(content)
        entry["sha256"] = __import__("hashlib").sha256(content).hexdigest()
    (step_dir(run) / ck.MANIFEST).write_text(json.dumps(data))
    assert manifest is not None and ck.read_manifest(directory).step == manifest.step


def symlinked_step(run: Path) -> None:
    where = step_dir(run)
    shutil.copytree(where, run / "elsewhere")
    shutil.rmtree(where)
    where.symlink_to(run / "elsewhere")


TAMPERING = {
    "FIFO manifest": (lambda run: fifo(step_dir(run) / ck.MANIFEST), "is a FIFO"),
    "symlinked step directory": (symlinked_step, "which is a symlink"),
    "missing step directory": (lambda run: shutil.rmtree(step_dir(run)), "cannot be read"),
    "manifest a JSON list": (lambda run: (step_dir(run) / ck.MANIFEST).write_text("[1, 2]"),
                             "must be an object"),
    "FIFO latest": (lambda run: fifo(checkpoints(run) / ck.LATEST), "is a FIFO"),
    "state of the wrong shape": (wrong_shape, "of shape (7,) and dtype float64, this run has "
                                              "a"),
    "FIFO lock": (lambda run: os.mkfifo(run / "lock"), "lock is a FIFO"),
    "FIFO job.toml": (lambda run: fifo(run / "job.toml"), "job.toml is a FIFO"),
    "FIFO metrics": (lambda run: fifo(run / "mlbfgs.jsonl"), "mlbfgs.jsonl is a FIFO"),
    "metrics not JSON": (lambda run: (run / "mlbfgs.jsonl").write_text("[[[\n"),
                         "line 1 is not a JSON object"),
}
# What is tried on each kind (a torch job reads its run directory as a stochastic one).
CASES = {"minimize": [c for c in TAMPERING if "metrics" not in c], "stochastic": list(TAMPERING),
         "torch": ["state of the wrong shape", "FIFO manifest", "manifest a JSON list"]}


@pytest.mark.timeout(300)
@pytest.mark.parametrize("ranks", RANKS)
@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("case", list(TAMPERING))
def test_a_damaged_run_directory_is_one_line_and_exit_2(tmp_path, finished_runs, case, kind,
                                                        ranks):
    if case not in CASES[kind]:
        pytest.skip(f"not tried on a {kind} job")
    if kind == "torch":
        pytest.importorskip("torch")
    KIND["name"] = kind
    base = tmp_path / "base"
    shutil.copytree(finished_runs[kind, ranks], base, symlinks=True)
    tamper, fragment = TAMPERING[case]
    tamper(base / "run")
    out, seconds = hpcqn_run(base / "job.toml", base / "run" / "summary.json", ranks)
    assert_one_line(out, seconds, f"{case} {kind} ranks={ranks}", fragment)
    assert not (base / "run" / "lock").exists() or case == "FIFO lock"


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


JOBS = {
    "FIFO job file": (lambda d: (os.mkfifo(d / "job.toml"), d / "job.toml")[1], "is a FIFO"),
    "/dev/zero": (lambda d: Path("/dev/zero"), "/dev/zero is a character device"),
    "history 2**63-1": (lambda d: write(d / "job.toml", MINIMIZE.replace(
        "[options]\n", f"[options]\nhistory = {2**63 - 1}\n")), "history = 9223372036854775807"),
    "n = 1e11": (lambda d: write(d / "job.toml", MINIMIZE.replace("n = 200", "n = 100000000000")),
                 "n = 100000000000"),
    "5000-deep array": (lambda d: write(d / "job.toml", MINIMIZE + "x = " + "[" * 5000
                                        + "]" * 5000 + "\n"), "more than 8 levels deep"),
    "mL-BFGS history 2**40": (lambda d: write(d / "job.toml", (
        '[job]\nkind = "stochastic"\n[problem]\nname = "digits_softmax"\n'
        f'[methods.mlbfgs]\nhistory = {2**40}\n')), "[methods.mlbfgs] history"),
    "model hidden 10**7": (lambda d: write(d / "job.toml", (
        '[job]\nkind = "torch"\n[model]\nname = "mlp"\nhidden = 10000000\n'
        '[methods.sgd]\nlr = 0.1\n')), "hidden = 10000000"),
    "model hidden 2**62": (lambda d: write(d / "job.toml", (
        '[job]\nkind = "torch"\n[model]\nname = "mlp"\nhidden = 4611686018427387904\n'
        '[methods.sgd]\nlr = 0.1\n')), "cannot be built"),
}


@pytest.mark.timeout(300)
@pytest.mark.parametrize("ranks", RANKS)
@pytest.mark.parametrize("case", list(JOBS))
def test_a_job_file_that_cannot_run_is_one_line_and_exit_2(tmp_path, case, ranks):
    make, fragment = JOBS[case]
    job = make(tmp_path)
    out, seconds = hpcqn_run(job, tmp_path / "run" / "summary.json", ranks)
    assert_one_line(out, seconds, f"{case} ranks={ranks}", fragment)
    assert not (tmp_path / "run").exists()  # refused before the run directory is made


def test_memory_estimate_is_a_floor_of_what_is_allocated():
    """memory_needed against the arrays a minimize job really allocates: the history's
    vectors and Gram matrix (measured on a built solver) and the problem's vectors."""
    import hpcqn
    from hpcqn.experiments.jobs import PROBLEM_VECTORS, memory_needed, validate

    config = validate({"job": {"kind": "minimize"},
                       "problem": {"name": "extended_rosenbrock", "n": 10000},
                       "options": {"history": 7}}, "job.toml")
    need, keys = memory_needed(config, 1)
    assert keys == "[problem] n = 10000, [options] history = 7"
    problem = hpcqn.experiments.problems.make_problem("extended_rosenbrock", n=10000)
    result = hpcqn.minimize(*problem.distributed(hpcqn.serial_comm()),
                            options={"history": 7, "maxiter": 3})
    history = result.x.nbytes * 2 * 8  # 2 (history + 1) vectors of x's length
    assert need >= history + PROBLEM_VECTORS * result.x.nbytes
    assert need <= 4 * (history + PROBLEM_VECTORS * result.x.nbytes)  # and not far above
