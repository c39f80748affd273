"""hpcqn.checkpoint.save accepts only what load gives back equal: a hypothesis round trip
over the states save accepts (compared value by value, bitwise for floats, with dtypes,
shapes and container types), and every kind of state it must refuse, refused at save
time, before anything is written, naming the key path; under mpiexec a refusal on one
rank is an error on every rank (a hang is a failure: timeouts)."""

from __future__ import annotations

import math
import os
import warnings

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import hpcqn
from hpcqn import checkpoint as ck

torch = pytest.importorskip("torch")
SERIAL = hpcqn.serial_comm()
DTYPES = ["bool", "int8", "uint16", "int32", "int64", "uint64", "float16", "float32",
          "float64", "complex64", "complex128", ">f8", "<i4"]
TORCH_DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64,
                torch.int32, torch.int8, torch.uint8, torch.bool, torch.complex64]


def same(a, b, path="/"):
    """``b`` is ``a`` as save/load promise: the same container types, dict keys in the
    same order, leaves of the same type, arrays and tensors of the same dtype, shape and
    bits (so NaN and -0.0 count)."""
    if isinstance(a, dict):
        assert type(b) is dict and list(a) == list(b), path
        assert [type(k) for k in a] == [type(k) for k in b], path
        for k in a:
            same(a[k], b[k], f"{path}{k}/")
    elif isinstance(a, (list, tuple)):
        assert type(b) is type(a) and len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            same(x, y, f"{path}{i}/")
    elif isinstance(a, np.ndarray):
        assert type(b) is np.ndarray, path
        assert (b.dtype, b.shape) == (a.dtype, a.shape), path
        assert a.tobytes() == b.tobytes(), path
    elif isinstance(a, torch.Tensor):
        assert type(b) is torch.Tensor and (b.dtype, b.shape) == (a.dtype, a.shape), path
        assert torch.equal(a.view(torch.uint8) if a.dtype == torch.bool else a, b) or (
            a.is_floating_point() and torch.equal(a.isnan(), b.isnan())
            and torch.equal(a.nan_to_num(), b.nan_to_num())), path
    elif isinstance(a, float):
        assert type(b) is float and (math.isnan(a) and math.isnan(b) or
                                     (a == b and math.copysign(1, a) == math.copysign(1, b))), path
    else:
        assert type(b) is type(a) and b == a, path


def arrays():
    shapes = hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=3)
    return st.sampled_from(DTYPES).flatmap(lambda d: hnp.arrays(np.dtype(d), shapes))


def tensors():
    def build(dtype, shape, seed):
        generator = torch.Generator().manual_seed(seed)
        if dtype == torch.bool:
            return torch.randint(0, 2, shape, generator=generator).bool()
        if dtype.is_floating_point or dtype.is_complex:
            values = torch.randn(shape, generator=generator, dtype=torch.float64)
            return values.to(dtype)
        return torch.randint(-100 if dtype != torch.uint8 else 0, 100, shape,
                             generator=generator).to(dtype)

    shapes = st.lists(st.integers(0, 3), max_size=3).map(tuple)
    return st.builds(build, st.sampled_from(TORCH_DTYPES), shapes, st.integers(0, 2**31))


keys = st.text(st.characters(blacklist_characters="/\0", blacklist_categories=("Cs",)),
               min_size=1, max_size=8).filter(lambda k: k != ".")
leaves = (st.none() | st.booleans() | st.integers(-(2**70), 2**70)
          | st.floats(allow_nan=True, allow_infinity=True)
          | st.text(st.characters(blacklist_characters="\0", blacklist_categories=("Cs",)),
                    max_size=10)
          | arrays() | tensors())
trees = st.recursive(
    leaves,
    lambda inner: (st.lists(inner, max_size=3) | st.lists(inner, max_size=3).map(tuple)
                   | st.dictionaries(keys, inner, max_size=3)
                   | st.dictionaries(st.integers(-(2**63), 2**63 - 1), inner, max_size=3)),
    max_leaves=12)


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(state=st.dictionaries(keys, trees, max_size=4))
def test_whatever_save_accepts_comes_back_equal(tmp_path, state):
    directory = tmp_path / "ck"
    ck.save(directory, state, SERIAL, step=1, keep=1)
    same(state, ck.load(directory, SERIAL).state())


def complex32() -> torch.Tensor:
    """A complex32 tensor (torch warns that the dtype is experimental)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.ones(2, dtype=torch.complex32)


def deep(levels: int) -> dict:
    top = node = {}
    for _ in range(levels):
        node["k"] = {}
        node = node["k"]
    return top


@pytest.mark.parametrize("state, error, where", [
    ({"a": {"b/c": 1}}, ValueError, "'b/c' at /a"),
    ({"a": {"b\0c": 1}}, ValueError, "NUL"),
    ({"": 1}, ValueError, "empty"),
    ({"a": {(1, 2): 1}}, TypeError, "at /a"),
    ({"a": {1.5: 1}}, TypeError, "at /a"),
    ({"a": {True: 1}}, TypeError, "at /a"),
    ({"a": {None: 1}}, TypeError, "at /a"),
    ({"a": {1: 1, "b": 2}}, TypeError, "all strings or all integers"),
    ({"a": {2**64: 1}}, ValueError, "64 bits"),
    ({"a": ["x", "y\0z"]}, ValueError, "string at /a/1"),
    ({"a": "\ud800"}, ValueError, "UTF-8"),
    ({"a": {"\ud800": 1}}, ValueError, "UTF-8"),
    ({"a": np.longdouble(1) / 3}, TypeError, "at /a"),
    ({"a": np.ones(2, dtype=np.longdouble)}, TypeError, "at /a"),
    ({"a": np.complex128(1j)}, TypeError, "at /a"),
    ({"a": np.ma.masked_array([1.0], mask=[True])}, TypeError, "mask"),
    ({"a": np.array(["s"])}, TypeError, "numeric"),
    ({"a": b"bytes"}, TypeError, "bytes"),
    ({"a": 1j}, TypeError, "complex"),
    ({"a": {"b": object()}}, TypeError, "/a/b"),
    ({"a": torch.ones(2).to_sparse()}, TypeError, "strided"),
    ({"a": torch.ones(2, device="meta")}, TypeError, "meta"),
    ({"a": complex32()}, TypeError, "complex32"),
    ({"a": deep(ck.MAX_DEPTH + 1)}, ValueError, "nested more than"),
])
def test_what_load_cannot_give_back_is_refused_before_anything_is_written(
        tmp_path, state, error, where):
    with pytest.raises(error, match=where.replace("(", r"\(").replace(")", r"\)")):
        ck.save(tmp_path / "ck", state, SERIAL, step=1)
    assert not (tmp_path / "ck").exists()  # not even the directory


def test_a_refusal_leaves_an_earlier_checkpoint_as_it_was(tmp_path):
    directory = tmp_path / "ck"
    ck.save(directory, {"a": np.arange(3.0)}, SERIAL, step=1)
    before = sorted(p.name for p in directory.iterdir())
    with pytest.raises(ValueError, match="'x/y' at /"):
        ck.save(directory, {"x/y": 1}, SERIAL, step=2)
    assert sorted(p.name for p in directory.iterdir()) == before
    same({"a": np.arange(3.0)}, ck.load(directory, SERIAL).state())


def test_edge_values_round_trip_exactly(tmp_path):
    """What came back wrong before: 0-d arrays and tensors (shape (1,)), NumPy scalars
    (Python numbers of the same value), integer keys (ints, in order), the deepest
    nesting allowed, and conjugated or negated torch views."""
    z = torch.tensor([1 + 2j, 3 - 1j], dtype=torch.complex64)
    state = {"a0": np.array(2.5), "i0": np.array(7, dtype=np.int16),
             "t0": torch.tensor(3.0, dtype=torch.float64), "b0": torch.tensor(True),
             "h0": torch.tensor(1.5, dtype=torch.bfloat16),
             "ints": {3: "three", -1: None, 2**62: [1.0, -0.0, math.inf, math.nan]},
             "deep": deep(ck.MAX_DEPTH - 1), "conj": z.conj(), "neg": torch.ones(3)._neg_view()}
    ck.save(tmp_path, {**state, "np": {"f": np.float32(0.1), "i": np.int8(-3),
                                       "b": np.bool_(True)}}, SERIAL, step=0)
    back = ck.load(tmp_path, SERIAL).state()
    same({**state, "conj": z.conj().resolve_conj(), "neg": -torch.ones(3)},
         {k: v for k, v in back.items() if k != "np"})
    assert back["np"] == {"f": float(np.float32(0.1)), "i": -3, "b": True}
    assert [type(v) for v in back["np"].values()] == [float, int, bool]


@pytest.mark.mpi
@pytest.mark.timeout(60)
def test_a_refusal_on_one_rank_is_an_error_on_every_rank_and_nothing_is_written(comm):
    """The last rank's state has a key with '/': that rank raises its ValueError naming
    the key path, the others a RemoteRankError carrying it; no directory is created."""
    base = comm.bcast_object(__import__("tempfile").mkdtemp() if comm.rank == 0 else None)
    directory = os.path.join(base, "ck")
    state = {"a": {"ok": 1.0}} if comm.rank != comm.size - 1 else {"a": {"bad/key": 1.0}}
    expected = ValueError if comm.rank == comm.size - 1 else hpcqn.RemoteRankError
    with pytest.raises(expected, match="'bad/key' at /a"):
        ck.save(directory, state, comm, step=3)
    comm.barrier()
    assert not os.path.exists(directory)
    ck.save(directory, {"a": {"ok": float(comm.rank)}}, comm, step=3)  # then a good one
    assert ck.load(directory, comm).state() == {"a": {"ok": float(comm.rank)}}
