"""Measures the training step of one workload in this process (JAX).

The state is created with `jaxmodels.training.create_train_state` on a data-parallel mesh
(one device, or all of them), the step is `jaxmodels.training.compile_train_step` (jit,
state donated), the batch is synthetic and put on the device(s) before timing; the timing
protocol is `benchmarks.timing.time_training`.
"""

from __future__ import annotations

import dataclasses
import os
import traceback
from typing import Any

import jax
import numpy as np

from benchmarks import flops, profile, specs, timing, workloads
from benchmarks.errors import UsageError
from benchmarks.specs import Workload
from jaxmodels import sharding, training
from jaxmodels.errors import brief

__all__ = ["check_split", "device_label", "devices_for", "measure"]


def devices_for(spec: str) -> list[Any]:
    """`--devices`: "1" (the first device), "all", or a count."""
    available = jax.devices()
    n = len(available) if spec == "all" else int(spec)
    if not 1 <= n <= len(available):
        raise UsageError(f"--devices {spec}: this machine has {len(available)} device(s)")
    return available[:n]


def check_split(w: Workload, parallel: int) -> None:
    """`w`'s batch must split evenly over `parallel` devices."""
    if w.batch % parallel:
        raise UsageError(
            f"{w.name}: batch {w.batch} is not divisible by the {parallel} devices; "
            "use --devices 1 or a device count that divides it"
        )


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
    profile_dir: str | None = None,
    model_overrides: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Times the training step of `w` with implementation `impl`; returns its row.

    `step_rng`: the generator of the step's dropout bits (`jaxmodels.training.step_key`).
    `profile_dir`: also profile the step there afterwards (`benchmarks.profile`).
    `model_overrides`: model settings replacing the workload's (``--set``), noted in the row.
    """
    if model_overrides:
        w = dataclasses.replace(w, model={**w.model, **model_overrides})
    built = workloads.BUILDERS[w.family](w, impl)
    precision, tf32_note = timing.xla_precision(built.precision, devices[0])
    note = "; ".join(filter(None, [built.note, tf32_note]))
    row = timing.empty_row(
        w,
        specs.impl_label(impl),
        "jax",
        device=device_label(devices),
        precision=precision,
        note=note,
    )
    parallel = len(devices)
    check_split(w, parallel)
    inputs = built.model_inputs()
    forward = flops.forward_flops(
        built.flops_model, *[jax.ShapeDtypeStruct(x.shape, x.dtype) for x in inputs]
    )

    mesh = sharding.make_mesh(data=-1, devices=devices)
    rules = sharding.logical_rules("data")
    tx = workloads.optimizer(w)
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

    first_step = timing.compile_events()
    result = timing.time_training(step, sync, steps, windows, warmup, around_first=first_step)
    compile_seconds = first_step.record
    row["compile_s"] = compile_seconds.get("compile_s")
    row["trace_lower_s"] = compile_seconds.get("trace_s", 0.0) + compile_seconds.get("lower_s", 0.0)
    loss = float(np.asarray(holder["metrics"]["loss"]))
    if not np.isfinite(loss):
        row["note"] = f"{row['note']}; non-finite loss {loss}".lstrip("; ")
    extra = [f"{k}={v}" for k, v in (model_overrides or {}).items()]
    if step_rng != "threefry":
        extra.append(f"dropout bits: {step_rng}")
    row["note"] = "; ".join(filter(None, [row["note"], *extra]))
    timing.derive(row, w, result, forward, devices[0].device_kind, peak_tflops, len(devices))
    peak = timing.peak_memory_bytes(devices) if report_memory else None
    if peak is not None:
        row["peak_mem_gib"] = peak / 2**30
    if profile_dir:

        def run(compiled: Any) -> None:
            holder["state"], holder["metrics"] = compiled(holder["state"], batch)

        name = "-".join(filter(None, [w.name, impl]))
        try:
            summary = profile.profile_step(
                os.path.join(profile_dir, name),
                f"{name}  {row['device']}  {row['precision']}  batch {w.batch}  {w.shape}",
                lambda: step_fn.lower(holder["state"], batch),
                run,
                sync,
                steps,
                row["step_ms"],
                row.get("model_flops_per_step"),
            )
        except Exception as e:  # the timings stand; only the profile is missing
            traceback.print_exc()
            row["note"] = "; ".join(filter(None, [row["note"], f"profile failed: {brief(e)}"]))
        else:
            row["profile"] = summary["directory"]
    return row
