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
    """``lo <= x <= hi`` for one slice (bounds in the slice's dtype and namespace)."""

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

    @classmethod
    def unbounded(cls, x0: Any) -> Box:
        """A box that bounds nothing (a rank without bounds in a bounded run)."""
        return cls(np.array(-math.inf), np.array(math.inf), x0, namespace(x0))

    def project(self, x: Any) -> Any:
        """Clip ``x`` into the box, in place."""
        return self.xp.clip(x, self.lo, self.hi, out=x)

    def projected_gradient_inf(self, x: Any, g: Any) -> float:
        """``max |pg_i|`` with L-BFGS-B's projected gradient: ``max(x - hi, g)`` where
        ``g < 0``, ``min(x - lo, g)`` elsewhere (exactly ``g`` where a side is infinite);
        NaN when ``g`` has a NaN."""
        if not x.size:
            return 0.0
        xp, up, down = self.xp, self._work, self._work2
        xp.subtract(x, self.hi, out=up)
        xp.maximum(up, g, out=up)
        xp.subtract(x, self.lo, out=down)
        xp.minimum(down, g, out=down)
        pg = xp.where(g < 0, up, down)
        return float(abs(pg).max())

    def binding(self, x: Any, g: Any) -> Any:
        """Variables held at a bound by the gradient (it points out of the box there)."""
        return ((x <= self.lo) & (g > 0)) | ((x >= self.hi) & (g < 0))

    def free_gradient(self, x: Any, g: Any, out: Any, binding: Any = None) -> Any:
        """``g`` with the binding variables zeroed, into ``out``."""
        out[...] = g
        out[self.binding(x, g) if binding is None else binding] = 0
        return out

    def restrict(self, x: Any, g: Any, d: Any) -> Any:
        """Zero ``d`` in place on the binding variables and where it leaves the box at
        once (``P_F d``), so that every component left moves for small steps."""
        at_lo, at_hi = x <= self.lo, x >= self.hi
        d[(at_lo & ((g > 0) | (d < 0))) | (at_hi & ((g < 0) | (d > 0)))] = 0
        return d

    def path_direction(self, x_trial: Any, d: Any, out: Any) -> Any:
        """The derivative of the projected path ``clip(x + a d)`` at a step that reached
        ``x_trial``: ``d`` where the trial is strictly inside the box, 0 where it was
        clipped; into ``out``."""
        inside = (x_trial > self.lo) & (x_trial < self.hi)
        self.xp.multiply(d, inside, out=out)
        return out

    def nactive(self, x: Any) -> int:
        """How many variables of the slice are at a bound."""
        return int(((x <= self.lo) | (x >= self.hi)).sum())
