"""Data-parallel helpers for torch models over an hpcqn communicator (MPI or
``torch.distributed``): start every rank from the same model, give every rank its part of
each global batch, average gradients for the first-order baselines so they are trained
like for like with :class:`hpcqn.torch.MLBFGS`, find the communicator of a
``DistributedDataParallel`` model, and watch for a run whose every step is skipped."""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.weak import WeakIdKeyDictionary

from .. import backend
from ..comm import Communicator, describe_ranks, fingerprint, get_comm, mark_agreed, shown
from ..transport import mpi_launch


class NonFiniteParameterError(FloatingPointError, ValueError):
    """A parameter holds NaN or Inf on some rank (raised on every rank, naming it)."""


class DivergenceError(FloatingPointError):
    """Too many consecutive steps were skipped for non-finite values (raised on every
    rank, with ``divergence="raise"``)."""


class DivergenceWatch:
    """Counts consecutive skipped steps (a skip is decided on every rank alike, so the
    count is too). After ``limit`` of them it warns on rank 0, naming the count and the
    likely cause, and again each time the count doubles; with ``action="raise"`` every
    rank raises :class:`DivergenceError` instead."""

    ACTIONS = ("warn", "raise")

    def __init__(self, limit: int, action: str, what: str):
        self.limit, self.action, self.what = int(limit), action, what
        self.consecutive = 0
        self._next = self.limit

    def observe(self, skipped: bool, rank: int, step: int, lr: Any) -> None:
        if not skipped:
            self.consecutive, self._next = 0, self.limit
            return
        self.consecutive += 1
        if self.consecutive < self._next:
            return
        self._next *= 2
        message = (f"{self.what}: {self.consecutive} consecutive steps skipped for non-finite "
                   f"(NaN or Inf) gradients or statistics, the last at step {step}: the run "
                   f"has most likely diverged; lower the learning rate (lr={lr}) or restore "
                   f"a checkpoint")
        if self.action == "raise":
            raise mark_agreed(DivergenceError(message))
        if rank == 0:
            warnings.warn(message, RuntimeWarning, stacklevel=5)


def model_comm(comm: Any, ddp: Any) -> Communicator:
    """The communicator for a model: ``comm`` resolved (:func:`hpcqn.get_comm`); for a
    ``DistributedDataParallel`` model ``ddp`` with ``comm=None`` and no MPI launch, DDP's
    own process group, so that the statistics travel in the group that averaged the
    gradients. Either way its ranks must be DDP's (``ValueError`` otherwise)."""
    if ddp is None:
        return get_comm(comm)
    import torch.distributed as dist

    group = ddp.process_group
    c = get_comm(group if comm is None and not mpi_launch() else comm)
    ddp_rank, ddp_size = dist.get_rank(group), dist.get_world_size(group)
    if (c.rank, c.size) != (ddp_rank, ddp_size):
        raise ValueError(f"the communicator (rank {c.rank} of {c.size}) is not the "
                         f"DistributedDataParallel model's process group (rank {ddp_rank} of "
                         f"{ddp_size}): pass comm=None or the model's process group")
    return c


def _tensors(module: torch.nn.Module) -> list[torch.Tensor]:
    return [t for t in list(module.parameters()) + list(module.buffers()) if t.numel()]


def model_description(tensors: Sequence[torch.Tensor], what: str = "parameter"
                      ) -> dict[str, Any]:
    """What must agree between ranks about a model: the number of tensors and each one's
    shape and dtype, in order (``"parameter count"``, ``"parameter 3 shape"``, ...)."""
    out: dict[str, Any] = {f"{what} count": len(tensors)}
    for i, t in enumerate(tensors):
        out[f"{what} {i} shape"] = tuple(int(n) for n in t.shape)
        out[f"{what} {i} dtype"] = str(t.dtype).removeprefix("torch.")
    return out


def _first_difference(c: Communicator, values: Mapping[str, Any]) -> tuple[str, str] | None:
    """The first key whose value differs between ranks (keys in rank order of first
    appearance; a key a rank lacks is "absent" there) and which ranks hold which value,
    from one gather of every rank's shown values; None when all agree."""
    everyone = c.allgather_object({k: shown(v) for k, v in values.items()})
    for key in dict.fromkeys(k for d in everyone for k in d):
        seen = [d.get(key, "absent") for d in everyone]
        if len(set(seen)) > 1:
            return key, describe_ranks(seen)
    return None


def agree(c: Communicator, groups: Mapping[str, Mapping[str, Any]], what: str,
          numbers: Mapping[str, float] | None = None) -> None:
    """Raise ``ValueError`` on every rank unless every rank holds the same values:
    ``groups`` maps a group name ("options", "model") to its values (any number of
    keys, possibly different key sets on different ranks: each group travels as ONE
    fingerprint), ``numbers`` are compared as they are. One small reduction of
    ``len(groups) + len(numbers)`` numbers; only when a group differs, one gather of its
    shown values names the first key that differs and which ranks hold which value."""
    numbers = dict(numbers or {})
    same = {f"group {name}": fingerprint(tuple((k, shown(v)) for k, v in values.items()))
            for name, values in groups.items()}
    reduced = c.allreduce_named(same={**same, **numbers})
    differ = reduced.differ  # the same table on every rank: all take the same branch
    for name, values in groups.items():
        if f"group {name}" in differ:
            found = _first_difference(c, values)
            key, seen = found if found is not None else (name, reduced.describe(
                f"group {name}"))
            raise mark_agreed(ValueError(f"{what}: {key} differs between ranks ({seen}); "
                                         f"every rank must use the same"))
    if differ:
        raise mark_agreed(ValueError(
            f"{what}: the model's parameters differ between ranks; build it from one seed "
            f"or call hpcqn.torch.broadcast_parameters(model) before creating the optimizer"))


@torch.no_grad()
def check_finite_parameters(named: Sequence[tuple[str, torch.Tensor]], comm: Any, what: str
                            ) -> None:
    """Raise :class:`NonFiniteParameterError` on every rank if any rank's parameters
    hold NaN or Inf, naming the first such parameter on each such rank (one small
    reduction; called only after a step was skipped for a non-finite gradient, the usual
    symptom of a non-finite parameter on some rank)."""
    c = get_comm(comm)
    bad = -1
    for i, (_, p) in enumerate(named):
        if not bool(torch.isfinite(p).all()):
            bad = i
            break
    reduced = c.allreduce_named(same={"bad": float(bad)})
    found = [(r, int(v)) for r, v in enumerate(reduced.per_rank["bad"]) if v >= 0]
    if found:
        parts = "; ".join(
            f"rank {r}: parameter {i}{f' {named[i][0]!r}' if named[i][0] else ''} "
            f"(shape {tuple(named[i][1].shape)})"
            if i < len(named) else f"rank {r}: parameter {i}" for r, i in found)
        raise mark_agreed(NonFiniteParameterError(
            f"{what}: non-finite (NaN or Inf) parameter values ({parts}); the replicas no "
            f"longer agree and every later step would be skipped: restore a checkpoint"))


@torch.no_grad()
def broadcast_parameters(module: torch.nn.Module, comm: Any = None, root: int = 0) -> None:
    """Copy ``root``'s parameters and buffers into every rank's ``module`` (one
    broadcast per tensor), after checking in one small reduction that every rank's
    module has the same tensors (count, shapes and dtypes; a ``ValueError`` on every
    rank naming the first difference, instead of a broadcast of mismatched sizes)."""
    c = get_comm(comm)
    tensors = _tensors(module)
    if c.size > 1:
        agree(c, {"model": model_description(tensors, "tensor")},
              "hpcqn.torch.broadcast_parameters")
    for tensor in tensors:
        contiguous = tensor.detach().contiguous()
        received = c.bcast(backend.from_dlpack(contiguous), root=root)
        tensor.copy_(torch.from_dlpack(received).view_as(tensor))


@torch.no_grad()
def check_same_parameters(params: Iterable[torch.Tensor], comm: Any = None,
                          options: Mapping[str, Any] | None = None,
                          model: Mapping[str, Any] | None = None,
                          what: str = "hpcqn.torch") -> None:
    """Raise ``ValueError`` on every rank unless all ranks hold the same parameters (a
    float64 sum and sum of squares), the same model (``model``, by default
    :func:`model_description` of ``params``: the parameters' count, shapes and dtypes)
    and the same ``options`` (name -> value; callables compare as "a callable"), in ONE
    small reduction of four numbers (a fingerprint of the options, one of the model, the
    two sums). The message names the first option or model entry that differs and which
    ranks hold which value."""
    c = get_comm(comm)
    params = list(params)
    values = [p.detach().double().reshape(-1) for p in params]
    flat = torch.cat(values) if values else torch.zeros(0, dtype=torch.float64)
    checksum = {"sum": float(flat.sum()), "sum of squares": float((flat * flat).sum())}
    agree(c, {"options": dict(options or {}),
              "model": dict(model_description(params) if model is None else model)},
          what, checksum)
    if model is None:  # these parameters' shapes are agreed: average_gradients need not
        _mark_agreed(c, params)


# The live parameters whose shape the ranks agreed on: parameter -> {(communicator id,
# shape, dtype)}. Keyed by the tensors themselves (weakly), never by id(): a freed
# tensor's id may come back on one rank and not on another, and the ranks would then
# disagree on whether to agree.
_AGREED_SHAPES: Any = WeakIdKeyDictionary()


def _agree_on_shapes(c: Communicator, params: Sequence[torch.Tensor]) -> None:
    """Before the first allreduce of a list of parameters: every rank must hold the same
    count, shapes and dtypes (else one allreduce of mismatched sizes ends in the MPI
    library's abort). One small reduction the first time a list is averaged (every rank
    builds the same model, so every rank decides alike); a ``ValueError`` on every rank
    naming the first difference."""
    keys = [(id(c), tuple(p.shape), p.dtype) for p in params]
    if all(key in _AGREED_SHAPES.get(p, ()) for p, key in zip(params, keys, strict=True)):
        return
    agree(c, {"model": model_description(params)}, "hpcqn.torch.average_gradients")
    _mark_agreed(c, params)


def _mark_agreed(c: Communicator, params: Sequence[torch.Tensor]) -> None:
    for p in params:
        _AGREED_SHAPES.setdefault(p, set()).add((id(c), tuple(p.shape), p.dtype))


@torch.no_grad()
def average_gradients(params: Iterable[torch.Tensor], comm: Any = None) -> bool:
    """Average ``.grad`` over ranks in ONE allreduce (all gradients flattened together,
    with a presence flag per parameter): call it between ``backward()`` and a torch
    optimizer's ``step()`` to train it data-parallel. A parameter without a gradient on
    some ranks counts as zero there and gets the average wherever any rank had one; one
    without a gradient on every rank keeps ``.grad = None``. The first call for a list of
    parameters checks that every rank's have the same count, shapes and dtypes (a
    ``ValueError`` on every rank naming the first difference).

    Returns whether the averaged gradients are all finite: the same answer on every rank
    (a NaN or Inf on any rank makes the sum non-finite on every rank), so a caller can
    skip the step everywhere without another collective."""
    c = get_comm(comm)
    params = [p for p in params if p.requires_grad]
    if not params:
        return True
    if c.size > 1:
        _agree_on_shapes(c, params)
    if c.size == 1:
        grads = [p.grad for p in params if p.grad is not None]
        if not grads:
            return True
        if (hasattr(torch, "_foreach_norm") and len({g.dtype for g in grads}) == 1
                and len({g.device for g in grads}) == 1):
            # One fused pass: a 2-norm is finite when every entry is; when it is not (a
            # NaN or Inf, or a finite gradient whose norm overflows) the exact test below
            # decides.
            if bool(torch.isfinite(torch.stack(torch._foreach_norm(grads))).all()):
                return True
        return all(bool(torch.isfinite(g).all()) for g in grads)
    dtype = params[0].dtype
    parts = [(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).to(dtype)
             for p in params]
    flags = torch.tensor([float(p.grad is not None) for p in params], dtype=dtype,
                         device=params[0].device)
    total = torch.cat([*parts, flags])
    c.allreduce_inplace(backend.from_dlpack(total))  # a view of ``total``
    position = 0
    for p, flag in zip(params, total[-len(params):].tolist(), strict=True):
        n = p.numel()
        if flag > 0:
            if p.grad is None:
                p.grad = torch.empty_like(p)
            p.grad.copy_(total[position : position + n].view_as(p) / c.size)
        position += n
    return bool(torch.isfinite(total).all())


class GlobalBatches:
    """Shuffled global batches of ``batch_size`` samples (the last partial one dropped),
    the same on every rank for a seed and epoch; rank ``r`` takes rows ``r::P`` of each.

    Iterating yields ``(indices, weight)``: ``weight = P * len(indices) / batch_size``
    scales this rank's MEAN loss so that the average over ranks of the gradients is the
    gradient of the global batch's mean loss, whatever the split (with equal parts it
    is 1).
    """

    def __init__(self, n_samples: int, batch_size: int, comm: Any = None, seed: int = 0,
                 shuffle: bool = True):
        c = get_comm(comm)
        if batch_size < c.size:
            raise ValueError(f"batch_size {batch_size} is smaller than the rank count {c.size}")
        if n_samples < batch_size:
            raise ValueError(f"batch_size {batch_size} exceeds the {n_samples} samples")
        self.n_samples, self.batch_size, self.seed = n_samples, batch_size, seed
        self.shuffle, self.rank, self.nranks = shuffle, c.rank, c.size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.n_samples // self.batch_size

    def __iter__(self) -> Iterator[tuple[np.ndarray, float]]:
        if self.shuffle:
            order = np.random.default_rng((self.seed, self.epoch)).permutation(self.n_samples)
        else:
            order = np.arange(self.n_samples)
        for i in range(len(self)):
            rows = order[i * self.batch_size : (i + 1) * self.batch_size][self.rank :: self.nranks]
            yield rows, self.nranks * rows.size / self.batch_size


def shard(n_samples: int, comm: Any = None) -> np.ndarray:
    """This rank's share of ``range(n_samples)`` for evaluation: rows ``r::P``."""
    c = get_comm(comm)
    return np.arange(n_samples)[c.rank :: c.size]
