"""Job files: TOML experiment definitions that ``hpcqn run`` executes.

Two kinds of job. ``kind = "minimize"`` names a problem and the solver options::

    [job]
    kind = "minimize"            # the distributed L-BFGS on a test problem
    [problem]
    name = "extended_rosenbrock" # see hpcqn.experiments.problems.PROBLEMS
    n = 200000
    dtype = "float64"
    [options]                    # hpcqn.minimize options
    history = 10
    disp = 25

``kind = "stochastic"`` trains a problem with minibatches, once per method, and
compares them (see ``jobs/logreg_mlbfgs.toml``)::

    [job]
    kind = "stochastic"
    [problem]
    name = "digits_softmax"      # multinomial logistic regression on scikit-learn's digits
    [train]
    epochs = 20
    batch_size = 60              # global batch, split across ranks
    lr_schedule = "cosine"
    target_gap = 0.01            # report steps to train loss <= optimum + target_gap
    [methods.mlbfgs]             # one table per method: hpcqn.minimize_stochastic options
    lr = 0.1
    [methods.sgd]
    lr = 0.3

``kind = "torch"`` trains a torch model on the digits once per method (``[model]``,
``[train]``, ``[methods.NAME]``; see ``jobs/digits_mlp.toml``).

A job file is checked entirely before any work starts and before anything is written:
every section and key, against a schema (:func:`schema`) made of the declarations the
code itself uses (:mod:`hpcqn.options`: the optimizers' and problems' ``OPTION_RULES``,
and the job's own sections below). Types are strict (``epochs = 2.7``, ``true`` or
``"ten"`` are errors), and so are ranges, choices and unknown keys. A bad file is a
:class:`JobError` naming the file and the key.

The run directory (next to ``--output``, default ``runs/<job name>/``) holds a copy of
the job file (``job.toml``), metrics and checkpoints. While a run uses it, it holds
``lock`` (the host, pid and Slurm job id of that run); a second run on it is refused,
a lock left by a run that died is taken over. A run that would resume checkpoints
saved for a different job file is refused (naming the keys that differ) unless
``--fresh``; a job whose methods all finished is reported as complete.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import socket
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .. import checkpoint
from .. import options as opt
from ..comm import Communicator, get_comm
from ..layout import BlockLayout
from ..minimize import minimize
from ..optimizers.lbfgs import LBFGSOptions
from ..options import Option, OptionError, Rule
from ..run import flatten
from ..signals import EXIT_PREEMPTED, Preempted
from ..stochastic import SCHEDULES, minimize_stochastic
from .problems import PROBLEMS, DigitsSoftmax, make_problem, parameters

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

JOB_KINDS = ("minimize", "stochastic", "torch")
STOCHASTIC_PROBLEMS = {"digits_softmax": DigitsSoftmax}
# What hpcqn.experiments.training.train supports besides its MODELS and DEVICES.
TORCH_SCHEDULES = ("constant", "cosine")
TORCH_DTYPES = ("float32", "float64")
LOCK = "lock"


class JobError(ValueError):
    """A job file that cannot run: says which file and which key."""


# -- the schema -------------------------------------------------------------------------
def _spec(*items: tuple[str, Any, Rule]) -> dict[str, Option]:
    return {name: Option(name, default, rule) for name, default, rule in items}


POSITIVE = Rule("int", low=1)
COUNT = Rule("int", low=0)
JOB = _spec(("kind", None, Rule("str", choices=JOB_KINDS)), ("name", None, Rule("str")),
            ("description", "", Rule("str")))
_COMMON_TRAIN = (("epochs", 10, POSITIVE), ("batch_size", 64, POSITIVE),
                 ("checkpoint_every", 0, COUNT))
STOCHASTIC_TRAIN = _spec(*_COMMON_TRAIN,
                         ("lr_schedule", "constant", Rule("str", choices=SCHEDULES)),
                         ("target_gap", 0.01, Rule("float", low=0.0)),
                         ("device", "cpu", Rule("str", choices=("cpu",))))


def _torch_sections() -> tuple[dict[str, Option], dict[str, Option]]:
    """``[train]`` and ``[model]`` of a torch job (the models and devices from
    :mod:`hpcqn.experiments.training`, which needs torch)."""
    from . import training

    train = _spec(*_COMMON_TRAIN,
                  ("lr_schedule", "constant", Rule("str", choices=TORCH_SCHEDULES)),
                  ("seed", 0, COUNT), ("dtype", "float32", Rule("str", choices=TORCH_DTYPES)),
                  ("target_accuracy", 0.95, Rule("float", low=0.0, high=1.0)),
                  ("target_loss", 0.02, Rule("float", low=0.0)),
                  ("device", "auto", Rule("str", choices=training.DEVICES)))
    model = _spec(("name", "mlp", Rule("str", choices=training.MODELS)),
                  ("hidden", 128, POSITIVE))
    return train, model
# [options] of a minimize job: hpcqn.minimize's own, plus how often to checkpoint.
MINIMIZE_EXTRA = _spec(("checkpoint_every", 0, COUNT))
SECTIONS = {"minimize": ("job", "problem", "options"),
            "stochastic": ("job", "problem", "train", "methods"),
            "torch": ("job", "model", "train", "methods")}
# Keys that may change between a run and its resumption (they do not enter the saved state).
RESUMABLE_CHANGES = ("job.name", "job.description", "train.device", "train.checkpoint_every",
                     "train.target_gap", "train.target_accuracy", "train.target_loss",
                     "options.checkpoint_every", "options.disp")


def _minimize_options() -> dict[str, Option]:
    return {**opt.declared(LBFGSOptions), **MINIMIZE_EXTRA}


@dataclass(frozen=True)
class Registry:
    """The methods of one kind of job: their names, their option declarations and how
    to build one (``make(method, target, comm, options, where)``)."""

    methods: tuple[str, ...]
    options_of: Callable[[str], Mapping[str, Option]]
    make: Callable[..., Any]


def block_methods() -> Registry:
    """mlbfgs/sgd/adam for stochastic jobs (:mod:`hpcqn.optimizers.registry`)."""
    from ..optimizers import registry

    return Registry(tuple(registry.METHODS), registry.options_of, registry.make)


def torch_methods() -> Registry:
    """The torch jobs' methods (:mod:`hpcqn.torch.methods`); needs torch."""
    from ..torch import methods

    return Registry(tuple(methods.METHODS), methods.options_of, methods.make)


def _table(config: Mapping[str, Any], section: str, path: Path) -> dict[str, Any]:
    value = config.get(section, {})
    if not isinstance(value, dict):
        raise JobError(f"{path}: [{section}] must be a table, got {section} = {value!r}")
    return value


def _check(path: Path, section: str, spec: Mapping[str, Option], values: Mapping[str, Any],
           defaults: bool = False) -> dict[str, Any]:
    """``values`` of ``[section]`` checked by :func:`hpcqn.options.check`; with
    ``defaults``, completed with the spec's defaults."""
    try:
        checked = opt.check(spec, values, f"{path}: [{section}]")
    except OptionError as exc:
        raise JobError(str(exc)) from exc
    if defaults:
        return {**{k: o.default for k, o in spec.items() if o.default is not None}, **checked}
    return checked


def _problem_spec(path: Path, kind: str,
                  problem: Mapping[str, Any]) -> tuple[Any, dict[str, Option], tuple[str, ...]]:
    known = PROBLEMS if kind == "minimize" else STOCHASTIC_PROBLEMS
    name = problem.get("name")
    if name is None:
        raise JobError(f"{path}: [problem] needs a name: one of {', '.join(sorted(known))}")
    if not isinstance(name, str) or name not in known:
        raise JobError(f"{path}: [problem] name: unknown problem {name!r} for a {kind} job; "
                       f"known: {', '.join(sorted(known))}")
    spec, required = parameters(known[name])
    return known[name], {"name": Option("name", None, Rule("str")), **spec}, required


def schema(config: Mapping[str, Any], path: str | Path = "job") -> dict[str, dict[str, Option]]:
    """The sections a job file of this kind (and problem, model, methods) may have, each
    as option declarations (name -> :class:`hpcqn.options.Option`): ``[job]``, the
    problem's parameters (its class's ``OPTION_RULES``), ``hpcqn.minimize``'s options,
    ``[train]``, ``[model]`` and one ``methods.NAME`` per method (the registries'
    ``options_of``). Raises :class:`JobError` for what decides the schema itself (the
    kind, the problem or a method's name)."""
    path = Path(path)
    kind = _table(config, "job", path).get("kind")
    if kind is None:
        raise JobError(f"{path}: [job] kind is missing: one of {', '.join(JOB_KINDS)}")
    if kind not in JOB_KINDS:
        raise JobError(f"{path}: [job]: option kind must be one of "
                       f"{', '.join(map(repr, JOB_KINDS))}, got {kind!r}")
    out: dict[str, dict[str, Option]] = {"job": JOB}
    if kind in ("minimize", "stochastic"):
        _, out["problem"], _ = _problem_spec(path, kind, _table(config, "problem", path))
    if kind == "minimize":
        out["options"] = _minimize_options()
        return out
    if kind == "torch":
        try:
            registry = torch_methods()
            out["train"], out["model"] = _torch_sections()
        except ImportError as exc:
            raise JobError(f"{path}: a torch job needs PyTorch: pip install 'hpcqn[torch]' "
                           f"({exc})") from exc
    else:
        out["train"] = STOCHASTIC_TRAIN
        registry = block_methods()
    methods = _table(config, "methods", path)
    if not methods:
        raise JobError(f"{path}: a {kind} job needs at least one [methods.NAME] table, NAME "
                       f"one of {', '.join(registry.methods)}")
    for method in methods:
        if method not in registry.methods:
            raise JobError(f"{path}: [methods.{method}]: unknown method {method!r} for a "
                           f"{kind} job; known: {', '.join(registry.methods)}")
        out[f"methods.{method}"] = dict(registry.options_of(method))
    return out


def validate(config: Mapping[str, Any], path: str | Path = "job") -> dict[str, Any]:
    """``config`` (a parsed job file) checked against :func:`schema`; returns it with the
    defaults of ``[job]``, ``[train]`` and ``[model]`` filled in (``[problem]``,
    ``[options]`` and the method tables as given: their defaults are the code's)."""
    path = Path(path)
    every = sorted({s for sections in SECTIONS.values() for s in sections})
    unknown = sorted(set(config) - set(every))
    if unknown:
        raise JobError(f"{path}: unknown section(s) {', '.join(f'[{s}]' for s in unknown)}; "
                       f"known: {', '.join(f'[{s}]' for s in every)}")
    for section, value in config.items():
        if not isinstance(value, dict):
            raise JobError(f"{path}: [{section}] must be a table, got {section} = {value!r}")
    sections = schema(config, path)
    kind = config["job"]["kind"]
    misplaced = sorted(set(config) - set(SECTIONS[kind]))
    if misplaced:
        raise JobError(f"{path}: [{misplaced[0]}] does not apply to a {kind} job (its "
                       f"sections: {', '.join(f'[{s}]' for s in SECTIONS[kind])})")
    out: dict[str, Any] = {}
    job = _check(path, "job", JOB, config["job"], defaults=True)
    job.setdefault("name", path.stem)
    if not job["name"] or "/" in job["name"] or job["name"] in (".", ".."):
        raise JobError(f"{path}: [job]: option name must be a directory name (no '/'), got "
                       f"{job['name']!r}")
    out["job"] = job
    train = dict(config.get("train", {}))
    if kind == "stochastic" and train.get("device", "cpu") != "cpu":
        raise JobError(f"{path}: [train] device applies to torch jobs; stochastic problems "
                       f"run on NumPy arrays (device = \"cpu\" or leave it out)")
    for section in ("train", "model"):
        if section in sections:
            out[section] = _check(path, section, sections[section],
                                  config.get(section, {}), defaults=True)
    if "problem" in sections:
        problem = dict(config["problem"])
        cls, spec, required = _problem_spec(path, kind, problem)
        _check(path, "problem", spec, problem)
        missing = [name for name in required if name not in problem]
        if missing:
            raise JobError(f"{path}: [problem] {cls.name} needs {', '.join(missing)} "
                           f"({spec[missing[0]].rule.describe()})")
        try:
            cls.check_parameters({k: v for k, v in problem.items() if k != "name"})
        except ValueError as exc:
            raise JobError(f"{path}: [problem] {exc}") from exc
        out["problem"] = problem
    if "options" in sections:
        out["options"] = dict(config.get("options", {}))
        _check(path, "options", sections["options"], out["options"])
    if "methods" in SECTIONS[kind]:
        out["methods"] = {}
        for method, table in config["methods"].items():
            if not isinstance(table, dict):
                raise JobError(f"{path}: [methods.{method}] must be a table, got "
                               f"methods.{method} = {table!r}")
            _check(path, f"methods.{method}", sections[f"methods.{method}"], table)
            out["methods"][method] = dict(table)
    return out


def _read(path: Path) -> dict[str, Any]:
    if path.is_dir():
        raise JobError(f"job file {path} is a directory, not a TOML file")
    try:
        data = path.read_bytes()
    except FileNotFoundError as exc:
        raise JobError(f"job file {path} does not exist") from exc
    except OSError as exc:
        raise JobError(f"job file {path} cannot be read: {exc.strerror or exc}") from exc
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise JobError(f"job file {path} is not UTF-8 text (byte {exc.start}: "
                       f"{data[exc.start:exc.start + 1]!r})") from exc
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise JobError(f"job file {path} is not valid TOML: {exc}") from exc


def _digest(path: Path) -> str:
    """The SHA-256 of the job file's bytes (what ranks compare), or why it has none."""
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    except OSError as exc:
        return f"unreadable ({exc.strerror or exc})"


def load_job(path: str | Path) -> dict[str, Any]:
    """Read and check a job file entirely (see :func:`validate`); :class:`JobError`
    naming the file and the key otherwise."""
    path = Path(path)
    return validate(_read(path), path)


def _flat(config: Mapping[str, Any]) -> dict[str, Any]:
    """``{"section.key": value}``, the values as they are (compared with ``==``)."""
    return flatten(config, leaf=lambda value: value)


def differences(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """The ``section.key`` names whose values differ between two job configurations
    (sorted; a key in one only counts), less :data:`RESUMABLE_CHANGES`."""
    a, b = _flat(old), _flat(new)
    return sorted(k for k in set(a) | set(b)
                  if k not in RESUMABLE_CHANGES and a.get(k, None) != b.get(k, None))


# -- the run directory --------------------------------------------------------------------
@dataclass
class RunDir:
    """Where a run keeps its files; ``complete``: every method's checkpoint was at its
    final epoch when the run started."""

    path: Path
    complete: bool = False

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"


def _owner(lock: Path) -> dict[str, Any] | None:
    try:
        owner = json.loads(lock.read_text())
    except (OSError, ValueError):
        return None
    return owner if isinstance(owner, dict) else None


def _describe(owner: Mapping[str, Any] | None) -> str:
    if owner is None:
        return "an unknown owner (unreadable)"
    text = f"pid {owner.get('pid')} on {owner.get('host')}"
    if owner.get("slurm_job_id"):
        text += f" (Slurm job {owner['slurm_job_id']})"
    return text


def _stale(owner: Mapping[str, Any] | None) -> bool:
    """Whether the run that holds a lock is gone: its pid is not alive on this host, or
    it is an earlier incarnation of this (requeued) Slurm job."""
    if owner is None:
        return False
    job = os.environ.get("SLURM_JOB_ID")
    if job and str(owner.get("slurm_job_id")) == job and owner.get("pid") != os.getpid():
        return owner.get("host") != socket.gethostname() or not _alive(owner.get("pid"))
    if owner.get("host") != socket.gethostname():
        return False
    return not _alive(owner.get("pid"))


def _alive(pid: Any) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def take_lock(run_dir: Path) -> tuple[Path, str | None]:
    """Create ``run_dir/lock`` exclusively (``O_CREAT | O_EXCL``) holding this process's
    host, pid and Slurm job id; returns it and a note when a stale lock was taken over.
    A lock held by a live run is a :class:`JobError` naming the lock and its owner."""
    lock = run_dir / LOCK
    note = None
    for _ in range(3):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            owner = _owner(lock)
            if not _stale(owner):
                raise JobError(f"run directory {run_dir} is in use: {lock} is held by "
                               f"{_describe(owner)}; wait for that run to end (or, if it "
                               f"is not running, remove {lock})") from None
            note = f"took over the stale lock {lock} of {_describe(owner)}, which is not running"
            with contextlib.suppress(FileNotFoundError):
                lock.unlink()
            continue
        with os.fdopen(fd, "w") as stream:
            json.dump({"host": socket.gethostname(), "pid": os.getpid(),
                       "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
                       "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}, stream)
        return lock, note
    raise JobError(f"run directory {run_dir} is in use: cannot take {lock}")


def _final_epochs(run: RunDir, config: Mapping[str, Any]) -> bool:
    """Whether every method of a stochastic or torch job has a checkpoint at its final
    epoch."""
    methods = config.get("methods")
    if not methods:
        return False
    for method in methods:
        where = checkpoint.latest(run.checkpoints / method)
        if where is None:
            return False
        try:
            meta = json.loads((where / "manifest.json").read_text()).get("meta", {})
        except (OSError, ValueError):
            return False
        if meta.get("epoch") != config["train"]["epochs"] or meta.get("batch", 0) != 0:
            return False
    return True


def _refuse_changed(path: Path, config: Mapping[str, Any], run: RunDir) -> None:
    """A :class:`JobError` when the run directory holds checkpoints and a ``job.toml``
    that differs from this job in a key that enters the saved state (the keys named,
    flat ``section.key``)."""
    saved = run.path / "job.toml"
    if not saved.is_file():
        return
    try:
        old: Mapping[str, Any] = load_job(saved)
    except JobError:  # saved by another version: compare what it says
        try:
            old = _read(saved)
        except JobError:
            old = {}
    changed = differences(old, config)
    if changed:
        old_flat, new_flat = _flat(old), _flat(config)
        shown = "; ".join(f"{k} {old_flat.get(k, '(unset)')!r} -> "
                          f"{new_flat.get(k, '(unset)')!r}" for k in changed)
        raise JobError(f"{path}: run directory {run.path} holds checkpoints of a "
                       f"different job configuration ({shown}); run with --fresh to "
                       f"start over, or give another --output")


def _prepare(path: Path, config: Mapping[str, Any], run: RunDir, fresh: bool) -> str | None:
    """Rank 0: lock the run directory, check it against this job (unless ``fresh``),
    then (only then) copy the job file in, and with ``fresh`` drop the checkpoints.
    Returns a note to print, if any."""
    run.path.mkdir(parents=True, exist_ok=True)
    lock, note = take_lock(run.path)
    try:
        has_checkpoints = run.checkpoints.is_dir() and any(
            run.checkpoints.rglob(checkpoint.LATEST))
        if fresh:
            shutil.rmtree(run.checkpoints, ignore_errors=True)
        elif has_checkpoints:
            _refuse_changed(path, config, run)
            run.complete = _final_epochs(run, config)
        (run.path / "job.toml").write_bytes(path.read_bytes())
    except BaseException:
        lock.unlink(missing_ok=True)
        raise
    return note


@contextlib.contextmanager
def run_directory(path: str | Path, config: Mapping[str, Any], c: Communicator,
                  output: str | Path | None = None, fresh: bool = False) -> Iterator[RunDir]:
    """The run directory of a job (next to ``output``, default ``runs/<job name>``),
    prepared and locked by rank 0 (:func:`take_lock`) for the ``with`` block; every rank
    gets the same answer (an error is a :class:`JobError` on every rank). The lock goes
    at the end, whatever happens."""
    run = RunDir(Path(output).parent if output else Path("runs") / config["job"]["name"])
    verdict: tuple[str, Any] | None = None
    if c.rank == 0:
        try:
            note = _prepare(Path(path), config, run, fresh)
            verdict = ("ok", (note, run.complete))
        except JobError as exc:
            verdict = ("error", str(exc))
        except OSError as exc:
            verdict = ("error", f"{path}: cannot use run directory {run.path}: {exc}")
        except Exception as exc:  # rank 0's failure, which every rank must hear of
            verdict = ("failed", f"{type(exc).__name__}: {exc}")
            c.bcast_object(verdict)
            raise
    verdict = c.bcast_object(verdict)
    if verdict[0] == "error":
        raise JobError(verdict[1])
    if verdict[0] == "failed":
        raise RuntimeError(f"rank 0 failed preparing {run.path}: {verdict[1]}")
    note, run.complete = verdict[1]
    try:
        if c.rank == 0 and note:
            print(f"hpcqn run: note: {note}", file=sys.stderr, flush=True)
        if c.rank == 0 and run.complete:
            print(f"hpcqn run: job {config['job']['name']!r} is complete: every method's "
                  f"checkpoint in {run.path} is at its final epoch; showing its results "
                  f"(--fresh to train again)", flush=True)
        yield run
    finally:
        if c.rank == 0:
            (run.path / LOCK).unlink(missing_ok=True)


def _say(c: Communicator, *lines: str) -> None:
    """Print on rank 0."""
    if c.rank == 0:
        for line in lines:
            print(line, flush=True)


def _preempted(c: Communicator, base: dict[str, Any], exc: Preempted,
               method: str | None = None) -> dict[str, Any]:
    """The summary (and rank 0's line) of a run stopped by a signal."""
    where = f"{method}: " if method else ""
    _say(c, f"hpcqn run: {where}{exc}; run the same command to resume (exit {EXIT_PREEMPTED})")
    summary = {**base, "status": EXIT_PREEMPTED}
    if method is None:
        summary["nit"] = exc.step
    else:
        summary.update(stopped_in=method, step=exc.step)
    return summary


# -- running --------------------------------------------------------------------------
def _device(train_options: Mapping[str, Any]) -> str:
    """Where a torch job trains: ``HPCQN_DEVICE`` when set (it overrides the job file, for
    one run or a test suite), else ``[train] device``, else "auto"."""
    return os.environ.get("HPCQN_DEVICE") or str(train_options.get("device", "auto"))


def run_job(path: str | Path, comm: Any = None, output: str | Path | None = None,
            fresh: bool = False, stop: Any = None) -> dict[str, Any]:
    """Run a job on every rank of ``comm``; rank 0 prints progress and a summary and,
    with ``output``, writes the summary as JSON. Returns the summary. The job is checked
    entirely first (:func:`load_job`, then what needs the rank count or the data) on
    every rank alike; then the run directory is prepared (:func:`run_directory`). Jobs
    checkpoint into their run directory and resume from it unless ``fresh``; with
    ``stop`` (a :class:`hpcqn.signals.StopFlag`) a signal ends them at a step boundary
    with a checkpoint (summary status :data:`hpcqn.signals.EXIT_PREEMPTED`)."""
    path = Path(path)
    c: Communicator = get_comm(comm)
    config, error = None, None
    try:
        config = load_job(path)
    except JobError as exc:
        error = exc
    # Every rank must run the same job: its file's digest is agreed (a bad file on any
    # rank is an error on every rank, in the same reduction).
    try:
        c.check_same({"content": _digest(path)}, f"{path}: the job file", error)
    except ValueError as exc:
        if isinstance(exc, JobError):
            raise
        raise JobError(str(exc)) from exc
    assert config is not None
    prepare = {"torch": _prepare_torch, "stochastic": _prepare_stochastic,
               "minimize": _prepare_minimize}[config["job"]["kind"]]
    job = prepare(path, config, c)
    with run_directory(path, config, c, output, fresh) as run:
        summary = job(run, stop)
        if c.rank == 0 and output is not None:
            Path(output).parent.mkdir(parents=True, exist_ok=True)
            Path(output).write_text(json.dumps(summary, indent=2) + "\n")
    return summary


Job = Callable[[RunDir, Any], dict[str, Any]]


def _try_build(path: Path, method: str, build: Callable[[], Any]) -> None:
    """Build a method's optimizer once, before any training, for what only its
    constructor checks (options that are wrong together): a :class:`JobError` naming
    the method's table otherwise (on every rank alike)."""
    try:
        build()
    except (TypeError, ValueError) as exc:
        where = f"[methods.{method}]"
        message = str(exc)
        raise JobError(message if where in message else f"{path}: {where}: {message}") from exc


def _prepare_torch(path: Path, config: dict[str, Any], c: Communicator) -> Job:
    """Train the digits model once per method; per-epoch lines on rank 0; in the run
    directory a copy of the job file, one metrics file (JSON lines) per method and
    ``checkpoints/<method>/``. Every method's optimizer is built once here first, so
    that an option no declaration can reject alone fails before any training."""
    import torch

    from ..torch.data import GlobalBatches
    from .training import digits, make_model, train

    model, train_options = config["model"], config["train"]
    methods = config["methods"]
    name = model["name"]
    dtype = getattr(torch, train_options["dtype"])
    registry = torch_methods()
    try:
        GlobalBatches(digits(train_options["seed"])["train_y"].numel(),
                      train_options["batch_size"], c)
    except ValueError as exc:
        raise JobError(f"{path}: [train]: {exc}") from exc
    for method, options in methods.items():
        _try_build(path, method, lambda m=method, o=options: registry.make(
            m, make_model(name, model["hidden"], 0, dtype), c, o, f"{path}: [methods.{m}]"))

    # The target: test accuracy for the classifiers, training loss for the autoencoder.
    if name == "autoencoder":
        metric, target = "train_loss", float(train_options["target_loss"])
        reached_target = lambda r: r["train_loss"] <= target  # noqa: E731
    else:
        metric, target = "test_accuracy", float(train_options["target_accuracy"])
        reached_target = lambda r: r["test_accuracy"] >= target  # noqa: E731
    base = {"job": config["job"]["name"], "model": name, "ranks": c.size}

    def run(run_dir: RunDir, stop: Any) -> dict[str, Any]:
        _say(c, f"hpcqn run: job {config['job']['name']!r}: digits {name} on {c.size} "
                f"rank(s), batch {train_options['batch_size']}; metrics in {run_dir.path}/")
        results: dict[str, Any] = {}
        for method, options in methods.items():
            try:
                out = train(method, c, name, options, epochs=train_options["epochs"],
                            batch_size=train_options["batch_size"],
                            seed=train_options["seed"], dtype=dtype,
                            lr_schedule=train_options["lr_schedule"],
                            metrics_path=run_dir.path / f"{method}.jsonl",
                            hidden=model["hidden"],
                            checkpoint_dir=run_dir.checkpoints / method,
                            checkpoint_every=train_options["checkpoint_every"],
                            stop=stop, device=_device(train_options))
            except Preempted as exc:
                return _preempted(c, base, exc, method)
            except (TypeError, ValueError) as exc:
                raise JobError(f"{path}: method {method!r}: {exc}") from exc
            records = out["records"]
            reached = next((r for r in records if reached_target(r)), None)
            results[method] = {"epochs": records,
                               "epochs_to_target": reached["epoch"] if reached else None,
                               "seconds_to_target": reached["seconds"] if reached else None}
        lines = [f"hpcqn run: done (target {metric.replace('_', ' ')} {target}):"]
        for method, result in results.items():
            last = result["epochs"][-1]
            reached = (f"target at epoch {result['epochs_to_target']} "
                       f"({result['seconds_to_target']:.2f} s)"
                       if result["epochs_to_target"] else "target not reached")
            test = ("test loss {:.5f}".format(last["test_loss"]) if "test_loss" in last
                    else "test accuracy {:.4f}".format(last["test_accuracy"]))
            lines.append(f"  {method:7s} train loss {last['train_loss']:.5f}  {test}  "
                         f"{last['seconds']:.2f} s  {reached}")
        _say(c, *lines)
        return {**base, "target": target, "target_metric": metric, "methods": results,
                "status": 0}

    return run


def _prepare_minimize(path: Path, config: dict[str, Any], c: Communicator) -> Job:
    """The distributed L-BFGS on a named problem. It checkpoints into ``<run
    dir>/checkpoints`` every ``checkpoint_every`` iterations of ``[options]`` (and always
    when signalled) and resumes from there unless ``fresh``."""
    problem_params = dict(config["problem"])
    name = problem_params.pop("name")
    options = dict(config.get("options", {}))
    every = int(options.pop("checkpoint_every", 0))
    try:
        problem = make_problem(name, **problem_params)
    except (TypeError, ValueError) as exc:
        raise JobError(f"{path}: [problem] {exc}") from exc
    base = {"job": config["job"]["name"], "problem": name, "ranks": c.size}

    def run(run_dir: RunDir, stop: Any) -> dict[str, Any]:
        fun, x0 = problem.distributed(c)
        _say(c, f"hpcqn run: job {config['job']['name']!r}: {name} n={problem.n} "
                f"{problem.dtype} on {c.size} rank(s), options {options}")
        start = time.perf_counter()
        try:
            result = minimize(fun, x0, comm=c, options=options, stop=stop,
                              checkpoint_dir=(run_dir.checkpoints
                                              if every or stop is not None else None),
                              checkpoint_every=every)
        except Preempted as exc:
            return _preempted(c, base, exc)
        seconds = time.perf_counter() - start
        summary = {
            **base, "n": problem.n, "status": int(result.status), "message": result.message,
            "fun": result.fun, "nit": result.nit, "nfev": result.nfev,
            "nallreduce": result.nallreduce, "comm_bytes": result.comm_bytes,
            "seconds": seconds,
        }
        solution = problem.solution()
        if solution is not None:
            part = problem.layout(c.size).local_slice(c.rank)
            local_error = float(np.max(np.abs(result.x - solution[part]), initial=0.0))
            _, top = c.allreduce_scalars([], [local_error])
            summary["error_inf"] = float(top[0])
        error = f" max|x - x*| {summary['error_inf']:.2e}" if "error_inf" in summary else ""
        _say(c, f"hpcqn run: done: {result.message}; f {result.fun:.6e}{error}; nit "
                f"{result.nit} nfev {result.nfev} reductions {result.nallreduce}; "
                f"{seconds:.2f} s on {c.size} rank(s)")
        return summary

    return run


def _resumed_records(metrics: Path, checkpoints: Path) -> list[dict[str, Any]]:
    """The per-epoch records of a run that resumes from ``checkpoints``: the metrics
    file's lines up to the checkpoint's epoch (later lines were not kept)."""
    where = checkpoint.latest(checkpoints)
    if where is None or not metrics.exists():
        return []
    epoch = json.loads((where / "manifest.json").read_text())["meta"].get("epoch", 0)
    records = [json.loads(line) for line in metrics.read_text().splitlines() if line]
    return [r for r in records if r["epoch"] <= epoch]


def _prepare_stochastic(path: Path, config: dict[str, Any], c: Communicator) -> Job:
    """Train the problem once per method in ``[methods]``; per-epoch lines on rank 0; in
    the run directory a metrics file per method and ``checkpoints/<method>/`` (every
    epoch, every ``checkpoint_every`` steps of ``[train]``, and on a signal), from which
    a later run resumes unless ``fresh``. Every method's optimizer is built once here
    first (options that only fail together fail before any training)."""
    params = dict(config["problem"])
    name = params.pop("name")
    train = config["train"]
    methods = config["methods"]
    batch_size = train["batch_size"]
    registry = block_methods()
    try:
        problem = STOCHASTIC_PROBLEMS[name](**params)
    except (TypeError, ValueError) as exc:
        raise JobError(f"{path}: [problem] {exc}") from exc
    if not c.size <= batch_size <= problem.train_y.size:
        raise JobError(f"{path}: [train]: option batch_size must be between the rank count "
                       f"{c.size} and the {problem.train_y.size} training samples, got "
                       f"{batch_size}")
    layout = BlockLayout.from_sizes(problem.block_sizes, c.size)
    for method, options in methods.items():
        _try_build(path, method, lambda m=method, o=options: registry.make(
            m, layout, c, dict(o), f"{path}: [methods.{m}]"))
    base_options = {"epochs": train["epochs"], "blocks": problem.block_sizes,
                    "lr_schedule": train["lr_schedule"], "disp": False}
    base = {"job": config["job"]["name"], "problem": name, "ranks": c.size}

    def run(run_dir: RunDir, stop: Any) -> dict[str, Any]:
        optimum = problem.optimum()
        target = optimum + float(train["target_gap"])
        _say(c, f"hpcqn run: job {config['job']['name']!r}: {name} n={problem.n}, "
                f"{len(problem.block_sizes)} blocks, batch {batch_size} over {c.size} "
                f"rank(s); optimum train loss {optimum:.6f}, target {target:.6f}")
        results: dict[str, Any] = {}
        for method, options in methods.items():
            checkpoints = run_dir.checkpoints / method
            metrics = run_dir.path / f"{method}.jsonl"
            # Rank 0 reads them (it rewrites the file next): every rank gets its records.
            done = c.bcast_object(_resumed_records(metrics, checkpoints) if c.rank == 0
                                  else None)
            record: dict[str, Any] = {"epochs": done, "steps_to_target": None}
            for r in done:
                if record["steps_to_target"] is None and r["train_loss"] <= target:
                    record["steps_to_target"] = r["steps"]
                    record["seconds_to_target"] = r["seconds"]
            if c.rank == 0:
                metrics.write_text("".join(json.dumps(r) + "\n" for r in done))
            clock = {"start": time.perf_counter() - (done[-1]["seconds"] if done else 0.0),
                     "evaluating": 0.0}

            def on_step(state: Any, method: str = method, record: dict = record,
                        clock: dict = clock, metrics: Path = metrics) -> None:
                if not state.epoch_end:
                    return
                began = time.perf_counter()
                loss, accuracy = problem.train_loss(state.x), problem.test_accuracy(state.x)
                clock["evaluating"] += time.perf_counter() - began
                seconds = time.perf_counter() - clock["start"] - clock["evaluating"]
                record["epochs"].append({"epoch": state.epoch + 1, "train_loss": loss,
                                         "test_accuracy": accuracy, "seconds": seconds,
                                         "steps": state.nit})
                if c.rank == 0:
                    with metrics.open("a") as stream:
                        stream.write(json.dumps(record["epochs"][-1]) + "\n")
                if record["steps_to_target"] is None and loss <= target:
                    record["steps_to_target"], record["seconds_to_target"] = state.nit, seconds
                _say(c, f"{method:7s} epoch {state.epoch + 1:3d}: train loss {loss:.6f}  "
                        f"test accuracy {accuracy:.4f}  {seconds:7.2f} s")

            try:
                result = minimize_stochastic(
                    problem.batch_loss, problem.x0(),
                    problem.batches(batch_size, c.rank, c.size), method=method, comm=c,
                    options={**base_options, **options}, callback=on_step,
                    checkpoint_dir=checkpoints, stop=stop,
                    checkpoint_every=train["checkpoint_every"])
            except Preempted as exc:
                return _preempted(c, base, exc, method)
            record["skipped_steps"] = result.skipped_steps
            results[method] = record
        lines = ["hpcqn run: done:"]
        for method, record in results.items():
            last = record["epochs"][-1]
            reached = (f"target after {record['steps_to_target']} steps "
                       f"({record['seconds_to_target']:.2f} s)"
                       if record["steps_to_target"] is not None else "target not reached")
            lines.append(f"  {method:7s} train loss {last['train_loss']:.6f}  test accuracy "
                         f"{last['test_accuracy']:.4f}  {last['seconds']:.2f} s  {reached}")
        _say(c, *lines)
        return {**base, "optimum": optimum, "target": target, "methods": results,
                "status": 0}

    return run
