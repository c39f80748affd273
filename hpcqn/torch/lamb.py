"""LAMB (You et al., ICLR 2020) as a ``torch.optim.Optimizer``: Adam's direction plus
decoupled weight decay, scaled per parameter tensor by the trust ratio
``||p|| / ||r||`` (1 where either norm is 0).

torch conventions (torch's generic optimizer tests run on it in
tests/test_torch_suite.py): ``lr`` may be a one-element tensor; a complex parameter
steps as its ``torch.view_as_real`` view does (its trust ratio is that of the whole
tensor); a sparse gradient raises ``RuntimeError``; ``foreach``, ``fused``,
``differentiable``, ``capturable`` and ``maximize`` are not options.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from .. import options
from ..options import Rule
from . import conventions


def _real(t: torch.Tensor) -> torch.Tensor:
    return torch.view_as_real(t) if t.is_complex() else t


class LAMB(torch.optim.Optimizer):
    OPTION_RULES = {"lr": Rule("float", low=0.0, open_low=True),
                    "betas": Rule("pair", low=0.0, high=1.0, open_high=True),
                    "eps": Rule("float", low=0.0, open_low=True),
                    "weight_decay": Rule("float", low=0.0)}
    NOT_OPTIONS = ("params",)

    def __init__(self, params: Iterable[Any], lr: float | torch.Tensor = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-6,
                 weight_decay: float = 0.0):
        options.validate(self, {**locals(), "lr": conventions.learning_rate(lr, "LAMB")})
        super().__init__(params, {"lr": lr, "betas": tuple(betas), "eps": eps,
                                  "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:  # type: ignore[override]
        loss = None
        if closure is not None:
            loss = conventions.call_closure(closure, "LAMB")
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            lr = float(group["lr"])
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("LAMB does not support sparse gradients")
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                state["step"] += 1
                t = state["step"]
                param, grad = _real(p), _real(p.grad)
                m, v = _real(state["exp_avg"]), _real(state["exp_avg_sq"])
                m.mul_(beta1).add_(grad, alpha=1.0 - beta1)
                v.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
                r = (m / (1.0 - beta1**t)) / ((v / (1.0 - beta2**t)).sqrt() + group["eps"])
                if group["weight_decay"]:
                    r.add_(param, alpha=group["weight_decay"])
                p_norm, r_norm = float(param.norm()), float(r.norm())
                trust = p_norm / r_norm if p_norm > 0 and r_norm > 0 else 1.0
                param.add_(r, alpha=-lr * trust)
        return loss
