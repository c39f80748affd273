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

``kind = "torch"`` trains a torch model once per method (``[model]``, ``[train]``,
``[methods.NAME]``): on the digits an MLP, a CNN or an autoencoder (see
``jobs/digits_mlp.toml``), or on Python's standard-library source the character
transformer ``charlm`` (see ``jobs/charlm.toml``).

A job file is checked entirely before any work starts and before anything is written:
every section and key, against a schema (:func:`schema`) made of the declarations the
code itself uses (:mod:`hpcqn.options`: the optimizers' and problems' ``OPTION_RULES``,
and the job's own sections below). Types are strict (``epochs = 2.7``, ``true`` or
``"ten"`` are errors), and so are ranges, choices and unknown keys. A bad file is a
:class:`JobError` naming the file and the key. The file must be a regular file (a FIFO
or a device is refused, never read) of at most :data:`MAX_JOB_BYTES`, nested at most
:data:`MAX_JOB_DEPTH` levels; and what it asks for must fit in this machine's memory
(:func:`memory_needed`: the problem size and the optimizers' histories, estimated before
anything is allocated).

The run directory (next to ``--output``, default ``runs/<job name>/``) holds a copy of
the job file (``job.toml``), metrics and checkpoints. While a run uses it, it holds
``lock`` (the host, pid and Slurm job id of that run); a second run on it is refused,
a lock left by a run that died is taken over. A run that would resume checkpoints
saved for a different job file is refused (naming the keys that differ) unless
``--fresh``, except a length that grew (:data:`EXTENDABLE`: ``[train] epochs``,
``[options] maxiter`` and ``maxfun``): the finished or stopped run then continues from
its last checkpoint to the new length (a cosine schedule continues as the cosine of the
new epoch count). A job whose methods all finished is reported as complete. Everything in
the run directory is read as the checkpoint loader reads (:func:`hpcqn.checkpoint.read_regular`,
:func:`hpcqn.checkpoint.read_manifest`: regular files only, size limits, every field
type-checked), and what the run will write there must be a regular file or absent: a
FIFO, a device, a symlink or a damaged checkpoint is bad input (one line), not a hang or
a traceback.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import socket
import stat
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
MAX_JOB_BYTES = 1 << 20  # job files are a few hundred bytes
MAX_JOB_DEPTH = 8  # [methods.NAME] key = [a, b] is 3 levels deep
MAX_METRICS_BYTES = 256 << 20  # one JSON line per epoch
MAX_LOCK_BYTES = 4096
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
                  ("hidden", 128, POSITIVE),
                  # the character transformer's windows and corpus (charlm only)
                  ("context", training.CONTEXT, Rule("int", low=2)),
                  ("max_chars", 0, COUNT))
    return train, model
# [options] of a minimize job: hpcqn.minimize's own, plus how often to checkpoint.
MINIMIZE_EXTRA = _spec(("checkpoint_every", 0, COUNT))
SECTIONS = {"minimize": ("job", "problem", "options"),
            "stochastic": ("job", "problem", "train", "methods"),
            "torch": ("job", "model", "train", "methods")}
# Keys that may change between a run and its resumption (they do not enter the saved state).
# The lengths of a run that may grow between a run and its resumption: raising one
# continues a finished or stopped run from its last checkpoint to the new length.
EXTENDABLE = ("train.epochs", "options.maxiter", "options.maxfun")
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


def _read_bytes(path: Path, follow: bool = True) -> bytes:
    """The bytes of job file ``path``: a regular file (through a symlink only when
    ``follow``) of at most :data:`MAX_JOB_BYTES`, else a :class:`JobError`."""
    if path.is_dir():
        raise JobError(f"job file {path} is a directory, not a TOML file")
    try:
        return checkpoint.read_regular(path, MAX_JOB_BYTES, follow)
    except checkpoint.CheckpointError as exc:
        if isinstance(exc.__cause__, FileNotFoundError):
            raise JobError(f"job file {path} does not exist") from exc
        raise JobError(f"job file: {exc}") from exc


def _parse(path: Path, data: bytes) -> dict[str, Any]:
    """A job file's bytes as TOML, nested at most :data:`MAX_JOB_DEPTH` levels."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise JobError(f"job file {path} is not UTF-8 text (byte {exc.start}: "
                       f"{data[exc.start:exc.start + 1]!r})") from exc
    try:
        config = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise JobError(f"job file {path} is not valid TOML: {exc}") from exc
    except RecursionError as exc:  # the parser recurses once per level of nesting
        raise JobError(f"job file {path} nests arrays or tables more than "
                       f"{MAX_JOB_DEPTH} levels deep") from exc
    where = _too_deep(config)
    if where is not None:
        raise JobError(f"job file {path} nests arrays or tables more than {MAX_JOB_DEPTH} "
                       f"levels deep (at {where})")
    return config


def _too_deep(config: Mapping[str, Any]) -> str | None:
    """The dotted key of the first value nested deeper than :data:`MAX_JOB_DEPTH`."""
    stack: list[tuple[str, Any, int]] = [(str(k), v, 1) for k, v in config.items()]
    while stack:
        name, value, depth = stack.pop()
        if depth > MAX_JOB_DEPTH:
            return name
        if isinstance(value, dict):
            stack.extend((f"{name}.{k}", v, depth + 1) for k, v in value.items())
        elif isinstance(value, list):
            stack.extend((f"{name}[{i}]", v, depth + 1) for i, v in enumerate(value))
    return None


def _read(path: Path, follow: bool = True) -> dict[str, Any]:
    return _parse(path, _read_bytes(path, follow))


def _digest(data: bytes | None, error: BaseException | None) -> str:
    """The SHA-256 of the job file's bytes (what ranks compare), or why it has none."""
    if data is None:
        return f"unreadable ({error})"
    return hashlib.sha256(data).hexdigest()[:16]


def load_job(path: str | Path) -> dict[str, Any]:
    """Read and check a job file entirely (see :func:`validate`); :class:`JobError`
    naming the file and the key otherwise."""
    path = Path(path)
    return validate(_read(path), path)


# -- what a job needs of memory ------------------------------------------------------------
# A floor on the vectors of the problem size each rank keeps besides the solver's history:
# x0 (built whole on every rank), x, g, and the temporaries of one evaluation.
PROBLEM_VECTORS = 4
# Vectors of a torch model's size kept besides an mL-BFGS history: parameters, gradients,
# the optimizer's state (momenta, factors) and the temporaries of a step.
MODEL_VECTORS = 8


def machine_memory() -> int | None:
    """This machine's physical memory in bytes (``SC_PHYS_PAGES * SC_PAGE_SIZE``), or
    None where the system does not say."""
    try:
        pages, size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, OSError, ValueError):
        return None
    return pages * size if pages > 0 and size > 0 else None


def _history_bytes(history: int, sizes: list[int], itemsize: int) -> int:
    """An mL-BFGS (or L-BFGS) history of ``history`` pairs over blocks of ``sizes``: the
    2 m vectors of each block and its m x m products (``s.y``, ``y.y``; float64)."""
    return sum(2 * history * size * itemsize + 2 * 8 * history * history for size in sizes)


def _model_parameters(model: Mapping[str, Any], dtype: str) -> int:
    """The parameter count of a torch job's model, built on torch's ``meta`` device (no
    memory is allocated); a :class:`JobError` when not even that can be built."""
    import torch

    from .training import make_model

    try:
        with torch.device("meta"):
            built = make_model(model["name"], model["hidden"], 0, getattr(torch, dtype),
                               model["context"])
        return sum(int(p.numel()) for p in built.parameters())
    except (RuntimeError, ValueError, OverflowError, MemoryError) as exc:
        raise JobError(f"[model] hidden = {model['hidden']}: the model cannot be built "
                       f"({type(exc).__name__}: {' '.join(str(exc).split())[:200]})") from exc


def memory_needed(config: Mapping[str, Any], nranks: int = 1) -> tuple[int, str]:
    """A floor on the bytes one rank of a checked job allocates, and the keys that set it
    (``"[problem] n = 1000000, [options] history = 10"``): the problem-size vectors
    (:data:`PROBLEM_VECTORS`, or :data:`MODEL_VECTORS` of a torch model's parameters) and
    the largest method's history (:func:`_history_bytes`); methods train one after the
    other. Nothing is allocated (a torch model is counted on the ``meta`` device)."""
    kind = config["job"]["kind"]
    methods: Mapping[str, Mapping[str, Any]] = config.get("methods", {})
    if kind == "minimize":
        problem, options = config["problem"], config.get("options", {})
        n = int(problem.get("n", parameters(PROBLEMS[problem["name"]])[0]["n"].default))
        itemsize = np.dtype(problem.get("dtype", "float64")).itemsize
        history = int(options.get("history", LBFGSOptions.history))
        local = -(-n // nranks)
        total = (PROBLEM_VECTORS * n * itemsize
                 + _history_bytes(history + 1, [local], itemsize))
        return total, f"[problem] n = {n}, [options] history = {history}"
    if kind == "stochastic":
        problem = STOCHASTIC_PROBLEMS[config["problem"]["name"]]
        itemsize = np.dtype(config["problem"].get("dtype", "float64")).itemsize
        sizes = [problem.features] * problem.classes  # its blocks, one per class
        base, keys = PROBLEM_VECTORS * sum(sizes) * itemsize, f"[problem] {problem.name}"
    else:
        itemsize = np.dtype(config["train"]["dtype"]).itemsize
        count = _model_parameters(config["model"], config["train"]["dtype"])
        sizes = [count]
        base = MODEL_VECTORS * count * itemsize
        keys = f"[model] {config['model']['name']} hidden = {config['model']['hidden']}"
    largest, which = 0, ""
    for method, options in methods.items():
        if "history" in options:
            need = _history_bytes(int(options["history"]), sizes, itemsize)
            if need > largest:
                largest, which = need, f", [methods.{method}] history = {options['history']}"
    return base + largest, keys + which


def _check_memory(path: Path, config: Mapping[str, Any], nranks: int) -> None:
    """A :class:`JobError` when :func:`memory_needed` is more than this machine has."""
    have = machine_memory()
    if have is None:
        return
    try:
        need, keys = memory_needed(config, nranks)
    except JobError as exc:
        raise JobError(f"{path}: {exc}") from exc
    if need > have:
        raise JobError(f"{path}: {keys} need at least {_gib(need)} of memory per rank; this "
                       f"machine has {_gib(have)}: ask for less")


def _gib(nbytes: int) -> str:
    return f"{nbytes / 2**30:.3g} GiB"


def _flat(config: Mapping[str, Any]) -> dict[str, Any]:
    """``{"section.key": value}``, the values as they are (compared with ``==``)."""
    return flatten(config, leaf=lambda value: value)


def differences(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """The ``section.key`` names whose values differ between two job configurations
    (sorted; a key in one only counts), less :data:`RESUMABLE_CHANGES` and the
    :data:`EXTENDABLE` lengths that only grew."""
    a, b = _flat(old), _flat(new)
    return sorted(k for k in set(a) | set(b)
                  if k not in RESUMABLE_CHANGES and a.get(k, None) != b.get(k, None)
                  and not (k in EXTENDABLE and isinstance(a.get(k), int)
                           and isinstance(b.get(k), int) and b[k] >= a[k]))


# -- the run directory --------------------------------------------------------------------
@dataclass
class RunDir:
    """Where a run keeps its files; ``complete``: every method's checkpoint was at its
    final epoch when the run started."""

    path: Path
    complete: bool = False
    resumes_from: int | None = None  # the step of its newest checkpoint, if any

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"


def _owner(lock: Path) -> dict[str, Any] | None:
    """What a lock says (None: gone, or not JSON); a lock that is not a regular file (a
    FIFO, a symlink) is a :class:`JobError`."""
    try:
        owner = json.loads(checkpoint.read_regular(lock, MAX_LOCK_BYTES))
    except checkpoint.CheckpointError as exc:
        if isinstance(exc.__cause__, FileNotFoundError):
            return None
        raise JobError(f"run directory {lock.parent}: {exc}; remove it") from exc
    except (ValueError, RecursionError):
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


def checkpoint_directories(run: RunDir, config: Mapping[str, Any]) -> list[Path]:
    """The checkpoint directories a job uses: ``checkpoints/`` (a minimize job), else
    ``checkpoints/<method>/`` per method."""
    methods = config.get("methods")
    return [run.checkpoints / m for m in methods] if methods else [run.checkpoints]


def _manifests(run: RunDir, config: Mapping[str, Any]
               ) -> dict[Path, checkpoint.Manifest | None]:
    """The latest checkpoint's manifest in each of the job's checkpoint directories (None
    where there is none), read with the loader's checks: a damaged or hostile directory
    is a :class:`hpcqn.checkpoint.CheckpointError`."""
    out = {}
    for directory in checkpoint_directories(run, config):
        if os.path.lexists(directory) and not directory.is_dir():
            raise checkpoint.CheckpointError(f"{directory} is not a directory")
        out[directory] = checkpoint.read_manifest(directory)
    return out


def _final_epochs(manifests: Mapping[Path, checkpoint.Manifest | None],
                  config: Mapping[str, Any]) -> bool:
    """Whether the job is done: every method of a stochastic or torch job has a
    checkpoint at its final epoch; a minimize job's checkpoint is the end of its run
    (:func:`hpcqn.minimize` saves it) and its limits were not raised since."""
    if not config.get("methods"):
        (m,) = manifests.values()
        if m is None or m.meta.get("final") is not True:
            return False
        options = {**{name: o.default for name, o in _minimize_options().items()},
                   **config.get("options", {})}
        return not (m.meta.get("status") == 1 and any(
            options[key] > m.meta.get(key, options[key]) for key in ("maxiter", "maxfun")))
    return all(m is not None and m.meta.get("epoch") == config["train"]["epochs"]
               and m.meta.get("batch", 0) == 0 for m in manifests.values())


def _refuse_changed(path: Path, config: Mapping[str, Any], run: RunDir) -> None:
    """A :class:`JobError` when the run directory holds checkpoints and a ``job.toml``
    that differs from this job in a key that enters the saved state (the keys named,
    flat ``section.key``)."""
    saved = run.path / "job.toml"
    try:
        data = checkpoint.read_regular(saved, MAX_JOB_BYTES)
    except checkpoint.CheckpointError as exc:
        if isinstance(exc.__cause__, FileNotFoundError):
            return
        raise JobError(f"{path}: run directory {run.path}: {exc}") from exc
    try:
        old: Mapping[str, Any] = validate(_parse(saved, data), saved)
    except JobError:  # saved by another version: compare what it says
        try:
            old = _parse(saved, data)
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


def _writable(file: Path, follow: bool = False) -> None:
    """A :class:`JobError` unless ``file`` (which the run will write) is absent or a
    regular file (not a FIFO, a device, a directory; nor a symlink unless ``follow``)."""
    try:
        info = os.stat(file, follow_symlinks=follow)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise JobError(f"cannot use {file}: {exc.strerror or exc}") from exc
    if not stat.S_ISREG(info.st_mode):
        raise JobError(f"{file} is {checkpoint.describe_mode(info.st_mode)}, not a regular "
                       f"file: remove it (the run writes it)")


def _replace_file(file: Path, data: bytes) -> None:
    """``data`` into ``file`` by a new file renamed over it: whatever ``file`` was (a
    symlink, a FIFO) is replaced, never followed or opened."""
    temporary = file.with_name(f".{file.name}.tmp")
    with contextlib.suppress(FileNotFoundError):
        temporary.unlink()
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0),
                 0o644)
    with os.fdopen(fd, "wb") as stream:
        stream.write(data)
    os.replace(temporary, file)


def _remove(path: Path) -> None:
    """``path`` gone, whatever it is (a symlink itself, not what it names)."""
    if path.is_symlink() or (os.path.lexists(path) and not path.is_dir()):
        path.unlink()
    elif path.is_dir():
        shutil.rmtree(path)


def _prepare(path: Path, data: bytes, config: Mapping[str, Any], run: RunDir, fresh: bool,
             output: Path | None) -> str | None:
    """Rank 0: lock the run directory, check it against this job (its checkpoints read
    with the loader's checks, unless ``fresh``; the files the run writes regular or
    absent), then (only then) copy the job file in (``data``, its bytes), and with
    ``fresh`` drop the checkpoints. Returns a note to print, if any."""
    run.path.mkdir(parents=True, exist_ok=True)
    lock, note = take_lock(run.path)
    try:
        for method in config.get("methods") or {}:
            _writable(run.path / f"{method}.jsonl")
        if output is not None:
            _writable(output, follow=True)
        if fresh:
            _remove(run.checkpoints)
        else:
            manifests = _manifests(run, config)
            steps = [m.step for m in manifests.values() if m is not None]
            if steps:
                _refuse_changed(path, config, run)
                run.complete = _final_epochs(manifests, config)
                run.resumes_from = max(steps)
        _replace_file(run.path / "job.toml", data)
    except BaseException:
        lock.unlink(missing_ok=True)
        raise
    return note


@contextlib.contextmanager
def run_directory(path: str | Path, config: Mapping[str, Any], c: Communicator,
                  output: str | Path | None = None, fresh: bool = False,
                  data: bytes | None = None) -> Iterator[RunDir]:
    """The run directory of a job (next to ``output``, default ``runs/<job name>``),
    prepared and locked by rank 0 (:func:`take_lock`) for the ``with`` block; every rank
    gets the same answer (an error is a :class:`JobError` on every rank). The lock goes
    at the end, whatever happens. ``data``: the job file's bytes as read (else read
    again)."""
    run = RunDir(Path(output).parent if output else Path("runs") / config["job"]["name"])
    verdict: tuple[str, Any] | None = None
    if c.rank == 0:
        try:
            content = data if data is not None else _read_bytes(Path(path))
            note = _prepare(Path(path), content, config, run, fresh,
                            Path(output) if output else None)
            verdict = ("ok", (note, run.complete, run.resumes_from))
        except (JobError, checkpoint.CheckpointError) as exc:
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
    note, run.complete, run.resumes_from = verdict[1]
    try:
        if c.rank == 0 and note:
            print(f"hpcqn run: note: {note}", file=sys.stderr, flush=True)
        if c.rank == 0 and run.complete:
            done = ("every method's checkpoint in {} is at its final epoch"
                    if config.get("methods") else "its checkpoint in {} is the run's end")
            print(f"hpcqn run: job {config['job']['name']!r} is complete: "
                  f"{done.format(run.path)}; showing its results (--fresh to run it again; "
                  f"a larger epochs or maxiter continues it)", flush=True)
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
    then = "resume" if exc.started else "continue"
    _say(c, f"hpcqn run: {where}{exc}; run the same command to {then} (exit "
            f"{EXIT_PREEMPTED})")
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
    config, data, error = None, None, None
    try:
        data = _read_bytes(path)
        config = validate(_parse(path, data), path)
        _check_memory(path, config, c.size)
    except JobError as exc:
        error = exc
    # Every rank must run the same job: its file's digest is agreed (a bad file on any
    # rank is an error on every rank, in the same reduction).
    try:
        c.check_same({"content": _digest(data, error)}, f"{path}: the job file", error)
    except ValueError as exc:
        if isinstance(exc, JobError):
            raise
        raise JobError(str(exc)) from exc
    assert config is not None
    prepare = {"torch": _prepare_torch, "stochastic": _prepare_stochastic,
               "minimize": _prepare_minimize}[config["job"]["kind"]]
    job = prepare(path, config, c)
    with run_directory(path, config, c, output, fresh, data) as run:
        summary = _stopped_before_start(c, config, run, stop) or job(run, stop)
        if c.rank == 0 and output is not None:
            Path(output).parent.mkdir(parents=True, exist_ok=True)
            Path(output).write_text(json.dumps(summary, indent=2) + "\n")
    return summary


Job = Callable[[RunDir, Any], dict[str, Any]]


def _stopped_before_start(c: Communicator, config: Mapping[str, Any], run: RunDir,
                          stop: Any) -> dict[str, Any] | None:
    """The summary of a run signalled during its start-up (reading the job, MPI and torch
    starting, the data, the run directory): the ranks agree on their stop flags once
    before the job starts (one small reduction), and when any rank was signalled, every
    rank stops here, before any step and with nothing written but the run directory's
    ``job.toml`` (rank 0 prints one line; :data:`hpcqn.signals.EXIT_PREEMPTED`). None:
    no signal, run the job. A signal after this is caught at the next step boundary."""
    if stop is None:
        return None
    signum = stop.signum
    if c.allreduce_named(maxes={"signal": float(signum is not None)}).maxes["signal"] == 0:
        return None
    stopped = Preempted(run.resumes_from, signum, started=False)
    return _preempted(c, {"job": config["job"]["name"], "ranks": c.size}, stopped)


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
    """Train the model once per method; per-epoch lines on rank 0; in the run
    directory a copy of the job file, one metrics file (JSON lines) per method and
    ``checkpoints/<method>/``. Every method's optimizer is built once here first, so
    that an option no declaration can reject alone fails before any training."""
    import torch

    from ..torch.data import GlobalBatches
    from .training import TASKS, load_data, make_model, train

    model, train_options = config["model"], config["train"]
    methods = config["methods"]
    name = model["name"]
    dtype = getattr(torch, train_options["dtype"])
    registry = torch_methods()
    data = {"context": model["context"], "max_chars": model["max_chars"]}
    try:
        GlobalBatches(load_data(name, train_options["seed"], **data)["train_y"].shape[0],
                      train_options["batch_size"], c)
    except ValueError as exc:
        raise JobError(f"{path}: [train]/[model]: {exc}") from exc
    for method, options in methods.items():
        _try_build(path, method, lambda m=method, o=options: registry.make(
            m, make_model(name, model["hidden"], 0, dtype, model["context"]), c, o,
            f"{path}: [methods.{m}]"))

    # The target: test accuracy for the classifiers, training loss for the autoencoder,
    # held-out loss for the language model.
    if TASKS[name] in ("reconstruct", "language"):
        metric = "train_loss" if TASKS[name] == "reconstruct" else "test_loss"
        target = float(train_options["target_loss"])
        reached_target = lambda r: r[metric] <= target  # noqa: E731
    else:
        metric, target = "test_accuracy", float(train_options["target_accuracy"])
        reached_target = lambda r: r["test_accuracy"] >= target  # noqa: E731
    base = {"job": config["job"]["name"], "model": name, "ranks": c.size}

    def run(run_dir: RunDir, stop: Any) -> dict[str, Any]:
        what = "Python's source" if name == "charlm" else "digits"
        _say(c, f"hpcqn run: job {config['job']['name']!r}: {what} {name} on {c.size} "
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
                            stop=stop, device=_device(train_options), **data)
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
    file's lines up to the checkpoint's epoch (later lines were not kept). Both read as
    the loader reads (a regular file, a size limit, every value checked); a damaged one
    is a :class:`JobError` naming it."""
    manifest = checkpoint.read_manifest(checkpoints)
    if manifest is None or not os.path.lexists(metrics):
        return []
    epoch = manifest.meta.get("epoch", 0)
    if isinstance(epoch, bool) or not isinstance(epoch, int):
        raise JobError(f"{manifest.path}/{checkpoint.MANIFEST}: meta field 'epoch' must be "
                       f"an integer, got {epoch!r}")
    try:
        text = checkpoint.read_regular(metrics, MAX_METRICS_BYTES).decode("utf-8")
    except checkpoint.CheckpointError as exc:
        raise JobError(str(exc)) from exc
    except UnicodeDecodeError as exc:
        raise JobError(f"metrics file {metrics} is not UTF-8 text") from exc
    records = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line:
            continue
        try:
            record = json.loads(line)
        except (ValueError, RecursionError):
            record = None
        if (not isinstance(record, dict) or isinstance(record.get("epoch"), bool)
                or not isinstance(record.get("epoch"), int)):
            raise JobError(f"metrics file {metrics} line {number} is not a JSON object with "
                           f"an integer 'epoch': remove the file or run with --fresh")
        records.append(record)
    return [r for r in records if r["epoch"] <= epoch]


def _agreed_records(c: Communicator, metrics: Path, checkpoints: Path) -> list[dict[str, Any]]:
    """:func:`_resumed_records` read by rank 0 (which rewrites the file next) and given to
    every rank; a :class:`JobError` on every rank when it cannot be read."""
    answer: tuple[str, Any] | None = None
    if c.rank == 0:
        try:
            answer = ("ok", _resumed_records(metrics, checkpoints))
        except (JobError, checkpoint.CheckpointError) as exc:
            answer = ("error", str(exc))
    answer = c.bcast_object(answer)
    if answer[0] == "error":
        raise JobError(answer[1])
    return answer[1]


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
            done = _agreed_records(c, metrics, checkpoints)
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
