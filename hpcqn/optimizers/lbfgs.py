"""Distributed deterministic L-BFGS for objective callbacks (docs/algorithms.md, section 1).

The unknown is distributed by slices (each rank owns one, possibly empty). Per
iteration: the direction comes from the two-loop recursion on the Gram matrix
(:mod:`hpcqn.curvature.gram_history`); each line-search trial costs one callback and
ONE small reduction (``f``, ``g.d``, the max-norm of ``g``, error flags); after the step
is accepted, all new dot products travel in ONE reduction. So the number of
reductions is ``1 + (line-search trials)`` per iteration, plus two at the start (the
check that every rank can start, before any evaluation, and ``x0``).

Safeguards as PETSc TAO's LMVM: a direction that is not a finite descent direction
drops the history and takes a scaled steepest-descent step; a line search that fails
drops the history and retries from the same point; a second failure in a row stops
with status 2 and the last accepted point.
"""

from __future__ import annotations

import dataclasses
import math
import time
import zlib
from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from ..backend import namespace
from ..comm import Communicator
from ..curvature.gram_history import GramHistory, SubspaceHistory
from ..curvature.linesearch import CONVERGED, EVALUATE, Backtracking, MoreThuente
from ..curvature.metric_history import MetricHistory
from ..options import Rule, check, declared
from .bounds import Box

# Status codes, as SciPy's L-BFGS-B uses them (99: the callback asked to stop).
SUCCESS, LIMIT, LINESEARCH_FAILED, CALLBACK_STOP = 0, 1, 2, 99


@dataclass
class LBFGSOptions:
    """Options of :func:`hpcqn.minimize` with ``method="lbfgs"`` (names as SciPy and
    TAO use them; a tolerance of 0 disables its test)."""

    history: int = 10  # M, pairs kept
    gtol: float = 1e-5  # max |g_i| <= gtol (SciPy)
    gatol: float = 0.0  # ||g||_2 <= gatol (TAO)
    grtol: float = 0.0  # ||g||_2 / |f| <= grtol (TAO)
    gttol: float = 0.0  # ||g||_2 / ||g0||_2 <= gttol (TAO)
    ftol: float = 2.220446049250313e-09  # (f_k - f_k+1) / max(|f_k|, |f_k+1|, 1) <= ftol
    maxiter: int = 15000
    maxfun: int = 15000
    maxls: int = 20  # trials per line search
    linesearch: str = "strong-wolfe"  # or "armijo"
    fun_global: bool = False  # fun returns the global f on every rank (not a part)
    disp: int = 0  # rank 0 prints a progress line every `disp` iterations
    gather_x: bool = False  # put the whole x in the result (`x_global`)

    OPTION_RULES: ClassVar[dict[str, Rule]] = {
        "history": Rule("int", 1),
        **{name: Rule("float", 0) for name in ("gtol", "gatol", "grtol", "gttol", "ftol")},
        **{name: Rule("int", 1) for name in ("maxiter", "maxfun", "maxls")},
        "linesearch": Rule("str", choices=("strong-wolfe", "armijo")),
        "fun_global": Rule("bool"),
        "disp": Rule("int", 0),
        "gather_x": Rule("bool"),
    }

    def validate(self) -> None:
        """Every field against :attr:`OPTION_RULES` (an ``OptionError`` naming it)."""
        check(declared(type(self)), vars(self))


@dataclass
class LBFGSOutcome:
    """What :meth:`LBFGS.run` returns: the last accepted point and the counts."""

    x: Any
    f: float
    g: Any
    nit: int
    nfev: int
    status: int
    message: str
    gnorm_inf: float
    gnorm2: float
    nreset: int
    npairs_skipped: int
    seconds: float
    trace: list[tuple[int, float, float]] = field(default_factory=list)


class FunctionError(ValueError):
    """The objective callback returned something unusable (raised on every rank)."""


class LBFGS:
    """The solver; see :class:`LBFGSOptions`. ``box``
    (:class:`hpcqn.optimizers.bounds.Box`) bounds this rank's slice; ``inner`` and ``H0``
    set the inner product and the initial operator
    (:class:`hpcqn.curvature.metric_history.MetricHistory`).

    Driven one iteration at a time through the generators :meth:`start_steps`, then
    :meth:`iterate_steps` while ``status`` is None: they yield every point to evaluate and
    take ``(f_part, g)`` (or the exception the evaluation raised) back, which is how
    :class:`hpcqn.Minimizer` (and so :func:`hpcqn.minimize`) runs them.
    :meth:`state_dict` / :meth:`load_state_dict` for checkpoints."""

    def __init__(
        self,
        comm: Communicator,
        options: LBFGSOptions,
        box: Box | None = None,
        inner: Callable[[Any, Any], Any] | None = None,
        H0: Callable[[Any], Any] | None = None,  # noqa: N803 - the usual name
    ):
        self.comm = comm
        self.opt = options
        self.box = box
        self.inner, self.H0 = inner, H0
        self.bounded = False  # agreed at x0: whether any rank's box bounds something
        self.nactive = 0
        self.status: int | None = None
        self.message = ""
        self.nfev = 0
        self.nreductions = 0  # the solver's own (not those fun makes itself)
        self._at_step = (0, 0)  # nfev and nreductions at the last accepted point

    # -- evaluation ----------------------------------------------------------------
    def _take(self, told: Any, x: Any, out: Any) -> float:
        """The evaluation ``(f, g)`` at ``x``: returns ``f`` and copies ``g`` into ``out``,
        a buffer the solver owns (a callback may hand back the same array every time)."""
        if isinstance(told, BaseException):
            raise told
        try:
            f, g = told
        except (TypeError, ValueError):
            raise FunctionError(f"fun must return a pair (f, g), got "
                                f"{type(told).__name__}") from None
        if getattr(g, "shape", None) != x.shape:
            raise FunctionError(
                f"fun returned a gradient of shape {getattr(g, 'shape', type(g).__name__)} "
                f"for x of shape {x.shape}"
            )
        # Copying a complex gradient (or f) into the real buffers would drop the imaginary
        # part with no more than a warning.
        if getattr(getattr(g, "dtype", None), "kind", None) == "c":
            raise FunctionError(f"fun returned a complex gradient (dtype {g.dtype}); the "
                                f"objective and its gradient must be real")
        if isinstance(f, complex) or getattr(getattr(f, "dtype", None), "kind", None) == "c":
            raise FunctionError(f"fun must return a real number as f, got the complex {f!r}")
        try:
            f = float(f)
        except (TypeError, ValueError) as exc:
            raise FunctionError(f"fun must return a real number as f, got {f!r}") from exc
        out[...] = g
        return f

    def _reduce(
        self,
        f: float,
        gd: float,
        gg: float,
        ginf: float,
        error: BaseException | None,
        fingerprint: tuple[float, float] = (0.0, 0.0),
        gd0: float = 0.0,
        bounded: bool = False,
    ) -> tuple[float, float, float, float, float, bool]:
        """The solver's one reduction: the global f, max|g| (NaN when any rank's f or g
        is not finite), g.d, g.g, the initial slope ``gd0`` of a bounded line search and
        whether any rank has bounds. Its layout never depends on the options, so ranks
        that disagree on options (or failed to parse them) still meet in it; the
        fingerprint of the options and of ``f`` (with ``fun_global``) is checked for
        equality across ranks here: each such value travels as ``v`` and ``-v`` in the
        maxima, and the ranks agree when ``max(v) == -max(-v)``."""
        self.nreductions += 1
        finite = math.isfinite(f)
        global_f = self.opt.fun_global
        same_f = f if global_f and finite else 0.0
        options, itemsize = fingerprint
        sums, maxes = self.comm.allreduce_scalars(
            (0.0 if global_f else f, gd, gg, gd0),
            (ginf, 0.0 if finite else 1.0, 1.0 if bounded else 0.0, same_f, -same_f,
             options, -options, itemsize, -itemsize),
            error)
        if maxes[5] != -maxes[6] or maxes[7] != -maxes[8]:
            raise ValueError(
                "minimize was called with different options, x0 dtypes or inner/H0 "
                "arguments on different ranks; every rank must pass the same ones"
            )
        not_finite = maxes[1] > 0
        if not not_finite and maxes[3] != -maxes[4]:  # only compared when every f is finite
            raise FunctionError(
                f"option fun_global is set but fun returned different values on "
                f"different ranks (from {-float(maxes[4])!r} to {float(maxes[3])!r})"
            )
        f_total = float(maxes[3]) if global_f else float(sums[0])
        return (math.nan if not_finite else f_total, float(maxes[0]), float(sums[1]),
                float(sums[2]), float(sums[3]), maxes[2] > 0)

    def fail_setup(self, error: BaseException) -> None:
        """This rank could not start (bad options or x0): meet the other ranks in the
        first reduction, so that every rank raises instead of waiting."""
        self._reduce(0.0, 0.0, 0.0, 0.0, error)

    def check_start(self, x0: Any) -> None:
        """Meet :meth:`fail_setup` (of ranks that could not start) in the same
        reduction, and check that every rank passed the same options."""
        self._reduce(0.0, 0.0, 0.0, 0.0, None, self.fingerprint(x0))

    def _evaluate(
        self,
        x: Any,
        g_out: Any,
        d: Any = None,
        with_gg: bool = False,
        fingerprint: tuple[float, float] = (0.0, 0.0),
        gd0: float = 0.0,
    ) -> Generator[Any, Any, tuple[float, float, float, float, float, bool]]:
        """Yield ``x``, take its evaluation (``g`` into ``g_out``) and make ONE reduction.
        Returns the global ``f``, the global max-norm of ``g`` (of the projected gradient
        with bounds; NaN when any part of ``f`` or ``g`` is not finite), ``<g, d>``, the
        gradient's squared norm (0 unless asked for; with bounds, of the free gradient at
        ``x``, which this classifies), the summed ``gd0`` and whether any rank has bounds.
        An error in the evaluation on any rank raises on all."""
        self.nfev += 1
        told = yield x
        f, ginf, gd, gg, error = math.nan, math.nan, 0.0, 0.0, None
        box = self.box
        try:
            # A non-finite f or g is an answer the line search backs out of; the caller's
            # NumPy error mode (np.seterr(invalid="raise")) must not make it an error here.
            with np.errstate(invalid="ignore", over="ignore"):
                f = self._take(told, x, g_out)
                if g_out.size:
                    if box is not None:
                        ginf = box.projected_gradient_inf(x, g_out)
                    else:  # NaN when g has one: then both extremes are NaN
                        ginf = max(float(g_out.max()), -float(g_out.min()))
                    if d is not None:
                        gd = self.history.dot(g_out, d)
                    if with_gg:
                        if box is not None:
                            box.classify(x, g_out)
                            gg = self.history.gradient_part(box.free_gradient(g_out,
                                                                              self._gf))
                        else:
                            gg = self.history.gradient_part(g_out)
                else:
                    ginf = 0.0
        except BaseException as exc:  # KeyboardInterrupt too: every rank learns of it below
            error = exc
        bounded = box is not None and box.bounds_something
        return self._reduce(f, gd, gg, ginf, error, fingerprint, gd0, bounded)

    def _check_metric(self, gg: float) -> None:
        """The gradient's squared norm (the same number on every rank) must be finite and
        not negative: otherwise ``H0`` or ``inner`` is not positive definite (or gave a
        NaN), and every rank says so."""
        if (self.inner is None and self.H0 is None) or (math.isfinite(gg) and gg >= 0.0):
            return
        names = " and ".join(n for n, v in (("inner", self.inner), ("H0", self.H0))
                             if v is not None)
        product = "<g, H0 g>" if self.H0 is not None else "<g, g>"
        raise ValueError(f"{names} must be symmetric positive definite and finite: "
                         f"{product} = {gg!r} at iteration {getattr(self, 'nit', 0)}")

    def fingerprint(self, x0: Any) -> tuple[float, float]:
        """Two numbers every rank must agree on: a checksum of the options (all but
        ``disp``, which only rank 0 uses) and of which of ``inner`` and ``H0`` are given,
        and the dtype's size."""
        values = {f.name: getattr(self.opt, f.name) for f in dataclasses.fields(self.opt)}
        values.pop("disp")
        values["metric"] = (self.inner is not None, self.H0 is not None)
        return float(zlib.crc32(repr(sorted(values.items())).encode())), float(x0.dtype.itemsize)

    # -- the iteration, one step at a time -------------------------------------------
    def start_steps(self, x0: Any, state: dict[str, Any] | None = None
                    ) -> Generator[Any, Any, None]:
        """Evaluate at ``x0`` (projected into the box; one reduction) and set up the
        iteration; with ``state`` (a :meth:`state_dict`), continue from there instead
        (``x0`` then fixes the shape and dtype, and its evaluation only checks that every
        rank can start)."""
        opt = self.opt
        xp = self._xp = namespace(x0)
        self._start_time = time.perf_counter()
        n_local = x0.shape[0]
        self.x = xp.array(x0, copy=True)
        if self.box is not None:
            self.box.project(self.x)
        self.g = xp.empty_like(self.x)
        self._gf = xp.empty_like(self.x) if self.box is not None else self.g
        if self.inner is None and self.H0 is None:
            self.history = GramHistory(n_local, int(opt.history), xp, self.x.dtype)
        else:
            self.history = MetricHistory(n_local, int(opt.history), xp, self.x.dtype,
                                         self.inner, self.H0)
        f, ginf, _, gg, _, bounded = yield from self._evaluate(
            self.x, self.g, with_gg=True, fingerprint=self.fingerprint(self.x))
        if not (math.isfinite(f) and math.isfinite(ginf)):
            raise FunctionError(f"fun returned a non-finite value at x0 (f = {f}, max|g| = {ginf})")
        self._check_metric(gg)
        self.bounded = bounded
        if not bounded:  # every rank's bounds bound nothing: the unconstrained iteration
            self.box, self._gf = None, self.g
        else:
            if self.box is None:
                self.box = Box.unbounded(self.x)
                self._gf = xp.array(self.g, copy=True)  # no bounds here: g is free
            self.history = SubspaceHistory(n_local, int(opt.history), xp, self.x.dtype)
        self.history.set_gradient_norm2(gg)
        self.f, self.ginf, self.gg, self.g0norm = f, ginf, gg, math.sqrt(gg)
        self._direction = xp.empty_like(self.x)
        self._x_trial = xp.empty_like(self.x)
        self._g_trial = xp.empty_like(self.x)
        self._path = xp.empty_like(self.x) if bounded else None
        self.nit = self.nreset = self.nskipped = self._failures = 0
        self.trace = [(0, f, ginf)]
        if state is not None:
            self.load_state_dict(state)
        self._at_step = (self.nfev, self.nreductions)
        self.status, self.message = self._converged(self.f, None, self.ginf, self.gg,
                                                    self.g0norm, self.nit)

    def state_dict(self) -> dict[str, Any]:
        """Everything :meth:`load_state_dict` needs to continue bitwise from the last
        accepted point (also when asked during a line search): this rank's x, g and
        history rows, the Gram matrix, the values and counters. A snapshot: copies, not
        the solver's buffers (which later iterations overwrite)."""
        nfev, nreductions = self._at_step
        return {"x": self.x.copy(), "g": self.g.copy(), "f": self.f, "ginf": self.ginf,
                "gg": self.gg, "g0norm": self.g0norm, "nit": self.nit, "nreset": self.nreset,
                "nskipped": self.nskipped, "nfev": nfev, "nreductions": nreductions,
                "nactive": self.nactive, "trace": [list(t) for t in self.trace],
                "history": self.history.state_dict()}

    def load_state_dict(self, saved: dict[str, Any]) -> None:
        xp = namespace(self.x)
        self.x[...] = xp.asarray(saved["x"])
        self.g[...] = xp.asarray(saved["g"])
        if self.box is not None:
            self.box.classify(self.x, self.g)
            self.box.free_gradient(self.g, self._gf)
        self.history.load_state_dict(saved["history"])
        self.f, self.ginf, self.gg, self.g0norm = (saved["f"], saved["ginf"], saved["gg"],
                                                   saved["g0norm"])
        self.nit, self.nreset, self.nskipped = saved["nit"], saved["nreset"], saved["nskipped"]
        self.nfev, self.nreductions = saved["nfev"], saved["nreductions"]
        self.nactive = int(saved.get("nactive", 0))
        self.trace = [tuple(t) for t in saved["trace"]]
        self._at_step = (self.nfev, self.nreductions)

    def stop(self, status: int, message: str) -> None:
        """End the iteration from outside (a callback's request, agreed on every rank)."""
        self.status, self.message = status, message

    def iterate_steps(
        self, boundary: Callable[[Any, float, Any, int], tuple[dict[str, float], Any]]
        | None = None,
    ) -> Generator[Any, Any, dict[str, float]]:
        """One iteration: direction, line search, the new pair and the convergence tests.
        ``boundary(x, f, g, nit) -> (flags, error)`` runs on every rank once the step is
        accepted; its ``flags`` (named maxima) and ``error`` travel in the iteration's
        closing reduction, and the agreed flags are returned (empty when the line search
        ended or restarted the iteration)."""
        opt, xp, history, box = self.opt, self._xp, self.history, self.box
        x, g, direction = self.x, self.g, self._direction
        x_trial, g_trial = self._x_trial, self._g_trial
        delta = history.direction_coefficients()
        gd = history.dot_g(delta)
        if not (gd < 0.0 and math.isfinite(gd)):
            history.reset()
            self.nreset += 1
            delta = history.direction_coefficients()
            gd = history.dot_g(delta)
        history.combine(delta, self._gf, direction)
        gd0 = 0.0
        if box is not None:  # P_F d; its slope is reduced with the first trial
            box.restrict(direction)
            gd0 = float(g @ direction) if g.size else 0.0
        if len(history):
            stp = 1.0
        else:  # scaled steepest descent: the first step has length 1 (SciPy's choice)
            stp = min(1.0 / math.sqrt(history.norm2(delta)), 1e10)
        kind = MoreThuente if opt.linesearch == "strong-wolfe" else Backtracking
        search = kind(self.f, gd, stp) if box is None else None
        result, ntrials, message = EVALUATE, 0, ""
        while result == EVALUATE:
            if ntrials == opt.maxls or self.nfev >= opt.maxfun:
                message = ((search.message if search else "")
                           or f"no acceptable step in {ntrials} trials")
                break
            ntrials += 1
            xp.multiply(direction, stp if search is None else search.stp, out=x_trial)
            x_trial += x
            slope = direction
            if box is not None:
                box.project(x_trial)
                slope = box.path_direction(x_trial, direction, self._path)
            f_t, ginf_t, gd_t, _, gd0_t, _ = yield from self._evaluate(
                x_trial, g_trial, slope, gd0=gd0 if search is None else 0.0)
            if search is None:
                if not (gd0_t < 0.0 and math.isfinite(gd0_t)):  # P_F d is no descent
                    self._failures += 1
                    if not len(history) or self._failures >= 2:
                        self.stop(LINESEARCH_FAILED, "ABNORMAL: NO DESCENT DIRECTION ON THE "
                                                     "FREE VARIABLES")
                    history.reset()
                    self.nreset += 1
                    return {}
                search = kind(self.f, gd0_t, stp)
            if not (math.isfinite(f_t) and math.isfinite(ginf_t)):
                search.shrink()
                continue
            result = search.advance(f_t, gd_t)
            message = search.message
        if result != CONVERGED:
            self._failures += 1
            if self.nfev >= opt.maxfun:
                self.stop(LIMIT, "STOP: TOTAL NO. OF F,G EVALUATIONS EXCEEDS LIMIT")
            elif self._failures >= 2 or not len(history):
                self.stop(LINESEARCH_FAILED, f"ABNORMAL: LINE SEARCH FAILED: {message}")
            else:
                history.reset()
                self.nreset += 1
            return {}
        self._failures = 0
        slot = history.free_slot()
        s_row, y_row = history.pair_rows(slot)
        if box is None:
            xp.multiply(direction, search.stp, out=s_row)
        else:  # the step actually taken (the projection shortened some components)
            xp.subtract(x_trial, x, out=s_row)
        xp.subtract(g_trial, g, out=y_row)
        self.x, self._x_trial = x_trial, x
        self.g, self._g_trial = g_trial, g
        f_prev, self.f, self.ginf = self.f, f_t, ginf_t
        self.nit += 1
        flags, error = boundary(self.x, self.f, self.g, self.nit) if boundary else ({}, None)
        self.nreductions += 1
        try:
            if box is None:
                self._gf = self.g
            else:
                box.classify(self.x, self.g)
                box.free_gradient(self.g, self._gf)
                history.set_free(box.free)
            local = history.local_products(slot, self._gf)
            if box is not None:
                local = np.append(local, box.nactive())
        except BaseException as exc:  # H0 or inner failed here: every rank raises
            error = error or exc
            local = np.zeros(history.products_size(slot) + (box is not None))  # never read
        reduced = self.comm.allreduce_scalars(local, list(flags.values()), error)
        products, agreed = reduced[0], dict(zip(flags, map(float, reduced[1]), strict=True))
        if box is not None:
            self.nactive, products = int(products[-1]), products[:-1]
        if not history.absorb(products, slot, eps=float(np.finfo(np.float64).eps)):
            self.nskipped += 1
        self.gg = history.gradient_norm2(products)
        self._check_metric(self.gg)
        self.trace.append((self.nit, self.f, self.ginf))
        self._at_step = (self.nfev, self.nreductions)
        self._progress(self.nit, self.f, self.ginf, search.stp)
        self.status, self.message = self._converged(self.f, f_prev, self.ginf, self.gg,
                                                    self.g0norm, self.nit)
        return agreed

    def outcome(self) -> LBFGSOutcome:
        """The last accepted point and the counts."""
        return LBFGSOutcome(
            x=self.x, f=self.f, g=self.g, nit=self.nit, nfev=self.nfev, status=self.status,
            message=self.message, gnorm_inf=self.ginf, gnorm2=math.sqrt(self.gg),
            nreset=self.nreset, npairs_skipped=self.nskipped,
            seconds=time.perf_counter() - self._start_time, trace=self.trace,
        )

    def _converged(
        self, f: float, f_prev: float | None, ginf: float, gg: float, g0norm: float, nit: int
    ) -> tuple[int | None, str]:
        opt = self.opt
        gnorm = math.sqrt(gg)
        if ginf <= opt.gtol:
            return SUCCESS, "CONVERGENCE: NORM OF PROJECTED GRADIENT <= PGTOL"
        if gnorm <= opt.gatol:
            return SUCCESS, "CONVERGENCE: ||g|| <= gatol"
        if gnorm <= opt.grtol * abs(f):
            return SUCCESS, "CONVERGENCE: ||g|| / |f| <= grtol"
        if gnorm <= opt.gttol * g0norm:
            return SUCCESS, "CONVERGENCE: ||g|| / ||g0|| <= gttol"
        if f_prev is not None and (f_prev - f) <= opt.ftol * max(abs(f_prev), abs(f), 1.0):
            return SUCCESS, "CONVERGENCE: RELATIVE REDUCTION OF F <= FACTR*EPSMCH"
        if nit >= opt.maxiter:
            return LIMIT, "STOP: TOTAL NO. OF ITERATIONS REACHED LIMIT"
        if self.nfev >= opt.maxfun:
            return LIMIT, "STOP: TOTAL NO. OF F,G EVALUATIONS EXCEEDS LIMIT"
        return None, ""

    def _progress(self, nit: int, f: float, ginf: float, stp: float) -> None:
        if self.opt.disp and self.comm.rank == 0 and nit % self.opt.disp == 0:
            active = f"  active {self.nactive}" if self.bounded else ""
            print(
                f"iter {nit:6d}  f {f: .10e}  max|g| {ginf:.3e}  step {stp:.2e}  "
                f"nfev {self.nfev}{active}",
                flush=True,
            )
