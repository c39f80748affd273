"""Kronecker-factor inverses kept up to date by rank-1 Sherman-Morrison steps (MKOR,
Mozaffari et al., NeurIPS 2023; docs/algorithms.md, section 3.3).

A factor ``F`` (``d x d``, SPD) is never formed: only ``X = F^-1`` is stored. An update
with the vector ``v`` replaces ``F`` by ``gam F + (1 - gam) v v^T`` and ``X`` by its EXACT
inverse::

    u = X v
    X = (X - (1 - gam) u u^T / (gam + (1 - gam) v.u)) / gam

which stays symmetric positive definite for ``0 < gam < 1`` (the paper's printed formula
and the released code differ from this; see docs/algorithms.md, section 3.12). Before the update the
norm-based stabiliser pulls ``X`` towards the identity when ``max|X| > eps_stab``:
``X = zeta X + (1 - zeta) I``. Cost: ``O(d^2)``, a few passes over ``X`` (a
matrix-vector product, a scaling, a rank-1 update, the symmetrisation), against the
``O(d^3)`` inversion or eigendecomposition of K-FAC.

Storage may be float16 or bfloat16 (half the memory); arithmetic is then float32.
bfloat16 is kept as its raw 16 bits in a ``uint16`` array, so it works wherever the
array namespace has integers (NumPy has no bfloat16 type).
"""

from __future__ import annotations

import math
from types import ModuleType
from typing import Any

import numpy as np

from ..backend import astype, dtype_name, is_ndarray, namespace, norm, rank1_update, symmetrize

STORAGE = ("float32", "float64", "float16", "bfloat16")


def to_bfloat16_bits(a: Any) -> Any:
    """float32 -> the upper 16 bits of each value, rounded to nearest even (uint16)."""
    xp = namespace(a)
    bits = xp.ascontiguousarray(a, dtype=xp.float32).view(xp.uint32)
    rounding = xp.uint32(0x7FFF) + ((bits >> xp.uint32(16)) & xp.uint32(1))
    return ((bits + rounding) >> xp.uint32(16)).astype(xp.uint16)


def from_bfloat16_bits(b: Any) -> Any:
    """The inverse of :func:`to_bfloat16_bits` (exact)."""
    xp = namespace(b)
    return (b.astype(xp.uint32) << xp.uint32(16)).view(xp.float32)


def _diagonal(x: Any) -> Any:
    return x.reshape(-1)[:: x.shape[0] + 1]  # a view of the diagonal


def _max_diagonal(x: Any) -> float:
    """``max_i X_ii`` (read through a view for NumPy and CuPy)."""
    xp = namespace(x)
    return float(xp.max(_diagonal(x) if is_ndarray(x) else xp.linalg.diagonal(x)))


def _add_to_diagonal(x: Any, value: float) -> None:
    """``X += value I`` in place (a strided view for NumPy and CuPy; the standard has no
    views, so other namespaces add a scaled identity)."""
    if is_ndarray(x):
        _diagonal(x)[...] += value
    else:
        x += value * namespace(x).eye(x.shape[0], dtype=x.dtype)


def stabilise(x: Any, eps_stab: float, zeta: float) -> bool:
    """``X = zeta X + (1 - zeta) I`` in place when ``max|X| > eps_stab``; returns whether
    it did. ``X`` is SPD, so its largest entry in absolute value is on the diagonal
    (``|X_ij| <= sqrt(X_ii X_jj)``): the test reads ``d`` numbers, not ``d^2``."""
    if not _max_diagonal(x) > eps_stab:
        return False
    x *= zeta
    _add_to_diagonal(x, 1.0 - zeta)
    return True


def sherman_morrison(x: Any, v: Any, gam: float, eps_stab: float = math.inf,
                     zeta: float = 0.9) -> bool:
    """The stabiliser (when ``max|X| > eps_stab``), then
    ``X = inv(gam inv(X) + (1 - gam) v v^T)``, in place, then symmetrised; returns whether
    the stabiliser fired. Fused: with ``X' = s X + t I`` (``s, t = zeta, 1 - zeta`` when the
    stabiliser fires, else ``1, 0``), ``u = X' v = s (X v) + t v`` and
    ``X_new = (s / gam) X + (t / gam) I - c u u^T``: one matrix-vector product, one
    scaling pass, one rank-1 pass and the symmetrisation."""
    fired = _max_diagonal(x) > eps_stab
    u = x @ v
    scale = 1.0
    if fired:
        u *= zeta
        u += (1.0 - zeta) * v
        scale = zeta
    denominator = gam + (1.0 - gam) * float(v @ u)
    x *= scale / gam
    if fired:
        _add_to_diagonal(x, (1.0 - zeta) / gam)
    rank1_update(x, -(1.0 - gam) / (gam * denominator), u)
    symmetrize(x)
    return fired


class FactorInverse:
    """One factor inverse ``X`` (``d x d``), identity at start, in ``storage`` precision."""

    def __init__(self, d: int, xp: ModuleType, dtype: Any, storage: str | None = None):
        name = dtype_name(dtype, xp)
        storage = storage or name
        if storage not in STORAGE:
            raise ValueError(f"factor storage must be one of {STORAGE}, got {storage!r}")
        self.d, self.xp, self.storage = int(d), xp, storage
        # Arithmetic in the model's precision, at least float32.
        self.compute_dtype = xp.float64 if name == "float64" else xp.float32
        self.stored = self._encode(xp.eye(self.d, dtype=self.compute_dtype))
        self.stabilised = 0  # how often the stabiliser fired

    def _encode(self, x: Any) -> Any:
        if self.storage == "bfloat16":
            return to_bfloat16_bits(x)
        return astype(x, getattr(self.xp, self.storage), copy=False)

    def matrix(self) -> Any:
        """``X`` in the compute precision (the stored array itself when they agree)."""
        if self.storage == "bfloat16":
            return from_bfloat16_bits(self.stored)
        return astype(self.stored, self.compute_dtype, copy=False)

    def update(self, v: Any, gam: float, eps_stab: float, zeta: float) -> bool:
        """Stabilise, then the Sherman-Morrison step with ``v``. Returns whether the
        stabiliser fired."""
        x = self.matrix()  # the stored array itself when no conversion is needed
        v = astype(v, self.compute_dtype, copy=False)
        fired = sherman_morrison(x, v, gam, eps_stab, zeta)
        if x is not self.stored:
            self.stored = self._encode(x)
        self.stabilised += int(fired)
        return fired

    def state_dict(self) -> dict[str, Any]:
        return {"stored": self.stored.copy(), "stabilised": self.stabilised}

    def load(self, saved: dict[str, Any]) -> None:
        stored = saved["stored"]
        if tuple(stored.shape) != (self.d, self.d) or np.dtype(stored.dtype) != np.dtype(
                self.stored.dtype):
            raise ValueError(f"saved factor has shape {tuple(stored.shape)} and dtype "
                             f"{stored.dtype}, expected ({self.d}, {self.d}) and "
                             f"{self.stored.dtype}")
        self.stored = self.xp.asarray(stored).copy()
        self.stabilised = int(saved["stabilised"])


def rescale_factor(norm_g: float, norm_d: float) -> float:
    """What ``D`` is multiplied by so that its norm is ``||G||``: ``||G|| / ||D||``, or 1
    (no rescaling) where ``||D||`` is 0 or not finite."""
    return norm_g / norm_d if norm_d > 0 and math.isfinite(norm_d) else 1.0


def precondition(linv: Any, grad: Any, rinv: Any) -> Any:
    """``D = Linv @ G @ Rinv`` rescaled to the Frobenius norm of ``G`` (a new array)."""
    d = linv @ grad @ rinv
    scale = rescale_factor(norm(grad), norm(d))
    if scale != 1.0:
        d *= scale
    return d
