"""``hpcqn.minimize``: distributed L-BFGS for objective callbacks, SciPy-shaped.

``fun(x_local) -> (f_part, g_local)`` runs on every rank with that rank's slice of the
unknown; the objective is the sum of ``f_part`` over ranks (or, with the option
``fun_global``, the value every rank returns). :func:`scipy_lbfgs` is the same solver as
a SciPy custom method: ``scipy.optimize.minimize(fun, x0, jac=True, method=hpcqn.scipy_lbfgs)``.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from scipy.optimize import OptimizeResult

from . import backend
from .comm import get_comm, serial_comm
from .layout import gather_global
from .optimizers.lbfgs import CALLBACK_STOP, LBFGS, LBFGSOptions
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
    ``scipy.optimize.minimize(fun, x0, jac=True, method=hpcqn.scipy_lbfgs, options=...)``.

    SciPy's ``tol`` maps to ``gtol``; ``hess``/``hessp`` are ignored, and bounds or
    constraints are refused (this is an unconstrained method).
    """
    options.pop("hess", None)
    options.pop("hessp", None)
    if bounds is not None or (constraints is not None and len(constraints)):
        raise ValueError(
            "hpcqn's L-BFGS is unconstrained; bounds and constraints are not supported"
        )
    tol = options.pop("tol", None)
    if tol is not None:
        options.setdefault("gtol", tol)
    if callable(jac):

        def fun_and_grad(x: Any) -> tuple[Any, Any]:
            return fun(x, *args), jac(x, *args)

    elif jac is True:

        def fun_and_grad(x: Any) -> tuple[Any, Any]:
            return fun(x, *args)

    else:
        raise ValueError("hpcqn's L-BFGS needs the gradient: pass jac=True or a jac callable")
    return minimize(fun_and_grad, x0, comm=serial_comm(), options=options, callback=callback)
