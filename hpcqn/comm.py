"""The one place where hpcqn's ranks talk to each other.

:class:`Communicator` runs collectives on backend arrays (NumPy, CuPy): ``allreduce``,
``reduce_scatter``, ``allgatherv``, ``bcast``, over a transport
(:mod:`hpcqn.transport`): an mpi4py communicator or a ``torch.distributed`` process
group. ``comm=None`` means the process's world: MPI's ``COMM_WORLD`` under an MPI launch,
``torch.distributed``'s default group when it is initialised and no MPI launch is
present (torchrun, srun with ``init_process_group``), else ``COMM_WORLD`` (one rank in a
plain ``python`` run). A world of fewer ranks than the launcher declared is refused
(:class:`hpcqn.transport.LaunchError`). On one rank the same class runs serially with no
calls. Every collective is counted (calls and payload bytes) so that drivers can report
communication volume, the same over either transport.

Device arrays (anything exposing ``__cuda_array_interface__``) go to MPI directly when
the library is CUDA-aware, after their stream is synchronised. Otherwise they are staged:
copied into a host buffer cached per role, dtype and size (page-locked when the array is
a CuPy array), the collective runs on host buffers, and the result is copied back into
an array of the input's kind. Staging buffers never leave the communicator.

Small scalar reductions (:meth:`Communicator.allreduce_scalars`) are computed from an
allgather of every rank's values, summed in rank order on every rank: the result is
bitwise identical on all ranks and deterministic for a fixed rank count, so that every
rank takes the same branch in an algorithm. The same reduction carries an error flag,
which is how a failure on one rank reaches all the others instead of leaving them
waiting in a collective. The counters record such a reduction as an "allreduce" call
whose received bytes are the whole table (``P`` times what the rank sent): for the few
dozen numbers these carry, an allgather costs the same latency as an allreduce.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import functools
import os
import sys
import threading
import time
import traceback
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from . import backend
from .transport import (
    MPITransport,
    TorchTransport,
    check_launch,
    is_torch_group,
    mpi_launch,
    torch_default_group,
)

# Exit code of a job stopped because one rank failed (its error printed once, the others
# ended by MPI_Abort or by the agreement); see hpcqn.cli for the others.
EXIT_FAILED = 4


class RemoteRankError(RuntimeError):
    """Raised on every rank when another rank failed; names that rank and its error."""

    def __init__(self, rank: int, message: str, remote_type: str | None = None):
        super().__init__(f"rank {rank} failed: {message}")
        self.rank = rank
        self.remote_message = message
        self.remote_type = remote_type  # the class name of the failing rank's error


def mark_agreed(error: BaseException) -> BaseException:
    """Mark ``error`` as known to every rank (it travelled in an agreement), so that
    :func:`abort_on_failure` lets it end the run normally instead of aborting."""
    error.hpcqn_agreed = True  # type: ignore[attr-defined]
    return error


def is_agreed(error: BaseException) -> bool:
    """Whether every rank knows of ``error`` (see :func:`mark_agreed`)."""
    return isinstance(error, RemoteRankError) or getattr(error, "hpcqn_agreed", False)


def _mpi() -> Any | None:
    """The ``mpi4py.MPI`` module, or None when mpi4py is not installed (or disabled)."""
    if os.environ.get("HPCQN_NO_MPI", "0") == "1":
        return None
    try:
        from mpi4py import MPI
    except ImportError:
        return None
    return MPI


@dataclass
class CollectiveCounter:
    """Calls, payload bytes this rank contributed (``nbytes``) and bytes it received
    (``nbytes_received``) for one kind of collective."""

    calls: int = 0
    nbytes: int = 0
    nbytes_received: int = 0
    seconds: float = 0.0  # wall time inside these calls (waiting for other ranks included)


@dataclass
class Reduced:
    """What :meth:`Communicator.allreduce_named` returns: sums and maxes by name, and every
    rank's value of each name that should be the same on every rank (``per_rank``)."""

    sums: dict[str, float]
    maxes: dict[str, float]
    per_rank: dict[str, list[float]] = field(default_factory=dict)

    @property
    def differ(self) -> list[str]:
        """The names of ``per_rank`` whose values are not the same on every rank (NaN is
        the same as NaN here)."""
        return [name for name, values in self.per_rank.items()
                if len({repr(v) for v in values}) > 1]

    def describe(self, name: str, show: Callable[[float], str] = repr) -> str:
        """Which ranks hold which value of ``name``: ``rank 0: 0.1; ranks 1-2: 0.2``."""
        return describe_ranks([show(v) for v in self.per_rank[name]])


UNSET = object()  # a value not given (shown as such when ranks are compared)


def shown(value: Any) -> str:
    """A value as ranks compare it: its repr (lists as tuples); a callable is "a callable"
    (its address differs between processes), :data:`UNSET` "not given"."""
    if value is UNSET:
        return "not given"
    if callable(value):
        return "a callable"
    return repr(tuple(value) if isinstance(value, list) else value)


def fingerprint(value: Any) -> float:
    """A number for :func:`shown` ``(value)`` (its CRC-32), to compare it across ranks."""
    return float(zlib.crc32(shown(value).encode()))


def describe_ranks(values: Sequence[str]) -> str:
    """Every rank's value (in rank order) grouped: ``ranks 0, 2: 'a'; rank 1: 'b'``."""
    groups: dict[str, list[int]] = {}
    for rank, value in enumerate(values):
        groups.setdefault(value, []).append(rank)
    return "; ".join(f"rank{'s' if len(r) > 1 else ''} {_ranges(r)}: {value}"
                     for value, r in groups.items())


def _ranges(ranks: list[int]) -> str:
    """``[0, 1, 2, 5]`` as ``0-2, 5``."""
    parts, start = [], ranks[0]
    for previous, current in zip(ranks, [*ranks[1:], None], strict=True):
        if current != previous + 1 if current is not None else True:
            parts.append(str(start) if start == previous else f"{start}-{previous}")
            start = current
    return ", ".join(parts)


@dataclass
class CudaAwareness:
    aware: bool
    reason: str


def detect_cuda_aware() -> CudaAwareness:
    """Whether the MPI library can take device pointers, and how that was decided.

    Order: the ``HPCQN_CUDA_AWARE=0/1`` override; the vendor query
    ``MPIX_Query_cuda_support`` (Open MPI) when the loaded library exports it; the
    vendors' switches (``MPICH_GPU_SUPPORT_ENABLED``, ``OMPI_MCA_opal_cuda_support``,
    ``MV2_USE_CUDA``, ``I_MPI_OFFLOAD``); otherwise not aware (host staging, always safe).
    """
    override = os.environ.get("HPCQN_CUDA_AWARE")
    if override is not None:
        if override not in ("0", "1"):
            raise ValueError(f"HPCQN_CUDA_AWARE must be 0 or 1, got {override!r}")
        return CudaAwareness(override == "1", f"HPCQN_CUDA_AWARE={override}")
    MPI = _mpi()
    if MPI is not None:
        try:  # mpi4py loads libmpi privately: look the symbol up through its module
            query = ctypes.CDLL(MPI.__file__).MPIX_Query_cuda_support
        except (AttributeError, OSError):
            query = None
        if query is not None:
            query.restype = ctypes.c_int
            return CudaAwareness(bool(query()), "MPIX_Query_cuda_support()")
    switches = {
        "MPICH_GPU_SUPPORT_ENABLED": ("1",),
        "OMPI_MCA_opal_cuda_support": ("1", "true"),
        "MV2_USE_CUDA": ("1",),
        "I_MPI_OFFLOAD": ("1", "2"),
    }
    for name, on in switches.items():
        value = os.environ.get(name, "").lower()
        if value:
            return CudaAwareness(value in on, f"{name}={value}")
    return CudaAwareness(False, "no CUDA-aware MPI detected; device buffers are staged")


def _timed(method: Callable[..., Any]) -> Callable[..., Any]:
    """Adds the call's wall time to the counter of the collective it ran (the outermost
    call only: a collective made of others is timed once)."""

    @functools.wraps(method)
    def wrapper(self: Communicator, *args: Any, **kwargs: Any) -> Any:
        if self._depth:
            return method(self, *args, **kwargs)
        self._depth, self._kind = 1, None
        start = time.perf_counter()
        try:
            return method(self, *args, **kwargs)
        finally:
            self._depth = 0
            if self._kind is not None:
                self.counters[self._kind].seconds += time.perf_counter() - start

    return wrapper


@dataclass
class Communicator:
    """Collectives over an mpi4py communicator or a ``torch.distributed`` process group
    (``Communicator(group)``); serial when given None. ``mpi_comm`` is the mpi4py
    communicator (None over torch.distributed), ``transport`` what carries the calls
    (:mod:`hpcqn.transport`; None when serial)."""

    mpi_comm: Any = None
    counters: dict[str, CollectiveCounter] = field(default_factory=dict)
    cuda_aware: bool = False
    # Host staging buffers by (role, dtype, size), for device arrays when not CUDA-aware.
    staging: dict[tuple[str, str, int], np.ndarray] = field(default_factory=dict, repr=False)
    transport: Any = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.transport is None and self.mpi_comm is not None:
            if is_torch_group(self.mpi_comm):
                self.transport, self.mpi_comm = TorchTransport(self.mpi_comm), None
            else:
                self.transport = MPITransport(self.mpi_comm, _mpi())
        if isinstance(self.transport, MPITransport):
            self.mpi_comm = self.transport.comm
        if isinstance(self.transport, TorchTransport):
            # NCCL reads device memory; gloo takes host buffers (device arrays are staged)
            self.cuda_aware = self.transport.device_ok
        self.rank = 0 if self.transport is None else self.transport.rank
        self.size = 1 if self.transport is None else self.transport.size
        self._parallel = self.size > 1
        self._depth, self._kind = 0, None
        if self._parallel:
            install_exit_abort(self)

    @property
    def transport_name(self) -> str:
        """``"MPI"``, ``"torch.distributed"`` or ``"serial"``."""
        return "serial" if self.transport is None else self.transport.name

    # -- bookkeeping ---------------------------------------------------------------
    def _count(self, kind: str, nbytes: int, received: int | None = None) -> None:
        counter = self.counters.setdefault(kind, CollectiveCounter())
        if self._parallel:
            _collective_made()
        counter.calls += 1
        counter.nbytes += int(nbytes)
        counter.nbytes_received += int(nbytes if received is None else received)
        self._kind = kind

    def calls(self, kind: str) -> int:
        """How many ``kind`` collectives ("allreduce", "allgatherv", ...) ran so far."""
        return self.counters.get(kind, CollectiveCounter()).calls

    def reset_counters(self) -> None:
        self.counters.clear()

    # -- device buffers ------------------------------------------------------------
    def _direct(self, a: Any) -> bool:
        """Whether MPI may read and write ``a`` itself: a host array, or a device array
        when the library is CUDA-aware."""
        return self.cuda_aware or not backend.is_device_array(a)

    def _host_buffer(self, role: str, template: Any, shape: int | tuple[int, ...]) -> Any:
        """The cached host buffer for ``role`` ("send", "recv"), ``template``'s dtype and
        ``shape``: allocated once, pinned when ``template`` is a CuPy array, and reused by
        every later collective of that role, dtype and size (staging then allocates
        nothing in a training loop, whose collectives repeat the same sizes)."""
        shape = (shape,) if isinstance(shape, int) else tuple(shape)
        size = int(np.prod(shape))
        key = (role, np.dtype(template.dtype).str, size)
        buffer = self.staging.get(key)
        if buffer is None:
            buffer = backend.empty_host(size, template.dtype, backend.is_cupy_array(template))
            self.staging[key] = buffer
        return buffer.reshape(shape)

    def _to_mpi(self, a: Any) -> Any:
        """A buffer MPI may read: ``a`` itself (a device array once its stream is
        synchronised), or ``a`` staged into the cached host "send" buffer."""
        if self._direct(a):
            backend.synchronize(a)
            return a
        return backend.copy_to_host(a, self._host_buffer("send", a, a.shape))

    def _receive_buffer(self, template: Any, size: int) -> Any:
        """A 1-D buffer of ``size`` for MPI to write ``template``'s kind of result into: a
        new array of its namespace (and device), or the cached host "recv" buffer when
        ``template`` must be staged."""
        if not self._direct(template):
            return self._host_buffer("recv", template, size)
        if backend.is_device_array(template):
            return backend.empty_like(template, size)
        return backend.namespace(template).empty(size, dtype=template.dtype)

    def _result(self, received: Any, template: Any) -> Any:
        """What MPI wrote, as a new array of ``template``'s kind: the receive buffer itself,
        or a device copy of the staging buffer (which is never handed out)."""
        if self._direct(template):
            return received
        return backend.copy_from_host(received, backend.empty_like(template, received.shape))

    # -- collectives on arrays -----------------------------------------------------
    @_timed
    def allreduce(self, a: Any, op: str = "sum") -> Any:
        """Elementwise sum (or "max", "min") of ``a`` over ranks; a new array."""
        self._count("allreduce", a.nbytes)
        if not self._parallel:
            return a.copy()
        send = self._to_mpi(a)
        recv = self._receive_buffer(a, a.size).reshape(a.shape)
        self.transport.allreduce(send, recv, op)
        return self._result(recv, a)

    @_timed
    def allreduce_inplace(self, a: Any, op: str = "sum") -> Any:
        """Like :meth:`allreduce`, but the result overwrites ``a`` (MPI_IN_PLACE: no
        receive buffer is allocated). Returns ``a``."""
        self._count("allreduce", a.nbytes)
        if not self._parallel:
            return a
        buf = self._to_mpi(a)
        self.transport.allreduce(None, buf, op)
        if buf is not a:
            backend.copy_from_host(buf, a)
        return a

    @_timed
    def reduce_scatter(self, a: Any, counts: Sequence[int], out: Any = None) -> Any:
        """Sum ``a`` (the full-length vector on every rank) over ranks; rank r gets the
        ``counts[r]`` entries that start at ``sum(counts[:r])``, in ``out`` when given
        (a reused buffer: MPI receives into it directly unless staging is needed)."""
        counts = [int(c) for c in counts]
        if len(counts) != self.size or sum(counts) != a.shape[0]:
            raise ValueError(
                f"reduce_scatter counts {counts} do not split a vector of {a.shape[0]} "
                f"over {self.size} ranks"
            )
        mine = counts[self.rank]
        if out is not None and (out.shape != (mine,) or out.dtype != a.dtype):
            raise ValueError(f"reduce_scatter out must have shape ({mine},) and dtype "
                             f"{a.dtype}, got {out.shape} and {out.dtype}")
        self._count("reduce_scatter", a.nbytes, mine * a.itemsize)
        if not self._parallel:
            if out is None:
                return a.copy()
            out[...] = a
            return out
        send = self._to_mpi(a)
        if out is not None and self._direct(out):
            backend.synchronize(out)  # no pending device work may touch it while MPI writes
            recv = out
        else:
            recv = self._receive_buffer(a if out is None else out, mine)
        self.transport.reduce_scatter(send, recv, counts)
        if out is None:
            return self._result(recv, a)
        if recv is not out:
            backend.copy_from_host(recv, out)
        return out

    @_timed
    def allgather_counts(self, n_local: int) -> list[int]:
        """Every rank's ``n_local``, in rank order."""
        self._count("allgather", 8, 8 * self.size)
        if not self._parallel:
            return [int(n_local)]
        return [int(c) for c in self.transport.allgather_object(int(n_local))]

    @_timed
    def allgatherv(self, a: Any, counts: Sequence[int] | None = None) -> Any:
        """Concatenate every rank's 1-D ``a`` in rank order; ``counts`` are the lengths
        (gathered first when not given)."""
        if counts is None:
            counts = self.allgather_counts(a.shape[0])
        counts = [int(c) for c in counts]
        if counts[self.rank] != a.shape[0]:
            raise ValueError(
                f"allgatherv: this rank holds {a.shape[0]} entries but counts say "
                f"{counts[self.rank]}"
            )
        self._count("allgatherv", a.nbytes, sum(counts) * a.itemsize)
        if not self._parallel:
            return a.copy()
        send = self._to_mpi(a)
        recv = self._receive_buffer(a, sum(counts))
        self.transport.allgatherv(send, recv, counts, _displacements(counts))
        return self._result(recv, a)

    @_timed
    def allgatherv_inplace(self, a: Any, counts: Sequence[int]) -> Any:
        """Every rank's segment of ``a`` (rank order, lengths ``counts``) to everyone, in
        place: this rank's own segment must already hold its values (MPI_IN_PLACE)."""
        counts = [int(c) for c in counts]
        if len(counts) != self.size or sum(counts) != a.shape[0]:
            raise ValueError(
                f"allgatherv_inplace counts {counts} do not split a vector of "
                f"{a.shape[0]} over {self.size} ranks"
            )
        self._count("allgatherv", counts[self.rank] * a.itemsize, a.nbytes)
        if not self._parallel:
            return a
        displs = _displacements(counts)
        if self._direct(a):
            backend.synchronize(a)
            buf = a
        else:  # only this rank's own segment needs to go to the host
            buf = self._host_buffer("recv", a, a.shape)
            mine = slice(displs[self.rank], displs[self.rank] + counts[self.rank])
            backend.copy_to_host(a[mine], buf[mine])
        self.transport.allgatherv(None, buf, counts, displs)
        if buf is not a:
            backend.copy_from_host(buf, a)
        return a

    @_timed
    def bcast(self, a: Any, root: int = 0) -> Any:
        """``a`` from ``root`` on every rank (same shape and dtype on all ranks), in
        place: ``a`` receives the root's values; returns ``a``."""
        self._count("bcast", a.nbytes)
        if not self._parallel:
            return a
        if self._direct(a):
            backend.synchronize(a)
            self.transport.bcast(a, root)
            return a
        buf = (self._to_mpi(a) if self.rank == root
               else self._host_buffer("send", a, a.shape))
        self.transport.bcast(buf, root)
        if self.rank != root:
            backend.copy_from_host(buf, a)
        return a

    @_timed
    def bcast_object(self, obj: Any, root: int = 0) -> Any:
        """A small Python object (a message, a config) from ``root``."""
        self._count("bcast", 0)
        if not self._parallel:
            return obj
        return self.transport.bcast_object(obj, root)

    @_timed
    def allgather_object(self, obj: Any) -> list[Any]:
        """Every rank's small Python object (a file name, a digest), in rank order."""
        self._count("allgather", 0)
        if not self._parallel:
            return [obj]
        return self.transport.allgather_object(obj)

    # -- agreement -----------------------------------------------------------------
    @_timed
    def allreduce_scalars(
        self,
        sums: Sequence[float] | np.ndarray,
        maxes: Sequence[float] | np.ndarray = (),
        error: BaseException | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Sum ``sums`` and take the max of ``maxes`` over ranks, in ONE collective.

        The result is identical on every rank. ``error`` is this rank's failure, if
        any: when any rank passes one, every rank raises (the failing rank its own
        exception, the others :class:`RemoteRankError` naming the lowest failing rank).
        """
        sums = np.asarray(sums, dtype=np.float64).ravel()
        maxes = np.asarray(maxes, dtype=np.float64).ravel()
        table = self._gather_scalars(np.concatenate((sums, maxes)), error)
        return _rank_order_sum(table[:, : sums.size]), table[:, sums.size :].max(axis=0)

    def _gather_scalars(self, values: np.ndarray, error: BaseException | None) -> np.ndarray:
        """Every rank's ``values`` (a table, one row per rank) after an error flag that
        makes every rank raise when any rank passed an ``error``."""
        if not self._parallel:  # one rank: the table is its row (a solver's hot path)
            self._count("allreduce", 8 * (values.size + 1))
            if error is not None:
                mark_agreed(error)
                raise error
            return values[None, :]
        local = np.concatenate(([0.0 if error is None else 1.0], values))
        self._count("allreduce", local.nbytes, local.nbytes * self.size)
        if self._parallel:
            table = np.empty((self.size, local.size))
            self.transport.allgather(local, table)
        else:
            table = local[None, :]
        failed = np.flatnonzero(table[:, 0])
        if failed.size:
            first = int(failed[0])
            described = self.bcast_object(
                None if error is None else (type(error).__name__, f"{type(error).__name__}: "
                                                                  f"{error}"), root=first
            )
            if error is not None:
                mark_agreed(error)
                raise error
            raise RemoteRankError(first, described[1], described[0])
        return table[:, 1:]

    @_timed
    def allreduce_named(
        self,
        sums: Mapping[str, float] | None = None,
        maxes: Mapping[str, float] | None = None,
        error: BaseException | None = None,
        same: Mapping[str, float] | None = None,
    ) -> Reduced:
        """:meth:`allreduce_scalars` with names: the sum over ranks of each of ``sums``,
        the max of each of ``maxes``, and every rank's value of each of ``same`` (values
        that should agree), read back by name (``result.sums["f"]``,
        ``result.maxes["signal"]``; ``result.differ`` lists the ``same`` names that do not
        agree, :meth:`Reduced.describe` says on which ranks). One collective; every rank
        must pass the same names in the same order (they fix its layout)."""
        sums, maxes, same = dict(sums or {}), dict(maxes or {}), dict(same or {})
        values = np.array([*sums.values(), *maxes.values(), *same.values()], dtype=np.float64)
        table = self._gather_scalars(values, error)
        k, m = len(sums), len(maxes)
        total, top = _rank_order_sum(table[:, :k]), table[:, k : k + m].max(axis=0)
        return Reduced(dict(zip(sums, map(float, total), strict=True)),
                       dict(zip(maxes, map(float, top), strict=True)),
                       {name: [float(v) for v in table[:, k + m + i]]
                        for i, name in enumerate(same)})

    @_timed
    def node_local(self) -> tuple[int, int]:
        """This rank's index among the ranks on its node, and their number (over MPI a
        shared-memory split, ``COMM_TYPE_SHARED``, of this communicator, key: the rank;
        over torch.distributed torchrun's ``LOCAL_RANK``/``LOCAL_WORLD_SIZE`` or the
        ranks' host names)."""
        self._count("split", 0)
        if not self._parallel:
            return 0, 1
        return self.transport.node_local()

    def barrier(self) -> None:
        if self._parallel:
            self.transport.barrier()

    def check_same(self, values: Mapping[str, Any], what: str,
                   error: BaseException | None = None) -> None:
        """Raise ``ValueError`` on every rank unless every rank passed the same ``values``
        (compared by :func:`shown`: a callable is "a callable" everywhere), naming the
        first key that differs and which ranks hold which value; ``what`` says whose
        values they are ("hpcqn.torch.MKOR", "the job file"). One small reduction (and,
        only when they differ, one gather of the shown values); every rank must pass the
        same keys in the same order. ``error``, this rank's failure, travels with it."""
        reduced = self.allreduce_named(same={k: fingerprint(v) for k, v in values.items()},
                                       error=error)
        if reduced.differ:  # the same table on every rank: all take this branch
            key = reduced.differ[0]
            seen = describe_ranks(self.allgather_object(shown(values[key])))
            raise ValueError(f"{what}: {key} differs between ranks ({seen}); every rank "
                             f"must use the same")

    def abort(self, message: str, code: int = EXIT_FAILED) -> None:
        """End every rank of this communicator now (``MPI_Abort``; over torch.distributed
        this process exits with ``code`` and the launcher ends the others), after
        printing ``message`` on this rank's standard error. For a failure the other ranks
        cannot learn of by an agreement (they may be waiting in a collective already).
        Serial: raises ``SystemExit(code)``."""
        print(f"hpcqn: rank {self.rank} of {self.size}: {message}", file=sys.stderr,
              flush=True)
        sys.stdout.flush()
        if not self._parallel:
            raise SystemExit(code)
        self.transport.abort(code)  # pragma: no cover - the process ends here


def _rank_order_sum(rows: np.ndarray) -> np.ndarray:
    """The column sums of ``rows`` added in rank order: the same bits on every rank."""
    if rows.shape[0] == 1:
        return rows[0] + 0.0  # what 0 + row gives (-0.0 becomes 0.0), in one pass
    total = np.zeros(rows.shape[1])
    for row in rows:
        total += row
    return total


def _displacements(counts: Sequence[int]) -> list[int]:
    """Where each rank's segment starts in the concatenation of segments of ``counts``."""
    return np.concatenate(([0], np.cumsum(counts)[:-1])).astype(int).tolist()


_WORLD: Communicator | None = None
_TORCH_GROUPS: list[Communicator] = []  # one Communicator per torch.distributed group


def world() -> Communicator:
    """The process's world communicator (collective at the first call: every rank makes
    it): under an MPI launch a ``Dup`` of ``COMM_WORLD``; else, when
    ``torch.distributed`` is initialised, its default group; else ``COMM_WORLD`` (serial
    without mpi4py). Made once and returned by every later call, with its counters and
    staging buffers (remade when torch.distributed was initialised since). Raises
    :class:`hpcqn.transport.LaunchError` when the launcher declared more processes than
    it has."""
    global _WORLD
    group = None if mpi_launch() else torch_default_group()
    MPI = _mpi()
    if group is None and MPI is None:  # no mpi4py (or HPCQN_NO_MPI=1): this process alone
        made = Communicator(None)
        check_launch(made.size, "serial (no mpi4py)")
        return made
    if _WORLD is not None and (group is None or _torch_group(_WORLD) is group):
        return _WORLD
    if group is not None:
        made = _torch_comm(group)
    else:
        made = Communicator(MPI.COMM_WORLD.Dup(), cuda_aware=detect_cuda_aware().aware)
    check_launch(made.size, made.transport_name)
    _WORLD = made
    return made


def _torch_group(c: Communicator) -> Any:
    return getattr(c.transport, "group", None)


def _torch_comm(group: Any) -> Communicator:
    """The one Communicator of a torch.distributed process group."""
    for c in _TORCH_GROUPS:
        if _torch_group(c) is group:
            return c
    made = Communicator(group)
    _TORCH_GROUPS.append(made)
    return made


def get_comm(comm: Any = None) -> Communicator:
    """Resolve ``comm`` once: a :class:`Communicator` is returned as is, an mpi4py
    communicator is wrapped, a ``torch.distributed`` process group gets its one
    Communicator, ``None`` means the process's world (:func:`world`)."""
    if isinstance(comm, Communicator):
        return comm
    if comm is None:
        return world()
    if is_torch_group(comm):
        return _torch_comm(comm)
    MPI = _mpi()
    if MPI is None or not isinstance(comm, MPI.Comm):
        raise TypeError(
            f"comm must be None, an mpi4py communicator, a torch.distributed process group "
            f"or an hpcqn Communicator, got {type(comm).__name__}"
        )
    return Communicator(comm, cuda_aware=detect_cuda_aware().aware)


# -- an uncaught failure on one rank ends every rank ------------------------------------------
_EXIT_GUARD: dict[str, Any] = {}


def install_exit_abort(c: Communicator) -> None:
    """Make an uncaught failure on one rank end every rank, instead of leaving the others
    waiting in a collective (the default once a communicator of more than one rank
    exists; ``HPCQN_ABORT_ON_FAILURE=0`` turns it off):

    - an exception that reaches the top of the interpreter is printed by the process's
      previous ``sys.excepthook`` (chained), then every rank is aborted with exit code 4
      (a :class:`RemoteRankError`, which every rank raised together, is one line);
    - ``sys.exit`` with a non-zero status, when no collective follows it on this rank (it
      was not caught), aborts every rank at exit.

    Installed once per process, for the first such communicator (its abort ends the
    launch: ``MPI_Abort``, or the process's exit under torchrun)."""
    if _EXIT_GUARD or os.environ.get("HPCQN_ABORT_ON_FAILURE", "1") == "0":
        return
    _EXIT_GUARD["comm"] = c
    _EXIT_GUARD["status"] = None
    previous_hook, previous_exit = sys.excepthook, sys.exit

    def excepthook(kind: type[BaseException], value: BaseException, tb: Any) -> None:
        stop = f"uncaught {kind.__name__}; stopping every rank (exit {EXIT_FAILED})"
        if isinstance(value, RemoteRankError):
            stop = f"stopping: {value}"
        elif previous_hook is sys.__excepthook__:
            # one write with the message below: a launcher that ends the job on the abort
            # may drop what a rank wrote in many small pieces just before
            text = "".join(traceback.format_exception(kind, value, tb)).rstrip()
            stop = f"{stop}:\n{text}"
        else:
            previous_hook(kind, value, tb)
        _abort_everyone(c, stop)

    def exit(status: Any = None) -> None:  # noqa: A001 - sys.exit's own name
        handling = sys.exc_info()[1]
        # an exit every rank makes together (after exit_agreed(), or while handling an
        # error every rank raised, such as hpcqn.signals.Preempted) is no lone failure
        alone = not _EXIT_GUARD.get("agreed") and not (handling is not None
                                                        and is_agreed(handling))
        _EXIT_GUARD["status"] = status if alone else None
        previous_exit(status)

    sys.excepthook = excepthook
    sys.exit = exit
    atexit.register(_abort_after_failed_exit)


def exit_agreed() -> None:
    """Say that this process's coming exit, whatever its status, is agreed by every rank
    (the ``hpcqn`` command returns only agreed codes): no abort at exit, unless a
    collective follows (the program went on)."""
    _EXIT_GUARD["status"] = None
    _EXIT_GUARD["agreed"] = True


def _collective_made() -> None:
    """A collective ran after a ``sys.exit`` (that exit was caught, not the process's) or
    after :func:`exit_agreed` (the program went on)."""
    if _EXIT_GUARD.get("status") is not None or _EXIT_GUARD.get("agreed"):
        _EXIT_GUARD["status"] = None
        _EXIT_GUARD["agreed"] = False


def _abort_after_failed_exit() -> None:
    status = _EXIT_GUARD.get("status")
    if status is None or status == 0:
        return
    c = _EXIT_GUARD["comm"]
    _abort_everyone(c, f"exited with sys.exit({status!r}) while the other ranks may be "
                       f"waiting; stopping every rank (exit {EXIT_FAILED})")


def _abort_everyone(c: Communicator, message: str) -> None:
    print(f"hpcqn: rank {c.rank} of {c.size}: {message}", file=sys.stderr, flush=True)
    sys.stdout.flush()
    time.sleep(0.2)  # lets the launcher forward the message before it ends the job
    if isinstance(c.transport, MPITransport):
        c.transport.MPI.COMM_WORLD.Abort(EXIT_FAILED)  # pragma: no cover - ends here
    c.transport.abort(EXIT_FAILED)  # pragma: no cover - the process ends here


@contextlib.contextmanager
def abort_on_failure(comm: Any = None, code: int = EXIT_FAILED,
                     finish_within: float | None = None) -> Any:
    """No rank left hanging: any exception (``KeyboardInterrupt``, ``SystemExit`` and an
    out-of-memory error included) that leaves the block on one rank while the others may
    be waiting in a collective ends every rank: its traceback is printed once, by the
    failing rank, and the communicator is aborted with exit code ``code``. An error every
    rank already knows of (one hpcqn agreed on in a reduction, such as
    :class:`RemoteRankError`, or an ordinary stop of the run) passes through unchanged.

    With ``finish_within`` (seconds), the ranks also agree that every one of them reached
    the end of the block: a rank that is still inside a collective (it took one step more
    than the others, or waits for a message nobody sends) is found, and every rank is
    aborted, when the others have waited that long for it. Yields the
    :class:`Communicator`::

        with hpcqn.abort_on_failure(finish_within=60) as comm:
            for batch in loader:           # a user-written training loop
                ...
    """
    c = get_comm(comm)
    try:
        yield c
    except BaseException as exc:
        if is_agreed(exc) or not c._parallel or isinstance(exc, SystemExit) and exc.code in (
                None, 0):
            raise
        text = "".join(traceback.format_exception(exc)).rstrip()
        c.abort(f"failed; stopping every rank:\n{text}", code)
    if finish_within is not None and c._parallel:
        # Staggered by rank, so that one rank (the lowest waiting) aborts: one message.
        watchdog = threading.Timer(finish_within + 1.0 * c.rank, c.abort, kwargs={
            "message": f"reached the end of the block, but another rank did not within "
                       f"{finish_within:g} s (it is still inside a collective: one step "
                       f"more than this rank, or a message nobody sends); stopping every "
                       f"rank", "code": code})
        watchdog.daemon = True
        watchdog.start()
        try:
            c.allreduce_scalars([], [])
        finally:
            watchdog.cancel()


def library_version() -> str | None:
    """One line naming the MPI library, the MPI standard version and mpi4py's version;
    None without MPI."""
    MPI = _mpi()
    if MPI is None:
        return None
    import mpi4py

    library = " ".join(MPI.Get_library_version().split("\n")[0].split())
    version = ".".join(map(str, MPI.Get_version()))
    return f"{library} (MPI {version}, mpi4py {mpi4py.__version__})"


def serial_comm() -> Communicator:
    """A one-rank communicator that makes no MPI calls."""
    return Communicator(None)
