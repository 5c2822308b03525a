"""Test setup (tests and doctests): 8 simulated CPU devices, set before jax is imported,
a private TFDS data dir, and Ctrl-C as Python's own."""

from __future__ import annotations

import atexit
import os
import shutil
import signal
import sys
import tempfile

# Started as a background job of a script (as CI may), the tests inherit SIGINT ignored,
# which the code under test rightly leaves ignored; the Ctrl-C tests need it as it is in a
# terminal. A handler (unlike "ignored") is reset by exec, so the processes the tests start
# get Python's own too.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Tests never touch the user's ~/tensorflow_datasets; the embedded digits are written here.
os.environ["TFDS_DATA_DIR"] = tempfile.mkdtemp(prefix="jaxmodels-tfds-")
atexit.register(shutil.rmtree, os.environ["TFDS_DATA_DIR"], ignore_errors=True)

ROOT = os.path.dirname(os.path.abspath(__file__))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
