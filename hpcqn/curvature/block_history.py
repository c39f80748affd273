"""One block's L-BFGS history and its inverse-Hessian product in compact form.

The pairs live in one ``(2M, n_b)`` array (``s`` of slot ``i`` in row ``i``, ``y`` in row
``M + i``; a ring buffer, the oldest slot overwritten). ``H g`` uses the compact
representation of Byrd, Nocedal and Schnabel (Math. Prog. 63, 1994, eq. 3.1) with
``H0 = gamma I``::

    H g = gamma g + S p - gamma Y u,   a = S'g, b = Y'g,   R u = a,
    R' p = (D + gamma Y'Y) u - gamma b

where ``R`` is the upper triangle of ``S'Y`` and ``D`` its diagonal, in chronological
order. Between pushes all of that is one fixed linear map of ``[a; b]``::

    [coefficients of S; of Y] = K [a; b],   K = [[R^-T (D + gamma Y'Y) R^-1, -gamma R^-T],
                                                 [-gamma R^-1,               0          ]]

which is built (in float64, ``O(M^3)``) at the first product after a push. So one step
reads the history twice, as two matrix-vector products (the ``(2M, n_b) @ g`` and the
``(2M,) @ (2M, n_b)``), with one ``2M x 2M`` float64 matrix-vector product between them.
``S'Y`` and ``Y'Y`` are updated when a pair is pushed (every ``period`` steps). The two
large products go through a :class:`Kernels` (NumPy/BLAS or the array namespace by
default; the torch bridge passes faster ones on the same memory).
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

import numpy as np
import scipy.linalg

from ..backend import axpy, copy, dtype_name, matmul_into, namespace, to_host


class Kernels:
    """The two large products of :meth:`BlockHistory.apply`, replaceable as a whole (the
    torch bridge uses torch's BLAS on the same memory)."""

    def products(self, vectors: Any, g: Any) -> np.ndarray:
        """``vectors @ g`` on the host."""
        return to_host(vectors @ g)

    def combine(self, coeffs: np.ndarray, vectors: Any, gamma: float, g: Any, out: Any) -> Any:
        """``out = coeffs @ vectors + gamma g``; returns ``out``."""
        matmul_into(namespace(vectors).asarray(coeffs, dtype=vectors.dtype), vectors, out)
        return axpy(gamma, g, out)

    # The heavy-ball update of hpcqn.MLBFGS: ``buf = momentum buf + d``, ``theta -= lr buf``
    # in ONE pass where a kernel can (then ``fused_heavy_ball`` is True); the default
    # leaves it to the optimizer's two-pass form.
    fused_heavy_ball = False

    def heavy_ball(self, theta: Any, d: Any, buf: Any, momentum: float, lr: float) -> None:
        buf *= momentum
        axpy(1.0, d, buf)
        axpy(-lr, buf, theta)


DEFAULT_KERNELS = Kernels()


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
        self._map: tuple[np.ndarray, float] | None = None  # (K by slot, gamma); None: stale

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
        self._map = None
        # Products of the new vectors with every stored vector: three GEMVs.
        s_new, y_new = self.vectors[slot, :], self.vectors[m + slot, :]
        s_dot_y = to_host(self.vectors[m:, :] @ s_new)  # y_j . s_new
        y_dot_s = to_host(self.vectors[:m, :] @ y_new)  # s_i . y_new
        y_dot_y = to_host(self.vectors[m:, :] @ y_new)  # y_j . y_new
        self.sy[slot, :] = s_dot_y
        self.sy[:, slot] = y_dot_s
        self.yy[slot, :] = self.yy[:, slot] = y_dot_y

    def linear_map(self) -> tuple[np.ndarray, float]:
        """``(K, gamma)``: ``K`` the ``(2M, 2M)`` float64 map from ``[S'g; Y'g]`` (by slot)
        to the coefficients of the rows in ``H g - gamma g`` (module docs; zero for empty
        slots). Built once after each push."""
        if self._map is None:
            m, order = self.history, self.order
            gamma = self.gamma
            s_rows, y_rows = np.array(order), m + np.array(order)
            sy = self.sy[np.ix_(order, order)]
            r_inv = scipy.linalg.solve_triangular(np.triu(sy), np.eye(len(order)),
                                                  lower=False, check_finite=False)
            middle = np.diag(np.diag(sy)) + gamma * self.yy[np.ix_(order, order)]
            k = np.zeros((2 * m, 2 * m))
            k[np.ix_(s_rows, s_rows)] = r_inv.T @ middle @ r_inv
            k[np.ix_(s_rows, y_rows)] = -gamma * r_inv.T
            k[np.ix_(y_rows, s_rows)] = -gamma * r_inv
            self._map = (k, gamma)
        return self._map

    def apply(self, g: Any, out: Any, kernels: Kernels = DEFAULT_KERNELS) -> Any:
        """``out = H g`` with the stored pairs (compact form; needs at least one pair)."""
        k, gamma = self.linear_map()
        coeffs = k @ kernels.products(self.vectors, g).astype(np.float64)
        return kernels.combine(coeffs, self.vectors, gamma, g, out)

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
