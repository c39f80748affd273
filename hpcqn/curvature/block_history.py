"""One block's L-BFGS history and its inverse-Hessian product in compact form.

The pairs live in one ``(2M, n_b)`` array (``s`` of slot ``i`` in row ``i``, ``y`` in row
``M + i``; a ring buffer, the oldest slot overwritten). ``H g`` uses the compact
representation of Byrd, Nocedal and Schnabel (Math. Prog. 63, 1994, eq. 3.1) with
``H0 = gamma I``::

    H g = gamma g + S p - gamma Y u,   a = S'g, b = Y'g,   R u = a,
    R' p = (D + gamma Y'Y) u - gamma b

where ``R`` is the upper triangle of ``S'Y`` and ``D`` its diagonal, in chronological
order. So one step reads the history twice, as two matrix-vector products (the
``(2M, n_b) @ g`` and the ``(2M,) @ (2M, n_b)``), and everything else is ``M x M`` work on
the host. ``S'Y`` and ``Y'Y`` are updated when a pair is pushed (every ``period`` steps).
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

import numpy as np
import scipy.linalg

from ..backend import axpy, copy, dtype_name, matmul_into, namespace, to_host


class BlockHistory:
    """Up to ``history`` pairs of one block and the small matrices of their products."""

    def __init__(self, n_b: int, history: int, xp: ModuleType, dtype: Any):
        if history < 1:
            raise ValueError(f"history must be at least 1, got {history}")
        self.history = history
        self.xp = xp
        self.vectors = xp.zeros((2 * history, n_b), dtype=dtype)
        self.sy = np.zeros((history, history))  # sy[i, j] = s_i . y_j (slots)
        self.yy = np.zeros((history, history))
        self.order: list[int] = []  # slots, oldest first

    def __len__(self) -> int:
        return len(self.order)

    @property
    def gamma(self) -> float:
        """``s.y / y.y`` of the newest pair (the scale of ``H0``)."""
        newest = self.order[-1]
        return float(self.sy[newest, newest] / self.yy[newest, newest])

    def push(self, s: Any, y: Any) -> None:
        """Store a pair (the caller has checked ``s.y > 0``); drops the oldest when full."""
        m = self.history
        slot = self.order.pop(0) if len(self.order) == m else len(self.order)
        self.vectors[slot, :] = s
        self.vectors[m + slot, :] = y
        self.order.append(slot)
        # Products of the new vectors with every stored vector: three GEMVs.
        s_new, y_new = self.vectors[slot, :], self.vectors[m + slot, :]
        s_dot_y = to_host(self.vectors[m:, :] @ s_new)  # y_j . s_new
        y_dot_s = to_host(self.vectors[:m, :] @ y_new)  # s_i . y_new
        y_dot_y = to_host(self.vectors[m:, :] @ y_new)  # y_j . y_new
        self.sy[slot, :] = s_dot_y
        self.sy[:, slot] = y_dot_s
        self.yy[slot, :] = self.yy[:, slot] = y_dot_y

    def apply(self, g: Any, out: Any) -> Any:
        """``out = H g`` with the stored pairs (compact form; needs at least one pair)."""
        xp, m = self.xp, self.history
        order = self.order
        gamma = self.gamma
        products = to_host(self.vectors @ g).astype(np.float64)  # [S'g; Y'g] by slot
        a, b = products[order], products[[m + i for i in order]]
        sy = self.sy[np.ix_(order, order)]
        r = np.triu(sy)
        u = scipy.linalg.solve_triangular(r, a, lower=False, check_finite=False)
        rhs = np.diag(sy) * u + gamma * (self.yy[np.ix_(order, order)] @ u) - gamma * b
        p = scipy.linalg.solve_triangular(r, rhs, lower=False, trans="T", check_finite=False)
        coeffs = np.zeros(2 * m)
        coeffs[order] = p
        coeffs[[m + i for i in order]] = -gamma * u
        matmul_into(xp.asarray(coeffs, dtype=self.vectors.dtype), self.vectors, out)
        return axpy(gamma, g, out)

    def state_dict(self) -> dict[str, Any]:
        """Plain arrays: the pairs, their products and the slot order (oldest first)."""
        return {
            "vectors": copy(self.vectors),
            "sy": self.sy.copy(),
            "yy": self.yy.copy(),
            "order": np.array(self.order, dtype=np.int64),
        }

    @classmethod
    def from_state(cls, saved: dict[str, Any], xp: ModuleType) -> BlockHistory:
        vectors = saved["vectors"]
        dtype = getattr(xp, dtype_name(vectors.dtype, namespace(vectors)))  # xp's own dtype
        history = cls(vectors.shape[1], vectors.shape[0] // 2, xp, dtype)
        history.vectors[...] = xp.asarray(vectors)
        history.sy[...] = saved["sy"]
        history.yy[...] = saved["yy"]
        history.order = [int(i) for i in saved["order"]]
        return history
