"""What the torch front ends of the Kronecker-factored preconditioners (MKOR, K-FAC)
share: the layer hooks (:class:`hpcqn.torch.capture.LayerCapture`), the checks on the
model's parameters, the first-order optimizer that takes the preconditioned gradients
(its ``param_groups`` are this optimizer's, so learning-rate schedulers work), the
gradient averaging over the communicator, writing preconditioned gradients back, the
report of layers that recorded nothing, the phase timer and the torch-shaped
``state_dict`` (:mod:`hpcqn.torch.conventions`).

A step of a subclass:

1. gradients are averaged over the communicator (one allreduce, as
   :func:`hpcqn.torch.average_gradients`);
2. on statistics steps (``self.capturing(step)``) the hooks have recorded each layer's
   inputs and output gradients; the subclass turns them into its curvature statistics
   (:meth:`_update_curvature`);
3. each layer's gradient ``[W | b]`` is replaced by the core's preconditioned one
   (:meth:`_precondition`, then :meth:`_adjust` for e.g. K-FAC's KL clip);
4. the first-order optimizer steps.

A step whose averaged gradients (any layer, any rank: a NaN or Inf on one rank makes the
sum non-finite on every rank, so the check after the allreduce is already agreed) or
reduced statistics are not finite is skipped on every rank: factors, inverses, the
first-order optimizer's state, the step counter and the parameters stay as they were,
and ``skipped_steps`` counts it. Only then are the parameters checked (one small
reduction): if any rank's are not finite, every rank raises
:class:`hpcqn.torch.data.NonFiniteParameterError` naming the parameter and the rank.

After ``divergence_steps`` consecutive skipped steps rank 0 warns that the run has most
likely diverged (the learning rate is the usual cause), and again each time the count
doubles; ``divergence="raise"`` raises :class:`hpcqn.torch.data.DivergenceError` on
every rank instead.

At construction every rank must pass the same options (every declared option, the
first-order optimizer's options, the preconditioned layers) and the same model (the
parameters' count, shapes, dtypes and values): one small reduction checks all of it and
raises ``ValueError`` on every rank naming what differs.

Distributed training: the communicator is ``comm`` (an mpi4py communicator, a
``torch.distributed`` process group, or None for the world: :func:`hpcqn.get_comm`). A
``DistributedDataParallel`` model is accepted: its layers are found inside ``.module``
(their names are the plain model's), its gradients, which DDP averaged already, are not
averaged again, and with ``comm=None`` (no MPI launch) the statistics travel in DDP's
process group. An FSDP model is refused (``TypeError``).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

from .. import backend, options
from ..comm import Communicator, serial_comm
from ..options import Rule
from ..timing import PhaseTimer, phase
from . import conventions
from .capture import LayerCapture, grad_matrix, set_grad_matrix, unwrap
from .data import (
    DivergenceWatch,
    average_gradients,
    check_finite_parameters,
    check_same_parameters,
    model_comm,
)
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


class LayerwiseOptimizer(conventions.CopyableOptimizer, torch.optim.Optimizer):
    """Base class. Subclasses build ``self.core`` (a
    :class:`hpcqn.optimizers.layerwise.LayerwisePreconditioner`) in ``_build_core`` and
    implement ``capturing``, ``_update_curvature`` and the ``state_dict`` parts.
    Subclasses take the core's options as ``**core_options`` (``OPTIONS_FROM = Core``:
    :func:`hpcqn.options.declared` lists them, and the core checks them).

    Torch conventions (:mod:`hpcqn.torch.conventions`): ``param_groups``, ``state`` and
    ``defaults`` are the first-order optimizer's (schedulers, ``OneCycleLR``'s momentum
    too, reach it; ``opt.state[p]`` holds its state and a ``"step"`` count);
    ``step(closure)`` follows torch's contract (the closure must return the loss tensor);
    ``state_dict()`` is ``{"state", "param_groups"}`` of tensors and plain values, with
    hpcqn's state under ``["state"][0]["hpcqn"]``. Where they cannot hold: the parameters
    are the model's, fixed at construction (``add_param_group`` raises ``ValueError``: for
    several groups with their own ``lr``/``weight_decay`` pass ``optimizer=`` a
    ``torch.optim`` optimizer built over those groups); parameters must be float32 or
    float64, all of one dtype (half precision raises ``TypeError``: keep float32 weights
    with ``model.float()`` and use ``torch.autocast``; mixed dtypes: ``model.to(dtype)``);
    the hooks live on the model, so ``copy.deepcopy(opt)`` alone copies the model with it
    (copy both with ``copy.deepcopy([model, opt])``), and pickling raises ``TypeError``
    (save ``state_dict()`` with ``torch.save`` and ``load_state_dict`` it into a new
    optimizer); ``torch.compile(opt.step)`` runs the step eagerly (it calls NumPy and
    MPI, so dynamo is disabled for it)."""

    kind = "layerwise"
    OPTION_RULES = {
        "optimizer": Rule("str", choices=OPTIMIZERS, python=(torch.optim.Optimizer,)),
        "lr": Rule("float", low=0.0),
        "divergence_steps": Rule("int", low=1),
        "divergence": Rule("str", choices=DivergenceWatch.ACTIONS),
    }
    NOT_OPTIONS = ("model", "comm", "skip_layers", "grad_scaler", "optimizer_options",
                   "verbose")

    def __init__(self, model: nn.Module, comm: Any, optimizer: str | torch.optim.Optimizer,
                 lr: float, skip_layers: Iterable[str], grad_scaler: Any,
                 optimizer_options: Mapping[str, Any] | None, divergence_steps: int = 10,
                 divergence: str = "warn"):
        model, self.ddp = unwrap(model)
        self.comm: Communicator = model_comm(comm, self.ddp)
        # DDP averaged the gradients already: only their finiteness is checked (locally:
        # they are the same on every rank)
        self._averaging = serial_comm() if self.ddp is not None else self.comm
        self.model = model
        self.capture = LayerCapture(model, skip_layers)
        params = [p for p in model.parameters() if p.requires_grad]
        dtypes = {p.dtype for p in params}
        devices = {p.device for p in params}
        complex_dtypes = sorted(str(d) for d in dtypes if d.is_complex)
        if complex_dtypes:
            raise TypeError(f"{self.kind} does not support complex parameters (got "
                            f"{complex_dtypes[0]}): its Kronecker factors are real; optimize "
                            f"real parameters")
        if len(devices) != 1:
            raise TypeError(f"{self.kind} needs all parameters on one device, got devices "
                            f"{sorted(map(str, devices))}; move the model with model.to(device)")
        if len(dtypes) != 1:
            raise TypeError(f"{self.kind} needs all parameters in one dtype, got dtypes "
                            f"{sorted(map(str, dtypes))}; convert the model with "
                            f"model.to(dtype) (e.g. model.double())")
        dtype = dtypes.pop()
        if dtype not in (torch.float32, torch.float64):
            raise TypeError(f"{self.kind} needs float32 or float64 parameters, got {dtype}; "
                            f"keep float32 weights (model.float()) and use torch.autocast "
                            f"for half precision")
        if grad_scaler is not None and not callable(getattr(grad_scaler, "get_scale", None)):
            raise TypeError("grad_scaler must have get_scale() (a torch.amp.GradScaler)")
        self.grad_scaler = grad_scaler
        self.np_dtype = np.float64 if dtype == torch.float64 else np.float32
        self.xp = backend.namespace(backend.from_dlpack(params[0].detach()))
        if isinstance(optimizer, torch.optim.Optimizer):
            if optimizer_options:
                raise ValueError("optimizer_options apply only when optimizer is a name")
            self.inner = optimizer
        elif isinstance(optimizer, str):
            self.inner = first_order(optimizer, params, lr, optimizer_options or {})
        else:
            raise TypeError(f"optimizer must be one of {OPTIMIZERS} or a "
                            f"torch.optim.Optimizer, got {type(optimizer).__name__}")
        self.first_order_name = (optimizer if isinstance(optimizer, str)
                                 else type(optimizer).__name__)
        self.divergence_steps, self.divergence = int(divergence_steps), divergence
        self.watch = DivergenceWatch(divergence_steps, divergence, f"hpcqn.torch.{self.kind}")
        self._building = True
        super().__init__(self.inner.param_groups, {})
        self._building = False
        # The inner optimizer's groups, state and defaults are this optimizer's: schedulers
        # (lr, momentum/betas) and opt.state[p] reach the inner optimizer.
        self._share_inner()
        self.steps = 0
        self.timer: PhaseTimer | None = None
        self._reported: set[str] = set()
        self._params = params
        # What step() averages: the preconditioned layers' parameters, then the others
        # (the parameters are fixed at construction; average_gradients skips frozen ones).
        layer_params = self.capture.params()
        mine = {id(p) for p in layer_params}
        self._averaged = layer_params + [p for p in model.parameters() if id(p) not in mine]

    def _share_inner(self) -> None:
        self.param_groups = self.inner.param_groups
        self.state = self.inner.state
        self.defaults = self.inner.defaults

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Only during construction: the parameters are the model's, given at
        construction (``ValueError`` otherwise, naming the alternative)."""
        if getattr(self, "_building", False):
            super().add_param_group(param_group)
            return
        raise ValueError(f"hpcqn.torch.{self.kind} optimizes the parameters of the model it "
                         f"was built with; for several parameter groups (own lr, "
                         f"weight_decay, ...) pass optimizer=torch.optim.SGD([{{'params': "
                         f"...}}, ...]) (any torch.optim.Optimizer over the model's "
                         f"parameters) at construction")

    def _start(self, given: Mapping[str, Any], optimizer_options: Any = None,
               verbose: bool = False) -> None:
        """The end of a subclass's ``__init__``: same options and model on every rank (one
        small reduction), hooks on; with ``verbose`` rank 0 prints :meth:`describe`.
        ``given``: what ``options.validate`` returned."""
        agreed: dict[str, Any] = {
            f"option {name!r}": given.get(name, option.default)
            for name, option in options.declared(type(self)).items()}
        agreed["optimizer_options"] = dict(sorted((optimizer_options or {}).items()))
        agreed["layers"] = tuple(self.capture.names)
        check_same_parameters(self._params, self.comm, options=agreed,
                              what=f"hpcqn.torch.{self.kind}")
        self.capture.active = self.capturing(self.steps)
        if verbose and self.comm.rank == 0:
            print(self.describe(), flush=True)

    def describe(self) -> str:
        """A table of every parameter of the model: its name, its shape and what handles
        it: this optimizer's Kronecker factors (naming the layer) or the first-order
        optimizer alone, with the reason (embeddings and normalisation layers by design,
        ``nn.MultiheadAttention``'s projections, tied weights, ``skip_layers``, frozen
        parameters: :mod:`hpcqn.torch.capture`)."""
        rows = self.capture.describe(first_order=f"first-order ({self.first_order_name})",
                                     preconditioner=f"{self.kind} factors")
        lines = [(name, "x".join(map(str, shape)) or "scalar", who)
                 for name, shape, who in rows]
        widths = [max(len(h), *(len(line[i]) for line in lines))
                  for i, h in enumerate(("parameter", "shape", "handled by"))]
        head = ("parameter", "shape", "handled by")
        out = ["  ".join(h.ljust(w) for h, w in zip(head, widths, strict=True)).rstrip()]
        out += ["  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip()
                for line in lines]
        preconditioned = sum(1 for _, _, who in rows if who.startswith(self.kind))
        out.append(f"{preconditioned} of {len(rows)} parameters in {len(self.capture.layers)} "
                   f"layers preconditioned by {self.kind}")
        return "\n".join(out)

    @property
    def skipped_steps(self) -> int:
        """Steps skipped because a gradient or the statistics were not finite."""
        return self.core.skipped_steps

    # -- what subclasses provide ---------------------------------------------------------
    @property
    def preconditioning(self) -> bool:
        return True

    def capturing(self, step: int) -> bool:
        """Whether the hooks record rows during the forward/backward of ``step``."""
        raise NotImplementedError

    def _update_curvature(self) -> bool:
        """Turn the recorded rows into the core's curvature (called on capturing steps);
        False, with nothing changed, when the reduced statistics are not finite."""
        raise NotImplementedError

    def _adjust(self, directions: list[Any], grads: list[Any]) -> list[Any]:
        """A last change to all preconditioned gradients (default: none)."""
        return directions

    def _after_step(self, loss: Any) -> None:
        """Called after the first-order step (MKOR-H's switch)."""

    # -- the step --------------------------------------------------------------------------
    def zero_grad(self, set_to_none: bool = True) -> None:
        """Also forgets the statistics recorded since the last step (a step skipped by a
        GradScaler must not hand its rows to the next one)."""
        super().zero_grad(set_to_none)
        self.capture.clear()

    def loss_scale(self) -> float:
        return float(self.grad_scaler.get_scale()) if self.grad_scaler is not None else 1.0

    def _report_missing(self, present: list[bool]) -> None:
        """Warn (rank 0, once per layer) about layers without statistics on any rank;
        ``present`` is the same list on every rank."""
        names = [n for n, ok in zip(self.capture.names, present, strict=True)
                 if not ok and n not in self._reported]
        if names:
            self._reported.update(names)
            if self.comm.rank == 0:
                warnings.warn(f"{self.kind}: layers {names} recorded no forward/backward on any "
                              f"rank (or non-finite statistics) at step {self.steps}; their "
                              f"factors are not updated then", RuntimeWarning, stacklevel=4)

    @torch._disable_dynamo
    @torch.no_grad()
    def step(self, closure: Any = None, loss: Any = None) -> Any:  # type: ignore[override]
        """One step from the gradients in ``.grad`` (this rank's part of the batch).

        ``closure``: as torch's, called under ``torch.enable_grad()`` (it computes the loss
        and calls ``backward()``); its loss is returned (and is MKOR-H's ``loss`` when
        ``loss`` is not given). ``torch.compile(opt.step)`` runs this step eagerly (it
        calls NumPy and MPI: dynamo is disabled for it)."""
        result = None
        if closure is not None:
            result = conventions.call_closure(closure, f"hpcqn.torch.{self.kind}")
            if loss is None:
                loss = result
        self._check_loss(loss)
        self._step(loss)
        return result

    def _step(self, loss: Any) -> None:
        with phase(self.timer, "communication"):  # the flat-buffer copies count here too
            # Finite or not: the same answer on every rank (checked after the allreduce).
            take = average_gradients(self._averaged, self._averaging)
        if take and self.preconditioning:
            if self.capturing(self.steps):
                take = self._update_curvature()  # reduced statistics: agreed too
            if take:
                self._precondition()
        self.capture.clear()
        if not take:
            self.core.skipped_steps += 1
            self._check_parameters()
            self.watch.observe(True, self.comm.rank, self.steps, self.param_groups[0]["lr"])
            return
        self.watch.observe(False, self.comm.rank, self.steps, self.param_groups[0]["lr"])
        with phase(self.timer, "update"):
            conventions.step_without_global_hooks(self.inner)
            self._count_step()
        self._after_step(loss)
        self.steps += 1
        self.capture.active = self.preconditioning and self.capturing(self.steps)

    def _count_step(self) -> None:
        """A ``"step"`` count in ``opt.state[p]`` for every parameter that took one, where
        the first-order optimizer keeps none (SGD)."""
        if not isinstance(self.inner, torch.optim.SGD):
            return
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    entry = self.state[p]
                    entry["step"] = entry.get("step", 0) + 1

    def _check_loss(self, loss: Any) -> None:
        """Subclasses that need ``step(loss=...)`` raise here when it is missing."""

    def _check_parameters(self) -> None:
        """After a skipped step: raise on every rank if any rank's parameters are not
        finite (one small reduction)."""
        named = [(name, p) for name, p in self.model.named_parameters() if p.requires_grad]
        check_finite_parameters(named, self.comm, f"hpcqn.torch.{self.kind}")

    def _precondition(self) -> None:
        with phase(self.timer, "precondition"):
            grads, present = [], []
            for (_, module), shape in zip(self.capture.layers, self.core.shapes, strict=True):
                g = grad_matrix(module)
                present.append(g is not None)
                if g is None:  # unused layer: zeros keep owner mode's allgather in step
                    g = module.weight.new_zeros(shape)
                grads.append(backend.from_dlpack(g.contiguous()))
            directions = self._adjust(self.core.precondition(grads), grads)
            for (_, module), d, used in zip(self.capture.layers, directions, present,
                                            strict=True):
                if used:
                    set_grad_matrix(module, torch.from_dlpack(d))

    # -- state ---------------------------------------------------------------------------
    def _extra_state(self) -> dict[str, Any]:
        """The subclass's part of hpcqn's state (arrays as NumPy)."""
        raise NotImplementedError

    def _load_extra(self, ours: dict[str, Any]) -> None:
        """Restore :meth:`_extra_state` (after the checks)."""
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        """torch-shaped: ``{"state", "param_groups"}``, the first-order optimizer's own
        state dict with hpcqn's state (step counter, the factors this rank keeps, by layer
        name, ...) nested under ``["state"][0]["hpcqn"]`` as tensors
        (:mod:`hpcqn.torch.conventions`); ``torch.save``/``torch.load`` work, and the
        state-dict hooks run."""
        ours = {"kind": self.kind, "steps": self.steps, "layers": self.capture.names,
                "shapes": [list(s) for s in self.core.shapes],
                "placement": self.core.placement,
                "skipped_steps": self.core.skipped_steps, **self._extra_state()}
        # the inner state dict is made after the state-dict pre-hooks ran
        return conventions.pack(self, ours, base=self.inner.state_dict)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (also the earlier layout with top-level ``"inner"``
        and ``"hpcqn"``); the load-state-dict hooks run."""
        what = f"hpcqn.torch.{self.kind}"
        inner, ours = conventions.unpack(self, state_dict, what, legacy_torch_key="inner")
        if not isinstance(ours, dict) or ours.get("kind") != self.kind:
            raise ValueError(f"not an {what} state_dict")
        names = self.capture.names
        if list(ours["layers"]) != names or [tuple(s) for s in ours["shapes"]] != [
                tuple(s) for s in self.core.shapes]:
            raise ValueError(f"the saved state is for layers {list(ours['layers'])} with shapes "
                             f"{ours['shapes']}, this model has {names} with shapes "
                             f"{[list(s) for s in self.core.shapes]}")
        self._load_extra(ours)
        self.inner.load_state_dict(inner)
        self._share_inner()  # torch replaced the group dicts and the state
        self.steps = int(ours["steps"])
        self.core.skipped_steps = int(ours.get("skipped_steps", 0))
        self.capture.clear()
        self.capture.active = self.preconditioning and self.capturing(self.steps)
        conventions.run_load_post_hooks(self)

    def _host(self, value: Any) -> Any:
        return backend.to_host(value) if hasattr(value, "shape") else value
