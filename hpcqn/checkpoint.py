"""Checkpoints with h5py: one HDF5 file per rank plus a JSON manifest, written so that a
crash at any moment leaves the previous checkpoint loadable.

Layout of ``directory``::

    ckpt-00000120/           one checkpoint (the step in the name)
        manifest.json        rank count, step, per-file size and SHA-256, user metadata
        rank-00000.h5        rank 0's state ... one file per rank
    latest                   the name of the newest complete checkpoint (one line)

:func:`save` (every rank calls it): each rank writes its file into a hidden temporary
directory, flushes and fsyncs it; the ranks agree that every file is written (one
reduction; a failure on any rank raises on all and removes the temporary directory);
rank 0 writes the manifest, renames the directory to its final name (atomic), and only
then replaces ``latest`` (written to a temporary name and renamed). The last ``keep``
checkpoints are kept.

A state is a tree of dicts (string or integer keys), lists and tuples, with leaves that
are numbers, strings, booleans, None, NumPy or CuPy arrays and torch tensors. It is
stored as HDF5 groups, datasets and attributes: numbers and arrays only, never pickle,
and loading never executes anything. Arrays come back as NumPy arrays (CuPy arrays and
torch tensors as what they were, on the host; moving them to a device is the caller's).

:func:`load` reads ``latest`` (or a named checkpoint), checks every file it reads
against the manifest's size and digest, and returns this rank's state when the rank
count is the same, or every rank's states when it is not (elastic restart: optimizer
states are keyed by block or layer id, so :func:`merge` of all ranks' states gives each
new rank what it owns). Any failure raises :class:`CheckpointError` naming the file on
every rank, before anything is handed back.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from . import backend
from .comm import Communicator, get_comm

FORMAT = "hpcqn-checkpoint"
VERSION = 1
LATEST = "latest"
KIND = "__kind__"


class CheckpointError(RuntimeError):
    """A checkpoint could not be written or read (the message names the file)."""


# -- tree <-> HDF5 --------------------------------------------------------------------------
def _write(group: Any, key: str, value: Any) -> None:
    import h5py

    if isinstance(value, Mapping):
        sub = group.create_group(key, track_order=True)
        keys = list(value)
        if all(isinstance(k, str) for k in keys):
            sub.attrs[KIND] = "dict"
        elif all(isinstance(k, (int, np.integer)) and not isinstance(k, bool) for k in keys):
            sub.attrs[KIND] = "intdict"
        else:
            raise TypeError(f"checkpoint dict keys must be all strings or all integers, got "
                            f"{sorted(map(repr, keys))[:5]} under {sub.name!r}")
        for k in keys:
            name = str(k)
            if not name or "/" in name or name == ".":
                raise ValueError(f"checkpoint key {name!r} under {sub.name!r} is not usable "
                                 f"as an HDF5 name")
            _write(sub, name, value[k])
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
        tensor = value.detach().cpu().contiguous()
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
        array = np.ascontiguousarray(backend.to_host(value))
        if array.dtype.kind not in "biufc":
            raise TypeError(f"checkpoint arrays must be numeric, got dtype {array.dtype} at "
                            f"{group.name}/{key}")
        dataset = group.create_dataset(key, data=array)
        dataset.attrs[KIND] = "array"
        dataset.attrs["device"] = device
    else:
        raise TypeError(f"cannot store a {type(value).__name__} in a checkpoint (at "
                        f"{group.name}/{key}): numbers, strings, arrays, dicts and lists only")


def _is_torch_tensor(value: Any) -> bool:
    module = type(value).__module__
    return module.startswith("torch") and type(value).__name__ in ("Tensor", "Parameter")


def _read(node: Any) -> Any:
    import h5py

    kind = node.attrs.get(KIND)
    if isinstance(node, h5py.Group):
        if kind in ("dict", "intdict"):
            cast = int if kind == "intdict" else str
            return {cast(k): _read(node[k]) for k in node}
        if kind in ("list", "tuple"):
            items = [_read(node[str(i)]) for i in range(int(node.attrs["length"]))]
            return tuple(items) if kind == "tuple" else items
        raise CheckpointError(f"unknown group kind {kind!r} at {node.name}")
    if kind == "none":
        return None
    if kind == "bool":
        return bool(node[()])
    if kind == "int":
        return int(node[()])
    if kind == "bigint":
        return int(node.asstr()[()])
    if kind == "float":
        return float(node[()])
    if kind == "str":
        return node.asstr()[()]
    if kind == "array":
        return np.array(node[()])
    if kind == "torch":
        import torch

        dtype = node.attrs["dtype"]
        tensor = torch.from_numpy(np.array(node[()]))
        return tensor.view(torch.bfloat16) if dtype == "bfloat16" else tensor
    raise CheckpointError(f"unknown dataset kind {kind!r} at {node.name}")


def write_state(path: str | Path, state: Mapping[str, Any]) -> None:
    """One state tree into one HDF5 file (flushed and fsynced)."""
    import h5py

    with h5py.File(path, "w", track_order=True) as f:
        f.attrs["format"] = FORMAT
        f.attrs["version"] = VERSION
        for key, value in state.items():
            _write(f, str(key), value)
        f.flush()
    with open(path, "rb+") as stream:
        os.fsync(stream.fileno())


def read_state(path: str | Path) -> dict[str, Any]:
    """The inverse of :func:`write_state`."""
    import h5py

    with h5py.File(path, "r") as f:
        if f.attrs.get("format") != FORMAT:
            raise CheckpointError(f"{path} is not an hpcqn checkpoint file")
        if int(f.attrs.get("version", -1)) > VERSION:
            raise CheckpointError(f"{path} has format version {f.attrs['version']}; this "
                                  f"hpcqn reads up to {VERSION}")
        return {k: _read(f[k]) for k in f}


# -- files and agreement ---------------------------------------------------------------------
def _digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as stream:
        for chunk in iter(lambda: stream.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


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
    """Every rank raises when any rank failed (the failing rank its own error)."""
    c.allreduce_scalars([], [], error)


def _name(step: int) -> str:
    return f"ckpt-{step:08d}"


def rank_file(rank: int) -> str:
    return f"rank-{rank:05d}.h5"


def save(directory: str | Path, state: Mapping[str, Any], comm: Any = None, step: int = 0,
         keep: int = 3, meta: Mapping[str, Any] | None = None) -> Path:
    """Write this rank's ``state`` as part of checkpoint ``step`` (every rank calls it);
    returns the checkpoint's directory. ``meta`` (rank 0's; JSON-able) goes into the
    manifest. Raises :class:`CheckpointError` on every rank if any rank failed."""
    c = get_comm(comm)
    directory = Path(directory)
    if keep < 1:
        raise ValueError(f"keep must be at least 1, got {keep}")
    final = directory / _name(int(step))
    temporary = directory / f".{_name(int(step))}.tmp"
    error: BaseException | None = None
    if c.rank == 0:
        try:
            directory.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(temporary, ignore_errors=True)  # a crashed earlier attempt
            temporary.mkdir()
        except OSError as exc:
            error = CheckpointError(f"cannot create {temporary}: {exc}")
    _agree(c, error)
    path = temporary / rank_file(c.rank)
    entry: dict[str, Any] = {}
    try:
        write_state(path, state)
        entry = {"file": path.name, "bytes": path.stat().st_size, "sha256": _digest(path)}
    except Exception as exc:  # every rank learns of it below
        error = exc if isinstance(exc, (TypeError, ValueError)) else CheckpointError(
            f"writing {path}: {type(exc).__name__}: {exc}")
    try:
        _agree(c, error)
    except BaseException:
        if c.rank == 0:
            shutil.rmtree(temporary, ignore_errors=True)
        raise
    files = c.allgather_object(entry)
    if c.rank == 0:
        try:
            manifest = {"format": FORMAT, "version": VERSION, "step": int(step),
                        "nranks": c.size, "files": files, "meta": dict(meta or {})}
            (temporary / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
            _fsync_dir(temporary)
            if final.exists():  # the same step saved again: replace it
                shutil.rmtree(final)
            os.rename(temporary, final)
            _fsync_dir(directory)
            pointer = directory / f".{LATEST}.tmp"
            pointer.write_text(final.name + "\n")
            with open(pointer, "rb+") as stream:
                os.fsync(stream.fileno())
            os.replace(pointer, directory / LATEST)
            _fsync_dir(directory)
            _prune(directory, keep)
        except Exception as exc:
            error = CheckpointError(f"committing {final}: {type(exc).__name__}: {exc}")
    _agree(c, error)
    return final


def _prune(directory: Path, keep: int) -> None:
    names = sorted(p.name for p in directory.glob("ckpt-*") if p.is_dir())
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
    """The newest complete checkpoint in ``directory``, or None."""
    pointer = Path(directory) / LATEST
    if not pointer.exists():
        return None
    name = pointer.read_text().strip()
    return Path(directory) / name


def load(directory: str | Path, comm: Any = None, path: str | Path | None = None) -> Checkpoint:
    """Read the checkpoint ``latest`` points to in ``directory`` (or ``path``). Every
    rank calls it; a missing, truncated or corrupted file raises
    :class:`CheckpointError` naming it, on every rank."""
    c = get_comm(comm)
    error: BaseException | None = None
    result: Checkpoint | None = None
    try:
        where = Path(path) if path is not None else latest(directory)
        if where is None:
            raise CheckpointError(f"no checkpoint in {directory} (no {LATEST} file)")
        manifest_path = where / "manifest.json"
        try:
            manifest = json.loads(manifest_path.read_text())
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"cannot read {manifest_path}: {exc}") from exc
        if manifest.get("format") != FORMAT or int(manifest.get("version", -1)) > VERSION:
            raise CheckpointError(f"{manifest_path} is not a readable hpcqn manifest")
        nranks = int(manifest["nranks"])
        ranks = [c.rank] if nranks == c.size else list(range(nranks))
        states = []
        for r in ranks:
            entry = manifest["files"][r]
            file = where / entry["file"]
            if not file.exists():
                raise CheckpointError(f"{file} is missing")
            size = file.stat().st_size
            if size != entry["bytes"]:
                raise CheckpointError(f"{file} has {size} bytes, the manifest says "
                                      f"{entry['bytes']}: truncated or replaced")
            if _digest(file) != entry["sha256"]:
                raise CheckpointError(f"{file} does not match its SHA-256 in the manifest: "
                                      f"corrupted")
            try:
                states.append(read_state(file))
            except CheckpointError:
                raise
            except Exception as exc:
                raise CheckpointError(f"cannot read {file}: {type(exc).__name__}: "
                                      f"{exc}") from exc
        result = Checkpoint(where, int(manifest["step"]), dict(manifest.get("meta", {})),
                            nranks, states)
    except Exception as exc:
        error = exc if isinstance(exc, CheckpointError) else CheckpointError(
            f"{type(exc).__name__}: {exc}")
    _agree(c, error)
    assert result is not None
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
