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

Unknown sections or keys are errors, raised before any work starts.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from .. import checkpoint
from ..comm import Communicator, get_comm
from ..layout import BlockLayout
from ..minimize import minimize, parse_options
from ..signals import EXIT_PREEMPTED, Preempted
from ..stochastic import make_optimizer, minimize_stochastic
from .problems import DigitsSoftmax, make_problem

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

JOB_KINDS = ("minimize", "stochastic", "torch")
SECTIONS = {"job": {"kind", "name", "description"}, "problem": None, "options": None,
            "train": {"epochs", "batch_size", "lr_schedule", "target_gap", "seed",
                      "target_accuracy", "target_loss", "dtype", "checkpoint_every",
                      "device"},
            "model": {"name", "hidden"}, "methods": None}


class JobError(ValueError):
    """A job file that cannot run: says which file and which key."""


def load_job(path: str | Path) -> dict[str, Any]:
    """Read and check a job file."""
    path = Path(path)
    try:
        config = tomllib.loads(path.read_text())
    except FileNotFoundError as exc:
        raise JobError(f"job file {path} does not exist") from exc
    except tomllib.TOMLDecodeError as exc:
        raise JobError(f"job file {path} is not valid TOML: {exc}") from exc
    unknown = sorted(set(config) - set(SECTIONS))
    if unknown:
        raise JobError(f"{path}: unknown section(s) {unknown}; known: {sorted(SECTIONS)}")
    for section in ("job", "train"):
        unknown = sorted(set(config.get(section, {})) - SECTIONS[section])
        if unknown:
            raise JobError(f"{path}: unknown key(s) {unknown} in [{section}]")
    job = config.get("job", {})
    kind = job.get("kind")
    if kind not in JOB_KINDS:
        raise JobError(f"{path}: [job] kind must be one of {JOB_KINDS}, got {kind!r}")
    if kind != "torch" and "name" not in config.get("problem", {}):
        raise JobError(f"{path}: [problem] needs a name")
    job.setdefault("name", path.stem)
    config["job"] = job
    return config


def _device(train_options: dict[str, Any]) -> str:
    """Where a torch job trains: ``HPCQN_DEVICE`` when set (it overrides the job file, for
    one run or a test suite), else ``[train] device``, else "auto"."""
    return os.environ.get("HPCQN_DEVICE") or str(train_options.get("device", "auto"))


def run_job(path: str | Path, comm: Any = None, output: str | Path | None = None,
            fresh: bool = False, stop: Any = None) -> dict[str, Any]:
    """Run a job on every rank of ``comm``; rank 0 prints progress and a summary and,
    with ``output``, writes the summary as JSON. Returns the summary. Torch jobs
    checkpoint into their run directory and resume from it unless ``fresh``; with
    ``stop`` (a :class:`hpcqn.signals.StopFlag`) a signal ends them at a step boundary
    with a checkpoint (summary status :data:`hpcqn.signals.EXIT_PREEMPTED`)."""
    config = load_job(path)
    c: Communicator = get_comm(comm)
    kind = config["job"]["kind"]
    if kind == "torch":
        summary = _run_torch(path, config, c, output, fresh, stop)
    elif kind == "stochastic":
        summary = _run_stochastic(path, config, c, output, fresh, stop)
    else:
        summary = _run_minimize(path, config, c, output, fresh, stop)
    if c.rank == 0 and output is not None:
        Path(output).parent.mkdir(parents=True, exist_ok=True)
        Path(output).write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def _run_torch(path: str | Path, config: dict[str, Any], c: Communicator,
               output: str | Path | None, fresh: bool = False,
               stop: Any = None) -> dict[str, Any]:
    """Train the digits model once per method; per-epoch lines on rank 0; in the run
    directory (next to ``output``, default ``runs/<job name>/``) a copy of the job file,
    one metrics file (JSON lines) per method and ``checkpoints/<method>/``."""
    try:
        import torch

        from .training import METHODS, MODELS, train
    except ImportError as exc:
        raise JobError(f"{path}: a torch job needs PyTorch: pip install 'hpcqn[torch]'") from exc
    model = dict(config.get("model", {}))
    train_options = dict(config.get("train", {}))
    methods = dict(config.get("methods", {}))
    name = model.get("name", "mlp")
    if name not in MODELS:
        raise JobError(f"{path}: [model] name must be one of {MODELS}, got {name!r}")
    unknown = sorted(set(methods) - set(METHODS))
    if unknown or not methods:
        raise JobError(f"{path}: [methods.NAME] tables must name some of {METHODS}, got "
                       f"{sorted(methods)}")
    dtype = {"float32": torch.float32, "float64": torch.float64}.get(
        train_options.get("dtype", "float32"))
    if dtype is None:
        raise JobError(f"{path}: [train] dtype must be float32 or float64")
    run_dir = Path(output).parent if output else Path("runs") / config["job"]["name"]
    if c.rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "job.toml").write_text(Path(path).read_text())
        if fresh:
            shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
        print(f"hpcqn run: job {config['job']['name']!r}: digits {name} on {c.size} rank(s), "
              f"batch {train_options.get('batch_size', 64)}; metrics in {run_dir}/", flush=True)
    c.barrier()
    # The target: test accuracy for the classifiers, training loss for the autoencoder.
    if name == "autoencoder":
        metric, target = "train_loss", float(train_options.get("target_loss", 0.02))
        reached_target = lambda r: r["train_loss"] <= target  # noqa: E731
    else:
        metric, target = "test_accuracy", float(train_options.get("target_accuracy", 0.95))
        reached_target = lambda r: r["test_accuracy"] >= target  # noqa: E731
    results: dict[str, Any] = {}
    for method, options in methods.items():
        try:
            out = train(method, c, name, options, epochs=int(train_options.get("epochs", 10)),
                        batch_size=int(train_options.get("batch_size", 64)),
                        seed=int(train_options.get("seed", 0)), dtype=dtype,
                        lr_schedule=train_options.get("lr_schedule", "constant"),
                        metrics_path=run_dir / f"{method}.jsonl",
                        hidden=int(model.get("hidden", 128)),
                        checkpoint_dir=run_dir / "checkpoints" / method,
                        checkpoint_every=int(train_options.get("checkpoint_every", 0)),
                        stop=stop, device=_device(train_options))
        except Preempted as exc:
            if c.rank == 0:
                print(f"hpcqn run: {method}: {exc}; run the same command to resume "
                      f"(exit {EXIT_PREEMPTED})", flush=True)
            return {"job": config["job"]["name"], "model": name, "ranks": c.size,
                    "status": EXIT_PREEMPTED, "stopped_in": method, "step": exc.step}
        except (TypeError, ValueError) as exc:
            raise JobError(f"{path}: method {method!r}: {exc}") from exc
        records = out["records"]
        reached = next((r for r in records if reached_target(r)), None)
        results[method] = {"epochs": records,
                           "epochs_to_target": reached["epoch"] if reached else None,
                           "seconds_to_target": reached["seconds"] if reached else None}
    if c.rank == 0:
        print(f"hpcqn run: done (target {metric.replace('_', ' ')} {target}):", flush=True)
        for method, result in results.items():
            last = result["epochs"][-1]
            reached = (f"target at epoch {result['epochs_to_target']} "
                       f"({result['seconds_to_target']:.2f} s)"
                       if result["epochs_to_target"] else "target not reached")
            test = ("test loss {:.5f}".format(last["test_loss"]) if "test_loss" in last
                    else "test accuracy {:.4f}".format(last["test_accuracy"]))
            print(f"  {method:7s} train loss {last['train_loss']:.5f}  {test}  "
                  f"{last['seconds']:.2f} s  {reached}", flush=True)
    return {"job": config["job"]["name"], "model": name, "ranks": c.size, "target": target,
            "target_metric": metric,
            "methods": results, "status": 0}


def _run_minimize(path: str | Path, config: dict[str, Any], c: Communicator,
                  output: str | Path | None = None, fresh: bool = False,
                  stop: Any = None) -> dict[str, Any]:
    """The distributed L-BFGS on a named problem. With ``checkpoint_every`` in
    ``[options]`` the solver checkpoints into ``<run dir>/checkpoints`` that often (and
    always when signalled) and resumes from there unless ``fresh``."""
    problem_params = dict(config["problem"])
    name = problem_params.pop("name")
    options = dict(config.get("options", {}))
    every = int(options.pop("checkpoint_every", 0))
    run_dir = Path(output).parent if output else Path("runs") / config["job"]["name"]
    directory = run_dir / "checkpoints"
    if fresh and c.rank == 0:
        shutil.rmtree(directory, ignore_errors=True)
    c.barrier()
    try:
        problem = make_problem(name, **problem_params)
        parse_options("lbfgs", options)
    except (TypeError, ValueError) as exc:
        raise JobError(f"{path}: {exc}") from exc
    fun, x0 = problem.distributed(c)
    if c.rank == 0:
        print(
            f"hpcqn run: job {config['job']['name']!r}: {name} n={problem.n} "
            f"{problem.dtype} on {c.size} rank(s), options {options}",
            flush=True,
        )
    start = time.perf_counter()
    try:
        result = minimize(fun, x0, comm=c, options=options, stop=stop,
                          checkpoint_dir=directory if every or stop is not None else None,
                          checkpoint_every=every)
    except Preempted as exc:
        if c.rank == 0:
            print(f"hpcqn run: {exc}; run the same command to resume (exit "
                  f"{EXIT_PREEMPTED})", flush=True)
        return {"job": config["job"]["name"], "problem": name, "ranks": c.size,
                "status": EXIT_PREEMPTED, "nit": exc.step}
    seconds = time.perf_counter() - start
    summary = {
        "job": config["job"]["name"], "problem": name, "n": problem.n, "ranks": c.size,
        "status": int(result.status), "message": result.message, "fun": result.fun,
        "nit": result.nit, "nfev": result.nfev, "nallreduce": result.nallreduce,
        "comm_bytes": result.comm_bytes, "seconds": seconds,
    }
    solution = problem.solution()
    if solution is not None:
        part = problem.layout(c.size).local_slice(c.rank)
        local_error = float(np.max(np.abs(result.x - solution[part]), initial=0.0))
        _, top = c.allreduce_scalars([], [local_error])
        summary["error_inf"] = float(top[0])
    if c.rank == 0:
        error = f" max|x - x*| {summary['error_inf']:.2e}" if "error_inf" in summary else ""
        print(
            f"hpcqn run: done: {result.message}; f {result.fun:.6e}{error}; nit {result.nit} "
            f"nfev {result.nfev} reductions {result.nallreduce}; {seconds:.2f} s on "
            f"{c.size} rank(s)",
            flush=True,
        )
    return summary


STOCHASTIC_PROBLEMS = {"digits_softmax": DigitsSoftmax}


def _resumed_records(metrics: Path, checkpoints: Path) -> list[dict[str, Any]]:
    """The per-epoch records of a run that resumes from ``checkpoints``: the metrics
    file's lines up to the checkpoint's epoch (later lines were not kept)."""
    where = checkpoint.latest(checkpoints)
    if where is None or not metrics.exists():
        return []
    epoch = json.loads((where / "manifest.json").read_text())["meta"].get("epoch", 0)
    records = [json.loads(line) for line in metrics.read_text().splitlines() if line]
    return [r for r in records if r["epoch"] <= epoch]


def _run_stochastic(path: str | Path, config: dict[str, Any], c: Communicator,
                    output: str | Path | None = None, fresh: bool = False,
                    stop: Any = None) -> dict[str, Any]:
    """Train the problem once per method in ``[methods]``; per-epoch lines on rank 0; in
    the run directory a metrics file per method and ``checkpoints/<method>/`` (every
    epoch, every ``checkpoint_every`` steps of ``[train]``, and on a signal), from which
    a later run resumes unless ``fresh``."""
    params = dict(config["problem"])
    name = params.pop("name")
    train = dict(config.get("train", {}))
    methods = dict(config.get("methods", {}))
    if not methods:
        raise JobError(f"{path}: a stochastic job needs at least one [methods.NAME] table")
    if train.get("device", "cpu") != "cpu":
        raise JobError(f"{path}: [train] device applies to torch jobs; stochastic "
                       f"problems run on NumPy arrays (device = \"cpu\" or leave it out)")
    if name not in STOCHASTIC_PROBLEMS:
        raise JobError(f"{path}: unknown stochastic problem {name!r}; known: "
                       f"{sorted(STOCHASTIC_PROBLEMS)}")
    try:
        problem = STOCHASTIC_PROBLEMS[name](**params)
        base = {"epochs": int(train.get("epochs", 10)), "blocks": problem.block_sizes,
                "lr_schedule": train.get("lr_schedule", "constant"), "disp": False}
        for method, options in methods.items():
            make_optimizer(method, BlockLayout.from_sizes(problem.block_sizes, c.size), c,
                           dict(options))
    except (TypeError, ValueError) as exc:
        raise JobError(f"{path}: {exc}") from exc
    batch_size = int(train.get("batch_size", 64))
    run_dir = Path(output).parent if output else Path("runs") / config["job"]["name"]
    if c.rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        if fresh:
            shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    c.barrier()
    optimum = problem.optimum()
    target = optimum + float(train.get("target_gap", 0.01))
    if c.rank == 0:
        print(f"hpcqn run: job {config['job']['name']!r}: {name} n={problem.n}, "
              f"{len(problem.block_sizes)} blocks, batch {batch_size} over {c.size} rank(s); "
              f"optimum train loss {optimum:.6f}, target {target:.6f}", flush=True)
    results: dict[str, Any] = {}
    for method, options in methods.items():
        checkpoints, metrics = run_dir / "checkpoints" / method, run_dir / f"{method}.jsonl"
        done = _resumed_records(metrics, checkpoints)
        record: dict[str, Any] = {"epochs": done, "steps_to_target": None}
        for r in done:
            if record["steps_to_target"] is None and r["train_loss"] <= target:
                record["steps_to_target"], record["seconds_to_target"] = r["steps"], r["seconds"]
        if c.rank == 0:
            metrics.write_text("".join(json.dumps(r) + "\n" for r in done))
        clock = {"start": time.perf_counter() - (done[-1]["seconds"] if done else 0.0),
                 "evaluating": 0.0}

        def on_step(state: Any, method: str = method, record: dict = record,
                    clock: dict = clock) -> None:
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
                with (run_dir / f"{method}.jsonl").open("a") as stream:
                    stream.write(json.dumps(record["epochs"][-1]) + "\n")
            if record["steps_to_target"] is None and loss <= target:
                record["steps_to_target"], record["seconds_to_target"] = state.nit, seconds
            if c.rank == 0:
                print(f"{method:7s} epoch {state.epoch + 1:3d}: train loss {loss:.6f}  "
                      f"test accuracy {accuracy:.4f}  {seconds:7.2f} s", flush=True)

        try:
            result = minimize_stochastic(
                problem.batch_loss, problem.x0(), problem.batches(batch_size, c.rank, c.size),
                method=method, comm=c, options={**base, **options}, callback=on_step,
                checkpoint_dir=checkpoints, stop=stop,
                checkpoint_every=int(train.get("checkpoint_every", 0)))
        except Preempted as exc:
            if c.rank == 0:
                print(f"hpcqn run: {method}: {exc}; run the same command to resume "
                      f"(exit {EXIT_PREEMPTED})", flush=True)
            return {"job": config["job"]["name"], "problem": name, "ranks": c.size,
                    "status": EXIT_PREEMPTED, "stopped_in": method, "step": exc.step}
        record["skipped_steps"] = result.skipped_steps
        results[method] = record
    if c.rank == 0:
        print("hpcqn run: done:", flush=True)
        for method, record in results.items():
            last = record["epochs"][-1]
            reached = (f"target after {record['steps_to_target']} steps "
                       f"({record['seconds_to_target']:.2f} s)"
                       if record["steps_to_target"] is not None else "target not reached")
            print(f"  {method:7s} train loss {last['train_loss']:.6f}  test accuracy "
                  f"{last['test_accuracy']:.4f}  {last['seconds']:.2f} s  {reached}", flush=True)
    return {"job": config["job"]["name"], "problem": name, "ranks": c.size,
            "optimum": optimum, "target": target, "methods": results, "status": 0}
