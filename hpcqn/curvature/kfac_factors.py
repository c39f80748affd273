"""The formulas of K-FAC (KAISA; docs/algorithms.md, section 4) on backend arrays: running
Kronecker factors, their damped inverses and eigendecompositions, the two forms of
preconditioning and the KL clip. Pure functions (no communication): the distribution is
:class:`hpcqn.optimizers.kfac.KFAC`'s.

A layer is a gradient matrix ``(d_out, d_in)``; its factors are

    A = E[a a^T]  (d_in x d_in, input rows a),   G = E[g g^T]  (d_out x d_out),

``g`` the output-gradient rows of the per-sample loss.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import scipy.linalg

from ..backend import namespace

__all__ = ["damped_eigh", "damped_inverse", "factors_from_sums", "kl_clip_scale",
           "precondition_eigen", "precondition_inverse", "running_average"]


def factors_from_sums(a_sum: Any, rows: float, g_sum: Any, ranks: float,
                      batch: float) -> tuple[Any, Any]:
    """The new factors from all ranks' sums: ``A_new = sum(a a^T) / rows`` and
    ``G_new = (B/P)^2 sum(g g^T) / rows``, where ``B/P = batch / ranks`` is the mean batch
    size over the ``ranks`` that had the layer. Under the data-parallel convention (the
    mean of the ranks' losses is the loss of the global batch) each gradient row is
    ``P/B`` times a per-sample gradient, so ``G_new`` is the mean of per-sample
    ``g g^T``."""
    per_sample = (batch / ranks) ** 2  # (B/P)^2
    return a_sum / rows, g_sum * (per_sample / rows)


def running_average(factor: Any, new: Any, decay: float) -> None:
    """``F = decay F + (1 - decay) F_new``, in place."""
    factor *= decay
    factor += (1.0 - decay) * new


def damped_inverse(factor: Any, damping: float) -> Any:
    """``(F + damping I)^-1`` of a symmetric positive semi-definite ``F``: Cholesky
    (LAPACK potrf + potri) for NumPy arrays, the namespace's ``linalg.inv`` otherwise;
    when the Cholesky factorisation fails (``F`` indefinite by rounding) it falls back to
    the eigendecomposition with eigenvalues clipped at 0:
    ``Q diag(1 / (max(d, 0) + damping)) Q^T``."""
    xp = namespace(factor)
    d = factor.shape[0]
    m = factor + damping * xp.eye(d, dtype=factor.dtype)
    if xp is not np:
        return xp.linalg.inv(m)
    potrf, potri = scipy.linalg.lapack.get_lapack_funcs(("potrf", "potri"), (m,))
    c, info = potrf(m, lower=True, overwrite_a=True, clean=False)
    if info == 0:
        inverse, info = potri(c, lower=True, overwrite_c=True)
    if info != 0:
        q, values = damped_eigh(factor)
        return (q / (values + damping)) @ q.T
    lower = np.tril(inverse)
    return lower + np.tril(lower, -1).T


def damped_eigh(factor: Any) -> tuple[Any, Any]:
    """``(Q, d)`` with ``F = Q diag(d) Q^T`` and ``d`` clipped at 0 (a factor is PSD)."""
    xp = namespace(factor)
    values, q = xp.linalg.eigh(factor)
    return q, xp.maximum(values, 0.0)


def precondition_inverse(g_inverse: Any, grad: Any, a_inverse: Any) -> Any:
    """``D = (G + damping I)^-1 grad (A + damping I)^-1`` from the damped inverses
    (:func:`damped_inverse`)."""
    return g_inverse @ grad @ a_inverse


def precondition_eigen(qg: Any, dg: Any, grad: Any, qa: Any, da: Any, damping: float) -> Any:
    """``D = Q_G [(Q_G^T grad Q_A) / (d_G d_A^T + damping)] Q_A^T`` (the division
    elementwise), with ``A = Q_A diag(d_A) Q_A^T`` and ``G = Q_G diag(d_G) Q_G^T``
    (:func:`damped_eigh`): the inverse of ``G (x) A + damping I`` applied to ``grad``."""
    rotated = qg.T @ grad @ qa
    rotated /= dg[:, None] * da[None, :] + damping
    return qg @ rotated @ qa.T


def kl_clip_scale(directions: Sequence[Any], grads: Sequence[Any], lr: float,
                  kl_clip: float) -> float:
    """KAISA's KL clip: ``min(1, sqrt(kl_clip / |lr^2 sum_k <D_k, grad_k>|))`` (1 when the
    sum is 0 or not finite, or ``kl_clip`` is 0: no clipping)."""
    if not kl_clip:
        return 1.0
    total = sum(float((d * g).sum()) for d, g in zip(directions, grads, strict=True))
    vg = abs(total) * lr * lr
    if not vg > 0 or not math.isfinite(vg):
        return 1.0
    return min(1.0, math.sqrt(kl_clip / vg))
