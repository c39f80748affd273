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
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from scipy.optimize import OptimizeResult

from . import backend
from .comm import get_comm, serial_comm
from .layout import gather_global
from .optimizers.lbfgs import CALLBACK_STOP, LBFGS, FunctionError, LBFGSOptions
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
        same options: anything else is a :class:`hpcqn.checkpoint.CheckpointError`).

    Returns
    -------
    OptimizeResult with SciPy's fields (``x`` is this rank's slice) plus ``nallreduce``
    (reductions this call made), ``comm_bytes``, ``nreset``, ``npairs_skipped``,
    ``seconds`` and, with ``gather_x``, ``x_global``.
    """
    return _minimize(fun, x0, comm, method, options, callback, checkpoint_dir,
                     checkpoint_every, stop, resume, keep)[0]


def _minimize(fun: Callable[[Any], tuple[Any, Any]], x0: Any, comm: Any, method: str,
              options: Mapping[str, Any] | None, callback: Callable[..., Any] | None,
              checkpoint_dir: str | Path | None, checkpoint_every: int, stop: Any,
              resume: bool, keep: int) -> tuple[OptimizeResult, LBFGS]:
    """:func:`minimize`, also returning the solver (its history makes SciPy's hess_inv)."""
    c = get_comm(comm)
    bytes_before = sum(counter.nbytes for counter in c.counters.values())
    try:
        opts = parse_options(method, options)
        backend.check_float_array(x0, "x0", finite=True)
    except (TypeError, ValueError) as exc:
        # Raised on every rank, even when only this rank's input is bad.
        LBFGS(fun, c, LBFGSOptions()).fail_setup(exc)
        raise  # pragma: no cover - fail_setup always raises

    solver = LBFGS(fun, c, opts)
    config = {"options": {k: v for k, v in vars(opts).items() if k != "disp"},
              "n_local": int(x0.shape[0]), "dtype": str(x0.dtype), "nranks": c.size}
    policy = CheckpointPolicy(checkpoint_dir, checkpoint_every, keep, resume)
    # Signals stop a minimize only where a checkpoint can be written.
    driver = Driver(c, config, policy, stop if checkpoint_dir is not None else None,
                    meta={"kind": "minimize"})
    saved = driver.resume(same_ranks="minimize resumes on the same rank count (the "
                                     "unknown's slices belong to the callback)")
    solver.start(x0, None if saved is None else saved["solver"])
    user_callback = _scipy_style(callback)

    def boundary(x: Any, f: float, g: Any, nit: int) -> tuple[dict[str, float], Any]:
        driver.call(user_callback, x, f, g, nit)
        return driver.flags(), driver.error()

    while solver.status is None:
        agreed = solver.iterate(boundary)
        if not agreed:  # the line search ended or restarted the iteration: no agreement
            continue
        if solver.status is None:
            if agreed["stop"] > 0:
                solver.stop(CALLBACK_STOP, "`callback` raised `StopIteration`.")
            else:
                driver.settle(agreed, solver.nit, lambda: {"solver": solver.state_dict()},
                              nit=solver.nit)
    out = solver.outcome()
    result = OptimizeResult(
        x=out.x, fun=out.f, jac=out.g, nit=out.nit, nfev=out.nfev, njev=out.nfev,
        status=out.status, success=out.status == 0, message=out.message,
        nallreduce=solver.nreductions,
        comm_bytes=sum(counter.nbytes for counter in c.counters.values()) - bytes_before,
        nreset=out.nreset, npairs_skipped=out.npairs_skipped, seconds=out.seconds,
    )
    if opts.gather_x:
        result.x_global = gather_global(out.x, c)
    if opts.disp and c.rank == 0:
        print(
            f"hpcqn.minimize: {out.message} | f {out.f:.10e} max|g| {out.gnorm_inf:.3e} "
            f"nit {out.nit} nfev {out.nfev} reductions {result.nallreduce} "
            f"{out.seconds:.3f} s on {c.size} rank(s)",
            flush=True,
        )
    return result, solver


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
    L-BFGS-B's conventions:

    - ``jac``: a callable, ``True`` (``fun`` returns ``(f, g)``), or ``None`` / ``False`` /
      ``"2-point"`` / ``"3-point"`` / ``"cs"``: the gradient by finite differences through
      :func:`scipy.optimize.approx_fprime` with L-BFGS-B's absolute step ``eps`` (or
      ``finite_diff_rel_step * max(1, |x|)``); ``"3-point"`` and ``"cs"`` take central
      differences (the mean of a forward and a backward difference).
    - options: ``maxcor`` (= ``history``), ``ftol``, ``gtol``, ``eps``, ``maxfun``,
      ``maxiter`` (``np.inf`` means no limit; a fraction rounds up, as L-BFGS-B counts),
      ``maxls``, ``finite_diff_rel_step``; ``disp``, ``iprint``, ``workers`` and
      ``return_all`` are accepted and do nothing; hpcqn's own options too. SciPy's
      ``tol`` sets ``ftol`` and ``gtol``, as for L-BFGS-B.
    - ``f`` may be a size-1 array and ``jac`` any array-like; ``fun`` sees a copy of the
      iterate (it may overwrite it); ``x`` and ``jac`` come back as float64; a non-finite
      value at ``x0`` gives a failed result (``success=False``, status 2), not an error.
    - ``res.hess_inv`` is a :class:`scipy.optimize.LbfgsInvHessProduct` of the kept pairs.
    - ``bounds``: ``None``, or bounds that bound nothing (``Bounds(-inf, inf)``, pairs of
      ``None``); real bounds are refused (an unconstrained method). Constraints are
      refused; ``hess``/``hessp`` are ignored.
    """
    import numpy as np
    from scipy.optimize import LbfgsInvHessProduct, approx_fprime

    options = dict(options)
    options.pop("hess", None)
    options.pop("hessp", None)
    if constraints is not None and len(constraints):
        raise ValueError("hpcqn's L-BFGS is unconstrained; constraints are not supported")
    x0 = np.asarray(x0, dtype=np.float64).ravel().copy()
    if not _no_bounds(bounds, x0.size):
        raise ValueError("hpcqn's L-BFGS is unconstrained: bounds that bound something are "
                         "not supported yet (use scipy's L-BFGS-B)")
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
                options[name] = sys.maxsize if math.isinf(limit) else int(math.ceil(limit))
    eps = options.pop("eps", 1e-8)
    rel_step = options.pop("finite_diff_rel_step", None)

    def value(x: Any) -> float:
        f = np.asarray(fun(x.copy(), *args), dtype=np.float64)
        if f.size != 1:
            raise FunctionError(f"fun must return a scalar (or a size-1 array), got shape "
                                f"{f.shape}")
        return float(f.reshape(()))

    def grad_of(x: Any, g: Any) -> Any:
        return np.asarray(g, dtype=np.float64).reshape(x.shape)

    if callable(jac):

        def fun_and_grad(x: Any) -> tuple[Any, Any]:
            return value(x), grad_of(x, jac(x.copy(), *args))

    elif jac is True:

        def fun_and_grad(x: Any) -> tuple[Any, Any]:
            f, g = fun(x.copy(), *args)
            f = np.asarray(f, dtype=np.float64)
            if f.size != 1:
                raise FunctionError(f"fun must return a scalar f, got shape {f.shape}")
            return float(f.reshape(())), grad_of(x, g)

    elif jac in (None, False) or jac in _FD_METHODS:
        central = jac in ("3-point", "cs")

        def fun_and_grad(x: Any) -> tuple[Any, Any]:
            h = eps if rel_step is None else rel_step * np.maximum(1.0, np.abs(x))
            f = value(x)
            g = approx_fprime(x, value, h)
            if central:
                g = 0.5 * (g + approx_fprime(x, value, -h))
            return f, g

    else:
        raise ValueError(f"jac must be a callable, True, None, False or one of {_FD_METHODS}, "
                         f"got {jac!r}")
    try:
        result, solver = _minimize(fun_and_grad, x0, serial_comm(), "lbfgs", options,
                                   callback, None, 0, None, True, 2)
    except FunctionError as exc:
        if "non-finite value at x0" not in str(exc):
            raise
        return OptimizeResult(x=x0, fun=math.nan, jac=np.full_like(x0, math.nan), nit=0,
                              nfev=1, njev=1, status=2, success=False,
                              message=f"ABNORMAL: {exc}")
    history = solver.history
    pairs = [(history.vectors[2 * slot], history.vectors[2 * slot + 1])
             for slot in history.order]
    s = np.array([p[0] for p in pairs]).reshape(len(pairs), x0.size)
    y = np.array([p[1] for p in pairs]).reshape(len(pairs), x0.size)
    result.hess_inv = LbfgsInvHessProduct(s, y)
    return result


def _no_bounds(bounds: Any, n: int) -> bool:
    """Whether SciPy-style ``bounds`` (None, a ``Bounds``, or (lo, hi) pairs) bound
    nothing."""
    import numpy as np

    if bounds is None:
        return True
    if hasattr(bounds, "lb") and hasattr(bounds, "ub"):
        lo, hi = bounds.lb, bounds.ub
    else:
        pairs = list(bounds)
        lo = [-math.inf if p[0] is None else p[0] for p in pairs]
        hi = [math.inf if p[1] is None else p[1] for p in pairs]
    lo = np.broadcast_to(np.asarray(lo, dtype=np.float64), (n,))
    hi = np.broadcast_to(np.asarray(hi, dtype=np.float64), (n,))
    return bool(np.all(np.isneginf(lo)) and np.all(np.isposinf(hi)))
