"""mL-BFGS: momentum L-BFGS with a block-wise Hessian (Niu et al., TMLR 2023).

docs/algorithms.md section 2, per block ``b`` that this rank owns, at step ``t``::

    Mth = beta Mth + (1 - beta) theta_t ;  Mg = beta Mg + (1 - beta) g_t
    (both start at the first step's theta and g)
    every `period` steps (t > 0, t % period == 0):
        s = Mth - Mth_prev ; y = Mg - Mg_prev ; Mth_prev, Mg_prev = Mth, Mg
        y_hat = tau y + (1 - tau) s            (hpcqn.curvature.damping.accept_pair)
        push (s, y_hat) when s.y_hat is finite and > 0 (and, with min_cos > 0, when
        s.y > min_cos |s| |y|), else skip and count
    d = H_b g_b  (compact form, H0 = gamma I; d = g_b until the block has a pair)
    theta_b -= lr d

Options from the authors' released code: ``normalize_direction`` (divide every
direction by its global 2-norm over all blocks: one extra small reduction per step) and
``direction_momentum`` (heavy-ball momentum on the direction) are ON by default;
``momentum_form="sum"`` (un-normalised sums, gradient sum restarted at each pair) and
``pair_smoothing`` ("double momentum": s <- (1-c) s + c s_prev, same for y) are off.
Why: the damping keeps ``s.y_hat / s.s`` in ``[sigma_L, sigma_H]`` but does not bound
the norm of ``H`` (a pair with ``y_hat`` nearly orthogonal to ``s`` makes the BFGS
factors large), and on the digits MLP plain steps diverged at every learning rate
tried, while normalised steps did not (``benchmarks/bench_mlbfgs.py`` and the torch
jobs). ``beta=0.99``, ``period=20``, ``history=10``, ``pair_damping=0.01`` are the best of
that benchmark; the paper used ``beta=0.999``, ``period=50`` at ImageNet scale.

``min_cos=0.2`` (ours; 0 turns it off) also skips a pair whose ``s`` and ``y`` are
nearly orthogonal (``cos(s, y) <= min_cos``, before damping). Such a pair is mostly noise
and stretches ``H`` along ``s`` by about ``1 / cos^2``; on the digits CNN, without the
test, it let the smallest block take most of the normalised step and one seed diverge
(3 of 3 seeds train at lr 0.1 and 0.3 with it).

``normalize_to="gradient"`` (ours) rescales the direction to the global 2-norm of the
gradient it was computed from instead of to 1 (``d <- d |g| / |d|``, both norms over all
blocks, in the same small reduction): ``H`` then sets only the direction, and the step
shrinks as the gradient does, like SGD's. With ``"unit"`` (the released code's, the
default) every step has length ``lr`` (up to ``lr / (1 - direction_momentum)`` with the
heavy ball) however small the gradient, so at a constant rate the iterates cannot settle
closer to the optimum than that. On the digits softmax regression at a constant rate
(batch 60, 20 epochs, best rate of each, median of three data seeds;
``benchmarks/sweep_logreg.py``) the defaults end 5 % above SGD's final loss, with steps
3.7x as long as SGD's at the end; ``normalize_to="gradient"`` gives SGD's step length
and, with ``beta=0.9`` (pairs from iterates averaged over ~10 steps, not ~100, in a run
of 440), ends 2 % below SGD (``jobs/logreg_mlbfgs.toml``). The default stays ``"unit"``:
on the race's MLP (batch 1024) ``"gradient"`` was not better.

``pair_damping`` was called ``damping`` (still accepted, deprecated: K-FAC's ``damping``
is a different thing, the Tikhonov term).
"""

from __future__ import annotations

import math
from typing import Any

from .. import options
from ..backend import axpy, namespace
from ..curvature.block_history import DEFAULT_KERNELS, BlockHistory, Kernels
from ..curvature.damping import SIGMA_H, SIGMA_L, accept_pair
from ..layout import BlockLayout
from ..options import Rule
from ..timing import phase
from .blockwise import BlockOptimizer, Schedule, State

MOMENTUM_FORMS = ("ema", "sum")
NORMALIZE_TO = ("unit", "gradient")  # what normalize_direction scales the direction to
# Momentum buffers are stored divided by a per-block scalar that absorbs the decay; when
# the scalar falls below this, it is multiplied into the buffer (one extra pass).
RESCALE_BELOW = 1e-6


def _materialise(state: State, scale_key: str, names: tuple[str, ...]) -> None:
    """Multiply the stored buffers by their scalar and reset it to 1."""
    scale = state[scale_key]
    if scale != 1.0:
        for name in names:
            state[name] *= scale
        state[scale_key] = 1.0


class MLBFGS(BlockOptimizer):
    """mL-BFGS over a :class:`~hpcqn.layout.BlockLayout`; ``step(x, g)`` updates ``x``.
    The layout and the options are agreed on every rank at the first step (a
    ``ValueError`` on every rank naming what differs; see
    :mod:`hpcqn.optimizers.blockwise`)."""

    OPTION_RULES = {
        "history": Rule("int", low=1), "period": Rule("int", low=1),
        "beta": Rule("float", low=0.0, high=1.0, open_high=True),
        "pair_damping": Rule("float", low=0.0, high=1.0, open_high=True),
        "sigma_l": Rule("float", low=0.0, high=1.0, open_low=True, open_high=True),
        "sigma_h": Rule("float", low=1.0, open_low=True, finite=False),
        "momentum_form": Rule("str", choices=MOMENTUM_FORMS),
        "pair_smoothing": Rule("float", low=0.0, high=1.0, open_high=True),
        "normalize_direction": Rule("bool"),
        "normalize_to": Rule("str", choices=NORMALIZE_TO),
        "direction_momentum": Rule("float", low=0.0, high=1.0, open_high=True),
        "min_cos": Rule("float", low=0.0, high=1.0, open_high=True),
    }
    DEPRECATED = {"damping": "pair_damping"}

    @options.renames
    def __init__(
        self,
        layout: BlockLayout,
        comm: Any = None,
        lr: Schedule = 0.1,
        history: int = 10,
        period: int = 20,
        beta: float = 0.99,
        pair_damping: float = 0.01,
        weight_decay: float = 0.0,
        mode: str = "replicated",
        sigma_l: float = SIGMA_L,
        sigma_h: float = SIGMA_H,
        momentum_form: str = "ema",
        pair_smoothing: float = 0.0,
        normalize_direction: bool = True,
        direction_momentum: float = 0.9,
        min_cos: float = 0.2,
        normalize_to: str = "unit",
        *,
        agreed: bool = False,
    ):
        # Checked here, agreed on every rank at the first step: see BlockOptimizer.
        super().__init__(layout, comm, lr=lr, weight_decay=weight_decay, mode=mode,
                         agreed=agreed, settings=locals())
        self.history, self.period, self.beta = int(history), int(period), float(beta)
        self.pair_damping = float(pair_damping)
        self.sigma_l, self.sigma_h = float(sigma_l), float(sigma_h)
        self.momentum_form = momentum_form
        self.pair_smoothing = float(pair_smoothing)
        self.normalize_direction = bool(normalize_direction)
        self.normalize_to = normalize_to
        # |g_b|^2 of this step's owned blocks (normalize_to="gradient")
        self._grad_squares: dict[int, float] = {}
        self.direction_momentum = float(direction_momentum)
        self.min_cos = float(min_cos)
        # The large products and the heavy-ball update (hpcqn.torch.MLBFGS sets faster ones).
        self.kernels: Kernels = DEFAULT_KERNELS

    # -- per block -------------------------------------------------------------------------
    def init_block(self, block: int, theta: Any, g: Any) -> State:
        xp = namespace(theta)
        return {
            "theta_mom": theta.copy(), "grad_mom": g.copy(),
            "theta_prev": theta.copy(), "grad_prev": g.copy(),
            "history": BlockHistory(theta.shape[0], self.history, xp, theta.dtype),
            "mom_scale": 1.0, "dir_mom": xp.zeros_like(theta), "dir_scale": 1.0,
            "npairs": 0, "skipped_pairs": 0, "first_step": self.step_count,
        }

    def _momentum(self, state: State, theta: Any, g: Any) -> None:
        """``M = beta M + w x`` for theta and g, as ONE pass each: the buffers hold
        ``M / mom_scale`` and the decay goes into the scalar (materialised at pairs)."""
        if self.step_count == state["first_step"]:
            return  # the sums start at the first step's values
        weight = 1.0 - self.beta if self.momentum_form == "ema" else 1.0
        names = ("theta_mom", "grad_mom")
        scale = state["mom_scale"] * self.beta
        if scale < RESCALE_BELOW:  # keep the stored buffers far from overflow
            _materialise(state, "mom_scale", names)
            scale = self.beta
        if scale < RESCALE_BELOW:  # a tiny beta: decay the buffers directly
            for name, value in zip(names, (theta, g), strict=True):
                state[name] *= self.beta
                axpy(weight, value, state[name])
            return
        state["mom_scale"] = scale
        axpy(weight / scale, theta, state["theta_mom"])
        axpy(weight / scale, g, state["grad_mom"])

    def _form_pair(self, state: State, g: Any) -> None:
        _materialise(state, "mom_scale", ("theta_mom", "grad_mom"))
        s = state["theta_mom"] - state["theta_prev"]
        y = state["grad_mom"] - state["grad_prev"]
        state["theta_prev"][...] = state["theta_mom"]
        state["grad_prev"][...] = state["grad_mom"]
        if self.momentum_form == "sum":
            state["grad_mom"][...] = g  # the released code restarts the gradient sum
        history: BlockHistory = state["history"]
        c = self.pair_smoothing
        if c and len(history):
            newest = history.order[-1]
            s = (1.0 - c) * s + c * history.vectors[newest]
            y = (1.0 - c) * y + c * history.vectors[history.history + newest]
        decision = accept_pair(s, y, self.pair_damping, self.sigma_l, self.sigma_h,
                               self.min_cos)
        if decision.accepted:
            history.push(decision.s, decision.y_hat)
            state["npairs"] += 1
        else:
            state["skipped_pairs"] += 1

    def direction(self, block: int, state: State, theta: Any, g: Any) -> Any:
        if self.normalize_direction and self.normalize_to == "gradient":
            with phase(self.timer, "precondition"):
                self._grad_squares[block] = float(g @ g)
        with phase(self.timer, "statistics"):
            self._momentum(state, theta, g)
        t = self.step_count
        if t > state["first_step"] and (t - state["first_step"]) % self.period == 0:
            with phase(self.timer, "factors"):
                self._form_pair(state, g)
        history: BlockHistory = state["history"]
        if not len(history):
            return g  # first-order warm-up until the block has a pair
        with phase(self.timer, "precondition"):
            # The directions of all owned blocks live until the update: one buffer per rank.
            count = self.layout.counts[self.rank]
            out = self._buffer("direction", count, g)[self.segment[block]]
            return history.apply(g, out, self.kernels)

    def direction_scale(self, directions: dict[int, Any]) -> float:
        """``1 / |d|`` (``normalize_to="unit"``) or ``|g| / |d|`` (``"gradient"``), the
        norms over every block of every rank (one reduction); 1 without
        ``normalize_direction`` or where ``|d|`` is 0."""
        if not self.normalize_direction:
            return 1.0
        local = [sum(float(d @ d) for d in directions.values())]
        if self.normalize_to == "gradient":
            local.append(sum(self._grad_squares[b] for b in directions))
        total, _ = self.comm.allreduce_scalars(local)
        if not total[0] > 0:
            return 1.0
        return math.sqrt((total[1] if self.normalize_to == "gradient" else 1.0) / total[0])

    def apply(self, block: int, state: State, theta: Any, d: Any, lr: float,
              scale: float) -> None:
        """Heavy-ball on the normalised direction, as the released code:
        ``v = mu v + scale d``, ``theta -= lr v``."""
        if self.direction_momentum and self.kernels.fused_heavy_ball:
            # v = dir_mom * dir_scale; mu v + scale d = scale (mu dir_scale / scale dir_mom
            # + d): one fused pass over theta, d and the buffer, which then holds v / scale.
            self.kernels.heavy_ball(theta, d, state["dir_mom"],
                                    self.direction_momentum * state["dir_scale"] / scale,
                                    lr * scale)
            state["dir_scale"] = scale
        elif self.direction_momentum:
            # v = mu v + scale d with v stored as dir_mom * dir_scale: two passes, not three.
            buf = state["dir_mom"]
            factor = state["dir_scale"] * self.direction_momentum
            if factor < RESCALE_BELOW:
                _materialise(state, "dir_scale", ("dir_mom",))
                factor = self.direction_momentum
            if factor < RESCALE_BELOW:  # a tiny momentum: decay the buffer directly
                buf *= self.direction_momentum
                axpy(scale, d, buf)
                factor = 1.0
            else:
                state["dir_scale"] = factor
                axpy(scale / factor, d, buf)
            axpy(-lr * factor, buf, theta)
        else:
            axpy(-lr * scale, d, theta)

    # -- state -----------------------------------------------------------------------------
    def export_block(self, state: State) -> State:
        saved = {k: v for k, v in state.items() if k != "history"}
        saved = super().export_block(saved)
        saved.update({f"history_{k}": v for k, v in state["history"].state_dict().items()})
        return saved

    def import_block(self, block: int, saved: State, xp: Any = None) -> State:
        state = super().import_block(block, {k: v for k, v in saved.items()
                                             if not k.startswith("history_")}, xp)
        history = {k[len("history_"):]: v for k, v in saved.items() if k.startswith("history_")}
        state["history"] = BlockHistory.from_state(history, namespace(state["theta_mom"]))
        return state

    def statistics(self) -> dict[str, int]:
        """Pairs stored and skipped over this rank's blocks, and skipped steps."""
        return {
            "npairs": sum(s["npairs"] for s in self.block_state.values()),
            "skipped_pairs": sum(s["skipped_pairs"] for s in self.block_state.values()),
            "skipped_steps": self.skipped_steps,
        }
