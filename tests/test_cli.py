"""The command line, run as users run it: real processes, real mpiexec, with timeouts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from procs import ENV, MPIEXEC, ROOT, hpcqn

needs_mpiexec = pytest.mark.skipif(MPIEXEC is None, reason="mpiexec not on PATH")




def small_job(tmp_path: Path, n: int = 2000, extra: str = "") -> Path:
    job = tmp_path / "small.toml"
    job.write_text(
        f'[job]\nkind = "minimize"\n[problem]\nname = "extended_rosenbrock"\nn = {n}\n'
        f'[options]\ngtol = 1e-7\ndisp = 10\n{extra}'
    )
    return job


def test_info():
    out = hpcqn("info")
    assert out.returncode == 0, out.stderr
    for label in ("MPI", "ranks", "CUDA-aware MPI", "devices"):
        assert label in out.stdout


@needs_mpiexec
def test_info_under_mpiexec_reports_rank_count():
    out = hpcqn("info", ranks=2)
    assert out.returncode == 0, out.stderr
    assert "ranks     2" in out.stdout and out.stdout.count("hpcqn ") == 1  # rank 0 only


def test_run_serial_writes_summary(tmp_path):
    summary_path = tmp_path / "summary.json"
    out = hpcqn("run", str(small_job(tmp_path)), "--output", str(summary_path))
    assert out.returncode == 0, out.stderr
    assert "iter     10" in out.stdout and "hpcqn run: done: CONVERGENCE" in out.stdout
    summary = json.loads(summary_path.read_text())
    assert summary["status"] == 0 and summary["error_inf"] < 1e-6 and summary["ranks"] == 1


@needs_mpiexec
def test_run_two_ranks_matches_one(tmp_path):
    paths = []
    for ranks in (1, 2):
        # a run directory each: a finished minimize run keeps its end, which resumes on
        # its own rank count only
        path = tmp_path / f"ranks{ranks}" / "summary.json"
        out = hpcqn("run", str(small_job(tmp_path)), "--output", str(path), ranks=ranks)
        assert out.returncode == 0, out.stderr
        assert out.stdout.count("hpcqn run: done") == 1  # only rank 0 prints
        paths.append(json.loads(path.read_text()))
    one, two = paths
    assert two["ranks"] == 2 and two["nit"] == one["nit"]
    assert two["fun"] == pytest.approx(one["fun"], rel=1e-6, abs=1e-14)


def test_shipped_job_files_are_valid():
    from hpcqn.experiments.jobs import load_job

    config = load_job(ROOT / "jobs" / "rosenbrock.toml")
    assert config["problem"]["name"] == "extended_rosenbrock" and config["problem"]["n"] >= 1e5
    for name in ("logreg_mlbfgs", "digits_mlp", "digits_cnn"):
        config = load_job(ROOT / "jobs" / f"{name}.toml")
        assert set(config["methods"]) == {"mlbfgs", "sgd", "adam"}
    for name in ("digits_mkor", "digits_autoencoder"):
        config = load_job(ROOT / "jobs" / f"{name}.toml")
        assert set(config["methods"]) == {"mkor", "mkor_h", "kfac", "sgd", "adam"}


@needs_mpiexec
def test_stochastic_job_under_mpiexec(tmp_path):
    """The shipped comparison job, shortened to 3 epochs, on two ranks."""
    text = (ROOT / "jobs" / "logreg_mlbfgs.toml").read_text().replace("epochs = 20", "epochs = 3")
    job = tmp_path / "short.toml"
    job.write_text(text)
    summary_path = tmp_path / "summary.json"
    out = hpcqn("run", str(job), "--output", str(summary_path), ranks=2)
    assert out.returncode == 0, out.stderr
    summary = json.loads(summary_path.read_text())
    assert summary["ranks"] == 2
    for method in ("mlbfgs", "sgd", "adam"):
        epochs = summary["methods"][method]["epochs"]
        assert len(epochs) == 3 and epochs[-1]["test_accuracy"] > 0.9
        assert epochs[-1]["train_loss"] < epochs[0]["train_loss"]
        assert out.stdout.count(f"{method:7s} epoch") == 3  # rank 0 only


@pytest.mark.parametrize(
    "content,message",
    [
        ("[job]\nkind = 'minimize'\n[problem]\nname = 'nope'\n", "unknown problem 'nope'"),
        ("[job]\nkind = 'train'\n[problem]\nname = 'logistic'\n", "kind must be one of"),
        ("[job]\nkind = 'minimize'\n[problem]\nname = 'logistic'\n[options]\nmaxcor = 3\n",
         "unknown option"),
        ("[job]\nkind = 'minimize'\n[problme]\n", "unknown section"),
        ("[job\n", "not valid TOML"),
        ("[job]\nkind = 'stochastic'\n[problem]\nname = 'digits_softmax'\n[train]\n"
         "device = 'cuda'\n[methods.sgd]\nlr = 0.1\n", "[train] device applies to torch jobs"),
    ],
)
def test_bad_job_files(tmp_path, content, message):
    job = tmp_path / "bad.toml"
    job.write_text(content)
    out = hpcqn("run", str(job))
    assert out.returncode == 2
    assert message in out.stderr


def test_missing_job_file(tmp_path):
    out = hpcqn("run", str(tmp_path / "absent.toml"))
    assert out.returncode == 2 and "does not exist" in out.stderr


@needs_mpiexec
def test_fun_failing_on_one_rank_ends_the_job(tmp_path):
    """A script whose callback raises on rank 1 only: the whole mpiexec job ends with an
    error within the timeout instead of hanging, rank 1 with its own error and rank 0 with
    RemoteRankError naming it. Each rank writes its exception (flushed) before it
    re-raises: the first rank to exit makes mpiexec kill the other, so a traceback that
    Python prints at exit can be cut off (seen once in CI for rank 0's)."""
    script = tmp_path / "failing.py"
    script.write_text(
        "import sys, numpy as np, hpcqn\n"
        "comm = hpcqn.get_comm()\n"
        "def fun(x):\n"
        "    if comm.rank == 1:\n"
        "        raise RuntimeError('mesh inverted on rank 1')\n"
        "    return float(x @ x), 2 * x\n"
        "try:\n"
        "    hpcqn.minimize(fun, np.ones(5), comm=comm)\n"
        "except Exception as exc:\n"
        "    print(f'{type(exc).__name__}: {exc}', file=sys.stderr, flush=True)\n"
        "    raise\n"
    )
    out = subprocess.run([MPIEXEC, "-n", "2", sys.executable, str(script)], capture_output=True,
                         text=True, timeout=60, env=ENV)
    assert out.returncode != 0
    assert "RuntimeError: mesh inverted on rank 1" in out.stderr
    assert "RemoteRankError: rank 1 failed: RuntimeError: mesh inverted on rank 1" in out.stderr


@needs_mpiexec
def test_torch_job_under_mpiexec_writes_metrics(tmp_path):
    pytest.importorskip("torch")
    text = (ROOT / "jobs" / "digits_cnn.toml").read_text().replace("epochs = 15", "epochs = 2")
    job = tmp_path / "short_cnn.toml"
    job.write_text(text)
    out = hpcqn("run", str(job), "--output", str(tmp_path / "run" / "summary.json"), ranks=2)
    assert out.returncode == 0, out.stderr
    for method in ("mlbfgs", "sgd", "adam"):
        lines = (tmp_path / "run" / f"{method}.jsonl").read_text().splitlines()
        records = [json.loads(line) for line in lines]
        assert [r["epoch"] for r in records] == [1, 2]
        assert records[-1]["test_accuracy"] > 0.5
        assert out.stdout.count(f"{method:7s} epoch") == 2  # rank 0 only
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["ranks"] == 2 and set(summary["methods"]) == {"mlbfgs", "sgd", "adam"}


@needs_mpiexec
def test_autoencoder_mkor_job_under_mpiexec(tmp_path):
    """The MKOR job on the autoencoder: a training-loss target, test loss per epoch, and
    MKOR-H's switch step in its metrics (a threshold that switches at once here)."""
    pytest.importorskip("torch")
    text = (ROOT / "jobs" / "digits_autoencoder.toml").read_text()
    text = text.replace("epochs = 20", "epochs = 3").replace("target_loss = 0.03",
                                                             "target_loss = 0.09")
    text = text.replace("hybrid_window = 40", "hybrid_window = 5").replace(
        "hybrid_threshold = 0.1", "hybrid_threshold = 10.0")
    job = tmp_path / "short_autoencoder.toml"
    job.write_text(text)
    out = hpcqn("run", str(job), "--output", str(tmp_path / "run" / "summary.json"), ranks=2)
    assert out.returncode == 0, out.stderr
    assert "MKOR-H: switched to the first-order optimizer after step 10" in out.stdout
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["target_metric"] == "train_loss"
    for method in ("mkor", "mkor_h", "kfac", "sgd", "adam"):
        records = [json.loads(line)
                   for line in (tmp_path / "run" / f"{method}.jsonl").read_text().splitlines()]
        assert [r["epoch"] for r in records] == [1, 2, 3]
        assert 0 < records[-1]["test_loss"] < 0.2
        assert summary["methods"][method]["epochs_to_target"] is not None
    assert records[-1]["train_loss"] < 0.09
    mkor_h = (tmp_path / "run" / "mkor_h.jsonl").read_text().splitlines()
    assert json.loads(mkor_h[-1])["switched_at_step"] == 10


def test_plot_draws_runs_and_refuses_empty_directories(tmp_path):
    pytest.importorskip("matplotlib")
    for name, loss in (("a", 1.0), ("b", 2.0)):
        run = tmp_path / name
        run.mkdir()
        for method in ("sgd", "mkor"):
            lines = [json.dumps({"epoch": e, "train_loss": loss / e, "seconds": 0.1 * e,
                                 "test_accuracy": 0.5 + 0.1 * e}) for e in (1, 2, 3)]
            (run / f"{method}.jsonl").write_text("\n".join(lines) + "\n")
    out = hpcqn("plot", str(tmp_path / "a"), str(tmp_path / "b"), "--output",
                str(tmp_path / "curves.png"))
    assert out.returncode == 0, out.stderr
    png = (tmp_path / "curves.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    (tmp_path / "empty").mkdir()
    out = hpcqn("plot", str(tmp_path / "empty"), "--output", str(tmp_path / "x.png"))
    assert out.returncode == 2 and "no metrics files" in out.stderr


@needs_mpiexec
def test_minimize_job_checkpoints_and_resumes(tmp_path):
    """checkpoint_every in [options]: a run leaves checkpoints; a second run resumes from
    the latest and ends where an uninterrupted one does."""
    job = small_job(tmp_path, extra="checkpoint_every = 5\n")
    first = hpcqn("run", str(job), "--output", str(tmp_path / "run" / "s.json"), ranks=2)
    assert first.returncode == 0, first.stderr
    straight = json.loads((tmp_path / "run" / "s.json").read_text())
    checkpoints = sorted((tmp_path / "run" / "checkpoints").glob("ckpt-*"))
    assert checkpoints and (tmp_path / "run" / "checkpoints" / "latest").exists()
    again = hpcqn("run", str(job), "--output", str(tmp_path / "run" / "s.json"), ranks=2)
    assert again.returncode == 0, again.stderr
    resumed = json.loads((tmp_path / "run" / "s.json").read_text())
    assert (resumed["nit"], resumed["fun"]) == (straight["nit"], straight["fun"])
    fresh = hpcqn("run", str(job), "--fresh", "--output", str(tmp_path / "run" / "s.json"),
                  ranks=2)
    assert fresh.returncode == 0 and json.loads(
        (tmp_path / "run" / "s.json").read_text())["nit"] == straight["nit"]


@needs_mpiexec
def test_stochastic_job_resumes_with_its_records(tmp_path):
    """A finished stochastic job run again resumes from its last checkpoint and reports
    the same per-epoch records (kept in the metrics files)."""
    text = (ROOT / "jobs" / "logreg_mlbfgs.toml").read_text().replace("epochs = 20",
                                                                       "epochs = 2")
    job = tmp_path / "short.toml"
    job.write_text(text)
    output = str(tmp_path / "run" / "summary.json")
    first = hpcqn("run", str(job), "--output", output, ranks=2)
    assert first.returncode == 0, first.stderr
    before = json.loads(Path(output).read_text())
    for method in before["methods"]:
        assert (tmp_path / "run" / "checkpoints" / method / "latest").exists()
    again = hpcqn("run", str(job), "--output", output, ranks=2)
    assert again.returncode == 0, again.stderr
    after = json.loads(Path(output).read_text())
    for method, record in before["methods"].items():
        assert after["methods"][method]["epochs"] == record["epochs"]


def test_exit_codes_are_distinct_and_documented():
    from hpcqn import cli
    from hpcqn.signals import EXIT_PREEMPTED

    codes = [cli.EXIT_OK, cli.EXIT_NOT_CONVERGED, cli.EXIT_BAD_INPUT, EXIT_PREEMPTED]
    assert codes == [0, 1, 2, 3]
    for code in codes:
        assert f"- {code} (" in cli.__doc__


def test_run_that_does_not_converge_exits_1(tmp_path):
    out = hpcqn("run", str(small_job(tmp_path, extra="maxiter = 2\n")), "--output",
                str(tmp_path / "run" / "summary.json"))
    assert out.returncode == 1, out.stderr
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["status"] != 0
    assert not (tmp_path / "run" / "lock").exists()


@needs_mpiexec
def test_locked_run_directory_is_refused_on_every_rank(tmp_path):
    """A run directory in use: one line from rank 0, exit 2, on two ranks (rank 0 decides
    and tells the others, so none hangs)."""
    import socket

    (tmp_path / "run").mkdir()
    lock = tmp_path / "run" / "lock"
    lock.write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid()}))
    out = hpcqn("run", str(small_job(tmp_path)), "--output", str(tmp_path / "run" / "s.json"),
                ranks=2)
    assert out.returncode == 2 and out.stdout == ""
    assert len(out.stderr.splitlines()) == 1 and str(lock) in out.stderr
    assert lock.exists() and not (tmp_path / "run" / "s.json").exists()
