"""Measures the training step of one workload in this process (JAX).

The state is created with `jaxmodels.training.create_train_state` on a data-parallel mesh
(one device, or all of them), the step is `jaxmodels.training.compile_train_step` (jit,
state donated), the batch is synthetic and put on the device(s) before timing; the timing
protocol is `benchmarks.timing.time_training`.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

from benchmarks import flops, timing, workloads
from benchmarks.specs import Workload
from jaxmodels import optim, sharding, training

__all__ = ["device_label", "devices_for", "measure"]


def devices_for(spec: str) -> list[Any]:
    """`--devices`: "1" (the first device), "all", or a count."""
    available = jax.devices()
    n = len(available) if spec == "all" else int(spec)
    if not 1 <= n <= len(available):
        raise SystemExit(f"--devices {spec}: this machine has {len(available)} device(s)")
    return available[:n]


def device_label(devices: list[Any]) -> str:
    """E.g. "NVIDIA H200 x1" or "cpu x1"."""
    return f"{devices[0].device_kind} x{len(devices)}"


def measure(
    w: Workload,
    impl: str,
    devices: list[Any],
    steps: int,
    windows: int,
    warmup: int,
    peak_tflops: float | None = None,
    report_memory: bool = True,
    step_rng: str = "threefry",
) -> dict[str, Any]:
    """Times the training step of `w` with implementation `impl`; returns its row.

    `step_rng`: the generator of the step's dropout bits (`jaxmodels.training.step_key`).
    """
    built = workloads.BUILDERS[w.family](w, impl)
    row = timing.empty_row(
        w,
        workloads.impl_label(impl),
        "jax",
        device=device_label(devices),
        precision=built.precision,
        note=built.note,
    )
    parallel = len(devices)
    if w.batch % parallel:
        raise SystemExit(
            f"{w.name}: batch {w.batch} is not divisible by the {parallel} devices; "
            "use --devices 1 or a device count that divides it"
        )
    inputs = built.model_inputs()
    forward = flops.forward_flops(
        built.flops_model, *[jax.ShapeDtypeStruct(x.shape, x.dtype) for x in inputs]
    )

    mesh = sharding.make_mesh(data=-1, devices=devices)
    rules = sharding.logical_rules("data")
    tx = optim.make_optimizer(w.optimizer, w.learning_rate, total_steps=1_000_000)
    state, shardings = training.create_train_state(
        built.model, tx, inputs, jax.random.key(0), mesh, rules
    )
    step_fn = training.compile_train_step(built.loss_fn, shardings, mesh, rules, step_rng)
    batch = jax.device_put(built.batch, sharding.batch_sharding(mesh))
    jax.block_until_ready((state, batch))

    holder: dict[str, Any] = {"state": state, "metrics": None}
    del state

    def step() -> None:
        holder["state"], holder["metrics"] = step_fn(holder["state"], batch)

    def sync() -> None:
        jax.block_until_ready(holder["state"])

    result = timing.time_training(step, sync, steps, windows, warmup)
    loss = float(np.asarray(holder["metrics"]["loss"]))
    if not np.isfinite(loss):
        row["note"] = f"{row['note']}; non-finite loss {loss}".lstrip("; ")
    if step_rng != "threefry":
        row["note"] = "; ".join(filter(None, [row["note"], f"dropout bits: {step_rng}"]))
    timing.derive(row, w, result, forward, devices[0].device_kind, peak_tflops)
    peak = timing.peak_memory_bytes(devices) if report_memory else None
    if peak is not None:
        row["peak_mem_gib"] = peak / 2**30
    return row
