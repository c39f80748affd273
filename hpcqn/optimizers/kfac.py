"""K-FAC on backend arrays, model-agnostic, as the second-order baseline the papers
compare against (KAISA; docs/algorithms.md, section 4).

A layer is a gradient matrix ``(d_out, d_in)`` (a bias folded in as the last input
column). Per layer K-FAC keeps running averages of its two Kronecker factors

    A = E[a a^T]  (d_in x d_in, input rows a),   G = E[g g^T]  (d_out x d_out),

where ``g`` are the output-gradient rows of the per-sample loss (a mean loss's rows times
its samples ``N``, the batch size for a classifier's, the tokens for a language
model's); both start at the identity and move as ``F = decay F + (1 - decay) F_new``
every ``factor_freq`` steps. Every ``inv_freq`` steps the owner of a layer inverts the
damped factors, and preconditions

    method="inverse":  D = (G + damping I)^-1 grad (A + damping I)^-1
    method="eigen":    D = Q_G [(Q_G^T grad Q_A) / (d_G d_A^T + damping)] Q_A^T

(``A = Q_A diag(d_A) Q_A^T``, the same for ``G``: the inverse of ``G (x) A + damping I``).
(the formulas: :mod:`hpcqn.curvature.kfac_factors`). Then the KL clip
(:func:`~hpcqn.curvature.kfac_factors.kl_clip_scale`) scales every layer's ``D`` by
``min(1, sqrt(kl_clip / (lr^2 sum_layers <D, grad>)))``.

Default ``damping=0.03`` (KAISA's 1e-3 does not carry over: ``G`` here is built from
per-sample gradients, docs/algorithms.md 4.8). Measured on the digits MLP, CNN,
autoencoder (64-32-16-32-64) and a deep autoencoder (64-256-128-32-128-256-64), the
jobs' epochs (15/15/20/20), batch 64, cosine schedule, SGD momentum 0.9,
``method="inverse"``, each damping with the best lr of {0.01, 0.03, 0.1, 0.3, 1} by the
worse of seeds 0 and 1, final training loss:

    damping   MLP      CNN      AE      deep AE
    1e-4      620      0.11     0.055   0.11
    1e-3      95       0.086    0.026   0.040
    1e-2      1.7e-3   1.0e-3   0.011   6.5e-3
    0.03      1.8e-4   2.2e-6   0.0095  2.2e-3
    0.1       4.6e-5   8.4e-7   0.010   2.7e-3
    0.3       2.4e-4   2.9e-5   0.025   8.7e-3
    1         0.012    1.0e-3   0.064   0.037

1e-3 is among the three worst on every problem (the MLP diverges at it); 0.03 and 0.1
are the best two on every problem, and at the torch front end's default ``lr=0.1`` 0.03
is the best on three of the four (0.1 needs ``lr`` near 1). ``factor_decay``,
``inv_freq`` and ``kl_clip`` (torch front end) keep KAISA's values: none was the worst of
a small grid (0.9/0.95/0.99; 10/50; 0/1e-3/1e-2) at ``damping=0.03`` (``kl_clip=0``
diverges; 1e-2 did better than 1e-3 on the MLP and CNN, equal on the autoencoder).

Distribution: every layer's new ``A`` and ``G`` sums travel in ONE allreduce per factor
step (``O(sum d^2)`` numbers, which is K-FAC's communication cost against MKOR's
``O(sum d)``); placement as :mod:`hpcqn.optimizers.layerwise` (owner greedy by
``d_in^3 + d_out^3``, the inversion work).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from .. import options
from ..backend import astype
from ..curvature.kfac_factors import (
    damped_eigh,
    damped_inverse,
    factors_from_sums,
    kl_clip_scale,
    precondition_eigen,
    precondition_inverse,
    running_average,
)
from ..options import Rule
from .layerwise import PLACEMENTS, LayerwisePreconditioner, Stats

METHODS = ("inverse", "eigen")
# damped_inverse, damped_eigh and kl_clip_scale live in hpcqn.curvature.kfac_factors;
# imported here, where they were, so that old imports keep working.
__all__ = ["KFAC", "METHODS", "PLACEMENTS", "damped_inverse", "damped_eigh", "kl_clip_scale"]


class KFAC(LayerwisePreconditioner):
    """Running factors, damped inverses and preconditioning for
    ``shapes = [(d_out, d_in), ...]``."""

    name = "K-FAC"
    OPTION_RULES = {
        "factor_freq": Rule("int", low=1), "inv_freq": Rule("int", low=1),
        "factor_decay": Rule("float", low=0.0, high=1.0, open_high=True),
        "damping": Rule("float", low=0.0, open_low=True),
        "method": Rule("str", choices=METHODS),
    }

    def __init__(
        self,
        shapes: Sequence[tuple[int, int]],
        comm: Any = None,
        factor_freq: int = 1,
        inv_freq: int = 10,
        factor_decay: float = 0.95,
        damping: float = 0.03,
        method: str = "inverse",
        placement: str = "redundant",
        dtype: Any = np.float32,
        xp: Any = np,
    ):
        options.validate(self, locals())
        if inv_freq % factor_freq:
            raise ValueError(f"inv_freq ({inv_freq}) must be a multiple of factor_freq "
                             f"({factor_freq})")
        super().__init__(shapes, comm, placement, lambda o, i: o**3 + i**3, dtype, xp)
        self.factor_freq, self.inv_freq = int(factor_freq), int(inv_freq)
        self.factor_decay, self.damping, self.method = float(factor_decay), float(damping), method
        self.factors = {k: self._identity_factors(k) for k in self.kept}
        self.inverses: dict[int, dict[str, Any]] = {}
        self.factor_updates = 0
        self.inverse_updates = 0
        self.missing: dict[int, int] = {}  # layer -> factor steps it had no statistics

    def _identity_factors(self, k: int) -> dict[str, Any]:
        d_out, d_in = self.shapes[k]
        eye, dtype = self.xp.eye, self.array_dtype
        return {"A": eye(d_in, dtype=dtype), "G": eye(d_out, dtype=dtype)}

    def is_factor_step(self, step: int) -> bool:
        return step % self.factor_freq == 0

    def is_inverse_step(self, step: int) -> bool:
        return step % self.inv_freq == 0

    # -- statistics and factors ----------------------------------------------------------
    def reduce_statistics(self, stats: Sequence[Stats | None]) -> list[tuple[Any, Any] | None]:
        """Global ``(A_new, G_new)`` per layer from this rank's ``(A_sum, rows, G_sum,
        samples)`` (sums over its rows of ``a a^T`` and ``g g^T``, ``g`` the rows of the
        gradient of this rank's loss, and what its mean loss divided each row by; None
        where the layer saw no data here), in ONE allreduce. ``A_new = sum(a a^T) /
        rows``; ``G_new = (N/P)^2 sum(g g^T) / rows`` with ``N/P`` the mean samples over
        the ranks that had the layer: the data-parallel convention (the mean of the ranks'
        losses is the loss of the global batch, as :class:`hpcqn.torch.GlobalBatches`
        weights them) makes each row ``P/N`` times a per-sample gradient, on every rank,
        even or uneven split. None
        for a layer no rank had, or whose sums are not finite. Every rank calls it at
        every factor step."""
        for k, ((d_out, d_in), item) in enumerate(zip(self.shapes, stats, strict=False)):
            if item is not None and len(item) != 4:
                raise ValueError(f"layer {k}: K-FAC statistics are (A_sum, rows, G_sum, "
                                 f"batch), got {len(item)} entries")
            if item is not None and (tuple(item[0].shape) != (d_in, d_in)
                                     or tuple(item[2].shape) != (d_out, d_out)):
                raise ValueError(f"layer {k}: A has shape {tuple(item[0].shape)} and G "
                                 f"{tuple(item[2].shape)}, expected ({d_in}, {d_in}) and "
                                 f"({d_out}, {d_out})")
        widths = [(i * i, o * o) for o, i in self.shapes]
        reduced = self._allreduce_stats(stats, widths, self.dtype)
        result: list[tuple[Any, Any] | None] = []
        for (d_out, d_in), r in zip(self.shapes, reduced, strict=True):
            if r is None:
                result.append(None)
                continue
            x, rows, y, ranks, batch = r
            result.append(factors_from_sums(x.reshape(d_in, d_in), rows,
                                            y.reshape(d_out, d_out), ranks, batch))
        return result

    def update_factors(self, stats: Sequence[tuple[Any, Any] | None]) -> None:
        """``F = decay F + (1 - decay) F_new`` for every kept layer's ``A`` and ``G``."""
        decay = self.factor_decay
        for k in self.kept:
            item = stats[k]
            if item is None:
                self.missing[k] = self.missing.get(k, 0) + 1
                continue
            for key, new in zip(("A", "G"), item, strict=True):
                running_average(self.factors[k][key], new, decay)
        self.factor_updates += 1

    def update_inverses(self) -> None:
        """Invert (or eigendecompose) every kept layer's damped factors."""
        for k in self.kept:
            a, g = self.factors[k]["A"], self.factors[k]["G"]
            if self.method == "inverse":
                self.inverses[k] = {"A": damped_inverse(a, self.damping),
                                    "G": damped_inverse(g, self.damping)}
            else:
                (qa, da), (qg, dg) = damped_eigh(a), damped_eigh(g)
                self.inverses[k] = {"QA": qa, "dA": da, "QG": qg, "dG": dg}
        self.inverse_updates += 1

    # -- preconditioning -----------------------------------------------------------------
    def _precondition_one(self, k: int, grad: Any) -> Any:
        inv = self.inverses.get(k)
        if inv is None:
            raise RuntimeError("K-FAC: precondition before the first update_inverses()")
        grad = astype(grad, self.array_dtype, copy=False)
        if self.method == "inverse":
            return precondition_inverse(inv["G"], grad, inv["A"])
        return precondition_eigen(inv["QG"], inv["dG"], grad, inv["QA"], inv["dA"],
                                  self.damping)

    # -- state ---------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Counters and this rank's factors and inverses by layer id."""
        return {
            "factor_updates": self.factor_updates, "inverse_updates": self.inverse_updates,
            "skipped_steps": self.skipped_steps, "missing": dict(self.missing),
            "factors": {k: {**self.factors[k],
                            **{f"inv_{key}": v for key, v in self.inverses.get(k, {}).items()}}
                        for k in self.kept},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (collectively: any rank's failure raises on all)."""
        xp, dtype = self.xp, self.dtype
        inverse_keys = ("A", "G") if self.method == "inverse" else ("QA", "dA", "QG", "dG")

        def build(saved: dict[int, Any]) -> tuple[dict[int, Any], dict[int, Any]]:
            factors, inverses = {}, {}
            for k in self.kept:
                d_out, d_in = self.shapes[k]
                item = saved[k]
                factors[k] = {key: xp.asarray(item[key], dtype=dtype) for key in ("A", "G")}
                if factors[k]["A"].shape != (d_in, d_in) or factors[k]["G"].shape != (d_out,
                                                                                      d_out):
                    raise ValueError(f"layer {k}: saved factors do not fit shape "
                                     f"{self.shapes[k]}")
                present = [key for key in inverse_keys if f"inv_{key}" in item]
                if len(present) != len(inverse_keys) and (present
                                                          or int(state["inverse_updates"])):
                    raise ValueError(f"layer {k}: saved inverses {present} do not fit "
                                     f"method={self.method!r}")
                if present:
                    inverses[k] = {key: xp.asarray(item[f"inv_{key}"], dtype=dtype)
                                   for key in inverse_keys}
            return factors, inverses

        self.factors, self.inverses = self._load_collectively(state, build)
        self.factor_updates = int(state["factor_updates"])
        self.inverse_updates = int(state["inverse_updates"])
        self.skipped_steps = int(state.get("skipped_steps", 0))
        self.missing = {int(k): int(v) for k, v in state["missing"].items()}
