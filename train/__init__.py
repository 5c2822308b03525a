"""The training application: `python -m train --config=configs/X.py --workdir=DIR`."""

import signal

# The signals that stop a run (preemption, Ctrl-C): it saves a checkpoint and returns.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def setup_stopped(signal_name: str) -> str:
    """What a run prints when `signal_name` stops it before its first step."""
    return f"\n{signal_name} before the first step: nothing new to save; exiting."
