"""Test setup (tests and doctests): 8 simulated CPU devices, set before jax is imported,
and a private TFDS data dir."""

from __future__ import annotations

import atexit
import os
import shutil
import sys
import tempfile

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
