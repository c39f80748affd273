"""Bound constraints ``lo <= x <= hi`` on this rank's slice (docs/algorithms.md, 1.11).

A :class:`Box` holds the two bounds broadcast to the slice and the local pieces of the
projected L-BFGS: the projection (a clip), L-BFGS-B's projected gradient, the binding
set, the direction restricted to the free variables and the derivative of the
projected path. Nothing here communicates.
"""

from __future__ import annotations

import math
import zlib
from typing import Any

import numpy as np

from ..backend import namespace, to_host


def parse_bounds(bounds: Any, x0: Any) -> Box | None:
    """``bounds`` as a :class:`Box` for ``x0``'s slice, or None when none were given.

    ``bounds`` is None, a pair ``(lo, hi)`` or an object with ``lb`` and ``ub`` (SciPy's
    ``Bounds``); each side is None (unbounded), a scalar, or an array of ``x0``'s shape.
    Raises ValueError for anything else: another shape, a NaN, ``lo > hi``, a lower bound
    of +inf or an upper bound of -inf (no feasible point)."""
    if bounds is None:
        return None
    if hasattr(bounds, "lb") and hasattr(bounds, "ub"):
        lo, hi = bounds.lb, bounds.ub
    else:
        try:
            lo, hi = bounds
        except (TypeError, ValueError):
            raise ValueError(
                "bounds must be a pair (lo, hi) for this rank's slice (each None, a scalar or "
                f"an array of x0's shape) or a scipy.optimize.Bounds, got {type(bounds).__name__}"
            ) from None
    xp = namespace(x0)
    sides = []
    for name, side, default in (("lower", lo, -math.inf), ("upper", hi, math.inf)):
        if side is None:
            side = default
        try:
            host = np.asarray(to_host(side) if hasattr(side, "shape") else side,
                              dtype=np.float64)
        except (TypeError, ValueError):
            raise ValueError(f"the {name} bound must be None, a number or an array of "
                             f"numbers, got {type(side).__name__}") from None
        if host.shape not in ((), tuple(x0.shape)):
            raise ValueError(f"the {name} bound has shape {host.shape}; it must be a scalar or "
                             f"have x0's shape {tuple(x0.shape)} (this rank's slice)")
        bad = int(np.isnan(host).sum())
        if bad:
            raise ValueError(f"the {name} bound has {bad} NaN entr{'y' if bad == 1 else 'ies'}")
        infeasible = host == (math.inf if name == "lower" else -math.inf)
        if infeasible.any():
            raise ValueError(f"a {name} bound of {'+' if name == 'lower' else '-'}inf leaves "
                             f"no feasible point ({int(infeasible.sum())} entries)")
        sides.append(host)
    crossed = np.flatnonzero(np.broadcast_to(sides[0] > sides[1], x0.shape))
    if crossed.size:
        i = int(crossed[0])
        lo_i = float(np.broadcast_to(sides[0], x0.shape)[i])
        hi_i = float(np.broadcast_to(sides[1], x0.shape)[i])
        raise ValueError(f"lower bound exceeds upper bound at {crossed.size} entr"
                         f"{'y' if crossed.size == 1 else 'ies'} of this rank's slice (first: "
                         f"index {i}, {lo_i!r} > {hi_i!r})")
    return Box(sides[0], sides[1], x0, xp)


class Box:
    """``lo <= x <= hi`` for one slice (bounds in the slice's dtype and namespace).

    :meth:`classify` records, for the current point, which variables sit at a bound and
    which of those the gradient holds there; :meth:`free_gradient`, :meth:`restrict` and
    :meth:`nactive` then read that record instead of comparing against the bounds again
    (one set of comparisons per accepted point)."""

    def __init__(self, lo: np.ndarray, hi: np.ndarray, x0: Any, xp: Any):
        self.xp = xp
        shape, dtype = tuple(x0.shape), x0.dtype
        self.lo = xp.broadcast_to(xp.asarray(lo, dtype=dtype), shape)
        self.hi = xp.broadcast_to(xp.asarray(hi, dtype=dtype), shape)
        self.bounds_something = bool(np.isfinite(lo).any() or np.isfinite(hi).any())
        # What the bounds mean, not how they were written: a scalar and an array of it,
        # None and -inf, bounds that bound nothing and no bounds digest alike.
        self.digest = "none" if not self.bounds_something else "".join(
            f"{zlib.crc32(np.ascontiguousarray(np.broadcast_to(side, shape)).tobytes()):08x}"
            for side in (lo, hi))
        self._work = xp.empty(shape, dtype=dtype)
        self._work2 = xp.empty(shape, dtype=dtype)
        self._inside = xp.empty(shape, dtype=bool)
        self._below_hi = xp.empty(shape, dtype=bool)
        # The record of the classified point (see classify).
        self.at_lo = xp.zeros(shape, dtype=bool)
        self.at_hi = xp.zeros(shape, dtype=bool)
        self.free = xp.ones(shape, dtype=bool)
        self._held_hi = xp.empty(shape, dtype=bool)
        self._floor = xp.full(shape, -math.inf, dtype=dtype)
        self._ceiling = xp.full(shape, math.inf, dtype=dtype)

    @classmethod
    def unbounded(cls, x0: Any) -> Box:
        """A box that bounds nothing (a rank without bounds in a bounded run)."""
        return cls(np.array(-math.inf), np.array(math.inf), x0, namespace(x0))

    def project(self, x: Any) -> Any:
        """Clip ``x`` into the box, in place (``min(max(x, lo), hi)``, as ``clip``)."""
        self.xp.maximum(x, self.lo, out=x)
        return self.xp.minimum(x, self.hi, out=x)

    def projected_gradient_inf(self, x: Any, g: Any) -> float:
        """``max |pg_i|`` with L-BFGS-B's projected gradient: ``max(x - hi, g)`` where
        ``g < 0``, ``min(x - lo, g)`` elsewhere (exactly ``g`` where a side is infinite);
        NaN when ``g`` has a NaN. For a feasible ``x`` that is ``min(x - lo, max(x - hi,
        g))`` everywhere (``max(x - hi, g)`` is ``g`` where ``g >= 0``, and ``<= 0 <= x - lo``
        where ``g < 0``): four passes and two reductions, no selection."""
        if not x.size:
            return 0.0
        xp, pg, down = self.xp, self._work, self._work2
        xp.subtract(x, self.hi, out=pg)
        xp.maximum(pg, g, out=pg)
        xp.subtract(x, self.lo, out=down)
        xp.minimum(down, pg, out=pg)
        return max(float(xp.max(pg)), -float(xp.min(pg)))  # NaN when pg has one: both are

    def classify(self, x: Any, g: Any) -> None:
        """Record the point ``(x, g)``: the variables at their lower and upper bound, and
        the free ones, all but those the gradient holds at a bound (it points out of the
        box there: ``x <= lo`` and ``g > 0``, or ``x >= hi`` and ``g < 0``)."""
        xp, at_lo, at_hi, free, held_hi = self.xp, self.at_lo, self.at_hi, self.free, \
            self._held_hi
        xp.less_equal(x, self.lo, out=at_lo)
        xp.greater_equal(x, self.hi, out=at_hi)
        xp.greater(g, 0, out=free)
        xp.logical_and(free, at_lo, out=free)
        xp.less(g, 0, out=held_hi)
        xp.logical_and(held_hi, at_hi, out=held_hi)
        xp.logical_or(free, held_hi, out=free)
        xp.logical_not(free, out=free)
        # restrict's clamps: a free variable at its lower bound may only move up, and one
        # at its upper bound only down.
        self._floor.fill(-math.inf)
        xp.copyto(self._floor, 0.0, where=at_lo)
        self._ceiling.fill(math.inf)
        xp.copyto(self._ceiling, 0.0, where=at_hi)

    def free_gradient(self, g: Any, out: Any) -> Any:
        """``g`` with the held variables of the classified point zeroed, into ``out``."""
        return self.xp.multiply(g, self.free, out=out)

    def restrict(self, d: Any) -> Any:
        """Zero ``d`` in place on the held variables of the classified point and where it
        leaves the box at once (``P_F d``), so that every component left moves for small
        steps."""
        xp = self.xp
        xp.multiply(d, self.free, out=d)
        xp.maximum(d, self._floor, out=d)
        return xp.minimum(d, self._ceiling, out=d)

    def path_direction(self, x_trial: Any, d: Any, out: Any) -> Any:
        """The derivative of the projected path ``clip(x + a d)`` at a step that reached
        ``x_trial``: ``d`` where the trial is strictly inside the box, 0 where it was
        clipped; into ``out``."""
        xp, inside = self.xp, self._inside
        xp.greater(x_trial, self.lo, out=inside)
        xp.less(x_trial, self.hi, out=self._below_hi)
        xp.logical_and(inside, self._below_hi, out=inside)
        return xp.multiply(d, inside, out=out)

    def nactive(self) -> int:
        """How many variables of the classified point are at a bound."""
        xp = self.xp
        xp.logical_or(self.at_lo, self.at_hi, out=self._held_hi)
        return int(xp.count_nonzero(self._held_hi))
