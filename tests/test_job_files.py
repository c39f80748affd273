"""Job files are checked entirely before any work: bad ones (in-process for most, as real
``hpcqn run`` processes for a subset) end with exit code 2, one line on stderr naming the
key, nothing trained and nothing written; a fuzz of the loader; run-directory locks;
resumes refused for a changed job file; a finished job reported as complete."""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from procs import ENV, MPIEXEC, ROOT, hpcqn

from hpcqn.cli import run_command
from hpcqn.comm import serial_comm
from hpcqn.experiments.jobs import (
    JOB_KINDS,
    SECTIONS,
    JobError,
    differences,
    load_job,
    run_job,
    schema,
)

MINIMIZE = ('[job]\nkind = "minimize"\n[problem]\nname = "extended_rosenbrock"\nn = 20\n'
            '[options]\ngtol = 1e-6\n')
STOCHASTIC = ('[job]\nkind = "stochastic"\n[problem]\nname = "digits_softmax"\n[train]\n'
              'epochs = 1\nbatch_size = 60\n[methods.sgd]\nlr = 0.3\nmomentum = 0.9\n')
TORCH = ('[job]\nkind = "torch"\n[model]\nname = "mlp"\nhidden = 8\n[train]\nepochs = 1\n'
         'batch_size = 64\n[methods.sgd]\nlr = 0.3\nmomentum = 0.9\n[methods.adam]\n'
         'lr = 0.01\n')


def edit(base: str, old: str, new: str) -> str:
    assert old in base, old
    return base.replace(old, new, 1)


# (id, job file text, fragments the one error line must contain)
BAD = [
    ("epochs-float", edit(TORCH, "epochs = 1", "epochs = 2.7"), ["[train]", "epochs"]),
    ("epochs-bool", edit(TORCH, "epochs = 1", "epochs = true"), ["[train]", "epochs"]),
    ("epochs-string", edit(STOCHASTIC, "epochs = 1", 'epochs = "ten"'), ["[train]", "epochs"]),
    ("epochs-zero", edit(TORCH, "epochs = 1", "epochs = 0"), ["[train]", "epochs", ">= 1"]),
    ("epochs-negative", edit(STOCHASTIC, "epochs = 1", "epochs = -1"), ["[train]", "epochs"]),
    ("hidden-negative", edit(TORCH, "hidden = 8", "hidden = -3"), ["[model]", "hidden"]),
    ("batch-zero", edit(STOCHASTIC, "batch_size = 60", "batch_size = 0"),
     ["[train]", "batch_size"]),
    ("batch-too-large", edit(STOCHASTIC, "batch_size = 60", "batch_size = 100000"),
     ["[train]", "batch_size"]),
    ("lr-inf", edit(STOCHASTIC, "lr = 0.3", "lr = inf"), ["[methods.sgd]", "lr"]),
    ("lr-string", edit(TORCH, "lr = 0.3", 'lr = "fast"'), ["[methods.sgd]", "lr"]),
    ("checkpoint-every-negative", edit(TORCH, "epochs = 1", "epochs = 1\ncheckpoint_every = -4"),
     ["[train]", "checkpoint_every"]),
    ("schedule-bogus", edit(STOCHASTIC, "epochs = 1", 'epochs = 1\nlr_schedule = "bogus"'),
     ["[train]", "lr_schedule", "cosine"]),
    ("schedule-warmup-torch",
     edit(TORCH, "epochs = 1", 'epochs = 1\nlr_schedule = "linear-warmup"'),
     ["[train]", "lr_schedule", "cosine"]),
    ("train-dtype", edit(TORCH, "epochs = 1", 'epochs = 1\ndtype = "int8"'),
     ["[train]", "dtype", "float32"]),
    ("problem-dtype", edit(MINIMIZE, "n = 20", 'n = 20\ndtype = "int8"'),
     ["[problem]", "dtype", "float64"]),
    ("model-unknown", edit(TORCH, 'name = "mlp"', 'name = "resnet"'), ["[model]", "name"]),
    ("model-key-typo", edit(TORCH, "hidden = 8", "hiden = 64"), ["[model]", "hiden"]),
    ("method-unknown", edit(STOCHASTIC, "[methods.sgd]", "[methods.lbfgs]"),
     ["[methods.lbfgs]", "unknown method"]),
    ("method-unknown-torch", edit(TORCH, "[methods.adam]", "[methods.rmsprop]"),
     ["[methods.rmsprop]", "unknown method"]),
    ("second-method-torch", edit(TORCH, "lr = 0.01", "lr = 0.01\nbetas = [0.9]"),
     ["[methods.adam]", "betas"]),
    ("method-key-typo", edit(STOCHASTIC, "momentum = 0.9", "momentun = 0.9"),
     ["[methods.sgd]", "momentun"]),
    ("method-subtable", STOCHASTIC + "[methods.sgd.extra]\nx = 1\n",
     ["[methods.sgd]", "extra"]),
    ("nesterov-without-momentum", edit(STOCHASTIC, "momentum = 0.9", "momentum = 0.0\n"
                                       "nesterov = true"), ["nesterov"]),
    ("mlbfgs-history-zero", STOCHASTIC + "[methods.mlbfgs]\nhistory = 0\n",
     ["[methods.mlbfgs]", "history"]),
    ("no-methods", STOCHASTIC[:STOCHASTIC.index("[methods.sgd]")], ["[methods.NAME]"]),
    ("problem-unknown", edit(MINIMIZE, "extended_rosenbrock", "nope"),
     ["[problem]", "unknown problem 'nope'"]),
    ("problem-kind-mismatch", edit(STOCHASTIC, "digits_softmax", "extended_rosenbrock"),
     ["[problem]", "unknown problem"]),
    ("problem-no-name", edit(MINIMIZE, 'name = "extended_rosenbrock"\n', ""),
     ["[problem]", "name"]),
    ("problem-n-odd", edit(MINIMIZE, "n = 20", "n = 7"), ["[problem]", "n", "divisible"]),
    ("problem-n-missing", edit(MINIMIZE, "n = 20\n", ""), ["[problem]", "n"]),
    ("problem-n-float", edit(MINIMIZE, "n = 20", "n = 20.0"), ["[problem]", "n"]),
    ("problem-key-typo", edit(MINIMIZE, "n = 20", "n = 20\nsize = 3"), ["[problem]", "size"]),
    ("problem-l2-negative", edit(STOCHASTIC, 'name = "digits_softmax"',
                                 'name = "digits_softmax"\nl2 = -1.0'), ["[problem]", "l2"]),
    ("quadratic-cond", edit(edit(MINIMIZE, "extended_rosenbrock", "quadratic"), "n = 20",
                            "n = 20\ncond = 0.5"), ["[problem]", "cond"]),
    ("options-unknown", edit(MINIMIZE, "gtol = 1e-6", "maxcor = 3"),
     ["[options]", "unknown option", "maxcor"]),
    ("options-history-float", edit(MINIMIZE, "gtol = 1e-6", "history = 2.5"),
     ["[options]", "history"]),
    ("options-linesearch", edit(MINIMIZE, "gtol = 1e-6", 'linesearch = "backtracking"'),
     ["[options]", "linesearch"]),
    ("options-disp-bool", edit(MINIMIZE, "gtol = 1e-6", "disp = true"), ["[options]", "disp"]),
    ("options-checkpoint-every", edit(MINIMIZE, "gtol = 1e-6", "checkpoint_every = -4"),
     ["[options]", "checkpoint_every"]),
    ("train-in-minimize", MINIMIZE + "[train]\nepochs = 3\n", ["[train]", "minimize"]),
    ("unknown-section", edit(MINIMIZE, "[problem]", "[problme]"), ["unknown section", "problme"]),
    ("top-level-key", "epochs = 3\n" + TORCH, ["epochs"]),
    ("kind-bad", edit(MINIMIZE, '"minimize"', '"train"'), ["[job]", "kind must be one of"]),
    ("kind-missing", edit(MINIMIZE, 'kind = "minimize"\n', ""), ["[job]", "kind"]),
    ("job-key-typo", edit(MINIMIZE, "[job]\n", "[job]\nnmae = 'x'\n"), ["[job]", "nmae"]),
    ("job-name-path", edit(MINIMIZE, "[job]\n", "[job]\nname = '../elsewhere'\n"),
     ["[job]", "name"]),
    ("device-stochastic", edit(STOCHASTIC, "epochs = 1", 'epochs = 1\ndevice = "cuda"'),
     ["[train] device applies to torch jobs"]),
    ("device-torch", edit(TORCH, "epochs = 1", 'epochs = 1\ndevice = "tpu"'),
     ["[train]", "device"]),
    ("target-accuracy", edit(TORCH, "epochs = 1", "epochs = 1\ntarget_accuracy = 1.5"),
     ["[train]", "target_accuracy"]),
    ("seed-negative", edit(TORCH, "epochs = 1", "epochs = 1\nseed = -1"), ["[train]", "seed"]),
    ("methods-not-table", edit(MINIMIZE, "[job]", "methods = 3\n[job]"), ["[methods]"]),
    ("invalid-toml", "[job\nkind = 'minimize'\n", ["not valid TOML"]),
]
# Files that are bad before their text is read.
NON_UTF8 = b'[job]\nkind = "minimize"\ndescription = "caf\xe9"\n'


def write(tmp_path: Path, name: str, text: str) -> Path:
    job = tmp_path / f"{name}.toml"
    job.write_text(text)
    return job


@pytest.mark.parametrize("name,text,fragments", BAD, ids=[b[0] for b in BAD])
def test_bad_job_file_in_process(tmp_path, capsys, name, text, fragments):
    """Checked before any work: a JobError naming the file and the key, and no run
    directory (the in-process run goes through the same checks as ``hpcqn run``)."""
    job = write(tmp_path, name, text)
    with pytest.raises(JobError) as info:
        run_job(job, comm=serial_comm(), output=tmp_path / "run" / "summary.json")
    message = str(info.value)
    assert str(job) in message and "\n" not in message
    for fragment in fragments:
        assert fragment in message, message
    assert not (tmp_path / "run").exists()
    # The command line's own path, in this process: exit 2, one line naming the key.
    capsys.readouterr()
    assert run_command(str(job), str(tmp_path / "run" / "summary.json")) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1, captured
    assert captured.err.startswith("hpcqn run: error: ") and all(
        fragment in captured.err for fragment in fragments), captured.err
    assert not (tmp_path / "run").exists()


def test_unreadable_files_in_process(tmp_path):
    (tmp_path / "latin1.toml").write_bytes(NON_UTF8)
    with pytest.raises(JobError, match="not UTF-8"):
        load_job(tmp_path / "latin1.toml")
    with pytest.raises(JobError, match="is a directory"):
        load_job(tmp_path)
    with pytest.raises(JobError, match="does not exist"):
        load_job(tmp_path / "absent.toml")


def test_shipped_job_files_pass_and_fill_defaults():
    for job in sorted((ROOT / "jobs").glob("*.toml")):
        config = load_job(job)
        assert config["job"]["name"] == job.stem
        if config["job"]["kind"] != "minimize":
            assert config["train"]["epochs"] >= 1 and config["train"]["checkpoint_every"] == 0
    assert load_job(ROOT / "jobs" / "digits_cnn.toml")["model"]["hidden"] == 128


def test_schema_comes_from_the_declarations():
    from hpcqn.optimizers import registry

    config = {"job": {"kind": "stochastic"}, "problem": {"name": "digits_softmax"},
              "methods": {"mlbfgs": {}, "adam": {}}}
    sections = schema(config)
    assert set(sections) == {"job", "problem", "train", "methods.mlbfgs", "methods.adam"}
    assert set(sections["methods.mlbfgs"]) == set(registry.options_of("mlbfgs"))
    assert {"l2", "seed", "dtype"} <= set(sections["problem"])


def test_differences_are_flat_keys():
    old = {"train": {"epochs": 2, "device": "cpu"}, "methods": {"sgd": {"lr": 0.1}}}
    new = {"train": {"epochs": 2, "device": "cuda"}, "methods": {"sgd": {"lr": 0.2},
                                                                   "adam": {"lr": 1}}}
    assert differences(old, new) == ["methods.adam.lr", "methods.sgd.lr"]


# -- real processes ------------------------------------------------------------------------


def assert_refused(out: subprocess.CompletedProcess, fragments: list[str]) -> str:
    """Exit 2, one line on stderr holding ``fragments``, nothing on stdout (nothing
    trained). Returns the line."""
    assert out.returncode == 2, (out.returncode, out.stdout, out.stderr)
    lines = out.stderr.splitlines()
    assert len(lines) == 1, out.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    assert "epoch" not in out.stdout and out.stdout == "", out.stdout
    return lines[0]


# (tests/test_cli.py runs more: invalid TOML, unknown problem, kind, section, option)
SUBPROCESS = ["epochs-float", "second-method-torch", "model-key-typo", "lr-inf"]


@pytest.mark.parametrize("name", SUBPROCESS)
def test_bad_job_file_as_hpcqn_run(tmp_path, name):
    _, text, fragments = next(b for b in BAD if b[0] == name)
    job = write(tmp_path, name, text)
    out = hpcqn("run", str(job), "--output", str(tmp_path / "run" / "summary.json"))
    assert_refused(out, [str(job), *fragments])
    assert not (tmp_path / "run").exists()
    assert not (ROOT / "runs" / name).exists()


@pytest.mark.parametrize("what", ["non-utf8", "directory", "missing"])
def test_unreadable_job_file_as_hpcqn_run(tmp_path, what):
    job = {"non-utf8": tmp_path / "latin1.toml", "directory": tmp_path,
           "missing": tmp_path / "absent.toml"}[what]
    if what == "non-utf8":
        job.write_bytes(NON_UTF8)
    out = hpcqn("run", str(job), "--output", str(tmp_path / "run" / "summary.json"))
    assert_refused(out, [str(job), {"non-utf8": "not UTF-8", "directory": "is a directory",
                                    "missing": "does not exist"}[what]])
    assert not (tmp_path / "run").exists()


@pytest.mark.skipif(MPIEXEC is None, reason="mpiexec not on PATH")
def test_bad_job_file_on_two_ranks_prints_once(tmp_path):
    """An error only an optimizer's constructor sees (nesterov without momentum), found
    on both ranks before any training: one line (rank 0's), exit 2."""
    _, text, fragments = next(b for b in BAD if b[0] == "nesterov-without-momentum")
    job = write(tmp_path, "nesterov", text)
    out = hpcqn("run", str(job), "--output", str(tmp_path / "run" / "summary.json"), ranks=2)
    assert_refused(out, [str(job), "[methods.sgd]", *fragments])
    assert not (tmp_path / "run").exists()


def tiny_job(tmp_path: Path, lr: float = 0.3) -> Path:
    text = edit(STOCHASTIC, "epochs = 1", "epochs = 2").replace("lr = 0.3", f"lr = {lr}")
    return write(tmp_path, "tiny", text)


def test_live_lock_refuses_and_stale_lock_is_taken_over(tmp_path):
    job = tiny_job(tmp_path)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    lock = run_dir / "lock"
    held = json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "slurm_job_id": None})
    lock.write_text(held)
    out = hpcqn("run", str(job), "--output", str(run_dir / "summary.json"))
    line = assert_refused(out, [str(lock), f"pid {os.getpid()}", "in use"])
    assert "remove" in line
    assert lock.read_text() == held and sorted(p.name for p in run_dir.iterdir()) == ["lock"]
    dead = subprocess.Popen(["true"])
    dead.wait()  # reaped: its pid is no longer alive
    lock.write_text(json.dumps({"host": socket.gethostname(), "pid": dead.pid}))
    out = hpcqn("run", str(job), "--output", str(run_dir / "summary.json"))
    assert out.returncode == 0, out.stderr
    assert "stale lock" in out.stderr and str(lock) in out.stderr
    assert not lock.exists() and (run_dir / "summary.json").exists()


def test_changed_job_is_refused_and_finished_job_is_complete(tmp_path):
    job = tiny_job(tmp_path)
    run_dir = tmp_path / "run"
    output = str(run_dir / "summary.json")
    first = hpcqn("run", str(job), "--output", output)
    assert first.returncode == 0, first.stderr
    assert first.stdout.count("sgd     epoch") == 2
    saved = (run_dir / "job.toml").read_text()
    assert saved == job.read_text() and not (run_dir / "lock").exists()
    summary = json.loads(Path(output).read_text())

    changed = tiny_job(tmp_path, lr=0.2)
    out = hpcqn("run", str(changed), "--output", output)
    assert_refused(out, ["methods.sgd.lr", "--fresh"])
    assert (run_dir / "job.toml").read_text() == saved and not (run_dir / "lock").exists()

    job = tiny_job(tmp_path)
    again = hpcqn("run", str(job), "--output", output)
    assert again.returncode == 0, again.stderr
    assert "is complete" in again.stdout and "epoch   " not in again.stdout
    assert json.loads(Path(output).read_text())["methods"]["sgd"]["epochs"] == \
        summary["methods"]["sgd"]["epochs"]

    changed = tiny_job(tmp_path, lr=0.2)
    fresh = hpcqn("run", str(changed), "--output", output, "--fresh")
    assert fresh.returncode == 0, fresh.stderr
    assert fresh.stdout.count("sgd     epoch") == 2 and "lr = 0.2" in (
        run_dir / "job.toml").read_text()


# -- fuzz ----------------------------------------------------------------------------------
def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    return "[" + ", ".join(_toml_value(v) for v in value) + "]"  # a list


def _universe() -> dict[str, dict[str, list[str]]]:
    """Per job kind: each section's keys, from the schema of a job that names every
    method (stochastic, torch) and a problem."""
    from hpcqn.optimizers import registry

    out: dict[str, dict[str, list[str]]] = {}
    bases = {
        "minimize": {"job": {"kind": "minimize"}, "problem": {"name": "quadratic"}},
        "stochastic": {"job": {"kind": "stochastic"}, "problem": {"name": "digits_softmax"},
                       "methods": {m: {} for m in registry.METHODS}},
    }
    try:
        from hpcqn.torch import methods

        bases["torch"] = {"job": {"kind": "torch"}, "methods": {m: {} for m in methods.METHODS}}
    except ImportError:
        pass
    for kind, base in bases.items():
        out[kind] = {section: list(spec) for section, spec in schema(base).items()}
    return out


def test_fuzz_loader_accepts_or_raises_job_error(tmp_path):
    hypothesis = pytest.importorskip("hypothesis")
    st = hypothesis.strategies
    universe = _universe()
    words = sorted({c for kinds in universe.values() for spec in kinds.values() for c in spec}
                   | {"mlp", "cnn", "cosine", "constant", "float32", "float64", "cpu",
                      "digits_softmax", "quadratic", "extended_rosenbrock", *JOB_KINDS})
    scalar = st.one_of(st.integers(-2**63, 2**63 - 1), st.integers(-3, 130), st.floats(),
                       st.booleans(), st.text(max_size=6), st.sampled_from(words))
    value = st.one_of(scalar, st.lists(st.one_of(st.floats(-1, 2), st.integers(-1, 3)),
                                       max_size=3))

    @st.composite
    def document(draw: st.DrawFn) -> str:
        kind = draw(st.sampled_from([*universe, "bogus"]))
        sections = universe.get(kind, universe["minimize"])
        lines = [f"[job]\nkind = {json.dumps(kind)}"]
        names = [s for s in sections if s != "job"] + ["job", "methods.bogus", "extra"]
        for section in draw(st.lists(st.sampled_from(names), unique=True, max_size=6)):
            keys = sections.get(section, []) + ["name", "bogus_key"]
            table = draw(st.dictionaries(st.sampled_from(keys), value, max_size=5))
            if section == "job":
                table.pop("kind", None)
                lines[0] += "".join(f"\n{k} = {_toml_value(v)}" for k, v in table.items())
                continue
            lines.append(f"[{section}]")
            lines += [f"{k} = {_toml_value(v)}" for k, v in table.items()]
        return "\n".join(lines) + "\n"

    job = tmp_path / "fuzz.toml"

    @hypothesis.settings(max_examples=200, deadline=None, database=None,
                         suppress_health_check=list(hypothesis.HealthCheck))
    @hypothesis.given(document())
    def check(text: str) -> None:
        job.write_text(text)
        try:
            config = load_job(job)
        except JobError as exc:
            assert str(job) in str(exc)
            return
        assert config["job"]["kind"] in JOB_KINDS
        assert set(config) <= set(SECTIONS[config["job"]["kind"]])

    check()


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("schedule", ["constant", "cosine"])
def test_raising_epochs_continues_a_finished_torch_job(tmp_path, schedule):
    """A finished job run again with more epochs continues from its last checkpoint: with a
    constant rate it ends where a job planned with the larger count ends, step for step;
    with a cosine schedule the added epochs follow the cosine of the new count. Lowering
    the count, or changing anything else, is still refused."""
    pytest.importorskip("torch")
    text = (ROOT / "jobs" / "digits_mlp.toml").read_text()
    text = text[: text.index("[methods.sgd]")].replace("hidden = 128", "hidden = 16")
    text = text.replace('lr_schedule = "cosine"', f'lr_schedule = "{schedule}"')

    def run(epochs, name, extra=""):
        job = tmp_path / f"{name}.toml"
        job.write_text(text.replace("epochs = 15", f"epochs = {epochs}") + extra)
        return subprocess.run([sys.executable, "-m", "hpcqn", "run", str(job), "--output",
                               str(tmp_path / name / "summary.json")], capture_output=True,
                              text=True, timeout=240, cwd=tmp_path, env=ENV)

    assert run(2, "short").returncode == 0
    longer = run(3, "short")  # the same run directory, one epoch more
    assert longer.returncode == 0, longer.stderr
    assert "resumed from" in longer.stdout
    records = [json.loads(line) for line in
               (tmp_path / "short" / "mlbfgs.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2, 3]
    planned = run(3, "planned")
    assert planned.returncode == 0
    reference = [json.loads(line) for line in
                 (tmp_path / "planned" / "mlbfgs.jsonl").read_text().splitlines()]
    if schedule == "constant":
        assert [r["train_loss"] for r in records] == [r["train_loss"] for r in reference]
    else:  # the first two epochs were planned for 2, the third follows the cosine of 3
        assert records[-1]["train_loss"] != reference[-1]["train_loss"]
    shorter = run(2, "short")
    assert shorter.returncode == 2 and "train.epochs 3 -> 2" in shorter.stderr, shorter.stderr
    text = text.replace("lr = 0.3", "lr = 0.2")  # another key changed: refused as before
    changed = run(4, "short")
    assert changed.returncode == 2 and "methods.mlbfgs.lr" in changed.stderr, changed.stderr


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_finished_minimize_job_says_so_and_a_larger_maxiter_continues_it(tmp_path):
    """A minimize job run again is not solved again: its last checkpoint is the run's end,
    the job says it is complete and shows that result. With a larger maxiter it continues
    from there and ends where a job planned with that maxiter ends."""
    text = (ROOT / "jobs" / "rosenbrock.toml").read_text().replace("n = 1000000", "n = 1000")

    def run(maxiter, name):
        job = tmp_path / f"{name}.toml"
        job.write_text(text.replace("maxiter = 2000", f"maxiter = {maxiter}"))
        out = subprocess.run([sys.executable, "-m", "hpcqn", "run", str(job), "--output",
                              str(tmp_path / name / "summary.json")], capture_output=True,
                             text=True, timeout=240, cwd=tmp_path, env=ENV)
        summary = json.loads((tmp_path / name / "summary.json").read_text())
        return out, summary

    first, stopped = run(20, "short")
    assert first.returncode == 1 and stopped["status"] == 1 and stopped["nit"] == 20
    again, shown = run(20, "short")
    assert again.returncode == 1 and "is complete" in again.stdout, again.stdout
    assert (shown["nit"], shown["nfev"], shown["fun"]) == (stopped["nit"], stopped["nfev"],
                                                          stopped["fun"])
    longer, continued = run(2000, "short")
    assert longer.returncode == 0 and "is complete" not in longer.stdout, longer.stderr
    _, planned = run(2000, "planned")
    assert (continued["nit"], continued["nfev"], continued["fun"]) == (
        planned["nit"], planned["nfev"], planned["fun"])
    final, shown = run(2000, "short")
    assert "is complete" in final.stdout and shown["fun"] == planned["fun"]
