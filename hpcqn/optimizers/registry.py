"""The block optimizers by name, for the front ends that take a method name and a table
of options (:func:`hpcqn.minimize_stochastic`, the job files): the names and their
options come from the classes' declarations (:mod:`hpcqn.options`), so a front end cannot
drift from what the constructors take."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .. import options as _options
from ..layout import BlockLayout
from ..options import Option, OptionError
from .blockwise import BlockOptimizer
from .first_order import SGD, Adam
from .mlbfgs import MLBFGS

__all__ = ["METHODS", "make", "options_of"]

METHODS: dict[str, type[BlockOptimizer]] = {"mlbfgs": MLBFGS, "sgd": SGD, "adam": Adam}


def _class(method: str, where: str = "") -> type[BlockOptimizer]:
    if method not in METHODS:
        prefix = f"{where}: " if where else ""
        raise OptionError(f"{prefix}unknown method {method!r}; known: {', '.join(METHODS)}")
    return METHODS[method]


def options_of(method: str) -> dict[str, Option]:
    """The options of block method ``method`` (name -> :class:`hpcqn.options.Option`, in
    the constructor's order; an :class:`hpcqn.options.Spec`, so :func:`hpcqn.options.check`
    also takes their deprecated names). Unknown method: :class:`OptionError`."""
    return _options.declared(_class(method))


def make(method: str, layout: BlockLayout, comm: Any, options: Mapping[str, Any],
         where: str = "") -> BlockOptimizer:
    """The block optimizer ``method`` over ``layout`` and ``comm`` with ``options``
    (checked by :func:`hpcqn.options.check`: an unknown method or option, or a bad value,
    raises :class:`OptionError` naming it; pairs become tuples; deprecated names are
    renamed with a ``DeprecationWarning``)."""
    klass = _class(method, where)
    values = _options.check(_options.declared(klass), options, where or f"method {method!r}")
    return klass(layout, comm, **values)
