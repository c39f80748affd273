"""hpcqn: distributed quasi-Newton and second-order optimizers for MPI jobs.

Layers (each imports only from those above it): ``backend`` (array namespace),
``comm`` (every MPI call), ``layout`` (how vectors are cut across ranks),
``curvature`` (pure math), ``optimizers`` (curvature + layout + comm), and the drivers
(``minimize``, the command line).
"""

import os as _os
import sys as _sys

if (_sys.orig_argv[1:3] == ["-m", "hpcqn"]
        or _os.path.basename(_sys.argv[0]) == "hpcqn"):  # pragma: no branch
    # The hpcqn command (python -m hpcqn, or its script): a SIGTERM or Ctrl-C from here on
    # is a stop that `hpcqn run` agrees on at its start (exit 3), also while NumPy, SciPy
    # and torch load (hpcqn.signals imports nothing heavy).
    from .signals import install_early_stop

    install_early_stop()

from .comm import Communicator, RemoteRankError, abort_on_failure, get_comm, serial_comm
from .layout import BlockLayout, SliceLayout, gather_global
from .minimize import Minimizer, minimize, scipy_lbfgs
from .optimizers.first_order import SGD, Adam
from .optimizers.lbfgs import FunctionError
from .optimizers.mlbfgs import MLBFGS
from .stochastic import minimize_stochastic
from .transport import LaunchError

__version__ = "0.1.0"

__all__ = [
    "MLBFGS",
    "SGD",
    "Adam",
    "BlockLayout",
    "Communicator",
    "FunctionError",
    "LaunchError",
    "RemoteRankError",
    "SliceLayout",
    "__version__",
    "abort_on_failure",
    "gather_global",
    "get_comm",
    "Minimizer",
    "minimize",
    "minimize_stochastic",
    "scipy_lbfgs",
    "serial_comm",
]
