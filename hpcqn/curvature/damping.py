"""The damping rule of mL-BFGS (docs/algorithms.md, section 2.4; Niu et al., TMLR 2023) and the
rule that accepts or skips a curvature pair.

Given a pair ``(s, y)`` with ``mu = s.y / s.s``, replace ``y`` by
``y_hat = tau * y + (1 - tau) * s`` where

    tau = min((1 - sigma_L) / (1 - mu), tau0)   if mu <= sigma_L
        = min((sigma_H - 1) / (mu - 1), tau0)   if mu >= sigma_H
        = tau0                                  otherwise,      tau0 = 1 - pair_damping.

Then ``s.y_hat / s.s = 1 + tau (mu - 1)`` lies in ``[sigma_L, sigma_H]``, so
``s.y_hat > 0`` and the BFGS matrix built from the damped pairs stays SPD.

Pure functions of arrays and numbers (any array namespace; no communication).
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import numpy as np

SIGMA_L = 0.01
SIGMA_H = 1.5

# Why accept_pair skipped a pair.
NOT_FINITE = "not finite"
ZERO_STEP = "s is zero"
NOT_ALIGNED = "cos(s, y) <= min_cos"
NO_CURVATURE = "s.y_hat <= 0"


def damping_tau(
    mu: float, pair_damping: float, sigma_l: float = SIGMA_L, sigma_h: float = SIGMA_H
) -> float:
    """The mixing weight ``tau`` of ``y`` in ``y_hat`` for the curvature ratio ``mu``:
    ``min((1 - sigma_L) / (1 - mu), tau0)`` if ``mu <= sigma_L``,
    ``min((sigma_H - 1) / (mu - 1), tau0)`` if ``mu >= sigma_H``, else
    ``tau0 = 1 - pair_damping`` (NaN for a non-finite ``mu``)."""
    if not 0.0 <= pair_damping < 1.0:
        raise ValueError(f"pair_damping must be in [0, 1), got {pair_damping}")
    if not 0.0 < sigma_l < 1.0 < sigma_h:
        raise ValueError(f"need 0 < sigma_L < 1 < sigma_H, got {sigma_l}, {sigma_h}")
    tau0 = 1.0 - pair_damping
    if not math.isfinite(mu):
        return math.nan
    if mu <= sigma_l:
        return min((1.0 - sigma_l) / (1.0 - mu), tau0)
    if mu >= sigma_h:
        return min((sigma_h - 1.0) / (mu - 1.0), tau0)
    return tau0


class PairDecision(NamedTuple):
    """What :func:`accept_pair` decided: the pair to store ``(s, y_hat)``, or
    ``(None, None)`` and why it was skipped (``skipped``, one of the reasons above)."""

    s: Any
    y_hat: Any
    skipped: str | None = None

    @property
    def accepted(self) -> bool:
        return self.skipped is None


def accept_pair(s: Any, y: Any, pair_damping: float, sigma_l: float = SIGMA_L,
                sigma_h: float = SIGMA_H, min_cos: float = 0.0) -> PairDecision:
    """Damp the pair ``(s, y)`` and decide whether it is stored. With ``mu = s.y / s.s``
    (NaN unless ``s.s`` is finite and positive) and ``tau`` from :func:`damping_tau`::

        y_hat = tau y + (1 - tau) s
        accept  iff  s.y_hat finite and > 0,  s.s > 0,
                     and (min_cos = 0 or s.y > min_cos |s| |y|)   (cos(s, y) before damping)

    Overflowing products make a pair not finite (skipped), never an error. Returns
    :class:`PairDecision`: ``(s, y_hat)`` when accepted, else the reason."""
    with np.errstate(over="ignore", invalid="ignore"):  # non-finite pairs are skipped
        ss, sy = float(s @ s), float(s @ y)
        mu = sy / ss if ss > 0 and math.isfinite(ss) else math.nan
        tau = damping_tau(mu, pair_damping, sigma_l, sigma_h)
        y_hat = tau * y + (1.0 - tau) * s
        s_yhat = float(s @ y_hat)
        aligned = (not min_cos or sy > min_cos * math.sqrt(ss * float(y @ y)))
    if math.isfinite(s_yhat) and s_yhat > 0.0 and ss > 0.0 and aligned:
        return PairDecision(s, y_hat)
    if not (math.isfinite(s_yhat) and math.isfinite(ss)):
        reason = NOT_FINITE
    elif not ss > 0.0:
        reason = ZERO_STEP
    elif not aligned:
        reason = NOT_ALIGNED
    else:
        reason = NO_CURVATURE
    return PairDecision(None, None, reason)
