"""How the benchmark commands refuse a command line.

A command line that cannot run (a misspelt workload, ``--steps 0``, ``--devices 3`` on a
one-device machine, ``--plot`` without matplotlib) is refused before anything is measured
with a `UsageError`. The commands print it as argparse prints its own errors
(``PROG: error: MESSAGE``) and exit with argparse's status 2, so a script can tell a
command line to fix (2) from a workload that failed (1).
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable

USAGE_STATUS = 2  # argparse's


class UsageError(SystemExit):
    """A command line that cannot run; `str()` is the message. A `SystemExit`, so code that
    calls a command's `main` and does not catch it still stops."""


def plot_endings() -> tuple[str, ...]:
    """The file endings matplotlib's Agg backend (the one the plot uses) writes."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    return tuple(f".{k}" for k in FigureCanvasAgg.get_supported_filetypes())


def check_output_file(flag: str, path: str, endings: tuple[str, ...] = ()) -> None:
    """A file the command writes at its end (`--json`, `--plot`) can be written there, with
    one of `endings` if given: refused now, not after the whole run has been measured. A
    file that is there is left as it is; where there is none, one is made and removed again
    (nothing is made where a link points)."""
    if endings and not path.lower().endswith(endings):
        raise UsageError(f"{flag} {path}: give a file name ending in one of {', '.join(endings)}")
    if os.path.isdir(path):
        raise UsageError(f"{flag} {path} is a folder; give the name of a file in it")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise UsageError(f"{flag} {path}: there is no folder {folder}; create it first")
    if os.path.exists(path):
        if not os.access(path, os.W_OK):
            raise UsageError(f"{flag} {path} cannot be written: permission denied")
        return
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
    except FileExistsError:  # a link to nowhere, or made meanwhile: left as it is
        return
    except OSError as e:
        raise UsageError(f"{flag} {path} cannot be written: {e.strerror}") from None
    os.close(fd)
    with contextlib.suppress(FileNotFoundError):
        os.remove(path)


def check_output_folder(flag: str, path: str) -> None:
    """A folder the command writes into (`--profile`, `--hlo`) is one, or can be made now."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise UsageError(f"{flag} {path} is a file; give a folder (made if missing)")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise UsageError(f"{flag} {path}: the folder cannot be made: {e.strerror}") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise UsageError(f"{flag} {path}: the folder is not writable")


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
