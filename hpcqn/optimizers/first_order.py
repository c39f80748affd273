"""First-order baselines on the same data-parallel block machinery as mL-BFGS, so that
comparisons are like for like (same reduce-scatter, same allgatherv, same communicator).

SGD (PyTorch's convention): ``v = mu v + g`` (``v = g`` at the first step),
``d = g + mu v`` with Nesterov, else ``d = v``; ``theta -= lr d``.
Adam (Kingma and Ba, 2015): ``m = b1 m + (1 - b1) g``, ``v = b2 v + (1 - b2) g^2``,
``theta -= lr (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)``; weight decay is added to
``g`` (L2, as ``torch.optim.Adam``).
"""

from __future__ import annotations

from typing import Any

from .. import options
from ..backend import namespace
from ..layout import BlockLayout
from ..options import Rule
from .blockwise import BlockOptimizer, Schedule, State


class SGD(BlockOptimizer):
    OPTION_RULES = {"momentum": Rule("float", low=0.0, high=1.0, open_high=True),
                    "nesterov": Rule("bool")}

    def __init__(
        self,
        layout: BlockLayout,
        comm: Any = None,
        lr: Schedule = 0.1,
        momentum: float = 0.9,
        nesterov: bool = False,
        weight_decay: float = 0.0,
        mode: str = "replicated",
    ):
        options.validate(self, locals())
        super().__init__(layout, comm, lr=lr, weight_decay=weight_decay, mode=mode)
        if nesterov and not momentum:
            raise ValueError("nesterov needs momentum > 0")
        self.momentum, self.nesterov = float(momentum), bool(nesterov)

    def init_block(self, block: int, theta: Any, g: Any) -> State:
        return {"velocity": g.copy(), "first_step": self.step_count}

    def direction(self, block: int, state: State, theta: Any, g: Any) -> Any:
        if not self.momentum:
            return g
        v = state["velocity"]
        if self.step_count != state["first_step"]:
            v *= self.momentum
            v += g
        if self.nesterov:
            g += self.momentum * v
            return g
        return v


class Adam(BlockOptimizer):
    OPTION_RULES = {"betas": Rule("pair", low=0.0, high=1.0, open_high=True),
                    "eps": Rule("float", low=0.0, open_low=True)}

    def __init__(
        self,
        layout: BlockLayout,
        comm: Any = None,
        lr: Schedule = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        mode: str = "replicated",
    ):
        options.validate(self, locals())
        super().__init__(layout, comm, lr=lr, weight_decay=weight_decay, mode=mode)
        b1, b2 = (float(b) for b in betas)
        self.b1, self.b2, self.eps = b1, b2, float(eps)

    def init_block(self, block: int, theta: Any, g: Any) -> State:
        xp = namespace(theta)
        return {"m": xp.zeros_like(theta), "v": xp.zeros_like(theta), "t": 0}

    def direction(self, block: int, state: State, theta: Any, g: Any) -> Any:
        xp = namespace(g)
        state["t"] += 1
        t, m, v = state["t"], state["m"], state["v"]
        m *= self.b1
        m += (1.0 - self.b1) * g
        v *= self.b2
        v += (1.0 - self.b2) * g * g
        denominator = xp.sqrt(v / (1.0 - self.b2**t))
        denominator += self.eps
        return (m / (1.0 - self.b1**t)) / denominator
