"""L-BFGS history in vector-free form (Chen, Wang, Zhou and Gao, NIPS 2014).

The history pairs ``(s_i, y_i)`` are kept as local slices (rows of one ``(2(M+1), n)``
array, ``s`` of slot ``i`` in row ``2i`` and ``y`` in row ``2i + 1``; one slot more than
the history length so the newest pair can be written before the oldest is dropped).
The GLOBAL dot products between all history vectors and the current gradient live in a
small host Gram matrix. The two-loop recursion then runs on scalars only and yields
coefficients ``delta`` with ``d = sum_j delta_j b_j`` over the basis
``b = (s_0, y_0, s_1, y_1, ..., g)``; forming ``d`` is one local matrix-vector product.

Per iteration the only new global numbers are the products of the newest ``s``, ``y``
and ``g`` with every stored vector: one local ``(2(M+1), n) @ (n, 3)`` product, summed
over ranks by the caller in ONE reduction. Nothing here communicates.
"""

from __future__ import annotations

import math
from types import ModuleType
from typing import Any

import numpy as np

from ..backend import is_ndarray, matmul_into, to_host


class GramHistory:
    """History vectors (local slices) and their global Gram matrix."""

    def __init__(self, n_local: int, history: int, xp: ModuleType, dtype: Any):
        if history < 1:
            raise ValueError(f"history must be at least 1, got {history}")
        self.history = history
        self.xp = xp
        self.vectors = xp.zeros((2 * (history + 1), n_local), dtype=dtype)
        size = 2 * (history + 1) + 1
        self.gram = np.zeros((size, size))
        self.g_index = size - 1
        self.order: list[int] = []  # slots of the stored pairs, oldest first
        self.rows_used = 0  # rows [0, rows_used) have ever held a pair

    def state_dict(self) -> dict[str, Any]:
        """Plain arrays and numbers: the local rows, the global Gram matrix, the order."""
        return {"vectors": self.vectors.copy(), "gram": self.gram.copy(),
                "order": np.array(self.order, dtype=np.int64), "rows_used": self.rows_used}

    def load_state_dict(self, saved: dict[str, Any]) -> None:
        if tuple(saved["vectors"].shape) != tuple(self.vectors.shape):
            raise ValueError(f"saved history rows have shape {tuple(saved['vectors'].shape)}, "
                             f"this one {tuple(self.vectors.shape)}")
        self.vectors[...] = self.xp.asarray(saved["vectors"])
        self.gram[...] = saved["gram"]
        self.order = [int(i) for i in saved["order"]]
        self.rows_used = int(saved["rows_used"])

    # -- slots ---------------------------------------------------------------------
    def free_slot(self) -> int:
        """The slot that the next pair is written into (never one that is stored)."""
        return min(set(range(self.history + 1)) - set(self.order))

    def pair_rows(self, slot: int) -> tuple[Any, Any]:
        """Writable views of the ``s`` and ``y`` rows of ``slot``."""
        return self.vectors[2 * slot, :], self.vectors[2 * slot + 1, :]

    def reset(self) -> None:
        """Forget every pair (the gradient's norm stays known)."""
        self.order.clear()

    def __len__(self) -> int:
        return len(self.order)

    # -- products ------------------------------------------------------------------
    def _rows_for(self, slot: int) -> int:
        return max(self.rows_used, 2 * (slot + 1))

    def local_products(self, slot: int, g: Any) -> np.ndarray:
        """This rank's share of every new global number, as float64 on the host:
        ``[b_i . s_new, b_i . y_new, b_i . g]`` for every used row ``b_i`` (the new pair
        in ``slot`` included), then ``g . g``. Sum over ranks and pass to :meth:`absorb`."""
        xp = self.xp
        rows = self._rows_for(slot)
        s_new, y_new = self.pair_rows(slot)
        products = self.vectors[:rows, :] @ xp.stack([s_new, y_new, g]).T
        gg = g @ g
        out = np.empty(3 * rows + 1)
        out[:-1] = to_host(products).ravel()
        out[-1] = float(gg)
        return out

    def dot(self, u: Any, v: Any) -> float:
        """This rank's part of ``u . v``."""
        return float(u @ v)

    def gradient_part(self, g: Any) -> float:
        """This rank's part of ``g . g`` at a new point."""
        return float(g @ g) if g.size else 0.0

    def gradient_norm2(self, products: np.ndarray) -> float:
        """``g . g`` of the new point from the summed :meth:`local_products`."""
        return float(products[-1])

    def products_size(self, slot: int) -> int:
        """The length of :meth:`local_products` for ``slot`` (the same on every rank)."""
        return 3 * self._rows_for(slot) + 1

    def set_gradient_norm2(self, gg: float) -> None:
        """``g . g`` of the current gradient (used before any pair exists)."""
        self.gram[self.g_index, self.g_index] = gg

    def absorb(self, products: np.ndarray, slot: int, eps: float) -> bool:
        """Take the summed :meth:`local_products`. Store the pair in ``slot`` when its
        curvature ``s.y`` exceeds ``eps * y.y`` and is finite; return whether it was stored."""
        rows = self._rows_for(slot)
        table = products[:-1].reshape(rows, 3)
        gi = self.g_index
        self.gram[:rows, gi] = self.gram[gi, :rows] = table[:, 2]
        self.gram[gi, gi] = products[-1]
        s_i, y_i = 2 * slot, 2 * slot + 1
        sy, yy = table[s_i, 1], table[y_i, 1]
        accept = bool(np.isfinite(table[[s_i, y_i]]).all() and sy > eps * yy)
        if accept:
            self.gram[:rows, s_i] = self.gram[s_i, :rows] = table[:, 0]
            self.gram[:rows, y_i] = self.gram[y_i, :rows] = table[:, 1]
            self.order.append(slot)
            if len(self.order) > self.history:
                self.order.pop(0)
            self.rows_used = rows
        return accept

    # -- the two-loop on scalars -----------------------------------------------------
    def direction_coefficients(self) -> np.ndarray:
        """``delta`` such that ``d = -H g = sum_j delta_j b_j`` (the two-loop recursion,
        Nocedal and Wright Algorithm 7.4, with ``H0 = (s.y / y.y) I`` of the newest pair),
        computed from the Gram matrix alone."""
        gram, gi = self.gram, self.g_index
        active = self._active()
        delta = np.zeros(gi + 1)
        delta[gi] = -1.0

        def dot_with(row: int) -> float:  # (sum_j delta_j b_j) . b_row
            return float(delta[active] @ gram[active, row])

        rho = {slot: 1.0 / gram[2 * slot, 2 * slot + 1] for slot in self.order}
        alpha = {}
        for slot in reversed(self.order):
            alpha[slot] = rho[slot] * dot_with(2 * slot)
            delta[2 * slot + 1] -= alpha[slot]
        if self.order:
            newest = self.order[-1]
            s_i, y_i = 2 * newest, 2 * newest + 1
            delta *= gram[s_i, y_i] / gram[y_i, y_i]
        for slot in self.order:
            beta = rho[slot] * dot_with(2 * slot + 1)
            delta[2 * slot] += alpha[slot] - beta
        return delta

    def _active(self) -> list[int]:
        """Basis indices with meaningful Gram entries: g and the stored pairs' rows."""
        return [self.g_index] + [r for slot in self.order for r in (2 * slot, 2 * slot + 1)]

    def dot_g(self, delta: np.ndarray) -> float:
        """``d . g`` for ``d = sum_j delta_j b_j``."""
        active = self._active()
        return float(delta[active] @ self.gram[active, self.g_index])

    def norm2(self, delta: np.ndarray) -> float:
        """``d . d`` for ``d = sum_j delta_j b_j``."""
        active = self._active()
        return float(delta[active] @ self.gram[np.ix_(active, active)] @ delta[active])

    def combine(self, delta: np.ndarray, g: Any, out: Any) -> Any:
        """Form ``d = sum_j delta_j b_j`` locally into ``out`` (one GEMV over the history)."""
        xp = self.xp
        rows = self.rows_used
        if rows and np.any(delta[:rows]):
            coeffs = xp.asarray(delta[:rows], dtype=self.vectors.dtype)
            matmul_into(coeffs, self.vectors[:rows, :], out)
            out += float(delta[self.g_index]) * g
        elif is_ndarray(out):
            xp.multiply(g, float(delta[self.g_index]), out=out)
        else:
            out[...] = float(delta[self.g_index]) * g
        return out


class SubspaceHistory(GramHistory):
    """:class:`GramHistory` for a bounded run: the direction is L-BFGS-B's subspace step
    on the free variables (Byrd, Lu, Nocedal and Zhu 1995, section 5, taken from the
    current point instead of the Cauchy point; docs/algorithms.md, section 1.11),
    ``d_F = -(Z^T B Z)^-1 g_F`` with ``B = theta I - W M W^T`` the compact form of the
    L-BFGS matrix and ``Z`` the free variables.

    ``Z^T B Z`` needs the history's products restricted to the free variables ``F``,
    which every rank keeps for its slice (``local_free``) and the closing reduction sums
    with the other products (the upper triangle of the used rows, appended): still one
    reduction an iteration. (Not the Gram matrix minus the products over the binding
    set: when the steps lie mostly on variables now at a bound, that difference cancels.)
    The local table is updated, not recomputed: the new pair's rows come from the same
    pass over the history that the plain products make, and the variables that entered
    or left ``F`` since the last point add or remove their outer products
    (``O(changed r^2)``); it is recomputed whole every :attr:`REFRESH` iterations, or
    when many variables changed.
    """

    REFRESH = 64

    def __init__(self, n_local: int, history: int, xp: ModuleType, dtype: Any):
        super().__init__(n_local, history, xp, dtype)
        size = 2 * (history + 1)
        self.free_products = np.zeros((size, size))  # summed over ranks
        self.local_free = np.zeros((size, size))  # this slice's part
        self._free: Any = None  # of the point whose products come next
        self._previous: Any = None  # the free set the local table is of
        self._age = 0  # updates since the last whole recomputation
        self.fallbacks = 0  # directions that fell back to the two-loop (singular system)

    def state_dict(self) -> dict[str, Any]:
        previous = (np.zeros(0, dtype=np.uint8) if self._previous is None
                    else to_host(self._previous).astype(np.uint8))
        return {**super().state_dict(), "free_products": self.free_products.copy(),
                "local_free": self.local_free.copy(), "previous_free": previous,
                "free_age": self._age}

    def load_state_dict(self, saved: dict[str, Any]) -> None:
        super().load_state_dict(saved)
        self.free_products[...] = saved["free_products"]
        self.local_free[...] = saved["local_free"]
        previous = np.asarray(saved["previous_free"])
        self._previous = (None if previous.size != self.vectors.shape[1] or not previous.size
                          else self.xp.asarray(previous.astype(bool)))
        self._age = int(saved["free_age"])

    def set_binding(self, mask: Any) -> None:
        """The binding set of the point whose products come next (a boolean array)."""
        self._free = ~mask

    def products_size(self, slot: int) -> int:
        rows = self._rows_for(slot)
        return super().products_size(slot) + rows * (rows + 1) // 2

    def local_products(self, slot: int, g: Any) -> np.ndarray:
        """:meth:`GramHistory.local_products`, then the upper triangle of this slice's
        products of the used rows over the free variables."""
        xp, rows, mask, previous = self.xp, self._rows_for(slot), self._free, self._previous
        s_i, y_i = 2 * slot, 2 * slot + 1
        table = self.local_free
        changed = None
        if previous is not None and self._age < self.REFRESH:
            entering, leaving = mask & ~previous, previous & ~mask
            n_changed = int(entering.sum()) + int(leaving.sum())
            if 2 * n_changed <= int(mask.sum()) or n_changed <= 2 * rows:
                changed = entering, leaving
        if changed is None or not self.vectors.shape[1]:
            plain = super().local_products(slot, g)
            table[...] = 0.0
            if bool(mask.any()):
                part = self.vectors[:rows, :][:, mask]
                table[:rows, :rows] = to_host(part @ part.T)
            self._age = 0
        else:
            s_new, y_new = self.pair_rows(slot)
            columns = xp.stack([s_new, y_new, g, s_new * mask, y_new * mask])
            products = to_host(self.vectors[:rows, :] @ columns.T).astype(np.float64)
            plain = np.empty(3 * rows + 1)
            plain[:-1] = products[:, :3].ravel()
            plain[-1] = float(g @ g)
            old = [r for r in range(rows) if r not in (s_i, y_i)]
            for sign, chosen in zip((1.0, -1.0), changed, strict=True):
                if old and bool(chosen.any()):
                    part = self.vectors[old, :][:, chosen]
                    table[np.ix_(old, old)] += sign * to_host(part @ part.T)
            table[:rows, s_i] = table[s_i, :rows] = products[:, 3]
            table[:rows, y_i] = table[y_i, :rows] = products[:, 4]
            self._age += 1
        self._previous = xp.array(mask, copy=True)
        return np.concatenate([plain, table[:rows, :rows][np.triu_indices(rows)]])

    def absorb(self, products: np.ndarray, slot: int, eps: float) -> bool:
        rows = self._rows_for(slot)
        plain = super().products_size(slot)
        accepted = super().absorb(products[:plain], slot, eps)
        self._gg = float(products[plain - 1])
        table = np.zeros((rows, rows))
        table[np.triu_indices(rows)] = products[plain:]
        table = table + np.triu(table, 1).T
        self.free_products[:rows, :rows] = table
        return accepted

    def gradient_norm2(self, products: np.ndarray) -> float:
        return self._gg  # the plain products' last entry, read by absorb

    def direction_coefficients(self) -> np.ndarray:
        """``delta`` with ``P_F(sum_j delta_j b_j) = -(Z^T B Z)^-1 g_F``, by the
        Sherman-Morrison-Woodbury form ``(Z^T B Z)^-1 = I/theta + W_F K^-1 W_F^T/theta^2``,
        ``K = M^-1 - W_F^T W_F / theta`` (``2m x 2m``); the two-loop's ``-H g_F`` when
        there is no pair or ``K`` is singular."""
        if not self.order:
            return super().direction_coefficients()
        gram, free, gi = self.gram, self.free_products, self.g_index
        s_idx = [2 * slot for slot in self.order]
        y_idx = [2 * slot + 1 for slot in self.order]
        m = len(self.order)
        ss, sy, yy = (gram[np.ix_(a, b)] for a, b in ((s_idx, s_idx), (s_idx, y_idx),
                                                         (y_idx, y_idx)))
        ss_f, sy_f, yy_f = (free[np.ix_(a, b)] for a, b in
                            ((s_idx, s_idx), (s_idx, y_idx), (y_idx, y_idx)))
        newest = self.order[-1]
        theta = gram[2 * newest + 1, 2 * newest + 1] / gram[2 * newest, 2 * newest + 1]
        lower = np.tril(sy, -1)  # L_ij = s_i . y_j for i > j (oldest first)
        m_inverse = np.block([[-np.diag(np.diag(sy)), lower.T], [lower, theta * ss]])
        wf_wf = np.block([[yy_f, theta * sy_f.T], [theta * sy_f, theta**2 * ss_f]])
        w_g = np.concatenate([gram[y_idx, gi], theta * gram[s_idx, gi]])
        try:
            u = np.linalg.solve(m_inverse - wf_wf / theta, w_g)
        except np.linalg.LinAlgError:
            u = np.full(2 * m, np.nan)
        delta = np.zeros(gi + 1)
        delta[gi] = -1.0 / theta
        delta[y_idx] = -u[:m] / theta**2
        delta[s_idx] = -u[m:] / theta
        slope = self.dot_g(delta)
        if not (np.isfinite(delta).all() and slope < 0.0 and math.isfinite(slope)):
            self.fallbacks += 1
            return super().direction_coefficients()
        return delta
