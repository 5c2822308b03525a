"""`python -m benchmarks`: see `benchmarks` (the package docstring) for the usage."""

import sys

from benchmarks import errors
from benchmarks.cli import PROG, main

if __name__ == "__main__":
    sys.exit(errors.run(main, PROG))
