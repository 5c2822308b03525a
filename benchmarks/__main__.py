"""`python -m benchmarks`: see `benchmarks` (the package docstring) for the usage."""

import os
import signal
import sys

from benchmarks import errors
from benchmarks.cli import PROG, main

if __name__ == "__main__":
    status = errors.run(main, PROG)
    if status - 128 in (signal.SIGTERM, signal.SIGINT):
        # Stopped by that signal, and all reported: end as the signal would have ended the
        # process, so that a calling shell script stops too (it carries on after a child
        # that merely exits 130).
        sys.stdout.flush()
        sys.stderr.flush()
        signal.signal(status - 128, signal.SIG_DFL)
        os.kill(os.getpid(), status - 128)
    sys.exit(status)
