"""hpcqn.checkpoint against tampered checkpoints on two ranks (``mpiexec -n 2 python -m
pytest --with-mpi -m mpi tests/test_checkpoint_hostile_mpi.py``): a checkpoint saved on
both ranks, tampered with by rank 0 (mostly in rank 1's file, which rank 0 never reads),
and every rank gets a CheckpointError naming the file, none hangs; a save that fails on
one rank (a full disk) fails on both, in one line, and leaves nothing behind."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import hpcqn
from hpcqn import checkpoint as ck

sys.path.insert(0, str(Path(__file__).resolve().parent))
import checkpoint_tampering as tamper  # noqa: E402

pytestmark = pytest.mark.mpi


@pytest.fixture
def base(comm, tmp_path_factory):
    """A scratch directory every rank sees (rank 0's, broadcast), with a checkpoint of
    :func:`checkpoint_tampering.rank_state` saved on every rank."""
    if comm.size < 2:
        pytest.skip("needs two ranks")
    path = str(tmp_path_factory.mktemp("hostile")) if comm.rank == 0 else None
    path = Path(comm.bcast_object(path))
    ck.save(tamper.root(path), tamper.rank_state(comm.rank), comm, step=tamper.STEP,
            meta={"job": "hostile"})
    return path


def on_rank_0(comm, build, *args):
    """``build(*args)`` on rank 0 only; its result (or failure) on every rank."""
    result, error = None, None
    if comm.rank == 0:
        try:
            result = build(*args)
        except Exception as exc:  # reported on every rank, never a hang
            error = f"{type(exc).__name__}: {exc}"
    result, error = comm.bcast_object((result, error))
    assert error is None, error
    return result


@pytest.mark.timeout(10)
def test_untampered_checkpoint_loads_on_every_rank(comm, base):
    loaded = ck.load(tamper.root(base), comm)
    assert loaded.nranks == comm.size and loaded.meta == {"job": "hostile"}
    state = loaded.state()
    np.testing.assert_array_equal(state["x"], np.arange(8.0) + comm.rank)
    assert state["big"] == 2**100 + comm.rank and state["blocks"] == {
        comm.rank: {"v": state["blocks"][comm.rank]["v"]}}


@pytest.mark.timeout(10)
@pytest.mark.parametrize("variant", sorted(tamper.VARIANTS))
def test_tampered_checkpoint_fails_on_every_rank(comm, base, variant):
    expected = on_rank_0(comm, tamper.VARIANTS[variant], base, 1)
    with pytest.raises(ck.CheckpointError) as info:
        ck.load(tamper.root(base), comm)
    assert expected in str(info.value), str(info.value)


@pytest.mark.timeout(10)
@pytest.mark.parametrize("variant", ["soft_link", "huge_declared", "fifo_rank_file",
                                     "symlinked_rank_file", "rank_attr_wrong"])
def test_the_other_rank_carries_the_failing_ranks_message(comm, base, variant):
    """Only rank 1's file is bad and only rank 1 reads it: the other ranks' error is a
    CheckpointError (and a RemoteRankError) that says rank 1 and names the file."""
    expected = on_rank_0(comm, tamper.VARIANTS[variant], base, 1)
    with pytest.raises(ck.CheckpointError) as info:
        ck.load(tamper.root(base), comm)
    message = str(info.value)
    assert ck.rank_file(1) in message and expected in message, message
    if comm.rank != 1:
        assert isinstance(info.value, ck.RemoteCheckpointError)
        assert isinstance(info.value, hpcqn.RemoteRankError)
        assert message.startswith("rank 1: ") and info.value.rank == 1
    else:
        assert not isinstance(info.value, hpcqn.RemoteRankError)


@pytest.mark.timeout(20)
def test_a_file_that_hangs_hdf5_on_one_rank_fails_on_every_rank(comm, base, monkeypatch):
    monkeypatch.setattr(ck, "SANDBOX_SECONDS", 2.0)
    on_rank_0(comm, tamper.heap_object_size, base, 1)
    with pytest.raises(ck.CheckpointError, match="did not finish") as info:
        ck.load(tamper.root(base), comm)
    assert ck.rank_file(1) in str(info.value)


@pytest.mark.timeout(10)
def test_bad_value_on_one_rank_fails_the_save_everywhere(comm, base):
    bad = {"f": (lambda: 0)} if comm.rank == 1 else {"x": 1}
    expected = TypeError if comm.rank == 1 else hpcqn.RemoteRankError
    with pytest.raises(expected):
        ck.save(tamper.root(base), bad, comm, step=tamper.STEP + 1)
    comm.barrier()
    assert not list(tamper.root(base).glob(".*"))
    assert ck.load(tamper.root(base), comm).step == tamper.STEP


def mount_tmpfs(path: Path, options: str) -> str | None:
    """Rank 0 mounts; None when it did, else why not."""
    import os

    if os.geteuid() != 0:
        return "mounting a tmpfs needs root"
    path.mkdir()
    out = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)],
                         capture_output=True, text=True)
    return out.stderr.strip() or "mount failed" if out.returncode else None


@pytest.mark.timeout(30)
def test_disk_full_on_one_rank_fails_on_every_rank(comm, tmp_path_factory):
    if comm.size < 2:
        pytest.skip("needs two ranks")
    fs = Path(comm.bcast_object(str(tmp_path_factory.mktemp("full")) if comm.rank == 0
                                else None)) / "fs"
    why = on_rank_0(comm, mount_tmpfs, fs, "size=256k")
    if why is not None:
        pytest.skip(f"cannot mount a tmpfs here: {why}")
    try:
        first = {"x": np.arange(4.0) + comm.rank}
        ck.save(fs, first, comm, step=1)
        large = {"x": np.zeros(100_000 if comm.rank == 1 else 4)}  # rank 1: 800 kB
        with pytest.raises(ck.CheckpointError) as info:
            ck.save(fs, large, comm, step=2)
        message = str(info.value)
        assert "no space left on device" in message and "\n" not in message, message
        assert ck.rank_file(1) in message, message
        comm.barrier()
        assert sorted(p.name for p in fs.iterdir()) == ["ckpt-00000001", "latest"]
        np.testing.assert_array_equal(ck.load(fs, comm).state()["x"], first["x"])
    finally:
        comm.barrier()
        if comm.rank == 0:
            if subprocess.run(["umount", str(fs)], capture_output=True).returncode:
                subprocess.run(["umount", "-l", str(fs)], capture_output=True)
        comm.barrier()
