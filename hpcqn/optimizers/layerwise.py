"""What the Kronecker-factored preconditioners (MKOR, K-FAC) share: layers as gradient
matrices ``(d_out, d_in)`` (a bias folded in as the last input column), the placement of
each layer's curvature work on an owner rank, the fused reduction of per-layer
statistics, and preconditioning with an allgather of the owners' results.

- ``placement="redundant"``: every rank keeps and updates every layer's curvature state
  and preconditions every gradient (no communication beyond the statistics).
- ``placement="owner"``: each layer has an owner (greedy by the subclass's cost per
  layer); only the owner keeps its state and preconditions its gradient, and ONE
  allgatherv shares the preconditioned gradients. Memory per rank falls as ``1/P``.

Non-finite values: a layer whose reduced statistics are not finite is listed in
``nonfinite_layers`` after :meth:`LayerwisePreconditioner._allreduce_stats` (the same list
on every rank: it is read from the reduced sums), and a driver that skips such a step
(the torch front ends skip it whole, as they skip one with a non-finite gradient) counts
it in ``skipped_steps``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from ..backend import namespace, to_host
from ..comm import Communicator, get_comm
from ..layout import BlockLayout
from ..options import Rule

PLACEMENTS = ("redundant", "owner")
# This rank's statistics of one layer: (x summed over rows, how many rows, y) or None;
# K-FAC adds a fourth entry, the rank's batch size.
Stats = tuple[Any, ...]
# The reduced statistics: (x summed over all ranks' rows, rows, y summed over ranks,
# ranks that had the layer, batch sizes summed over those ranks).
Reduced = tuple[Any, float, Any, float, float]
SCALARS = 3  # per layer in the fused buffer: rows, presence, batch size


class LayerwisePreconditioner:
    """Base class: subclasses set ``costs`` (work per layer, for placement), implement
    :meth:`_precondition_one` and keep their per-layer state for ``self.kept``.
    Options (:mod:`hpcqn.options`): the subclasses' keyword parameters, with the rules of
    ``OPTION_RULES`` merged along the hierarchy (``placement`` is declared here)."""

    name = "preconditioner"
    OPTION_RULES = {"placement": Rule("str", choices=PLACEMENTS)}
    NOT_OPTIONS = ("shapes", "comm", "costs", "dtype", "xp")

    def __init__(self, shapes: Sequence[tuple[int, int]], comm: Any, placement: str,
                 costs: Callable[[int, int], float], dtype: Any, xp: Any):
        self.comm: Communicator = get_comm(comm)
        self.shapes = [(int(o), int(i)) for o, i in shapes]
        if not self.shapes or any(o < 1 or i < 1 for o, i in self.shapes):
            raise ValueError(f"{self.name} needs at least one layer of positive shape, got "
                             f"{shapes}")
        if placement not in PLACEMENTS:  # subclasses check it with their options; this
            # guards a direct call
            raise ValueError(f"placement must be one of {PLACEMENTS}, got {placement!r}")
        self.placement, self.dtype, self.xp = placement, np.dtype(dtype), xp
        self.array_dtype = getattr(xp, self.dtype.name)  # the dtype object of ``xp``
        self.owners = BlockLayout.from_sizes([costs(o, i) for o, i in self.shapes],
                                             self.comm.size).owners
        self.kept = [k for k in range(len(self.shapes))
                     if placement == "redundant" or self.owners[k] == self.comm.rank]
        # Preconditioned gradients in rank-major order for the owner-mode allgatherv.
        self.layout = BlockLayout(tuple(o * i for o, i in self.shapes), self.owners,
                                  self.comm.size)
        self.skipped_steps = 0  # steps skipped (non-finite gradients or statistics)
        self.nonfinite_layers: list[int] = []  # of the last statistics reduction

    # -- statistics ----------------------------------------------------------------------
    def _allreduce_stats(self, stats: Sequence[Stats | None], widths: Sequence[tuple[int, int]],
                         dtype: Any) -> list[Reduced | None]:
        """Every layer's ``(x_sum, rows, y[, batch])`` summed over ranks in ONE allreduce
        (with the row counts, how many ranks had the layer and their batch sizes); None
        for a layer no rank had or whose sums are not finite (the same decision on every
        rank). ``widths[k]`` are the
        sizes of layer ``k``'s flattened ``x`` and ``y``."""
        if len(stats) != len(self.shapes):
            raise ValueError(f"expected statistics for {len(self.shapes)} layers, got "
                             f"{len(stats)}")
        xp, nl = self.xp, len(self.shapes)
        size = sum(nx + ny for nx, ny in widths) + SCALARS * nl
        scalars = size - SCALARS * nl
        buffer = xp.zeros(size, dtype=dtype)
        position = 0
        for k, ((nx, ny), item) in enumerate(zip(widths, stats, strict=True)):
            if item is not None:
                x_sum, count, y = item[:3]
                if x_sum.size != nx or y.size != ny:
                    raise ValueError(f"layer {k}: statistics of sizes {x_sum.size} and "
                                     f"{y.size}, expected {nx} and {ny}")
                buffer[position : position + nx] = x_sum.reshape(-1)
                buffer[position + nx : position + nx + ny] = y.reshape(-1)
                buffer[scalars + SCALARS * k : scalars + SCALARS * (k + 1)] = xp.asarray(
                    [count, 1.0, item[3] if len(item) > 3 else 0.0], dtype=dtype)
            position += nx + ny
        total = self.comm.allreduce(buffer) if self.comm.size > 1 else buffer
        total = total.astype(self.dtype)
        counts = to_host(total[scalars:]).astype(np.float64).reshape(nl, SCALARS)
        result: list[Reduced | None] = []
        self.nonfinite_layers = []
        position = 0
        for k, (nx, ny) in enumerate(widths):
            count, ranks, batch = counts[k]
            x, y = total[position : position + nx], total[position + nx : position + nx + ny]
            finite = bool(xp.isfinite(x).all()) and bool(xp.isfinite(y).all())
            if ranks > 0 and not finite:
                self.nonfinite_layers.append(k)
            result.append((x, count, y, ranks, batch) if ranks > 0 and count > 0 and finite
                          else None)
            position += nx + ny
        return result

    # -- preconditioning -----------------------------------------------------------------
    def _precondition_one(self, k: int, grad: Any) -> Any:
        raise NotImplementedError

    def precondition(self, grads: Sequence[Any]) -> list[Any]:
        """Every layer's preconditioned gradient matrix (``(d_out, d_in)``; the same on
        every rank). In owner mode each owner computes its layers' and one allgatherv
        shares them."""
        if len(grads) != len(self.shapes):
            raise ValueError(f"expected {len(self.shapes)} gradients, got {len(grads)}")
        for k, (grad, shape) in enumerate(zip(grads, self.shapes, strict=True)):
            if tuple(grad.shape) != shape:
                raise ValueError(f"layer {k}: gradient has shape {tuple(grad.shape)}, "
                                 f"expected {shape}")
        if self.placement == "redundant":
            return [self._precondition_one(k, g) for k, g in enumerate(grads)]
        xp, layout, rank = namespace(*grads), self.layout, self.comm.rank
        mine = xp.empty(layout.counts[rank], dtype=grads[0].dtype)
        position = 0
        for k in layout.blocks_of(rank):
            mine[position : position + layout.sizes[k]] = self._precondition_one(
                k, grads[k]).reshape(-1)
            position += layout.sizes[k]
        everything = self.comm.allgatherv(mine, list(layout.counts))
        result: list[Any] = [None] * len(grads)
        position = 0
        for k in layout.rank_major_blocks():
            result[k] = everything[position : position + layout.sizes[k]].reshape(
                self.shapes[k])
            position += layout.sizes[k]
        return result

    # -- state ---------------------------------------------------------------------------
    def _load_collectively(self, state: dict[str, Any], build: Callable[[dict[int, Any]], Any]
                           ) -> Any:
        """``build(saved per-layer states by layer id)`` on every rank; if it fails on any
        rank, every rank raises (nothing is replaced). Every kept layer must be present:
        states of layers this rank does not keep are ignored, so all ranks' states may be
        merged and loaded on another rank count."""
        error: BaseException | None = None
        result = None
        try:
            saved = {int(k): v for k, v in state["factors"].items()}
            absent = [k for k in self.kept if k not in saved]
            if absent:
                raise ValueError(f"the saved state has no factors for layers {absent} "
                                 f"(load every rank's state merged: hpcqn.checkpoint.merge)")
            result = build(saved)
        except (KeyError, TypeError, ValueError) as exc:
            error = exc
        self.comm.allreduce_scalars([], [], error)  # every rank raises if any rank failed
        return result
