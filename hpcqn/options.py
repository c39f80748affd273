"""Options declared once. An optimizer's (or driver's) options are the keyword parameters
of its constructor: names and defaults come from the signature, and the kind and range
of each from the class's ``OPTION_RULES`` (merged along the class hierarchy). Every
front end (the torch wrappers, :func:`hpcqn.minimize_stochastic`, the job-file loader,
the docs) takes them from :func:`declared` and checks values with :func:`check`, so
they cannot drift apart.

Kinds are strict, as a job file's reader expects: an ``int`` option takes integers only
(``2.7``, ``true`` and ``"ten"`` are errors), a ``float`` option takes integers and
floats but not booleans, a ``bool`` option takes only ``true``/``false``.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

KINDS = ("int", "float", "bool", "str", "pair", "schedule")


class OptionError(ValueError):
    """An option that is unknown or has a bad value; the message names it."""


@dataclass(frozen=True)
class Rule:
    """What an option accepts. ``kind`` is one of :data:`KINDS` (``pair``: two floats,
    each in the range; ``schedule``: a float in the range, or, from Python, a callable of
    the step); ``low``/``high`` bound numbers (``None``: unbounded; ``open_low`` /
    ``open_high`` exclude the bound itself); ``choices`` lists the allowed strings."""

    kind: str
    low: float | None = None
    high: float | None = None
    open_low: bool = False
    open_high: bool = False
    choices: tuple[str, ...] | None = None
    finite: bool = True

    def describe(self) -> str:
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
    """One declared option: its name, default and rule."""

    name: str
    default: Any
    rule: Rule


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
        return OptionError(f"{prefix}option {name!r} must be {rule.describe()}, got {value!r}")

    kind = rule.kind
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


def declared(target: Any) -> dict[str, Option]:
    """The options of ``target`` (a class, or a function with an ``OPTION_RULES``
    attribute), in signature order: every keyword parameter that has a default and is
    not listed in ``NOT_OPTIONS`` (merged along the class hierarchy). A parameter with no
    rule is a declaration bug and raises."""
    rules: dict[str, Rule] = {}
    skip: set[str] = set()
    for klass in reversed(getattr(target, "__mro__", (target,))):
        rules.update(getattr(klass, "OPTION_RULES", {}) or {})
        skip.update(getattr(klass, "NOT_OPTIONS", ()) or ())
    function = target.__init__ if inspect.isclass(target) else target
    out: dict[str, Option] = {}
    for parameter in inspect.signature(function).parameters.values():
        if parameter.default is inspect.Parameter.empty or parameter.name in skip:
            continue
        if parameter.kind in (inspect.Parameter.VAR_KEYWORD, inspect.Parameter.VAR_POSITIONAL):
            continue
        if parameter.name not in rules:
            raise TypeError(f"{getattr(target, '__qualname__', target)}: option "
                            f"{parameter.name!r} has no entry in OPTION_RULES")
        out[parameter.name] = Option(parameter.name, parameter.default, rules[parameter.name])
    return out


def check(spec: Mapping[str, Option], values: Mapping[str, Any], where: str = "") -> dict[str, Any]:
    """``values`` checked against ``spec`` (from :func:`declared`): unknown names and bad
    values raise :class:`OptionError` naming the option; returns the converted values
    (only those given: defaults stay the constructor's)."""
    prefix = f"{where}: " if where else ""
    unknown = sorted(set(values) - set(spec))
    if unknown:
        raise OptionError(f"{prefix}unknown option(s) {', '.join(map(repr, unknown))}; known: "
                          f"{', '.join(spec)}")
    return {name: check_value(name, spec[name].rule, value, where)
            for name, value in values.items()}
