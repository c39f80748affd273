"""Data-parallel helpers for torch models over an hpcqn communicator (no
``torch.distributed`` needed): start every rank from the same model, give every rank its
part of each global batch, and average gradients for the first-order baselines so they
are trained like for like with :class:`hpcqn.torch.MLBFGS`."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import torch

from .. import backend
from ..comm import get_comm


def _tensors(module: torch.nn.Module) -> list[torch.Tensor]:
    return [t for t in list(module.parameters()) + list(module.buffers()) if t.numel()]


@torch.no_grad()
def broadcast_parameters(module: torch.nn.Module, comm: Any = None, root: int = 0) -> None:
    """Copy ``root``'s parameters and buffers into every rank's ``module`` (one
    broadcast per tensor)."""
    c = get_comm(comm)
    for tensor in _tensors(module):
        contiguous = tensor.detach().contiguous()
        received = c.bcast(backend.from_dlpack(contiguous), root=root)
        tensor.copy_(torch.from_dlpack(received).view_as(tensor))


@torch.no_grad()
def check_same_parameters(params: Iterable[torch.Tensor], comm: Any = None) -> None:
    """Raise on every rank unless all ranks hold the same parameters (a float64 sum and
    sum of squares, compared in one small reduction)."""
    c = get_comm(comm)
    values = [p.detach().double().reshape(-1) for p in params]
    flat = torch.cat(values) if values else torch.zeros(0, dtype=torch.float64)
    checksum = [float(flat.sum()), float((flat * flat).sum())]
    _, top = c.allreduce_scalars([], checksum + [-v for v in checksum])
    if top[0] != -top[2] or top[1] != -top[3]:
        raise ValueError(
            "the model's parameters differ between ranks; build it from one seed or "
            "call hpcqn.torch.broadcast_parameters(model) before creating the optimizer"
        )


@torch.no_grad()
def average_gradients(params: Iterable[torch.Tensor], comm: Any = None) -> None:
    """Average ``.grad`` over ranks in ONE allreduce (all gradients flattened together,
    with a presence flag per parameter): call it between ``backward()`` and a torch
    optimizer's ``step()`` to train it data-parallel. A parameter without a gradient on
    some ranks counts as zero there and gets the average wherever any rank had one; one
    without a gradient on every rank keeps ``.grad = None``."""
    c = get_comm(comm)
    params = [p for p in params if p.requires_grad]
    if not params or c.size == 1:
        return
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
