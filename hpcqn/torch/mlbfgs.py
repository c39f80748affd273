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

Copies that remain: when something replaced a ``.grad`` (``model.zero_grad()`` sets them
to None, after which autograd allocates new tensors) the step copies those gradients
into the flat buffer once and re-attaches the views.

Agreement between ranks: at construction every declared option, the blocks and the model
(the parameters' count, shapes, dtypes and values) are checked in one small reduction
(``ValueError`` on every rank naming what differs). A step with a non-finite gradient on
any rank is skipped on every rank (the flag slots of the reduce_scatter) and counted in
``skipped_steps``; only then are the parameters checked (one small reduction), and if any
rank's are not finite every rank raises
:class:`hpcqn.torch.data.NonFiniteParameterError` naming the parameter and the rank.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch

from .. import backend, options
from ..comm import Communicator, get_comm
from ..layout import BlockLayout
from ..optimizers.mlbfgs import MLBFGS as CoreMLBFGS
from ..options import Rule
from ..timing import PhaseTimer
from .data import check_finite_parameters, check_same_parameters, model_description

# What the bridge forwards to the core: every core option but these (lr and weight_decay
# are the bridge's own, in param_groups; the step is always the replicated one).
NOT_FORWARDED = ("lr", "weight_decay", "mode")
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


class MLBFGS(torch.optim.Optimizer):
    """mL-BFGS for a torch model, data-parallel over ``comm`` (see the module docs).

    ``blocks``: how many consecutive parameters form each block (a list of counts), or
    None for one block per layer (:func:`layer_blocks`, capped by ``max_block_size``).
    The other options are those of :class:`hpcqn.MLBFGS` (all of them but ``mode``:
    ``OPTIONS_FROM``), ``damping`` the deprecated name of ``pair_damping``; ``lr`` and
    ``weight_decay`` live in ``param_groups`` (one group), so torch learning-rate
    schedulers work.

    Every rank must build the same model and call ``step()`` once per step with its own
    minibatch gradient; the step averages the gradients over ranks.
    """

    OPTION_RULES = {"lr": Rule("float", low=0.0, open_low=True),
                    "weight_decay": Rule("float", low=0.0),
                    "max_block_size": Rule("int", low=1, none=True)}
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
        **core_options: Any,
    ):
        given = options.validate(self, locals())
        super().__init__(params, {"lr": lr, "weight_decay": weight_decay})
        if len(self.param_groups) != 1:
            raise ValueError("hpcqn.torch.MLBFGS takes one parameter group (pass "
                             "model.parameters()); per-group options are not supported")
        self.comm: Communicator = get_comm(comm)
        self.max_block_size = max_block_size
        params = [p for p in self.param_groups[0]["params"] if p.requires_grad]
        if not params:
            raise ValueError("no parameter requires a gradient")
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
        # Blocks in parameter order (ids independent of the rank count), and the same
        # blocks renumbered into rank-major order for the flat storage.
        self.parameter_layout = BlockLayout.from_sizes(sizes, self.comm.size)
        layout, self.block_ids = self.parameter_layout.rank_sorted()
        self.layout = layout
        self._params = params  # in parameter order
        self._attach([grouped[b] for b in self.block_ids], layout)
        agreed = {f"option {name!r}": given.get(name, option.default)
                  for name, option in options.declared(type(self)).items()}
        agreed["blocks"] = tuple(int(c) for c in counts)
        check_same_parameters([self.flat_param], self.comm, options=agreed,
                              model=model_description(params), what="hpcqn.torch.MLBFGS")
        self.core = CoreMLBFGS(layout, self.comm, lr=lr, weight_decay=weight_decay,
                               **core_options)

    # -- storage ----------------------------------------------------------------------
    def _attach(self, ordered: list[list[torch.Tensor]], layout: BlockLayout) -> None:
        """Move parameters into the flat tensors and point ``.data``/``.grad`` at them."""
        first = ordered[0][0]
        n, nranks = layout.n, layout.nranks
        self.flat_param = torch.empty(n, dtype=first.dtype, device=first.device)
        self.flat_grad = torch.zeros(n + nranks, dtype=first.dtype, device=first.device)
        self.views: list[tuple[torch.Tensor, torch.Tensor]] = []  # (param, its grad view)
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
                if p.grad is not None:
                    grad.copy_(p.grad)
                p.grad = grad
                self.views.append((p, grad))
                position += size
        self._x = backend.from_dlpack(self.flat_param.detach())
        self._send = backend.from_dlpack(self.flat_grad)

    def _gather_gradients(self) -> None:
        """Re-attach gradients that something replaced (or set to None: zero)."""
        for p, grad in self.views:
            if p.grad is None:
                grad.zero_()
                p.grad = grad
            elif p.grad.data_ptr() != grad.data_ptr():
                grad.copy_(p.grad)
                p.grad = grad

    # -- torch.optim.Optimizer -----------------------------------------------------------
    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zero the flat gradient in place (the views must stay attached, so
        ``set_to_none`` is ignored)."""
        self.flat_grad.zero_()

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:  # type: ignore[override]
        """One data-parallel mL-BFGS step from the gradients in ``.grad``."""
        if closure is not None:
            raise TypeError(
                "hpcqn.torch.MLBFGS.step() takes no closure: compute the loss and call "
                "backward() in the training loop, then step()"
            )
        self.prepare_step()
        if not self.core.step_rank_major(self._x, self._send):  # skipped on every rank
            check_finite_parameters([("", p) for p in self._params], self.comm,
                                    "hpcqn.torch.MLBFGS")

    def prepare_step(self) -> None:
        """What the bridge does before the core step: re-attach gradients, hand the
        group's ``lr`` and ``weight_decay`` to the core, mark the flag slots with whether
        this rank's gradient is finite."""
        self._gather_gradients()
        group = self.param_groups[0]
        self.core.lr = float(group["lr"])
        self.core.weight_decay = float(group["weight_decay"])
        send = self._send
        self.core.write_flags(send, True)
        finite = backend.all_finite(send) if isinstance(send, np.ndarray) else bool(
            torch.isfinite(self.flat_grad).all())
        self.core.write_flags(send, finite)

    @property
    def timer(self) -> PhaseTimer | None:
        """Set a :class:`hpcqn.timing.PhaseTimer` to time the core step's phases (the
        bridge's own work before it is not timed)."""
        return self.core.timer

    @timer.setter
    def timer(self, value: PhaseTimer | None) -> None:
        self.core.timer = value

    @property
    def skipped_steps(self) -> int:
        return self.core.skipped_steps

    def state_dict(self) -> dict[str, Any]:
        """torch's state (param groups) plus this rank's curvature state per block, keyed
        by the block's position in parameter order (independent of the rank count)."""
        state = super().state_dict()
        core = self.core.state_dict()
        core["blocks"] = {self.block_ids[b]: s for b, s in core["blocks"].items()}
        state["hpcqn"] = {"core": core, "owners": list(self.parameter_layout.owners),
                          "sizes": list(self.parameter_layout.sizes)}
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved = state_dict["hpcqn"]
        sizes = list(self.parameter_layout.sizes)
        if list(saved["sizes"]) != sizes:
            raise ValueError(f"the saved state has blocks of sizes {saved['sizes']}, this "
                             f"optimizer {sizes}: not the same model or blocks")
        torch_state = {k: v for k, v in state_dict.items() if k != "hpcqn"}
        super().load_state_dict(torch_state)
        core = dict(saved["core"])
        position = {old: new for new, old in enumerate(self.block_ids)}
        core["blocks"] = {position[int(b)]: s for b, s in core["blocks"].items()}
        self.core.load_state_dict(core)


def _check_uniform(params: list[torch.Tensor]) -> None:
    devices = {str(p.device) for p in params}
    dtypes = {str(p.dtype) for p in params}
    if len(devices) > 1:
        raise TypeError(f"parameters live on several devices ({sorted(devices)}); "
                        f"hpcqn.torch.MLBFGS needs them on one")
    if len(dtypes) > 1:
        raise TypeError(f"parameters have several dtypes ({sorted(dtypes)}); "
                        f"hpcqn.torch.MLBFGS needs one")
    if dtypes.pop() not in ("torch.float32", "torch.float64"):
        raise TypeError("hpcqn.torch.MLBFGS needs float32 or float64 parameters")
