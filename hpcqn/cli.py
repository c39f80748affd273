"""The ``hpcqn`` command line: ``hpcqn info``, ``hpcqn run JOB.toml``, ``hpcqn plot RUN...``.

Exit codes (distinct; ``hpcqn run``):

- 0 (:data:`EXIT_OK`): success;
- 1 (:data:`EXIT_NOT_CONVERGED`): the job ran but did not converge (summary status != 0);
- 2 (:data:`EXIT_BAD_INPUT`): bad input, found before any work: the job file (a missing,
  unreadable or invalid file, an unknown section or key, a value of the wrong type or out
  of range), options, a checkpoint that does not fit the job (or a run directory whose
  checkpoints were saved for a different job file: ``--fresh`` starts over), a launch
  whose world has fewer ranks than the launcher declared (:class:`hpcqn.LaunchError`: a
  Slurm task count, torchrun's ``WORLD_SIZE``, an MPI launcher's size; under torchrun
  ``hpcqn run`` initialises torch.distributed itself), a run directory in use by another
  run (its ``lock``). One line on stderr, from rank 0 only (every process, for a launch
  error: each is alone);
- 3 (:data:`EXIT_PREEMPTED`): stopped by SIGUSR1, SIGTERM or SIGINT (Ctrl-C) after
  writing a checkpoint, or before the first step (during the start-up: nothing was done,
  one line says so); run the same command again to resume (the ``slurm/`` templates
  requeue the job). The handlers are installed first thing, before any heavy import;
- 4 (:data:`hpcqn.comm.EXIT_FAILED`): a rank failed (out of memory, an error in a model or
  a callback, a second Ctrl-C): its error is printed once, by that rank, and every rank
  stops (by agreement, or by ``MPI_Abort``).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from .signals import EXIT_PREEMPTED, StopFlag, early_stop

EXIT_OK = 0
EXIT_NOT_CONVERGED = 1
EXIT_BAD_INPUT = 2
__all__ = ["EXIT_BAD_INPUT", "EXIT_NOT_CONVERGED", "EXIT_OK", "EXIT_PREEMPTED", "main"]


def _devices() -> str:
    try:
        import cupy
    except ImportError:
        return "none visible to CuPy (CuPy not installed); arrays live on the host (NumPy)"
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:  # CuPy installed without a driver or device
        return f"none ({type(exc).__name__}: {exc})"
    names = [cupy.cuda.runtime.getDeviceProperties(i)["name"].decode() for i in range(count)]
    return f"{count} CUDA device(s): {', '.join(names)}"


def info() -> int:
    """Print the MPI library, rank count, CUDA-awareness (direct device buffers or host
    staging, and why), the devices, and each rank's local rank and bound device (rank 0
    prints; every rank binds, so under a launcher this shows the real placement)."""
    import platform

    import numpy as np

    from . import __version__
    from .comm import detect_cuda_aware, get_comm, library_version
    from .device import bind

    comm = get_comm()
    bindings = comm.allgather_object(bind(comm).describe())
    if comm.rank != 0:
        return 0
    mpi_line = (library_version()
                or "not available (mpi4py not installed or HPCQN_NO_MPI=1): serial only")
    aware = detect_cuda_aware()
    path = ("yes: device buffers go to MPI directly" if aware.aware
            else "no: device buffers are staged through host buffers")
    print(f"hpcqn {__version__}")
    print(f"python    {platform.python_version()} on {platform.machine()}, numpy {np.__version__}")
    print(f"MPI       {mpi_line}")
    print(f"ranks     {comm.size}")
    print(f"CUDA-aware MPI  {path} ({aware.reason})")
    print(f"devices   {_devices()}")
    for rank, line in enumerate(bindings):
        print(f"rank {rank}    {line}")
    return 0


def limit_threads() -> int:
    """Give each rank its share of this node's cores for BLAS and OpenMP thread pools
    (NumPy's, SciPy's and torch's): several ranks on a node that each start a pool of
    all cores oversubscribe it, and OpenBLAS's spinning threads then slow every rank
    down many times. ``OMP_NUM_THREADS``, when set, wins. Returns the thread count."""
    import os

    from .comm import get_comm

    comm = get_comm()
    if "OMP_NUM_THREADS" in os.environ:
        threads = max(1, int(os.environ["OMP_NUM_THREADS"]))
    else:
        _, ranks_here = comm.node_local()
        threads = max(1, (os.cpu_count() or 1) // ranks_here)
    from threadpoolctl import threadpool_limits

    threadpool_limits(limits=threads)
    try:
        import torch
    except ImportError:
        pass
    else:
        torch.set_num_threads(threads)
    return threads


def main(argv: Sequence[str] | None = None) -> int:
    # Before anything else (the argument parsing, MPI, torch): from here on SIGUSR1,
    # SIGTERM and SIGINT only set a flag, which `hpcqn run` agrees on at its first
    # agreement (a stop before the first step: exit 3, one line). Other commands give
    # the signals back their handlers, and a signal caught meanwhile is delivered again.
    stop = early_stop() or StopFlag().install()
    try:
        try:
            args = _parser().parse_args(argv)
        except SystemExit:  # --help, --version or bad arguments
            stop.release()
            raise
        if args.command != "run":
            stop.release()
            code = info() if args.command == "info" else plot_command(args.runs, args.output)
        else:
            code = run_command(args.job, args.output, args.fresh, stop)
    finally:
        stop.restore()
    from .comm import exit_agreed

    exit_agreed()  # every rank returns the same code: its exit is no rank's lone failure
    return code


def _parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(prog="hpcqn",
                                     description=__doc__.splitlines()[0].replace("``", ""))
    parser.add_argument("--version", action="version", version=f"hpcqn {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="MPI library, rank count, CUDA-awareness, devices")
    run = sub.add_parser("run", help="run a job file (jobs/*.toml) on every rank")
    run.add_argument("job", help="path to a job TOML file")
    run.add_argument("--output", help="write the summary as JSON here (rank 0); torch jobs "
                     "keep their run directory (metrics, checkpoints) next to it")
    run.add_argument("--fresh", action="store_true",
                     help="ignore existing checkpoints (default: resume from the latest)")
    draw = sub.add_parser("plot", help="loss and accuracy curves of run directories (PNG)")
    draw.add_argument("runs", nargs="+", help="run directories (with metrics *.jsonl)")
    draw.add_argument("--output", default="hpcqn-plot.png", help="the PNG to write")
    return parser


def run_command(job: str, output: str | None = None, fresh: bool = False,
                stop: StopFlag | None = None) -> int:
    """``hpcqn run``: the exit code (see the module docstring). Bad input is found on
    every rank alike (every rank reads the same job file, agreed by its digest, and checks
    it the same way; the run directory's verdict is rank 0's, broadcast; checkpoint errors
    are agreed in the reading), so each rank knows the outcome and only rank 0 prints it.
    A failure on one rank that every rank learnt of in an agreement is printed once, by
    that rank (exit 4); any other failure aborts every rank (:func:`abort_on_failure`).
    ``stop``: the flag :func:`main` installed first (else one is installed here)."""
    if stop is None:
        with StopFlag() as own:
            return run_command(job, output, fresh, own)
    import traceback

    from .checkpoint import CheckpointError
    from .comm import EXIT_FAILED, RemoteRankError, abort_on_failure, get_comm, is_agreed
    from .experiments.jobs import JobError, run_job
    from .transport import LaunchError, start_torch_distributed, stop_torch_distributed

    owned = start_torch_distributed()  # under torchrun: torch.distributed's group is the world
    try:
        comm = get_comm()
    except LaunchError as exc:  # every process finds the same: each says it, exit 2
        _error(0, str(exc).removeprefix("hpcqn: "))
        return EXIT_BAD_INPUT
    limit_threads()
    with abort_on_failure(comm):
        try:
            summary = run_job(job, comm=comm, output=output, fresh=fresh, stop=stop)
        except (JobError, CheckpointError) as exc:
            _error(comm.rank, str(exc))
            return EXIT_BAD_INPUT
        except RemoteRankError as exc:
            # Another rank failed: it prints its own error; bad input is printed by rank 0.
            if exc.remote_type in ("JobError", "CheckpointError"):
                _error(comm.rank, str(exc))
                return EXIT_BAD_INPUT
            return EXIT_FAILED
        except BaseException as exc:
            if not is_agreed(exc):
                raise  # only this rank knows: abort_on_failure ends every rank
            print(f"hpcqn run: rank {comm.rank} failed (every rank stops):\n"
                  + "".join(traceback.format_exception(exc)).rstrip(), file=sys.stderr,
                  flush=True)
            return EXIT_FAILED
    if owned:
        stop_torch_distributed(comm)
    if summary["status"] == EXIT_PREEMPTED:
        return EXIT_PREEMPTED
    return EXIT_OK if summary["status"] == 0 else EXIT_NOT_CONVERGED


def _error(rank: int, message: str) -> None:
    """One line on stderr, rank 0 only."""
    if rank == 0:
        print("hpcqn run: error: " + " ".join(message.split()), file=sys.stderr, flush=True)


def plot_command(runs: list[str], output: str) -> int:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("hpcqn plot: needs matplotlib: pip install 'hpcqn[plot]'", file=sys.stderr)
        return 2
    from .plot import plot

    try:
        path = plot(runs, output)
    except (FileNotFoundError, ValueError, KeyError) as exc:
        print(f"hpcqn plot: error: {exc}", file=sys.stderr)
        return 2
    print(f"hpcqn plot: wrote {path}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
