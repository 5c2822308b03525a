"""The training application: `python -m train --config=configs/X.py --workdir=DIR`."""

# What a single-process run prints when a SIGTERM stops it before its first step.
SETUP_STOPPED = "\nSIGTERM before the first step: nothing new to save; exiting."
