"""The training application: `python -m train --config=configs/X.py --workdir=DIR`."""

import os
import signal
import sys

# The signals that stop a run (preemption, Ctrl-C): it saves a checkpoint and returns.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def setup_stopped(signal_name: str) -> str:
    """What a run prints when `signal_name` stops it before its first step."""
    return f"\n{signal_name} before the first step: nothing new to save; exiting."


def end_by_sigint() -> None:
    """Ends this process as SIGINT's default action does, after a Ctrl-C was handled (a
    calling shell script then stops too; it carries on after a child that merely exits)."""
    sys.stdout.flush()
    sys.stderr.flush()
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    os.kill(os.getpid(), signal.SIGINT)
