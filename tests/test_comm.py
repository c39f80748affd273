"""The communicator: the same test bodies run serially and under mpiexec -n 1/2/3."""

from __future__ import annotations

import numpy as np
import pytest

import hpcqn
from hpcqn import backend
from hpcqn.comm import Communicator, RemoteRankError, detect_cuda_aware, get_comm
from hpcqn.layout import SliceLayout


def uneven_counts(size: int) -> list[int]:
    """Slice lengths 5, 0, 2, 5, 0, 2, ... (an empty slice from three ranks on)."""
    return [(5, 0, 2)[r % 3] if size > 1 else 4 for r in range(size)]


def rank_values(rank: int, n: int, dtype=np.float64) -> np.ndarray:
    return (np.arange(n) + 10.0 * rank + 0.25).astype(dtype)


@pytest.mark.mpi
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_allreduce_reduce_scatter_allgatherv(comm, dtype):
    p, r = comm.size, comm.rank
    n = 7
    total = comm.allreduce(rank_values(r, n, dtype))
    expected = sum(rank_values(q, n, np.float64) for q in range(p))
    np.testing.assert_allclose(total, expected, rtol=1e-6)
    assert total.dtype == dtype
    assert comm.allreduce(rank_values(r, n), op="max")[0] == rank_values(p - 1, n)[0]

    counts = uneven_counts(p)
    full = rank_values(r, sum(counts), dtype)
    mine = comm.reduce_scatter(full, counts)
    everything = sum(rank_values(q, sum(counts), np.float64) for q in range(p))
    np.testing.assert_allclose(mine, everything[SliceLayout(tuple(counts)).local_slice(r)],
                               rtol=1e-6)
    gathered = comm.allgatherv(mine)  # counts gathered first
    np.testing.assert_allclose(gathered, everything, rtol=1e-6)


@pytest.mark.mpi
def test_bcast_and_counters(comm):
    c = Communicator(comm.mpi_comm) if comm.size > 1 else hpcqn.serial_comm()
    a = np.arange(4.0) if c.rank == 0 else np.zeros(4)
    b = c.bcast(a, root=0)
    np.testing.assert_array_equal(b, np.arange(4.0))
    c.allreduce(np.ones(3))
    c.allreduce(np.ones(5))
    assert c.calls("allreduce") == 2
    assert c.counters["allreduce"].nbytes == 8 * 8
    assert c.counters["bcast"].calls == 1 and c.counters["bcast"].nbytes == 32
    c.reset_counters()
    assert c.calls("allreduce") == 0


@pytest.mark.mpi
def test_allreduce_scalars_identical_and_ordered(comm):
    r = comm.rank
    values = [0.1 * (r + 1), 1e16 if r == 0 else 1.0]
    sums, maxes = comm.allreduce_scalars(values, [float(r), -float(r)])
    expected = np.zeros(2)
    for q in range(comm.size):  # rank order
        expected += np.array([0.1 * (q + 1), 1e16 if q == 0 else 1.0])
    np.testing.assert_array_equal(sums, expected)
    np.testing.assert_array_equal(maxes, [comm.size - 1, 0.0])
    everyone = comm.allgatherv(sums)  # bitwise the same on every rank
    np.testing.assert_array_equal(everyone, np.tile(sums, comm.size))


@pytest.mark.mpi
@pytest.mark.timeout(60)
def test_error_on_one_rank_reaches_all(comm):
    failing = comm.size - 1
    error = ValueError("boom on the last rank") if comm.rank == failing else None
    expected = ValueError if comm.rank == failing else RemoteRankError
    with pytest.raises(expected, match="boom on the last rank"):
        comm.allreduce_scalars([1.0], [], error)
    # The communicator is still usable afterwards: nobody is stuck in a collective.
    assert comm.allreduce_scalars([1.0])[0][0] == comm.size


@pytest.mark.mpi
def test_any_mpi4py_communicator(comm):
    if comm.mpi_comm is None:
        pytest.skip("needs mpi4py's world (not serial, not torch.distributed)")
    sub = comm.mpi_comm.Split(color=comm.rank % 2, key=comm.rank)
    wrapped = get_comm(sub)
    total = wrapped.allreduce(np.array([1.0]))
    assert total[0] == len(range(comm.rank % 2, comm.size, 2))
    sub.Free()


@pytest.mark.mpi
def test_gather_global_and_layout(comm):
    layout = SliceLayout.from_local(uneven_counts(comm.size)[comm.rank], comm)
    assert layout.counts == tuple(uneven_counts(comm.size))
    x = np.arange(layout.n, dtype=float)[layout.local_slice(comm.rank)]
    np.testing.assert_array_equal(hpcqn.gather_global(x, comm), np.arange(layout.n))


def test_serial_comm_makes_no_mpi_calls():
    c = hpcqn.serial_comm()
    assert (c.rank, c.size, c.mpi_comm) == (0, 1, None)
    a = np.arange(3.0)
    out = c.allreduce(a)
    assert out is not a and np.array_equal(out, a)
    np.testing.assert_array_equal(c.reduce_scatter(a, [3]), a)
    with pytest.raises(ValueError, match="counts"):
        c.reduce_scatter(a, [2])
    assert c.calls("allreduce") == 1


def test_get_comm_rejects_other_objects():
    with pytest.raises(TypeError, match="comm must be"):
        get_comm(42)


def test_no_mpi_environment_gives_serial(monkeypatch):
    monkeypatch.setenv("HPCQN_NO_MPI", "1")
    c = get_comm()
    assert c.mpi_comm is None and c.size == 1


def test_cuda_aware_override_and_vendor_switches(monkeypatch):
    for name in ("MPICH_GPU_SUPPORT_ENABLED", "OMPI_MCA_opal_cuda_support", "MV2_USE_CUDA",
                 "I_MPI_OFFLOAD", "HPCQN_CUDA_AWARE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HPCQN_NO_MPI", "1")  # no library to ask: the switches decide
    assert detect_cuda_aware().aware is False
    monkeypatch.setenv("MPICH_GPU_SUPPORT_ENABLED", "1")
    assert detect_cuda_aware().aware is True
    monkeypatch.setenv("HPCQN_CUDA_AWARE", "0")
    result = detect_cuda_aware()
    assert result.aware is False and "HPCQN_CUDA_AWARE" in result.reason
    monkeypatch.setenv("HPCQN_CUDA_AWARE", "yes")
    with pytest.raises(ValueError, match="HPCQN_CUDA_AWARE"):
        detect_cuda_aware()


def test_cuda_aware_vendor_query_is_used_where_exported(monkeypatch):
    """MPICH and Open MPI export MPIX_Query_cuda_support; the PyPI build has no CUDA."""
    monkeypatch.delenv("HPCQN_CUDA_AWARE", raising=False)
    from hpcqn.comm import _mpi

    if _mpi() is None:
        pytest.skip("needs mpi4py")
    import ctypes

    try:
        ctypes.CDLL(_mpi().__file__).MPIX_Query_cuda_support  # noqa: B018
    except AttributeError:
        pytest.skip("this MPI library does not export MPIX_Query_cuda_support")
    result = detect_cuda_aware()
    assert result.reason == "MPIX_Query_cuda_support()" and result.aware is False


class FakeDeviceArray(np.ndarray):
    """A host buffer that claims to be device memory, as mpi4py's tests use: it
    exercises the staging path (copy out, collective, copy back) with no GPU."""

    @property
    def __cuda_array_interface__(self) -> dict:
        return {"shape": self.shape, "typestr": self.dtype.str,
                "data": (self.ctypes.data, False), "version": 3}


class RecordingComm:
    """An mpi4py communicator that records, in ``events``, every array each of its
    buffer methods (the capitalised ones: ``Allreduce``, ``Bcast``, ...) was given."""

    def __init__(self, mpi_comm, events: list):
        self._comm, self.events = mpi_comm, events

    def __getattr__(self, name: str):
        target = getattr(self._comm, name)
        if not (callable(target) and name[0].isupper()):
            return target

        def call(*args, **kwargs):
            self.events.append((name, _arrays([*args, *kwargs.values()])))
            return target(*args, **kwargs)

        return call


def _arrays(items) -> list:
    """The arrays among ``items``, looking inside MPI's ``[buffer, counts, ...]`` lists."""
    found = []
    for item in items:
        if isinstance(item, (list, tuple)):
            found += _arrays(item)
        elif isinstance(item, np.ndarray):
            found.append(item)
    return found


COLLECTIVES = ("allreduce", "allreduce_inplace", "reduce_scatter", "reduce_scatter_out",
               "allgatherv", "allgatherv_inplace", "bcast")


def run_collective(c: Communicator, collective: str, dtype) -> tuple:
    """Run ``collective`` on fake device arrays; returns (result, the device inputs, the
    NumPy reference of the result, what the result must be: an input or None for new)."""
    p, r = c.size, c.rank
    counts = uneven_counts(p)
    n, layout = sum(counts), SliceLayout(tuple(counts))
    everything = sum(rank_values(q, n) for q in range(p))

    def device(values):
        return np.asarray(values, dtype=dtype).view(FakeDeviceArray)

    if collective in ("allreduce", "allreduce_inplace"):
        a = device(rank_values(r, 6))
        call = c.allreduce if collective == "allreduce" else c.allreduce_inplace
        return call(a), [a], sum(rank_values(q, 6) for q in range(p)), (
            None if collective == "allreduce" else a)
    if collective in ("reduce_scatter", "reduce_scatter_out"):
        full = device(rank_values(r, n))
        out = device(np.full(counts[r], np.nan)) if collective.endswith("out") else None
        result = c.reduce_scatter(full, counts, out=out)
        inputs = [full] if out is None else [full, out]
        return result, inputs, everything[layout.local_slice(r)], out
    if collective == "allgatherv":
        mine = device(rank_values(r, counts[r]))
        expected = np.concatenate([rank_values(q, k) for q, k in enumerate(counts)])
        return c.allgatherv(mine, counts), [mine], expected, None
    if collective == "allgatherv_inplace":
        full = device(np.zeros(n))
        full[layout.local_slice(r)] = rank_values(r, counts[r])
        expected = np.concatenate([rank_values(q, k) for q, k in enumerate(counts)])
        return c.allgatherv_inplace(full, counts), [full], expected, full
    root = p - 1
    a = device(np.arange(5.0) + 1 if r == root else np.zeros(5))
    return c.bcast(a, root=root), [a], np.arange(5.0) + 1, a


@pytest.mark.mpi
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("collective", COLLECTIVES)
@pytest.mark.parametrize("aware", [False, True])
def test_device_buffers_every_collective(comm, monkeypatch, aware, collective, dtype):
    """Every collective on fake device arrays gives the NumPy reference, as an array of
    the input's kind. CUDA-aware: MPI is handed the device arrays themselves, each after
    its stream was synchronised. Staging: MPI sees only host buffers, all of them from
    the communicator's staging cache, which a second call reuses without allocating;
    results never alias the cache."""
    if comm.mpi_comm is None:
        pytest.skip("needs mpi4py")
    events: list = []
    monkeypatch.setattr(backend, "synchronize", lambda a: events.append(("synchronize", [a])))
    c = Communicator(RecordingComm(comm.mpi_comm, events), cuda_aware=aware)
    events.clear()
    result, inputs, expected, same_as = run_collective(c, collective, dtype)

    np.testing.assert_allclose(np.asarray(result), expected,
                               rtol=1e-6 if dtype == np.float32 else 1e-15)
    assert type(result) is FakeDeviceArray and result.dtype == dtype
    if same_as is not None:
        assert result is same_as
    else:
        assert all(not np.shares_memory(result, a) for a in inputs)
    handed = [(i, b) for i, (name, arrays) in enumerate(events) if name != "synchronize"
              for b in arrays]
    if c.size == 1:
        assert handed == [] and c.staging == {}  # serial: no MPI call, nothing staged
        return
    assert handed, "the collective made no buffer call"
    if aware:
        assert all(type(b) is FakeDeviceArray for _, b in handed)
        synced = [i for i, (name, arrays) in enumerate(events) if name == "synchronize"]
        for i, buffer in handed:
            if any(buffer is a for a in inputs):  # an input went to MPI: synchronised first
                assert any(j < i and events[j][1][0] is buffer for j in synced)
        assert any(b is a for _, b in handed for a in inputs), "no device input passed"
        assert c.staging == {}
        return
    staged = list(c.staging.values())
    assert staged, "nothing was staged"
    assert all(type(b) is np.ndarray for _, b in handed)
    # (a rank with an empty segment hands MPI empty buffers, which share no memory)
    assert all(b.size == 0 or any(np.shares_memory(b, s) for s in staged) for _, b in handed)
    assert not any(np.shares_memory(result, s) for s in staged)
    cache = {key: id(buffer) for key, buffer in c.staging.items()}
    again, _, expected_again, _ = run_collective(c, collective, dtype)
    np.testing.assert_allclose(np.asarray(again), expected_again,
                               rtol=1e-6 if dtype == np.float32 else 1e-15)
    assert {key: id(buffer) for key, buffer in c.staging.items()} == cache  # reused


@pytest.mark.mpi
def test_allgatherv_in_place(comm):
    counts = uneven_counts(comm.size)
    layout = SliceLayout(tuple(counts))
    full = np.zeros(layout.n)
    full[layout.local_slice(comm.rank)] = rank_values(comm.rank, counts[comm.rank])
    out = comm.allgatherv_inplace(full, counts)
    assert out is full
    expected = np.concatenate([rank_values(r, c) for r, c in enumerate(counts)])
    np.testing.assert_array_equal(full, expected)


@pytest.mark.mpi
def test_allreduce_in_place(comm):
    a = rank_values(comm.rank, 5)
    out = comm.allreduce_inplace(a)
    assert out is a
    np.testing.assert_allclose(a, sum(rank_values(q, 5) for q in range(comm.size)))


@pytest.mark.mpi
@pytest.mark.parametrize("aware", [None, False, True])
def test_reduce_scatter_into_a_reused_buffer(comm, aware):
    """``out=`` receives the rank's sum (host arrays, and fake device arrays on the aware
    and the staging paths); a wrong ``out`` is refused before any communication."""
    c = comm if aware is None else Communicator(comm.mpi_comm, cuda_aware=aware)
    if aware is not None and comm.mpi_comm is None:
        pytest.skip("needs mpi4py")
    counts = uneven_counts(c.size)
    full = rank_values(c.rank, sum(counts))
    out = np.full(counts[c.rank], np.nan)
    if aware is not None:
        full, out = full.view(FakeDeviceArray), out.view(FakeDeviceArray)
    result = c.reduce_scatter(full, counts, out=out)
    assert result is out
    everything = sum(rank_values(q, sum(counts)) for q in range(c.size))
    np.testing.assert_allclose(np.asarray(out),
                               everything[SliceLayout(tuple(counts)).local_slice(c.rank)])
    with pytest.raises(ValueError, match="out must have shape"):
        c.reduce_scatter(full, counts, out=np.empty(counts[c.rank] + 1))


@pytest.mark.mpi
def test_allreduce_named_sums_maxes_and_per_rank_values(comm):
    """Named results against their closed forms over ranks 0..P-1."""
    p, r = comm.size, comm.rank
    out = comm.allreduce_named(sums={"rank": float(r), "one": 1.0}, maxes={"rank": float(r)},
                               same={"size": float(p), "rank": float(r)})
    assert out.sums == {"rank": p * (p - 1) / 2, "one": float(p)}
    assert out.maxes == {"rank": float(p - 1)}
    assert out.per_rank == {"size": [float(p)] * p, "rank": [float(q) for q in range(p)]}
    assert out.differ == ([] if p == 1 else ["rank"])
    assert out.describe("size") == (f"ranks 0-{p - 1}: {float(p)!r}" if p > 1
                                    else f"rank 0: {float(p)!r}")
    odd = comm.allreduce_named(same={"odd": float(r % 2)})
    assert odd.describe("odd", lambda v: str(int(v))) == {
        1: "rank 0: 0", 2: "rank 0: 0; rank 1: 1", 3: "ranks 0, 2: 0; rank 1: 1"}[p]


@pytest.mark.mpi
def test_world_communicator_is_one_object_per_process(comm):
    """get_comm() returns the same Dup of COMM_WORLD each call, counters kept."""
    if comm.mpi_comm is None:
        pytest.skip("needs mpi4py")
    from mpi4py import MPI

    again = get_comm()
    assert again is comm and get_comm(None) is comm
    assert MPI.Comm.Compare(comm.mpi_comm, MPI.COMM_WORLD) == MPI.CONGRUENT
    before = comm.calls("allreduce")
    get_comm().allreduce_scalars([1.0])
    assert comm.calls("allreduce") == before + 1
