"""A pytest plugin that runs SciPy's own test files with ``hpcqn.scipy_lbfgs`` in place of
L-BFGS-B (docs/scipy_known_differences.md gives the rule and the known differences).

Loaded with ``python -m pytest -p lbfgsb_substitution`` (this folder on ``PYTHONPATH``)
over the test modules of the installed SciPy wheel. It

- replaces ``scipy.optimize.minimize`` (in ``scipy.optimize``, ``scipy.optimize._minimize``
  and every ``scipy`` module that imported it by name, before any test module is
  imported) with a wrapper that turns a string ``method`` equal to ``"L-BFGS-B"`` in any
  case into ``method=hpcqn.scipy_lbfgs``; every other call goes to SciPy unchanged;
- deselects the tests parametrised with a ``minimize`` method other than L-BFGS-B (they
  test that method);
- counts, per test, the calls it routed to hpcqn (setup, call and teardown together): a
  test is *counted* when it made at least one; the summary line ``hpcqn-lbfgsb: ...``
  gives the counted tests' outcomes, and ``--hpcqn-report PATH`` writes every test's
  outcome (JSON: ``counted`` and ``not_counted``, each an id -> outcome mapping).
"""

from __future__ import annotations

import functools
import inspect
import json
import sys
from pathlib import Path
from typing import Any

import pytest
import scipy.optimize
import scipy.optimize._minimize as scipy_minimize_module

import hpcqn

ORIGINAL_MINIMIZE = scipy_minimize_module.minimize
_SIGNATURE = inspect.signature(ORIGINAL_MINIMIZE)
_OTHER_METHODS = frozenset(scipy_minimize_module.MINIMIZE_METHODS) - {"l-bfgs-b"}
_routed = 0  # calls routed to hpcqn in the running test


def is_lbfgsb(method: Any) -> bool:
    """Whether ``method`` names L-BFGS-B (a string, any case, as ``minimize`` reads it)."""
    return isinstance(method, str) and method.lower() == "l-bfgs-b"


@functools.wraps(ORIGINAL_MINIMIZE)
def minimize(*args: Any, **kwargs: Any) -> Any:
    """``scipy.optimize.minimize`` with ``method="L-BFGS-B"`` replaced by
    ``hpcqn.scipy_lbfgs``."""
    global _routed
    bound = _SIGNATURE.bind(*args, **kwargs)
    if is_lbfgsb(bound.arguments.get("method")):
        bound.arguments["method"] = hpcqn.scipy_lbfgs
        _routed += 1
    return ORIGINAL_MINIMIZE(*bound.args, **bound.kwargs)


def _substitute() -> None:
    """Put :func:`minimize` wherever SciPy's own is bound by name."""
    for name, module in list(sys.modules.items()):
        if (name == "scipy" or name.startswith("scipy.")) and module is not None:
            if getattr(module, "minimize", None) is ORIGINAL_MINIMIZE:
                module.minimize = minimize
    assert scipy.optimize.minimize is minimize


_substitute()


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--hpcqn-report", default=None,
                     help="write the counted tests' outcomes (JSON) to this file")


def _method_parameters(item: pytest.Item) -> set[str]:
    """The ``minimize`` method names among the test's parameter values (lower case)."""
    callspec = getattr(item, "callspec", None)
    if callspec is None:
        return set()
    return {value.lower() for value in callspec.params.values()
            if isinstance(value, str) and value.lower() in scipy_minimize_module.MINIMIZE_METHODS}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    keep, drop = [], []
    for item in items:
        methods = _method_parameters(item)
        (drop if methods and methods <= _OTHER_METHODS else keep).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


class Tally:
    """Per test: the calls routed to hpcqn and the outcome (failed over xpassed over
    passed; skipped and xfailed from the phase that skipped)."""

    def __init__(self) -> None:
        self.routed: dict[str, int] = {}
        self.outcome: dict[str, str] = {}

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_protocol(self, item: pytest.Item, nextitem: Any) -> Any:
        global _routed
        _routed = 0
        yield
        self.routed[_short(item.nodeid)] = _routed

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        test = _short(report.nodeid)
        if report.failed:
            outcome = "failed"
        elif report.skipped:
            outcome = "xfailed" if hasattr(report, "wasxfail") else "skipped"
        elif report.when == "call":
            outcome = "xpassed" if hasattr(report, "wasxfail") else "passed"
        else:
            return
        if self.outcome.get(test) != "failed":
            self.outcome[test] = outcome

    def counted(self) -> dict[str, str]:
        return {test: self.outcome.get(test, "failed") for test, n in self.routed.items() if n}

    def pytest_terminal_summary(self, terminalreporter: Any, config: pytest.Config) -> None:
        counted = self.counted()
        totals = {kind: sum(1 for o in counted.values() if o == kind)
                  for kind in ("passed", "failed", "xfailed", "xpassed", "skipped")}
        line = ", ".join(f"{n} {kind}" for kind, n in totals.items())
        terminalreporter.write_line(
            f"hpcqn-lbfgsb: {len(counted)} counted tests ({line}); "
            f"{len(self.routed) - len(counted)} ran without calling L-BFGS-B")
        for test, outcome in sorted(counted.items()):
            if outcome == "failed":
                terminalreporter.write_line(f"hpcqn-lbfgsb FAILED {test}")
        path = config.getoption("--hpcqn-report")
        if path:
            not_counted = {test: self.outcome.get(test, "failed")
                           for test, n in self.routed.items() if not n}
            Path(path).write_text(json.dumps({"counted": counted, "not_counted": not_counted},
                                             indent=1, sort_keys=True))


def _short(nodeid: str) -> str:
    """The test's id from its file's name on (``test_optimize.py::Class::test[params]``)."""
    path, _, rest = nodeid.partition("::")
    return f"{Path(path).name}::{rest}"


def pytest_configure(config: pytest.Config) -> None:
    config.pluginmanager.register(Tally(), "hpcqn-lbfgsb-tally")
