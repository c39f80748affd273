"""Options declared once. An optimizer's (or driver's) options are the keyword parameters
of its constructor: names and defaults come from the signature, and the kind and range
of each from the class's ``OPTION_RULES`` (merged along the class hierarchy). Every
front end (the torch wrappers, :func:`hpcqn.minimize_stochastic`, the job-file loader,
the docs) takes them from :func:`declared` and checks values with :func:`check`, so
they cannot drift apart.

Kinds are strict, as a job file's reader expects: an ``int`` option takes integers only
(``2.7``, ``true`` and ``"ten"`` are errors), a ``float`` option takes integers and
floats but not booleans (nor ``inf``/``nan`` unless the rule says ``finite=False``), a
``bool`` option takes only ``true``/``false``.

Renamed options: a class's ``DEPRECATED = {"old": "new"}`` (merged along the class
hierarchy) keeps the old name working for one release. :func:`check` (and so every front
end) and the constructors decorated with :func:`renames` accept it with a
:class:`DeprecationWarning` naming the new name, with the same effect; giving both names
is an error.

A class whose constructor forwards ``**kwargs`` to another class (a torch wrapper and its
core optimizer) says so with ``OPTIONS_FROM = Core``: its declaration then includes the
core's options (less its own ``NOT_OPTIONS``), so the wrapper takes every option of the
core without listing them again.

Constructors check their options with one call, ``options.validate(self, locals())``.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

KINDS = ("int", "float", "bool", "str", "pair", "schedule")


class OptionError(ValueError):
    """An option that is unknown or has a bad value; the message names it."""


class UnknownOptionError(OptionError, TypeError):
    """An option name that is not declared. Also a ``TypeError``, as Python raises for an
    unexpected keyword argument."""


@dataclass(frozen=True)
class Rule:
    """What an option accepts. ``kind`` is one of :data:`KINDS` (``pair``: two floats,
    each in the range; ``schedule``: a float in the range, or, from Python, a callable of
    the step); ``low``/``high`` bound numbers (``None``: unbounded; ``open_low`` /
    ``open_high`` exclude the bound itself); ``choices`` lists the allowed strings;
    ``none``: None (the constructor's "not set") is accepted too; ``python``: from
    Python, instances of these types are accepted too (e.g. a ready optimizer object)."""

    kind: str
    low: float | None = None
    high: float | None = None
    open_low: bool = False
    open_high: bool = False
    choices: tuple[str, ...] | None = None
    finite: bool = True
    none: bool = False
    python: tuple[type, ...] = ()

    def describe(self) -> str:
        extra = ""
        if self.python:
            extra += " (or, from Python, an instance of " + " or ".join(
                f"{t.__module__}.{t.__qualname__}" for t in self.python) + ")"
        if self.none:
            extra += " or None"
        return self._describe() + extra

    def _describe(self) -> str:
        if self.choices is not None:
            return "one of " + ", ".join(repr(c) for c in self.choices)
        what = {"int": "an integer", "float": "a number", "bool": "true or false",
                "str": "a string", "pair": "two numbers",
                "schedule": "a number (or, from Python, a callable of the step)"}[self.kind]
        bounds = []
        if self.low is not None:
            bounds.append(f"{'>' if self.open_low else '>='} {self.low:g}")
        if self.high is not None:
            bounds.append(f"{'<' if self.open_high else '<='} {self.high:g}")
        return what + (" " + " and ".join(bounds) if bounds else "")


@dataclass(frozen=True)
class Option:
    """One declared option: its name, default and rule, and ``old_names``, its deprecated
    names (still accepted by :func:`check`, with a warning; kept on the option so that
    they survive merging or filtering a spec)."""

    name: str
    default: Any
    rule: Rule
    old_names: tuple[str, ...] = ()


def _in_range(rule: Rule, number: float) -> bool:
    if rule.finite and not math.isfinite(number):
        return False
    if math.isnan(number):
        return False
    if rule.low is not None and (number < rule.low or (rule.open_low and number == rule.low)):
        return False
    return not (rule.high is not None
                and (number > rule.high or (rule.open_high and number == rule.high)))


def check_value(name: str, rule: Rule, value: Any, where: str = "") -> Any:
    """``value`` if ``rule`` accepts it (integers given for a float become floats; a pair
    becomes a tuple), else :class:`OptionError` naming ``name`` and what is allowed."""
    prefix = f"{where}: " if where else ""

    def bad() -> OptionError:
        return OptionError(f"{prefix}option {name} must be {rule.describe()}, got {value!r}")

    kind = rule.kind
    if value is None and rule.none:
        return None
    if rule.python and isinstance(value, rule.python):
        return value
    if kind == "schedule" and callable(value):
        return value
    if kind == "bool":
        if not isinstance(value, bool):
            raise bad()
        return value
    if kind == "str":
        if not isinstance(value, str) or (rule.choices is not None and value not in rule.choices):
            raise bad()
        return value
    if kind == "pair":
        if isinstance(value, (str, bytes)) or not hasattr(value, "__len__") or len(value) != 2:
            raise bad()
        items = tuple(value)
        if any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in items):
            raise bad()
        if not all(_in_range(rule, float(v)) for v in items):
            raise bad()
        return tuple(float(v) for v in items)
    if isinstance(value, bool):
        raise bad()
    if kind == "int":
        if not isinstance(value, int) and not _is_numpy_integer(value):
            raise bad()
        if not _in_range(rule, float(value)):
            raise bad()
        return int(value)
    if kind in ("float", "schedule"):
        if not isinstance(value, (int, float)) and not _is_numpy_number(value):
            raise bad()
        if not _in_range(rule, float(value)):
            raise bad()
        return float(value)
    raise ValueError(f"unknown option kind {kind!r}")  # pragma: no cover - a declaration bug


def _is_numpy_integer(value: Any) -> bool:
    import numpy as np

    return isinstance(value, np.integer)


def _is_numpy_number(value: Any) -> bool:
    import numpy as np

    return isinstance(value, (np.integer, np.floating))


class Spec(dict):
    """What :func:`declared` returns: option name -> :class:`Option`, in signature order,
    with ``deprecated`` (old name -> new name) for :func:`check`."""

    deprecated: dict[str, str]

    def __init__(self, *args: Any, deprecated: Mapping[str, str] | None = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.deprecated = dict(deprecated or {})


def _merged(target: Any, attribute: str) -> Any:
    """``attribute`` (a dict or a collection of names) merged along ``target``'s class
    hierarchy, subclasses last (they win)."""
    merged: Any = None
    for klass in reversed(getattr(target, "__mro__", (target,))):
        value = (vars(klass).get(attribute) if inspect.isclass(klass)
                 else getattr(klass, attribute, None))
        if not value:
            continue
        if isinstance(value, Mapping):
            merged = {**(merged or {}), **value}
        else:
            merged = (merged or set()) | set(value)
    return merged


def deprecated_names(target: Any) -> dict[str, str]:
    """Old option name -> new name for ``target`` (its ``DEPRECATED`` merged along the
    class hierarchy, and those of its ``OPTIONS_FROM``)."""
    out: dict[str, str] = {}
    source = getattr(target, "OPTIONS_FROM", None)
    if source is not None:
        out.update(deprecated_names(source))
    out.update(_merged(target, "DEPRECATED") or {})
    return out


def declared(target: Any) -> Spec:
    """The options of ``target`` (a class, or a function with an ``OPTION_RULES``
    attribute), in signature order: every keyword parameter that has a default and is
    not listed in ``NOT_OPTIONS`` (merged along the class hierarchy), then, when the
    signature takes ``**kwargs`` and ``target`` has ``OPTIONS_FROM``, the options of that
    class not already there nor in ``NOT_OPTIONS``. A parameter with no rule is a
    declaration bug and raises ``TypeError``; so is a ``DEPRECATED`` name that is not
    replaced by a declared option."""
    rules: dict[str, Rule] = _merged(target, "OPTION_RULES") or {}
    skip: set[str] = _merged(target, "NOT_OPTIONS") or set()
    function = target.__init__ if inspect.isclass(target) else target
    out: dict[str, Option] = {}
    forwards = False
    for parameter in inspect.signature(function).parameters.values():
        if parameter.kind is inspect.Parameter.VAR_KEYWORD:
            forwards = True
            continue
        if parameter.default is inspect.Parameter.empty or parameter.name in skip:
            continue
        if parameter.kind is inspect.Parameter.VAR_POSITIONAL:
            continue
        if parameter.name not in rules:
            raise TypeError(f"{getattr(target, '__qualname__', target)}: option "
                            f"{parameter.name!r} has no entry in OPTION_RULES")
        out[parameter.name] = Option(parameter.name, parameter.default, rules[parameter.name])
    source = getattr(target, "OPTIONS_FROM", None)
    if forwards and source is not None:
        for name, option in declared(source).items():
            if name not in out and name not in skip:
                out[name] = option
    deprecated = deprecated_names(target)
    for old, new in deprecated.items():
        if new not in out:
            raise TypeError(f"{getattr(target, '__qualname__', target)}: deprecated option "
                            f"{old!r} names {new!r}, which is not an option")
        if old not in out[new].old_names:
            out[new] = dataclasses.replace(out[new], old_names=(*out[new].old_names, old))
    return Spec(out, deprecated=deprecated)


def deprecated_in(spec: Mapping[str, Option]) -> dict[str, str]:
    """Old name -> new name for the options of ``spec`` (their ``old_names``, and a
    :class:`Spec`'s ``deprecated``)."""
    out = dict(getattr(spec, "deprecated", {}))
    for name, option in spec.items():
        out.update({old: name for old in getattr(option, "old_names", ())})
    return out


def rename_deprecated(deprecated: Mapping[str, str], values: Mapping[str, Any],
                      where: str = "", stacklevel: int = 2) -> dict[str, Any]:
    """``values`` with every deprecated name replaced by its new one (a
    :class:`DeprecationWarning` for each); an :class:`OptionError` when both are given."""
    prefix = f"{where}: " if where else ""
    out = dict(values)
    for old, new in deprecated.items():
        if old not in out:
            continue
        if new in out:
            raise OptionError(f"{prefix}option {old} is the deprecated name of {new}: give "
                              f"{new} only, not both")
        warnings.warn(f"{prefix}option {old!r} is deprecated; use {new!r} (the same "
                      f"option)", DeprecationWarning, stacklevel=stacklevel + 1)
        out[new] = out.pop(old)
    return out


def check(spec: Mapping[str, Option], values: Mapping[str, Any], where: str = "") -> dict[str, Any]:
    """``values`` checked against ``spec`` (from :func:`declared`): deprecated names are
    renamed (with a :class:`DeprecationWarning`), unknown names raise
    :class:`UnknownOptionError` and bad values :class:`OptionError`, naming the option;
    returns the converted values under their current names (only those given: defaults
    stay the constructor's)."""
    prefix = f"{where}: " if where else ""
    values = rename_deprecated(deprecated_in(spec), values, where, stacklevel=2)
    unknown = sorted(set(values) - set(spec))
    if unknown:
        raise UnknownOptionError(f"{prefix}unknown option(s) {', '.join(map(repr, unknown))}; "
                                 f"known: {', '.join(spec)}")
    return {name: check_value(name, spec[name].rule, value, where)
            for name, value in values.items()}


def validate(target: Any, values: Mapping[str, Any], where: str = "") -> dict[str, Any]:
    """The one check a constructor makes: ``options.validate(self, locals())``. Takes the
    entries of ``values`` that are options of ``type(target)`` (or of ``target``, a class),
    and the contents of any ``**kwargs`` dict of its constructor (every name there must
    be an option), and :func:`check` s them; returns the converted values."""
    klass = target if inspect.isclass(target) else type(target)
    spec = declared(klass)
    given: dict[str, Any] = {}
    for parameter in inspect.signature(klass.__init__).parameters.values():
        if parameter.kind is inspect.Parameter.VAR_KEYWORD:
            given.update(values.get(parameter.name) or {})
    given.update({name: value for name, value in values.items() if name in spec})
    return check(spec, given, where or klass.__qualname__)


def renames(init: Any) -> Any:
    """Decorate a constructor so that it takes its class's deprecated option names (a
    :class:`DeprecationWarning` naming the new one, the same effect; both names: an
    :class:`OptionError`)."""

    @functools.wraps(init)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        deprecated = deprecated_names(type(self))
        if any(name in deprecated for name in kwargs):
            kwargs = rename_deprecated(deprecated, kwargs, type(self).__qualname__,
                                       stacklevel=2)
        return init(self, *args, **kwargs)

    return wrapper
