"""Job files: TOML experiment definitions that ``hpcqn run`` executes.

A job names its kind, its problem and the solver options::

    [job]
    kind = "minimize"            # the distributed L-BFGS on a test problem
    [problem]
    name = "extended_rosenbrock" # see hpcqn.problems.PROBLEMS
    n = 200000
    dtype = "float64"
    [options]                    # hpcqn.minimize options
    history = 10
    disp = 25

Unknown sections or keys are errors, raised before any work starts.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from .comm import Communicator, get_comm
from .minimize import minimize, parse_options
from .problems import make_problem

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

JOB_KINDS = ("minimize",)
SECTIONS = {"job": {"kind", "name", "description"}, "problem": None, "options": None}


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
    job = config.get("job", {})
    unknown = sorted(set(job) - SECTIONS["job"])
    if unknown:
        raise JobError(f"{path}: unknown key(s) {unknown} in [job]")
    kind = job.get("kind")
    if kind not in JOB_KINDS:
        raise JobError(f"{path}: [job] kind must be one of {JOB_KINDS}, got {kind!r}")
    if "name" not in config.get("problem", {}):
        raise JobError(f"{path}: [problem] needs a name")
    job.setdefault("name", path.stem)
    config["job"] = job
    return config


def run_job(path: str | Path, comm: Any = None, output: str | Path | None = None) -> dict[str, Any]:
    """Run a job on every rank of ``comm``; rank 0 prints progress and a summary line
    and, with ``output``, writes the summary as JSON. Returns the summary."""
    config = load_job(path)
    c: Communicator = get_comm(comm)
    problem_params = dict(config["problem"])
    name = problem_params.pop("name")
    options = dict(config.get("options", {}))
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
    result = minimize(fun, x0, comm=c, options=options)
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
        if output is not None:
            Path(output).write_text(json.dumps(summary, indent=2) + "\n")
    return summary
