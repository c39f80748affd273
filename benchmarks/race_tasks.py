"""What the race (``benchmarks/report_race.py``) trains: a task is a data set, a model
built from a seed, a batch loss, and the loss a run is scored by.

- :class:`MLPTask`: a float32 ReLU MLP (He initialisation) on a synthetic teacher-student
  classification set (Gaussian inputs, labels the argmax of a fixed random tanh teacher
  ``d_in -> 64 -> 10``), scored by its training loss (the data ships with the package).
- :class:`CharLMTask`: the character-level transformer language model of
  :mod:`hpcqn.experiments.charlm` (pre-LayerNorm blocks, its own causal attention, a head
  tied to the token embedding) on Python's standard-library source, scored by the
  held-out loss (nats per character) on the last 10 % of the text.
- :class:`DigitsCNNTask`: the digits CNN of :mod:`hpcqn.experiments.training` (two 3x3
  convolutions of 16 and 32 channels, max-pooling, a linear classifier) on scikit-learn's
  digits (75/25 split, seed 0), scored by the held-out (test) cross-entropy.

A held-out loss is the mean loss over the held-out rows, each rank evaluating every
``size``-th row and one allreduce summing; :meth:`held_out_loss` with ``rows`` evaluates
the first ``rows`` of them (the race's checks during training), without it all of them
(the loss at the budget).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

TEACHER_HIDDEN, CLASSES = 64, 10
_DATA: dict[Any, dict[str, torch.Tensor]] = {}


def _cached(key: Any, build: Any) -> dict[str, torch.Tensor]:
    if key not in _DATA:
        _DATA[key] = build()
    return _DATA[key]


def _mean_over_ranks(model: nn.Module, loss: Any, x: torch.Tensor, y: torch.Tensor,
                     comm: Any) -> float:
    """The mean of ``loss`` over the rows of ``x``, each rank taking every
    ``comm.size``-th row (one allreduce of the sum and the count)."""
    mine = slice(comm.rank, None, comm.size)
    xs, ys = x[mine], y[mine]
    with torch.no_grad():
        total = float(loss(model, xs, ys)) * xs.shape[0] if xs.shape[0] else 0.0
    if comm.size == 1:
        return total / max(xs.shape[0], 1)
    sums, _ = comm.allreduce_scalars([total, float(xs.shape[0])])
    return sums[0] / sums[1]


@dataclass(frozen=True)
class MLPTask:
    """An MLP of ``widths`` (input, hidden..., 10) on ``n_train`` teacher-labelled
    Gaussian inputs; scored by the exact training loss on the first ``eval_samples``."""

    widths: tuple[int, ...]
    n_train: int = 32768
    eval_samples: int = 8192
    held_out: ClassVar[bool] = False

    @property
    def params(self) -> int:
        return sum(a * b + b for a, b in zip(self.widths[:-1], self.widths[1:], strict=True))

    def describe(self) -> str:
        shape = "-".join(str(w) for w in self.widths)
        return (f"MLP {shape} ({self.params / 1e6:.2f}M parameters), {self.n_train} "
                f"training samples")

    def data(self) -> dict[str, torch.Tensor]:
        """``train_x``, ``train_y``: the teacher's data set (the same for every seed)."""
        d_in = self.widths[0]

        def build() -> dict[str, torch.Tensor]:
            g = torch.Generator().manual_seed(20240 + d_in)
            x = torch.randn(self.n_train, d_in, generator=g)
            w1 = torch.randn(d_in, TEACHER_HIDDEN, generator=g) * (2.0 / math.sqrt(d_in))
            w2 = torch.randn(TEACHER_HIDDEN, CLASSES, generator=g)
            y = (torch.tanh(x @ w1) @ w2).argmax(dim=1)
            return {"train_x": x.contiguous(), "train_y": y}

        return _cached(("mlp", d_in, self.n_train), build)

    def model(self, seed: int) -> nn.Module:
        torch.manual_seed(seed)
        widths = self.widths
        layers: list[nn.Module] = []
        for k, (a, b) in enumerate(zip(widths[:-1], widths[1:], strict=True)):
            layers.append(nn.Linear(a, b))
            if k < len(widths) - 2:  # He initialisation before a ReLU (the last: torch's)
                nn.init.kaiming_normal_(layers[-1].weight, nonlinearity="relu")
                nn.init.zeros_(layers[-1].bias)
                layers.append(nn.ReLU())
        return nn.Sequential(*layers)

    @staticmethod
    def loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(model(x), y)

    def score(self, model: nn.Module, comm: Any) -> float:
        """The exact training loss on the first ``eval_samples`` (rank 0; NaN elsewhere)."""
        if comm.rank != 0:
            return math.nan
        data = self.data()
        n = min(self.eval_samples, self.n_train)
        with torch.no_grad():
            return float(self.loss(model, data["train_x"][:n], data["train_y"][:n]))


@dataclass(frozen=True)
class CharLMTask:
    """The character transformer (``width`` wide, ``layers`` blocks of ``heads`` heads)
    on windows of ``context`` characters; ``check_windows`` held-out windows for the
    checks during training (the first ones), the whole held-out text for the score;
    ``max_chars``: the corpus's first characters only (0: all of it)."""

    width: int = 48
    layers: int = 2
    heads: int = 4
    context: int = 32
    check_windows: int = 1024
    max_chars: int = 0
    held_out: ClassVar[bool] = True

    def data(self) -> dict[str, torch.Tensor]:
        from hpcqn.experiments.charlm import text_windows

        return _cached(("charlm", self.context, self.max_chars),
                       lambda: text_windows(self.context, self.max_chars or None))

    @property
    def params(self) -> int:
        return sum(p.numel() for p in self.model(0).parameters())

    def describe(self) -> str:
        data = self.data()
        return (f"character transformer, width {self.width}, {self.layers} blocks of "
                f"{self.heads} heads, context {self.context} ({self.params / 1e3:.0f}k "
                f"parameters), {data['train_x'].shape[0]} training windows of Python's "
                f"source, {data['test_x'].shape[0]} held out")

    def model(self, seed: int) -> nn.Module:
        from hpcqn.experiments.charlm import CharTransformer

        torch.manual_seed(seed)
        return CharTransformer(self.width, self.layers, self.heads, self.context)

    @staticmethod
    def loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        from hpcqn.experiments.charlm import loss

        return loss(model, x, y)

    def held_out_loss(self, model: nn.Module, comm: Any, rows: int | None = None) -> float:
        data = self.data()
        return _mean_over_ranks(model, self.loss, data["test_x"][:rows],
                                data["test_y"][:rows], comm)

    def check(self, model: nn.Module, comm: Any) -> float:
        return self.held_out_loss(model, comm, self.check_windows)

    def score(self, model: nn.Module, comm: Any) -> float:
        return self.held_out_loss(model, comm)


@dataclass(frozen=True)
class DigitsCNNTask:
    """The digits CNN (:func:`hpcqn.experiments.training.make_model`, ``"cnn"``) on the
    digits' 1347 training images, scored by the cross-entropy on the 450 held out."""

    held_out: ClassVar[bool] = True

    def data(self) -> dict[str, torch.Tensor]:
        from hpcqn.experiments.training import digits

        return _cached(("digits",), lambda: digits(seed=0))

    @property
    def params(self) -> int:
        return sum(p.numel() for p in self.model(0).parameters())

    def describe(self) -> str:
        data = self.data()
        return (f"digits CNN, conv 3x3 16 and 32 channels, max-pool, linear "
                f"({self.params / 1e3:.0f}k parameters), {data['train_x'].shape[0]} "
                f"training images, {data['test_x'].shape[0]} held out")

    def model(self, seed: int) -> nn.Module:
        from hpcqn.experiments.training import make_model

        return make_model("cnn", seed=seed)

    @staticmethod
    def loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(model(x), y)

    def held_out_loss(self, model: nn.Module, comm: Any, rows: int | None = None) -> float:
        data = self.data()
        return _mean_over_ranks(model, self.loss, data["test_x"][:rows],
                                data["test_y"][:rows], comm)

    def check(self, model: nn.Module, comm: Any) -> float:
        return self.held_out_loss(model, comm)

    def score(self, model: nn.Module, comm: Any) -> float:
        return self.held_out_loss(model, comm)


Task = MLPTask | CharLMTask | DigitsCNNTask


def matrix_parameters(model: nn.Module) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(the 2-D weight matrices of the model's hidden layers, every other parameter): the
    split Muon's documentation prescribes, with embeddings (and a head tied to one) on the
    other side; convolution filters (4-D) are on the other side too, as
    ``torch.optim.Muon`` takes 2-D parameters only."""
    embedded = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    matrices, others = [], []
    for p in model.parameters():
        (matrices if p.ndim == 2 and id(p) not in embedded else others).append(p)
    return matrices, others


def batch_rows(order: torch.Tensor, step: int, batch: int, per_epoch: int, rank: int,
               size: int) -> torch.Tensor:
    """This rank's rows of the global batch ``step`` of an epoch in ``order``: every
    ``size``-th row of it, from ``rank``."""
    start = (step % per_epoch) * batch
    return order[start + rank : start + batch : size]
