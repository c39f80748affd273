"""Checkpoints with h5py: one HDF5 file per rank plus a JSON manifest, written so that a
crash at any moment leaves the previous checkpoint loadable, and read trusting nothing.

Layout of ``directory``::

    ckpt-00000120/           one checkpoint (the step in the name)
        manifest.json        rank count, step, per-file size and SHA-256, user metadata
        rank-00000.h5        rank 0's state ... one file per rank
    latest                   the name of the newest complete checkpoint (one line)

:func:`save` (every rank calls it): each rank builds its HDF5 file in memory, then writes
the bytes with plain ``os.write`` into a hidden temporary directory and fsyncs them (so a
full disk is an ordinary ``OSError``, never a crash inside HDF5); the ranks agree that
every file is written (one reduction); rank 0 writes the manifest, renames the directory
to its final name (atomic), and only then replaces ``latest`` (written to a temporary
name and renamed). The last ``keep`` checkpoints are kept. Any failure on any rank (a
full disk, a read-only file system, a value that cannot be stored) raises on every rank
with one line naming the file and the reason (``no space left on device``), removes the
temporary directory and leaves the previous checkpoint and ``latest`` as they were.

A state is a tree of dicts (string or integer keys), lists and tuples, with leaves that
are numbers, strings, booleans, None, NumPy or CuPy arrays and torch tensors. It is
stored as HDF5 groups, datasets and attributes: numbers and arrays only, never pickle,
and loading never executes anything. Arrays come back as NumPy arrays (CuPy arrays and
torch tensors as what they were, on the host; moving them to a device is the caller's).
:func:`save` accepts only what :func:`load` gives back equal (:func:`check_storable`,
before anything is written, agreed by every rank): a dict's keys all strings (non-empty,
UTF-8, without ``/`` or NUL, not ``.``) or all integers of 64 bits (they come back as
``int``); strings UTF-8 without NUL; NumPy scalars of at most 64 bits (they come back as
Python numbers); arrays and tensors of a numeric dtype HDF5 keeps exactly (no
``longdouble``, no masked arrays, strided tensors only), of any shape (0-d too); at most
:data:`MAX_DEPTH` levels of nesting. Anything else is a ``TypeError`` or ``ValueError``
naming its key path (``/optimizer/blocks/3``).
Each rank file's root says which checkpoint ``step``, ``rank`` and ``nranks`` it belongs
to (format version 2; version-1 files, which do not, are still read).

:func:`load` reads ``latest`` (or a named checkpoint) and returns this rank's state when
the rank count is the same, or every rank's states when it is not (elastic restart:
optimizer states are keyed by block or layer id, so :func:`merge` of all ranks' states
gives each new rank what it owns). A checkpoint is data from disk, possibly another
user's or a damaged file system's, so the loader trusts none of it:

* paths stay inside the checkpoint directory: ``latest`` must be a small regular file
  holding one bare name ``ckpt-NNNNNNNN`` of a real directory (not a symlink) inside
  ``directory``; manifest entry ``r`` must name exactly ``rank-NNNNN.h5`` for rank ``r``;
  the manifest and rank files must be regular files (no symlinks, FIFOs, devices or
  directories: checked with ``lstat`` and opened with ``O_NOFOLLOW | O_NONBLOCK``
  relative to the checkpoint directory's descriptor, so nothing can hang or escape);
* the manifest is JSON of at most 16 MiB with every field type-checked (format, version,
  step, nranks, one entry per rank with file name, byte count, SHA-256, and meta);
* each rank file is read once into memory, its size and SHA-256 checked against the
  manifest, and only those verified bytes are handed to h5py (from memory, so the file
  cannot change between the check and the use);
* inside the HDF5 file only what the writer writes is accepted: hard links only (no soft
  or external links, no object linked twice), contiguous or compact datasets (no virtual
  datasets, external raw storage, chunks or filters), the known ``__kind__`` of every
  node with the dtypes and shapes that kind is written with (numeric dtypes for arrays
  and tensors, strings only for ``str`` and ``bigint``; no references, compound or
  variable-length types), lists whose members are exactly ``0 .. length-1``, and
  datasets whose storage matches their shape, whose declared sizes together fit in the
  file: all checked before any dataset is read, so nothing large is allocated for a
  small file;
* the file's ``rank``, ``nranks`` and ``step`` must be those of its manifest entry;
* the verified bytes are decoded first in a forked child process, with a time limit
  (:data:`SANDBOX`, :data:`SANDBOX_SECONDS`; ``HPCQN_CHECKPOINT_SANDBOX=0`` turns it
  off): crafted HDF5 metadata that crashes the HDF5 library or sends it into an endless
  loop (HDF5 2.0.0 loops on a global-heap object of the wrong size) costs the child, not
  the job, and the load fails; only then is the file decoded in the calling process.

Any failure raises :class:`CheckpointError` naming the file and the reason on every rank
(the others carry the failing rank's message), before anything is handed back.
"""

from __future__ import annotations

import errno as errno_codes
import hashlib
import io
import json
import os
import re
import select
import shutil
import signal
import stat
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from . import backend
from .comm import Communicator, RemoteRankError, get_comm

FORMAT = "hpcqn-checkpoint"
VERSION = 2  # 2: rank files carry rank, nranks and step; 1 is still read
LATEST = "latest"
KIND = "__kind__"
MANIFEST = "manifest.json"
MAX_MANIFEST_BYTES = 16 << 20
MAX_LATEST_BYTES = 4096
MAX_DEPTH = 400
_CHUNK = 16 << 20
_CHECKPOINT_NAME = re.compile(r"ckpt-(\d{8,})")
_RANK_FILE = re.compile(r"rank-(\d{5,})\.h5")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_INTEGER = re.compile(r"-?[0-9]{1,4000}")
_GROUP_KINDS = ("dict", "intdict", "list", "tuple")
_DATASET_KINDS = ("none", "bool", "int", "bigint", "float", "str", "array", "torch")
_DEVICES = ("numpy", "cupy")
# torch dtype (as written in the "dtype" attribute) -> the NumPy dtype of its dataset
_TORCH_DTYPES = {"float64": "f8", "float32": "f4", "float16": "f2", "bfloat16": "i2",
                 "complex128": "c16", "complex64": "c8", "int64": "i8", "int32": "i4",
                 "int16": "i2", "int8": "i1", "uint8": "u1", "uint16": "u2", "uint32": "u4",
                 "uint64": "u8", "bool": "?"}


class CheckpointError(RuntimeError):
    """A checkpoint could not be written or read (the message names the file)."""


class RemoteCheckpointError(CheckpointError, RemoteRankError):
    """Raised on the other ranks when one rank's checkpoint operation failed: a
    :class:`CheckpointError` (and a :class:`hpcqn.RemoteRankError`) whose message is
    ``rank R: <that rank's message>``, which names the file."""

    def __init__(self, rank: int, message: str):
        text = message.split(": ", 1)[1] if message.startswith("CheckpointError: ") else message
        RuntimeError.__init__(self, f"rank {rank}: {text}")
        self.rank = rank
        self.remote_message = message


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _reason(exc: BaseException) -> str:
    """An OSError as its errno's text in lower case (``no space left on device``),
    anything else as ``Type: message``; one line."""
    if isinstance(exc, OSError) and exc.errno:
        return os.strerror(exc.errno).lower()
    return _one_line(f"{type(exc).__name__}: {exc}")


# -- tree <-> HDF5 --------------------------------------------------------------------------
_INT64 = (-(2**63), 2**63)
_EXACT_FLOAT_BYTES = (2, 4, 8)  # float16/32/64 (and complex64/128): HDF5 keeps them exactly


def _key_problem(key: Any) -> str | None:
    """Why ``key`` (a string dict key) cannot be an HDF5 link name that comes back as it
    was, or None."""
    if not key or key == ".":
        return "an HDF5 name cannot be empty or '.'"
    if "/" in key:
        return "'/' separates HDF5 names"
    if "\0" in key:
        return "HDF5 names end at a NUL character"
    try:
        key.encode("utf-8")
    except UnicodeEncodeError:
        return "it is not valid UTF-8 (a lone surrogate)"
    return None


def _text_problem(text: str) -> str | None:
    if "\0" in text:
        return "HDF5 strings end at a NUL character"
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return "it is not valid UTF-8 (a lone surrogate)"
    return None


def _dtype_problem(dtype: np.dtype) -> str | None:
    """Why arrays of ``dtype`` would not come back equal, or None."""
    if dtype.kind not in "biufc":
        return f"checkpoint arrays must be numeric, got dtype {dtype}"
    if dtype.kind == "f" and dtype.itemsize not in _EXACT_FLOAT_BYTES:
        return f"dtype {dtype} is not stored exactly (float16, float32 and float64 are)"
    if dtype.kind == "c" and dtype.itemsize // 2 not in _EXACT_FLOAT_BYTES[1:]:
        return f"dtype {dtype} is not stored exactly (complex64 and complex128 are)"
    return None


def _tensor_problem(tensor: Any) -> str | None:
    import torch

    if tensor.layout != torch.strided:
        return f"a {tensor.layout} tensor (strided tensors only)"
    if tensor.is_quantized:
        return "a quantized tensor"
    if tensor.device.type == "meta":
        return "a tensor on the meta device holds no data"
    dtype = str(tensor.dtype).replace("torch.", "")
    if dtype not in _TORCH_DTYPES:
        return f"torch dtype {dtype} (stored: {', '.join(_TORCH_DTYPES)})"
    return None


def check_storable(state: Mapping[str, Any]) -> None:
    """Raise ``TypeError`` or ``ValueError`` naming the key path (``/a/b/0``) of the first
    value of ``state`` that :func:`load` would not give back equal (see the module
    docstring); nothing is written. :func:`save` calls it on every rank first."""
    stack: list[tuple[str, Any, int]] = [("", state, -1)]
    while stack:
        path, value, depth = stack.pop()
        where = path or "/"
        if depth > MAX_DEPTH:
            raise ValueError(f"checkpoint state nested more than {MAX_DEPTH} levels deep at "
                             f"{where[:200]}...")
        if isinstance(value, Mapping):
            keys = list(value)
            if not all(isinstance(k, str) for k in keys):
                if not all(_integer(k) for k in keys):
                    raise TypeError(f"checkpoint dict keys must be all strings or all "
                                    f"integers, got {sorted(map(repr, keys))[:5]} at {where}")
                for k in keys:
                    if not _INT64[0] <= int(k) < _INT64[1]:
                        raise ValueError(f"checkpoint dict key {k} at {where} does not fit "
                                         f"in 64 bits")
            for k in keys:
                if isinstance(k, str) and _key_problem(k):
                    raise ValueError(f"checkpoint key {k!r} at {where} cannot be stored: "
                                     f"{_key_problem(k)}")
                stack.append((f"{path}/{k}", value[k], depth + 1))
        elif isinstance(value, (list, tuple)):
            stack.extend((f"{path}/{i}", item, depth + 1) for i, item in enumerate(value))
        elif value is None or isinstance(value, (bool, np.bool_, int, np.integer)):
            pass
        elif isinstance(value, (float, np.floating)):
            if isinstance(value, np.floating) and value.dtype.itemsize > 8:
                raise TypeError(f"cannot store a {value.dtype} scalar exactly (at {where}): "
                                f"float64 at most")
        elif isinstance(value, str):
            if _text_problem(value):
                raise ValueError(f"checkpoint string at {where} cannot be stored: "
                                 f"{_text_problem(value)}")
        elif _is_torch_tensor(value):
            if _tensor_problem(value):
                raise TypeError(f"cannot store {_tensor_problem(value)} in a checkpoint "
                                f"(at {where})")
        elif isinstance(value, np.ndarray) or backend.is_cupy_array(value):
            if isinstance(value, np.ma.MaskedArray):
                raise TypeError(f"cannot store a masked array in a checkpoint (at {where}): "
                                f"its mask would be lost")
            if _dtype_problem(value.dtype):
                raise TypeError(f"{_dtype_problem(value.dtype)} (at {where})")
        else:
            raise TypeError(f"cannot store a {type(value).__name__} in a checkpoint (at "
                            f"{where}): numbers, strings, arrays, dicts and lists only")


def _write(group: Any, key: str, value: Any) -> None:
    import h5py

    if isinstance(value, Mapping):
        sub = group.create_group(key, track_order=True)
        keys = list(value)  # all strings or all integers (check_storable)
        sub.attrs[KIND] = "dict" if all(isinstance(k, str) for k in keys) else "intdict"
        for k in keys:
            _write(sub, str(int(k)) if _integer(k) else k, value[k])
    elif isinstance(value, (list, tuple)):
        sub = group.create_group(key, track_order=True)
        sub.attrs[KIND] = "tuple" if isinstance(value, tuple) else "list"
        sub.attrs["length"] = len(value)
        for i, item in enumerate(value):
            _write(sub, str(i), item)
    elif value is None:
        group.create_dataset(key, data=h5py.Empty("f")).attrs[KIND] = "none"
    elif isinstance(value, (bool, np.bool_)):
        group.create_dataset(key, data=np.bool_(value)).attrs[KIND] = "bool"
    elif isinstance(value, (int, np.integer)):
        value = int(value)
        if -(2**63) <= value < 2**63:
            group.create_dataset(key, data=np.int64(value)).attrs[KIND] = "int"
        else:  # RNG states hold 128-bit integers
            group.create_dataset(key, data=str(value)).attrs[KIND] = "bigint"
    elif isinstance(value, (float, np.floating)):
        group.create_dataset(key, data=np.float64(value)).attrs[KIND] = "float"
    elif isinstance(value, str):
        group.create_dataset(key, data=value).attrs[KIND] = "str"
    elif _is_torch_tensor(value):
        tensor = value.detach().cpu().resolve_conj().resolve_neg().contiguous()
        dtype = str(tensor.dtype).replace("torch.", "")
        if dtype == "bfloat16":  # no NumPy type: its raw bits
            import torch

            array = tensor.view(torch.int16).numpy()
        else:
            array = tensor.numpy()
        dataset = group.create_dataset(key, data=array)
        dataset.attrs[KIND] = "torch"
        dataset.attrs["dtype"] = dtype
    elif hasattr(value, "shape") and hasattr(value, "dtype"):
        device = "cupy" if backend.is_cupy_array(value) else "numpy"
        # np.asarray, not np.ascontiguousarray: that makes a 0-d array 1-d.
        array = np.asarray(backend.to_host(value))
        if not array.flags.c_contiguous:
            array = array.copy(order="C")
        dataset = group.create_dataset(key, data=array)
        dataset.attrs[KIND] = "array"
        dataset.attrs["device"] = device
    else:
        raise TypeError(f"cannot store a {type(value).__name__} in a checkpoint (at "
                        f"{group.name}/{key}): numbers, strings, arrays, dicts and lists only")


def _is_torch_tensor(value: Any) -> bool:
    module = type(value).__module__
    return module.startswith("torch") and type(value).__name__ in ("Tensor", "Parameter")


def _encode(state: Mapping[str, Any], header: Mapping[str, int]) -> bytes:
    """``state`` as the bytes of an HDF5 file, built in memory (no file is touched)."""
    import h5py

    buffer = io.BytesIO()
    with h5py.File(buffer, "w", track_order=True) as f:
        f.attrs["format"] = FORMAT
        f.attrs["version"] = VERSION
        for name, value in header.items():
            f.attrs[name] = np.int64(value)
        for key, value in state.items():
            _write(f, str(key), value)
    return buffer.getvalue()


def _write_bytes(path: Path, data: bytes | memoryview, exclusive: bool = True) -> None:
    """``data`` into a new file ``path`` (replacing one unless ``exclusive``) with plain
    writes, fsynced; a failure raises :class:`CheckpointError` (one line: the file and the
    reason) and removes the file."""
    flags = os.O_WRONLY | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    flags |= os.O_EXCL if exclusive else os.O_TRUNC
    view = memoryview(data)
    created = False
    try:
        fd = os.open(path, flags, 0o644)
        created = True
        try:
            done = 0
            while done < len(view):
                done += os.write(fd, view[done:done + _CHUNK])
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as exc:
        if created:
            try:
                os.unlink(path)
            except OSError:
                pass
        raise CheckpointError(f"cannot write {path}: {_reason(exc)}") from exc


def write_state(path: str | Path, state: Mapping[str, Any], *, rank: int | None = None,
                nranks: int | None = None, step: int | None = None) -> None:
    """One state tree into one new HDF5 file (built in memory, then written and
    fsynced). ``rank``, ``nranks`` and ``step`` (what :func:`save` passes) go into the
    file's root attributes, where :func:`load` checks them against the manifest."""
    header = {name: int(value) for name, value in
              (("rank", rank), ("nranks", nranks), ("step", step)) if value is not None}
    check_storable(state)
    _write_bytes(Path(path), _encode(state, header), exclusive=False)


# -- HDF5 -> tree, trusting nothing -----------------------------------------------------------
def _integer(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


class _Reader:
    """Checks a whole HDF5 file against what the writer writes (:meth:`plan`), before
    anything is read, then reads it (:meth:`read`). ``where`` names the file in errors,
    ``limit`` bounds the bytes its datasets may declare in all."""

    def __init__(self, f: Any, where: str, limit: int, tensors: bool = True):
        self.f, self.where, self.limit, self.declared = f, where, limit, 0
        self.tensors = tensors  # False: torch tensors read as their NumPy arrays

    def fail(self, node: str, reason: str) -> CheckpointError:
        return CheckpointError(f"{self.where}: {node}: {reason}")

    # attributes
    def attr(self, node: Any, name: str, path: str, kind: str) -> Any:
        """Attribute ``name`` of ``node``: a scalar string (``kind="str"``) or integer."""
        import h5py

        if name not in node.attrs:
            return None
        aid = node.attrs.get_id(name)
        tclass = aid.get_type().get_class()
        if aid.shape != () or aid.get_storage_size() > 1 << 16:
            raise self.fail(path, f"attribute {name!r} is not a small scalar")
        if kind == "str":
            if tclass != h5py.h5t.STRING:
                raise self.fail(path, f"attribute {name!r} is not a string")
            value = node.attrs[name]
            if isinstance(value, bytes):
                value = value.decode("utf-8")
            if not isinstance(value, str):
                raise self.fail(path, f"attribute {name!r} is not a string")
            return value
        if tclass != h5py.h5t.INTEGER:
            raise self.fail(path, f"attribute {name!r} is not an integer")
        value = node.attrs[name]
        if not _integer(value):
            raise self.fail(path, f"attribute {name!r} is not an integer")
        return int(value)

    def kind(self, node: Any, path: str, allowed: tuple[str, ...]) -> str:
        kind = self.attr(node, KIND, path, "str")
        if kind not in allowed:
            what = "group" if allowed is _GROUP_KINDS else "dataset"
            raise self.fail(path, f"unknown {what} kind {kind!r}")
        return kind

    # structure
    def members(self, group: Any, path: str) -> list[tuple[str, Any, str]]:
        """(name, object, path) of each member of ``group``: hard links only, each object
        linked once, groups and datasets only."""
        import h5py

        out = []
        for name in group:
            member = f"{path.rstrip('/')}/{name}"
            link = group.get(name, getlink=True)
            if isinstance(link, h5py.SoftLink):
                raise self.fail(member, f"is a soft link (to {link.path!r}); only hard links "
                                        f"are read")
            if isinstance(link, h5py.ExternalLink):
                raise self.fail(member, f"is an external link (to {link.filename!r}); only "
                                        f"hard links are read")
            if not isinstance(link, h5py.HardLink):
                raise self.fail(member, "is not a hard link")
            obj = group[name]
            if not isinstance(obj, (h5py.Group, h5py.Dataset)):
                raise self.fail(member, f"is a {type(obj).__name__}, not a group or dataset")
            if h5py.h5o.get_info(obj.id).rc != 1:
                raise self.fail(member, "is linked more than once (the writer links every "
                                        "object once)")
            out.append((name, obj, member))
        return out

    def plan(self, node: Any, path: str, depth: int = 0) -> tuple[Any, ...]:
        """What :meth:`read` will build, every node checked; nothing is read but the
        attributes."""
        import h5py

        if depth > MAX_DEPTH:
            raise self.fail(path, f"nested more than {MAX_DEPTH} levels deep")
        if isinstance(node, h5py.Group):
            kind = self.kind(node, path, _GROUP_KINDS)
            members = self.members(node, path)
            if kind in ("dict", "intdict"):
                items = []
                for name, obj, member in members:
                    key: Any = name
                    if kind == "intdict":
                        if not _INTEGER.fullmatch(name) or str(int(name)) != name:
                            raise self.fail(member, "is not an integer key of an intdict")
                        key = int(name)
                    items.append((key, self.plan(obj, member, depth + 1)))
                return (kind, items)
            length = self.attr(node, "length", path, "int")
            if length is None or length < 0:
                raise self.fail(path, f"list length {length!r} is not an integer >= 0")
            names = {name for name, _, _ in members}
            if len(members) != length or names != {str(i) for i in range(length)}:
                raise self.fail(path, f"list members {sorted(names)[:5]} are not exactly "
                                      f"0..{length - 1}")
            by_name = {name: (obj, member) for name, obj, member in members}
            items = [self.plan(*by_name[str(i)], depth + 1) for i in range(length)]
            return (kind, items)
        return self.plan_dataset(node, path)

    def plan_dataset(self, ds: Any, path: str) -> tuple[Any, ...]:
        import h5py

        kind = self.kind(ds, path, _DATASET_KINDS)
        dcpl = ds.id.get_create_plist()
        layout = dcpl.get_layout()
        if layout == h5py.h5d.VIRTUAL:
            raise self.fail(path, "is a virtual dataset (data from other files)")
        if dcpl.get_external_count():
            raise self.fail(path, "uses external raw storage (data from other files)")
        if layout not in (h5py.h5d.CONTIGUOUS, h5py.h5d.COMPACT) or dcpl.get_nfilters():
            raise self.fail(path, "is chunked or filtered (the writer writes neither)")
        space = ds.id.get_space().get_simple_extent_type()
        dtype = ds.dtype
        if dtype.fields is not None or dtype.subdtype is not None:
            raise self.fail(path, f"has a compound or array dtype {dtype}")
        if h5py.check_ref_dtype(dtype) is not None:
            raise self.fail(path, "holds object references")
        if kind == "none":
            if space != h5py.h5s.NULL:
                raise self.fail(path, "a 'none' must be an empty dataset")
            return ("none",)
        if kind in ("str", "bigint"):
            if space != h5py.h5s.SCALAR or h5py.check_string_dtype(dtype) is None:
                raise self.fail(path, f"a {kind!r} must be a scalar string, got {dtype} "
                                      f"{ds.shape}")
            if ds.id.get_storage_size() > self.limit:
                raise self.fail(path, "declares more bytes than the file holds")
            return (kind, path)
        if dtype.kind not in "biufc" or h5py.check_vlen_dtype(dtype) is not None:
            raise self.fail(path, f"a {kind!r} must be numeric, got dtype {dtype}")
        if dtype.kind != "b" and h5py.check_enum_dtype(dtype) is not None:
            raise self.fail(path, "is an enum (the writer writes none)")
        expected = {"bool": "b", "int": "iu", "float": "f"}.get(kind)
        if expected is not None and (space != h5py.h5s.SCALAR or dtype.kind not in expected):
            raise self.fail(path, f"a {kind!r} must be a scalar of dtype kind {expected!r}, "
                                  f"got {dtype} {ds.shape}")
        if space not in (h5py.h5s.SCALAR, h5py.h5s.SIMPLE):
            raise self.fail(path, f"a {kind!r} must not be empty")
        shape = tuple(int(n) for n in ds.shape)
        nbytes = int(np.prod(shape, dtype=object)) * dtype.itemsize
        stored = ds.id.get_storage_size()
        if stored != nbytes:
            raise self.fail(path, f"declares {nbytes} bytes ({dtype} {shape}) but stores "
                                  f"{stored}")
        self.declared += nbytes
        if self.declared > self.limit:
            raise self.fail(path, f"the datasets declare more bytes ({self.declared}) than "
                                  f"the file holds ({self.limit})")
        extra = None
        if kind == "array":
            extra = self.attr(ds, "device", path, "str")
            if extra not in _DEVICES:
                raise self.fail(path, f"unknown array device {extra!r}")
        elif kind == "torch":
            extra = self.attr(ds, "dtype", path, "str")
            if extra not in _TORCH_DTYPES:
                raise self.fail(path, f"unknown torch dtype {extra!r}")
            if dtype.newbyteorder("=") != np.dtype(_TORCH_DTYPES[extra]):
                raise self.fail(path, f"a torch {extra} tensor stored as {dtype}")
        return (kind, path, extra)

    def read(self, plan: tuple[Any, ...]) -> Any:
        kind = plan[0]
        if kind in ("dict", "intdict"):
            return {key: self.read(sub) for key, sub in plan[1]}
        if kind in ("list", "tuple"):
            items = [self.read(sub) for sub in plan[1]]
            return tuple(items) if kind == "tuple" else items
        if kind == "none":
            return None
        path = plan[1]
        ds = self.f[path]
        if kind in ("str", "bigint"):
            text = ds.asstr()[()]
            if kind == "str":
                return text
            if not _INTEGER.fullmatch(text):
                raise self.fail(path, "a 'bigint' that is not an integer")
            return int(text)
        value = ds[()]
        if kind == "bool":
            return bool(value)
        if kind == "int":
            return int(value)
        if kind == "float":
            return float(value)
        array = np.array(value, dtype=ds.dtype)  # a 0-d one's byte order too
        if kind == "array" or not self.tensors:
            return array
        import torch

        # np.array keeps a 0-d array 0-d (np.ascontiguousarray would make it 1-d).
        tensor = torch.from_numpy(np.array(array, dtype=_TORCH_DTYPES[plan[2]], order="C"))
        return tensor.view(torch.bfloat16) if plan[2] == "bfloat16" else tensor


def _decode(data: bytes, where: str, expect: Mapping[str, int] | None = None,
            version: int | None = None) -> dict[str, Any]:
    """The state tree in the HDF5 file image ``data`` (named ``where`` in errors), every
    node checked before anything is read. ``expect`` (rank, nranks, step) must match the
    file's root attributes; they may be missing only from a version-1 file.

    Crafted HDF5 metadata can crash the HDF5 library or send it into an endless loop,
    digest or not (the manifest can be rewritten as easily as the file). So the file is
    first decoded in a forked child (:data:`SANDBOX`), which reports back; only when the
    child read it completely is it decoded here, the same bytes the same way."""
    _probe(data, where, expect, version)
    return _decode_here(data, where, expect, version)


# Decode every rank file in a forked child first (HPCQN_CHECKPOINT_SANDBOX=0: not).
SANDBOX = os.environ.get("HPCQN_CHECKPOINT_SANDBOX", "1") != "0"
SANDBOX_SECONDS = 60.0  # plus a second per 50 MB of file


def _probe(data: bytes, where: str, expect: Mapping[str, int] | None,
           version: int | None) -> None:
    """Raise :class:`CheckpointError` unless a forked child decodes ``data`` completely
    (without crashing, hanging or failing); nothing when forking is not possible."""
    if not SANDBOX or not hasattr(os, "fork"):
        return
    limit = SANDBOX_SECONDS + len(data) / 50e6
    read_end, write_end = os.pipe()
    try:
        pid = os.fork()
    except OSError:  # no memory to fork: decode it here only
        os.close(read_end)
        os.close(write_end)
        return
    if pid == 0:  # the child: decode, report, and leave without running any cleanup
        code = 3
        try:
            os.close(read_end)
            signal.signal(signal.SIGALRM, signal.SIG_DFL)  # dies even if the parent does
            signal.alarm(int(limit) + 5)
            message = b""
            try:
                _decode_here(data, where, expect, version, tensors=False)
                code = 0
            except CheckpointError as exc:
                code, message = 1, str(exc).encode("utf-8", "replace")
            except BaseException as exc:
                code = 1
                message = f"cannot read {where}: {_reason(exc)}".encode("utf-8", "replace")
            os.write(write_end, message[:4000])
        finally:
            os._exit(code)
    os.close(write_end)
    deadline = time.monotonic() + limit
    chunks: list[bytes] = []
    poller = select.poll()
    poller.register(read_end, select.POLLIN | select.POLLHUP)
    try:
        while True:  # until the child closes its end (exits) or the time is up
            left = deadline - time.monotonic()
            if left <= 0 or not poller.poll(max(1, int(left * 1000))):
                if time.monotonic() < deadline:
                    continue
                raise CheckpointError(f"{where}: HDF5 did not finish reading it in "
                                      f"{limit:.0f} s: a damaged or hostile file")
            chunk = os.read(read_end, 4096)
            if not chunk:
                break
            chunks.append(chunk)
    except BaseException:  # the time is up, or a signal's exception: no child left behind
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
        os.waitpid(pid, 0)
        raise
    finally:
        os.close(read_end)
    status = os.waitpid(pid, 0)[1]
    if os.WIFSIGNALED(status):
        raise CheckpointError(f"{where}: reading it crashed the HDF5 library (signal "
                              f"{os.WTERMSIG(status)}): a damaged or hostile file")
    if os.WEXITSTATUS(status) != 0:
        message = b"".join(chunks).decode("utf-8", "replace")
        raise CheckpointError(message or f"cannot read {where}: the reading process "
                                         f"failed (exit code {os.WEXITSTATUS(status)})")


def _decode_here(data: bytes, where: str, expect: Mapping[str, int] | None,
                 version: int | None, tensors: bool = True) -> dict[str, Any]:
    import h5py

    try:
        f = h5py.File(io.BytesIO(data), "r")
    except Exception as exc:
        raise CheckpointError(f"cannot read {where}: not a readable HDF5 file "
                              f"({_reason(exc)})") from exc
    with f:
        reader = _Reader(f, where, len(data), tensors)
        if reader.attr(f, "format", "/", "str") != FORMAT:
            raise CheckpointError(f"{where} is not an hpcqn checkpoint file")
        found = reader.attr(f, "version", "/", "int")
        if found is None or not 1 <= found <= VERSION:
            raise CheckpointError(f"{where} has format version {found}; this hpcqn reads "
                                  f"1 to {VERSION}")
        if version is not None and found != version:
            raise CheckpointError(f"{where} has format version {found}, its manifest "
                                  f"{version}")
        for name, value in (expect or {}).items():
            said = reader.attr(f, name, "/", "int")
            if said is None and found == 1:
                continue
            if said is None:
                raise CheckpointError(f"{where} does not say which {name} it holds (a "
                                      f"version-{found} file must)")
            if said != value:
                raise CheckpointError(f"{where} says {name} {said}, the manifest {value}: "
                                      f"reordered, mixed up or replaced")
        plan = ("dict", [(name, reader.plan(obj, member))
                         for name, obj, member in reader.members(f, "/")])
        return reader.read(plan)


def read_state(path: str | Path) -> dict[str, Any]:
    """The inverse of :func:`write_state` (the file read once and checked like every
    rank file :func:`load` reads, less the manifest's digest)."""
    path = Path(path)
    data = _read_regular(path, None, None, MAX_BYTES_UNBOUNDED)
    return _guarded(lambda: _decode(data, str(path)), path)


def _guarded(read: Any, path: Path | str) -> Any:
    try:
        return read()
    except CheckpointError:
        raise
    except Exception as exc:
        raise CheckpointError(f"cannot read {path}: {_reason(exc)}") from exc


# -- files and agreement ---------------------------------------------------------------------
MAX_BYTES_UNBOUNDED = 1 << 62
_READ_FLAGS = (os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
               | getattr(os, "O_CLOEXEC", 0))
_DIR_FD = os.open in os.supports_dir_fd and os.stat in os.supports_dir_fd


def describe_mode(mode: int) -> str:
    """What a file of ``st_mode`` ``mode`` is: "a regular file", "a FIFO", "a symlink"..."""
    for test, name in ((stat.S_ISREG, "a regular file"), (stat.S_ISLNK, "a symlink"),
                       (stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a regular file"


def read_regular(path: str | Path, limit: int, follow: bool = False) -> bytes:
    """The bytes of ``path``, which must be a regular file (a symlink to one only with
    ``follow``; never a FIFO, device, socket or directory, so nothing can block or feed
    endless bytes) of at most ``limit`` bytes; else :class:`CheckpointError` naming the
    file and what it is. The reader :func:`load` uses; the job files and the run
    directories of :mod:`hpcqn.experiments.jobs` are read with it too."""
    return _read_regular(Path(path), None, None, limit, follow)


def _read_regular(path: Path, dir_fd: int | None, expected: int | None,
                  limit: int, follow: bool = False) -> bytes:
    """The bytes of ``path`` (``path.name`` relative to ``dir_fd`` when given), which must
    be a regular file (not a symlink unless ``follow``, nor a FIFO, device or directory)
    of at most ``limit`` bytes, and of exactly ``expected`` bytes when given."""
    name: str | Path = path.name if dir_fd is not None else path
    kwargs = {"dir_fd": dir_fd} if dir_fd is not None else {}
    try:
        info = os.stat(name, follow_symlinks=follow, **kwargs)
    except FileNotFoundError as exc:
        raise CheckpointError(f"{path} is missing") from exc
    except OSError as exc:
        raise CheckpointError(f"cannot read {path}: {_reason(exc)}") from exc
    if not stat.S_ISREG(info.st_mode):
        raise CheckpointError(f"{path} is {describe_mode(info.st_mode)}, not a regular file")
    flags = _READ_FLAGS & ~getattr(os, "O_NOFOLLOW", 0) if follow else _READ_FLAGS
    try:
        fd = os.open(name, flags, **kwargs)
    except OSError as exc:
        reason = "a symlink" if exc.errno == errno_codes.ELOOP else _reason(exc)
        raise CheckpointError(f"cannot read {path}: {reason}") from exc
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise CheckpointError(f"{path} is {describe_mode(info.st_mode)}, not a regular "
                                  f"file")
        size = info.st_size
        if expected is not None and size != expected:
            raise CheckpointError(f"{path} has {size} bytes, the manifest says {expected}: "
                                  f"truncated or replaced")
        if size > limit:
            raise CheckpointError(f"{path} has {size} bytes, more than the {limit} allowed")
        parts, total = [], 0
        while total <= size:
            chunk = os.read(fd, min(_CHUNK, size + 1 - total))
            if not chunk:
                break
            parts.append(chunk)
            total += len(chunk)
    except OSError as exc:
        raise CheckpointError(f"cannot read {path}: {_reason(exc)}") from exc
    finally:
        os.close(fd)
    data = b"".join(parts)
    if len(data) != size:
        raise CheckpointError(f"{path} changed while it was read ({len(data)} bytes, "
                              f"{size} expected)")
    return data


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _agree(c: Communicator, error: BaseException | None) -> None:
    """Every rank raises when any rank failed: the failing rank its own error, the others
    a :class:`RemoteCheckpointError` carrying its message when it was a
    :class:`CheckpointError` (a :class:`hpcqn.RemoteRankError` for anything else)."""
    try:
        c.allreduce_scalars([], [], error)
    except RemoteRankError as exc:
        if error is None and exc.remote_message.startswith("CheckpointError"):
            raise RemoteCheckpointError(exc.rank, exc.remote_message) from exc
        raise


def _name(step: int) -> str:
    return f"ckpt-{step:08d}"


def rank_file(rank: int) -> str:
    return f"rank-{rank:05d}.h5"


def save(directory: str | Path, state: Mapping[str, Any], comm: Any = None, step: int = 0,
         keep: int = 3, meta: Mapping[str, Any] | None = None) -> Path:
    """Write this rank's ``state`` as part of checkpoint ``step`` (every rank calls it);
    returns the checkpoint's directory. ``meta`` (rank 0's; JSON-able) goes into the
    manifest. A state :func:`load` would not give back equal (:func:`check_storable`) is
    refused before anything is written: the failing rank's ``TypeError`` or
    ``ValueError`` naming the key path, a :class:`hpcqn.RemoteRankError` carrying it on
    the others. Any later failure raises on every rank (:class:`CheckpointError`, one
    line naming the file and the reason), leaving no temporary directory behind and the
    previous checkpoint and ``latest`` as they were."""
    c = get_comm(comm)
    directory = Path(directory)
    if keep < 1:
        raise ValueError(f"keep must be at least 1, got {keep}")
    step = int(step)
    if step < 0:
        raise ValueError(f"step must be at least 0, got {step}")
    final = directory / _name(step)
    temporary = directory / f".{_name(step)}.tmp"
    error: BaseException | None = None
    meta = dict(meta or {})
    try:
        check_storable(state)
        if c.rank == 0:
            try:
                json.dumps(meta)
            except (TypeError, ValueError, RecursionError) as exc:
                raise CheckpointError(f"the metadata of {final} is not JSON: "
                                      f"{_reason(exc)}") from exc
            shutil.rmtree(temporary, ignore_errors=True)  # a crashed earlier attempt
    except (TypeError, ValueError, CheckpointError) as exc:
        error = exc
    _agree(c, error)  # nothing written yet; from here on every rank may write
    path = temporary / rank_file(c.rank)
    entry: dict[str, Any] = {}
    try:
        try:
            temporary.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise CheckpointError(f"cannot create {temporary}: {_reason(exc)}") from exc
        data = _encode(state, {"rank": c.rank, "nranks": c.size, "step": step})
        _write_bytes(path, data)
        entry = {"file": path.name, "bytes": len(data),
                 "sha256": hashlib.sha256(data).hexdigest()}
        del data
    except (TypeError, ValueError, CheckpointError) as exc:  # every rank learns of it below
        error = exc
    except Exception as exc:
        error = CheckpointError(f"cannot write {path}: {_reason(exc)}")
    try:
        _agree(c, error)
    except BaseException:
        if c.rank == 0:
            shutil.rmtree(temporary, ignore_errors=True)
        raise
    files = c.allgather_object(entry)
    if c.rank == 0:
        error = _commit(directory, temporary, final, step, c.size, files, meta, keep)
    _agree(c, error)
    return final


def _commit(directory: Path, temporary: Path, final: Path, step: int, nranks: int,
            files: list[dict[str, Any]], meta: dict[str, Any], keep: int
            ) -> CheckpointError | None:
    """Rank 0: manifest, rename, ``latest``, prune. On failure: the temporary files
    removed, ``latest`` untouched, and the error returned."""
    manifest = {"format": FORMAT, "version": VERSION, "step": step, "nranks": nranks,
                "files": files, "meta": meta}
    pointer = directory / f".{LATEST}.tmp"
    old = directory / f".{final.name}.old"
    renamed = False
    target = temporary / MANIFEST
    try:
        _write_bytes(target, (json.dumps(manifest, indent=1) + "\n").encode())
        _fsync_dir(temporary)
        target = final
        if final.exists():  # the same step saved again: replace it, keeping the old one
            shutil.rmtree(old, ignore_errors=True)  # until the new one is in place
            os.rename(final, old)
        os.rename(temporary, final)
        renamed = True
        _fsync_dir(directory)
        target = pointer
        try:
            os.unlink(pointer)
        except FileNotFoundError:
            pass
        _write_bytes(pointer, (final.name + "\n").encode())
        target = directory / LATEST
        os.replace(pointer, directory / LATEST)
        _fsync_dir(directory)
    except (OSError, CheckpointError) as exc:
        error = exc if isinstance(exc, CheckpointError) else CheckpointError(
            f"cannot write {target}: {_reason(exc)}")
        try:
            os.unlink(pointer)
        except OSError:
            pass
        if renamed:  # latest still names the previous checkpoint: put things back
            shutil.rmtree(final, ignore_errors=True)
        if old.exists() and not final.exists():
            try:
                os.rename(old, final)
            except OSError:
                pass
        shutil.rmtree(temporary, ignore_errors=True)
        return error
    shutil.rmtree(old, ignore_errors=True)
    _prune(directory, keep)
    return None


def _prune(directory: Path, keep: int) -> None:
    names = sorted((p.name for p in directory.glob("ckpt-*")
                    if _CHECKPOINT_NAME.fullmatch(p.name) and p.is_dir() and not p.is_symlink()),
                   key=lambda name: int(name[5:]))
    for name in names[:-keep]:
        shutil.rmtree(directory / name, ignore_errors=True)


@dataclass
class Checkpoint:
    """What :func:`load` returns: the step, the manifest's metadata, the rank count it was
    saved on, and the states read (``[this rank's]`` on the same rank count, else every
    rank's in rank order)."""

    path: Path
    step: int
    meta: dict[str, Any]
    nranks: int
    states: list[dict[str, Any]]

    def state(self) -> dict[str, Any]:
        """This rank's state: its own file on the same rank count, else all merged."""
        return self.states[0] if len(self.states) == 1 else merge(self.states)


def latest(directory: str | Path) -> Path | None:
    """The newest complete checkpoint in ``directory``, or None when there is no
    ``latest`` pointer. A pointer that is not a small regular file naming a checkpoint
    directory (``ckpt-NNNNNNNN``, a real directory inside ``directory``) raises
    :class:`CheckpointError`."""
    directory = Path(directory)
    pointer = directory / LATEST
    try:
        os.stat(pointer, follow_symlinks=False)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as exc:
        raise CheckpointError(f"cannot read {pointer}: {_reason(exc)}") from exc
    data = _read_regular(pointer, None, None, MAX_LATEST_BYTES)
    try:
        name = data.decode("ascii").strip()
    except UnicodeDecodeError:
        name = None
    if name is None or not _CHECKPOINT_NAME.fullmatch(name):
        shown = repr(data[:60])
        raise CheckpointError(f"{pointer} does not hold a checkpoint name (ckpt-NNNNNNNN): "
                              f"{shown}")
    where = directory / name
    try:
        info = os.stat(where, follow_symlinks=False)
    except OSError as exc:
        raise CheckpointError(f"{pointer} names {name}, which cannot be read: "
                              f"{_reason(exc)}") from exc
    if not stat.S_ISDIR(info.st_mode):
        raise CheckpointError(f"{pointer} names {where}, which is "
                              f"{describe_mode(info.st_mode)}, not a checkpoint directory")
    return where


def _manifest(data: bytes, where: Path, manifest_path: Path) -> dict[str, Any]:
    """The manifest's fields, every one type-checked."""
    try:
        manifest = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise CheckpointError(f"cannot read {manifest_path}: not JSON ({_reason(exc)})") from exc

    def bad(field: str, what: str, value: Any) -> CheckpointError:
        shown = repr(value)
        shown = shown if len(shown) <= 80 else shown[:77] + "..."
        return CheckpointError(f"{manifest_path}: field {field!r} must be {what}, got {shown}")

    def integer(value: Any) -> bool:
        return isinstance(value, int) and not isinstance(value, bool)

    if not isinstance(manifest, dict):
        raise bad("(top level)", "an object", manifest)
    if manifest.get("format") != FORMAT:
        raise bad("format", repr(FORMAT), manifest.get("format"))
    version = manifest.get("version")
    if not integer(version):
        raise bad("version", "an integer", version)
    if not 1 <= version <= VERSION:
        raise CheckpointError(f"{manifest_path} has format version {version}; this hpcqn "
                              f"reads 1 to {VERSION}")
    step = manifest.get("step")
    if not integer(step) or step < 0:
        raise bad("step", "an integer >= 0", step)
    match = _CHECKPOINT_NAME.fullmatch(where.name)
    if match and int(match.group(1)) != step:
        raise CheckpointError(f"{manifest_path}: field 'step' is {step}, the directory is "
                              f"{where.name}")
    nranks = manifest.get("nranks")
    if not integer(nranks) or nranks < 1:
        raise bad("nranks", "an integer >= 1", nranks)
    files = manifest.get("files")
    if not isinstance(files, list):
        raise bad("files", "a list", files)
    if len(files) != nranks:
        raise CheckpointError(f"{manifest_path}: field 'files' has {len(files)} entries, "
                              f"'nranks' is {nranks}")
    for r, entry in enumerate(files):
        field = f"files[{r}]"
        if not isinstance(entry, dict):
            raise bad(field, "an object", entry)
        if entry.get("file") != rank_file(r):
            raise bad(f"{field}.file", f"{rank_file(r)!r} (rank {r}'s file, a bare name)",
                      entry.get("file"))
        size = entry.get("bytes")
        if not integer(size) or size < 0:
            raise bad(f"{field}.bytes", "an integer >= 0", size)
        digest = entry.get("sha256")
        if not isinstance(digest, str) or not _SHA256.fullmatch(digest):
            raise bad(f"{field}.sha256", "64 lower-case hex digits", digest)
    meta = manifest.get("meta")
    if not isinstance(meta, dict):
        raise bad("meta", "an object", meta)
    return manifest


def _open_checkpoint(directory: str | Path, path: str | Path | None
                     ) -> tuple[Path, int | None]:
    """The checkpoint directory (``path``, else the one ``latest`` names, which must not
    be a symlink) and a descriptor of it (None where the platform has no ``dir_fd``)."""
    if path is not None:
        where = Path(path)
        flags = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_NONBLOCK", 0)
    else:
        found = latest(directory)
        if found is None:
            raise CheckpointError(f"no checkpoint in {directory} (no {LATEST} file)")
        where = found
        flags = (os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_NONBLOCK", 0)
                 | getattr(os, "O_NOFOLLOW", 0))
    try:
        dir_fd = os.open(where, flags | getattr(os, "O_CLOEXEC", 0)) if _DIR_FD else None
    except OSError as exc:
        reason = "a symlink" if exc.errno == errno_codes.ELOOP else _reason(exc)
        raise CheckpointError(f"cannot open checkpoint directory {where}: {reason}") from exc
    if dir_fd is not None and not stat.S_ISDIR(os.fstat(dir_fd).st_mode):
        os.close(dir_fd)
        raise CheckpointError(f"{where} is not a directory")
    return where, dir_fd


def _manifest_at(where: Path, dir_fd: int | None) -> dict[str, Any]:
    manifest_path = where / MANIFEST
    return _manifest(_read_regular(manifest_path, dir_fd, None, MAX_MANIFEST_BYTES), where,
                     manifest_path)


@dataclass
class Manifest:
    """What :func:`read_manifest` returns: the checkpoint's directory, step, rank count
    and metadata."""

    path: Path
    step: int
    nranks: int
    meta: dict[str, Any]


def read_manifest(directory: str | Path) -> Manifest | None:
    """The manifest of the checkpoint that ``latest`` names in ``directory``, read with
    every check :func:`load` makes on it (``latest`` and the checkpoint directory as
    :func:`latest` says, the manifest a regular file of at most
    :data:`MAX_MANIFEST_BYTES`, every field type-checked), or None when there is no
    ``latest``. No rank file is read and nothing is agreed: this rank's answer, or a
    :class:`CheckpointError` naming the file."""
    if latest(directory) is None:
        return None
    where, dir_fd = _open_checkpoint(directory, None)
    try:
        manifest = _manifest_at(where, dir_fd)
    finally:
        if dir_fd is not None:
            os.close(dir_fd)
    return Manifest(where, manifest["step"], manifest["nranks"], dict(manifest["meta"]))


def _load_here(directory: str | Path, c: Communicator, path: str | Path | None) -> Checkpoint:
    """This rank's part of :func:`load`: everything checked, nothing shared."""
    where, dir_fd = _open_checkpoint(directory, path)
    try:
        manifest = _manifest_at(where, dir_fd)
        nranks = manifest["nranks"]
        ranks = [c.rank] if nranks == c.size else list(range(nranks))
        states = []
        for r in ranks:
            entry = manifest["files"][r]
            file = where / entry["file"]
            data = _read_regular(file, dir_fd, entry["bytes"], entry["bytes"])
            if hashlib.sha256(data).hexdigest() != entry["sha256"]:
                raise CheckpointError(f"{file} does not match its SHA-256 in the manifest: "
                                      f"corrupted")
            expect = {"rank": r, "nranks": nranks, "step": manifest["step"]}
            states.append(_guarded(lambda data=data, file=file, expect=expect: _decode(
                data, str(file), expect, manifest["version"]), file))
            del data
    finally:
        if dir_fd is not None:
            os.close(dir_fd)
    return Checkpoint(where, manifest["step"], dict(manifest["meta"]), nranks, states)


def load(directory: str | Path, comm: Any = None, path: str | Path | None = None) -> Checkpoint:
    """Read the checkpoint ``latest`` points to in ``directory`` (or ``path``). Every
    rank calls it; a missing, truncated, corrupted or tampered file raises
    :class:`CheckpointError` naming it, on every rank (see the module docstring for what
    is checked)."""
    c = get_comm(comm)
    error: BaseException | None = None
    result: Checkpoint | None = None
    try:
        result = _load_here(directory, c, path)
    except CheckpointError as exc:
        error = exc
    except Exception as exc:  # anything else is still this checkpoint's fault
        where = path if path is not None else directory
        error = CheckpointError(f"cannot read the checkpoint in {where}: {_reason(exc)}")
    _agree(c, error)
    if result is None:  # pragma: no cover - _agree raised
        raise CheckpointError(f"no checkpoint read from {directory}")
    return result


def merge(states: list[Any]) -> Any:
    """One state from several ranks' states: dicts are merged key by key (recursively),
    so per-block and per-layer entries owned by different ranks come together; for any
    other value the first rank's is kept (such values are the same on every rank)."""
    first = states[0]
    if isinstance(first, Mapping) and all(isinstance(s, Mapping) for s in states):
        keys: dict[Any, None] = {}
        for s in states:
            keys.update(dict.fromkeys(s))
        return {k: merge([s[k] for s in states if k in s]) for k in keys}
    return first
