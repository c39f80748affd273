"""L-BFGS history in a user's inner product and/or with a user's initial operator
``H0`` (docs/algorithms.md, section 1.12), in the vector-free form of
:mod:`hpcqn.curvature.gram_history`.

With ``H0`` the two-loop recursion's middle step ``r = gamma H0 q`` turns the gradient
and the ``y`` vectors into ``z = H0 y`` and ``z_g = H0 g``, so the basis grows to
``(s_i, y_i, z_i, ..., g, z_g)``: three rows a slot and one more gradient vector, and
``gamma = s.y / y.H0 y``. ``H0`` is linear, so ``z_new = H0 g_new - H0 g_old``: one
application a step. With ``inner`` every product of the Gram matrix is ``inner(u, v)``
summed over ranks instead of ``u . v``. Still ONE reduction a step: the new columns'
products with every row.
"""

from __future__ import annotations

from collections.abc import Callable
from types import ModuleType
from typing import Any

import numpy as np

from ..backend import matmul_into, to_host


class MetricHistory:
    """:class:`~hpcqn.curvature.gram_history.GramHistory`'s interface with ``inner``
    (the local part of ``<u, v>``) and/or ``H0`` (an SPD operator on a slice)."""

    def __init__(self, n_local: int, history: int, xp: ModuleType, dtype: Any,
                 inner: Callable[[Any, Any], Any] | None = None,
                 H0: Callable[[Any], Any] | None = None):  # noqa: N803 - the usual name
        if history < 1:
            raise ValueError(f"history must be at least 1, got {history}")
        self.history, self.xp, self.inner, self.H0 = history, xp, inner, H0
        self.per_slot = 3 if H0 is not None else 2
        rows = self.per_slot * (history + 1)
        self.vectors = xp.zeros((rows, n_local), dtype=dtype)
        self.zg = xp.zeros(n_local, dtype=dtype) if H0 is not None else None
        self.g_index = rows
        self.zg_index = rows + 1 if H0 is not None else rows
        size = rows + (2 if H0 is not None else 1)
        self.gram = np.zeros((size, size))
        self.order: list[int] = []
        self.rows_used = 0

    # -- rows ----------------------------------------------------------------------
    def s_row(self, slot: int) -> int:
        return self.per_slot * slot

    def y_row(self, slot: int) -> int:
        return self.per_slot * slot + 1

    def z_row(self, slot: int) -> int:
        """``H0 y`` of ``slot`` (the ``y`` row itself without ``H0``)."""
        return self.per_slot * slot + (2 if self.H0 is not None else 1)

    def state_dict(self) -> dict[str, Any]:
        state = {"vectors": self.vectors.copy(), "gram": self.gram.copy(),
                 "order": np.array(self.order, dtype=np.int64), "rows_used": self.rows_used}
        if self.zg is not None:
            state["zg"] = self.zg.copy()
        return state

    def load_state_dict(self, saved: dict[str, Any]) -> None:
        if tuple(saved["vectors"].shape) != tuple(self.vectors.shape):
            raise ValueError(f"saved history rows have shape {tuple(saved['vectors'].shape)}, "
                             f"this one {tuple(self.vectors.shape)}")
        self.vectors[...] = self.xp.asarray(saved["vectors"])
        self.gram[...] = saved["gram"]
        if self.zg is not None:
            self.zg[...] = self.xp.asarray(saved["zg"])
        self.order = [int(i) for i in saved["order"]]
        self.rows_used = int(saved["rows_used"])

    def free_slot(self) -> int:
        return min(set(range(self.history + 1)) - set(self.order))

    def pair_rows(self, slot: int) -> tuple[Any, Any]:
        return self.vectors[self.s_row(slot), :], self.vectors[self.y_row(slot), :]

    def reset(self) -> None:
        self.order.clear()

    def __len__(self) -> int:
        return len(self.order)

    # -- the metric ----------------------------------------------------------------
    def dot(self, u: Any, v: Any) -> float:
        """This rank's part of ``<u, v>``."""
        if self.inner is None:
            return float(u @ v)
        value = self.inner(u, v)
        if isinstance(value, (str, bytes)) or getattr(value, "size", 1) != 1:
            raise ValueError(f"inner(u, v) must return a real number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ValueError(f"inner(u, v) must return a real number, got {value!r}") from None

    def apply_h0(self, v: Any) -> Any:
        value = self.H0(v)
        if getattr(value, "shape", None) != v.shape:
            raise ValueError(f"H0(v) returned shape {getattr(value, 'shape', type(value).__name__)}"
                             f" for v of shape {v.shape}")
        return value

    def gradient_part(self, g: Any) -> float:
        """At a new point: ``z_g = H0 g`` (kept) and this rank's part of the gradient's
        squared norm, ``<g, z_g>`` (``<g, g>`` without ``H0``)."""
        if self.H0 is None:
            return self.dot(g, g) if g.size else 0.0
        self.zg[...] = self.apply_h0(g)
        return self.dot(g, self.zg) if g.size else 0.0

    def set_gradient_norm2(self, gg: float) -> None:
        self.gram[self.g_index, self.zg_index] = self.gram[self.zg_index, self.g_index] = gg

    def gradient_norm2(self, products: np.ndarray) -> float:
        """``<g, z_g>`` of the new point from the summed :meth:`local_products`."""
        return float(products[-1])

    # -- products ------------------------------------------------------------------
    def _rows_for(self, slot: int) -> int:
        return max(self.rows_used, self.per_slot * (slot + 1))

    def _columns(self, slot: int) -> list[int]:
        columns = [self.s_row(slot), self.y_row(slot)]
        if self.H0 is not None:
            columns.append(self.z_row(slot))
        columns.append(self.g_index)
        if self.H0 is not None:
            columns.append(self.zg_index)
        return columns

    def products_size(self, slot: int) -> int:
        """The length of :meth:`local_products` for ``slot`` (the same on every rank)."""
        extra = 2 if self.H0 is not None else 1
        return (self._rows_for(slot) + extra) * len(self._columns(slot)) + 1

    def local_products(self, slot: int, g: Any) -> np.ndarray:
        """This rank's part of the new column of products: every used row, ``g`` and
        ``z_g`` against the new ``s``, ``y`` (``z``), ``g`` (``z_g``); the last entry is
        ``<g, z_g>``. Applies ``H0`` to ``g`` (the new ``z`` is the change of ``z_g``)."""
        xp = self.xp
        rows = self._rows_for(slot)
        s_new, y_new = self.pair_rows(slot)
        new = [s_new, y_new]
        extra = [g]
        if self.H0 is not None:
            zg_new = xp.asarray(self.apply_h0(g))
            z_new = self.vectors[self.z_row(slot), :]
            xp.subtract(zg_new, self.zg, out=z_new)
            self.zg[...] = zg_new
            new.append(z_new)
            extra.append(self.zg)
        columns = new + extra
        if self.inner is None:
            stacked = xp.stack(columns)
            table = np.concatenate([to_host(self.vectors[:rows, :] @ stacked.T),
                                    to_host(xp.stack(extra) @ stacked.T)])
        else:
            vectors = [self.vectors[r, :] for r in range(rows)] + extra
            table = np.array([[self.dot(u, v) for v in columns] for u in vectors])
        return np.append(table.ravel(), table[rows, -1])  # <g, z_g> (or <g, g>)

    def absorb(self, products: np.ndarray, slot: int, eps: float) -> bool:
        """Take the summed :meth:`local_products`; store the pair when ``<s, y>`` exceeds
        ``eps <y, z>`` and every product is finite."""
        rows = self._rows_for(slot)
        columns = self._columns(slot)
        index = list(range(rows)) + [self.g_index] + ([self.zg_index] if self.H0 else [])
        table = products[:-1].reshape(len(index), len(columns))
        gram = self.gram
        n_pair = len(columns) - (2 if self.H0 is not None else 1)
        for k in range(n_pair, len(columns)):  # g and z_g: always current
            gram[index, columns[k]] = gram[columns[k], index] = table[:, k]
        s_i, y_i = index.index(self.s_row(slot)), index.index(self.y_row(slot))
        sy, yz = table[s_i, 1], table[y_i, n_pair - 1]  # <s, y> and <y, z> (z = y: <y, y>)
        accept = bool(np.isfinite(table[:, :n_pair]).all() and sy > eps * yz and yz > 0)
        if accept:
            for k in range(n_pair):
                gram[index, columns[k]] = gram[columns[k], index] = table[:, k]
            self.order.append(slot)
            if len(self.order) > self.history:
                self.order.pop(0)
            self.rows_used = rows
        return accept

    # -- the two-loop on scalars -----------------------------------------------------
    def _active(self) -> list[int]:
        active = [self.g_index] + ([self.zg_index] if self.H0 is not None else [])
        for slot in self.order:
            active += [self.s_row(slot), self.y_row(slot)]
            if self.H0 is not None:
                active.append(self.z_row(slot))
        return active

    def direction_coefficients(self) -> np.ndarray:
        """``delta`` with ``d = -H g = sum_j delta_j b_j`` (two-loop recursion with the
        initial matrix ``gamma H0``)."""
        gram = self.gram
        active = self._active()
        delta = np.zeros(gram.shape[0])
        delta[self.g_index] = -1.0

        def dot_with(row: int) -> float:
            return float(delta[active] @ gram[active, row])

        rho = {slot: 1.0 / gram[self.s_row(slot), self.y_row(slot)] for slot in self.order}
        alpha = {}
        for slot in reversed(self.order):
            alpha[slot] = rho[slot] * dot_with(self.s_row(slot))
            delta[self.y_row(slot)] -= alpha[slot]
        gamma = 1.0
        if self.order:
            newest = self.order[-1]
            gamma = (gram[self.s_row(newest), self.y_row(newest)]
                     / gram[self.y_row(newest), self.z_row(newest)])
        if self.H0 is not None:  # q (in g and the y's) -> gamma H0 q (in z_g and the z's)
            mapped = np.zeros_like(delta)
            mapped[self.zg_index] = gamma * delta[self.g_index]
            for slot in self.order:
                mapped[self.z_row(slot)] = gamma * delta[self.y_row(slot)]
            delta = mapped
        else:
            delta *= gamma
        for slot in self.order:
            beta = rho[slot] * dot_with(self.y_row(slot))
            delta[self.s_row(slot)] += alpha[slot] - beta
        return delta

    def dot_g(self, delta: np.ndarray) -> float:
        active = self._active()
        return float(delta[active] @ self.gram[active, self.g_index])

    def norm2(self, delta: np.ndarray) -> float:
        """The squared length of ``d`` for the first step: ``<d, H0^-1 d>`` with ``H0``
        (there ``d`` is a multiple of ``z_g``), ``<d, d>`` without."""
        if self.H0 is not None:
            return float(delta[self.zg_index] ** 2 * self.gram[self.g_index, self.zg_index])
        active = self._active()
        return float(delta[active] @ self.gram[np.ix_(active, active)] @ delta[active])

    def combine(self, delta: np.ndarray, g: Any, out: Any) -> Any:
        """``d = sum_j delta_j b_j`` into ``out``."""
        xp, rows = self.xp, self.rows_used
        out[...] = 0
        if rows and np.any(delta[:rows]):
            matmul_into(xp.asarray(delta[:rows], dtype=self.vectors.dtype),
                        self.vectors[:rows, :], out)
        if delta[self.g_index]:
            out += float(delta[self.g_index]) * g
        if self.H0 is not None and delta[self.zg_index]:
            out += float(delta[self.zg_index]) * self.zg
        return out
