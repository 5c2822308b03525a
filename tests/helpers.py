"""Shared test utilities: run the application as a user would, read its results, write
small local TFDS datasets."""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Any

import numpy as np

from jaxmodels import checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def app_env(devices: int = 8) -> dict[str, str]:
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONUNBUFFERED"] = "1"
    return env


def train_cmd(config: str, workdir: str, *overrides: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "train",
        f"--config={os.path.join(ROOT, config)}",
        f"--workdir={workdir}",
        "--config.progress_bar=False",
        *overrides,
    ]


def run_app(
    config: str,
    workdir: str,
    *overrides: str,
    timeout: int = 300,
    devices: int = 8,
    env: dict[str, str] | None = None,
):
    """Runs `python -m train` to completion (`env`: extra environment variables); returns the
    CompletedProcess."""
    return subprocess.run(
        train_cmd(config, workdir, *overrides),
        cwd=ROOT,
        env={**app_env(devices), **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def saved_params(workdir: str, step: int) -> dict:
    """The params saved at `step` in `workdir`, as a flat dict of numpy arrays."""
    params = checkpoint.load_params(os.path.join(workdir, "checkpoints"), step)
    flat = {}

    def walk(prefix: str, node) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(f"{prefix}/{k}", v)
        else:
            flat[prefix] = np.asarray(node)

    walk("", params)
    return flat


_LOCAL_BUILDERS: dict[str, Any] = {}  # TFDS registers a builder class by name: once each


def _local_builder(class_name: str, features: Any, records: Any) -> Any:
    if class_name in _LOCAL_BUILDERS:
        return _LOCAL_BUILDERS[class_name]
    import tensorflow_datasets as tfds

    def _info(self: Any) -> Any:
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(features()))

    def _split_generators(self: Any, dl_manager: Any) -> Any:  # noqa: ARG001
        return {"train": self._generate_examples()}

    def _generate_examples(self: Any) -> Any:  # noqa: ARG001
        yield from enumerate(records())

    body = {
        "VERSION": tfds.core.Version("1.0.0"),
        "_info": _info,
        "_split_generators": _split_generators,
        "_generate_examples": _generate_examples,
    }
    builder = type(class_name, (tfds.core.GeneratorBasedBuilder,), body)
    _LOCAL_BUILDERS[class_name] = builder
    return builder


def prepare_local_dataset(class_name: str, features: Any, records: Any, data_dir: str) -> None:
    """Writes a one-split ("train") TFDS dataset named after `class_name` (TFDS's snake
    case: `UnlabelledProse` -> "unlabelled_prose") under `data_dir`, as array_record.

    `features()` returns the feature dict, `records()` the examples (functions, so that
    nothing of TFDS is built before it is needed).
    """
    from train.data import tfds_local

    tfds_local.prepare_once(_local_builder(class_name, features, records), data_dir)
