"""``hpcqn.torch.MLBFGS``: mL-BFGS as a ``torch.optim.Optimizer``, data-parallel over MPI.

The parameters are moved, once, into one flat tensor laid out in rank-major block order
(every parameter's ``.data`` becomes a view of it), and every gradient into a flat
gradient tensor with one spare slot after each rank's segment (``.grad`` becomes a view,
and autograd accumulates into it in place). The core optimizer sees both through DLPack
(NumPy on the CPU, CuPy on a GPU), so the step works on the model's own memory:

* the gradient: one ``reduce_scatter`` reads the flat gradient directly; its result (this
  rank's averaged segment) is the one copy of gradients per step;
* the parameters: owners update their segment in place, and one in-place ``allgatherv``
  writes the other ranks' segments straight into the model: no copy.

Copies that remain: when something replaced a ``.grad`` (``zero_grad()``, torch's and
this optimizer's, sets them to None by default, after which autograd allocates new
tensors) a post-accumulate-grad hook (or, for anything else, the step) copies those
gradients into the flat buffer once and re-attaches the views;
``zero_grad(set_to_none=False)`` keeps the views attached and saves that copy.

torch conventions (:mod:`hpcqn.torch.conventions`; torch's generic optimizer tests run
on it in tests/test_torch_suite.py): a parameter whose ``.grad`` is None at ``step()``
does not move (as in ``torch.optim``; with several ranks only a parameter that does not
require a gradient counts as frozen so, since a None gradient may be one rank's alone:
there it counts as a zero gradient in the average); a parameter that does not require a
gradient at construction is accepted, takes no place in the flat tensors and never moves
(one given twice is placed once); ``step(closure)`` returns what the closure returns;
``lr`` may be a one-element tensor; ``opt.state[p]["step"]``; a
``{"state", "param_groups"}`` state dict of tensors (``param_names`` too, kept when a
state dict without names is loaded; what a state-dict pre hook puts in ``opt.state``
is in it); ``copy.deepcopy``; the group's ``"momentum"`` is the core's
``direction_momentum``, read at every step (so ``OneCycleLR``'s momentum cycling drives
it).

Agreement between ranks: at construction every declared option, the blocks and the model
(the parameters' count, shapes, dtypes and values) are checked in one small reduction
(``ValueError`` on every rank naming what differs). A step with a non-finite gradient on
any rank is skipped on every rank (the flag slots of the reduce_scatter) and counted in
``skipped_steps``; only then are the parameters checked (one small reduction), and if any
rank's are not finite every rank raises
:class:`hpcqn.torch.data.NonFiniteParameterError` naming the parameter and the rank.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch

from .. import backend, options
from ..comm import Communicator, get_comm
from ..curvature.block_history import Kernels
from ..layout import BlockLayout
from ..optimizers.mlbfgs import MLBFGS as CoreMLBFGS
from ..options import Rule
from ..timing import PhaseTimer
from . import conventions
from .data import (
    DivergenceWatch,
    check_finite_parameters,
    check_same_parameters,
    model_description,
)

# What the bridge forwards to the core: every core option but these (lr and weight_decay
# are the bridge's own, in param_groups; the step is always the replicated one).
NOT_FORWARDED = ("lr", "weight_decay", "mode")
WHAT = "hpcqn.torch.MLBFGS"
CORE_OPTIONS = tuple(name for name in options.declared(CoreMLBFGS)
                     if name not in NOT_FORWARDED)


def layer_blocks(params: Sequence[torch.Tensor], max_block_size: int | None = None) -> list[int]:
    """Default blocks, as numbers of consecutive parameters: a block starts at every
    parameter with two or more dimensions (a layer's weight) and takes the 1-D ones after
    it (its bias, norm scales). With ``max_block_size``, consecutive layers are merged
    while the block stays within that many entries."""
    layers: list[list[torch.Tensor]] = []
    for p in params:
        if p.dim() >= 2 or not layers:
            layers.append([p])
        else:
            layers[-1].append(p)
    counts: list[int] = []
    size = 0
    for layer in layers:
        layer_size = sum(p.numel() for p in layer)
        if counts and max_block_size and size + layer_size <= max_block_size:
            counts[-1] += len(layer)
            size += layer_size
        else:
            counts.append(len(layer))
            size = layer_size
    return counts


class MLBFGS(conventions.CopyableOptimizer, torch.optim.Optimizer):
    """mL-BFGS for a torch model, data-parallel over ``comm`` (see the module docs).

    ``blocks``: how many consecutive parameters form each block (a list of counts), or
    None for one block per layer (:func:`layer_blocks`, capped by ``max_block_size``).
    The other options are those of :class:`hpcqn.MLBFGS` (all of them but ``mode``:
    ``OPTIONS_FROM``), ``damping`` the deprecated name of ``pair_damping``; ``lr``,
    ``weight_decay`` and ``momentum`` (the core's ``direction_momentum``) live in
    ``param_groups`` (one group) and are read at every step, so torch schedulers
    (``OneCycleLR`` with ``cycle_momentum=True`` too) work.

    Where torch's conventions cannot hold: there is one parameter group, since the core
    takes one step size for all blocks (``add_param_group`` raises ``ValueError``: use
    ``blocks=`` for the block structure, or :class:`hpcqn.torch.MKOR` /
    :class:`hpcqn.torch.KFAC` with a ``torch.optim`` optimizer over several groups);
    parameters must be float32 or float64, all of one dtype (half precision raises
    ``TypeError``: keep float32 weights with ``model.float()`` and use ``torch.autocast``;
    mixed dtypes: ``model.to(dtype)``; complex parameters: ``TypeError``); sparse
    gradients raise ``RuntimeError``; the flags ``foreach``, ``fused``,
    ``differentiable``, ``capturable`` and ``maximize`` are not options; the optimizer
    cannot be pickled (``TypeError``: save ``state_dict()`` with ``torch.save`` and
    ``load_state_dict`` it into a new one; ``copy.deepcopy([model, opt])`` works within a
    process); ``torch.compile(opt.step)`` runs the step eagerly (it calls NumPy and MPI,
    so dynamo is disabled for it). docs/torch_known_differences.md lists them all.

    Every rank must build the same model and call ``step()`` once per step with its own
    minibatch gradient; the step averages the gradients over ranks (gradients a
    ``DistributedDataParallel`` model averaged already come out the same: wrapping the
    model is correct, but adds DDP's allreduce to the step's reduce-scatter).
    ``divergence_steps`` and ``divergence``: after that many consecutive steps skipped for
    non-finite gradients rank 0 warns (``"warn"``) or every rank raises
    :class:`hpcqn.torch.data.DivergenceError` (``"raise"``).
    """

    OPTION_RULES = {"lr": Rule("float", low=0.0, open_low=True),
                    "weight_decay": Rule("float", low=0.0),
                    "max_block_size": Rule("int", low=1, none=True),
                    "divergence_steps": Rule("int", low=1),
                    "divergence": Rule("str", choices=DivergenceWatch.ACTIONS)}
    NOT_OPTIONS = ("params", "comm", "blocks", "mode")
    OPTIONS_FROM = CoreMLBFGS

    @options.renames
    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        comm: Any = None,
        blocks: Sequence[int] | None = None,
        lr: float = 0.1,
        weight_decay: float = 0.0,
        max_block_size: int | None = None,
        divergence_steps: int = 10,
        divergence: str = "warn",
        **core_options: Any,
    ):
        given = options.validate(self, {**locals(), "lr": conventions.learning_rate(lr, WHAT)})
        self._building = True
        super().__init__(params, {"lr": lr, "weight_decay": weight_decay})
        self._building = False
        if len(self.param_groups) != 1:
            raise ValueError(ONE_GROUP)
        self.comm: Communicator = get_comm(comm)
        self.max_block_size = max_block_size
        self.divergence_steps, self.divergence = int(divergence_steps), divergence
        self.watch = DivergenceWatch(divergence_steps, divergence, WHAT)
        # Each parameter once (torch warns of a repeated one and keeps it), in order. One
        # that does not require a gradient takes no place and never moves, as in torch.
        group = self.param_groups[0]["params"]
        params = list({id(p): p for p in group if p.requires_grad}.values())
        self._unplaced = [p for p in group if not p.requires_grad]
        self._warned_unplaced: set[int] = set()  # positions in _unplaced
        if params:
            _check_uniform(params)
        counts = list(blocks) if blocks is not None else layer_blocks(params, max_block_size)
        if sum(counts) != len(params) or any(int(c) != c or c < 1 for c in counts):
            raise ValueError(f"blocks {counts} must be positive counts of consecutive "
                             f"parameters adding up to {len(params)}")
        grouped, start = [], 0
        for count in counts:
            grouped.append(params[start : start + count])
            start += count
        sizes = [sum(p.numel() for p in group) for group in grouped]
        self._params = params  # in parameter order
        agreed = {f"option {name!r}": given.get(name, option.default)
                  for name, option in options.declared(type(self)).items()}
        agreed["blocks"] = tuple(int(c) for c in counts)
        momentum = given.get("direction_momentum",
                             options.declared(type(self))["direction_momentum"].default)
        self.defaults["momentum"] = momentum
        self.param_groups[0].setdefault("momentum", momentum)
        if not params:  # nothing to optimize: a step calls the closure and the hooks only
            self.parameter_layout = self.layout = None
            self.block_ids: list[int] = []
            self.core: CoreMLBFGS | None = None
            self._attach([], None)
            check_same_parameters([], self.comm, options=agreed, what=WHAT)
            return
        # Blocks in parameter order (ids independent of the rank count), and the same
        # blocks renumbered into rank-major order for the flat storage.
        self.parameter_layout = BlockLayout.from_sizes(sizes, self.comm.size)
        layout, self.block_ids = self.parameter_layout.rank_sorted()
        self.layout = layout
        self._attach([grouped[b] for b in self.block_ids], layout)
        check_same_parameters([self.flat_param], self.comm, options=agreed,
                              model=model_description(params), what=WHAT)
        # agreed=True: the layout and the options were agreed just above
        self.core = CoreMLBFGS(layout, self.comm, agreed=True, lr=float(lr),
                               weight_decay=weight_decay,
                               **core_options)
        self.core.kernels = TORCH_KERNELS

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Only the one group given at construction (``ValueError`` naming what to do)."""
        if getattr(self, "_building", False):
            super().add_param_group(param_group)
            return
        raise ValueError(ONE_GROUP)

    # -- storage ----------------------------------------------------------------------
    def _attach(self, ordered: list[list[torch.Tensor]], layout: BlockLayout | None) -> None:
        """Move parameters into the flat tensors and point ``.data``/``.grad`` at them
        (``layout`` None: no parameter to place, empty flat tensors)."""
        first = ordered[0][0] if ordered else torch.empty(0)
        n, nranks = (layout.n, layout.nranks) if layout is not None else (0, 0)
        self.flat_param = torch.empty(n, dtype=first.dtype, device=first.device)
        self.flat_grad = torch.zeros(n + nranks, dtype=first.dtype, device=first.device)
        self.views: list[tuple[torch.Tensor, torch.Tensor]] = []  # (param, its grad view)
        self._slots: list[tuple[int, int]] = []  # (start in flat_param, in flat_grad)
        position = 0
        for block, group in enumerate(ordered):
            flag_slots_before = layout.owners[block]  # one per earlier rank segment
            for p in group:
                size = p.numel()
                data = self.flat_param[position : position + size].view_as(p)
                data.copy_(p.data)
                p.data = data
                start = position + flag_slots_before
                grad = self.flat_grad[start : start + size].view_as(p)
                if p.grad is None or p.grad.layout == torch.strided:  # sparse: step raises
                    if p.grad is not None:
                        grad.copy_(p.grad)
                    p.grad = grad
                self.views.append((p, grad))
                self._slots.append((position, start))
                position += size
        self._x = backend.from_dlpack(self.flat_param.detach())
        self._send = backend.from_dlpack(self.flat_grad)
        self._hook_gradients()

    def _hook_gradients(self) -> None:
        """After ``zero_grad()`` set a ``.grad`` to None, autograd allocates a new one: a
        post-accumulate-grad hook copies it into the flat buffer and re-attaches the view,
        so the gradients are in the flat buffer right after ``backward()``."""
        self._grad_hooks = [p.register_post_accumulate_grad_hook(_AttachGrad(grad))
                            for p, grad in self.views]

    def __setstate__(self, state: dict[str, Any]) -> None:
        """After ``copy.deepcopy``: the copied parameters and gradients become views of
        the copied flat tensors again."""
        super().__setstate__(state)
        views = []
        for (p, _), (data_start, grad_start) in zip(self.views, self._slots, strict=True):
            size = p.numel()
            data = self.flat_param[data_start : data_start + size].view_as(p)
            grad = self.flat_grad[grad_start : grad_start + size].view_as(p)
            with torch.no_grad():
                data.copy_(p.data)
                if p.grad is not None:
                    grad.copy_(p.grad)
            p.data = data
            if p.grad is not None:
                p.grad = grad
            views.append((p, grad))
        self.views = views
        self._x = backend.from_dlpack(self.flat_param.detach())
        self._send = backend.from_dlpack(self.flat_grad)
        self._hook_gradients()

    def _gather_gradients(self) -> list[torch.Tensor]:
        """Re-attach gradients that something replaced (copying them into the flat
        buffer); a None gradient is a zero slice and leaves ``.grad`` None. Returns the
        parameters that do not move this step (see the module docs)."""
        self._check_gradients()
        frozen = []
        serial = self.comm.size == 1
        for (p, grad), (data_start, _) in zip(self.views, self._slots, strict=True):
            if not _is_view_of(p, self.flat_param):  # .data replaced: take its values
                data = self.flat_param[data_start : data_start + p.numel()].view_as(p)
                data.copy_(p.data)
                p.data = data
            if p.grad is None:
                grad.zero_()
                if serial or not p.requires_grad:
                    frozen.append(p)
            elif p.grad.data_ptr() != grad.data_ptr():
                grad.copy_(p.grad)
                p.grad = grad
        return frozen

    def _check_gradients(self) -> None:
        """A sparse gradient raises (before any collective: a model's sparse gradients
        are sparse on every rank); a gradient of a parameter that did not require one at
        construction (it has no place in the flat tensors, so it does not move) warns once
        per parameter."""
        for p, _ in self.views:
            if p.grad is not None and p.grad.layout != torch.strided:
                raise RuntimeError(f"{WHAT} does not support sparse gradients (parameter of "
                                   f"shape {tuple(p.shape)}); use dense gradients (e.g. "
                                   f"nn.Embedding(sparse=False))")
        for i, p in enumerate(self._unplaced):
            if p.grad is not None and i not in self._warned_unplaced:
                self._warned_unplaced.add(i)
                warnings.warn(f"{WHAT}: parameter {i} of shape {tuple(p.shape)} did not "
                              f"require a gradient when the optimizer was built, so it has "
                              f"no place in the flat tensors and does not move; build the "
                              f"optimizer after unfreezing it", RuntimeWarning, stacklevel=4)

    # -- torch.optim.Optimizer -----------------------------------------------------------
    def zero_grad(self, set_to_none: bool = True) -> None:
        """torch's: ``set_to_none=True`` (the default) sets every ``.grad`` to None (the
        next backward's new gradients are copied into the flat buffer by a hook, and the
        views re-attached); ``False`` zeroes the flat gradient in place, the views staying
        attached (autograd accumulates into them: no copy)."""
        if set_to_none:
            for p, _ in self.views:
                p.grad = None
            return
        self.flat_grad.zero_()
        for p, grad in self.views:
            if p.grad is not None:
                p.grad = grad

    @torch._disable_dynamo
    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:  # type: ignore[override]
        """One data-parallel mL-BFGS step from the gradients in ``.grad``; with
        ``closure`` (torch's contract: called under ``torch.enable_grad()``, it computes the
        loss and calls ``backward()``) first calls it, and returns what it returned."""
        loss = None
        if closure is not None:
            loss = conventions.call_closure(closure, WHAT)
        if self.core is None:  # no parameter requires a gradient
            return loss
        frozen = self.prepare_step()
        kept = [(p, p.detach().clone()) for p in frozen]
        taken = self.core.step_rank_major(self._x, self._send)
        grads = {id(p): grad for p, grad in self.views}
        for p, value in kept:
            p.copy_(value)
            p.grad = grads[id(p)]  # its zero slice (the next backward accumulates into it)
        if not taken:  # skipped on every rank
            check_finite_parameters([("", p) for p in self._params], self.comm, WHAT)
            self.watch.observe(True, self.comm.rank, self.core.step_count,
                               self.param_groups[0]["lr"])
            return loss
        self.watch.observe(False, self.comm.rank, self.core.step_count,
                           self.param_groups[0]["lr"])
        moved = {id(p) for p in frozen}
        for p in self._params:
            if id(p) not in moved:
                entry = self.state[p]
                entry["step"] = entry.get("step", 0) + 1
        return loss

    def prepare_step(self) -> list[torch.Tensor]:
        """What the bridge does before the core step: re-attach gradients, hand the
        group's ``lr``, ``weight_decay`` and ``momentum`` to the core, mark the flag slots
        with whether this rank's gradient is finite. Returns the parameters that must not
        move (None gradient)."""
        frozen = self._gather_gradients()
        group = self.param_groups[0]
        self.core.lr = float(group["lr"])
        self.core.weight_decay = float(group["weight_decay"])
        momentum = float(group.get("momentum", self.core.direction_momentum))
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"{WHAT}: the group's momentum (the direction "
                             f"momentum) must be in [0, 1), got {momentum}")
        self.core.direction_momentum = momentum
        send = self._send
        self.core.write_flags(send, True)
        finite = backend.all_finite(send) if isinstance(send, np.ndarray) else bool(
            torch.isfinite(self.flat_grad).all())
        self.core.write_flags(send, finite)
        return frozen

    @property
    def timer(self) -> PhaseTimer | None:
        """Set a :class:`hpcqn.timing.PhaseTimer` to time the core step's phases (the
        bridge's own work before it is not timed; with no parameter to optimize there is
        no core step, and no timer)."""
        return None if self.core is None else self.core.timer

    @timer.setter
    def timer(self, value: PhaseTimer | None) -> None:
        if self.core is not None:
            self.core.timer = value

    @property
    def skipped_steps(self) -> int:
        return 0 if self.core is None else self.core.skipped_steps

    def state_dict(self) -> dict[str, Any]:
        """torch-shaped (``{"state", "param_groups"}``, tensors and plain values only):
        torch's per-parameter ``"step"`` counts and param groups, and under
        ``["state"][0]["hpcqn"]`` this rank's curvature state per block, keyed by the
        block's position in parameter order (independent of the rank count)."""
        if self.core is None:
            ours: dict[str, Any] = {"core": {}, "owners": [], "sizes": []}
        else:
            core = self.core.state_dict()
            core["blocks"] = {self.block_ids[b]: s for b, s in core["blocks"].items()}
            ours = {"core": core, "owners": list(self.parameter_layout.owners),
                    "sizes": list(self.parameter_layout.sizes)}
        return conventions.pack(self, ours)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (also the earlier layout, with a top-level
        ``"hpcqn"``); the load-state-dict hooks run."""
        torch_state, saved = conventions.unpack(self, state_dict, WHAT)
        sizes = [] if self.core is None else list(self.parameter_layout.sizes)
        if list(saved["sizes"]) != sizes:
            raise ValueError(f"the saved state has blocks of sizes {saved['sizes']}, this "
                             f"optimizer {sizes}: not the same model or blocks")
        conventions.load_torch_part(self, torch_state)
        for group in self.param_groups:
            group.setdefault("momentum", self.defaults["momentum"])
        if self.core is None:
            conventions.run_load_post_hooks(self)
            return
        core = dict(saved["core"])
        position = {old: new for new, old in enumerate(self.block_ids)}
        core["blocks"] = {position[int(b)]: s for b, s in core["blocks"].items()}
        self.core.load_state_dict(core)
        conventions.run_load_post_hooks(self)


ONE_GROUP = ("hpcqn.torch.MLBFGS takes one parameter group (pass model.parameters()): the "
             "core takes one lr and weight_decay for all blocks; set the block structure "
             "with blocks=, or use hpcqn.torch.MKOR / hpcqn.torch.KFAC with a torch.optim "
             "optimizer over several groups for per-group options")


class TorchKernels(Kernels):
    """The core's large products and its heavy-ball update through torch on the same
    (host) memory: torch's BLAS matrix-vector products, and its fused SGD kernel for
    ``buf = momentum buf + d; theta -= lr buf`` in one pass (the NumPy forms take two).
    Arrays that are not NumPy (a GPU run's CuPy arrays) take the core's own kernels."""

    fused_heavy_ball = hasattr(torch, "_fused_sgd_")

    def products(self, vectors: Any, g: Any) -> np.ndarray:
        if not isinstance(vectors, np.ndarray):
            return super().products(vectors, g)
        return torch.mv(torch.from_numpy(vectors), torch.from_numpy(g)).numpy()

    def combine(self, coeffs: np.ndarray, vectors: Any, gamma: float, g: Any, out: Any) -> Any:
        if not isinstance(vectors, np.ndarray):
            return super().combine(coeffs, vectors, gamma, g, out)
        result = torch.from_numpy(out)
        torch.mv(torch.from_numpy(vectors).t(),
                 torch.from_numpy(coeffs.astype(vectors.dtype)), out=result)
        result.add_(torch.from_numpy(g), alpha=gamma)
        return out

    def heavy_ball(self, theta: Any, d: Any, buf: Any, momentum: float, lr: float) -> None:
        if not isinstance(theta, np.ndarray):
            super().heavy_ball(theta, d, buf, momentum, lr)
            return
        torch._fused_sgd_([torch.from_numpy(theta)], [torch.from_numpy(d)],
                          [torch.from_numpy(buf)], weight_decay=0.0, momentum=momentum,
                          lr=lr, dampening=0.0, nesterov=False, maximize=False,
                          is_first_step=False)


TORCH_KERNELS = TorchKernels()


class _AttachGrad:
    """The post-accumulate-grad hook of one parameter (a class, so deepcopy and pickle of
    the model see no local function): a new ``.grad`` is copied into the parameter's
    slice of the flat gradient, which becomes ``.grad`` again."""

    def __init__(self, view: torch.Tensor):
        self.view = view

    def __call__(self, p: torch.Tensor) -> None:
        grad = p.grad
        if grad is None or grad.data_ptr() == self.view.data_ptr():
            return
        if (grad.shape != self.view.shape or grad.dtype != self.view.dtype
                or grad.layout != torch.strided):
            return  # not ours to handle: the step copies it
        with torch.no_grad():
            self.view.copy_(grad)
        p.grad = self.view


def _is_view_of(p: torch.Tensor, flat: torch.Tensor) -> bool:
    start = flat.data_ptr()
    end = start + flat.numel() * flat.element_size()
    return start <= p.data_ptr() < end


def _check_uniform(params: list[torch.Tensor]) -> None:
    """The parameters that require a gradient share one device and one real float32 or
    float64 dtype (``TypeError`` naming what to do otherwise)."""
    devices = {str(p.device) for p in params}
    dtypes = {str(p.dtype) for p in params}
    complex_dtypes = sorted(str(p.dtype) for p in params if p.is_complex())
    if complex_dtypes:
        raise TypeError(f"{WHAT} does not support complex parameters (got "
                        f"{complex_dtypes[0]}): its curvature pairs are real inner "
                        f"products; optimize real ones (e.g. a parameter of "
                        f"torch.view_as_real shape, made complex with "
                        f"torch.view_as_complex in the forward)")
    if len(devices) > 1:
        raise TypeError(f"parameters live on several devices ({sorted(devices)}); "
                        f"{WHAT} needs them on one")
    if len(dtypes) > 1:
        raise TypeError(f"parameters have several dtypes ({sorted(dtypes)}); "
                        f"{WHAT} needs one: convert the model with "
                        f"model.to(dtype) (e.g. model.double())")
    dtype = dtypes.pop()
    if dtype not in ("torch.float32", "torch.float64"):
        raise TypeError(f"{WHAT} needs float32 or float64 parameters, got "
                        f"{dtype}: keep float32 weights (model.float()) and use "
                        f"torch.autocast for half precision")
