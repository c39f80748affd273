"""Line searches in reverse-communication form.

A line search object proposes step lengths; the caller evaluates the objective at each
proposal (on every rank, with one small reduction of ``f`` and ``g.d``) and hands back
the global values. Every rank holds an identical object fed identical numbers, so every
rank takes the same decisions without further communication.

:class:`MoreThuente` is the strong-Wolfe search of Moré and Thuente (ACM TOMS 20, 1994),
the one MINPACK-2's ``dcsrch`` implements and SciPy's L-BFGS-B and TAO use.
:class:`Backtracking` is the Armijo backtracking search.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

# Step proposals and final states reported by ``LineSearch.advance``.
EVALUATE = "evaluate"
CONVERGED = "converged"
FAILED = "failed"


@dataclass
class _Interval:
    """The end points (step, f, derivative) that bracket the step of interest."""

    stx: float
    fx: float
    dx: float
    sty: float
    fy: float
    dy: float
    brackt: bool


def _cubic_min(s0: float, f0: float, d0: float, s1: float, f1: float, d1: float) -> float:
    """Minimiser of the cubic interpolating (f, f') at s0 and s1 (s1 is the trial step)."""
    theta = 3.0 * (f0 - f1) / (s1 - s0) + d0 + d1
    scale = max(abs(theta), abs(d0), abs(d1))
    gamma = scale * math.sqrt(max(0.0, (theta / scale) ** 2 - (d0 / scale) * (d1 / scale)))
    if s1 < s0:
        gamma = -gamma
    p = (gamma - d0) + theta
    q = ((gamma - d0) + gamma) + d1
    return s0 + (p / q) * (s1 - s0)


def _safeguarded_step(
    iv: _Interval, stp: float, fp: float, dp: float, stpmin: float, stpmax: float
) -> float:
    """Moré-Thuente's safeguarded step (their Section 4, cases 1-4) and interval update."""
    sgnd = dp * math.copysign(1.0, iv.dx)
    if fp > iv.fx:
        # Case 1: higher function value; the minimum is bracketed.
        stpc = _cubic_min(iv.stx, iv.fx, iv.dx, stp, fp, dp)
        stpq = iv.stx + (iv.dx / ((iv.fx - fp) / (stp - iv.stx) + iv.dx)) / 2.0 * (stp - iv.stx)
        stpf = stpc if abs(stpc - iv.stx) < abs(stpq - iv.stx) else stpc + (stpq - stpc) / 2.0
        iv.brackt = True
    elif sgnd < 0.0:
        # Case 2: lower value, derivatives of opposite sign; bracketed.
        stpc = _cubic_min(stp, fp, dp, iv.stx, iv.fx, iv.dx)
        stpq = stp + dp / (dp - iv.dx) * (iv.stx - stp)
        stpf = stpc if abs(stpc - stp) > abs(stpq - stp) else stpq
        iv.brackt = True
    elif abs(dp) < abs(iv.dx):
        # Case 3: lower value, same-sign derivative that decreases in magnitude.
        theta = 3.0 * (iv.fx - fp) / (stp - iv.stx) + iv.dx + dp
        scale = max(abs(theta), abs(iv.dx), abs(dp))
        gamma = scale * math.sqrt(
            max(0.0, (theta / scale) ** 2 - (iv.dx / scale) * (dp / scale))
        )
        if stp > iv.stx:
            gamma = -gamma
        p = (gamma - dp) + theta
        q = (gamma + (iv.dx - dp)) + gamma
        r = p / q
        if r < 0.0 and gamma != 0.0:
            stpc = stp + r * (iv.stx - stp)
        elif stp > iv.stx:
            stpc = stpmax
        else:
            stpc = stpmin
        stpq = stp + dp / (dp - iv.dx) * (iv.stx - stp)
        if iv.brackt:
            stpf = stpc if abs(stpc - stp) < abs(stpq - stp) else stpq
            bound = stp + 0.66 * (iv.sty - stp)
            stpf = min(bound, stpf) if stp > iv.stx else max(bound, stpf)
        else:
            stpf = stpc if abs(stpc - stp) > abs(stpq - stp) else stpq
            stpf = max(stpmin, min(stpmax, stpf))
    else:
        # Case 4: lower value, derivative that does not decrease in magnitude.
        if iv.brackt:
            stpf = _cubic_min(iv.sty, iv.fy, iv.dy, stp, fp, dp)
        else:
            stpf = stpmax if stp > iv.stx else stpmin
    if fp > iv.fx:
        iv.sty, iv.fy, iv.dy = stp, fp, dp
    else:
        if sgnd < 0.0:
            iv.sty, iv.fy, iv.dy = iv.stx, iv.fx, iv.dx
        iv.stx, iv.fx, iv.dx = stp, fp, dp
    return stpf


class MoreThuente:
    """Strong-Wolfe line search: find ``stp`` with

    ``f(stp) <= f(0) + ftol * stp * f'(0)`` and ``|f'(stp)| <= gtol * |f'(0)|``.

    Construct with ``f(0)``, ``f'(0) < 0`` and the first trial step; then call
    :meth:`advance` with ``f`` and ``f'`` at :attr:`stp` until it returns
    ``CONVERGED`` or ``FAILED``. MINPACK's warnings (rounding errors, the ``xtol``
    interval test, a step at ``stpmin``/``stpmax``) end the search with ``CONVERGED``
    when the step lowered ``f`` and ``FAILED`` otherwise; :attr:`message` names them.
    """

    xtrapl = 1.1
    xtrapu = 4.0

    def __init__(
        self,
        f0: float,
        d0: float,
        stp: float,
        ftol: float = 1e-3,
        gtol: float = 0.9,
        xtol: float = 0.1,
        stpmin: float = 0.0,
        stpmax: float = 1e10,
    ):
        if not d0 < 0.0:
            raise ValueError(f"line search needs a descent direction, f'(0) = {d0}")
        if not stpmin <= stp <= stpmax:
            raise ValueError(f"initial step {stp} outside [{stpmin}, {stpmax}]")
        self.finit, self.ginit = f0, d0
        self.gtest = ftol * d0
        self.ftol, self.gtol, self.xtol = ftol, gtol, xtol
        self.stpmin, self.stpmax = stpmin, stpmax
        self.stp = stp
        self.stage = 1
        self.width = stpmax - stpmin
        self.width1 = 2.0 * self.width
        self.iv = _Interval(0.0, f0, d0, 0.0, f0, d0, False)
        self.stmin, self.stmax = 0.0, stp + self.xtrapu * stp
        self.message = ""

    def shrink(self) -> None:
        """The objective was not finite at :attr:`stp`: never go that far again and try
        halfway back to the best step so far."""
        self.stpmax = self.stp
        self.stmax = min(self.stmax, self.stp)
        self.stp = self.iv.stx + 0.5 * (self.stp - self.iv.stx)

    def advance(self, f: float, g: float) -> str:
        iv, stp = self.iv, self.stp
        ftest = self.finit + stp * self.gtest
        if self.stage == 1 and f <= ftest and g >= 0.0:
            self.stage = 2
        if iv.brackt and (stp <= self.stmin or stp >= self.stmax):
            return self._warn(f, "rounding errors prevent progress")
        if iv.brackt and self.stmax - self.stmin <= self.xtol * self.stmax:
            return self._warn(f, "interval of uncertainty below xtol")
        if stp == self.stpmax and f <= ftest and g <= self.gtest:
            return self._warn(f, "step at the upper bound stpmax")
        if stp == self.stpmin and (f > ftest or g >= self.gtest):
            return self._warn(f, "step at the lower bound stpmin")
        if f <= ftest and abs(g) <= self.gtol * (-self.ginit):
            return CONVERGED
        if self.stage == 1 and f <= iv.fx and f > ftest:
            # Work on the modified function psi(stp) = f(stp) - f(0) - ftol * stp * f'(0)
            # until a step with psi <= 0 and f' >= 0 appears (Moré-Thuente, Section 3).
            gt = self.gtest
            iv.fx -= iv.stx * gt
            iv.fy -= iv.sty * gt
            iv.dx -= gt
            iv.dy -= gt
            stp = _safeguarded_step(iv, stp, f - stp * gt, g - gt, self.stmin, self.stmax)
            iv.fx += iv.stx * gt
            iv.fy += iv.sty * gt
            iv.dx += gt
            iv.dy += gt
        else:
            stp = _safeguarded_step(iv, stp, f, g, self.stmin, self.stmax)
        if iv.brackt:
            if abs(iv.sty - iv.stx) >= 0.66 * self.width1:
                stp = iv.stx + 0.5 * (iv.sty - iv.stx)
            self.width1 = self.width
            self.width = abs(iv.sty - iv.stx)
            self.stmin, self.stmax = min(iv.stx, iv.sty), max(iv.stx, iv.sty)
        else:
            self.stmin = stp + self.xtrapl * (stp - iv.stx)
            self.stmax = stp + self.xtrapu * (stp - iv.stx)
        stp = max(self.stpmin, min(self.stpmax, stp))
        if (iv.brackt and (stp <= self.stmin or stp >= self.stmax)) or (
            iv.brackt and self.stmax - self.stmin <= self.xtol * self.stmax
        ):
            stp = iv.stx
        self.stp = stp
        return EVALUATE

    def _warn(self, f: float, message: str) -> str:
        """MINPACK's warnings end the search at the current step. As in L-BFGS-B that
        step is taken, but only when it lowered ``f`` (it is then the best step seen)."""
        self.message = message
        return CONVERGED if f < self.finit else FAILED


class Backtracking:
    """Armijo backtracking: accept ``stp`` once ``f(stp) <= f(0) + c1 * stp * f'(0)``,
    else shrink it by ``factor`` (same interface as :class:`MoreThuente`)."""

    def __init__(
        self,
        f0: float,
        d0: float,
        stp: float,
        c1: float = 1e-4,
        factor: float = 0.5,
        stpmin: float = 1e-20,
    ):
        if not d0 < 0.0:
            raise ValueError(f"line search needs a descent direction, f'(0) = {d0}")
        self.f0, self.d0, self.stp = f0, d0, stp
        self.c1, self.factor, self.stpmin = c1, factor, stpmin
        self.message = ""

    def shrink(self) -> None:
        self.stp *= self.factor

    def advance(self, f: float, g: float) -> str:
        if f <= self.f0 + self.c1 * self.stp * self.d0:
            return CONVERGED
        self.stp *= self.factor
        if self.stp < self.stpmin:
            self.message = f"step below {self.stpmin} without sufficient decrease"
            return FAILED
        return EVALUATE
