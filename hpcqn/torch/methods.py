"""The torch optimizers by name, for the training front ends (the job files' ``[methods]``
tables): ``"mlbfgs"`` (:class:`hpcqn.torch.MLBFGS`), ``"mkor"`` and ``"mkor_h"``
(:class:`hpcqn.torch.MKOR`, the latter with ``hybrid=True``), ``"kfac"``
(:class:`hpcqn.torch.KFAC`), ``torch.optim.SGD`` / ``torch.optim.Adam`` /
``torch.optim.AdamW`` as ``"sgd"`` / ``"adam"`` / ``"adamw"``, and
:class:`hpcqn.torch.LAMB` as ``"lamb"``. Options come from the classes' declarations
(:mod:`hpcqn.options`); those of the first-order optimizers that a job file may set are
declared here."""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from .. import options as _options
from ..options import Option, OptionError, Rule, Spec
from .kfac import KFAC
from .lamb import LAMB
from .mkor import MKOR
from .mlbfgs import MLBFGS

__all__ = ["METHODS", "TORCH_RULES", "make", "options_of"]

METHODS = ("mlbfgs", "mkor", "mkor_h", "kfac", "sgd", "adam", "adamw", "lamb")

_UNIT = Rule("float", low=0.0, high=1.0, open_high=True)
# The options of torch.optim.SGD and torch.optim.Adam that a job file can set (their
# defaults are read from torch's signatures).
TORCH_RULES: dict[str, dict[str, Rule]] = {
    "sgd": {"lr": Rule("float", low=0.0), "momentum": Rule("float", low=0.0),
            "dampening": Rule("float"), "weight_decay": Rule("float", low=0.0),
            "nesterov": Rule("bool"), "maximize": Rule("bool")},
    "adam": {"lr": Rule("float", low=0.0), "betas": Rule("pair", low=0.0, high=1.0,
                                                         open_high=True),
             "eps": Rule("float", low=0.0, open_low=True),
             "weight_decay": Rule("float", low=0.0), "amsgrad": Rule("bool"),
             "maximize": Rule("bool")},
}
TORCH_RULES["adamw"] = TORCH_RULES["adam"]  # the same options; weight_decay defaults to 0.01
TORCH_RULES["lamb"] = {name: TORCH_RULES["adam"][name]
                       for name in ("lr", "betas", "eps", "weight_decay")}
_TORCH = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW,
          "lamb": LAMB}
_CLASSES: dict[str, type] = {"mlbfgs": MLBFGS, "mkor": MKOR, "mkor_h": MKOR, "kfac": KFAC}
# Set by the method's name, not by a job file.
_FIXED = {"mkor": {"hybrid": False}, "mkor_h": {"hybrid": True}}
# Not options of the method (the switch of MKOR-H only exists in "mkor_h").
_EXCLUDED = {"mkor": ("hybrid", "hybrid_window", "hybrid_threshold"), "mkor_h": ("hybrid",)}


def _known(method: str, where: str = "") -> None:
    if method not in METHODS:
        prefix = f"{where}: " if where else ""
        raise OptionError(f"{prefix}unknown method {method!r}; known: {', '.join(METHODS)}")


def options_of(method: str) -> dict[str, Option]:
    """The options a job file may set for ``method`` (name -> :class:`Option`; an
    :class:`hpcqn.options.Spec`, so :func:`hpcqn.options.check` takes deprecated names
    too). ``hybrid`` is not one for ``"mkor"``/``"mkor_h"``: the name sets it (and the
    switch's ``hybrid_window``/``hybrid_threshold`` are ``"mkor_h"``'s only). Unknown
    method: :class:`OptionError`."""
    _known(method)
    if method in _TORCH:
        parameters = inspect.signature(_TORCH[method].__init__).parameters
        return Spec({name: Option(name, parameters[name].default, rule)
                     for name, rule in TORCH_RULES[method].items()})
    spec = _options.declared(_CLASSES[method])
    return Spec({name: option for name, option in spec.items()
                 if name not in _EXCLUDED.get(method, ())}, deprecated=spec.deprecated)


def make(method: str, model: nn.Module, comm: Any, options: Mapping[str, Any],
         where: str = "") -> torch.optim.Optimizer:
    """The optimizer ``method`` for ``model`` over ``comm`` with ``options`` (checked:
    an unknown method or option, or a bad value, raises :class:`OptionError` naming it;
    ``betas`` becomes a tuple). ``"sgd"``/``"adam"`` get ``model.parameters()`` (``comm``
    unused: average the gradients yourself, :func:`hpcqn.torch.average_gradients`); so do
    ``"adamw"`` and ``"lamb"``."""
    _known(method, where)
    values = _options.check(options_of(method), options, where or f"method {method!r}")
    if method in _TORCH:
        return _TORCH[method](model.parameters(), **values)
    if method == "mlbfgs":
        return MLBFGS(model.parameters(), comm, **values)
    return _CLASSES[method](model, comm, **_FIXED.get(method, {}), **values)
