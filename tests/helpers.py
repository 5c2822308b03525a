"""Shared test utilities: run the application as a user would, read its results."""

from __future__ import annotations

import os
import subprocess
import sys

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
