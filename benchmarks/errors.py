"""How the benchmark commands refuse a command line.

A command line that cannot run (a misspelt workload, ``--steps 0``, ``--devices 3`` on a
one-device machine, ``--plot`` without matplotlib) is refused before anything is measured
with a `UsageError`. The commands print it as argparse prints its own errors
(``PROG: error: MESSAGE``) and exit with argparse's status 2, so a script can tell a
command line to fix (2) from a workload that failed (1).
"""

from __future__ import annotations

import sys
from collections.abc import Callable

USAGE_STATUS = 2  # argparse's


class UsageError(SystemExit):
    """A command line that cannot run; `str()` is the message. A `SystemExit`, so code that
    calls a command's `main` and does not catch it still stops."""


def run(main: Callable[[], int], prog: str) -> int:
    """`main()`'s exit status, with a `UsageError` printed to stderr and status 2."""
    try:
        return main()
    except UsageError as e:
        print(f"{prog}: error: {e}", file=sys.stderr, flush=True)
        return USAGE_STATUS


def message(line: str, prog: str) -> str:
    """The message of a usage error line `run` printed for `prog`."""
    return line.removeprefix(f"{prog}: error: ")
