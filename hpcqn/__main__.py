"""``python -m hpcqn`` and the ``hpcqn`` command (:mod:`hpcqn.cli`)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
