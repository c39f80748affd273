"""hpcqn's optimizers described the way torch's own optimizer tests describe torch's
(``OptimizerInfo`` entries of ``torch.testing._internal.common_optimizers``), for the
generic checks of ``tests/test_torch_suite.py``, and the parts of torch's test
infrastructure those checks use (import them from here).

Importing torch's test infrastructure (it needs the ``expecttest`` package) has two
process-wide effects on a pytest run: it loads its own Hypothesis settings profile,
which this package undoes (the project's Hypothesis tests keep the profile they were
started with), and it forbids setting ``torch.backends`` flags outside their context
managers, which hpcqn never sets.
"""

from __future__ import annotations

import hypothesis

_active = hypothesis.settings.default
import torch.testing._internal.common_utils  # noqa: E402,F401  (loads torch's profile)

hypothesis.settings.register_profile("before-torch-testing", parent=_active)
hypothesis.settings.load_profile("before-torch-testing")

from torch.testing._internal.common_device_type import (  # noqa: E402
    instantiate_device_type_tests,
    onlyCPU,
)
from torch.testing._internal.common_optimizers import OptimizerErrorEnum, optims  # noqa: E402
from torch.testing._internal.common_utils import TestCase, parametrize  # noqa: E402

__all__ = ["OptimizerErrorEnum", "TestCase", "instantiate_device_type_tests", "onlyCPU",
           "optims", "parametrize"]
