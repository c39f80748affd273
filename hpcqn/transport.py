"""What carries hpcqn's collectives, and how many processes the launcher started.

A :class:`hpcqn.comm.Communicator` runs its collectives over one transport:

- :class:`MPITransport`: an mpi4py communicator (``mpiexec``, ``srun`` with MPI);
- :class:`TorchTransport`: a ``torch.distributed`` process group (``torchrun``, ``srun``
  with ``init_process_group``): gloo on CPUs, NCCL for CUDA tensors.

Both take the same buffers (1-D or n-D arrays of the namespace the communicator hands
them: NumPy, or CuPy where the transport reads device memory) and do the same things:
``allreduce``, ``reduce_scatter``, ``allgather`` (equal blocks), ``allgatherv``,
``bcast``, the two small-object collectives, ``node_local``, ``barrier`` and ``abort``.
The optimizers never see which one runs; the communicator counts bytes the same way over
both.

:func:`declared_processes` reads what the launcher says (``WORLD_SIZE`` for torchrun,
``SLURM_STEP_NUM_TASKS``/``SLURM_NTASKS`` for srun, ``PMI_SIZE``/``OMPI_COMM_WORLD_SIZE``
/``MV2_COMM_WORLD_SIZE`` for the MPI launchers), so that a process that ended up alone in
a communicator of one rank while the launcher started several is refused
(:func:`check_launch`) instead of training on its own.
"""

from __future__ import annotations

import os
import socket
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import backend

# Environment variables an MPI launcher sets in every process it starts: one of them
# present means "this is an MPI launch" (its world is then MPI's, not torch.distributed's).
MPI_LAUNCH_MARKERS = ("PMI_RANK", "PMI_SIZE", "PMI_FD", "PMIX_RANK", "OMPI_COMM_WORLD_SIZE",
                      "OMPI_COMM_WORLD_RANK", "MV2_COMM_WORLD_SIZE", "MPI_LOCALNRANKS")
# Variables that name the process count, by launcher.
MPI_SIZES = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")


class LaunchError(RuntimeError):
    """The launcher started more processes than the communicator has (raised on every
    process, with one line saying what was found and how to launch)."""


def mpi_launch() -> bool:
    """Whether this process was started by an MPI launcher (``mpiexec``, ``mpirun``, or
    ``srun`` with an MPI plugin)."""
    return any(name in os.environ for name in MPI_LAUNCH_MARKERS)


@dataclass(frozen=True)
class Declared:
    """A process count a launcher declared: ``count`` processes, said by ``variable``."""

    count: int
    variable: str
    launcher: str


def declared_processes(environ: Any = None) -> list[Declared]:
    """Every process count the environment declares (torchrun's ``WORLD_SIZE``, the MPI
    launchers' sizes, and Slurm's step task count: ``SLURM_STEP_NUM_TASKS``, else
    ``SLURM_NTASKS``, unless ``HPCQN_IGNORE_SLURM=1``); values that are not positive
    integers are ignored."""
    env = os.environ if environ is None else environ
    found = []
    names = [("WORLD_SIZE", "torchrun")] + [(n, "MPI") for n in MPI_SIZES]
    if env.get("HPCQN_IGNORE_SLURM") != "1":
        slurm = "SLURM_STEP_NUM_TASKS" if env.get("SLURM_STEP_NUM_TASKS") else "SLURM_NTASKS"
        names.append((slurm, "Slurm"))
    for name, launcher in names:
        value = env.get(name, "").strip()
        if value.isdigit() and int(value) > 0:
            found.append(Declared(int(value), name, launcher))
    return found


def check_launch(size: int, transport: str, environ: Any = None) -> None:
    """Raise :class:`LaunchError` when a launcher declared more processes than ``size``
    (the communicator's rank count; ``transport`` names it in the message). Every process
    of such a launch finds the same and raises the same one line."""
    for d in declared_processes(environ):
        if d.count > size:
            raise LaunchError(
                f"hpcqn: the launcher declared {d.count} processes ({d.variable}={d.count}) "
                f"but this process's {transport} communicator has {size} rank(s), so every "
                f"process would train alone. Launch with MPI (mpiexec -n {d.count} python "
                f"..., or srun with mpi4py built against the cluster's MPI), or with torchrun"
                f"/srun and torch.distributed.init_process_group() called before hpcqn "
                f"creates its communicator. (HPCQN_IGNORE_SLURM=1 ignores Slurm's count.)")


def torchrun_launch() -> bool:
    """Whether torchrun (torch's elastic launcher) started this process."""
    return "TORCHELASTIC_RUN_ID" in os.environ


def start_torch_distributed() -> bool:
    """For programs hpcqn owns (the ``hpcqn`` command): under torchrun, and no MPI
    launch, initialise ``torch.distributed``'s default group (``"cpu:gloo,cuda:nccl"``
    when CUDA is available: host buffers over gloo, device tensors over NCCL; gloo
    alone otherwise) unless it is already. Returns whether the group is torch's. A
    library call never does this itself: a user's program initialises its group."""
    if not torchrun_launch() or mpi_launch():
        return False
    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        cuda = torch.cuda.is_available() and os.environ.get("HPCQN_DEVICE") != "cpu"
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0"))
                                  % torch.cuda.device_count())
        dist.init_process_group("cpu:gloo,cuda:nccl" if cuda else "gloo")
    return True



def stop_torch_distributed(comm: Any) -> None:
    """The end of :func:`start_torch_distributed`'s group, on every process together: a
    barrier over ``comm``, then ``destroy_process_group`` (a process that exits while
    another is still in a gloo collective can make that one abort in gloo's threads)."""
    import torch.distributed as dist

    comm.barrier()
    dist.destroy_process_group()

def torch_default_group() -> Any | None:
    """``torch.distributed``'s default process group when torch is imported and the group
    is initialised; None otherwise (torch is never imported here)."""
    dist = _torch_distributed()
    if dist is None or not dist.is_available() or not dist.is_initialized():
        return None
    return dist.group.WORLD


def _torch_distributed() -> Any | None:
    if "torch" not in sys.modules:  # nobody imported torch: nobody initialised it
        return None
    try:
        import torch.distributed as dist
    except ImportError:  # pragma: no cover - torch without distributed support
        return None
    return dist


def is_torch_group(obj: Any) -> bool:
    """Whether ``obj`` is a ``torch.distributed`` process group."""
    dist = _torch_distributed()
    return dist is not None and dist.is_available() and isinstance(obj, dist.ProcessGroup)


# -- MPI -------------------------------------------------------------------------------------
class MPITransport:
    """Collectives over an mpi4py communicator (any object with mpi4py's methods)."""

    name = "MPI"

    def __init__(self, mpi_comm: Any, mpi: Any):
        self.comm, self.MPI = mpi_comm, mpi
        self.rank, self.size = mpi_comm.Get_rank(), mpi_comm.Get_size()

    def _op(self, op: str) -> Any:
        return {"sum": self.MPI.SUM, "max": self.MPI.MAX, "min": self.MPI.MIN}[op]

    def allreduce(self, send: Any, recv: Any, op: str) -> None:
        """``recv = op over ranks of send``; ``send`` None: in place on ``recv``."""
        self.comm.Allreduce(self.MPI.IN_PLACE if send is None else send, recv, op=self._op(op))

    def reduce_scatter(self, send: Any, recv: Any, counts: Sequence[int]) -> None:
        self.comm.Reduce_scatter(send, recv, recvcounts=list(counts))

    def allgather(self, send: Any, recv: Any) -> None:
        """Equal blocks: ``recv[r]`` becomes rank ``r``'s ``send``."""
        self.comm.Allgather(send, recv)

    def allgatherv(self, send: Any, recv: Any, counts: Sequence[int],
                   displs: Sequence[int]) -> None:
        """Rank ``r``'s ``send`` into ``recv[displs[r]:][:counts[r]]``; ``send`` None: this
        rank's segment of ``recv`` already holds it (in place)."""
        self.comm.Allgatherv(self.MPI.IN_PLACE if send is None else send,
                             [recv, list(counts), list(displs), None])

    def bcast(self, buf: Any, root: int) -> None:
        self.comm.Bcast(buf, root=root)

    def bcast_object(self, obj: Any, root: int) -> Any:
        return self.comm.bcast(obj, root=root)

    def allgather_object(self, obj: Any) -> list[Any]:
        return list(self.comm.allgather(obj))

    def node_local(self) -> tuple[int, int]:
        local = self.comm.Split_type(self.MPI.COMM_TYPE_SHARED, key=self.rank)
        try:
            return local.Get_rank(), local.Get_size()
        finally:
            local.Free()

    def barrier(self) -> None:
        self.comm.Barrier()

    def abort(self, code: int) -> None:
        self.comm.Abort(code)  # pragma: no cover - the process ends here


# -- torch.distributed -----------------------------------------------------------------------
class TorchTransport:
    """Collectives over a ``torch.distributed`` process group. Buffers are wrapped as
    tensors without a copy (``torch.from_numpy``, DLPack for CuPy). gloo takes host
    tensors (device arrays are staged by the communicator: ``device_ok`` is False); NCCL
    alone takes only CUDA tensors, so host buffers are copied to the current CUDA device
    and back (only the small agreements travel so; arrays of the optimizers are on the
    device already); a group of both (``"cpu:gloo,cuda:nccl"``) takes each where it is.
    gloo has no uneven allgather: blocks are padded to the largest."""

    name = "torch.distributed"

    def __init__(self, group: Any):
        import torch
        import torch.distributed as dist

        self.torch, self.dist, self.group = torch, dist, group
        self.rank, self.size = dist.get_rank(group), dist.get_world_size(group)
        self.backend = str(dist.get_backend(group)).lower()
        self.device_ok = "nccl" in self.backend  # CUDA tensors go to the transport as they are
        self.host_ok = "gloo" in self.backend or "mpi" in self.backend
        # torch 2.13 renamed the single-tensor collectives; older releases have the others
        self._gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
        self._scatter = (getattr(dist, "reduce_scatter_single", None)
                         or dist.reduce_scatter_tensor)

    # tensors from buffers -----------------------------------------------------------------
    def _tensor(self, a: Any) -> tuple[Any, Any]:
        """``(tensor, host)``: a tensor sharing ``a``'s memory, or (NCCL and a host
        array) a device copy, with ``host`` the array to copy the result back into."""
        torch = self.torch
        if backend.is_device_array(a):
            return torch.from_dlpack(a), None
        t = torch.from_numpy(a if a.flags.writeable else a.copy())
        if not self.host_ok:
            return t.to(f"cuda:{torch.cuda.current_device()}"), a
        return t, None

    def _back(self, t: Any, host: Any) -> None:
        if host is not None:
            host[...] = t.cpu().numpy().reshape(host.shape)

    def _src(self, root: int) -> int:
        """The global rank of the group's rank ``root`` (torch's ``src`` is global)."""
        return self.dist.get_global_rank(self.group, root) if self.group is not None else root

    def _op(self, op: str) -> Any:
        r = self.dist.ReduceOp
        return {"sum": r.SUM, "max": r.MAX, "min": r.MIN}[op]

    # collectives --------------------------------------------------------------------------
    def allreduce(self, send: Any, recv: Any, op: str) -> None:
        if send is not None:
            recv[...] = send
        t, host = self._tensor(recv)
        self.dist.all_reduce(t, op=self._op(op), group=self.group)
        self._back(t, host)

    def reduce_scatter(self, send: Any, recv: Any, counts: Sequence[int]) -> None:
        counts = [int(c) for c in counts]
        s, _ = self._tensor(send)
        r, host = self._tensor(recv)
        if len(set(counts)) == 1:
            self._scatter(r, s, group=self.group)
        else:
            displs = np.concatenate(([0], np.cumsum(counts)[:-1])).astype(int)
            self.dist.reduce_scatter(r, [s[d : d + c] for d, c in zip(displs, counts,
                                                                      strict=True)],
                                     group=self.group)
        self._back(r, host)

    def allgather(self, send: Any, recv: Any) -> None:
        s, _ = self._tensor(send)
        r, host = self._tensor(recv)
        self._gather(r.reshape(-1), s.reshape(-1), group=self.group)
        self._back(r, host)

    def allgatherv(self, send: Any, recv: Any, counts: Sequence[int],
                   displs: Sequence[int]) -> None:
        counts, displs = [int(c) for c in counts], [int(d) for d in displs]
        mine = slice(displs[self.rank], displs[self.rank] + counts[self.rank])
        if send is None:
            send = recv[mine]
        width = max(counts)
        if len(set(counts)) == 1 and displs == [width * r for r in range(self.size)]:
            s, _ = self._tensor(backend.namespace(recv).ascontiguousarray(send))
            r, host = self._tensor(recv)
            self._gather(r, s, group=self.group)
            self._back(r, host)
            return
        xp = backend.namespace(recv)
        padded = xp.zeros(width, dtype=recv.dtype)
        padded[: counts[self.rank]] = send
        table = xp.empty(width * self.size, dtype=recv.dtype)
        s, _ = self._tensor(padded)
        r, host = self._tensor(table)
        self._gather(r, s, group=self.group)
        self._back(r, host)
        for rank, (c, d) in enumerate(zip(counts, displs, strict=True)):
            recv[d : d + c] = table[rank * width : rank * width + c]

    def bcast(self, buf: Any, root: int) -> None:
        t, host = self._tensor(buf)
        self.dist.broadcast(t, src=self._src(root), group=self.group)
        self._back(t, host)

    def bcast_object(self, obj: Any, root: int) -> Any:
        box = [obj]
        self.dist.broadcast_object_list(box, src=self._src(root), group=self.group)
        return box[0]

    def allgather_object(self, obj: Any) -> list[Any]:
        out: list[Any] = [None] * self.size
        self.dist.all_gather_object(out, obj, group=self.group)
        return out

    def node_local(self) -> tuple[int, int]:
        """From torchrun's ``LOCAL_RANK``/``LOCAL_WORLD_SIZE`` for the default group;
        otherwise from the ranks' host names (one small gather)."""
        env = os.environ
        if (self.group is None or self.group is self.dist.group.WORLD) and env.get(
                "LOCAL_RANK", "").isdigit() and env.get("LOCAL_WORLD_SIZE", "").isdigit():
            return int(env["LOCAL_RANK"]), int(env["LOCAL_WORLD_SIZE"])
        hosts = self.allgather_object(socket.gethostname())
        mine = [r for r, h in enumerate(hosts) if h == hosts[self.rank]]
        return mine.index(self.rank), len(mine)

    def barrier(self) -> None:
        self.dist.barrier(group=self.group)

    def abort(self, code: int) -> None:
        """torch.distributed has no abort of the group: this process ends at once with
        ``code``; the launcher (torchrun's agent, srun) ends the others, and a rank
        already waiting on this one fails in its collective when the connection closes."""
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)  # pragma: no cover - the process ends here
