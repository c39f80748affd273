"""``python -m hpcqn`` and the ``hpcqn`` command (:mod:`hpcqn.cli`)."""

import sys


def main() -> int:
    """Run the command line; its exit code is agreed by every rank (a failure only one
    rank knows of aborts every rank instead), so the exit is not taken for a lone
    rank's failure (:func:`hpcqn.comm.exit_agreed`)."""
    from .cli import main as cli_main
    from .comm import exit_agreed

    code = cli_main()
    exit_agreed()
    return code


if __name__ == "__main__":
    sys.exit(main())
