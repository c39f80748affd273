"""Data-parallel optimizers whose state is split by block ownership.

:class:`BlockOptimizer` owns the distribution; subclasses (mL-BFGS, SGD, Adam) only
say how one block is updated. One step, in mode ``"replicated"`` (``x`` is the whole
vector on every rank, ``g`` this rank's minibatch gradient):

1. ``g`` is copied into the rank-major order, with one extra slot per rank segment
   holding "this rank's gradient is not finite";
2. ONE ``reduce_scatter`` gives each owner the sum of its blocks' gradients (and every
   rank the number of ranks with a non-finite gradient); the owner divides by ``P``;
3. if any rank's gradient was not finite, every rank skips the step (and counts it);
4. each owner updates its blocks; ONE ``allgatherv`` returns every block to everyone.

That moves the bytes of one gradient allreduce. In mode ``"sharded"`` each rank holds
only its segment of ``x`` and of the (already global) gradient: the step is local but
for one small reduction that agrees on skipping.

Optimizer state exists only for owned blocks, keyed by block id, as plain arrays and
numbers (:meth:`state_dict`, a snapshot: copies), so memory per rank falls as ``1/P``.

The first step begins with one small reduction (:meth:`hpcqn.Communicator.check_same`)
that agrees the class, the layout (block sizes and owners), the mode and every option
given at construction on every rank: a rank whose layout or options differ would send
and expect other segments in the step's ``reduce_scatter`` (every step skipped, or wrong
blocks updated), so that is a ``ValueError`` on every rank naming what differs, before
anything moves; a bad ``x`` or ``g`` on any one rank travels in the same reduction. It is
made at the first step, not in the constructor, because callers agree their own inputs
between the two (:func:`hpcqn.minimize_stochastic` does, in one reduction that a rank
whose options failed to check still joins; a constructor that communicated would meet it
there); ``agreed=True`` skips it for a caller that agreed the layout and the options
already (:class:`hpcqn.torch.MLBFGS`, in its own reduction).

With a :class:`~hpcqn.timing.PhaseTimer` set (``opt.timer``), the collectives of a step
(steps 2 and 4; in mode ``"sharded"`` the skip reduction), the division by ``P`` and, in
mode ``"replicated"``, the copies into and out of the rank-major order are timed as
``"communication"``; a subclass's per-block work times its own phases.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from .. import options
from ..backend import all_finite, check_float_array, namespace
from ..backend import copy as backend_copy
from ..comm import Communicator, get_comm
from ..layout import BlockLayout
from ..options import Rule
from ..timing import PhaseTimer, phase

MODES = ("replicated", "sharded")
Schedule = float | Callable[[int], float]
State = dict[str, Any]


class BlockOptimizer:
    """Base class: the distribution of a block-wise optimizer (see the module docs).
    Options (:mod:`hpcqn.options`): the constructors' keyword parameters, with the kinds
    and ranges of ``OPTION_RULES`` (merged along the subclasses)."""

    OPTION_RULES = {
        "lr": Rule("schedule", low=0.0, open_low=True),
        "weight_decay": Rule("float", low=0.0),
        "mode": Rule("str", choices=MODES),
    }
    NOT_OPTIONS = ("layout", "comm", "agreed", "settings")

    def __init__(
        self,
        layout: BlockLayout,
        comm: Any = None,
        lr: Schedule = 0.1,
        weight_decay: float = 0.0,
        mode: str = "replicated",
        *,
        agreed: bool = False,
        settings: Mapping[str, Any] | None = None,
    ):
        """``settings``: a subclass's constructor arguments (its ``locals()``), checked
        here (:func:`hpcqn.options.validate`) and agreed at the first step with the
        rest; ``agreed=True``: the caller agreed them on every rank already (see the
        module docstring)."""
        self.comm: Communicator = get_comm(comm)
        if not isinstance(layout, BlockLayout):
            raise TypeError(f"layout must be a BlockLayout, got {type(layout).__name__}")
        if layout.nranks != self.comm.size:
            raise ValueError(
                f"layout was made for {layout.nranks} ranks but the communicator has "
                f"{self.comm.size}; build it with BlockLayout.from_sizes(sizes, comm.size)"
            )
        given = options.validate(self, {**(settings or {}), "lr": lr,
                                        "weight_decay": weight_decay, "mode": mode})
        # What the first step agrees on (None: nothing left to agree).
        self._unagreed: dict[str, Any] | None = None if agreed else {
            "class": type(self).__qualname__, "layout block sizes": layout.sizes,
            "layout block owners": layout.owners,
            **{f"option {name}": value for name, value in given.items()}}
        self.layout = layout
        self.mode = mode
        self.lr = lr
        self.weight_decay = float(weight_decay)
        self.rank = self.comm.rank
        self.owned = layout.blocks_of(self.rank)
        # Where each owned block sits in this rank's segment of the rank-major order.
        self.segment: dict[int, slice] = {}
        position = 0
        for b in self.owned:
            self.segment[b] = slice(position, position + layout.sizes[b])
            position += layout.sizes[b]
        self.step_count = 0
        self.skipped_steps = 0
        self.timer: PhaseTimer | None = None  # set one to time the phases of a step
        self.block_state: dict[int, dict[str, Any]] = {}
        self._loaded = False  # states from load_state_dict not yet checked at a step
        self._buffers: dict[str, Any] = {}

    # -- to be provided by subclasses ---------------------------------------------------
    def init_block(self, block: int, theta: Any, g: Any) -> State:
        """The state of ``block`` before its first update."""
        raise NotImplementedError

    def direction(self, block: int, state: State, theta: Any, g: Any) -> Any:
        """The step direction of ``block`` from its averaged gradient ``g`` (weight decay
        included; ``g`` may be overwritten and returned)."""
        raise NotImplementedError

    def direction_scale(self, directions: dict[int, Any]) -> float:
        """A factor applied to every block's direction (1: none)."""
        return 1.0

    def apply(self, block: int, state: State, theta: Any, d: Any, lr: float,
              scale: float) -> None:
        """Move ``theta`` in place along ``d`` scaled by :meth:`direction_scale`:
        ``theta -= lr * scale * d`` by default."""
        theta -= (lr * scale) * d

    # -- the step ------------------------------------------------------------------------
    def current_lr(self) -> float:
        lr = self.lr(self.step_count) if callable(self.lr) else self.lr
        return float(lr)

    def _buffer(self, name: str, n: int, like: Any) -> Any:
        buf = self._buffers.get(name)
        if buf is None or buf.shape[0] != n or buf.dtype != like.dtype:
            buf = self._buffers[name] = namespace(like).empty(n, dtype=like.dtype)
        return buf

    def _check(self, x: Any, g: Any) -> None:
        check_float_array(x, "x")
        check_float_array(g, "g")
        expected = self.layout.n if self.mode == "replicated" else self.layout.counts[self.rank]
        if x.shape != (expected,) or g.shape != (expected,):
            where = "the whole vector" if self.mode == "replicated" else "this rank's segment"
            raise ValueError(
                f"mode {self.mode!r} needs x and g of length {expected} ({where}), got "
                f"{x.shape[0]} and {g.shape[0]}"
            )
        if x.dtype != g.dtype:
            raise TypeError(f"x and g must have one dtype, got {x.dtype} and {g.dtype}")

    def _agree_once(self, error: BaseException | None) -> None:
        """At the first step: the layout and options agreed on every rank (one small
        reduction carrying this rank's ``error``); later: ``error`` raised here alone."""
        if self._unagreed is not None:
            self.comm.check_same(self._unagreed, f"hpcqn.{type(self).__qualname__}", error)
            self._unagreed = None
        elif error is not None:
            raise error

    def step(self, x: Any, g: Any) -> bool:
        """One optimizer step; updates ``x`` in place. Returns False when the step was
        skipped because some rank's gradient was not finite (then nothing changed)."""
        error: BaseException | None = None
        try:
            self._check(x, g)
            namespace(x, g)  # raises unless both live in one namespace
        except (TypeError, ValueError) as exc:
            error = exc
        self._agree_once(error)
        finite = all_finite(g)
        if self.mode == "replicated":
            return self._step_replicated(x, g, finite)
        return self._step_sharded(x, g, finite)

    def _step_replicated(self, x: Any, g: Any, finite: bool) -> bool:
        layout = self.layout
        with phase(self.timer, "communication"):  # the copies that feed the collectives
            send = self._buffer("send", layout.n + layout.nranks, g)
            layout.to_rank_major(g, send, flag_slots=True)
            self.write_flags(send, finite)
            x_rank_major = layout.to_rank_major(x, self._buffer("x", layout.n, x))
        took = self.step_rank_major(x_rank_major, send)
        if took:
            with phase(self.timer, "communication"):
                layout.from_rank_major(x_rank_major, x)
        return took

    def write_flags(self, send: Any, finite: bool) -> None:
        """Mark every flag slot of a rank-major gradient buffer with this rank's
        "gradient not finite" flag."""
        for position in self.layout.flag_positions():
            send[position] = 0.0 if finite else 1.0

    def step_rank_major(self, x: Any, send: Any) -> bool:
        """The zero-copy step: ``x`` is the whole vector in rank-major order (updated in
        place) and ``send`` this rank's gradient in rank-major order with one flag slot
        after each rank's segment (:meth:`BlockLayout.to_rank_major` with
        ``flag_slots=True``, then :meth:`write_flags`); ``send`` is not modified.
        Communication: one reduce_scatter of ``send``, one in-place allgatherv of ``x``
        (and, at the first step, the agreement of the module docstring).
        """
        self._agree_once(None)
        layout, comm = self.layout, self.comm
        count = layout.counts[self.rank]
        with phase(self.timer, "communication"):
            if comm.size == 1 and not self.weight_decay:
                mine = send  # one rank: the sum is this rank's gradient; the update only reads it
            else:
                mine = comm.reduce_scatter(send, [c + 1 for c in layout.counts],
                                           out=self._buffer("recv", count + 1, send))
            skip = float(mine[-1]) > 0  # on a GPU this waits for the reduction
            grad = mine[:-1]
            if not skip and layout.nranks > 1:
                grad *= 1.0 / layout.nranks
        if skip:
            self.skipped_steps += 1
            return False
        start = layout.segment_start(self.rank)
        self._update_owned(x[start : start + count], grad)
        with phase(self.timer, "communication"):
            comm.allgatherv_inplace(x, list(layout.counts))
        return True

    def _step_sharded(self, x: Any, g: Any, finite: bool) -> bool:
        with phase(self.timer, "communication"):
            _, top = self.comm.allreduce_scalars([], [0.0 if finite else 1.0])
        if top[0] > 0:
            self.skipped_steps += 1
            return False
        self._update_owned(x, g.copy())
        return True

    def _update_owned(self, own: Any, grad: Any) -> None:
        """Update this rank's segment ``own`` in place from its averaged gradient."""
        if self._loaded:
            self._adopt_namespace(namespace(own))
        lr = self.current_lr()
        directions = {}
        for b in self.owned:
            theta, gb = own[self.segment[b]], grad[self.segment[b]]
            if self.weight_decay:
                gb += self.weight_decay * theta
            state = self.block_state.get(b)
            if state is None:
                state = self.block_state[b] = self.init_block(b, theta, gb)
            directions[b] = self.direction(b, state, theta, gb)
        with phase(self.timer, "precondition"):  # its reduction counts as communication
            scale = self.direction_scale(directions)
        with phase(self.timer, "update"):
            for b in self.owned:
                self.apply(b, self.block_state[b], own[self.segment[b]], directions[b], lr,
                           scale)
        self.step_count += 1

    # -- state ---------------------------------------------------------------------------
    def export_block(self, state: State) -> State:
        """One block's state as plain arrays and numbers (copies)."""
        return {k: _copy(v) for k, v in state.items()}

    def import_block(self, block: int, saved: State, xp: Any = None) -> State:
        """The inverse of :meth:`export_block`: copies, in namespace ``xp`` when given
        (else in the saved arrays' own)."""
        return {k: _copy(v, xp) for k, v in saved.items()}

    def _adopt_namespace(self, xp: Any) -> None:
        """Move loaded block states into ``xp``, the parameters' namespace, at the first
        step after :meth:`load_state_dict`: a checkpoint gives arrays back on the host,
        and a run on CuPy arrays needs its history and momentum on the device."""
        for b, state in list(self.block_state.items()):
            saved = self.export_block(state)
            if any(hasattr(v, "nbytes") and namespace(v) is not xp for v in saved.values()):
                self.block_state[b] = self.import_block(b, saved, xp)
        self._loaded = False

    def state_dict(self) -> dict[str, Any]:
        """This rank's state: counters and, per owned block id, plain arrays and numbers."""
        return {
            "step_count": self.step_count,
            "skipped_steps": self.skipped_steps,
            "blocks": {b: self.export_block(s) for b, s in self.block_state.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (blocks this rank does not own are ignored, so the
        states of all ranks may be merged and loaded on a different rank count)."""
        self.step_count = int(state["step_count"])
        self.skipped_steps = int(state["skipped_steps"])
        self.block_state = {
            int(b): self.import_block(int(b), saved)
            for b, saved in state["blocks"].items()
            if int(b) in self.segment
        }
        self._loaded = True

    def state_nbytes(self) -> int:
        """Bytes of optimizer state this rank holds (arrays only)."""
        total = 0
        for saved in self.state_dict()["blocks"].values():
            total += sum(int(v.nbytes) for v in saved.values() if hasattr(v, "nbytes"))
        return total


def _copy(value: Any, xp: Any = None) -> Any:
    """A copy of an array (in namespace ``xp`` when given); other values as they are."""
    if not hasattr(value, "nbytes"):
        return value
    if xp is None or namespace(value) is xp:
        return backend_copy(value)
    return xp.asarray(value)  # a copy onto xp's device
