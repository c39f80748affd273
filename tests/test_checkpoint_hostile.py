"""hpcqn.checkpoint against hostile and damaged checkpoints, in one process: every
tampered variant of tests/checkpoint_tampering.py refused with a CheckpointError naming
the file (on a checkpoint of two ranks read elastically, and on a real one-rank save),
byte flips and truncations of a re-hashed rank file fuzzed in a subprocess (HDF5 must not
crash it), the manifest and ``latest`` fuzzed, a dataset declaring gigabytes refused
without allocating, and writing onto a real full (and read-only) tmpfs."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import h5py
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import hpcqn
from hpcqn import checkpoint as ck

sys.path.insert(0, str(Path(__file__).resolve().parent))
import checkpoint_tampering as tamper  # noqa: E402
from test_checkpoint import assert_same  # noqa: E402

SERIAL = hpcqn.serial_comm()
ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "tests")}


def expected_two_ranks():
    merged = tamper.rank_state(0)
    merged["blocks"] = {0: {"v": np.ones(2)}, 1: {"v": np.ones(2)}}
    return merged




def refused(base, expected):
    with pytest.raises(ck.CheckpointError) as info:
        ck.load(tamper.root(base), SERIAL)
    assert expected in str(info.value), str(info.value)
    return str(info.value)


def test_untampered_checkpoints_load(tmp_path):
    tamper.make_checkpoint(tmp_path, 2)
    loaded = ck.load(tamper.root(tmp_path), SERIAL)
    assert loaded.nranks == 2 and loaded.step == tamper.STEP
    assert loaded.meta == {"job": "hostile"}
    assert_same(loaded.states[1], tamper.rank_state(1))
    assert_same(loaded.state(), expected_two_ranks())
    other = tmp_path / "saved"
    ck.save(tamper.root(other), tamper.rank_state(0), SERIAL, step=tamper.STEP)
    assert_same(ck.load(tamper.root(other), SERIAL).state(), tamper.rank_state(0))


@pytest.mark.timeout(10)
@pytest.mark.parametrize("variant", sorted(tamper.VARIANTS))
def test_tampered_two_rank_checkpoint_is_refused(tmp_path, variant):
    """Rank 1's file (or the manifest, or latest) tampered with; one process reads both
    files (elastic restart)."""
    tamper.make_checkpoint(tmp_path, 2)
    expected = tamper.VARIANTS[variant](tmp_path, 1)
    refused(tmp_path, expected)


@pytest.mark.timeout(10)
@pytest.mark.parametrize("variant", sorted(set(tamper.VARIANTS) - tamper.NEEDS_TWO))
def test_tampered_saved_checkpoint_is_refused(tmp_path, variant):
    ck.save(tamper.root(tmp_path), tamper.rank_state(0), SERIAL, step=tamper.STEP)
    expected = tamper.VARIANTS[variant](tmp_path, 0)
    refused(tmp_path, expected)


def test_messages_name_the_reason(tmp_path):
    cases = {"dotdot_name": "'files[1].file'", "nranks_str": None, "soft_link": "soft link",
             "external_link": "external link", "virtual_dataset": "virtual",
             "external_raw_storage": "external raw storage", "fifo_rank_file": "FIFO",
             "symlinked_rank_file": "symlink", "object_reference": "references",
             "compound_dtype": "compound", "negative_length": "length",
             "unknown_kind": "'pickle'", "swapped_files": "says rank",
             "huge_declared": "declares", "compressed_bomb": "chunked",
             "hard_link_cycle": "more than once"}
    for i, (variant, reason) in enumerate(cases.items()):
        base = tmp_path / str(i)
        tamper.make_checkpoint(base, 2)
        builder = tamper.VARIANTS.get(variant) or tamper.VARIANTS[f"manifest_{variant}"]
        message = refused(base, builder(base, 1))
        assert reason is None or reason in message, message
        assert "\n" not in message


@pytest.mark.timeout(20)
def test_huge_declared_dataset_is_refused_without_allocating(tmp_path):
    tamper.make_checkpoint(tmp_path, 2)
    tamper.huge_declared(tmp_path, 1)
    assert tamper.rank_path(tmp_path, 1).stat().st_size < 16_000  # 3.2 GB declared
    tracemalloc.start()
    start = time.perf_counter()
    try:
        message = refused(tmp_path, ck.rank_file(1))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert time.perf_counter() - start < 5
    assert peak < 20_000_000, peak
    assert "3200000000" in message


@pytest.mark.timeout(30)
def test_a_file_that_hangs_hdf5_is_refused_in_bounded_time(tmp_path, monkeypatch):
    monkeypatch.setattr(ck, "SANDBOX_SECONDS", 2.0)
    tamper.make_checkpoint(tmp_path, 2)
    tamper.heap_object_size(tmp_path, 1)
    start = time.monotonic()
    message = refused(tmp_path, ck.rank_file(1))
    assert "did not finish" in message and time.monotonic() - start < 15
    # and the same checkpoint, untampered, is read back once more
    tamper.make_checkpoint(tmp_path / "again", 2)
    assert ck.load(tamper.root(tmp_path / "again"), SERIAL).nranks == 2


def test_latest_is_safe(tmp_path):
    assert ck.latest(tmp_path) is None
    assert ck.latest(tmp_path / "nowhere") is None
    tamper.make_checkpoint(tmp_path, 2)
    assert ck.latest(tamper.root(tmp_path)) == tamper.where(tmp_path)
    tamper.latest_garbage(tmp_path, 1)
    with pytest.raises(ck.CheckpointError, match="latest"):
        ck.latest(tamper.root(tmp_path))
    (tamper.root(tmp_path) / ck.LATEST).write_text("ckpt-00000005/../../etc\n")
    with pytest.raises(ck.CheckpointError, match="latest"):
        ck.latest(tamper.root(tmp_path))


def test_version_1_checkpoints_still_load(tmp_path):
    """Written before rank files said their rank: no rank, nranks or step attributes."""
    path = tamper.make_checkpoint(tmp_path, 2)
    for r in range(2):
        with h5py.File(path / ck.rank_file(r), "r+") as f:
            f.attrs["version"] = 1
            for name in ("rank", "nranks", "step"):
                del f.attrs[name]
        tamper.rehash(tmp_path, r)
    tamper.edit_manifest(tmp_path, lambda m: m.update(version=1))
    assert_same(ck.load(tamper.root(tmp_path), SERIAL).state(), expected_two_ranks())
    # a version-2 manifest over version-1 files is not one checkpoint
    tamper.edit_manifest(tmp_path, lambda m: m.update(version=2))
    refused(tmp_path, ck.rank_file(0))


def test_read_state_checks_like_load(tmp_path):
    path = tamper.make_checkpoint(tmp_path, 2)
    assert_same(ck.read_state(path / ck.rank_file(1)), tamper.rank_state(1))
    tamper.soft_link(tmp_path, 1)
    with pytest.raises(ck.CheckpointError, match="soft link"):
        ck.read_state(path / ck.rank_file(1))
    (tmp_path / "link.h5").symlink_to(path / ck.rank_file(0))
    with pytest.raises(ck.CheckpointError, match="symlink"):
        ck.read_state(tmp_path / "link.h5")


# -- HDF5 must not crash on bytes that pass the digest: in a subprocess -------------------
FLIPS = r"""
import hashlib, json, sys
from pathlib import Path
import hpcqn
from hpcqn import checkpoint as ck
ck.SANDBOX_SECONDS = 2  # a file that sends HDF5 into an endless loop: refused after 2 s
base, offsets = Path(sys.argv[1]), [int(x) for x in sys.argv[2].split(",")]
where = base / "ck" / "ckpt-00000005"
file = where / ck.rank_file(1)
original = file.read_bytes()
manifest = json.loads((where / "manifest.json").read_text())
counts = {"loaded": 0, "refused": 0}
for offset in offsets:
    data = bytearray(original)
    data[offset] ^= 0xFF
    file.write_bytes(data)
    manifest["files"][1].update(bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
    (where / "manifest.json").write_text(json.dumps(manifest))
    try:
        ck.load(base / "ck", hpcqn.serial_comm())
        counts["loaded"] += 1
    except ck.CheckpointError as exc:
        if ck.rank_file(1) not in str(exc):
            print("unnamed:", offset, exc)
            sys.exit(2)
        counts["refused"] += 1
print(json.dumps(counts))
sys.exit(1 if counts["refused"] else 0)
"""


def run_flips(base, offsets):
    return subprocess.run([sys.executable, "-c", FLIPS, str(base),
                           ",".join(map(str, offsets))], capture_output=True, text=True,
                          timeout=120, env=ENV)


@pytest.mark.timeout(150)
def test_one_byte_flipped_and_rehashed_does_not_crash(tmp_path):
    tamper.make_checkpoint(tmp_path, 2)
    size = tamper.rank_path(tmp_path, 1).stat().st_size
    # the superblock's signature: always refused
    out = run_flips(tmp_path, [0])
    assert out.returncode == 1, (out.returncode, out.stdout, out.stderr[-3000:])
    # one byte at a time, across the whole file (never a signal: -11 is a segfault)
    out = run_flips(tmp_path, range(0, size, max(1, size // 100)))
    assert out.returncode in (0, 1), (out.returncode, out.stdout, out.stderr[-3000:])
    assert json.loads(out.stdout.splitlines()[-1])["refused"] > 0


FUZZ = r"""
import hashlib, json, sys
from pathlib import Path
from hypothesis import HealthCheck, given, settings, strategies as st
import hpcqn
from hpcqn import checkpoint as ck
ck.SANDBOX_SECONDS = 2
base, examples = Path(sys.argv[1]), int(sys.argv[2])
where = base / "ck" / "ckpt-00000005"
file = where / ck.rank_file(1)
original = file.read_bytes()
manifest = json.loads((where / "manifest.json").read_text())
counts = {"loaded": 0, "refused": 0}
n = len(original)
mutation = st.one_of(
    st.tuples(st.just("flip"), st.lists(st.tuples(st.integers(0, n - 1), st.integers(1, 255)),
                                        min_size=1, max_size=8)),
    st.tuples(st.just("truncate"), st.integers(0, n - 1)),
    st.tuples(st.just("overwrite"), st.integers(0, n - 8), st.binary(min_size=1, max_size=8)),
    st.tuples(st.just("insert"), st.integers(0, n), st.binary(min_size=1, max_size=64)))

@settings(max_examples=examples, deadline=None, database=None,
          suppress_health_check=list(HealthCheck))
@given(mutation)
def fuzz(m):
    data = bytearray(original)
    if m[0] == "flip":
        for i, x in m[1]:
            data[i] ^= x
    elif m[0] == "truncate":
        data = data[:m[1]]
    elif m[0] == "overwrite":
        data[m[1]:m[1] + len(m[2])] = m[2]
    else:
        data[m[1]:m[1]] = m[2]
    file.write_bytes(data)
    manifest["files"][1].update(bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
    (where / "manifest.json").write_text(json.dumps(manifest))
    try:
        ck.load(base / "ck", hpcqn.serial_comm())
        counts["loaded"] += 1
    except ck.CheckpointError as exc:
        assert ck.rank_file(1) in str(exc), str(exc)
        counts["refused"] += 1

fuzz()
print(json.dumps(counts))
"""


@pytest.mark.timeout(150)
def test_fuzzed_rank_file_raises_checkpoint_error_or_loads(tmp_path):
    """Random flips, overwrites, insertions and truncations of a real rank file, the
    manifest re-hashed each time: only CheckpointError or a load, and no crash."""
    tamper.make_checkpoint(tmp_path, 2)
    out = subprocess.run([sys.executable, "-c", FUZZ, str(tmp_path), "80"],
                         capture_output=True, text=True, timeout=120, env=ENV)
    assert out.returncode == 0, (out.returncode, out.stdout, out.stderr[-3000:])
    counts = json.loads(out.stdout.splitlines()[-1])
    assert counts["refused"] > 0


JSON = st.recursive(st.none() | st.booleans() | st.integers(-3, 2**70)
                    | st.floats(allow_nan=False) | st.text(max_size=12),
                    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=6), c,
                                                                         max_size=3),
                    max_leaves=8)
FIELDS = ["format", "version", "step", "nranks", "files", "meta", "files.0", "files.1",
          "files.0.file", "files.1.file", "files.1.bytes", "files.1.sha256", "(drop)"]


@pytest.mark.timeout(60)
def test_fuzzed_manifest_and_latest():
    with tempfile.TemporaryDirectory() as scratch:
        base = Path(scratch)
        tamper.make_checkpoint(base, 2)
        manifest_text = (tamper.where(base) / ck.MANIFEST).read_text()
        latest_bytes = (tamper.root(base) / ck.LATEST).read_bytes()

        def attempt():
            try:
                ck.load(tamper.root(base), SERIAL)
            except ck.CheckpointError as exc:
                assert str(base) in str(exc), str(exc)

        @settings(max_examples=80, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck))
        @given(st.sampled_from(FIELDS), JSON, st.sampled_from(FIELDS[:6]))
        def manifest_fuzz(field, value, dropped):
            m = json.loads(manifest_text)
            if field == "(drop)":
                m.pop(dropped)
            else:
                *parents, last = field.split(".")
                node = m
                for name in parents:
                    node = node[int(name)] if isinstance(node, list) else node[name]
                node[int(last) if isinstance(node, list) else last] = value
            tamper.write_manifest(base, m)
            attempt()

        @settings(max_examples=40, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck))
        @given(st.binary(max_size=40) | st.text(max_size=30).map(str.encode))
        def latest_fuzz(data):
            (tamper.root(base) / ck.LATEST).write_bytes(data)
            attempt()

        manifest_fuzz()
        tamper.write_manifest(base, manifest_text)
        latest_fuzz()
        (tamper.root(base) / ck.LATEST).write_bytes(latest_bytes)
        assert ck.load(tamper.root(base), SERIAL).nranks == 2


# -- writing onto a full or read-only file system: a real tmpfs ----------------------------
@contextlib.contextmanager
def tmpfs(path: Path, options: str):
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    path.mkdir()
    out = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)],
                         capture_output=True, text=True)
    if out.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {out.stderr.strip()}")
    try:
        yield path
    finally:
        if subprocess.run(["umount", str(path)], capture_output=True).returncode:
            subprocess.run(["umount", "-l", str(path)], capture_output=True)


def remount(path: Path, options: str) -> None:
    out = subprocess.run(["mount", "-o", f"remount,{options}", str(path)],
                         capture_output=True, text=True)
    if out.returncode:
        pytest.skip(f"cannot remount the tmpfs with {options}: {out.stderr.strip()}")


def assert_untouched(fs: Path, first: dict) -> None:
    assert sorted(p.name for p in fs.iterdir()) == ["ckpt-00000001", "latest"]
    assert ck.latest(fs).name == "ckpt-00000001"
    assert_same(ck.load(fs, SERIAL).state(), first)


def one_line_error(info, reason: str) -> str:
    message = str(info.value)
    assert reason in message and "\n" not in message, message
    return message


@pytest.mark.timeout(60)
def test_disk_full_is_one_line_and_leaves_the_previous_checkpoint(tmp_path):
    with tmpfs(tmp_path / "fs", "size=256k") as fs:
        first = {"x": np.arange(10.0), "name": "first"}
        ck.save(fs, first, SERIAL, step=1)
        with pytest.raises(ck.CheckpointError) as info:
            ck.save(fs, {"x": np.zeros(100_000)}, SERIAL, step=2)  # 800 kB
        message = one_line_error(info, "no space left on device")
        assert str(fs / ".ckpt-00000002.tmp" / ck.rank_file(0)) in message
        assert_untouched(fs, first)
        ck.save(fs, {"x": np.ones(3)}, SERIAL, step=2)  # what fits still saves
        np.testing.assert_array_equal(ck.load(fs, SERIAL).state()["x"], np.ones(3))


@pytest.mark.timeout(60)
def test_running_out_of_inodes_at_every_step_of_a_save(tmp_path):
    """No inode left for the temporary directory, then for the rank file, the manifest,
    the new latest: each a one-line CheckpointError and nothing changed; then it fits."""
    with tmpfs(tmp_path / "fs", "size=4m,nr_inodes=1000") as fs:
        first = {"x": np.arange(10.0)}
        ck.save(fs, first, SERIAL, step=1)
        outcomes = []
        for spare in range(8):
            info = os.statvfs(fs)
            remount(fs, f"nr_inodes={info.f_files - info.f_ffree + spare}")
            try:
                ck.save(fs, {"x": np.ones(4)}, SERIAL, step=2)
            except ck.CheckpointError as exc:
                message = str(exc)
                assert "no space left on device" in message and "\n" not in message, message
                assert_untouched(fs, first)
                outcomes.append(message)
            else:
                break
        remount(fs, "nr_inodes=1000")
        assert len(outcomes) >= 3, outcomes  # the directory, the rank file, the manifest
        assert ck.load(fs, SERIAL).step == 2


@pytest.mark.timeout(60)
def test_read_only_file_system(tmp_path):
    with tmpfs(tmp_path / "fs", "size=1m") as fs:
        first = {"x": np.arange(10.0)}
        ck.save(fs, first, SERIAL, step=1)
        remount(fs, "ro")
        with pytest.raises(ck.CheckpointError) as info:
            ck.save(fs, {"x": np.ones(4)}, SERIAL, step=2)
        one_line_error(info, "read-only file system")
        assert_untouched(fs, first)
        remount(fs, "rw")


def test_manifest_helper_rehash_matches_the_file(tmp_path):
    """The tampering helpers themselves: a re-hashed file's entry is its true digest."""
    tamper.make_checkpoint(tmp_path, 2)
    tamper.flipped_byte(tmp_path, 1)
    tamper.rehash(tmp_path, 1)
    data = tamper.rank_path(tmp_path, 1).read_bytes()
    entry = tamper.manifest(tmp_path)["files"][1]
    assert entry == {"file": ck.rank_file(1), "bytes": len(data),
                     "sha256": hashlib.sha256(data).hexdigest()}
