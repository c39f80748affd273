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
import operator
from types import ModuleType
from typing import Any

import numpy as np
from scipy.linalg import lapack

from ..backend import axpy, is_ndarray, matmul_into, to_host

# Columns of the history rows per block of the blocked products (see row_products): a block
# of the rows and the new columns stays in the cache while the GEMM runs over it.
PRODUCT_BLOCK = 4096


def row_products(rows: Any, columns: Any) -> np.ndarray:
    """``rows @ columns.T`` on the host as float64. A NumPy product over more than two
    blocks of :data:`PRODUCT_BLOCK` entries runs block by block, summing the blocks'
    products: BLAS packs its operands for a GEMM this skinny (a dozen rows, a handful of
    columns, a long inner dimension), a pass over memory the blocks keep in the cache
    (1.5-2x faster from n = 1e5 on)."""
    n = rows.shape[1]
    if not isinstance(rows, np.ndarray) or n <= 2 * PRODUCT_BLOCK:
        return np.asarray(to_host(rows @ columns.T), dtype=np.float64)
    total = np.zeros((rows.shape[0], columns.shape[0]))
    for start in range(0, n, PRODUCT_BLOCK):
        stop = start + PRODUCT_BLOCK
        total += rows[:, start:stop] @ columns[:, start:stop].T
    return total


class GramHistory:
    """History vectors (local slices) and their global Gram matrix."""

    # How many new columns local_products multiplies the rows with (s, y, g).
    NEW_COLUMNS = 3

    def __init__(self, n_local: int, history: int, xp: ModuleType, dtype: Any):
        if history < 1:
            raise ValueError(f"history must be at least 1, got {history}")
        self.history = history
        self.xp = xp
        self.vectors = xp.zeros((2 * (history + 1), n_local), dtype=dtype)
        # The new columns of local_products, side by side: one GEMM with every row.
        self._columns = xp.zeros((self.NEW_COLUMNS, n_local), dtype=dtype)
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

    def _new_columns(self, slot: int, g: Any) -> Any:
        """The new pair of ``slot`` and ``g`` as the rows of one array (copies)."""
        columns = self._columns
        columns[0:2, :] = self.vectors[2 * slot : 2 * slot + 2, :]
        columns[2, :] = g
        return columns

    def local_products(self, slot: int, g: Any) -> np.ndarray:
        """This rank's share of every new global number, as float64 on the host:
        ``[b_i . s_new, b_i . y_new, b_i . g]`` for every used row ``b_i`` (the new pair
        in ``slot`` included), then ``g . g``. Sum over ranks and pass to :meth:`absorb`."""
        rows = self._rows_for(slot)
        columns = self._new_columns(slot, g)
        out = np.empty(3 * rows + 1)
        out[:-1] = row_products(self.vectors[:rows, :], columns).ravel()
        out[-1] = float(g @ g)
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
        gram, gi = self.gram, self.g_index
        gram[:rows, gi] = gram[gi, :rows] = table[:, 2]
        gram[gi, gi] = products[-1]
        s_i, y_i = 2 * slot, 2 * slot + 1
        sy, yy = float(table[s_i, 1]), float(table[y_i, 1])
        accept = bool(np.isfinite(table[s_i : s_i + 2]).all()) and sy > eps * yy
        if accept:  # the y column last: its s_new . y_new stands at (s, y) and at (y, s)
            gram[:rows, s_i] = gram[s_i, :rows] = table[:, 0]
            gram[:rows, y_i] = gram[y_i, :rows] = table[:, 1]
            self.order.append(slot)
            if len(self.order) > self.history:
                self.order.pop(0)
            self.rows_used = rows
        return accept

    # -- the two-loop on scalars -----------------------------------------------------
    def direction_coefficients(self) -> np.ndarray:
        """``delta`` such that ``d = -H g = sum_j delta_j b_j`` (the two-loop recursion,
        Nocedal and Wright Algorithm 7.4, with ``H0 = (s.y / y.y) I`` of the newest pair),
        computed from the Gram matrix alone: on the products of g and the stored pairs
        (a ``(2m + 1)``-square table, in Python floats: a few dozen products)."""
        active = self._active()
        delta = np.zeros(self.g_index + 1)
        if not self.order:
            delta[self.g_index] = -1.0
            return delta
        table = self.gram.take(active, 0).take(active, 1).tolist()  # g, then (s, y) pairs
        c = [0.0] * len(active)  # delta over the active rows
        c[0] = -1.0
        m = len(self.order)
        rho = [1.0 / table[2 * j + 1][2 * j + 2] for j in range(m)]
        alpha = [0.0] * m
        for j in reversed(range(m)):
            alpha[j] = rho[j] * sum(map(operator.mul, c, table[2 * j + 1]))
            c[2 * j + 2] -= alpha[j]
        gamma = table[2 * m - 1][2 * m] / table[2 * m][2 * m]
        c = [gamma * value for value in c]
        for j in range(m):
            beta = rho[j] * sum(map(operator.mul, c, table[2 * j + 2]))
            c[2 * j + 1] += alpha[j] - beta
        delta.put(active, c)
        return delta

    def _active(self) -> np.ndarray:
        """Basis indices with meaningful Gram entries: g and the stored pairs' rows (an
        index array: ``take`` with it costs a fraction of indexing with a list)."""
        return np.array([self.g_index]
                        + [r for slot in self.order for r in (2 * slot, 2 * slot + 1)])

    def dot_g(self, delta: np.ndarray) -> float:
        """``d . g`` for ``d = sum_j delta_j b_j``."""
        active = self._active()
        return float(delta.take(active) @ self.gram[:, self.g_index].take(active))

    def norm2(self, delta: np.ndarray) -> float:
        """``d . d`` for ``d = sum_j delta_j b_j``."""
        active = self._active()
        coefficients = delta.take(active)
        return float(coefficients @ self.gram.take(active, 0).take(active, 1) @ coefficients)

    def combine(self, delta: np.ndarray, g: Any, out: Any) -> Any:
        """Form ``d = sum_j delta_j b_j`` locally into ``out`` (one GEMV over the history
        rows and one ``axpy`` of ``g``)."""
        xp = self.xp
        rows = self.rows_used
        scale = float(delta[self.g_index])
        if rows and self.order:
            coeffs = xp.asarray(delta[:rows], dtype=self.vectors.dtype)
            matmul_into(coeffs, self.vectors[:rows, :], out)
            axpy(scale, g, out)
        elif is_ndarray(out):
            xp.multiply(g, scale, out=out)
        else:
            out[...] = scale * g
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
    GEMM as the plain products (two more columns: the new ``s`` and ``y`` restricted to
    ``F``), and the variables that entered or left ``F`` since the last point add or
    remove their outer products (one GEMM over those columns, ``O(changed r^2)``); it is
    recomputed whole every :attr:`REFRESH` iterations, or when many variables changed.
    """

    REFRESH = 64
    NEW_COLUMNS = 5  # s, y, g, then s and y restricted to the free variables

    def __init__(self, n_local: int, history: int, xp: ModuleType, dtype: Any):
        super().__init__(n_local, history, xp, dtype)
        size = 2 * (history + 1)
        self.free_products = np.zeros((size, size))  # summed over ranks
        self.local_free = np.zeros((size, size))  # this slice's part
        self._free: Any = None  # of the point whose products come next
        self._previous: Any = None  # the free set the local table is of
        self._changed = xp.zeros(n_local, dtype=bool)
        self._age = 0  # updates since the last whole recomputation
        self.fallbacks = 0  # directions that fell back to the two-loop (singular system)
        self._triangles: dict[int, tuple[Any, Any]] = {}  # upper-triangle indices by size
        self._patterns: dict[int, tuple[np.ndarray, ...]] = {}

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

    def set_free(self, free: Any) -> None:
        """The free set of the point whose products come next (a boolean array, read by
        :meth:`local_products`, which keeps its own copy)."""
        self._free = free

    def _triangle(self, rows: int) -> tuple[Any, Any]:
        """The upper-triangle indices of a ``rows``-square table (cached)."""
        if rows not in self._triangles:
            self._triangles[rows] = np.triu_indices(rows)
        return self._triangles[rows]

    def products_size(self, slot: int) -> int:
        rows = self._rows_for(slot)
        return super().products_size(slot) + rows * (rows + 1) // 2

    def _new_columns(self, slot: int, g: Any) -> Any:
        columns = super()._new_columns(slot, g)
        self.xp.multiply(columns[0:2, :], self._free, out=columns[3:5, :])
        return columns

    def local_products(self, slot: int, g: Any) -> np.ndarray:
        """:meth:`GramHistory.local_products`, then the upper triangle of this slice's
        products of the used rows over the free variables."""
        xp, rows, free, previous = self.xp, self._rows_for(slot), self._free, self._previous
        s_i, y_i = 2 * slot, 2 * slot + 1
        table = self.local_free
        n_local = self.vectors.shape[1]
        changed = None
        if previous is not None and self._age < self.REFRESH and n_local:
            changed = xp.not_equal(free, previous, out=self._changed)
            n_changed = int(xp.count_nonzero(changed))
            if n_changed > 2 * rows and 2 * n_changed > int(xp.count_nonzero(free)):
                changed = None  # many changed: recompute
        plain = np.empty(3 * rows + 1)
        if changed is None:
            columns = GramHistory._new_columns(self, slot, g)
            plain[:-1] = row_products(self.vectors[:rows, :], columns[:3]).ravel()
            table[...] = 0.0
            if n_local and bool(free.any()):
                part = self.vectors[:rows, :][:, free]
                table[:rows, :rows] = row_products(part, part)
            self._age = 0
        else:
            columns = self._new_columns(slot, g)
            new = row_products(self.vectors[:rows, :], columns)
            plain[:-1] = new[:, :3].ravel()
            if n_changed:
                # Entering variables add their outer products, leaving ones remove
                # theirs; the new pair's rows and columns are overwritten just below.
                where = xp.nonzero(changed)[0]
                part = self.vectors[:rows, :][:, where]
                sign = xp.where(free[where], 1.0, -1.0).astype(part.dtype)
                table[:rows, :rows] += to_host((part * sign) @ part.T)
            table[:rows, s_i] = table[s_i, :rows] = new[:, 3]
            table[:rows, y_i] = table[y_i, :rows] = new[:, 4]
            self._age += 1
        plain[-1] = float(g @ g)
        if self._previous is None:
            self._previous = xp.array(free, copy=True)
        else:
            self._previous[...] = free
        return np.concatenate([plain, table[:rows, :rows][self._triangle(rows)]])

    def absorb(self, products: np.ndarray, slot: int, eps: float) -> bool:
        rows = self._rows_for(slot)
        plain = super().products_size(slot)
        accepted = super().absorb(products[:plain], slot, eps)
        self._gg = float(products[plain - 1])
        upper = self._triangle(rows)
        table = self.free_products
        table[upper] = products[plain:]
        table[upper[1], upper[0]] = products[plain:]
        return accepted

    def gradient_norm2(self, products: np.ndarray) -> float:
        return self._gg  # the plain products' last entry, read by absorb

    def _pattern(self, m: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """For ``m`` pairs (cached), masks of ``2m``-square tables ordered ``[y.., s..]``:
        the strict upper triangle of the YS block with the strict lower one of the SY
        block (``L^T`` and ``L``), the SS block, the YY block, the two off-diagonal
        blocks."""
        if m not in self._patterns:
            lower = np.zeros((2 * m, 2 * m))
            lower[:m, m:] = np.triu(np.ones((m, m)), 1)
            lower[m:, :m] = np.tril(np.ones((m, m)), -1)
            ss, yy, cross = (np.zeros((2 * m, 2 * m)) for _ in range(3))
            ss[m:, m:] = yy[:m, :m] = 1.0
            cross[:m, m:] = cross[m:, :m] = 1.0
            self._patterns[m] = lower, ss, yy, cross
        return self._patterns[m]

    def direction_coefficients(self) -> np.ndarray:
        """``delta`` with ``P_F(sum_j delta_j b_j) = -(Z^T B Z)^-1 g_F``, by the
        Sherman-Morrison-Woodbury form ``(Z^T B Z)^-1 = I/theta + W_F K^-1 W_F^T/theta^2``,
        ``K = M^-1 - W_F^T W_F / theta`` (``2m x 2m``, with ``W = [Y, theta S]``); the
        two-loop's ``-H g_F`` when there is no pair or ``K`` is singular.

        With the products ordered ``[y_1..y_m, s_1..s_m]`` both matrices are masks of two
        ``2m``-square tables (all products, free-set products): ``M^-1 = [[-D, L^T], [L,
        theta SS]]`` and ``W_F^T W_F / theta = [[YY_F / theta, YS_F], [SY_F, theta SS_F]]``
        (``D`` the diagonal of ``s_i . y_i``, ``L`` the strictly lower ``s_i . y_j``)."""
        if not self.order:
            return super().direction_coefficients()
        gram, gi = self.gram, self.g_index
        m = len(self.order)
        slots = np.array(self.order)
        y_idx, s_idx = 2 * slots + 1, 2 * slots
        idx = np.concatenate([y_idx, s_idx])
        newest = self.order[-1]
        theta = gram[2 * newest + 1, 2 * newest + 1] / gram[2 * newest, 2 * newest + 1]
        lower, ss, yy, cross = self._pattern(m)
        all_products = gram.take(idx, 0).take(idx, 1)
        free = self.free_products.take(idx, 0).take(idx, 1)
        k = all_products * (lower + theta * ss)
        k -= free * (yy / theta + cross + theta * ss)
        # -D on the YY block's diagonal (a view of k: every (2m + 1)-th entry, m of them)
        k.reshape(-1)[: m * (2 * m + 1) : 2 * m + 1] -= all_products[m:, :m].diagonal()
        w_g = gram[:, gi].take(idx)
        w_g[m:] *= theta
        _, _, u, info = lapack.dgesv(k, w_g)
        if info:  # K singular
            u = np.full(2 * m, np.nan)
        delta = np.zeros(gi + 1)
        delta[gi] = -1.0 / theta
        delta.put(y_idx, -u[:m] / theta**2)
        delta.put(s_idx, -u[m:] / theta)
        slope = self.dot_g(delta)
        if not (np.isfinite(delta).all() and slope < 0.0 and math.isfinite(slope)):
            self.fallbacks += 1
            return super().direction_coefficients()
        return delta
