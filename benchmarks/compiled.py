"""What XLA makes of each training step for an NVIDIA GPU, on a machine without one.

Usage::

    python -m benchmarks.compiled --target h200 --only bert_base --impls default pallas
    python -m benchmarks.compiled --target h100 --only resnet50 --batch 512 --top 15

Each workload of the ``gpu`` suite (`benchmarks.specs`) is built as `python -m benchmarks`
builds it and its training step (`jaxmodels.training.train_step`, state donated) is compiled
for one GPU of the target with XLA's deviceless compilation: nothing runs, so there are no
timings, only what the compiled program is (every implementation but the cuDNN LSTM, which
needs the GPU even to be traced). Attention's automatic choice of implementation is made
from the host's backend, so the compiled program has the explicit attention path where a
GPU run would use cuDNN's fused attention (`jaxmodels.attention`'s rule: bfloat16/float16
inputs, head_dim a multiple of 8 up to 128, no attention dropout, mask or bias; here the
causal LM, and BERT without attention dropout): such rows say so in their note. It needs
jax's CUDA plugin (``pip install "jax[cuda13]"``, or ``cuda12``), which compiles without a
GPU; the Pallas kernels compile through Triton (a step that lowers for CUDA gets them, see
`jaxmodels._pallas`).

Columns of the table (and keys of the ``--json`` rows):

* ``compile s``: XLA's compilation on this host. Without a GPU there is no autotuning
  (matmul tilings are XLA's defaults), so a first step on the GPU spends a different time;
* ``kernels``: device kernels launched per step (fusions, matmuls, custom calls, copies,
  collectives); ``matmuls`` (matrix multiplications and convolutions) and ``custom``
  (Triton/Pallas and other custom calls) of them;
* ``kernel I/O GB``: the sum over those kernels of the bytes of their operands and results
  (slices where a kernel reads or updates only a slice), what the step would read and write
  in device memory if nothing stayed in cache: an upper bound of its memory traffic, and the
  number to bring down for memory-bound steps; the scratch workspace a cuBLAS or cuDNN call
  returns is not counted. Loops count each iteration's kernels, and a conditional (e.g.
  `optim.accumulate` applying the update every k-th step under gradient accumulation) its
  largest branch's (each column separately: an upper bound of a step's);
  ``transposing GB``: the part of it in kernels (other than matmuls) that transpose, i.e.
  write an array in another dimension order than they read it. Splitting attention heads
  needs some; many more point at a layout XLA chose for the whole step (e.g. a batch-minor
  residual stream, see `jaxmodels.layers.add_positions`);
* ``TFLOP``: the floating-point operations of the step's dots (2 x M x N x K, backward
  included; cuBLAS GEMM calls included, from their dimension numbers; convolutions, which
  become cuDNN calls, are not counted); ``f32 TFLOP``: those of dots with a float32 (or
  float64) operand, which run at a fraction of the bfloat16 tensor-core rate (in a bfloat16
  step, usually a backward pass fed a float32 gradient);
* ``temp GiB``: XLA's buffer assignment for everything but the state and batch: the
  activations kept for the backward pass and the kernels' scratch; ``state GiB``: parameters,
  optimizer state and batch (the arguments).

``--top N`` adds, per row, the N source operations (the jaxpr's names, layers merged) whose
kernels have the most I/O, and ``--hlo DIR`` writes each optimized HLO module.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import functools
import importlib.metadata
import importlib.util
import json
import math
import os
import re
import sys
import time
from collections.abc import Iterator
from typing import Any

from benchmarks import specs
from benchmarks.errors import UsageError, check_output_file, check_output_folder, run

PROG = "python -m benchmarks.compiled"

# Device descriptions for XLA (its GpuTargetConfig, text format) of the targets: SM count,
# clock, bandwidth and caches from the published specifications, memory as CUDA reports it.
_DEVICE_INFO = {
    "h100": ("NVIDIA H100 80GB HBM3", 85_520_809_984, 3_350_000_000_000),
    "h200": ("NVIDIA H200", 150_754_820_096, 4_800_000_000_000),
}
TARGETS = tuple(sorted(_DEVICE_INFO))

_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2}
_BYTES.update({"s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8})
_ARRAY = re.compile(r"\b(" + "|".join(_BYTES) + r")\[([0-9,]*)\]")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%([\w.\-]+) = (.*?) ([a-z][\w\-]*)\((.*)$")
_NOT_KERNELS = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast"}
_NOT_KERNELS |= {"after-all", "partition-id", "replica-id"}
# Custom calls into cuBLAS / cuDNN matmuls and convolutions (counted as matmuls, not custom).
_LIBRARY_MATMUL = re.compile(r"cublas|cudnn\$conv|gemm", re.IGNORECASE)
# A cuBLAS GEMM (`__cublas$gemm`, `__cublas$lt$matmul`, ...): its FLOPs are those of the dot.
_GEMM = re.compile(r'custom_call_target="__cublas\$(?:lt\$matmul|gemm)[^"]*"')
# The scratch buffer a cuBLAS/cuDNN custom call returns last: s8[4194304] or u8[0].
_WORKSPACE = re.compile(r",\s*[su]8\[\d*\](?:\{0\})?\)$")


def target_config(target: str) -> str:
    """XLA's GpuTargetConfig (text) for `target`, with the CUDA and cuDNN versions of the
    installed plugin."""
    name, memory, bandwidth = _DEVICE_INFO[target]
    cuda, cudnn = _plugin_versions()
    return f"""gpu_device_info {{
  threads_per_block_limit: 1024
  threads_per_warp: 32
  shared_memory_per_block: 49152
  shared_memory_per_core: 233472
  threads_per_core_limit: 2048
  core_count: 132
  fpus_per_core: 128
  block_dim_limit_x: 2147483647
  block_dim_limit_y: 65535
  block_dim_limit_z: 65535
  memory_bandwidth: {bandwidth}
  l2_cache_size: 52428800
  clock_rate_ghz: 1.98
  device_memory_size: {memory}
  shared_memory_per_block_optin: 232448
  cuda_compute_capability {{ major: 9 minor: 0 }}
  registers_per_core_limit: 65536
  registers_per_block_limit: 65536
}}
platform_name: "CUDA"
dnn_version_info {{ major: {cudnn[0]} minor: {cudnn[1]} }}
runtime_version {{ major: {cuda[0]} minor: {cuda[1]} }}
device_description_str: "{name}"
"""


def cuda_plugin() -> int | None:
    """The CUDA major version of jax's installed CUDA plugin, or None."""
    for major in (13, 12):
        try:
            if importlib.util.find_spec(f"jax_plugins.xla_cuda{major}") is not None:
                return major
        except ModuleNotFoundError:  # no jax_plugins package at all
            return None
    return None


def _plugin_versions() -> tuple[tuple[int, int], tuple[int, int]]:
    """((CUDA major, minor), (cuDNN major, minor)) of the installed jax CUDA plugin."""
    major = cuda_plugin()
    if major is None:
        raise UsageError(
            "compiling for an NVIDIA GPU without one needs jax's CUDA plugin, which is not "
            'installed: pip install "jax[cuda13]" (or "jax[cuda12]")'
        )
    cudnn = (9, 0)
    try:
        parts = importlib.metadata.version(f"nvidia-cudnn-cu{major}").split(".")
        cudnn = (int(parts[0]), int(parts[1]))
    except (importlib.metadata.PackageNotFoundError, ValueError, IndexError):
        pass
    return (major, 0), cudnn


def _shape_bytes(text: str) -> int:
    return sum(
        _BYTES[dtype] * math.prod(int(d) for d in dims.split(",") if d)
        for dtype, dims in _ARRAY.findall(text)
    )


def _computations(hlo: str) -> tuple[dict[str, list[tuple[str, str, str, str]]], str]:
    """{computation: [(name, type, opcode, rest of line)]}, and the entry's name."""
    computations: dict[str, list[tuple[str, str, str, str]]] = {}
    current, entry = "", ""
    for line in hlo.splitlines():
        if line and not line[0].isspace() and line.rstrip().endswith("{"):
            match = re.match(r"^(ENTRY )?%?([\w.\-]+)", line)
            if match:
                current = match.group(2)
                computations[current] = []
                if match.group(1):
                    entry = current
            continue
        match = _INSTRUCTION.match(line)
        if match and current:
            computations[current].append(match.groups())  # type: ignore[arg-type]
    if not entry:
        raise ValueError("no ENTRY computation in this HLO module")
    return computations, entry


def _flops(
    computations: dict[str, Any], types: dict[str, dict[str, str]], where: str, instruction: tuple
) -> tuple[int, int]:
    """Floating-point operations of the matmuls in one instruction of computation `where`
    (a dot or convolution, or a fusion or call containing them): all of them, and those of
    the matmuls with a float32 or float64 operand."""
    _, out_type, opcode, rest = instruction
    flops = wide = 0
    contracting = None
    if opcode in ("dot", "convolution"):
        contracting = re.search(r"lhs_contracting_dims=\{([0-9,]*)\}", rest)
    elif opcode == "custom-call" and _GEMM.search(rest):
        # cuBLAS: the dot's dimension numbers are in backend_config, JSON, e.g.
        # "dot_dimension_numbers":{"lhs_contracting_dimensions":["1"],...}.
        contracting = re.search(r'"lhs_contracting_dimensions":\[([0-9",]*)\]', rest)
    if contracting:
        out = _ARRAY.search(out_type)  # a cuBLAS call's: the first of its tuple
        operands = [_ARRAY.search(types[where].get(o, "")) for o in _operands(rest)][:2]
        lhs = operands[0] if operands else None
        if out and lhs:
            lhs_dims = [int(d) for d in lhs.group(2).split(",") if d]
            dims = contracting.group(1).replace('"', "").split(",")
            k = math.prod(lhs_dims[int(i)] for i in dims if i)
            flops = 2 * k * math.prod(int(d) for d in out.group(2).split(",") if d)
            if any(o and o.group(1) in ("f32", "f64") for o in operands):
                wide = flops
    for called in _called(rest):
        for i in computations.get(called, []):
            inner, inner_wide = _flops(computations, types, called, i)
            flops, wide = flops + inner, wide + inner_wide
    return flops, wide


def _called(rest: str) -> list[str]:
    """The computations an instruction calls (a fusion's body, a call's or reduce's function)."""
    return re.findall(r"(?:calls|to_apply)=%([\w.\-]+)", rest)


def _operands(rest: str) -> list[str]:
    return re.findall(r"%([\w.\-]+)", rest.split("), ")[0])


def _kernel_bytes(
    computations: dict[str, Any], types: dict[str, dict[str, str]], where: str, instruction: tuple
) -> int:
    """Bytes a kernel reads and writes: its operands (an array passed several times once)
    and results, except that a fused computation reading only slices of an operand (also
    through bitcasts and elementwise operations) counts the slices, and one updating a
    slice of an operand in place (dynamic-update-slice, e.g. a loop writing its step's
    output) counts the update, not the buffer."""
    _, out_type, opcode, rest = instruction
    operands = _operands(rest)
    if opcode == "custom-call" and re.search(r'custom_call_target="__cu(?:blas|dnn)\$', rest):
        out_type = _WORKSPACE.sub(")", out_type)  # its scratch is no input or output
    out = _shape_bytes(out_type)
    called = re.search(r"calls=%([\w.\-]+)", rest)
    if opcode != "fusion" or not called:  # e.g. a custom call taking one array for 3 inputs
        return out + sum(_shape_bytes(types[where].get(o, "")) for o in dict.fromkeys(operands))
    sizes = [_shape_bytes(types[where].get(o, "")) for o in operands]
    body = computations.get(called.group(1), [])
    body_types = types.get(called.group(1), {})
    params = {n: int(re.match(r"(\d+)", r).group(1)) for n, _, op, r in body if op == "parameter"}
    users: dict[str, list[tuple[str, str, str, int]]] = collections.defaultdict(list)
    for name, typ, op, r in body:
        for position, operand in enumerate(_operands(r)):
            users[operand].append((name, op, typ, position))

    def uses_of(value: str, value_type: str) -> list[tuple[str, int, float]]:
        """The value's uses as (opcode, operand position, fraction of the value's elements
        the use reads), looking through bitcasts and elementwise operations: a slice of
        either reads only the elements the slice keeps. Each use once."""
        found, seen, pending = [], {value}, [(value, value_type)]
        while pending:
            current, current_type = pending.pop()
            for name, op, typ, position in users.get(current, []):
                if op == "bitcast" or (
                    op in _ELEMENTWISE and _elements(typ) == _elements(current_type)
                ):
                    if name not in seen:
                        seen.add(name)
                        pending.append((name, typ))
                else:
                    found.append((op, position, _elements(typ) / max(_elements(current_type), 1)))
        return found

    for param, index in params.items():
        uses = uses_of(param, body_types.get(param, ""))
        if index < len(sizes) and uses and all(_slice_use(op, pos) for op, pos, _ in uses):
            read = sum(part for op, _, part in uses if op != "dynamic-update-slice")
            sizes[index] = round(sizes[index] * read)
    root = body[-1] if body else None
    roots = [root] if root and root[2] != "tuple" else []
    if root and root[2] == "tuple":
        by_name = {n: i for i, n in enumerate(body_types)}
        roots = [body[by_name[o]] for o in _operands(root[3]) if o in by_name]
    if roots and all(r[2] == "dynamic-update-slice" for r in roots):
        out = sum(_shape_bytes(body_types.get(_operands(r[3])[1], "")) for r in roots)
    return out + sum(sizes)


# Operations whose output element i depends on element i of each operand only (operands
# of the output's size): a slice after them reads only the sliced elements of the operand.
_ELEMENTWISE = frozenset(
    {
        *("abs", "add", "and", "compare", "convert", "divide", "exponential", "maximum"),
        *("minimum", "multiply", "negate", "not", "or", "select", "shift-left"),
        *("shift-right-arithmetic", "shift-right-logical", "subtract", "xor"),
    }
)


def _elements(text: str) -> int:
    """Elements of the (first) array type in `text`."""
    found = _ARRAY.search(text)
    return math.prod(int(d) for d in found.group(2).split(",") if d) if found else 0


def _slice_use(opcode: str, position: int) -> bool:
    """Whether a use reads only part of its operand: the operand sliced, or the buffer a
    dynamic-update-slice updates in place (not their start indices)."""
    return position == 0 and opcode in ("slice", "dynamic-slice", "dynamic-update-slice")


def analyze_hlo(hlo: str, top: int = 0) -> dict[str, Any]:
    """Kernel count, matmul kernels, custom calls, kernel I/O bytes and matmul FLOPs of one
    execution of an optimized HLO module (see the module docstring): the entry computation's
    kernels, and those of loops (`while`, counted as many times as their known trip count),
    calls and conditionals within it. A conditional (`lax.cond`, e.g. `optim.accumulate`
    applying the optimizer's update every k-th step) runs one branch; each number counts
    its largest branch's, so that with conditionals the numbers are upper bounds of a step's.
    With `top`, the `top` source operations with the most kernel I/O as (name, bytes,
    kernels)."""
    computations, entry = _computations(hlo)
    types = {c: {name: typ for name, typ, _, _ in body} for c, body in computations.items()}

    def visit(computation: str, times: int, totals: Any, by_source: Any) -> None:
        for instruction in computations.get(computation, []):
            _, _, opcode, rest = instruction
            if opcode in _NOT_KERNELS:
                continue
            if opcode == "while":
                trips = re.search(r'"known_trip_count":\{"n":"(\d+)"', rest)
                n = int(trips.group(1)) if trips else 1
                totals["unknown_trips"] += trips is None
                for part in ("condition", "body"):
                    called = re.search(part + r"=%([\w.\-]+)", rest).group(1)
                    visit(called, times * n, totals, by_source)
                continue
            if opcode == "call":
                called = re.search(r"to_apply=%([\w.\-]+)", rest).group(1)
                visit(called, times, totals, by_source)
                continue
            if opcode == "conditional":
                branches = [_tallies() for _ in _branches(rest)]
                for branch, tally in zip(_branches(rest), branches, strict=True):
                    visit(branch, times, *tally)
                for key in {k for t, _ in branches for k in t}:
                    totals[key] += max(t[key] for t, _ in branches)
                for key in {k for _, b in branches for k in b}:
                    for i in range(2):
                        by_source[key][i] += max(b[key][i] if key in b else 0 for _, b in branches)
                totals["conditionals"] += 1
                continue
            size = _kernel_bytes(computations, types, computation, instruction)
            library = re.search(r'custom_call_target="([^"]*)"', rest)
            library_matmul = bool(library and _LIBRARY_MATMUL.search(library.group(1)))
            flops, wide_flops = _flops(computations, types, computation, instruction)
            totals["wide_flops"] += times * wide_flops
            totals["kernels"] += times
            totals["matmuls"] += times * (flops > 0 or library_matmul)
            totals["custom"] += times * (opcode == "custom-call" and not library_matmul)
            totals["bytes"] += times * size
            if not flops and not library_matmul and _transposes(computations, instruction):
                totals["transpose_bytes"] += times * size
            totals["flops"] += times * flops
            source = re.search(r'op_name="([^"]*)"', rest)
            key = _source_name(source.group(1) if source else "")
            by_source[key][0] += times * size
            by_source[key][1] += times

    totals, by_source = _tallies()
    visit(entry, 1, totals, by_source)
    result: dict[str, Any] = {
        "kernels": totals["kernels"],
        "matmuls": totals["matmuls"],
        "custom": totals["custom"],
        "kernel_io_gb": totals["bytes"] / 1e9,
        "transpose_gb": totals["transpose_bytes"] / 1e9,
        "matmul_tflop": totals["flops"] / 1e12,
        "f32_matmul_tflop": totals["wide_flops"] / 1e12,
    }
    notes = []
    if totals["unknown_trips"]:
        notes.append(f"{totals['unknown_trips']} loop(s) of unknown trip count counted once")
    if totals["conditionals"]:
        notes.append(f"{totals['conditionals']} conditional(s): the largest branch counted")
    if notes:
        result["note"] = "; ".join(notes)
    if top:
        ranked = sorted(by_source.items(), key=lambda kv: -kv[1][0])[:top]
        result["top"] = [(k, v[0], v[1]) for k, v in ranked]
    return result


def _tallies() -> tuple[collections.Counter, dict[str, list[int]]]:
    """Empty (totals, {source: [bytes, kernels]}) for `analyze_hlo`."""
    return collections.Counter(), collections.defaultdict(lambda: [0, 0])


def _branches(rest: str) -> list[str]:
    """The branch computations of a conditional: branch_computations={%a, %b, ...}, or
    true_computation=%a, false_computation=%b."""
    listed = re.search(r"branch_computations=\{([^}]*)\}", rest)
    if listed:
        return re.findall(r"%([\w.\-]+)", listed.group(1))
    return re.findall(r"(?:true|false)_computation=%([\w.\-]+)", rest)


def _transposes(computations: dict[str, Any], instruction: tuple) -> bool:
    """Whether a kernel transposes: a transpose, or a fusion (or call) containing one."""
    _, _, opcode, rest = instruction
    if opcode == "transpose":
        return True
    return any(
        _transposes(computations, inner)
        for called in _called(rest)
        for inner in computations.get(called, [])
    )


def _source_name(op_name: str) -> str:
    """A jaxpr op name without the jit prefix and with layer numbers merged."""
    name = re.sub(r"^jit\([^)]*\)/", "", op_name)
    name = re.sub(r"(layers?)_\d+", r"\1_N", name)
    return name or "(unnamed)"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--target", choices=TARGETS, default="h200", help="the GPU compiled for")
    parser.add_argument("--only", nargs="+", metavar="NAME", help="only these workloads")
    parser.add_argument(
        "--impls",
        nargs="+",
        metavar="IMPL",
        default=["default"],
        help="our implementations to compile where a workload has them (default, "
        "no_attn_dropout, pallas, scan, flax_rnn); default: each workload's first",
    )
    parser.add_argument("--batch", type=int, default=None, help="global batch size instead")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a model setting, as for python -m benchmarks",
    )
    parser.add_argument("--top", type=int, default=0, help="source operations listed per row")
    parser.add_argument("--hlo", metavar="DIR", help="write each optimized HLO module here")
    parser.add_argument("--json", metavar="FILE", help="write the rows as JSON")
    return parser


@functools.cache
def _target_devices(target: str) -> list[Any]:
    """One compile-only device of `target` (made once per target)."""
    from jax.experimental import topologies

    topology = topologies.get_topology_desc(
        platform="cuda", target_config=target_config(target), topology="1x1x1"
    )
    return list(topology.devices)


@contextlib.contextmanager
def gpu_attention_choices() -> Iterator[list[str]]:
    """While inside, records for every attention call traced with the automatic
    implementation (`jaxmodels.attention.dot_product_attention`, implementation None) the
    choice it would make on an NVIDIA GPU, "cudnn" or "xla", by the same rule; the calls
    themselves keep this host's choice (the explicit path, off a GPU)."""
    from jaxmodels import attention

    choose = attention._auto_implementation
    choices: list[str] = []

    def recording(query: Any, key: Any, needs_xla: bool) -> str:
        on_host = attention._on_nvidia_gpu
        attention._on_nvidia_gpu = lambda: True
        try:
            choices.append(choose(query, key, needs_xla))
        finally:
            attention._on_nvidia_gpu = on_host
        return choose(query, key, needs_xla)

    attention._auto_implementation = recording
    try:
        yield choices
    finally:
        attention._auto_implementation = choose


def lower_step(w: Any, impl: str, devices: list[Any], overrides: dict[str, Any]) -> tuple[Any, int]:
    """(the training step of workload `w` with implementation `impl` lowered for a mesh of
    `devices`, how many of its attention calls would run cuDNN's fused attention on an
    NVIDIA GPU where lowering on this host gave them the explicit path)."""
    import jax

    from benchmarks import workloads
    from jaxmodels import sharding, training

    if overrides:
        w = dataclasses.replace(w, model={**w.model, **overrides})
    mesh = sharding.make_mesh(data=-1, devices=devices)
    rules = sharding.logical_rules("data")
    built = workloads.BUILDERS[w.family](w, impl)
    tx = workloads.optimizer(w)
    inputs = [x[:1] for x in built.model_inputs()]
    state, shardings = training.abstract_train_state(built.model, tx, inputs, mesh, rules)
    batch_sharding = sharding.batch_sharding(mesh)
    batch = {
        k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=batch_sharding)
        for k, v in built.batch.items()
    }
    step = training.compile_train_step(built.loss_fn, shardings, mesh, rules)
    with gpu_attention_choices() as choices:
        lowered = step.lower(state, batch)
    return lowered, choices.count("cudnn")


def compile_step(
    w: Any, impl: str, target: str, overrides: dict[str, Any]
) -> tuple[Any, float, int]:
    """(the compiled training step of workload `w` with implementation `impl` for one GPU of
    `target`, seconds XLA took, how many attention calls in it take the explicit path where
    the GPU would run cuDNN's fused attention: see `lower_step`)."""
    lowered, cudnn_attention = lower_step(w, impl, _target_devices(target), overrides)
    start = time.perf_counter()
    compiled = lowered.compile()
    return compiled, time.perf_counter() - start, cudnn_attention


def row(w: Any, impl: str, target: str, overrides: dict[str, Any], top: int) -> dict[str, Any]:
    """One table row (see the module docstring); "hlo" holds the module's text."""
    compiled, seconds, cudnn_attention = compile_step(w, impl, target, overrides)
    hlo = compiled.as_text()
    memory = compiled.memory_analysis()
    out = {
        "workload": w.name,
        "impl": specs.impl_label(impl),
        "target": target,
        "batch": w.batch,
        "shape": w.shape,
        "compile_s": seconds,
        **analyze_hlo(hlo, top),
        "temp_gib": memory.temp_size_in_bytes / 2**30,
        "state_gib": memory.argument_size_in_bytes / 2**30,
        "hlo": hlo,
    }
    notes = [f"{k}={v}" for k, v in overrides.items()] + [out.pop("note", "")]
    if cudnn_attention:
        notes.append("attention on the explicit path, where a GPU run uses cuDNN's fused one")
    out["note"] = "; ".join(filter(None, notes))
    return out


_COLUMNS = [
    ("workload", "workload", "{}"),
    ("impl", "impl", "{}"),
    ("target", "target", "{}"),
    ("batch", "batch", "{}"),
    ("shape", "shape", "{}"),
    ("compile_s", "compile s", "{:.1f}"),
    ("kernels", "kernels", "{:,}"),
    ("matmuls", "matmuls", "{:,}"),
    ("custom", "custom", "{:,}"),
    ("kernel_io_gb", "kernel I/O GB", "{:.1f}"),
    ("transpose_gb", "transposing GB", "{:.1f}"),
    ("matmul_tflop", "TFLOP", "{:.2f}"),
    ("f32_matmul_tflop", "f32 TFLOP", "{:.2f}"),
    ("temp_gib", "temp GiB", "{:.2f}"),
    ("state_gib", "state GiB", "{:.2f}"),
    ("note", "note", "{}"),
]


def table(rows: list[dict[str, Any]]) -> str:
    """The rows as an aligned text table."""
    cells = [[title for _, title, _ in _COLUMNS]]
    for r in rows:
        cells.append([fmt.format(r[key]) if key in r else "" for key, _, fmt in _COLUMNS])
    widths = [max(len(line[i]) for line in cells) for i in range(len(_COLUMNS))]
    lines = ["  ".join(c.ljust(wd) for c, wd in zip(line, widths, strict=True)) for line in cells]
    lines.insert(1, "  ".join("-" * wd for wd in widths))
    return "\n".join(line.rstrip() for line in lines)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.json:
        check_output_file("--json", args.json)
    if args.hlo:
        check_output_folder("--hlo", args.hlo)
    import jax

    # Compile-only: the host's own backend is the CPU whatever accelerator it has.
    jax.config.update("jax_platforms", "cpu")
    from benchmarks import cli

    _plugin_versions()  # a clear error before building anything
    overrides = cli.model_overrides(args.set)
    from benchmarks import workloads

    suite = specs.suite("gpu", args.only, args.batch)
    # jaxlib's cuDNN LSTM asks the GPU for its workspace sizes while tracing.
    available = {
        w.name: [i for i in workloads.impls(w, nvidia=True) if i != "cudnn"] for w in suite
    }
    known = {"default"} | {i for names in available.values() for i in names if i}
    unknown = sorted(set(args.impls) - known)
    if unknown:
        raise UsageError(f"--impls {unknown}: none of these workloads has it; use {sorted(known)}")
    rows = []
    for w in suite:
        for impl in args.impls:
            name = available[w.name][0] if impl == "default" else impl
            if name not in available[w.name]:
                continue
            print(f"[compile for {args.target}] {w.name} jax {name}".rstrip() + " ...", flush=True)
            r = row(w, name, args.target, overrides, args.top)
            hlo = r.pop("hlo")
            if args.hlo:
                path = os.path.join(args.hlo, "-".join(filter(None, [w.name, name])) + ".hlo.txt")
                with open(path, "w") as f:
                    f.write(hlo)
            for source, size, count in r.get("top", []):
                print(f"    {size / 1e9:7.2f} GB  {count:4d} kernels  {source}")
            rows.append(r)
    print(
        f"# {time.strftime('%Y-%m-%dT%H:%M:%S%z')}  compiled for {args.target} without a GPU"
        f"  jax {jax.__version__}"
    )
    print(table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"target": args.target, "jax_version": jax.__version__, "rows": rows}, f)
    return 0


if __name__ == "__main__":
    sys.exit(run(main, PROG))
