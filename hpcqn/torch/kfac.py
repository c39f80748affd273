"""K-FAC for torch models (KAISA's algorithm; docs/algorithms.md, section 4): a
``torch.optim.Optimizer`` that preconditions the gradients of ``nn.Linear`` and
``nn.Conv2d`` layers with damped inverses of running Kronecker factors
(:class:`hpcqn.optimizers.kfac.KFAC`) and hands them to a first-order optimizer. It shares
the hooks, the gradient averaging, the placement and the state envelope with
:class:`hpcqn.torch.MKOR` (:mod:`hpcqn.torch.layerwise`).

One ``step()``:

1. gradients are averaged over the communicator (one allreduce);
2. on factor steps (every ``factor_freq`` steps) the hooks have recorded each layer's input
   rows ``a`` (unfolded patches for a convolution, a ones column for a bias) and output
   gradient rows ``g`` (divided by the AMP loss scale; the reduction rescales them to
   per-sample gradients, undoing the ``1/N`` of a mean loss over ``N`` samples); this
   rank's sums of
   ``a a^T`` and ``g g^T`` over rows go, for all layers, in ONE allreduce; the running
   factors move; every ``inv_freq`` steps the owners invert the damped factors;
3. each layer's gradient ``[W | b]`` becomes ``(G + damping I)^-1 grad (A + damping I)^-1``
   (or the eigen form), and the KL clip scales all of them with the current ``lr``;
4. the first-order optimizer (SGD with momentum by default, as KAISA) steps.

The core's options (``factor_freq``, ``inv_freq``, ``factor_decay``, ``damping``,
``method``, ``placement``: :class:`hpcqn.optimizers.kfac.KFAC`) are passed through.

Unlike KAISA, ``G`` is built from per-sample output gradients (a mean loss's rows times
the layer's samples: a linear layer's rows, its tokens; a convolution's images;
:meth:`hpcqn.torch.capture.LayerCapture.samples`), so the factors do not depend on the
batch size, the rank count, the layout of a sequence's tokens or a split into
micro-batches; the
default ``damping`` is therefore 0.03, not KAISA's 1e-3 (the measurements:
:mod:`hpcqn.optimizers.kfac`). A job or script that gives ``damping`` keeps it; one that
relied on the old default gets 0.03, also when it resumes a checkpoint (the damping is
not part of the saved state: the saved factors are used as they are, inverses saved with
1e-3 until the next inversion step, at most ``inv_freq - 1`` steps later).

The hooks only keep references on factor steps (each layer's input and output gradient);
``sum a a^T`` and ``sum g g^T`` are built in the step
(:meth:`hpcqn.torch.capture.LayerCapture.second_moments`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from .. import backend, options
from ..curvature.kfac_factors import kl_clip_scale
from ..optimizers.kfac import KFAC as CoreKFAC
from ..options import Rule
from ..timing import phase
from . import conventions
from .layerwise import LayerwiseOptimizer


class KFAC(LayerwiseOptimizer):
    """K-FAC for ``model`` (see the module docs); ``**core_options``: those of
    :class:`hpcqn.optimizers.kfac.KFAC` (``factor_freq``, ``inv_freq``, ``factor_decay``,
    ``damping``, ``method``, ``placement``).

    Torch conventions, and where they cannot hold: see
    :class:`hpcqn.torch.layerwise.LayerwiseOptimizer`."""

    kind = "KFAC"
    OPTION_RULES = {"kl_clip": Rule("float", low=0.0)}
    OPTIONS_FROM = CoreKFAC

    @options.renames
    def __init__(
        self,
        model: nn.Module,
        comm: Any = None,
        optimizer: str | torch.optim.Optimizer = "sgd",
        lr: float = 0.1,
        kl_clip: float = 1e-3,
        skip_layers: Iterable[str] = (),
        grad_scaler: Any = None,
        optimizer_options: Mapping[str, Any] | None = None,
        divergence_steps: int = 10,
        divergence: str = "warn",
        verbose: bool = False,
        **core_options: Any,
    ):
        given = options.validate(
            self, {**locals(), "lr": conventions.learning_rate(lr, "hpcqn.torch.KFAC")})
        super().__init__(model, comm, optimizer, lr, skip_layers, grad_scaler,
                         optimizer_options, divergence_steps, divergence)
        self.core = CoreKFAC(self.capture.shapes, self.comm, dtype=self.np_dtype, xp=self.xp,
                             **core_options)
        self.kl_clip = float(kl_clip)
        self.last_clip = 1.0  # the KL-clip scale of the last step
        # step 0 updates the factors and the inverses
        self._start(given, optimizer_options, verbose)

    def capturing(self, step: int) -> bool:
        return self.core.is_factor_step(step)

    def _statistics(self) -> list[Any]:
        """This rank's ``(sum a a^T, rows, sum g g^T, batch)`` per layer (None where hooks
        did not fire); ``g``: output-gradient rows divided by the AMP loss scale."""
        scale = self.loss_scale()
        stats = []
        for name in self.capture.names:
            moments = self.capture.second_moments(name, scale)
            if moments is None:
                stats.append(None)
                continue
            a_sum, rows, g_sum, batch = moments
            stats.append((backend.from_dlpack(a_sum.contiguous()), float(rows),
                          backend.from_dlpack(g_sum.contiguous()), float(batch)))
        return stats

    def _update_curvature(self) -> bool:
        with phase(self.timer, "statistics"):
            reduced = self.core.reduce_statistics(self._statistics())
        if self.core.nonfinite_layers:  # the same on every rank: skip the step
            return False
        self._report_missing([r is not None for r in reduced])  # the same on every rank
        with phase(self.timer, "factors"):
            self.core.update_factors(reduced)
            if self.core.is_inverse_step(self.steps):
                self.core.update_inverses()
        return True

    def _adjust(self, directions: list[Any], grads: list[Any]) -> list[Any]:
        lr = float(self.param_groups[0]["lr"])
        self.last_clip = kl_clip_scale(directions, grads, lr, self.kl_clip)
        if self.last_clip != 1.0:
            for d in directions:
                d *= self.last_clip
        return directions

    # -- state ---------------------------------------------------------------------------
    def _extra_state(self) -> dict[str, Any]:
        """The factors and inverses this rank keeps (by layer name) and the counters."""
        core = self.core.state_dict()
        names = self.capture.names
        return {
            "method": self.core.method,
            "factor_updates": core["factor_updates"],
            "inverse_updates": core["inverse_updates"],
            "missing": {names[k]: v for k, v in core["missing"].items()},
            "factors": {names[k]: {key: self._host(v) for key, v in item.items()}
                        for k, item in core["factors"].items()},
        }

    def _load_extra(self, ours: dict[str, Any]) -> None:
        if ours["method"] != self.core.method:
            raise ValueError(f"the saved state is for method={ours['method']!r}, this "
                             f"optimizer uses {self.core.method!r}")
        index = {name: k for k, name in enumerate(self.capture.names)}
        self.core.load_state_dict({
            "factor_updates": ours["factor_updates"],
            "inverse_updates": ours["inverse_updates"],
            "missing": {index[n]: v for n, v in ours["missing"].items()},
            "factors": {index[n]: item for n, item in ours["factors"].items()},
        })
