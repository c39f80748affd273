"""The ``hpcqn`` command line: ``hpcqn info``, ``hpcqn run JOB.toml``, ``hpcqn plot RUN...``.

Exit codes: 0 success, 1 the job ran but did not converge (status != 0), 2 bad
input (job file, options, a checkpoint that does not fit, a Slurm task-count mismatch),
3 stopped by SIGUSR1/SIGTERM after writing a checkpoint (run the same command again to
resume; the ``slurm/`` templates requeue the job).
"""

from __future__ import annotations

import argparse
import platform
import sys
from collections.abc import Sequence

import numpy as np


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
    from . import __version__
    from .comm import _mpi, detect_cuda_aware, get_comm
    from .device import bind

    comm = get_comm()
    bindings = comm.allgather_object(bind(comm).describe())
    if comm.rank != 0:
        return 0
    MPI = _mpi()
    if MPI is None:
        mpi_line = "not available (mpi4py not installed or HPCQN_NO_MPI=1): serial only"
    else:
        import mpi4py

        library = " ".join(MPI.Get_library_version().split("\n")[0].split())
        version = ".".join(map(str, MPI.Get_version()))
        mpi_line = f"{library} (MPI {version}, mpi4py {mpi4py.__version__})"
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

    from .comm import _mpi, get_comm

    comm = get_comm()
    if "OMP_NUM_THREADS" in os.environ:
        threads = max(1, int(os.environ["OMP_NUM_THREADS"]))
    else:
        ranks_here = 1
        if comm.size > 1:
            local = comm.mpi_comm.Split_type(_mpi().COMM_TYPE_SHARED)
            ranks_here = local.Get_size()
            local.Free()
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
    parser = argparse.ArgumentParser(prog="hpcqn", description=__doc__.splitlines()[0])
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
    args = parser.parse_args(argv)
    if args.command == "info":
        return info()
    if args.command == "plot":
        return plot_command(args.runs, args.output)
    from .checkpoint import CheckpointError
    from .comm import RemoteRankError, get_comm
    from .experiments.jobs import JobError, run_job
    from .signals import EXIT_PREEMPTED, StopFlag

    problem = slurm_mismatch(get_comm().size)
    if problem:
        print(f"hpcqn run: error: {problem}", file=sys.stderr, flush=True)
        return 2
    limit_threads()
    try:
        with StopFlag() as stop:
            summary = run_job(args.job, output=args.output, fresh=args.fresh, stop=stop)
    except (JobError, CheckpointError) as exc:
        print(f"hpcqn run: error: {exc}", file=sys.stderr, flush=True)
        return 2
    except RemoteRankError as exc:
        if "CheckpointError" in str(exc) or "JobError" in str(exc):
            return 2  # the failing rank printed it
        raise
    if summary["status"] == EXIT_PREEMPTED:
        return EXIT_PREEMPTED
    return 0 if summary["status"] == 0 else 1


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


def slurm_mismatch(size: int) -> str | None:
    """Under Slurm, the task count of the step (or job) must be the communicator's size:
    ``python`` started by ``sbatch`` without ``srun`` is one process per task, each a
    singleton MPI world that would run the whole job alone. ``HPCQN_IGNORE_SLURM=1``
    skips the check."""
    import os

    if os.environ.get("HPCQN_IGNORE_SLURM") == "1":
        return None
    tasks = os.environ.get("SLURM_STEP_NUM_TASKS") or os.environ.get("SLURM_NTASKS")
    if not tasks or not tasks.isdigit() or int(tasks) == size:
        return None
    return (f"Slurm runs this with {tasks} task(s) but the MPI world has {size} rank(s): "
            f"launch with 'srun hpcqn run ...' (or mpiexec inside the allocation), not "
            f"'python'/'hpcqn' alone; mpi4py must be built against Slurm's MPI. Set "
            f"HPCQN_IGNORE_SLURM=1 to skip this check.")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
