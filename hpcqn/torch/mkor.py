"""MKOR / MKOR-H for torch models: a ``torch.optim.Optimizer`` that preconditions the
gradients of ``nn.Linear`` and ``nn.Conv2d`` layers with rank-1-updated Kronecker-factor
inverses (:class:`hpcqn.optimizers.mkor.MKOR`) and hands them to a first-order optimizer.

One ``step()``:

1. gradients are averaged over the communicator (one allreduce, as
   :func:`hpcqn.torch.average_gradients`);
2. on update steps (every ``inv_freq`` steps, starting with the first) the hooks have
   recorded each layer's inputs and output gradients during forward/backward; per layer
   ``a`` = mean input row (entries clamped to ``+-clamp``), ``g`` = mean output-gradient
   row times the batch size (undoing the ``1/B`` of a mean loss) divided by the AMP loss
   scale; all layers' ``a`` and ``g`` go in ONE allreduce; the factor inverses take one
   Sherman-Morrison step each;
3. each layer's gradient ``[W | b]`` becomes ``Linv G Rinv`` rescaled to ``||G||``;
4. the first-order optimizer (``"sgd"`` with momentum, ``"adam"``, ``"lamb"`` or a
   ``torch.optim.Optimizer`` over the model's parameters) steps.

``param_groups`` are the first-order optimizer's own, so learning-rate schedulers work on
this object. With ``hybrid=True`` (MKOR-H), ``step(loss=...)`` takes the rank's loss; its
global mean drives :class:`hpcqn.optimizers.mkor.HybridSwitch`, and after the switch the
steps are plain first-order steps (no hooks, no factor work).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

from .. import backend
from ..comm import Communicator, get_comm
from ..optimizers.mkor import MKOR as CoreMKOR
from ..optimizers.mkor import HybridSwitch
from .capture import LayerCapture, grad_matrix, set_grad_matrix
from .data import average_gradients, check_same_parameters
from .lamb import LAMB

OPTIMIZERS = ("sgd", "adam", "lamb")


def first_order(name: str, params: list[torch.Tensor], lr: float,
                options: Mapping[str, Any]) -> torch.optim.Optimizer:
    """``"sgd"`` (momentum 0.9 unless given), ``"adam"`` or ``"lamb"`` over ``params``."""
    options = dict(options)
    if "betas" in options:
        options["betas"] = tuple(options["betas"])
    if name == "sgd":
        options.setdefault("momentum", 0.9)
        return torch.optim.SGD(params, lr=lr, **options)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, **options)
    if name == "lamb":
        return LAMB(params, lr=lr, **options)
    raise ValueError(f"optimizer must be one of {OPTIMIZERS} or a torch.optim.Optimizer, "
                     f"got {name!r}")


class MKOR(torch.optim.Optimizer):
    def __init__(
        self,
        model: nn.Module,
        comm: Any = None,
        optimizer: str | torch.optim.Optimizer = "sgd",
        lr: float = 0.1,
        inv_freq: int = 10,
        gam: float = 0.95,
        eps_stab: float = 2.0,
        zeta: float = 0.9,
        placement: str = "redundant",
        factor_dtype: str | None = None,
        stats_dtype: str | None = None,
        skip_layers: Iterable[str] = (),
        clamp: float = 100.0,
        grad_scaler: Any = None,
        hybrid: bool = False,
        hybrid_window: int = 50,
        hybrid_threshold: float = 0.01,
        optimizer_options: Mapping[str, Any] | None = None,
    ):
        self.comm: Communicator = get_comm(comm)
        self.model = model
        self.capture = LayerCapture(model, skip_layers)
        params = [p for p in model.parameters() if p.requires_grad]
        dtypes = {p.dtype for p in params}
        devices = {p.device for p in params}
        if len(dtypes) != 1 or len(devices) != 1:
            raise TypeError(f"MKOR needs all parameters on one device with one dtype, got "
                            f"dtypes {sorted(map(str, dtypes))} and devices "
                            f"{sorted(map(str, devices))}")
        dtype = dtypes.pop()
        if dtype not in (torch.float32, torch.float64):
            raise TypeError(f"MKOR needs float32 or float64 parameters, got {dtype}; keep "
                            f"float32 weights and use torch.autocast for half precision")
        if not clamp > 0:
            raise ValueError(f"clamp must be positive, got {clamp}")
        if grad_scaler is not None and not callable(getattr(grad_scaler, "get_scale", None)):
            raise TypeError("grad_scaler must have get_scale() (a torch.amp.GradScaler)")
        xp = backend.namespace(backend.from_dlpack(params[0].detach()))
        self.core = CoreMKOR(self.capture.shapes, self.comm, inv_freq=inv_freq, gam=gam,
                             eps_stab=eps_stab, zeta=zeta, placement=placement,
                             factor_dtype=factor_dtype, stats_dtype=stats_dtype,
                             dtype=np.float64 if dtype == torch.float64 else np.float32, xp=xp)
        if isinstance(optimizer, torch.optim.Optimizer):
            if optimizer_options:
                raise ValueError("optimizer_options apply only when optimizer is a name")
            self.inner = optimizer
        elif isinstance(optimizer, str):
            self.inner = first_order(optimizer, params, lr, optimizer_options or {})
        else:
            raise TypeError(f"optimizer must be one of {OPTIMIZERS} or a "
                            f"torch.optim.Optimizer, got {type(optimizer).__name__}")
        super().__init__(self.inner.param_groups, {})  # the same group dicts: shared lr
        self.clamp = float(clamp)
        self.grad_scaler = grad_scaler
        self.switch = HybridSwitch(hybrid_window, hybrid_threshold) if hybrid else None
        self.steps = 0
        self._reported: set[str] = set()
        check_same_parameters(params, self.comm)
        self.capture.active = True  # step 0 updates the factors

    # -- what a step does --------------------------------------------------------------
    def zero_grad(self, set_to_none: bool = True) -> None:
        """Also forgets the statistics recorded since the last step (a step skipped by a
        GradScaler must not hand its rows to the next one)."""
        super().zero_grad(set_to_none)
        self.capture.clear()

    @property
    def preconditioning(self) -> bool:
        return self.switch is None or not self.switch.switched

    def _statistics(self) -> list[Any]:
        """This rank's ``(a_sum, count, g)`` per layer (None where hooks did not fire)."""
        scale = float(self.grad_scaler.get_scale()) if self.grad_scaler is not None else 1.0
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

    def _report_missing(self, stats: list[Any]) -> None:
        names = [n for n, s in zip(self.capture.names, stats, strict=True)
                 if s is None and n not in self._reported]
        if names:
            self._reported.update(names)
            if self.comm.rank == 0:
                warnings.warn(f"MKOR: layers {names} recorded no forward/backward on any rank "
                              f"(or non-finite statistics) at update step {self.steps}; "
                              f"their factors are not updated then",
                              RuntimeWarning, stacklevel=3)

    @torch.no_grad()
    def step(self, closure: Any = None, loss: Any = None) -> None:  # type: ignore[override]
        """One step from the gradients in ``.grad`` (this rank's part of the batch).
        ``loss``: this rank's loss, required with ``hybrid=True``."""
        if closure is not None:
            raise TypeError("MKOR.step does not take a closure: call backward() first, "
                            "then step()")
        if self.switch is not None and loss is None:
            raise ValueError("MKOR with hybrid=True needs step(loss=...) (this rank's loss)")
        average_gradients(self.capture.params() + self._other_params(), self.comm)
        if self.preconditioning:
            if self.core.is_update_step(self.steps):
                reduced = self.core.reduce_statistics(self._statistics())
                self._report_missing(reduced)  # the same list on every rank
                self.core.update_factors(reduced)
            self._precondition()
        self.capture.clear()
        self.inner.step()
        if self.switch is not None:
            total, _ = self.comm.allreduce_scalars([float(loss)])
            if self.switch.observe(total[0] / self.comm.size) and self.comm.rank == 0:
                print(f"MKOR-H: switched to the first-order optimizer after step "
                      f"{self.switch.switched_at}", flush=True)
        self.steps += 1
        self.capture.active = self.preconditioning and self.core.is_update_step(self.steps)

    def _other_params(self) -> list[torch.Tensor]:
        """Parameters outside the preconditioned layers (averaged, not preconditioned)."""
        mine = {id(p) for p in self.capture.params()}
        return [p for p in self.model.parameters() if id(p) not in mine and p.requires_grad]

    def _precondition(self) -> None:
        grads, present = [], []
        for (_, module), shape in zip(self.capture.layers, self.core.shapes, strict=True):
            g = grad_matrix(module)
            present.append(g is not None)
            if g is None:  # unused layer: zeros keep owner mode's allgather in step
                g = module.weight.new_zeros(shape)
            grads.append(backend.from_dlpack(g.contiguous()))
        directions = self.core.precondition(grads)
        for (_, module), d, used in zip(self.capture.layers, directions, present, strict=True):
            if used:
                set_grad_matrix(module, torch.from_dlpack(d))

    # -- state ---------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The first-order optimizer's state plus the factors this rank keeps (by layer
        name), step counter and hybrid-switch state."""
        core = self.core.state_dict()
        names = self.capture.names
        return {
            "inner": self.inner.state_dict(),
            "hpcqn": {
                "kind": "MKOR", "steps": self.steps, "layers": names,
                "shapes": [list(s) for s in self.core.shapes],
                "placement": self.core.placement,
                "updates": core["updates"],
                "missing": {names[k]: v for k, v in core["missing"].items()},
                "factors": {names[k]: {side: {key: backend.to_host(value)
                                              if hasattr(value, "shape") else value
                                              for key, value in factor.items()}
                                       for side, factor in pair.items()}
                            for k, pair in core["factors"].items()},
                "hybrid": None if self.switch is None else self.switch.state_dict(),
            },
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        ours = state_dict.get("hpcqn") if isinstance(state_dict, dict) else None
        if not ours or ours.get("kind") != "MKOR":
            raise ValueError("not an hpcqn.torch.MKOR state_dict")
        names = self.capture.names
        if list(ours["layers"]) != names or [tuple(s) for s in ours["shapes"]] != [
                tuple(s) for s in self.core.shapes]:
            raise ValueError(f"the saved state is for layers {list(ours['layers'])} with shapes "
                             f"{ours['shapes']}, this model has {names} with shapes "
                             f"{[list(s) for s in self.core.shapes]}")
        if (ours["hybrid"] is None) != (self.switch is None):
            raise ValueError("the saved state and this optimizer differ in hybrid=")
        index = {name: k for k, name in enumerate(names)}
        self.core.load_state_dict({
            "updates": ours["updates"],
            "missing": {index[n]: v for n, v in ours["missing"].items()},
            "factors": {index[n]: pair for n, pair in ours["factors"].items()},
        })
        if self.switch is not None:
            self.switch.load_state_dict(ours["hybrid"])
        self.inner.load_state_dict(state_dict["inner"])
        self.param_groups = self.inner.param_groups  # torch replaced the group dicts
        self.steps = int(ours["steps"])
        self.capture.clear()
        self.capture.active = self.preconditioning and self.core.is_update_step(self.steps)
