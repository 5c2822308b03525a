"""`python -m benchmarks`: see `benchmarks` (the package docstring) for the usage."""

import sys

from benchmarks.cli import main

if __name__ == "__main__":
    sys.exit(main())
