"""MKOR / MKOR-H for torch models: a ``torch.optim.Optimizer`` that preconditions the
gradients of ``nn.Linear`` and ``nn.Conv2d`` layers with rank-1-updated Kronecker-factor
inverses (:class:`hpcqn.optimizers.mkor.MKOR`) and hands them to a first-order optimizer.

One ``step()`` (the shared steps are :class:`hpcqn.torch.layerwise.LayerwiseOptimizer`'s):

1. gradients are averaged over the communicator (one allreduce);
2. on update steps (every step while fewer than ``warmup_steps`` have been taken, then
   every ``factor_freq`` steps counted from the first) the hooks have recorded each
   layer's inputs and output gradients during forward/backward; per layer ``a`` = mean
   input row (entries clamped to ``+-clamp``), ``g`` = mean output-gradient row times the
   layer's samples (undoing the ``1/N`` of a mean loss: a linear layer's rows, its tokens;
   a convolution's images; :meth:`hpcqn.torch.capture.LayerCapture.samples`) divided by
   the AMP loss scale; all
   layers' ``a`` and ``g`` go in ONE allreduce; the factor inverses take one
   Sherman-Morrison step each;
3. each layer's gradient ``[W | b]`` becomes ``Linv G Rinv`` rescaled to ``||G||``;
4. the first-order optimizer (``"sgd"`` with momentum, ``"adam"``, ``"lamb"`` or a
   ``torch.optim.Optimizer`` over the model's parameters) steps.

``param_groups`` are the first-order optimizer's own, so learning-rate schedulers work on
this object. With ``hybrid=True`` (MKOR-H), ``step(loss=...)`` takes the rank's loss; its
global mean drives :class:`hpcqn.optimizers.mkor.HybridSwitch`, and after the switch the
steps are plain first-order steps (no hooks, no factor work). A step skipped for a
non-finite gradient or statistics (:mod:`hpcqn.torch.layerwise`) reduces no loss and
leaves the switch as it was; a non-finite global loss is left out of the switch's window.

The core's options (``factor_freq``, ``warmup_steps``, ``factor_decay``, ``eps_stab``,
``zeta``, ``placement``, ``factor_dtype``, ``stats_dtype``:
:class:`hpcqn.optimizers.mkor.MKOR`;
``inv_freq`` and ``gam`` are their deprecated names) are passed through.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

from .. import backend, options
from ..curvature.kronecker import rescale_factor
from ..optimizers.mkor import MKOR as CoreMKOR
from ..optimizers.mkor import HybridSwitch
from ..options import Rule
from ..timing import phase
from . import conventions
from .layerwise import OPTIMIZERS, LayerwiseOptimizer, first_order

__all__ = ["MKOR", "OPTIMIZERS", "first_order"]


class MKOR(LayerwiseOptimizer):
    """MKOR / MKOR-H for ``model`` (see the module docs); ``**core_options``: those of
    :class:`hpcqn.optimizers.mkor.MKOR`.

    Torch conventions, and where they cannot hold: see
    :class:`hpcqn.torch.layerwise.LayerwiseOptimizer`.
    With ``hybrid=True`` and ``step(closure)``, the closure's loss is the switch's when
    ``loss=`` is not given."""

    kind = "MKOR"
    OPTION_RULES = {
        "clamp": Rule("float", low=0.0, open_low=True),
        "hybrid": Rule("bool"),
        "hybrid_window": HybridSwitch.OPTION_RULES["window"],
        "hybrid_threshold": HybridSwitch.OPTION_RULES["threshold"],
    }
    OPTIONS_FROM = CoreMKOR

    @options.renames
    def __init__(
        self,
        model: nn.Module,
        comm: Any = None,
        optimizer: str | torch.optim.Optimizer = "sgd",
        lr: float = 0.1,
        skip_layers: Iterable[str] = (),
        clamp: float = 100.0,
        grad_scaler: Any = None,
        hybrid: bool = False,
        hybrid_window: int = 50,
        hybrid_threshold: float = 0.01,
        optimizer_options: Mapping[str, Any] | None = None,
        divergence_steps: int = 10,
        divergence: str = "warn",
        verbose: bool = False,
        **core_options: Any,
    ):
        given = options.validate(
            self, {**locals(), "lr": conventions.learning_rate(lr, "hpcqn.torch.MKOR")})
        super().__init__(model, comm, optimizer, lr, skip_layers, grad_scaler,
                         optimizer_options, divergence_steps, divergence)
        self.core = CoreMKOR(self.capture.shapes, self.comm, dtype=self.np_dtype, xp=self.xp,
                             **core_options)
        self.clamp = float(clamp)
        self.switch = HybridSwitch(hybrid_window, hybrid_threshold) if hybrid else None
        self._start(given, optimizer_options, verbose)  # step 0 updates the factors

    @property
    def preconditioning(self) -> bool:
        return self.switch is None or not self.switch.switched

    def capturing(self, step: int) -> bool:
        return self.core.is_update_step(step)

    def _check_loss(self, loss: Any) -> None:
        if self.switch is not None and loss is None:
            raise ValueError("MKOR with hybrid=True needs step(loss=...) (this rank's loss)")

    def _statistics(self) -> list[Any]:
        """This rank's ``(a_sum, count, g)`` per layer (None where hooks did not fire)."""
        scale = self.loss_scale()
        stats = []
        for name in self.capture.names:
            recorded = self.capture.rows(name)
            if recorded is None:
                stats.append(None)
                continue
            a_rows, g_rows, batch = recorded
            a_sum = a_rows.clamp(-self.clamp, self.clamp).sum(dim=0)
            g = g_rows.mean(dim=0) * (batch / scale)
            stats.append((backend.from_dlpack(a_sum.contiguous()), float(a_rows.shape[0]),
                          backend.from_dlpack(g.contiguous())))
        return stats

    def _update_curvature(self) -> bool:
        with phase(self.timer, "statistics"):
            reduced = self.core.reduce_statistics(self._statistics())
        if self.core.nonfinite_layers:  # the same on every rank: skip the step
            return False
        self._report_missing([r is not None for r in reduced])  # the same on every rank
        with phase(self.timer, "factors"):
            self.core.update_factors(reduced)
        return True

    # -- preconditioning in place -------------------------------------------------------
    def _precondition(self) -> None:
        """Every layer's ``Linv G Rinv`` rescaled to ``||G||``, written into ``.grad``.

        With ``placement="redundant"`` and factors stored in the compute precision (the
        defaults) the products run on the factors' arrays (NumPy or CuPy) and zero-copy
        views of the gradients: per layer one concatenation ``[W.grad | b.grad]`` and two
        products whose results are written straight into the weight's and the bias's
        gradients, and for all layers together one fused torch norm of the gradients
        before, one after and one fused rescale. The products stay on the factors'
        library on purpose: on this project's AMD development machine torch's MKL runs a
        ``1581 x 1581`` product 1.5x slower than NumPy's OpenBLAS. Otherwise (owner
        placement, half-precision factors, gradients that cannot be written in place) it
        is the core's path (:meth:`LayerwisePreconditioner.precondition`); the two give
        the same steps to rounding (tested)."""
        plan = self._inplace_plan()
        if plan is None:
            super()._precondition()
            return
        if not plan:  # no preconditioned layer has a gradient this step
            return
        with phase(self.timer, "precondition"):
            # Each layer's weight gradient, then its bias's (if any); owner: its layer.
            targets, owner = [], []
            for k, (module, _, _) in enumerate(plan):
                targets.append(module.weight.grad)
                owner.append(k)
                if module.bias is not None:
                    targets.append(module.bias.grad)
                    owner.append(k)
            # ||G|| per layer from one fused norm, before anything is overwritten.
            before = torch.stack(torch._foreach_norm(targets)).tolist()
            xp = backend.namespace(plan[0][1])
            # Zero-copy views of the gradients: .numpy() on the CPU (a fifth of DLPack's
            # per-call cost), DLPack (CuPy) on a GPU.
            view = (torch.Tensor.numpy if xp is np else backend.from_dlpack)
            for module, linv, rinv in plan:
                wg = view(module.weight.grad)
                wg = wg.reshape(wg.shape[0], -1)  # a view: the gradient is contiguous
                n_w = wg.shape[1]
                if module.bias is None:
                    t = linv @ wg
                else:
                    bg = view(module.bias.grad)
                    t = linv @ xp.concatenate([wg, bg[:, None]], axis=1)
                    xp.matmul(t, rinv[:, n_w], out=bg)
                xp.matmul(t, rinv[:, :n_w], out=wg)
            after = torch.stack(torch._foreach_norm(targets)).tolist()
            g_squares, d_squares = [0.0] * len(plan), [0.0] * len(plan)
            for k, g_part, d_part in zip(owner, before, after, strict=True):
                g_squares[k] += g_part * g_part
                d_squares[k] += d_part * d_part
            scales = [rescale_factor(math.sqrt(g_square), math.sqrt(d_square))
                      for g_square, d_square in zip(g_squares, d_squares, strict=True)]
            torch._foreach_mul_(targets, [scales[k] for k in owner])

    def _inplace_plan(self) -> list[tuple[nn.Module, Any, Any]] | None:
        """``(module, Linv, Rinv)`` per layer with a gradient, or None where the in-place
        path does not apply (see :meth:`_precondition`)."""
        if (self.core.placement != "redundant" or not hasattr(torch, "_foreach_norm")
                or not hasattr(torch, "_foreach_mul_")):
            return None
        plan = []
        for k, (_, module) in enumerate(self.capture.layers):
            weight, bias = module.weight, module.bias
            if weight.grad is None:
                continue  # an unused layer keeps no gradient (as the core's path)
            grads = [weight.grad] if bias is None else [weight.grad, bias.grad]
            if any(g is None or not g.is_contiguous() or g.requires_grad for g in grads):
                return None  # a frozen bias, a strided or a differentiable gradient
            factors = self.core.factors[k]
            linv, rinv = (factor.matrix() for factor in factors)
            if (linv is not factors[0].stored or rinv is not factors[1].stored
                    or not backend.is_ndarray(linv) or np.dtype(linv.dtype) != self.np_dtype):
                return None  # half-precision storage (the core converts) or another dtype
            plan.append((module, linv, rinv))
        return plan

    def _after_step(self, loss: Any) -> None:
        """MKOR-H: the global mean loss to the switch (a non-finite one is left out of
        its window: :meth:`HybridSwitch.observe`)."""
        if self.switch is None:
            return
        with phase(self.timer, "communication"):
            total, _ = self.comm.allreduce_scalars([float(loss)])
        if self.switch.observe(total[0] / self.comm.size) and self.comm.rank == 0:
            print(f"MKOR-H: switched to the first-order optimizer after step "
                  f"{self.switch.switched_at}", flush=True)

    # -- state ---------------------------------------------------------------------------
    def _extra_state(self) -> dict[str, Any]:
        """The factors this rank keeps (by layer name) and the hybrid-switch state."""
        core = self.core.state_dict()
        names = self.capture.names
        return {
            "updates": core["updates"],
            "missing": {names[k]: v for k, v in core["missing"].items()},
            "factors": {names[k]: {side: {key: self._host(value)
                                          for key, value in factor.items()}
                                   for side, factor in pair.items()}
                        for k, pair in core["factors"].items()},
            "hybrid": None if self.switch is None else self.switch.state_dict(),
        }

    def _load_extra(self, ours: dict[str, Any]) -> None:
        if (ours["hybrid"] is None) != (self.switch is None):
            raise ValueError("the saved state and this optimizer differ in hybrid=")
        index = {name: k for k, name in enumerate(self.capture.names)}
        self.core.load_state_dict({
            "updates": ours["updates"],
            "missing": {index[n]: v for n, v in ours["missing"].items()},
            "factors": {index[n]: pair for n, pair in ours["factors"].items()},
        })
        if self.switch is not None:
            self.switch.load_state_dict(ours["hybrid"])
