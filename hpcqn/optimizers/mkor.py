"""MKOR and MKOR-H on backend arrays, model-agnostic (ALGORITHMS.md section 2).

A "layer" is a weight matrix ``W`` of shape ``(d_out, d_in)`` (a bias folded in as the
last input column, whose activation is 1). Per layer this keeps the inverses of its two
Kronecker factors, ``Linv`` (``d_out x d_out``) and ``Rinv`` (``d_in x d_in``), updated
every ``inv_freq`` steps by rank-1 Sherman-Morrison steps with the layer's mean output
gradient ``g`` and mean input ``a`` (:mod:`hpcqn.curvature.kronecker`), and turns a
gradient ``G`` into ``Linv G Rinv`` rescaled to ``||G||``, which a first-order optimizer
then takes as its gradient.

Distribution over the communicator:

- statistics: every layer's ``a`` and ``g`` travel in ONE allreduce per update step,
  ``O(sum of d_in + d_out)`` numbers (optionally in float16);
- ``placement="redundant"``: every rank keeps and updates every factor, no further
  communication; ``placement="owner"``: each layer has an owner (greedy by
  ``d_in^2 + d_out^2``), only owners keep and update its factors and precondition its
  gradient, and the preconditioned gradients are allgathered (one allgatherv).

:class:`HybridSwitch` is the MKOR-H rule (the paper gives none): stop preconditioning
once the windowed mean of the globally averaged loss stops falling.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from ..backend import namespace, to_host
from ..comm import Communicator, get_comm
from ..curvature.kronecker import STORAGE, FactorInverse, precondition
from ..layout import BlockLayout

PLACEMENTS = ("redundant", "owner")
Stats = tuple[Any, float, Any]  # (sum of inputs a, how many rows were summed, g)


class MKOR:
    """Factor inverses and preconditioning for ``shapes = [(d_out, d_in), ...]``."""

    def __init__(
        self,
        shapes: Sequence[tuple[int, int]],
        comm: Any = None,
        inv_freq: int = 10,
        gam: float = 0.95,
        eps_stab: float = 2.0,
        zeta: float = 0.9,
        placement: str = "redundant",
        factor_dtype: str | None = None,
        stats_dtype: str | None = None,
        dtype: Any = np.float32,
        xp: Any = np,
    ):
        self.comm: Communicator = get_comm(comm)
        self.shapes = [(int(o), int(i)) for o, i in shapes]
        if not self.shapes or any(o < 1 or i < 1 for o, i in self.shapes):
            raise ValueError(f"MKOR needs at least one layer of positive shape, got {shapes}")
        if int(inv_freq) != inv_freq or inv_freq < 1:
            raise ValueError(f"inv_freq must be a positive integer, got {inv_freq}")
        if not 0.0 < gam < 1.0:
            raise ValueError(f"gam must be in (0, 1), got {gam}")
        if not 0.0 <= zeta < 1.0:
            raise ValueError(f"zeta must be in [0, 1), got {zeta}")
        if not eps_stab > 0:
            raise ValueError(f"eps_stab must be positive, got {eps_stab}")
        if placement not in PLACEMENTS:
            raise ValueError(f"placement must be one of {PLACEMENTS}, got {placement!r}")
        if factor_dtype is not None and factor_dtype not in STORAGE:
            raise ValueError(f"factor_dtype must be one of {STORAGE}, got {factor_dtype!r}")
        if stats_dtype not in (None, "float16", "float32", "float64"):
            raise ValueError(f"stats_dtype must be float16, float32 or float64, got "
                             f"{stats_dtype!r}")
        self.inv_freq, self.gam, self.eps_stab, self.zeta = int(inv_freq), gam, eps_stab, zeta
        self.placement, self.factor_dtype = placement, factor_dtype
        self.dtype, self.xp = np.dtype(dtype), xp
        self.stats_dtype = np.dtype(stats_dtype or self.dtype)
        costs = [o * o + i * i for o, i in self.shapes]
        self.owners = BlockLayout.from_sizes(costs, self.comm.size).owners
        rank = self.comm.rank
        self.kept = [k for k in range(len(self.shapes))
                     if placement == "redundant" or self.owners[k] == rank]
        self.factors = {k: self._new_factors(k) for k in self.kept}
        # Preconditioned gradients in rank-major order for the owner-mode allgatherv.
        self.layout = BlockLayout(tuple(o * i for o, i in self.shapes), self.owners,
                                  self.comm.size)
        self.updates = 0  # update rounds done
        self.missing: dict[int, int] = {}  # layer -> update rounds it had no statistics

    def _new_factors(self, k: int) -> tuple[FactorInverse, FactorInverse]:
        d_out, d_in = self.shapes[k]
        return (FactorInverse(d_out, self.xp, self.dtype, self.factor_dtype),
                FactorInverse(d_in, self.xp, self.dtype, self.factor_dtype))

    def is_update_step(self, step: int) -> bool:
        return step % self.inv_freq == 0

    # -- statistics ----------------------------------------------------------------------
    def reduce_statistics(self, stats: Sequence[Stats | None]) -> list[tuple[Any, Any] | None]:
        """Global ``(a, g)`` per layer from this rank's ``(a_sum, count, g)`` (``None``
        where the layer saw no data here) in ONE allreduce: ``a`` is the mean over all
        ranks' rows (weighted by ``count``), ``g`` the mean over the ranks that have one.
        With float16 statistics each rank sends its mean input row, and ``a`` is the
        unweighted mean over ranks (exact when ranks hold equal row counts). A layer whose
        reduced statistics are not finite gets None (its factors skip this update).
        Every rank calls it at every update step."""
        if len(stats) != len(self.shapes):
            raise ValueError(f"expected statistics for {len(self.shapes)} layers, got "
                             f"{len(stats)}")
        xp, nl = self.xp, len(self.shapes)
        half = self.stats_dtype == np.float16
        size = sum(o + i for o, i in self.shapes) + 2 * nl
        buffer = xp.zeros(size, dtype=self.stats_dtype)
        position = 0
        for k, ((d_out, d_in), item) in enumerate(zip(self.shapes, stats, strict=True)):
            if item is not None:
                a_sum, count, g = item
                if a_sum.shape != (d_in,) or g.shape != (d_out,):
                    raise ValueError(f"layer {k}: a has shape {a_sum.shape} and g "
                                     f"{g.shape}, expected ({d_in},) and ({d_out},)")
                if half:  # a float16 sum of many rows overflows: send the mean, weight 1
                    a_sum, count = a_sum / count, 1.0
                buffer[position : position + d_in] = a_sum
                buffer[position + d_in : position + d_in + d_out] = g
                buffer[size - 2 * nl + 2 * k] = count
                buffer[size - 2 * nl + 2 * k + 1] = 1.0
            position += d_in + d_out
        total = self.comm.allreduce(buffer) if self.comm.size > 1 else buffer
        total = total.astype(self.dtype)
        counts = to_host(total[size - 2 * nl :]).astype(np.float64)
        result: list[tuple[Any, Any] | None] = []
        position = 0
        for k, (d_out, d_in) in enumerate(self.shapes):
            count, ranks = counts[2 * k], counts[2 * k + 1]
            a = total[position : position + d_in] / max(count, 1.0)
            g = total[position + d_in : position + d_in + d_out] / max(ranks, 1.0)
            finite = bool(xp.isfinite(a).all()) and bool(xp.isfinite(g).all())
            if ranks > 0 and count > 0 and finite:  # the same decision on every rank
                result.append((a, g))
            else:
                result.append(None)
            position += d_in + d_out
        return result

    def update_factors(self, stats: Sequence[tuple[Any, Any] | None]) -> None:
        """One Sherman-Morrison update of every kept factor pair (``Linv`` with ``g``,
        ``Rinv`` with ``a``); layers without statistics are counted in ``missing``."""
        for k in self.kept:
            item = stats[k]
            if item is None:
                self.missing[k] = self.missing.get(k, 0) + 1
                continue
            a, g = item
            linv, rinv = self.factors[k]
            linv.update(g, self.gam, self.eps_stab, self.zeta)
            rinv.update(a, self.gam, self.eps_stab, self.zeta)
        self.updates += 1

    # -- preconditioning -----------------------------------------------------------------
    def _precondition_one(self, k: int, grad: Any) -> Any:
        linv, rinv = self.factors[k]
        compute = linv.compute_dtype
        d = precondition(linv.matrix(), grad.astype(compute, copy=False), rinv.matrix())
        return d.astype(grad.dtype, copy=False)

    def precondition(self, grads: Sequence[Any]) -> list[Any]:
        """``Linv G Rinv`` rescaled to ``||G||`` for every layer's gradient matrix
        (``(d_out, d_in)``; the same on every rank). In owner mode each owner computes its
        layers' and one allgatherv shares them."""
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
    def state_dict(self) -> dict[str, Any]:
        """Counters and this rank's factors by layer id (plain arrays and numbers)."""
        return {
            "updates": self.updates,
            "missing": dict(self.missing),
            "factors": {k: {"L": linv.state_dict(), "R": rinv.state_dict()}
                        for k, (linv, rinv) in self.factors.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`; factors of layers this rank does not keep are
        ignored (so all ranks' states may be merged and loaded on another rank count),
        and every kept layer must be present."""
        error: BaseException | None = None
        try:
            saved = {int(k): v for k, v in state["factors"].items()}
            absent = [k for k in self.kept if k not in saved]
            if absent:
                raise ValueError(f"the saved state has no factors for layers {absent} "
                                 f"(load every rank's state merged: hpcqn.checkpoint.merge)")
            fresh = {k: self._new_factors(k) for k in self.kept}
            for k in self.kept:
                fresh[k][0].load(saved[k]["L"])
                fresh[k][1].load(saved[k]["R"])
        except (KeyError, TypeError, ValueError) as exc:
            error = exc
        self.comm.allreduce_scalars([], [], error)  # every rank raises if any rank failed
        self.factors = fresh
        self.updates = int(state["updates"])
        self.missing = {int(k): int(v) for k, v in state["missing"].items()}


class HybridSwitch:
    """MKOR-H: switch to the first-order optimizer when second-order updates stop
    helping. Rule (hpcqn's; the paper gives none): after every step, with the globally
    averaged loss ``l_t``, compare the mean of the last ``window`` losses with the mean
    of the ``window`` before them; once their relative decrease
    ``(previous - last) / |previous|`` is below ``threshold``, switch for good. The
    losses are identical on every rank, so every rank switches at the same step."""

    def __init__(self, window: int = 50, threshold: float = 0.01):
        if int(window) != window or window < 1:
            raise ValueError(f"hybrid window must be a positive integer, got {window}")
        if not threshold >= 0:
            raise ValueError(f"hybrid threshold must be >= 0, got {threshold}")
        self.window, self.threshold = int(window), float(threshold)
        self.losses: list[float] = []
        self.steps = 0
        self.switched_at: int | None = None
        self.last_decrease = math.nan

    @property
    def switched(self) -> bool:
        return self.switched_at is not None

    def observe(self, loss: float) -> bool:
        """Record one step's global loss; True exactly at the step that switches."""
        self.steps += 1
        if self.switched:
            return False
        self.losses = (self.losses + [float(loss)])[-2 * self.window :]
        if len(self.losses) < 2 * self.window:
            return False
        previous = sum(self.losses[: self.window]) / self.window
        last = sum(self.losses[self.window :]) / self.window
        self.last_decrease = (previous - last) / abs(previous) if previous else 0.0
        if self.last_decrease < self.threshold:  # NaN (a blown-up loss) never switches
            self.switched_at = self.steps
            return True
        return False

    def state_dict(self) -> dict[str, Any]:
        return {"losses": np.array(self.losses, dtype=np.float64), "steps": self.steps,
                "switched_at": -1 if self.switched_at is None else self.switched_at,
                "window": self.window, "threshold": self.threshold}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if int(state["window"]) != self.window or float(state["threshold"]) != self.threshold:
            raise ValueError(f"saved hybrid rule (window {state['window']}, threshold "
                             f"{state['threshold']}) differs from this one ({self.window}, "
                             f"{self.threshold})")
        self.losses = [float(v) for v in state["losses"]]
        self.steps = int(state["steps"])
        switched_at = int(state["switched_at"])
        self.switched_at = None if switched_at < 0 else switched_at
