"""Standard unconstrained test problems, distributed by slices.

Each problem gives its full objective (``value_and_grad`` on the whole vector, for
SciPy references) and :meth:`Problem.distributed`, which returns a callback in the shape
``hpcqn.minimize`` expects plus this rank's slice of the starting point. Problems made
of independent groups of variables (extended Rosenbrock, Powell, Wood; the diagonal
quadratic) split at group boundaries and evaluate locally with no communication;
coupled ones (Broyden tridiagonal, logistic regression split by features) communicate
inside the callback, as a simulation code would.

The separable functions' values, gradients and starts live in :mod:`hpcqn.experiments.mgh`
(NumPy only, for scripts outside hpcqn's environment).

Sources: Moré, Garbow and Hillstrom, "Testing unconstrained optimization software",
ACM TOMS 7 (1981), problems 21, 22, 30 and 14 (extended Rosenbrock, extended Powell
singular, Broyden tridiagonal, Wood, extended to n variables by repeating blocks).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from ..comm import get_comm, serial_comm
from ..layout import SliceLayout
from ..minimize import minimize
from ..options import Option, Rule, declared
from . import mgh

Fun = Callable[[Any], tuple[float, Any]]
Local = tuple[Fun, np.ndarray]  # (callback, this rank's slice of x0)
DTYPES = ("float32", "float64")


class Problem:
    """A test problem of ``n`` variables; ``group`` > 0 when it splits into independent
    groups of that many variables."""

    name = ""
    group = 0
    # The parameters a job file's [problem] table may set (hpcqn.options rules; the
    # subclasses add theirs). See :func:`parameters`.
    OPTION_RULES = {"n": Rule("int", low=1), "dtype": Rule("str", choices=DTYPES)}

    @classmethod
    def check_parameters(cls, params: Mapping[str, Any]) -> None:
        """What the rules cannot say about checked ``params`` (before anything is built):
        a ValueError naming the parameter."""
        n = params.get("n")
        if cls.group and isinstance(n, int) and n % cls.group:
            raise ValueError(f"n: {cls.name} needs n divisible by {cls.group}, got {n}")

    def __init__(self, n: int, dtype: Any = np.float64):
        if self.group and n % self.group:
            raise ValueError(f"{self.name} needs n divisible by {self.group}, got {n}")
        if n < 1:
            raise ValueError(f"n must be positive, got {n}")
        self.n = int(n)
        self.dtype = np.dtype(dtype)

    def x0(self) -> np.ndarray:
        raise NotImplementedError

    def value_and_grad(self, x: np.ndarray) -> tuple[float, np.ndarray]:
        raise NotImplementedError

    def solution(self) -> np.ndarray | None:
        """The known minimiser, where there is one."""
        return None

    def layout(self, nranks: int) -> SliceLayout:
        """An even split over ``nranks`` that respects the problem's groups."""
        unit = self.group or 1
        return SliceLayout(tuple(c * unit for c in SliceLayout.even(self.n // unit, nranks).counts))

    def distributed(self, comm: Any = None, layout: SliceLayout | None = None) -> Local:
        """``(fun, x0_local)`` for this rank of ``comm``."""
        c = get_comm(comm)
        layout = layout or self.layout(c.size)
        if layout.nranks != c.size or layout.n != self.n:
            raise ValueError(f"layout {layout.counts} does not fit n={self.n} on {c.size} ranks")
        part = layout.local_slice(c.rank)
        x0 = self.x0()[part].copy()
        if self.group:
            if any(count % self.group for count in layout.counts):
                raise ValueError(f"{self.name} slices must be multiples of {self.group}")
            return self.value_and_grad, x0

        def fun(x_local: Any) -> tuple[float, Any]:
            x = c.allgatherv(x_local, list(layout.counts))
            f, g = self.value_and_grad(x)
            return (f if c.rank == 0 else 0.0), g[part]

        return fun, x0


class _Separable(Problem):
    """One of :mod:`hpcqn.experiments.mgh`'s functions (its value, gradient and start)."""

    def x0(self) -> np.ndarray:
        return mgh.start(self.name, self.n, self.dtype)

    def value_and_grad(self, x: Any) -> tuple[float, Any]:
        return mgh.FUNCTIONS[self.name](x)


class ExtendedRosenbrock(_Separable):
    """sum_i 100 (x_2i - x_2i-1^2)^2 + (1 - x_2i-1)^2, from (-1.2, 1, ...); minimiser 1."""

    name, group = "extended_rosenbrock", 2

    def solution(self) -> np.ndarray:
        return np.ones(self.n, dtype=self.dtype)


class ExtendedPowell(_Separable):
    """Powell's singular function repeated: minimiser 0, singular Hessian there."""

    name, group = "extended_powell", 4

    def solution(self) -> np.ndarray:
        return np.zeros(self.n, dtype=self.dtype)


class ExtendedWood(_Separable):
    """Wood's function repeated over groups of four, from (-3, -1, -3, -1); minimiser 1."""

    name, group = "extended_wood", 4

    def solution(self) -> np.ndarray:
        return np.ones(self.n, dtype=self.dtype)


class BroydenTridiagonal(Problem):
    """sum_i r_i^2, r_i = (3 - 2 x_i) x_i - x_i-1 - 2 x_i+1 + 1 (x_0 = x_n+1 = 0), from -1."""

    name = "broyden_tridiagonal"

    def x0(self) -> np.ndarray:
        return -np.ones(self.n, dtype=self.dtype)

    def value_and_grad(self, x: Any) -> tuple[float, Any]:
        r = (3 - 2 * x) * x + 1
        r[1:] -= x[:-1]
        r[:-1] -= 2 * x[1:]
        g = 2 * r * (3 - 4 * x)
        g[:-1] -= 2 * r[1:]  # dr_i+1/dx_i = -1
        g[1:] -= 4 * r[:-1]  # dr_i-1/dx_i = -2
        return float(r @ r), g


class DiagonalQuadratic(Problem):
    """0.5 x' A x - b' x with A = diag(logspace(0, log10(cond), n)), b = 1: minimiser 1/a."""

    name = "quadratic"
    group = 1
    OPTION_RULES = {"cond": Rule("float", low=1.0)}

    def __init__(self, n: int, dtype: Any = np.float64, cond: float = 1e4):
        super().__init__(n, dtype)
        self.cond = float(cond)
        self.diagonal = np.logspace(0.0, np.log10(self.cond), self.n).astype(self.dtype)

    def x0(self) -> np.ndarray:
        return np.zeros(self.n, dtype=self.dtype)

    @staticmethod
    def _value_and_grad(a: Any, x: Any) -> tuple[float, Any]:
        ax = a * x
        return float(0.5 * (x @ ax) - x.sum()), ax - 1.0

    def value_and_grad(self, x: Any) -> tuple[float, Any]:
        return self._value_and_grad(self.diagonal, x)

    def distributed(self, comm: Any = None, layout: SliceLayout | None = None) -> Local:
        c = get_comm(comm)
        layout = layout or self.layout(c.size)
        part = layout.local_slice(c.rank)
        a = self.diagonal[part]
        return (lambda x: self._value_and_grad(a, x)), self.x0()[part]

    def solution(self) -> np.ndarray:
        return 1.0 / self.diagonal


class LogisticRegression(Problem):
    """L2-regularised logistic loss on scikit-learn's breast-cancer data (569 samples,
    30 standardised features + intercept), weights split across ranks by feature:
    ``f(w) = sum_i log(1 + exp(-y_i a_i.w)) + lam/2 |w|^2``."""

    name = "logistic"
    weights = 31  # 30 features + the intercept
    OPTION_RULES = {"lam": Rule("float", low=0.0)}

    @classmethod
    def check_parameters(cls, params: Mapping[str, Any]) -> None:
        if params.get("n", cls.weights) != cls.weights:
            raise ValueError(f"n: logistic has n = {cls.weights} weights, got {params['n']}")

    def __init__(self, n: int = 31, dtype: Any = np.float64, lam: float = 1.0):
        from sklearn.datasets import load_breast_cancer

        data = load_breast_cancer()
        features = (data.data - data.data.mean(0)) / data.data.std(0)
        self.matrix = np.hstack([features, np.ones((features.shape[0], 1))]).astype(dtype)
        self.labels = np.where(data.target == 1, 1.0, -1.0).astype(dtype)
        if n != self.matrix.shape[1]:
            raise ValueError(f"logistic has n = {self.matrix.shape[1]} weights, got n = {n}")
        super().__init__(n, dtype)
        self.lam = float(lam)

    def x0(self) -> np.ndarray:
        return np.zeros(self.n, dtype=self.dtype)

    def _loss(self, margins: Any) -> tuple[float, Any]:
        z = -self.labels * margins
        loss = np.logaddexp(0.0, z).sum()
        weights = -self.labels / (1.0 + np.exp(-z))  # d loss / d margin
        return float(loss), weights

    def value_and_grad(self, x: Any) -> tuple[float, Any]:
        loss, weights = self._loss(self.matrix @ x)
        return loss + 0.5 * self.lam * float(x @ x), self.matrix.T @ weights + self.lam * x

    def distributed(self, comm: Any = None, layout: SliceLayout | None = None) -> Local:
        c = get_comm(comm)
        layout = layout or self.layout(c.size)
        columns = self.matrix[:, layout.local_slice(c.rank)]

        def fun(w: Any) -> tuple[float, Any]:
            margins = c.allreduce(columns @ w)  # every rank needs the full margins
            loss, weights = self._loss(margins)
            f_part = (loss if c.rank == 0 else 0.0) + 0.5 * self.lam * float(w @ w)
            return f_part, columns.T @ weights + self.lam * w

        return fun, np.zeros(columns.shape[1], dtype=self.dtype)


PROBLEMS: dict[str, type[Problem]] = {
    cls.name: cls
    for cls in (
        ExtendedRosenbrock, ExtendedPowell, ExtendedWood, BroydenTridiagonal,
        DiagonalQuadratic, LogisticRegression,
    )
}


def parameters(problem: type) -> tuple[dict[str, Option], tuple[str, ...]]:
    """The parameters of a problem class as :mod:`hpcqn.options` declarations (from its
    constructor and ``OPTION_RULES``), and the names of those without a default (which
    a job file must give)."""
    rules: dict[str, Rule] = {}
    for klass in reversed(problem.__mro__):
        rules.update(vars(klass).get("OPTION_RULES", {}))
    signature = list(inspect.signature(problem.__init__).parameters.values())[1:]
    required = tuple(p.name for p in signature if p.default is inspect.Parameter.empty
                     and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD))
    spec = {name: Option(name, None, rules[name]) for name in required}
    spec.update(declared(problem))
    return spec, required


def make_problem(name: str, **params: Any) -> Problem:
    """A problem by name (see ``PROBLEMS``) with its parameters (``n``, ``dtype``, ...)."""
    if name not in PROBLEMS:
        raise ValueError(f"unknown problem {name!r}; known: {', '.join(sorted(PROBLEMS))}")
    return PROBLEMS[name](**params)


class DigitsSoftmax:
    """Multinomial logistic regression on scikit-learn's digits (8x8 images, 10 classes):
    ``W`` is 10 x 65 (64 standardised pixels + intercept), flattened by class, so the
    natural blocks are one per class (``block_sizes``). Loss: mean cross-entropy plus
    ``l2 / 2 |W|^2``. A 75/25 train/test split by ``seed``.

    For data parallelism each global batch is split across ranks and every rank returns
    ``nranks / batch_size`` times the sum over its rows, so the average over ranks is the
    mean over the global batch whatever the split.
    """

    name = "digits_softmax"
    classes, features = 10, 65
    OPTION_RULES = {"l2": Rule("float", low=0.0), "seed": Rule("int", low=0),
                    "dtype": Rule("str", choices=DTYPES)}

    @classmethod
    def check_parameters(cls, params: Mapping[str, Any]) -> None:
        """Nothing beyond the rules."""

    def __init__(self, l2: float = 1e-4, seed: int = 0, dtype: Any = np.float64):
        from sklearn.datasets import load_digits

        data = load_digits()
        rng = np.random.default_rng(seed)
        order = rng.permutation(data.data.shape[0])
        n_train = int(0.75 * order.size)
        train, test = order[:n_train], order[n_train:]
        mean, std = data.data[train].mean(0), data.data[train].std(0) + 1e-8

        def features(rows: np.ndarray) -> np.ndarray:
            scaled = (data.data[rows] - mean) / std
            return np.hstack([scaled, np.ones((rows.size, 1))]).astype(dtype)

        self.train_x, self.train_y = features(train), data.target[train]
        self.test_x, self.test_y = features(test), data.target[test]
        self.l2, self.seed, self.dtype = float(l2), int(seed), np.dtype(dtype)
        self.n = self.classes * self.features
        self.block_sizes = [self.features] * self.classes

    def x0(self) -> np.ndarray:
        return np.zeros(self.n, dtype=self.dtype)

    def _loss_sum(self, w: Any, inputs: np.ndarray, labels: np.ndarray) -> tuple[float, Any]:
        weights = w.reshape(self.classes, self.features)
        logits = inputs @ weights.T
        logits -= logits.max(axis=1, keepdims=True)
        log_norm = np.log(np.exp(logits).sum(axis=1))
        picked = logits[np.arange(labels.size), labels]
        probabilities = np.exp(logits - log_norm[:, None])
        probabilities[np.arange(labels.size), labels] -= 1.0
        return float((log_norm - picked).sum()), (probabilities.T @ inputs).ravel()

    def batch_loss(self, w: Any, batch: tuple[np.ndarray, float]) -> tuple[float, Any]:
        """``fun(x, batch)`` for :func:`hpcqn.minimize_stochastic`."""
        rows, scale = batch
        loss, grad = self._loss_sum(w, self.train_x[rows], self.train_y[rows])
        return scale * loss + 0.5 * self.l2 * float(w @ w), scale * grad + self.l2 * w

    def train_loss(self, w: Any) -> float:
        """The full training objective (mean cross-entropy + L2)."""
        loss, _ = self._loss_sum(w, self.train_x, self.train_y)
        return loss / self.train_y.size + 0.5 * self.l2 * float(w @ w)

    def test_accuracy(self, w: Any) -> float:
        weights = w.reshape(self.classes, self.features)
        return float(np.mean(np.argmax(self.test_x @ weights.T, axis=1) == self.test_y))

    def batches(self, batch_size: int, rank: int = 0, nranks: int = 1) -> Callable[[int], list]:
        """A callable epoch -> this rank's batches: the training rows shuffled per epoch
        (seeded), cut into global batches of ``batch_size`` (the last partial one
        dropped), rank ``r`` taking rows ``r::nranks`` of each."""
        if batch_size < nranks:
            raise ValueError(f"batch_size {batch_size} is smaller than the rank count {nranks}")

        def for_epoch(epoch: int) -> list[tuple[np.ndarray, float]]:
            order = np.random.default_rng((self.seed, epoch)).permutation(self.train_y.size)
            count = order.size // batch_size
            return [
                (order[i * batch_size : (i + 1) * batch_size][rank::nranks], nranks / batch_size)
                for i in range(count)
            ]

        return for_epoch

    def optimum(self) -> float:
        """The minimum of :meth:`train_loss` (full-batch L-BFGS to a tight tolerance)."""
        full = (np.arange(self.train_y.size), 1.0 / self.train_y.size)
        result = minimize(lambda w: self.batch_loss(w, full), self.x0(),
                          comm=serial_comm(), options={"gtol": 1e-10, "maxiter": 5000})
        return float(result.fun)
