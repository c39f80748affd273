"""The damping rule of mL-BFGS (ALGORITHMS.md section 1; Niu et al., TMLR 2023).

Given a pair ``(s, y)`` with ``mu = s.y / s.s``, replace ``y`` by
``y_hat = tau * y + (1 - tau) * s`` where

    tau = min((1 - sigma_L) / (1 - mu), tau0)   if mu <= sigma_L
        = min((sigma_H - 1) / (mu - 1), tau0)   if mu >= sigma_H
        = tau0                                  otherwise,      tau0 = 1 - damping.

Then ``s.y_hat / s.s = 1 + tau (mu - 1)`` lies in ``[sigma_L, sigma_H]``, so
``s.y_hat > 0`` and the BFGS matrix built from the damped pairs stays SPD.
"""

from __future__ import annotations

import math

SIGMA_L = 0.01
SIGMA_H = 1.5


def damping_tau(
    mu: float, damping: float, sigma_l: float = SIGMA_L, sigma_h: float = SIGMA_H
) -> float:
    """The mixing weight ``tau`` of ``y`` in ``y_hat`` for the curvature ratio ``mu``."""
    if not 0.0 <= damping < 1.0:
        raise ValueError(f"damping must be in [0, 1), got {damping}")
    if not 0.0 < sigma_l < 1.0 < sigma_h:
        raise ValueError(f"need 0 < sigma_L < 1 < sigma_H, got {sigma_l}, {sigma_h}")
    tau0 = 1.0 - damping
    if not math.isfinite(mu):
        return math.nan
    if mu <= sigma_l:
        return min((1.0 - sigma_l) / (1.0 - mu), tau0)
    if mu >= sigma_h:
        return min((sigma_h - 1.0) / (mu - 1.0), tau0)
    return tau0
