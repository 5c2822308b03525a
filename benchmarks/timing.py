"""The timing protocol and the derived numbers of a row, shared by our runs and the peers.

Protocol (`time_training`), after the training state exists:

1. *first step*: wall time of one step including compilation, up to the device finishing;
2. *warm-up*: a few more steps, not timed;
3. R *windows* of K steps each, each window ended by a device synchronisation; the step time
   is the median over windows of window time / K.

Only the steps run in the timed loop: the batch is synthetic and already on the device, and
nothing is read back to the host inside a window.

Pure Python: imported by the PyTorch peer process too.
"""

from __future__ import annotations

import contextlib
import dataclasses
import statistics
import time
from collections.abc import Callable
from typing import Any

from benchmarks import specs
from benchmarks.errors import UsageError

__all__ = [
    "ROW_KEYS",
    "Timing",
    "check_protocol",
    "compile_events",
    "derive",
    "empty_row",
    "peak_memory_bytes",
    "time_training",
    "without_compilation_cache",
    "xla_precision",
    "xla_float32_arithmetic",
]

# Keys of a row, in table order (see `benchmarks.report` for the column titles).
ROW_KEYS = (
    "workload",
    "impl",
    "device",
    "precision",
    "batch",
    "shape",
    "step_ms",
    "items_per_s",
    "tokens_per_s",
    "tflops",
    "mfu_pct",
    "first_step_s",
    "compile_s",
    "trace_lower_s",
    "peak_mem_gib",
    "ours_per_peer",
    "framework",
    "status",
    "forward_flops",
    "model_flops_per_step",
    "peak_tflops",
    "window_ms",
    "note",
    "profile",
)


# A row whose slowest window's steps took this many times its fastest's says so: its median
# may not be the steady step time.
UNSTEADY = 1.5


@dataclasses.dataclass(frozen=True)
class Timing:
    """Seconds: the first step (with compilation), the median step, each window's step."""

    first_step_s: float
    step_s: float
    window_s: list[float]


def protocol(
    suite: str, steps: int | None, windows: int | None, warmup: int | None
) -> tuple[int, int, int]:
    """(K steps per window, R windows, warm-up steps): those given, the suite's defaults
    (`specs.DEFAULT_TIMING`) for those not; checked."""
    given = {"steps": steps, "windows": windows, "warmup": warmup}
    defaults = specs.DEFAULT_TIMING[suite]
    timed = tuple(defaults[k] if v is None else v for k, v in given.items())
    check_protocol(*timed)
    return timed


def check_protocol(steps: int, windows: int, warmup: int) -> None:
    """K steps per window, R windows and the warm-up steps must make a timing."""
    if steps < 1 or windows < 1 or warmup < 0:
        raise UsageError(
            f"need --steps >= 1, --windows >= 1 and --warmup >= 0; got {steps}, {windows}, {warmup}"
        )


def peak_memory_bytes(devices: list[Any]) -> int | None:
    """The largest `peak_bytes_in_use` over JAX `devices` (a process-wide high-water mark);
    None where the backend keeps no allocator statistics."""
    peaks = []
    for d in devices:
        try:
            stats = d.memory_stats()
        except Exception:  # backends without allocator statistics
            stats = None
        if stats and "peak_bytes_in_use" in stats:
            peaks.append(stats["peak_bytes_in_use"])
    return max(peaks) if peaks else None


_COMPILE_EVENTS = {
    "/jax/core/compile/jaxpr_trace_duration": "trace_s",
    "/jax/core/compile/jaxpr_to_mlir_module_duration": "lower_s",
    "/jax/core/compile/backend_compile_duration": "compile_s",
}


class compile_events(contextlib.AbstractContextManager):  # noqa: N801 (used like a function)
    """Records JAX's compilation events of the code run inside (JAX imported only here):
    ``with compile_events() as seen: ...`` then ``seen["compile_s"]`` (seconds of XLA
    compilation), ``seen["trace_s"]``, ``seen["lower_s"]`` and ``seen["compiles"]`` (XLA
    compilations). Keys present only for events that happened."""

    def __init__(self) -> None:
        self.record: dict[str, float] = {}

    def _on_event(self, event: str, duration: float, **_: Any) -> None:
        key = _COMPILE_EVENTS.get(event)
        if key:
            self.record[key] = self.record.get(key, 0.0) + duration
            if key == "compile_s":
                self.record["compiles"] = self.record.get("compiles", 0) + 1

    def __enter__(self) -> dict[str, float]:
        import jax

        jax.monitoring.register_event_duration_secs_listener(self._on_event)
        return self.record

    def __exit__(self, *exc: Any) -> None:
        import jax

        jax.monitoring.unregister_event_duration_listener(self._on_event)


XLA_TF32_NOTE = "float32 matmuls and convolutions on TF32 tensor cores (XLA's default precision)"


def xla_float32_arithmetic(device: Any) -> str | None:
    """What XLA computes float32 matmuls and convolutions in on `device` (a JAX device), at
    JAX's default matmul precision, where that is not float32: "TF32" on an NVIDIA GPU of
    compute capability 8.0 or newer at the levels "default"/"bfloat16", "high"/
    "tensorfloat32" or a TF32 algorithm; the algorithm's name for another algorithm on one
    (e.g. "BF16_BF16_F32_X3"). None for float32 arithmetic ("highest", F32_F32_F32) and on
    other devices."""
    import jax
    from jax import lax

    capability = getattr(device, "compute_capability", None)
    if device.platform != "gpu" or not capability or int(str(capability).split(".")[0]) < 8:
        return None
    precision = jax.config.jax_default_matmul_precision
    if precision is None:
        return "TF32"
    try:
        level = lax.Precision(precision)
    except ValueError:  # not a level: an algorithm's name
        name = str(precision).upper()
        return None if name == "F32_F32_F32" else "TF32" if name.startswith("TF32_") else name
    return None if level == lax.Precision.HIGHEST else "TF32"


def xla_precision(precision: str, device: Any) -> tuple[str, str | None]:
    """The precision a row computed in by XLA on `device` is labelled with, and the note that
    goes with it. Float32 computed otherwise (`xla_float32_arithmetic`) is `specs.TF32` with
    `XLA_TF32_NOTE`, or "float32 (ALGORITHM)"; none of these has a peak, so no MFU: their
    rate is not the plain FP32 one. Any other precision is itself, with no note."""
    arithmetic = xla_float32_arithmetic(device) if precision == "float32" else None
    if arithmetic == "TF32":
        return specs.TF32, XLA_TF32_NOTE
    if arithmetic:
        return f"float32 ({arithmetic})", f"float32 matmuls as {arithmetic} (matmul precision)"
    return precision, None


@contextlib.contextmanager
def without_compilation_cache() -> Any:
    """JAX's persistent compilation cache off inside (restored after): with
    `JAX_COMPILATION_CACHE_DIR` set, a first step would otherwise read its program from the
    cache and be timed as the compilation. (JAX decides once per process whether the cache
    is used, hence the resets.)"""
    import jax
    from jax.experimental.compilation_cache import compilation_cache as cache

    was = jax.config.jax_enable_compilation_cache
    jax.config.update("jax_enable_compilation_cache", False)
    cache.reset_cache()
    try:
        yield
    finally:
        jax.config.update("jax_enable_compilation_cache", was)
        cache.reset_cache()


def time_training(
    step: Callable[[], Any],
    sync: Callable[[], Any],
    steps: int,
    windows: int,
    warmup: int,
    around_first: contextlib.AbstractContextManager[Any] | None = None,
) -> Timing:
    """Times `step()` (one training step, asynchronous) with `sync()` waiting for the device.

    `around_first`: a context entered around the first step only (e.g. to record its
    compilation)."""
    check_protocol(steps, windows, warmup)
    with around_first or contextlib.nullcontext():
        start = time.perf_counter()
        step()
        sync()
        first = time.perf_counter() - start
    for _ in range(warmup):
        step()
    sync()
    per_step = []
    for _ in range(windows):
        start = time.perf_counter()
        for _ in range(steps):
            step()
        sync()
        per_step.append((time.perf_counter() - start) / steps)
    return Timing(first, statistics.median(per_step), per_step)


def empty_row(spec: specs.Workload, impl: str, framework: str, **values: Any) -> dict[str, Any]:
    """A row with every key, the workload's sizes filled in."""
    row: dict[str, Any] = dict.fromkeys(ROW_KEYS)
    row.update(
        workload=spec.name,
        impl=impl,
        precision=spec.precision,
        batch=spec.batch,
        shape=spec.shape,
        framework=framework,
        status="ok",
        note="",
    )
    row.update(values)
    return row


def derive(
    row: dict[str, Any],
    workload: specs.Workload,
    timing: Timing,
    forward_flops: float | None,
    device_kind: str,
    peak_tflops: float | None = None,
    devices: int = 1,
) -> dict[str, Any]:
    """Fills the timed and derived columns of `row` (in place) and returns it.

    items/s = batch / step time; tokens/s = batch x sequence length / step time (sequence
    models); TFLOP/s = model FLOPs per step / step time, over all `devices` the global batch
    is split over; MFU = that / (`devices` x one device's peak at the row's precision), blank
    when the peak is unknown. `peak_tflops` is one device's.
    """
    step_s = timing.step_s
    row["step_ms"] = 1e3 * step_s
    row["window_ms"] = [1e3 * t for t in timing.window_s]
    row["first_step_s"] = timing.first_step_s
    row["items_per_s"] = workload.batch / step_s
    fastest, slowest = min(timing.window_s), max(timing.window_s)
    if slowest > UNSTEADY * fastest:  # still warming up, or sharing the device or host
        unsteady = f"unsteady: windows {1e3 * fastest:.3g}-{1e3 * slowest:.3g} ms (more --warmup?)"
        row["note"] = "; ".join(filter(None, [row.get("note"), unsteady]))
    if workload.seq_len is not None:
        row["tokens_per_s"] = workload.batch * workload.seq_len / step_s
    if forward_flops:
        row["forward_flops"] = forward_flops
        row["model_flops_per_step"] = specs.BACKWARD_FACTOR * forward_flops
        achieved = row["model_flops_per_step"] / step_s
        row["tflops"] = achieved / 1e12
        peak = specs.peak_flops(device_kind, row["precision"], peak_tflops)
        if peak:
            row["mfu_pct"] = 100.0 * achieved / (peak * devices)
            row["peak_tflops"] = peak / 1e12  # one device's
    return row
