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
from .comm import UNSET, get_comm
from .layout import BlockLayout
from .optimizers import registry
from .options import Option, OptionError, Rule, check
from .run import CheckpointPolicy, Driver, skip_done

SCHEDULES = ("constant", "cosine")
# The driver's own options (the method's come from its declaration, hpcqn.options);
# "blocks", a list of block sizes, is checked by _layout.
DRIVER_OPTIONS: dict[str, Option] = {
    "epochs": Option("epochs", 1, Rule("int", 1)),
    "block_size": Option("block_size", 1 << 16, Rule("int", 1)),
    "disp": Option("disp", True, Rule("bool")),
    "lr_schedule": Option("lr_schedule", "constant", Rule("str", choices=SCHEDULES)),
}


def options_of(method: str) -> dict[str, Option]:
    """Every option :func:`minimize_stochastic` takes with ``method`` (but ``blocks``)."""
    return {**DRIVER_OPTIONS, **registry.options_of(method)}


def _layout(n: int, options: Mapping[str, Any], nranks: int) -> BlockLayout:
    if "blocks" in options and "block_size" in options:
        raise ValueError("give either 'blocks' (a list of sizes) or 'block_size', not both")
    if "blocks" in options:
        blocks = options["blocks"]
        if isinstance(blocks, (str, bytes)) or not all(
                isinstance(size, (int, np.integer)) and not isinstance(size, bool) and size > 0
                for size in blocks):
            raise OptionError(f"option 'blocks' must be a list of positive integers, got "
                              f"{blocks!r}")
        sizes = [int(s) for s in blocks]
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
    ``skipped_steps`` (steps not taken: a non-finite gradient or loss on any rank; their
    losses stay in ``loss_history`` but not in ``epoch_losses``), ``seconds``,
    ``status``/``message``.
    """
    c = get_comm(comm)
    setup_error: BaseException | None = None
    checksum = [0.0, 0.0]
    try:
        check_float_array(x0, "x0", finite=True)
        given = dict(options or {})
        blocks = {"blocks": given.pop("blocks")} if "blocks" in given else {}
        spec = options_of(method)
        driver_opts = check(DRIVER_OPTIONS, {k: v for k, v in given.items()
                                             if k in DRIVER_OPTIONS}, f"method {method!r}")
        method_opts = {k: v for k, v in given.items() if k not in DRIVER_OPTIONS}
        check(spec, method_opts, f"method {method!r}")  # names the option, known ones listed
        epochs = driver_opts.get("epochs", DRIVER_OPTIONS["epochs"].default)
        disp = driver_opts.get("disp", DRIVER_OPTIONS["disp"].default)
        schedule = driver_opts.get("lr_schedule", DRIVER_OPTIONS["lr_schedule"].default)
        layout = _layout(x0.shape[0], {**blocks, **driver_opts}, c.size)
        optimizer = registry.make(method, layout, c, method_opts)
        base_lr = optimizer.lr
        if schedule == "cosine" and callable(base_lr):
            raise ValueError("lr_schedule='cosine' needs a number as lr, not a callable")
        x = namespace(x0).array(x0, copy=True)
        checksum = [float(x.sum()), float((x * x).sum())]
    except (TypeError, ValueError) as exc:
        setup_error = exc
    # One reduction before the first step: bad input on any rank raises on every rank,
    # and the configuration and x0 must be the same everywhere.
    given = dict(options or {})
    config = {"method": method, "x0 length": getattr(x0, "size", None),
              "blocks": given.get("blocks"),
              **{f"option {name!r}": given.get(name, UNSET) for name in _ALL_OPTIONS}}
    c.check_same(config, "minimize_stochastic", setup_error)
    reduced = c.allreduce_named(same={"sum of x0": checksum[0], "sum of x0^2": checksum[1]})
    if reduced.differ:
        raise ValueError("x0 differs between ranks; every rank must start from the same x0")

    start = time.perf_counter()
    losses: list[float] = []
    epoch_losses: list[float] = []
    status, message = 0, "finished the requested epochs"
    first_epoch, skip = 0, 0
    # The epoch's finite losses (sum and count) and the steps skipped for a non-finite loss.
    tally = {"sum": 0.0, "counted": 0, "skipped": 0}
    driver = Driver(
        c, {"method": method, "options": dict(options or {}), "n": int(x.shape[0]),
            "dtype": str(x.dtype)},
        CheckpointPolicy(checkpoint_dir, checkpoint_every, keep, resume), stop,
        meta={"kind": "minimize_stochastic"})
    saved = driver.resume(like=lambda: {"x": x})
    if saved is not None:
        x[...] = namespace(x).asarray(saved["x"])
        optimizer.load_state_dict(saved["optimizer"])
        losses, epoch_losses = list(saved["losses"]), list(saved["epoch_losses"])
        first_epoch, skip, tally = saved["epoch"], saved["batch"], dict(saved["tally"])

    def state(epoch: int, batch: int, counts: dict[str, Any]) -> dict[str, Any]:
        return {"x": x, "optimizer": optimizer.state_dict(), "epoch": epoch, "batch": batch,
                "tally": dict(counts), "losses": losses, "epoch_losses": epoch_losses}

    for epoch in range(first_epoch, epochs):
        if schedule == "cosine":  # annealed per epoch: lr0 (1 + cos(pi e / E)) / 2
            optimizer.lr = base_lr * 0.5 * (1.0 + math.cos(math.pi * epoch / epochs))
        iterator = skip_done(_epoch_batches(batches, epoch, epochs), skip)
        epoch_steps, skip = skip, 0
        if epoch != first_epoch:
            tally.update(sum=0.0, counted=0)
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
                                                                 tally),
                          epoch=epoch, batch=epoch_steps)
            loss = reduced.sums["loss"] / c.size
            if math.isfinite(loss):
                optimizer.step(x, namespace(x).asarray(g, dtype=x.dtype))
                tally["sum"] += loss
                tally["counted"] += 1
            else:  # a non-finite loss on any rank: skipped on every rank, like a bad gradient
                tally["skipped"] += 1
            losses.append(loss)
            epoch_steps += 1
            driver.call(callback, OptimizeResult(x=x, fun=loss, nit=len(losses), epoch=epoch,
                                                 epoch_end=False))
        if status == 99:
            break
        epoch_losses.append(tally["sum"] / tally["counted"] if tally["counted"]
                            else 0.0 if not epoch_steps else math.nan)
        driver.save(len(losses), state(epoch + 1, 0, {**tally, "sum": 0.0, "counted": 0}),
                    epoch=epoch + 1, batch=0)
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
        nit=len(losses), nepochs=len(epoch_losses),
        skipped_steps=optimizer.skipped_steps + tally["skipped"],
        seconds=time.perf_counter() - start, status=status, success=status == 0,
        message=message, optimizer=optimizer,
    )


_END = object()


# Every option name any method or the driver has: a layout of the start's agreement that
# is the same on every rank whatever each rank was given.
_ALL_OPTIONS = sorted({*DRIVER_OPTIONS, *(name for method in registry.METHODS
                                         for name in registry.options_of(method))})
