# ruff: noqa: E402  (one thread per process, set before NumPy loads)
"""MKOR as the authors' released code runs it against hpcqn's MKOR, one difference at a
time, on the digits MLP (docs/algorithms.md, section 3.11-3.12). Loss only, no timing.

``Reference`` is a small stand-alone torch MKOR (written from a reading of the released
code, Mohammad-Mozaffari/mkor, ``mkor/mkor.py`` and ``mkor/utils/factors.py``; none of
its code is used) whose every step that differs between the two implementations is a
switch, so one switch at a time can be flipped:

- ``update``: ``"released"``: ``X <- SM(m X + (1 - m) I, v)``, the Sherman-Morrison
  inverse of ``inv(m X + (1 - m) I) + v v^T`` (full weight on ``v v^T``, ``m = 0.95``
  fixed); ``"exact"``: hpcqn's exact inverse of ``gam F + (1 - gam) v v^T`` with its
  fused stabiliser (``max diag X > eps_stab: X <- zeta X + (1 - zeta) I``);
- ``first``: ``"reset"``: the first update round sets ``X = I`` and discards its
  statistics (released); ``"use"``: it is a Sherman-Morrison step like the others;
- ``reset``: the released stabiliser: after an update, ``max|X| > 2`` flags BOTH factors
  of the layer, and the next update round of a flagged factor is replaced by a reset,
  ``"identity"`` (what the released code does: its test ``module not in factor_dict``
  is always true) or ``"mix"`` (``0.9 X + 0.1 I``, what its code intends); ``"none"``;
- ``clamp_g``: clamp the output-gradient rows (after the ``x B`` scaling) to ``+-100``;
- ``norm``: ``"sum"``: rescale by ``(|gW| + |gb|) / (|DW| + |Db|)`` (released),
  ``"frobenius"``: by ``||[gW | gb]|| / ||[DW | Db]||`` (hpcqn);
- ``warmup``: update the factors at every step for the first ``warmup`` steps;
- ``half``: keep the inverses in float16 (released default ``half_precision=True``).

With ``update="exact", first="use", reset="none", clamp_g=False, norm="frobenius"``
it is hpcqn's MKOR; ``--check`` confirms it gives ``hpcqn.torch.MKOR``'s losses.

    python benchmarks/compare_mkor.py [--seeds 2] [--epochs 15] [--out FILE] [--check]
"""

from __future__ import annotations

import report_common as rc

rc.one_thread()

import argparse
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, replace

import torch
from torch import nn

GRID = (0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0)


@dataclass(frozen=True)
class Variant:
    update: str = "exact"  # "released" | "exact"
    first: str = "use"  # "reset" | "use"
    reset: str = "none"  # "identity" | "mix" | "none"
    clamp_g: bool = False
    norm: str = "frobenius"  # "sum" | "frobenius"
    warmup: int = 0
    half: bool = False
    factor_freq: int = 10
    gam: float = 0.95  # exact update's decay; the released one's mixing weight m
    eps_stab: float = 2.0
    zeta: float = 0.9
    momentum: float = 0.9
    weight_decay: float = 0.0


HPCQN = Variant()
RELEASED = Variant(update="released", first="reset", reset="identity", clamp_g=True,
                   norm="sum")


class Reference:
    """MKOR over the ``nn.Linear`` layers of ``model`` with the switches of ``Variant``,
    stepping SGD (with momentum) on the preconditioned gradients."""

    def __init__(self, model: nn.Module, lr: float, v: Variant):
        self.v = v
        self.layers = [m for m in model.modules() if isinstance(m, nn.Linear)]
        self.sgd = torch.optim.SGD(model.parameters(), lr=lr, momentum=v.momentum,
                                   weight_decay=v.weight_decay)
        self.param_groups = self.sgd.param_groups
        self.steps = 0
        dt = torch.float16 if v.half else torch.float32
        self.X = {}  # (layer index, "A"|"G") -> inverse
        for i, m in enumerate(self.layers):
            self.X[i, "A"] = torch.eye(m.in_features + (m.bias is not None), dtype=dt)
            self.X[i, "G"] = torch.eye(m.out_features, dtype=dt)
        self.flag = {key: v.first == "reset" for key in self.X}
        self.rows: dict[tuple[int, str], torch.Tensor] = {}
        self.stabilised = 0
        for i, m in enumerate(self.layers):
            m.register_forward_pre_hook(self._input_hook(i))
            m.register_full_backward_hook(self._grad_hook(i))

    def _recording(self) -> bool:
        return self.steps % self.v.factor_freq == 0 or self.steps < self.v.warmup

    def _input_hook(self, i):
        def hook(module, inputs):
            if torch.is_grad_enabled() and self._recording():
                x = inputs[0].detach().reshape(-1, module.in_features)
                if module.bias is not None:
                    x = torch.cat([x, x.new_ones(x.shape[0], 1)], 1)
                self.rows[i, "A"] = x.clamp(-100.0, 100.0)
        return hook

    def _grad_hook(self, i):
        def hook(module, grad_input, grad_output):
            if self._recording():
                g = grad_output[0].detach().reshape(-1, module.out_features)
                g = g * g.shape[0]
                if self.v.clamp_g:
                    g = g.clamp(-100.0, 100.0)
                self.rows[i, "G"] = g
        return hook

    def zero_grad(self):
        self.sgd.zero_grad()

    def _update(self, key, vec):
        v = self.v
        X = self.X[key]
        if self.flag[key] and v.reset != "none":
            eye = torch.eye(X.shape[0], dtype=X.dtype)
            X = eye if v.reset == "identity" else v.zeta * X + (1 - v.zeta) * eye
            self.flag[key] = False
            self.X[key] = X
            return
        if self.flag[key]:  # first="reset" with reset="none": the first round only
            self.flag[key] = False
            return
        if v.update == "released":
            dt = X.dtype
            vec = vec.to(dt).reshape(-1, 1)
            Xp = v.gam * X + (1 - v.gam) * torch.eye(X.shape[0], dtype=dt)
            t1, t2 = Xp @ vec, vec.t() @ Xp
            X = Xp - (1 / (1 + t2 @ vec)) * t1 @ t2
            if float(X.abs().max()) > v.eps_stab:
                i = key[0]
                self.flag[i, "A"] = self.flag[i, "G"] = True
                self.stabilised += 1
        else:
            x = X.to(torch.float32)
            vec = vec.to(torch.float32)
            fired = float(torch.diagonal(x).max()) > v.eps_stab
            if fired:
                x = v.zeta * x + (1 - v.zeta) * torch.eye(x.shape[0])
                self.stabilised += 1
            u = x @ vec
            x = (x - (1 - v.gam) * torch.outer(u, u) / (v.gam + (1 - v.gam) * (vec @ u))) \
                / v.gam
            X = ((x + x.t()) / 2).to(X.dtype)
        self.X[key] = X

    def step(self):
        v = self.v
        if self._recording():
            for i in range(len(self.layers)):  # the released order: A, then G
                self._update((i, "A"), self.rows[i, "A"].mean(0))
            for i in range(len(self.layers)):
                self._update((i, "G"), self.rows[i, "G"].mean(0))
            self.rows.clear()
        for i, m in enumerate(self.layers):
            gw, gb = m.weight.grad, m.bias.grad
            G = torch.cat([gw, gb.reshape(-1, 1)], 1)
            D = self.X[i, "G"].float() @ G @ self.X[i, "A"].float()
            dw, db = D[:, :-1], D[:, -1]
            if v.norm == "sum":
                ratio = (gw.norm() + gb.norm()) / (dw.norm() + db.norm())
            else:
                ratio = G.norm() / D.norm()
            if not torch.isfinite(ratio):
                continue
            gw.copy_(dw * ratio)
            gb.copy_(db * ratio)
        self.sgd.step()
        self.steps += 1


def run(variant: Variant | None, lr: float, seed: int, epochs: int, batch: int = 64,
        schedule: str = "cosine", hpcqn_options: dict | None = None) -> float:
    """Final training loss of the digits MLP (hidden 128) after ``epochs`` with batch
    ``batch`` and a cosine schedule, as ``hpcqn.experiments.training.train`` trains it;
    ``variant=None`` runs ``hpcqn.torch.MKOR`` (with ``hpcqn_options``)."""
    from hpcqn.comm import get_comm
    from hpcqn.experiments.training import digits, evaluate, loss_of, make_model
    from hpcqn.torch import MKOR
    from hpcqn.torch.data import GlobalBatches

    data = digits(seed)
    model = make_model("mlp", 128, seed)
    if variant is None:
        opt = MKOR(model, lr=lr, **{"factor_freq": 10, **(hpcqn_options or {})})
    else:
        opt = Reference(model, lr, variant)
    first = opt.sgd if variant is not None else opt
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(first, T_max=epochs) \
        if schedule == "cosine" else None
    batches = GlobalBatches(data["train_y"].numel(), batch, get_comm(), seed=seed)
    for epoch in range(epochs):
        batches.set_epoch(epoch)
        for rows, weight in batches:
            idx = torch.as_tensor(rows)
            opt.zero_grad()
            loss = loss_of(model, data["train_x"][idx], data["train_y"][idx], "classify") * weight
            if not torch.isfinite(loss):
                return math.inf
            loss.backward()
            opt.step()
        if sched is not None:
            sched.step()
    final = evaluate(model, data)["train_loss"]
    return final if math.isfinite(final) else math.inf


def best(variant: Variant | None, seeds: int, epochs: int, grid=GRID, **kw) -> dict:
    """Worst-over-seeds final loss per lr, and the best lr (report_convergence's rule)."""
    scores = {}
    for lr in grid:
        losses = []
        for s in range(seeds):
            try:
                losses.append(run(variant, lr, s, epochs, **kw))
            except (RuntimeError, ValueError, ArithmeticError):
                losses.append(math.inf)
        scores[lr] = max(losses)
    lr = min(grid, key=lambda r: (scores[r], r))
    return {"lr": lr, "loss": scores[lr], "grid": scores}


CHANGES = {  # one released behaviour on top of hpcqn's (each flips one switch)
    "update=released": {"update": "released"},
    "first=reset": {"first": "reset"},
    "reset=identity": {"reset": "identity"},
    "clamp_g": {"clamp_g": True},
    "norm=sum": {"norm": "sum"},
    "warmup=10": {"warmup": 10},
    "half": {"half": True},
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--out", default=None)
    p.add_argument("--check", action="store_true",
                   help="the hpcqn switches against hpcqn.torch.MKOR, one lr, 2 epochs")
    p.add_argument("--only", default=None, help="row names separated by ;")
    args = p.parse_args()
    rc.torch_one_thread()
    if args.check:
        for lr in (0.1, 1.0):
            a, b = run(None, lr, 0, 2), run(HPCQN, lr, 0, 2)
            print(f"lr {lr}: hpcqn.torch.MKOR {a:.6e}  Reference(hpcqn switches) {b:.6e}")
        return
    rows = {"hpcqn.torch.MKOR": None, "reference, hpcqn switches": HPCQN,
            "reference, released switches": RELEASED}
    for name, change in CHANGES.items():
        if name != "reset=identity":  # the released reset needs the released update
            rows[f"hpcqn + {name}"] = replace(HPCQN, **change)
    for name, change in CHANGES.items():
        undo = {k: getattr(HPCQN, k) for k in change}
        if name == "reset=identity":
            undo = {"reset": "none"}
        rows[f"released - {name}"] = replace(RELEASED, **undo)
    if args.only:
        keep = args.only.split(";")
        rows = {k: v for k, v in rows.items() if k in keep}
    results = {}
    for name, variant in rows.items():
        started = time.perf_counter()
        r = best(variant, args.seeds, args.epochs)
        results[name] = {"variant": None if variant is None else asdict(variant), **r}
        grid = " ".join(f"{lr:g}:{loss:.2e}" for lr, loss in r["grid"].items())
        print(f"{name:34s} lr {r['lr']:<6g} loss {r['loss']:.3e}   [{grid}] "
              f"({time.perf_counter() - started:.0f} s)", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    sys.exit(main())
