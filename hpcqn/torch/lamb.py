"""LAMB (You et al., ICLR 2020) as a ``torch.optim.Optimizer``: Adam's direction plus
decoupled weight decay, scaled per parameter tensor by the trust ratio
``||p|| / ||r||`` (1 where either norm is 0)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from .. import options
from ..options import Rule


class LAMB(torch.optim.Optimizer):
    OPTION_RULES = {"lr": Rule("float", low=0.0, open_low=True),
                    "betas": Rule("pair", low=0.0, high=1.0, open_high=True),
                    "eps": Rule("float", low=0.0, open_low=True),
                    "weight_decay": Rule("float", low=0.0)}
    NOT_OPTIONS = ("params",)

    def __init__(self, params: Iterable[Any], lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-6,
                 weight_decay: float = 0.0):
        options.validate(self, locals())
        super().__init__(params, {"lr": lr, "betas": tuple(betas), "eps": eps,
                                  "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                state["step"] += 1
                t = state["step"]
                m, v = state["exp_avg"], state["exp_avg_sq"]
                m.mul_(beta1).add_(p.grad, alpha=1.0 - beta1)
                v.mul_(beta2).addcmul_(p.grad, p.grad, value=1.0 - beta2)
                r = (m / (1.0 - beta1**t)) / ((v / (1.0 - beta2**t)).sqrt() + group["eps"])
                if group["weight_decay"]:
                    r.add_(p, alpha=group["weight_decay"])
                p_norm, r_norm = float(p.norm()), float(r.norm())
                trust = p_norm / r_norm if p_norm > 0 and r_norm > 0 else 1.0
                p.add_(r, alpha=-group["lr"] * trust)
        return loss
