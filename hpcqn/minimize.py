"""``hpcqn.minimize``: distributed L-BFGS for objective callbacks, SciPy-shaped.

``fun(x_local) -> (f_part, g_local)`` runs on every rank with that rank's slice of the
unknown; the objective is the sum of ``f_part`` over ranks (or, with the option
``fun_global``, the value every rank returns). :func:`scipy_lbfgs` is the same solver as
a SciPy custom method: ``scipy.optimize.minimize(fun, x0, jac=True, method=hpcqn.scipy_lbfgs)``.
"""

from __future__ import annotations

import inspect
import math
import sys
import warnings
from collections.abc import Callable, Generator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from scipy.optimize import OptimizeResult

from . import backend
from .comm import get_comm, serial_comm
from .layout import gather_global
from .optimizers.bounds import parse_bounds
from .optimizers.lbfgs import (
    CALLBACK_STOP,
    LBFGS,
    LIMIT,
    SUCCESS,
    FunctionError,
    LBFGSOptions,
)
from .options import check, declared
from .run import CheckpointPolicy, Driver

METHODS = ("lbfgs",)


def parse_options(method: str, options: Mapping[str, Any] | None) -> LBFGSOptions:
    """Check ``method`` and ``options`` (names and values); raises ValueError."""
    if method.lower() not in METHODS:
        raise ValueError(f"unknown method {method!r}; hpcqn.minimize offers {METHODS}")
    given = check(declared(LBFGSOptions), dict(options or {}), f"method {method!r}")
    return LBFGSOptions(**given)


def minimize(
    fun: Callable[[Any], tuple[Any, Any]],
    x0: Any,
    comm: Any = None,
    method: str = "lbfgs",
    options: Mapping[str, Any] | None = None,
    callback: Callable[[OptimizeResult], Any] | None = None,
    checkpoint_dir: str | Path | None = None,
    checkpoint_every: int = 0,
    stop: Any = None,
    resume: bool = True,
    keep: int = 2,
    bounds: Any = None,
    inner: Callable[[Any, Any], Any] | None = None,
    H0: Callable[[Any], Any] | None = None,  # noqa: N803 - the usual name
) -> OptimizeResult:
    """Minimise ``sum over ranks of f_part`` with the distributed L-BFGS.

    Parameters
    ----------
    fun : ``fun(x_local) -> (f_part, g_local)``; ``g_local`` has the shape of ``x_local``.
    x0 : this rank's slice of the starting point, a 1-D float32 or float64 NumPy or
        CuPy array (slices may differ in length across ranks and may be empty).
    comm : an mpi4py communicator, an :class:`hpcqn.comm.Communicator`, or None
        (``COMM_WORLD``; serial without mpi4py). Every rank of it must call.
    options : see :class:`hpcqn.optimizers.lbfgs.LBFGSOptions` (``history``, ``gtol``,
        ``gatol``, ``grtol``, ``gttol``, ``ftol``, ``maxiter``, ``maxfun``, ``maxls``,
        ``linesearch``, ``fun_global``, ``disp``, ``gather_x``).
    callback : called on every rank after each iteration with an ``OptimizeResult``
        holding ``x`` (this rank's slice), ``fun``, ``jac`` and ``nit``; raising
        ``StopIteration`` on any rank stops all ranks cleanly (status 99).
    checkpoint_dir : with it, the solver's state (this rank's x, g and history rows, the
        Gram matrix, counters) is checkpointed every ``checkpoint_every`` iterations and
        when ``stop`` (a :class:`hpcqn.signals.StopFlag`) reports a signal on any rank,
        which then raises :class:`hpcqn.signals.Preempted`; with ``resume`` the run
        continues bitwise from the latest checkpoint there (same rank count and slices,
        same options and bounds: anything else is a
        :class:`hpcqn.checkpoint.CheckpointError`).
    bounds : ``(lo, hi)`` for this rank's slice (each None, a scalar or an array of
        ``x0``'s shape, +-inf allowed; ranks may differ, some may pass None) or a
        ``scipy.optimize.Bounds`` of the slice. ``x0`` is projected into the box; the
        ``gtol`` test is then on L-BFGS-B's projected gradient; the method is a projected
        L-BFGS (docs/algorithms.md, section 1.11). Bounds that bound nothing give the
        unconstrained run exactly.
    inner : ``inner(u, v)``, this rank's part of the inner product ``<u, v>`` (summed over
        ranks by the solver); ``fun``'s gradient is then the gradient in it (the Riesz
        representer) and every product of the method and the ``||g||`` tests use it.
    H0 : ``H0(v)``, an SPD operator on this rank's slice of a gradient (an inverse mass
        matrix, say): the initial inverse Hessian, scaled by ``s.y / y.H0 y``; the
        ``||g||`` tests use ``sqrt(g.H0 g)``. Called on every rank together. ``inner`` and
        ``H0`` make the iteration count mesh-independent for discretised functions
        (section 1.12); neither combines with ``bounds``.

    Returns
    -------
    OptimizeResult with SciPy's fields (``x`` is this rank's slice, ``jac`` the gradient)
    plus ``nallreduce`` (reductions this call made), ``comm_bytes``, ``nreset``,
    ``npairs_skipped``, ``seconds``, ``nactive`` (variables at a bound, over all ranks)
    and, with ``gather_x``, ``x_global``. :class:`Minimizer` is the same solver for codes
    that own their loop.
    """
    solver = Minimizer(x0, comm, method, options, callback, checkpoint_dir, checkpoint_every,
                       stop, resume, keep, bounds, inner, H0)
    solver._solve(fun)
    return solver.result()


class Minimizer:
    """:func:`minimize` for codes that own their loop (ask-and-tell)::

        solver = hpcqn.Minimizer(x0, comm, options={...}, bounds=(lo, hi))
        while not solver.done:
            x = solver.ask()               # this rank's slice of the next point
            solver.tell(*evaluate(x))      # (f_part, g_local); every rank calls it
        res = solver.result()

    The arguments are :func:`minimize`'s without ``fun``; the iterates are the same.
    ``tell`` is collective (it holds the reductions); when the evaluation failed on this
    rank, call :meth:`fail` with the exception instead, and every rank raises instead of
    waiting. :meth:`state_dict` is the state at the last accepted iterate (also in the
    middle of a line search) and :meth:`load_state_dict` continues from it (before the
    first ``ask``); with ``checkpoint_dir`` the solver checkpoints and resumes by itself,
    as :func:`minimize` does.
    """

    def __init__(
        self,
        x0: Any,
        comm: Any = None,
        method: str = "lbfgs",
        options: Mapping[str, Any] | None = None,
        callback: Callable[[OptimizeResult], Any] | None = None,
        checkpoint_dir: str | Path | None = None,
        checkpoint_every: int = 0,
        stop: Any = None,
        resume: bool = True,
        keep: int = 2,
        bounds: Any = None,
        inner: Callable[[Any, Any], Any] | None = None,
        H0: Callable[[Any], Any] | None = None,  # noqa: N803 - the usual name
    ):
        c = self.comm = get_comm(comm)
        self._bytes_before = sum(counter.nbytes for counter in c.counters.values())
        try:
            opts = parse_options(method, options)
            backend.check_float_array(x0, "x0", finite=True)
            box = parse_bounds(bounds, x0)
            for name, value in (("inner", inner), ("H0", H0)):
                if value is not None and not callable(value):
                    raise TypeError(f"{name} must be a callable, got {type(value).__name__}")
            if bounds is not None and (inner is not None or H0 is not None):
                raise ValueError("bounds do not combine with inner or H0 (a projection in "
                                 "another inner product is not a clip); pass one or the other")
        except (TypeError, ValueError) as exc:
            # Raised on every rank, even when only this rank's input is bad.
            LBFGS(c, LBFGSOptions()).fail_setup(exc)
            raise  # pragma: no cover - fail_setup always raises
        self.options = opts
        self.solver = LBFGS(c, opts, box, inner, H0)
        # Every rank learns that every rank can start before any evaluates (an objective
        # that communicates would otherwise wait for a rank that failed here).
        self.solver.check_start(x0)
        config = {"options": {k: v for k, v in vars(opts).items() if k != "disp"},
                  "n_local": int(x0.shape[0]), "dtype": str(x0.dtype), "nranks": c.size,
                  "bounds": "none" if box is None else box.digest,
                  "metric": {"inner": inner is not None, "H0": H0 is not None}}
        policy = CheckpointPolicy(checkpoint_dir, checkpoint_every, keep, resume)
        # Signals stop a run only where a checkpoint can be written.
        # A checkpoint of a run with lower limits continues to the new ones
        self._driver = Driver(c, config, policy, stop if checkpoint_dir is not None else None,
                              meta={"kind": "minimize"},
                              extendable=("options.maxiter", "options.maxfun"))
        saved = self._driver.resume(same_ranks="minimize resumes on the same rank count (the "
                                               "unknown's slices belong to the callback)",
                                    like=lambda: {"solver": {"x": x0}})
        self._state = None if saved is None else saved["solver"]
        # how a resumed run ended, when its checkpoint is its last (None: it had not)
        self._ended = None if saved is None else saved.get("ended")
        self._callback = _scipy_style(callback)
        self._x0 = x0
        self._steps: Generator[Any, Any, None] | None = None
        self._point: Any = None
        self._asked = False  # whether ask() gave the point that tell() answers
        self._result: OptimizeResult | None = None
        self._failure: BaseException | None = None
        self.done = False

    # -- the run as a generator of points ----------------------------------------------
    def _run(self) -> Generator[Any, Any, None]:
        solver, driver = self.solver, self._driver

        def boundary(x: Any, f: float, g: Any, nit: int) -> tuple[dict[str, float], Any]:
            driver.call(self._callback, x, f, g, nit)
            return driver.flags(), driver.error()

        yield from solver.start_steps(self._x0, self._state)
        ended = self._ended
        if ended is not None and not (ended["status"] == LIMIT and (
                self.options.maxiter > ended["maxiter"] or self.options.maxfun > ended["maxfun"])):
            solver.stop(ended["status"], ended["message"])  # a finished run, not lengthened
        while solver.status is None:
            agreed = yield from solver.iterate_steps(boundary)
            if not agreed:  # the line search ended or restarted the iteration
                continue
            if solver.status is None:
                if agreed["stop"] > 0:
                    solver.stop(CALLBACK_STOP, "`callback` raised `StopIteration`.")
                else:
                    driver.settle(agreed, solver.nit, lambda: {"solver": solver.state_dict()},
                                  nit=solver.nit)
        if driver.checkpointing and solver.status in (SUCCESS, LIMIT):
            # The end, checkpointed: the same run again ends here at once (a run directory
            # of a finished job says so), and with a larger maxiter or maxfun continues.
            # (A run a callback stopped, or whose line search failed, resumes from its
            # last checkpoint as before.)
            ended = {"status": int(solver.status), "message": solver.message,
                     "maxiter": int(self.options.maxiter), "maxfun": int(self.options.maxfun)}
            driver.save(solver.nit, {"solver": solver.state_dict(), "ended": ended},
                        nit=solver.nit, final=True, status=ended["status"],
                        maxiter=ended["maxiter"], maxfun=ended["maxfun"])

    def _advance(self, told: Any) -> None:
        self._asked = False
        try:
            self._point = self._steps.send(told)  # send(None) starts the generator
        except StopIteration:
            self._point, self.done = None, True
            self._result = self._finish()
        except BaseException as exc:
            self._point, self.done, self._failure = None, True, exc
            raise

    def _next(self) -> Any:
        """The next point (the solver's own buffer: not to be written)."""
        if self._failure is not None:
            raise RuntimeError(f"the solver stopped on an error: {self._failure!r}")
        if self.done:
            raise RuntimeError("the solver has finished: see result()")
        if self._steps is None:
            self._steps = self._run()
            self._advance(None)
        self._asked = True
        return self._point

    def _answer(self, told: Any) -> None:
        """Send the evaluation (or the exception in it) of the asked point. A tell with no
        point asked is misuse that the other ranks cannot see: it goes to them as this
        rank's error, in the reduction they wait in, and every rank raises."""
        if not self._asked:
            self._next()  # the other ranks wait in the reduction of the point it yields
            if not isinstance(told, BaseException):
                told = RuntimeError("tell() needs a point from ask() first (every tell "
                                    "answers one ask)")
        self._advance(told)

    def _solve(self, fun: Callable[[Any], tuple[Any, Any]]) -> None:
        """Ask and tell with ``fun`` until done (:func:`minimize`'s loop); an exception in
        ``fun`` travels to every rank in the next reduction."""
        while not self.done:
            point = self._next()
            try:
                told = fun(point)
            except BaseException as exc:
                told = exc
            self._answer(told)

    # -- the public interface ------------------------------------------------------
    def ask(self) -> Any:
        """This rank's slice of the next point to evaluate (the same point until
        :meth:`tell`); read-only for NumPy arrays. RuntimeError once :attr:`done`."""
        point = self._next()
        if isinstance(point, np.ndarray):
            point = point.view()
            point.flags.writeable = False
        return point

    def tell(self, f_part: Any, g: Any) -> None:
        """The evaluation at the point :meth:`ask` gave: this rank's part of ``f`` (the
        whole ``f`` with the option ``fun_global``) and its slice of the gradient.
        Collective: every rank calls it (it makes the solver's reductions). Each tell
        answers one ask: a tell with no point asked on this rank raises RuntimeError here
        and :class:`hpcqn.comm.RemoteRankError` on the other ranks, and ends the solver."""
        self._answer((f_part, g))

    def fail(self, error: BaseException) -> None:
        """Instead of :meth:`tell`, when the evaluation raised ``error`` on this rank:
        every rank raises (this one ``error``, the others
        :class:`hpcqn.comm.RemoteRankError`) instead of waiting for this one."""
        self._answer(error)
        raise RuntimeError("fail() must raise")  # pragma: no cover - the reduction raises

    def result(self) -> OptimizeResult:
        """The result, as :func:`minimize` returns it (once :attr:`done`)."""
        if self._failure is not None:
            raise RuntimeError(f"the solver stopped on an error, no result: "
                               f"{self._failure!r}")
        if self._result is None:
            raise RuntimeError("the solver has not finished: ask() and tell() until done")
        return self._result

    def state_dict(self) -> dict[str, Any]:
        """The solver's state at the last accepted iterate (see :meth:`load_state_dict`)."""
        if self._steps is None:
            raise RuntimeError("state_dict() needs the first evaluation (ask() and tell())")
        return self.solver.state_dict()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from ``state`` (a :meth:`state_dict` of a run with the same options,
        rank count and slices); before the first :meth:`ask`."""
        if self._steps is not None:
            raise RuntimeError("load_state_dict() must come before the first ask()")
        self._state = dict(state)

    def _finish(self) -> OptimizeResult:
        solver, c = self.solver, self.comm
        out = solver.outcome()
        result = OptimizeResult(
            x=out.x, fun=out.f, jac=out.g, nit=out.nit, nfev=out.nfev, njev=out.nfev,
            status=out.status, success=out.status == 0, message=out.message,
            nallreduce=solver.nreductions,
            comm_bytes=sum(counter.nbytes for counter in c.counters.values())
            - self._bytes_before,
            nreset=out.nreset, npairs_skipped=out.npairs_skipped, seconds=out.seconds,
            nactive=solver.nactive,
        )
        if self.options.gather_x:
            result.x_global = gather_global(out.x, c)
        if self.options.disp and c.rank == 0:
            active = f" active {solver.nactive}" if solver.bounded else ""
            print(
                f"hpcqn.minimize: {out.message} | f {out.f:.10e} max|g| {out.gnorm_inf:.3e} "
                f"nit {out.nit} nfev {out.nfev} reductions {result.nallreduce}{active} "
                f"{out.seconds:.3f} s on {c.size} rank(s)",
                flush=True,
            )
        return result


def _scipy_style(
    callback: Callable[..., Any] | None,
) -> Callable[[Any, float, Any, int], Any] | None:
    """Call ``callback`` as SciPy does: with an ``OptimizeResult`` when it has a parameter
    named ``intermediate_result``, else with a copy of ``x``."""
    if callback is None:
        return None
    try:
        new_style = "intermediate_result" in inspect.signature(callback).parameters
    except (TypeError, ValueError):  # builtins without a signature
        new_style = False

    def call(x: Any, f: float, g: Any, nit: int) -> Any:
        if new_style:
            return callback(intermediate_result=OptimizeResult(x=x.copy(), fun=f, jac=g.copy(),
                                                               nit=nit))
        return callback(x.copy())

    return call


# SciPy L-BFGS-B's option names that mean the same here, and those accepted for
# compatibility with no effect (SciPy 1.17 deprecates disp and iprint and prints nothing;
# the evaluations here are serial, so workers has nothing to spread).
_SCIPY_NAMES = {"maxcor": "history"}
_SCIPY_IGNORED = ("iprint", "workers", "return_all")
_FD_METHODS = ("2-point", "3-point", "cs")
LBFGSB_MAXFUN = 15000  # L-BFGS-B's default limit on the calls of fun
# scipy.optimize.minimize's message for L-BFGS-B when the bounds fix every variable.
ALL_FIXED = "All independent variables were fixed by bounds."


def scipy_lbfgs(
    fun: Callable[..., Any],
    x0: Any,
    args: tuple[Any, ...] = (),
    jac: Any = None,
    callback: Callable[..., Any] | None = None,
    bounds: Any = None,
    constraints: Any = (),
    **options: Any,
) -> OptimizeResult:
    """hpcqn's L-BFGS as a SciPy custom method (serial; no MPI):
    ``scipy.optimize.minimize(fun, x0, method=hpcqn.scipy_lbfgs, options=...)``, with
    the conventions of ``minimize(method="L-BFGS-B")``:

    - ``jac``: a callable, ``True`` (``fun`` returns ``(f, g)``), or ``None`` / ``False`` /
      ``"2-point"`` / ``"3-point"`` / ``"cs"``: the gradient by finite differences with
      L-BFGS-B's absolute step ``eps`` (or ``finite_diff_rel_step * max(1, |x|)``),
      forward, or central for ``"3-point"`` and ``"cs"`` (see
      :func:`_difference_gradient`: steps stay in the box; variables the bounds fix are
      not differenced and their ``jac`` entry is NaN, as ``minimize`` reports them for
      L-BFGS-B; ``minimize`` hands a custom method ``jac=None`` for the three names, so
      central differences need a direct call). ``nfev`` counts the calls of ``fun``
      (those of the differences too) and ``maxfun`` limits them, as L-BFGS-B counts;
      ``njev`` counts gradients.
    - options: ``maxcor`` (= ``history``), ``ftol``, ``gtol``, ``eps``, ``maxfun``,
      ``maxiter`` (``np.inf`` means no limit; a fraction rounds up and 0 means 1, as
      L-BFGS-B tests the count after each iteration), ``maxls``,
      ``finite_diff_rel_step``; ``disp``, ``iprint``, ``workers`` and ``return_all=False``
      are accepted and do nothing; hpcqn's own options too. SciPy's ``tol`` sets ``ftol`` and
      ``gtol``, as for L-BFGS-B.
    - ``f`` may be a size-1 array and ``jac`` any real array-like (a complex ``x0``, ``f``
      or gradient is refused: L-BFGS-B would drop its imaginary part with a
      ``ComplexWarning``); ``fun`` sees a copy of the iterate (it may overwrite it); ``x``
      and ``jac`` come back as float64; a non-finite value at ``x0`` gives a failed
      result (``success=False``, status 2), not an error.
    - ``res.hess_inv`` is a :class:`scipy.optimize.LbfgsInvHessProduct` of the kept pairs.
    - ``bounds``: ``None``, a :class:`scipy.optimize.Bounds` (``keep_feasible`` is not
      needed: every iterate is feasible) or a sequence of ``(lo, hi)`` pairs with
      ``None`` for no bound, refused with ``minimize``'s messages; ``x0`` is clipped into
      them; when they fix every variable the result is ``minimize``'s (one call of
      ``fun``, the message :data:`ALL_FIXED`).
    - ``constraints``, ``hess``, ``hessp`` and ``return_all=True`` are ignored with the
      ``RuntimeWarning`` that ``minimize`` gives for L-BFGS-B.
    """
    from scipy.optimize import LbfgsInvHessProduct

    options = dict(options)
    _warn_unused(constraints, options.pop("hess", None), options.pop("hessp", None),
                 options.get("return_all", False))
    x0 = np.asarray(x0)
    if x0.dtype.kind == "c":
        raise TypeError(f"x0 must be real, got dtype {x0.dtype} (L-BFGS-B would drop its "
                        f"imaginary part)")
    x0 = np.asarray(x0, dtype=np.float64).ravel().copy()
    box = _scipy_bounds(bounds, x0.size)
    tol = options.pop("tol", None)
    if tol is not None:
        options.setdefault("gtol", tol)
        options.setdefault("ftol", tol)
    for scipy_name, name in _SCIPY_NAMES.items():
        if scipy_name in options:
            options[name] = options.pop(scipy_name)
    for name in _SCIPY_IGNORED:
        options.pop(name, None)
    if "disp" in options and (options["disp"] is None or isinstance(options["disp"], bool)):
        options.pop("disp")  # SciPy's no-op disp; an integer is hpcqn's progress interval
    for name in ("maxiter", "maxfun"):
        if name in options:
            limit = options[name]
            if isinstance(limit, (int, float, np.number)) and not isinstance(limit, bool):
                options[name] = (sys.maxsize if math.isinf(limit)
                                 else max(1, int(math.ceil(limit))))
    eps = options.pop("eps", 1e-8)
    rel_step = options.pop("finite_diff_rel_step", None)
    calls = 0  # of fun

    def value(x: Any) -> float:
        nonlocal calls
        calls += 1
        return _real_scalar(fun(x.copy(), *args))

    if box is not None and x0.size and np.all(box[0] == box[1]):
        x = box[0].copy()
        return OptimizeResult(x=x, fun=value(x), jac=np.full_like(x, math.nan), nit=0,
                              nfev=1, njev=0, status=0, success=True, message=ALL_FIXED)
    fixed = None  # with finite differences: the variables the bounds fix (not differenced)
    if callable(jac):

        def fun_and_grad(x: Any) -> tuple[Any, Any]:
            return value(x), _real_gradient(jac(x.copy(), *args), x.shape)

    elif jac is True:

        def fun_and_grad(x: Any) -> tuple[Any, Any]:
            nonlocal calls
            calls += 1
            f, g = fun(x.copy(), *args)
            return _real_scalar(f), _real_gradient(g, x.shape)

    elif jac in (None, False) or jac in _FD_METHODS:
        central = jac in ("3-point", "cs")
        fixed = np.zeros(x0.size, dtype=bool) if box is None else box[0] == box[1]
        # L-BFGS-B's maxfun counts the calls of fun; the solver's counts gradients.
        per_gradient = 1 + (2 if central else 1) * int(np.count_nonzero(~fixed))
        limit = options.get("maxfun", LBFGSB_MAXFUN)
        if isinstance(limit, int) and limit != sys.maxsize:
            options["maxfun"] = max(1, limit // per_gradient)

        def fun_and_grad(x: Any) -> tuple[Any, Any]:
            h = eps if rel_step is None else rel_step * np.maximum(1.0, np.abs(x))
            f = value(x)
            return f, _difference_gradient(value, x, f, np.broadcast_to(np.abs(h), x.shape),
                                           box, central, fixed)

    else:
        raise ValueError(f"jac must be a callable, True, None, False or one of {_FD_METHODS}, "
                         f"got {jac!r}")
    try:
        result, solver = _minimize(fun_and_grad, x0, serial_comm(), options, callback, box)
    except FunctionError as exc:
        if "non-finite value at x0" not in str(exc):
            raise
        return OptimizeResult(x=x0, fun=math.nan, jac=np.full_like(x0, math.nan), nit=0,
                              nfev=calls, njev=1, status=2, success=False,
                              message=f"ABNORMAL: {exc}")
    result.njev, result.nfev = result.nfev, calls
    if fixed is not None and fixed.any():
        result.jac = np.where(fixed, math.nan, result.jac)
    history = solver.history
    pairs = [(history.vectors[2 * slot], history.vectors[2 * slot + 1])
             for slot in history.order]
    s = np.array([p[0] for p in pairs]).reshape(len(pairs), x0.size)
    y = np.array([p[1] for p in pairs]).reshape(len(pairs), x0.size)
    result.hess_inv = LbfgsInvHessProduct(s, y)
    return result


def _warn_unused(constraints: Any, hess: Any, hessp: Any, return_all: Any) -> None:
    """The ``RuntimeWarning`` that ``scipy.optimize.minimize`` gives for L-BFGS-B for each
    argument it ignores (``constraints`` that constrain: a non-empty sequence or mapping,
    or any other object but None)."""
    if isinstance(constraints, (list, tuple, dict)):
        constrained = bool(constraints)
    else:
        constrained = constraints is not None
    unused = [("cannot handle constraints", constrained),
              ("does not use Hessian information (hess)", hess is not None),
              ("does not use Hessian-vector product information (hessp)", hessp is not None),
              ("does not support the return_all option", bool(return_all))]
    for what, given in unused:
        if given:
            warnings.warn(f"Method hpcqn.scipy_lbfgs {what}.", RuntimeWarning, stacklevel=3)


def _real_scalar(f: Any) -> float:
    """``fun``'s value as a float: a real scalar or size-1 array (FunctionError else)."""
    f = np.asarray(f)
    if f.size != 1:
        raise FunctionError(f"fun must return a scalar (or a size-1 array), got shape "
                            f"{f.shape}")
    if f.dtype.kind == "c":
        raise FunctionError(f"fun must return a real f, got dtype {f.dtype}")
    return float(f.astype(np.float64).reshape(()))


def _real_gradient(g: Any, shape: tuple[int, ...]) -> Any:
    """``fun``'s gradient as a float64 array of ``shape``; a complex one is refused
    (FunctionError naming its dtype) instead of losing its imaginary part."""
    g = np.asarray(g)
    if g.dtype.kind == "c":
        raise FunctionError(f"fun's gradient (jac) must be real, got dtype {g.dtype} "
                            f"(L-BFGS-B would drop the imaginary part)")
    return g.astype(np.float64).reshape(shape)


def _difference_gradient(value: Callable[[Any], float], x: Any, f0: float, h: Any,
                         box: tuple[Any, Any] | None, central: bool, fixed: Any) -> Any:
    """The gradient of ``value`` at ``x`` by finite differences with the positive steps
    ``h``, taken within ``box`` as SciPy's ``approx_derivative`` takes them for L-BFGS-B:
    forward, ``(f(x + h e_i) - f0) / h``; backward where ``x + h`` leaves the box; where
    neither fits, a step to the farther bound. ``central``: ``(f(x + h e_i) - f(x - h e_i))
    / 2h`` where both fit, else the one-sided rule. The step is the difference of the two
    points as floats. The variables ``fixed`` by the box (lo == hi) are not differenced:
    their component is 0 (the projected gradient ignores it). ``f0`` is ``f(x)``: one call
    of ``value`` per other component (two where central)."""
    lo, hi = box if box is not None else (np.full_like(x, -math.inf), np.full_like(x, math.inf))
    g = np.zeros_like(x)
    point = x.copy()

    def at(i: int, xi: float) -> float:
        point[i] = xi
        try:
            return value(point)
        finally:
            point[i] = x[i]

    for i in np.flatnonzero(~fixed):
        up, down = x[i] + h[i], x[i] - h[i]
        if central and up <= hi[i] and down >= lo[i]:
            g[i] = (at(i, up) - at(i, down)) / (up - down)
            continue
        if up <= hi[i]:
            target = up
        elif down >= lo[i]:
            target = down
        else:
            target = hi[i] if hi[i] - x[i] >= x[i] - lo[i] else lo[i]
        g[i] = (at(i, target) - f0) / (target - x[i])
    return g


def _minimize(fun: Callable[[Any], tuple[Any, Any]], x0: Any, comm: Any,
              options: Mapping[str, Any], callback: Callable[..., Any] | None,
              bounds: Any) -> tuple[OptimizeResult, LBFGS]:
    """:func:`minimize` with no checkpoints, also returning the solver (its history makes
    SciPy's ``hess_inv``)."""
    solver = Minimizer(x0, comm, "lbfgs", options, callback, bounds=bounds)
    solver._solve(fun)
    return solver.result(), solver.solver


def _scipy_bounds(bounds: Any, n: int) -> tuple[Any, Any] | None:
    """SciPy-style ``bounds`` (None, a ``Bounds``, or ``(lo, hi)`` pairs with None for no
    bound) as two float64 arrays of length ``n``, or None; refused with
    ``scipy.optimize.minimize``'s messages."""
    if bounds is None:
        return None
    wrong_length = (f"The number of bounds is not compatible with the length of `x0`. "
                    f"x0 has {n} entries.")
    if hasattr(bounds, "lb") and hasattr(bounds, "ub"):
        lo, hi = bounds.lb, bounds.ub
    else:
        pairs = list(bounds)
        if len(pairs) != n:
            raise ValueError(wrong_length)
        try:
            lo = [-math.inf if p[0] is None else p[0] for p in pairs]
            hi = [math.inf if p[1] is None else p[1] for p in pairs]
        except (TypeError, IndexError):
            raise ValueError("bounds must be a scipy.optimize.Bounds or a sequence of "
                             "(min, max) pairs") from None
    try:
        lo = np.broadcast_to(np.asarray(lo, dtype=np.float64), (n,))
        hi = np.broadcast_to(np.asarray(hi, dtype=np.float64), (n,))
    except ValueError:
        raise ValueError(wrong_length) from None
    if np.any(hi < lo):
        raise ValueError("An upper bound is less than the corresponding lower bound.")
    return lo, hi
