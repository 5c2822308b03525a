"""Writing the embedded TFDS datasets (digits, stdlib docs) once, safely."""

from __future__ import annotations

import fcntl
import os
from typing import Any


def prepare_once(builder_cls: Any, data_dir: str) -> Any:
    """Writes `builder_cls`'s dataset under `data_dir` unless it is there; returns the builder.

    A file lock makes concurrent first uses (several processes on one machine) safe.
    """
    os.makedirs(data_dir, exist_ok=True)
    builder = builder_cls(data_dir=data_dir, file_format="array_record")
    if builder.is_prepared():
        return builder
    with open(os.path.join(data_dir, f".{builder.name}.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        builder = builder_cls(data_dir=data_dir, file_format="array_record")
        if not builder.is_prepared():
            builder.download_and_prepare()
    return builder_cls(data_dir=data_dir, file_format="array_record")
