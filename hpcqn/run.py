"""The driver loop's bookkeeping, shared by :func:`hpcqn.minimize`,
:func:`hpcqn.minimize_stochastic` and the torch training of :mod:`hpcqn.experiments`:
the checkpoint policy (directory, every N steps, keep K, resume or fresh), the check
that a checkpoint was saved for the same configuration, the position to resume from
(epoch and batch), the user's callback (``StopIteration`` asks every rank to stop), and
the stop on SIGUSR1/SIGTERM, agreed on by every rank in a reduction the loop already
makes, which then checkpoints and raises :class:`hpcqn.signals.Preempted`.

A loop owns its solver (which knows nothing of files or signals: it offers a step,
``state_dict`` and ``load_state_dict``) and asks a :class:`Driver` at each step boundary::

    flags = driver.flags()                      # this rank's stop/signal flags
    reduced = comm.allreduce_named(..., maxes={**mine, **flags}, error=driver.error())
    if driver.settle(reduced.maxes, step, state):   # saves when due; Preempted on a signal
        break                                   # a callback raised StopIteration
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from . import checkpoint
from .comm import Communicator, RemoteRankError
from .signals import Preempted

# What an agreement gives when a loop has nothing to agree on (no stop flag installed).
NOTHING_AGREED = {"stop": 0.0, "signal": 0.0}


@dataclass
class CheckpointPolicy:
    """Where and how often a run checkpoints. ``directory`` None: never; ``every``: every
    that many steps (0: only at epoch ends and on a signal); ``keep``: checkpoints kept;
    ``resume``: continue from the latest one in ``directory`` (else start afresh and
    overwrite)."""

    directory: str | Path | None = None
    every: int = 0
    keep: int = 2
    resume: bool = True

    def __post_init__(self) -> None:
        for name, low in (("every", 0), ("keep", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"checkpoint {name} must be an integer >= {low}, got {value!r}")


def _text(value: Any) -> str:
    return repr(tuple(value) if isinstance(value, list) else value)


def flatten(config: Mapping[str, Any], prefix: str = "",
            leaf: Callable[[Any], Any] = _text) -> dict[str, Any]:
    """A configuration as ``{"section.key": leaf(value)}``; by default the value's repr
    (lists as tuples): comparable, storable in a checkpoint whatever the values are, and
    differences can be named key by key."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, name + ".", leaf))
        else:
            out[name] = leaf(value)
    return out


def differences(saved: Mapping[str, str], current: Mapping[str, str],
                extendable: Iterable[str] = ()) -> list[str]:
    """The keys whose values differ (or that only one side has), as ``key: old -> new``;
    a key of ``extendable`` (a length of the run: epochs, an iteration limit) whose whole
    number only grew is no difference: the run continues to the new length."""
    keys = sorted(set(saved) | set(current))
    missing = "(not set)"
    return [f"{k}: {saved.get(k, missing)} -> {current.get(k, missing)}"
            for k in keys if saved.get(k) != current.get(k)
            and not (k in extendable and _grew(saved.get(k), current.get(k)))]


def _grew(old: Any, new: Any) -> bool:
    """Whether two shown values are whole numbers and the second is at least the first."""
    try:
        return int(str(new)) >= int(str(old))
    except ValueError:
        return False


class Driver:
    """One run's checkpoints, callback and signals (see the module docstring). ``config``
    (a nested dict) is saved with every checkpoint and must match on resume; ``stop`` is
    a :class:`hpcqn.signals.StopFlag` (anything with a ``signum`` attribute)."""

    def __init__(self, comm: Communicator, config: Mapping[str, Any],
                 policy: CheckpointPolicy | None = None, stop: Any = None,
                 meta: Mapping[str, Any] | None = None, extendable: Iterable[str] = ()):
        self.comm = comm
        self.config = flatten(config)
        # keys of config that may grow between a checkpoint and its resumption (the run's
        # length: its epochs, its iteration limit)
        self.extendable = tuple(extendable)
        self.policy = policy or CheckpointPolicy()
        self.stop = stop
        self.meta = dict(meta or {})
        self._stop_requested = False
        self._error: BaseException | None = None
        self._signum: int | None = None
        self._saved_step: int | None = None  # the step of the newest checkpoint
        self.resumed_from: checkpoint.Checkpoint | None = None

    # -- checkpoints -------------------------------------------------------------------
    @property
    def checkpointing(self) -> bool:
        return self.policy.directory is not None

    def resume(self, same_ranks: str | None = None,
               like: Callable[[], Mapping[str, Any]] | None = None) -> dict[str, Any] | None:
        """The state saved by the latest checkpoint, or None (no directory, no checkpoint,
        or ``resume`` off). A checkpoint saved for another configuration is a
        :class:`hpcqn.checkpoint.CheckpointError` on every rank naming the keys that
        differ; ``same_ranks`` (the reason) refuses one saved on another rank count;
        ``like`` (the state this run would save now, before its first step) refuses one
        in which an array or tensor of that state is missing or has another shape or
        dtype, naming its key path.

        Whether ``latest`` names a checkpoint is agreed first (one small reduction):
        every rank reads it with the loader's checks, and an error on any rank is an
        error on every rank, as is a rank that sees none where the others see one."""
        directory = self.policy.directory
        if directory is None or not self.policy.resume:
            return None
        found, error = None, None
        try:
            found = checkpoint.latest(directory)
        except checkpoint.CheckpointError as exc:
            error = exc
        try:
            agreed = self.comm.allreduce_named(error=error,
                                               same={"found": float(found is not None)})
        except RemoteRankError as exc:
            if exc.remote_type != "CheckpointError":
                raise
            raise checkpoint.RemoteCheckpointError(exc.rank, exc.remote_message) from exc
        if agreed.differ:
            raise checkpoint.CheckpointError(
                f"the ranks do not see the same {directory}/{checkpoint.LATEST} (holds a "
                f"checkpoint: {agreed.describe('found', lambda v: 'yes' if v else 'no')}): "
                f"every rank must see the same file system")
        if found is None:
            return None
        saved = checkpoint.load(directory, self.comm)
        state = saved.state()
        error = None
        if same_ranks is not None and saved.nranks != self.comm.size:
            error = checkpoint.CheckpointError(
                f"{saved.path} was saved on {saved.nranks} rank(s), this run has "
                f"{self.comm.size}: {same_ranks}")
        else:
            changed = differences(state.get("config", {}), self.config, self.extendable)
            if changed:
                error = checkpoint.CheckpointError(
                    f"{saved.path} was saved for another configuration ({'; '.join(changed)})"
                    f"; start fresh (--fresh, or resume=False) or restore the old settings")
            elif like is not None:
                unlike = mismatch(state, like())
                if unlike:
                    error = checkpoint.CheckpointError(
                        f"{saved.path} does not fit this run: {unlike}")
        self.comm.allreduce_scalars([], [], error)  # every rank raises if any rank's is bad
        self.resumed_from, self._saved_step = saved, saved.step
        return state

    def save(self, step: int, state: Mapping[str, Any], **meta: Any) -> None:
        """Checkpoint ``state`` (with the configuration) as step ``step``."""
        if self.policy.directory is None:
            return
        checkpoint.save(self.policy.directory, {"config": self.config, **state}, self.comm,
                        step=step, keep=self.policy.keep, meta={**self.meta, **meta})
        self._saved_step = step

    def due(self, step: int) -> bool:
        """Whether step ``step`` is one of the periodic checkpoints (and not saved yet)."""
        every = self.policy.every
        return (self.checkpointing and every > 0 and step % every == 0
                and step != self._saved_step)

    # -- callback, signals and the agreement -------------------------------------------
    def call(self, callback: Callable[..., Any] | None, *args: Any, **kwargs: Any) -> None:
        """Run the user's ``callback``: ``StopIteration`` asks every rank to stop at the next
        agreement, any other exception fails every rank there."""
        if callback is None:
            return
        try:
            callback(*args, **kwargs)
        except StopIteration:
            self._stop_requested = True
        except BaseException as exc:  # KeyboardInterrupt too: agreed at the next reduction
            if self._error is None:
                self._error = exc

    def flags(self) -> dict[str, float]:
        """This rank's flags for the next agreement (``stop``, ``signal``); the signal flag
        is read once here."""
        signum = None if self.stop is None else self.stop.signum
        if signum is not None:
            self._signum = signum
        return {"stop": float(self._stop_requested), "signal": float(signum is not None)}

    def error(self) -> BaseException | None:
        """This rank's pending failure (from the callback), for the next agreement; it is
        handed out once."""
        error, self._error = self._error, None
        return error

    def agree(self) -> dict[str, float]:
        """An agreement of its own (one small reduction), for loops with none near."""
        return self.comm.allreduce_named(maxes=self.flags(), error=self.error()).maxes

    def signalled(self, agreed: Mapping[str, float]) -> bool:
        return agreed["signal"] > 0

    def preempt(self, step: int) -> Preempted:
        """The exception to raise after the checkpoint of a signalled stop."""
        return Preempted(step, self._signum)

    def settle(self, agreed: Mapping[str, float], step: int,
               state: Callable[[], Mapping[str, Any]], **meta: Any) -> bool:
        """After an agreement at a step boundary: checkpoint when the step is due or any
        rank was signalled, then raise :class:`hpcqn.signals.Preempted` when signalled.
        Returns True when a callback on any rank asked to stop."""
        signalled = self.signalled(agreed)
        if signalled or self.due(step):
            self.save(step, state(), **meta)
        if signalled:
            raise self.preempt(step)
        return agreed["stop"] > 0

    def finish(self) -> bool:
        """After the loop: a failure in the run's last callback reaches every rank (one
        reduction); returns whether a callback on any rank asked to stop."""
        return self.agree()["stop"] > 0


def _signature(value: Any) -> tuple[str, tuple[int, ...], str] | None:
    """("tensor" or "array", shape, dtype name) of a torch tensor or an array, else None."""
    if isinstance(value, np.generic) or not (hasattr(value, "shape")
                                             and hasattr(value, "dtype")):
        return None  # NumPy scalars come back from a checkpoint as Python numbers
    kind = "tensor" if type(value).__module__.startswith("torch") else "array"
    return kind, tuple(int(n) for n in value.shape), str(value.dtype).replace("torch.", "")


def _described(signature: tuple[str, tuple[int, ...], str]) -> str:
    kind, shape, dtype = signature
    return f"{'an' if kind == 'array' else 'a'} {kind} of shape {shape} and dtype {dtype}"


def mismatch(saved: Any, like: Any, path: str = "") -> str | None:
    """Where ``saved`` (a loaded state) does not fit ``like`` (the state a run would save
    now): the key path of the first array or tensor of ``like`` that ``saved`` lacks or
    holds with another kind, shape or dtype, and both; None when all fit. Only what
    ``like`` has is compared (states grow: an optimizer's per-parameter entries appear at
    its first step), and only arrays, tensors and the containers above them."""
    where = path or "/"
    expected = _signature(like)
    if expected is not None:
        found = _signature(saved)
        if found != expected:
            shown = "not an array" if found is None else _described(found)
            return f"{where} is {shown}, this run has {_described(expected)}"
        return None
    if isinstance(like, Mapping):
        if not isinstance(saved, Mapping):
            return f"{where} is a {type(saved).__name__}, this run has a dict"
        for key, value in like.items():
            if key not in saved:
                if _holds_arrays(value):
                    return f"{path}/{key} is missing"
                continue
            found = mismatch(saved[key], value, f"{path}/{key}")
            if found:
                return found
    elif isinstance(like, (list, tuple)):
        if not isinstance(saved, (list, tuple)):
            return f"{where} is a {type(saved).__name__}, this run has a list"
        for index, value in enumerate(like):
            if index >= len(saved):
                if _holds_arrays(value):
                    return f"{path}/{index} is missing"
                continue
            found = mismatch(saved[index], value, f"{path}/{index}")
            if found:
                return found
    return None


def _holds_arrays(value: Any) -> bool:
    if _signature(value) is not None:
        return True
    if isinstance(value, Mapping):
        return any(_holds_arrays(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return any(_holds_arrays(v) for v in value)
    return False


def skip_done(batches: Iterable[Any], done: int) -> Iterator[tuple[int, Any]]:
    """``enumerate(batches)`` without the first ``done`` batches (those before the
    checkpoint a run resumed from)."""
    iterator = iter(batches)
    for _ in range(done):
        if next(iterator, _END) is _END:
            return
    index = done
    for batch in iterator:
        yield index, batch
        index += 1


_END = object()
