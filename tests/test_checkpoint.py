"""hpcqn.checkpoint in one process: the state tree round trip (every leaf kind), the
files on disk, pruning, and every way a checkpoint can be broken."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import hpcqn
from hpcqn import checkpoint as ck

SERIAL = hpcqn.serial_comm()


def tree():
    return {
        "step": 7, "lr": 0.25, "name": "mlbfgs", "flag": True, "nothing": None,
        "big": 2**100 + 3,  # a PCG64 state is a 128-bit integer
        "x32": np.arange(5, dtype=np.float32), "x64": np.linspace(0, 1, 7),
        "ints": np.arange(3, dtype=np.int64), "empty": np.zeros((0, 4)),
        "blocks": {0: {"v": np.ones((2, 3))}, 5: {"v": np.zeros(2)}},
        "order": [3, 1, 2], "pair": (1.5, "a"), "nested": [{"a": 1}, [2.0, None]],
    }


def assert_same(a, b):
    assert type(a) is type(b), (a, b)
    if isinstance(a, dict):
        assert list(a) == list(b)
        for k in a:
            assert_same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            assert_same(x, y)
    elif isinstance(a, np.ndarray):
        assert a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_array_equal(a, b)
    else:
        assert a == b


def test_round_trip_of_every_leaf_kind(tmp_path):
    saved = tree()
    path = ck.save(tmp_path, saved, SERIAL, step=7, meta={"job": "t"})
    assert path == tmp_path / "ckpt-00000007"
    assert (tmp_path / "latest").read_text().strip() == "ckpt-00000007"
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["nranks"] == 1 and manifest["meta"] == {"job": "t"}
    loaded = ck.load(tmp_path, SERIAL)
    assert loaded.step == 7 and loaded.nranks == 1
    assert_same(loaded.state(), saved)


def test_torch_tensors_round_trip(tmp_path):
    torch = pytest.importorskip("torch")
    saved = {"w": torch.randn(3, 4, dtype=torch.float64), "b": torch.randn(5).bfloat16(),
             "rng": torch.get_rng_state()}
    ck.save(tmp_path, saved, SERIAL, step=1)
    loaded = ck.load(tmp_path, SERIAL).state()
    for key, value in saved.items():
        assert loaded[key].dtype == value.dtype and torch.equal(loaded[key], value)


def test_bad_values_are_refused_and_nothing_is_committed(tmp_path):
    ck.save(tmp_path, {"a": 1}, SERIAL, step=1)
    for bad, error in (({"f": lambda: 0}, TypeError), ({"o": np.array([object()])}, TypeError),
                       ({"k": {"x/y": 1}}, ValueError), ({"m": {1: 0, "a": 1}}, TypeError)):
        with pytest.raises(error):
            ck.save(tmp_path, bad, SERIAL, step=2)
        assert not (tmp_path / "ckpt-00000002").exists()
        assert not list(tmp_path.glob(".ckpt-*"))
        assert ck.load(tmp_path, SERIAL).step == 1


def test_keep_prunes_old_checkpoints(tmp_path):
    for step in range(5):
        ck.save(tmp_path, {"step": step}, SERIAL, step=step, keep=2)
    assert sorted(p.name for p in tmp_path.glob("ckpt-*")) == ["ckpt-00000003",
                                                                "ckpt-00000004"]
    assert ck.load(tmp_path, SERIAL).state() == {"step": 4}


def test_broken_checkpoints_raise_naming_the_file(tmp_path):
    with pytest.raises(ck.CheckpointError, match="no checkpoint"):
        ck.load(tmp_path, SERIAL)
    path = ck.save(tmp_path, {"x": np.arange(1000.0)}, SERIAL, step=3)
    file = path / ck.rank_file(0)
    data = bytearray(file.read_bytes())
    data[len(data) // 2] ^= 0xFF
    file.write_bytes(bytes(data))
    with pytest.raises(ck.CheckpointError, match=f"{file}.*corrupted"):
        ck.load(tmp_path, SERIAL)
    file.write_bytes(bytes(data[: len(data) // 3]))
    with pytest.raises(ck.CheckpointError, match=f"{file}.*truncated"):
        ck.load(tmp_path, SERIAL)
    file.unlink()
    with pytest.raises(ck.CheckpointError, match=f"{file} is missing"):
        ck.load(tmp_path, SERIAL)
    (path / "manifest.json").write_text("{not json")
    with pytest.raises(ck.CheckpointError, match="manifest.json"):
        ck.load(tmp_path, SERIAL)
    other = tmp_path / "plain.h5"
    import h5py

    with h5py.File(other, "w") as f:
        f["x"] = 1
    with pytest.raises(ck.CheckpointError, match="not an hpcqn checkpoint"):
        ck.read_state(other)


def test_merge_joins_per_block_states():
    ranks = [{"step": 4, "blocks": {0: {"v": 1}, 2: {"v": 3}}},
             {"step": 4, "blocks": {1: {"v": 2}}}]
    assert ck.merge(ranks) == {"step": 4, "blocks": {0: {"v": 1}, 2: {"v": 3}, 1: {"v": 2}}}


WRITER = """
import sys, numpy as np, hpcqn
from hpcqn import checkpoint as ck
ck.save(sys.argv[1], {"x": np.zeros(50_000_000)}, hpcqn.serial_comm(), step=2)
"""


@pytest.mark.timeout(120)
def test_writer_killed_mid_checkpoint_leaves_the_previous_one(tmp_path):
    ck.save(tmp_path, {"x": np.arange(3.0)}, SERIAL, step=1)
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path)])
    partial = tmp_path / ".ckpt-00000002.tmp" / ck.rank_file(0)
    deadline = time.monotonic() + 60
    while not (partial.exists() and partial.stat().st_size > 1_000_000):
        assert writer.poll() is None and time.monotonic() < deadline, "writer never started"
        time.sleep(0.005)
    os.kill(writer.pid, signal.SIGKILL)  # in the middle of writing 400 MB
    writer.wait()
    assert writer.returncode == -signal.SIGKILL
    assert ck.latest(tmp_path).name == "ckpt-00000001"
    np.testing.assert_array_equal(ck.load(tmp_path, SERIAL).state()["x"], np.arange(3.0))
    # The next save cleans the debris up.
    ck.save(tmp_path, {"x": np.ones(2)}, SERIAL, step=2)
    assert not (tmp_path / ".ckpt-00000002.tmp").exists()
    assert ck.load(tmp_path, SERIAL).step == 2
