"""Where the time of a training step goes: ``python -m benchmarks --profile DIR``.

For each workload run, after its timed windows, `profile_step`:

1. compiles the same step ahead of time (``lower(...).compile()``) and writes its optimised
   HLO to ``DIR/<workload>[-<impl>]/step.hlo.txt``; XLA's cost analysis of that program
   (FLOPs, transcendentals, bytes accessed; a loop body, e.g. a scan over layers, counted
   once) and its memory analysis (arguments, outputs, temporaries) go into the summary;
2. runs a few steps of it under `jax.profiler.trace` (``.../trace``: open it with
   TensorBoard's profile plugin, xprof or Perfetto);
3. reads the trace back (`jax.profiler.ProfileData`) and attributes the time of every
   executed HLO op (device kernels on a GPU; XLA's CPU thunks on the CPU) to

   * a *category*, from the op in the optimised HLO: matmul, convolution, fused attention
     (cuDNN's, or the Pallas kernels), RNN (cuDNN's, or the Pallas LSTM kernels),
     RNG/dropout (a fusion computing random bits, with whatever XLA fused into it),
     reduction, elementwise, copy/transpose, gather/scatter, collective, ...; a Pallas
     kernel (a Triton custom call) is known by its kernel's name (``attention_forward``,
     ``lstm_backward``, ...), from the call's backend_config or else its source metadata;
   * a *place*: forward, backward or update (the optimizer and anything outside the
     gradient), and the Flax module path of the op's source (``layer_3`` -> ``layer_*``).

   Control-flow ops (while, conditional, call) are not counted themselves: where they have
   events (XLA's CPU runtime), those enclose the events of their bodies' ops.

The result, ``summary.txt`` (also printed to stderr) and ``summary.json``, gives per step:
op time by category, by place, and the most expensive ops, beside the measured step time,
for one device (with several, each runs the same program). Op times on a GPU are kernel
times; their sum below the step time means the device idled (host overhead, launch gaps);
kernels on concurrent streams can make it exceed it, and so can XLA's CPU runtime, which
runs independent ops at the same time on several threads.

Pure functions (`parse_hlo`, `categorize`, `place`, `summarize`) are separated from the
JAX calls so they can be tested on any HLO text and event list.
"""

from __future__ import annotations

import collections
import dataclasses
import glob
import json
import os
import re
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

__all__ = [
    "HloOp",
    "categorize",
    "op_events",
    "parse_hlo",
    "place",
    "profile_step",
    "summarize",
]

# ----------------------------------------------------------------------------- the HLO text


@dataclasses.dataclass
class HloOp:
    """One instruction of an optimised HLO module, as much as the summary needs."""

    name: str
    opcode: str
    computation: str
    op_name: str = ""  # jax source metadata: "jit(f)/jvp(Model)/layer_0/dense/dot_general"
    calls: tuple[str, ...] = ()  # computations it calls (fusions, while bodies, reducers)
    target: str = ""  # custom-call target
    backend_kind: str = ""  # backend_config "kind" of a custom fusion (e.g. __triton_gemm)
    kernel: str = ""  # backend_config "name" of a Triton (Pallas) custom call's kernel


_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s*\(.*->.*\{\s*$")
_INSTRUCTION = re.compile(r"^\s+(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$")
_OPCODE = re.compile(r"\s*([\w\-]+)\(")
_OP_NAME = re.compile(r'op_name="((?:[^"\\]|\\.)*)"')
_CALLS = re.compile(
    r"\b(?:calls|to_apply|body|condition|branch_computations)=(\{[^}]*\}|%?[\w.\-]+)"
)
_TARGET = re.compile(r'custom_call_target="([^"]*)"')
_BACKEND_KIND = re.compile(r'"kind":"(__[^"]*)"')
# A Triton custom call's backend_config: {debug = false, ..., ir = "<bytes, quotes escaped
# as \22>", name = "attention_forward", num_stages = ...}.
_KERNEL_NAME = re.compile(r'\bname = "([^"]*)"')


def _split_type(rest: str) -> str:
    """What follows the result type of an instruction (`rest` starts with the type)."""
    if rest.startswith("("):  # a tuple type, possibly nested
        depth = 0
        for i, ch in enumerate(rest):
            depth += ch == "("
            depth -= ch == ")"
            if depth == 0:
                return rest[i + 1 :]
        return ""
    space = rest.find(" ")
    return rest[space:] if space >= 0 else ""


def parse_hlo(text: str) -> dict[str, HloOp]:
    """Instructions of the HLO module `text` (`Compiled.as_text()`) by name."""
    ops: dict[str, HloOp] = {}
    computation = ""
    for line in text.splitlines():
        head = _COMPUTATION.match(line)
        if head and not line.startswith((" ", "\t")):
            computation = head.group(1)
            continue
        m = _INSTRUCTION.match(line)
        if not m:
            continue
        name, rest = m.groups()
        op = _OPCODE.match(_split_type(rest))
        if not op:
            continue
        calls: list[str] = []
        for group in _CALLS.findall(rest):
            calls += [c.strip(" {}%") for c in group.split(",") if c.strip(" {}")]
        op_name = _OP_NAME.search(rest)
        target = _TARGET.search(rest)
        kind = _BACKEND_KIND.search(rest)
        config = rest.find("backend_config={")
        kernels = _KERNEL_NAME.findall(rest[config:]) if config >= 0 else []
        ops[name] = HloOp(
            name=name,
            opcode=op.group(1),
            computation=computation,
            op_name=op_name.group(1) if op_name else "",
            calls=tuple(calls),
            target=target.group(1) if target else "",
            backend_kind=kind.group(1) if kind else "",
            kernel=kernels[-1] if kernels else "",
        )
    return ops


def _by_computation(ops: dict[str, HloOp]) -> dict[str, list[HloOp]]:
    out: dict[str, list[HloOp]] = collections.defaultdict(list)
    for op in ops.values():
        out[op.computation].append(op)
    return out


# ----------------------------------------------------------------------------- attribution

_RNG_WORDS = ("threefry", "random_bits", "_bernoulli", "_uniform", "rng_bit_generator", "rng")
_COLLECTIVES = (
    "all-reduce",
    "all-gather",
    "reduce-scatter",
    "all-to-all",
    "collective-permute",
    "all-reduce-start",
    "all-gather-start",
    "collective-permute-start",
)
_COPIES = ("copy", "transpose", "bitcast", "reshape", "copy-start", "copy-done", "broadcast")


def _is_rng(op: HloOp) -> bool:
    if op.opcode in ("rng-bit-generator", "rng"):
        return True
    return any(word in part for part in op.op_name.split("/") for word in _RNG_WORDS[:4])


def categorize(op: HloOp, computations: dict[str, list[HloOp]]) -> str:
    """The category of an executed op (see the module docstring)."""
    code, target = op.opcode, op.target.lower()
    if code == "custom-call" and "triton" in target:  # a Pallas kernel: known by its name
        kernel = _kernel_name(op).lower()
        if "attention" in kernel or "flash" in kernel:
            return "attention (fused kernel)"
        if "lstm" in kernel or "rnn" in kernel:
            return "rnn (Pallas)"
        return f"custom-call {op.target}"
    if code == "custom-call":
        if "fmha" in target or "attention" in target or "flash" in target:
            return "attention (fused kernel)"
        if "conv" in target:
            return "convolution"
        if "gemm" in target or "matmul" in target or "cublas" in target:
            return "matmul"
        if "rnn" in target:
            return "rnn (cuDNN)"
        if "threefry" in target:
            return "rng/dropout"
        return f"custom-call {op.target}"
    if code in ("dot",):
        return "matmul"
    if code == "convolution":
        return "convolution"
    if code in _COPIES:
        return "copy/transpose"
    if code in _COLLECTIVES or code.removesuffix("-done") + "-start" in _COLLECTIVES:
        return "collective"
    if code in ("rng-bit-generator", "rng"):
        return "rng/dropout"
    if code in ("gather", "scatter", "dynamic-slice", "dynamic-update-slice"):
        return "gather/scatter"
    if code in ("while", "conditional", "call"):
        return "control flow"
    if code != "fusion":
        return "other"
    kind = op.backend_kind.lower()
    if "fmha" in kind or "attention" in kind:
        return "attention (fused kernel)"
    if "conv" in kind:
        return "convolution"
    inner = [i for c in op.calls for i in _inner(c, computations)]
    codes = {i.opcode for i in inner}
    if "gemm" in kind or "dot" in codes or "cudnn" in kind:
        return "matmul"
    if "convolution" in codes:
        return "convolution"
    if any(_is_rng(i) for i in inner) or _is_rng(op):
        return "rng/dropout"
    if codes & {"scatter", "gather"}:
        return "gather/scatter"
    if codes & {"reduce", "reduce-window", "select-and-scatter"}:
        return "reduction"
    if codes and codes <= {"parameter", "copy", "transpose", "bitcast", "reshape", "constant"}:
        return "copy/transpose"
    return "elementwise"


def _kernel_name(op: HloOp) -> str:
    """The name of the kernel a Triton custom call runs: its backend_config's, else the
    innermost name of its source (``.../attention_forward/pallas_call`` -> the former)."""
    if op.kernel:
        return op.kernel
    parts = [p for p in op.op_name.split("/") if p and p != "pallas_call"]
    return parts[-1] if parts else ""


def _inner(computation: str, computations: dict[str, list[HloOp]]) -> Iterator[HloOp]:
    """The ops of `computation` and of the computations it calls (nested fusions)."""
    seen: set[str] = set()
    stack = [computation]
    while stack:
        name = stack.pop()
        if name in seen:
            continue
        seen.add(name)
        for op in computations.get(name, ()):
            yield op
            stack.extend(op.calls)


_CONTROL = {"while", "body", "cond", "closed_call", "checkpoint", "remat", "rematted_computation"}


def place(op_name: str) -> tuple[str, str]:
    """(phase, module path) of an op from its jax source metadata.

    Phase: "backward" under a transpose (the gradient), "forward" under a jvp (the forward
    pass of the loss), "update" otherwise (the optimizer, the step's bookkeeping). Module
    path: the names between the outer transformations and the primitive, layer indices
    folded (``layer_11`` -> ``layer_*``), control flow (a scan's ``while/body``) skipped,
    ending at an inner jit (e.g. ``jit(_bernoulli)``: the module path has ended).
    """
    if not op_name:
        return "unknown", ""
    parts = op_name.split("/")
    phase = "update"
    path: list[str] = []
    for part in parts[:-1]:
        if "(" in part:
            if part.startswith("transpose("):
                phase = "backward"
            elif part.startswith("jvp(") and phase != "backward":
                phase = "forward"
            if path:
                break
            continue
        if part in _CONTROL:
            continue
        if re.fullmatch(r"layers?_\d+", part):
            part = re.sub(r"_\d+$", "_*", part)
        if not path or path[-1] != part:  # nn.scan names its body twice: layers/layers
            path.append(part)
    return phase, "/".join(path)


# ----------------------------------------------------------------------------- the trace


def op_events(xplane_path: str) -> tuple[list[tuple[str, str, float]], str]:
    """(hlo_module, hlo_op, duration in seconds) of every HLO op one device executed in a
    trace, and where they were read.

    The first device plane with kernels (a GPU's: its raw stream lines only; derived lines
    repeat them), else the host's events of XLA's CPU runtime for the lowest device ordinal.
    One device: with several, every device runs the same program.
    """
    from jax.profiler import ProfileData

    data = ProfileData.from_file(xplane_path)
    host: list[tuple[int, str, str, float]] = []
    for plane in sorted(data.planes, key=lambda p: p.name):
        on_device = plane.name.startswith("/device:")
        lines = list(plane.lines)
        if on_device and any(line.name.startswith("Stream") for line in lines):
            lines = [line for line in lines if line.name.startswith("Stream")]
        found = []
        for line in lines:
            for event in line.events:
                stats = dict(event.stats)
                if "hlo_op" not in stats:
                    continue
                module, name = str(stats.get("hlo_module", "")), str(stats["hlo_op"])
                seconds = event.duration_ns * 1e-9
                if on_device:
                    found.append((module, name, seconds))
                else:
                    host.append((int(stats.get("device_ordinal", 0)), module, name, seconds))
        if found:
            return found, f"{plane.name} kernels"
    first = min((ordinal for ordinal, *_ in host), default=0)
    return [
        e for ordinal, *e in host if ordinal == first
    ], f"host (XLA CPU runtime, device {first})"


def _resolve(name: str, ops: dict[str, HloOp]) -> str:
    """An event's HLO op name; a nested annotation ("while.3::fusion.7") names its innermost
    op that the module has."""
    if name in ops or "::" not in name:
        return name
    return next((part for part in reversed(name.split("::")) if part in ops), name)


def summarize(
    events: Iterable[tuple[str, str, float]],
    ops: dict[str, HloOp],
    steps: int,
    module: str | None = None,
    top: int = 15,
) -> dict[str, Any]:
    """Per-step op time by category, by (phase, module path) and by op.

    `events`: (hlo_module, hlo_op, seconds); only `module`'s (default: the module with the
    most time) are counted. `ops`: `parse_hlo` of that module.
    """
    events = list(events)
    per_module: dict[str, float] = collections.Counter()
    for mod, _, dur in events:
        per_module[mod] += dur
    if module is None and per_module:
        module = max(per_module, key=per_module.__getitem__)
    computations = _by_computation(ops)
    by_op: dict[str, float] = collections.Counter()
    for mod, name, dur in events:
        if mod == module:
            by_op[_resolve(name, ops)] += dur
    # A loop's or call's own event (XLA's CPU thunks) encloses its body's ops, which have
    # events of their own: counting both would count the body twice.
    enclosing = {
        name
        for name in by_op
        if name in ops and categorize(ops[name], computations) == "control flow"
    }
    enclosed_s = sum(by_op.pop(name) for name in enclosing)
    total = sum(by_op.values())
    by_category: dict[str, float] = collections.Counter()
    by_place: dict[str, float] = collections.Counter()
    rows = []
    for name, dur in sorted(by_op.items(), key=lambda kv: -kv[1]):
        op = ops.get(name)
        category = categorize(op, computations) if op else "unknown (not in the HLO)"
        op_name = op.op_name if op else ""
        if op and not op_name:  # e.g. a fusion without metadata: its ops have some
            names = [i.op_name for c in op.calls for i in _inner(c, computations) if i.op_name]
            op_name = collections.Counter(names).most_common(1)[0][0] if names else ""
        phase, path = place(op_name)
        by_category[category] += dur
        by_place[f"{phase}  {path}".rstrip()] += dur
        rows.append((name, category, phase, path, dur))

    def share(items: Iterable[tuple[str, float]]) -> list[dict[str, Any]]:
        return [
            {"name": k, "ms_per_step": 1e3 * v / steps, "pct": 100.0 * v / total if total else 0.0}
            for k, v in sorted(items, key=lambda kv: -kv[1])
        ]

    return {
        "module": module,
        "steps": steps,
        "op_ms_per_step": 1e3 * total / steps,
        "control_flow_ms_per_step": 1e3 * enclosed_s / steps,
        "by_category": share(by_category.items()),
        "by_place": share(by_place.items()),
        "top_ops": [
            {
                "op": name,
                "category": category,
                "phase": phase,
                "path": path,
                "ms_per_step": 1e3 * dur / steps,
                "pct": 100.0 * dur / total if total else 0.0,
            }
            for name, category, phase, path, dur in rows[:top]
        ],
    }


def format_summary(summary: dict[str, Any], top: int = 25) -> str:
    """The summary as text (what ``summary.txt`` holds; the `top` places)."""
    out = [f"# {summary['title']}"]
    if summary.get("error"):
        out.append(f"profile failed: {summary['error']}")
        return "\n".join(out)
    out.append(
        f"step {summary['step_ms']:.3f} ms (timed windows); op time {summary['op_ms_per_step']:.3f}"
        f" ms/step over {summary['steps']} traced steps; module {summary['module']}; "
        f"read from {summary.get('source', '?')}"
    )
    if summary.get("control_flow_ms_per_step"):
        out.append(
            f"(loops' and calls' own events, {summary['control_flow_ms_per_step']:.3f} ms/step, "
            "enclose their bodies' ops and are not added)"
        )
    cost = summary.get("cost") or {}
    if cost.get("flops"):
        line = f"XLA cost analysis (loop bodies once): {cost['flops'] / 1e12:.4g} TFLOP"
        if summary.get("model_flops_per_step"):
            line += f" (model FLOPs {summary['model_flops_per_step'] / 1e12:.4g})"
        if cost.get("bytes accessed"):
            line += f", {cost['bytes accessed'] / 2**30:.4g} GiB accessed"
        out.append(line)
    memory = summary.get("memory") or {}
    if memory:
        out.append(
            "memory analysis: "
            + ", ".join(
                f"{k.replace('_size_in_bytes', '')} {v / 2**30:.3g} GiB" for k, v in memory.items()
            )
        )
    for key, title in (("by_category", "category"), ("by_place", "phase  module path")):
        out.append("")
        out.append(f"{'ms/step':>9}  {'%':>5}  {title}")
        rows = summary[key]
        out += [f"{r['ms_per_step']:9.3f}  {r['pct']:5.1f}  {r['name']}" for r in rows[:top]]
        if len(rows) > top:
            rest = rows[top:]
            out.append(
                f"{sum(r['ms_per_step'] for r in rest):9.3f}  {sum(r['pct'] for r in rest):5.1f}"
                f"  ({len(rest)} more in summary.json)"
            )
    out.append("")
    out.append(f"{'ms/step':>9}  {'%':>5}  {'op':<28}  {'category':<24}  place")
    for r in summary["top_ops"]:
        out.append(
            f"{r['ms_per_step']:9.3f}  {r['pct']:5.1f}  {r['op']:<28}  {r['category']:<24}  "
            f"{r['phase']}  {r['path']}"
        )
    return "\n".join(out)


# ----------------------------------------------------------------------------- JAX side


def _cost(compiled: Any) -> dict[str, float]:
    try:
        cost = compiled.cost_analysis()
    except Exception:  # backends without a cost model
        return {}
    if isinstance(cost, list | tuple):
        cost = cost[0] if cost else {}
    keep = ("flops", "transcendentals", "bytes accessed")
    return {k: float(cost[k]) for k in keep if cost and k in cost}


def _memory(compiled: Any) -> dict[str, int]:
    try:
        stats = compiled.memory_analysis()
    except Exception:
        return {}
    keys = (
        "argument_size_in_bytes",
        "output_size_in_bytes",
        "alias_size_in_bytes",
        "temp_size_in_bytes",
    )
    return {k: int(getattr(stats, k)) for k in keys if stats is not None and hasattr(stats, k)}


def profile_step(
    directory: str,
    title: str,
    lower: Callable[[], Any],
    run: Callable[[Any], Any],
    sync: Callable[[], Any],
    steps: int,
    step_ms: float,
    model_flops_per_step: float | None = None,
) -> dict[str, Any]:
    """Compiles, traces and summarises a step (see the module docstring); never raises.

    `lower()` returns the step's `jax.stages.Lowered`; `run(compiled)` runs one step with
    the compiled executable (asynchronously) and `sync()` waits for the device. Writes
    ``step.hlo.txt``, ``trace/``, ``summary.json`` and ``summary.txt`` under `directory`
    and returns the summary.
    """
    import jax

    os.makedirs(directory, exist_ok=True)
    summary: dict[str, Any] = {"title": title, "step_ms": step_ms, "directory": directory}
    try:
        start = time.perf_counter()
        compiled = lower().compile()
        summary["aot_compile_s"] = time.perf_counter() - start
        text = compiled.as_text()
        with open(os.path.join(directory, "step.hlo.txt"), "w") as f:
            f.write(text)
        summary["cost"] = _cost(compiled)
        summary["memory"] = _memory(compiled)
        summary["model_flops_per_step"] = model_flops_per_step
        run(compiled)  # once outside the trace: the first run of an executable can be slow
        sync()
        trace_dir = os.path.join(directory, "trace")
        with jax.profiler.trace(trace_dir):
            for _ in range(steps):
                run(compiled)
            sync()
        files = sorted(glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True))
        if not files:
            raise RuntimeError(f"the profiler wrote no .xplane.pb under {trace_dir}")
        events, summary["source"] = op_events(files[-1])
        if jax.default_backend() == "gpu" and not summary["source"].startswith("/device"):
            raise RuntimeError("the trace holds no GPU kernels (is CUPTI available?)")
        summary.update(summarize(events, parse_hlo(text), steps))
    except Exception as e:  # a failed profile must not lose the measured row
        summary["error"] = f"{type(e).__name__}: {e}"
    text_summary = format_summary(summary)
    with open(os.path.join(directory, "summary.txt"), "w") as f:
        f.write(text_summary + "\n")
    with open(os.path.join(directory, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    print(text_summary, file=sys.stderr, flush=True)
    return summary
