"""Dense float64 references for the L-BFGS products (independent of hpcqn's code)."""

from __future__ import annotations

import numpy as np


def dense_inverse_bfgs(pairs: list[tuple[np.ndarray, np.ndarray]], n: int) -> np.ndarray:
    """H from the BFGS inverse update over ``pairs`` (oldest first),
    ``H <- V' H V + rho s s'`` with ``V = I - rho y s'`` (Nocedal and Wright eq. 7.19),
    starting from ``H0 = (s.y / y.y) I`` of the newest pair."""
    s_new, y_new = pairs[-1]
    h = (s_new @ y_new) / (y_new @ y_new) * np.eye(n)
    for s, y in pairs:
        rho = 1.0 / (s @ y)
        v = np.eye(n) - rho * np.outer(y, s)
        h = v.T @ h @ v + rho * np.outer(s, s)
    return h


def dense_direct_bfgs(pairs: list[tuple[np.ndarray, np.ndarray]], n: int) -> np.ndarray:
    """B (the Hessian approximation) from the direct BFGS update over ``pairs``,
    ``B <- B - B s s' B / s'Bs + y y' / y's``, from ``B0 = (y.y / s.y) I`` of the newest
    pair: its inverse is :func:`dense_inverse_bfgs`, computed a different way."""
    s_new, y_new = pairs[-1]
    b = (y_new @ y_new) / (s_new @ y_new) * np.eye(n)
    for s, y in pairs:
        bs = b @ s
        b = b - np.outer(bs, bs) / (s @ bs) + np.outer(y, y) / (y @ s)
    return b
