"""MKOR and MKOR-H on backend arrays, model-agnostic (docs/algorithms.md, section 3).

A "layer" is a weight matrix ``W`` of shape ``(d_out, d_in)`` (a bias folded in as the
last input column, whose activation is 1). Per layer this keeps the inverses of its two
Kronecker factors, ``Linv`` (``d_out x d_out``) and ``Rinv`` (``d_in x d_in``), updated
every ``factor_freq`` steps by rank-1 Sherman-Morrison steps with the layer's mean output
gradient ``g`` and mean input ``a`` and the running-average decay ``factor_decay``
(:mod:`hpcqn.curvature.kronecker`), and turns a
gradient ``G`` into ``Linv G Rinv`` rescaled to ``||G||``, which a first-order optimizer
then takes as its gradient.

Update steps (:meth:`MKOR.is_update_step`, steps counted from 0): every step ``t`` with
``t < warmup_steps``, then every ``t`` with ``t % factor_freq == 0``. The warm-up is the
released code's (its ``warmup_steps``: 0 in its package, 10 in its ResNet-50 example):
the factors start at the identity, and a decay of ``factor_decay`` per update needs
about ``1 / (1 - factor_decay)`` updates before the rank-1 terms dominate it, which at
one update every ``factor_freq`` steps takes ``factor_freq / (1 - factor_decay)`` steps
(200 with the defaults); updating at every step first gets there in ``warmup_steps``.

``factor_freq`` and ``factor_decay`` were called ``inv_freq`` and ``gam``; the old names
are still accepted (deprecated), so that the names mean what K-FAC's do: K-FAC's
``factor_freq`` is how often statistics update the factors, its ``inv_freq`` how often
inverses are recomputed (MKOR has no such step: its inverses are the factors).

Distribution over the communicator:

- statistics: every layer's ``a`` and ``g`` travel in ONE allreduce per update step,
  ``O(sum of d_in + d_out)`` numbers (optionally in float16);
- placement (:mod:`hpcqn.optimizers.layerwise`): ``"redundant"`` (every rank updates
  every factor) or ``"owner"`` (greedy owner per layer by ``d_in^2 + d_out^2``; the
  preconditioned gradients are allgathered).

:class:`HybridSwitch` is the MKOR-H rule (the paper gives none): stop preconditioning
once the windowed mean of the globally averaged loss stops falling.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from .. import options
from ..backend import astype
from ..curvature.kronecker import STORAGE, FactorInverse, precondition
from ..options import Rule
from .layerwise import PLACEMENTS, LayerwisePreconditioner, Stats

__all__ = ["MKOR", "HybridSwitch", "PLACEMENTS", "STATS_DTYPES", "Stats"]
STATS_DTYPES = ("float16", "float32", "float64")


class MKOR(LayerwisePreconditioner):
    """Factor inverses and preconditioning for ``shapes = [(d_out, d_in), ...]``."""

    name = "MKOR"
    OPTION_RULES = {
        "factor_freq": Rule("int", low=1),
        "warmup_steps": Rule("int", low=0),
        "factor_decay": Rule("float", low=0.0, high=1.0, open_low=True, open_high=True),
        "eps_stab": Rule("float", low=0.0, open_low=True),
        "zeta": Rule("float", low=0.0, high=1.0, open_high=True),
        "factor_dtype": Rule("str", choices=STORAGE, none=True),
        "stats_dtype": Rule("str", choices=STATS_DTYPES, none=True),
    }
    DEPRECATED = {"gam": "factor_decay", "inv_freq": "factor_freq"}

    @options.renames
    def __init__(
        self,
        shapes: Sequence[tuple[int, int]],
        comm: Any = None,
        factor_freq: int = 10,
        factor_decay: float = 0.95,
        eps_stab: float = 2.0,
        zeta: float = 0.9,
        placement: str = "redundant",
        factor_dtype: str | None = None,
        stats_dtype: str | None = None,
        warmup_steps: int = 0,
        dtype: Any = np.float32,
        xp: Any = np,
    ):
        options.validate(self, locals())
        super().__init__(shapes, comm, placement, lambda o, i: o * o + i * i, dtype, xp)
        self.factor_freq, self.factor_decay = int(factor_freq), factor_decay
        self.warmup_steps = int(warmup_steps)
        self.eps_stab, self.zeta = eps_stab, zeta
        self.factor_dtype = factor_dtype
        self.stats_dtype = np.dtype(stats_dtype or self.dtype)
        self.factors = {k: self._new_factors(k) for k in self.kept}
        self.updates = 0  # update rounds done
        self.missing: dict[int, int] = {}  # layer -> update rounds it had no statistics

    def _new_factors(self, k: int) -> tuple[FactorInverse, FactorInverse]:
        d_out, d_in = self.shapes[k]
        return (FactorInverse(d_out, self.xp, self.dtype, self.factor_dtype),
                FactorInverse(d_in, self.xp, self.dtype, self.factor_dtype))

    def is_update_step(self, step: int) -> bool:
        """Whether step ``step`` (from 0) updates the factors: every step before
        ``warmup_steps``, then every ``factor_freq``-th."""
        return step < self.warmup_steps or step % self.factor_freq == 0

    # -- statistics ----------------------------------------------------------------------
    def reduce_statistics(self, stats: Sequence[Stats | None]) -> list[tuple[Any, Any] | None]:
        """Global ``(a, g)`` per layer from this rank's ``(a_sum, count, g)`` (``None``
        where the layer saw no data here) in ONE allreduce: ``a`` is the mean over all
        ranks' rows (weighted by ``count``), ``g`` the mean over the ranks that have one.
        With float16 statistics each rank sends its mean input row, and ``a`` is the
        unweighted mean over ranks (exact when ranks hold equal row counts). A layer whose
        reduced statistics are not finite gets None (its factors skip this update).
        Every rank calls it at every update step."""
        if self.stats_dtype == np.float16:  # a float16 sum of many rows overflows: send means
            stats = [None if s is None else (s[0] / s[1], 1.0, s[2]) for s in stats]
        for k, ((d_out, d_in), item) in enumerate(zip(self.shapes, stats, strict=False)):
            if item is not None and (item[0].shape != (d_in,) or item[2].shape != (d_out,)):
                raise ValueError(f"layer {k}: a has shape {item[0].shape} and g "
                                 f"{item[2].shape}, expected ({d_in},) and ({d_out},)")
        widths = [(i, o) for o, i in self.shapes]
        reduced = self._allreduce_stats(stats, widths, self.stats_dtype)
        return [None if r is None else (r[0] / r[1], r[2] / r[3]) for r in reduced]

    def update_factors(self, stats: Sequence[tuple[Any, Any] | None]) -> None:
        """One Sherman-Morrison update of every kept factor pair (``Linv`` with ``g``,
        ``Rinv`` with ``a``); layers without statistics are counted in ``missing``."""
        for k in self.kept:
            item = stats[k]
            if item is None:
                self.missing[k] = self.missing.get(k, 0) + 1
                continue
            a, g = item
            linv, rinv = self.factors[k]
            linv.update(g, self.factor_decay, self.eps_stab, self.zeta)
            rinv.update(a, self.factor_decay, self.eps_stab, self.zeta)
        self.updates += 1

    # -- preconditioning -----------------------------------------------------------------
    def _precondition_one(self, k: int, grad: Any) -> Any:
        """``Linv G Rinv`` rescaled to ``||G||``."""
        linv, rinv = self.factors[k]
        compute = linv.compute_dtype
        d = precondition(linv.matrix(), astype(grad, compute, copy=False), rinv.matrix())
        return astype(d, grad.dtype, copy=False)

    # -- state ---------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Counters and this rank's factors by layer id (plain arrays and numbers)."""
        return {
            "updates": self.updates,
            "skipped_steps": self.skipped_steps,
            "missing": dict(self.missing),
            "factors": {k: {"L": linv.state_dict(), "R": rinv.state_dict()}
                        for k, (linv, rinv) in self.factors.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (collectively: any rank's failure raises on all)."""

        def build(saved: dict[int, Any]) -> dict[int, tuple[FactorInverse, FactorInverse]]:
            fresh = {k: self._new_factors(k) for k in self.kept}
            for k in self.kept:
                fresh[k][0].load(saved[k]["L"])
                fresh[k][1].load(saved[k]["R"])
            return fresh

        self.factors = self._load_collectively(state, build)
        self.updates = int(state["updates"])
        self.skipped_steps = int(state.get("skipped_steps", 0))
        self.missing = {int(k): int(v) for k, v in state["missing"].items()}


class HybridSwitch:
    """MKOR-H: switch to the first-order optimizer when second-order updates stop
    helping. Rule (hpcqn's; the paper gives none): after every step, with the globally
    averaged loss ``l_t``, compare the mean of the last ``window`` losses with the mean
    of the ``window`` before them; once their relative decrease
    ``(previous - last) / |previous|`` is below ``threshold``, switch for good. The
    losses are identical on every rank, so every rank switches at the same step."""

    OPTION_RULES = {"window": Rule("int", low=1), "threshold": Rule("float", low=0.0)}

    def __init__(self, window: int = 50, threshold: float = 0.01):
        options.validate(self, locals(), "MKOR-H switch")
        self.window, self.threshold = int(window), float(threshold)
        self.losses: list[float] = []
        self.steps = 0
        self.switched_at: int | None = None
        self.last_decrease = math.nan
        self.skipped_losses = 0  # non-finite losses left out of the window

    @property
    def switched(self) -> bool:
        return self.switched_at is not None

    def observe(self, loss: float) -> bool:
        """Record one step's global loss; True exactly at the step that switches. A
        non-finite loss counts the step but stays out of the window (one blown-up batch
        must not hold the switch off, or trigger it, for ``2 window`` steps): it is
        counted in ``skipped_losses``."""
        self.steps += 1
        if self.switched:
            return False
        if not math.isfinite(loss):
            self.skipped_losses += 1
            return False
        self.losses = (self.losses + [float(loss)])[-2 * self.window :]
        if len(self.losses) < 2 * self.window:
            return False
        previous = sum(self.losses[: self.window]) / self.window
        last = sum(self.losses[self.window :]) / self.window
        self.last_decrease = (previous - last) / abs(previous) if previous else 0.0
        if self.last_decrease < self.threshold:  # NaN (never with finite losses) does not
            self.switched_at = self.steps
            return True
        return False

    def state_dict(self) -> dict[str, Any]:
        return {"losses": np.array(self.losses, dtype=np.float64), "steps": self.steps,
                "switched_at": -1 if self.switched_at is None else self.switched_at,
                "window": self.window, "threshold": self.threshold}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if int(state["window"]) != self.window or float(state["threshold"]) != self.threshold:
            raise ValueError(f"saved hybrid rule (window {state['window']}, threshold "
                             f"{state['threshold']}) differs from this one ({self.window}, "
                             f"{self.threshold})")
        self.losses = [float(v) for v in state["losses"]]
        self.steps = int(state["steps"])
        switched_at = int(state["switched_at"])
        self.switched_at = None if switched_at < 0 else switched_at
