"""``hpcqn.minimize_stochastic``: data-parallel training of a flat parameter vector from
minibatch callbacks, with mL-BFGS or the first-order baselines.

Every rank holds the whole ``x`` (replicated) and its own iterable of batches;
``fun(x, batch) -> (f, g)`` returns this rank's share, and the step uses the average of
``g`` over ranks (so a rank should return the mean over its part of the global batch,
or a weighted share whose average over ranks is the global mean). Each step makes one
small reduction of the loss (it also checks that every rank still has a batch and that
no rank failed), then the optimizer's own reduce-scatter and allgatherv.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from scipy.optimize import OptimizeResult

from .backend import check_float_array, namespace
from .comm import get_comm
from .layout import BlockLayout
from .optimizers.blockwise import BlockOptimizer
from .optimizers.first_order import SGD, Adam
from .optimizers.mlbfgs import MLBFGS
from .run import CheckpointPolicy, Driver, skip_done

METHODS: dict[str, type[BlockOptimizer]] = {"mlbfgs": MLBFGS, "sgd": SGD, "adam": Adam}
DRIVER_OPTIONS = {"epochs", "blocks", "block_size", "disp", "lr_schedule"}
SCHEDULES = ("constant", "cosine")
METHOD_OPTIONS = {
    "mlbfgs": {"lr", "history", "period", "beta", "damping", "weight_decay", "sigma_l",
               "sigma_h", "momentum_form", "pair_smoothing", "normalize_direction",
               "direction_momentum"},
    "sgd": {"lr", "momentum", "nesterov", "weight_decay"},
    "adam": {"lr", "betas", "eps", "weight_decay"},
}


def make_optimizer(
    method: str, layout: BlockLayout, comm: Any, options: Mapping[str, Any]
) -> BlockOptimizer:
    """A block optimizer by name with its options (unknown names are errors)."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; known: {', '.join(METHODS)}")
    unknown = sorted(set(options) - METHOD_OPTIONS[method])
    if unknown:
        raise ValueError(
            f"unknown option(s) {', '.join(map(repr, unknown))} for method {method!r}; "
            f"known: {', '.join(sorted(METHOD_OPTIONS[method] | DRIVER_OPTIONS))}"
        )
    kwargs = dict(options)
    if "betas" in kwargs:
        kwargs["betas"] = tuple(kwargs["betas"])
    return METHODS[method](layout, comm, **kwargs)


def _layout(n: int, options: Mapping[str, Any], nranks: int) -> BlockLayout:
    if "blocks" in options and "block_size" in options:
        raise ValueError("give either 'blocks' (a list of sizes) or 'block_size', not both")
    if "blocks" in options:
        sizes = [int(s) for s in options["blocks"]]
        if sum(sizes) != n:
            raise ValueError(f"option 'blocks' sums to {sum(sizes)} but x0 has {n} entries")
        return BlockLayout.from_sizes(sizes, nranks)
    return BlockLayout.chunks(n, int(options.get("block_size", 1 << 16)), nranks)


def _epoch_batches(batches: Any, epoch: int, epochs: int) -> Iterable[Any]:
    if callable(batches):
        return batches(epoch)
    if epochs > 1 and iter(batches) is batches:
        raise TypeError(
            "batches is an iterator, which can be walked once; for several epochs pass a "
            "list, a re-iterable object, or a callable epoch -> iterable"
        )
    return batches


def minimize_stochastic(
    fun: Callable[[Any, Any], tuple[Any, Any]],
    x0: Any,
    batches: Iterable[Any] | Callable[[int], Iterable[Any]],
    method: str = "mlbfgs",
    comm: Any = None,
    options: Mapping[str, Any] | None = None,
    callback: Callable[[OptimizeResult], Any] | None = None,
    checkpoint_dir: str | Path | None = None,
    checkpoint_every: int = 0,
    stop: Any = None,
    resume: bool = True,
    keep: int = 2,
) -> OptimizeResult:
    """Train ``x`` (replicated on every rank) over this rank's ``batches``.

    With ``checkpoint_dir``: ``x``, the optimizer's state (per block id), the position
    (epoch and batch) and the losses are checkpointed at every epoch's end, every
    ``checkpoint_every`` steps, and when ``stop`` (a :class:`hpcqn.signals.StopFlag`)
    reports a signal on any rank (agreed in the step's own reduction; then
    :class:`hpcqn.signals.Preempted` is raised); with ``resume`` the run continues from
    the latest checkpoint, on any rank count, skipping the batches already done (the
    batches of an epoch must be the same when walked again).

    ``options``: ``epochs`` (default 1), ``blocks`` (block sizes in parameter order) or
    ``block_size`` (fixed chunks; default 65536), ``disp`` (rank 0 prints one line per
    epoch; default True), ``lr_schedule`` (``"constant"`` or ``"cosine"``: annealed per
    epoch, ``lr (1 + cos(pi epoch / epochs)) / 2``) and the method's own (``lr``; for
    ``"mlbfgs"`` ``history``, ``period``, ``beta``, ``damping``, ...; ``"sgd"``:
    ``momentum``, ``nesterov``; ``"adam"``: ``betas``, ``eps``; all: ``weight_decay``).

    ``callback`` is called on every rank after each step with ``x``, ``fun`` (the step's
    mean loss over ranks), ``nit``, ``epoch`` and ``epoch_end``; ``StopIteration`` from
    it on any rank stops every rank before the next step.

    Returns an ``OptimizeResult`` with ``x``, ``fun`` (mean loss of the last epoch),
    ``loss_history`` (per step), ``epoch_losses``, ``nit``, ``nepochs``,
    ``skipped_steps`` (non-finite gradients), ``seconds``, ``status``/``message``.
    """
    c = get_comm(comm)
    setup_error: BaseException | None = None
    checksum = [0.0, 0.0]
    try:
        check_float_array(x0, "x0")
        opts = dict(options or {})
        epochs = int(opts.pop("epochs", 1))
        disp = bool(opts.pop("disp", True))
        schedule = opts.pop("lr_schedule", "constant")
        if schedule not in SCHEDULES:
            raise ValueError(f"option 'lr_schedule' must be one of {SCHEDULES}, got {schedule!r}")
        if epochs < 1:
            raise ValueError(f"option 'epochs' must be >= 1, got {epochs}")
        layout = _layout(x0.shape[0], opts, c.size)
        opts.pop("blocks", None)
        opts.pop("block_size", None)
        optimizer = make_optimizer(method, layout, c, opts)
        base_lr = optimizer.lr
        if schedule == "cosine" and callable(base_lr):
            raise ValueError("lr_schedule='cosine' needs a number as lr, not a callable")
        x = namespace(x0).array(x0, copy=True)
        checksum = [float(x.sum()), float((x * x).sum())]
    except (TypeError, ValueError) as exc:
        setup_error = exc
    # One reduction before the first step: bad input on any rank raises on every rank,
    # and x0 must be the same everywhere.
    reduced = c.allreduce_named(same={"sum of x0": checksum[0], "sum of x0^2": checksum[1]},
                                error=setup_error)
    if reduced.differ:
        raise ValueError("x0 differs between ranks; every rank must start from the same x0")

    start = time.perf_counter()
    losses: list[float] = []
    epoch_losses: list[float] = []
    status, message = 0, "finished the requested epochs"
    first_epoch, skip, epoch_sum = 0, 0, 0.0
    driver = Driver(
        c, {"method": method, "options": dict(options or {}), "n": int(x.shape[0]),
            "dtype": str(x.dtype)},
        CheckpointPolicy(checkpoint_dir, checkpoint_every, keep, resume), stop,
        meta={"kind": "minimize_stochastic"})
    saved = driver.resume()
    if saved is not None:
        x[...] = namespace(x).asarray(saved["x"])
        optimizer.load_state_dict(saved["optimizer"])
        losses, epoch_losses = list(saved["losses"]), list(saved["epoch_losses"])
        first_epoch, skip, epoch_sum = saved["epoch"], saved["batch"], saved["epoch_sum"]

    def state(epoch: int, batch: int, partial: float) -> dict[str, Any]:
        return {"x": x, "optimizer": optimizer.state_dict(), "epoch": epoch, "batch": batch,
                "epoch_sum": partial, "losses": losses, "epoch_losses": epoch_losses}

    for epoch in range(first_epoch, epochs):
        if schedule == "cosine":  # annealed per epoch: lr0 (1 + cos(pi e / E)) / 2
            optimizer.lr = base_lr * 0.5 * (1.0 + math.cos(math.pi * epoch / epochs))
        iterator = skip_done(_epoch_batches(batches, epoch, epochs), skip)
        epoch_steps, skip = skip, 0
        if epoch != first_epoch:
            epoch_sum = 0.0
        while True:
            _, batch = next(iterator, (None, _END))
            exhausted = batch is _END
            f, g, error = 0.0, None, None
            if not exhausted:
                try:
                    f, g = fun(x, batch)
                    f = float(f)
                    if getattr(g, "shape", None) != x.shape:
                        raise ValueError(
                            f"fun returned a gradient of shape {getattr(g, 'shape', None)} "
                            f"for x of shape {x.shape}"
                        )
                except BaseException as exc:  # KeyboardInterrupt too: every rank raises below
                    error = exc
            # The step's one reduction: the loss, whether every rank still has a batch,
            # the driver's stop and signal flags, and any rank's failure.
            reduced = c.allreduce_named(
                {"loss": f},
                {"exhausted": float(exhausted), "unexhausted": float(not exhausted),
                 **driver.flags()},
                driver.error() or error,
            )
            agreed = reduced.maxes
            if agreed["exhausted"] and agreed["unexhausted"]:
                raise ValueError(
                    f"ranks ran out of batches at different steps (epoch {epoch}, step "
                    f"{epoch_steps}); every rank needs the same number of batches per epoch"
                )
            if agreed["stop"]:
                status, message = 99, "`callback` raised `StopIteration`."
                break
            if agreed["exhausted"]:
                break
            # Before this step: a checkpoint when due or signalled (then Preempted).
            driver.settle(agreed, len(losses), functools.partial(state, epoch, epoch_steps,
                                                                 epoch_sum),
                          epoch=epoch, batch=epoch_steps)
            loss = reduced.sums["loss"] / c.size
            optimizer.step(x, namespace(x).asarray(g, dtype=x.dtype))
            losses.append(loss)
            if math.isfinite(loss):
                epoch_sum += loss
            epoch_steps += 1
            driver.call(callback, OptimizeResult(x=x, fun=loss, nit=len(losses), epoch=epoch,
                                                 epoch_end=False))
        if status == 99:
            break
        epoch_losses.append(epoch_sum / max(epoch_steps, 1))
        driver.save(len(losses), state(epoch + 1, 0, 0.0), epoch=epoch + 1, batch=0)
        driver.call(callback, OptimizeResult(x=x, fun=epoch_losses[-1], nit=len(losses),
                                             epoch=epoch, epoch_end=True))
        if disp and c.rank == 0:
            print(
                f"{method} epoch {epoch + 1}/{epochs}: mean loss {epoch_losses[-1]:.6g}, "
                f"{epoch_steps} steps, {time.perf_counter() - start:.2f} s",
                flush=True,
            )
    # A failure or a stop request in the last callback reaches every rank.
    if callback is not None and driver.finish() and status == 0:
        status, message = 99, "`callback` raised `StopIteration`."
    return OptimizeResult(
        x=x, fun=epoch_losses[-1] if epoch_losses else math.nan,
        loss_history=np.array(losses), epoch_losses=np.array(epoch_losses),
        nit=len(losses), nepochs=len(epoch_losses), skipped_steps=optimizer.skipped_steps,
        seconds=time.perf_counter() - start, status=status, success=status == 0,
        message=message, optimizer=optimizer,
    )


_END = object()
