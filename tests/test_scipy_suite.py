"""SciPy's own tests of L-BFGS-B, run with ``hpcqn.scipy_lbfgs`` in its place.

The test modules of the installed SciPy wheel (``scipy/optimize/tests``) that name
L-BFGS-B run in a subprocess under the plugin tests/scipy_suite/lbfgsb_substitution.py;
every test that called L-BFGS-B (through hpcqn) must pass, except those listed in
docs/scipy_known_differences.md, and every listed one must still fail (the list stays
true). A test that called no L-BFGS-B ran SciPy's code only: it must pass too (the plugin
must not break it) unless listed. About 35 s of CPU time on one core.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import scipy.optimize

pytestmark = pytest.mark.slow  # SciPy's own test modules

ROOT = Path(__file__).resolve().parents[1]
PLUGIN_DIR = ROOT / "tests" / "scipy_suite"
KNOWN = ROOT / "docs" / "scipy_known_differences.md"
SCIPY_TESTS = Path(scipy.optimize.__file__).parent / "tests"
# SciPy 1.17.1 gives 123 counted tests; far fewer means the substitution missed calls.
MIN_COUNTED = 100


def scipy_test_modules() -> list[Path]:
    """The SciPy optimize test modules whose source names L-BFGS-B (any case)."""
    return sorted(path for path in SCIPY_TESTS.glob("test_*.py")
                  if "l-bfgs-b" in path.read_text().lower())


def known_differences() -> set[str]:
    """The test ids listed (``- `id` ...``) in the known-differences file's section
    "Failing tests"."""
    text = KNOWN.read_text()
    section = text.split("## Failing tests", 1)[1].split("\n## ", 1)[0]
    return set(re.findall(r"^- `([^`]+)`", section, flags=re.MULTILINE))


@pytest.mark.timeout(600)
def test_scipy_lbfgsb_suite_with_hpcqn(tmp_path):
    modules = scipy_test_modules()
    if not modules:
        pytest.skip(f"the installed SciPy ships no tests naming L-BFGS-B in {SCIPY_TESTS}")
    report = tmp_path / "report.json"
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1",
               MKL_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join(
        [str(PLUGIN_DIR), str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
    command = [sys.executable, "-m", "pytest", "-p", "lbfgsb_substitution",
               "-p", "no:cacheprovider", "-q", "--hpcqn-report", str(report),
               *map(str, modules)]
    out = subprocess.run(command, capture_output=True, text=True, env=env, cwd=tmp_path,
                         timeout=540)
    # 0: all passed, 1: some failed; anything else (no tests, usage, internal error) is
    # a broken run.
    assert out.returncode in (0, 1) and report.exists(), out.stdout[-5000:] + out.stderr
    outcomes = json.loads(report.read_text())
    counted, others = outcomes["counted"], outcomes["not_counted"]
    summary = [line for line in out.stdout.splitlines() if line.startswith("hpcqn-lbfgsb:")]
    print(*summary, sep="\n")
    assert len(counted) >= MIN_COUNTED, summary
    failing = {test for test, outcome in {**counted, **others}.items() if outcome == "failed"}
    known = known_differences()
    assert not failing - known, (
        f"failing, not listed in {KNOWN.name}: {sorted(failing - known)}\n"
        + out.stdout[-5000:])
    assert not known - failing, (
        f"listed in {KNOWN.name} but passing (or gone) now: {sorted(known - failing)}")
