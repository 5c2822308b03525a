# ruff: noqa: E501  (the HLO text is kept as XLA prints it, one instruction per line)
"""`python -m benchmarks --profile`: the HLO reader, the attribution and a real CPU trace."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from benchmarks import profile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Optimised GPU HLO as XLA prints it (abridged): a cuBLAS GEMM, a Triton GEMM fusion, the
# cuDNN attention kernel, a dropout fusion (threefry bits + select), a reduction, a tuple-typed
# while loop whose body holds a copy, and an all-reduce.
GPU_HLO = """\
HloModule jit__lambda, is_scheduled=true, entry_computation_layout={(f32[8]{0})->f32[8]{0}}

%gemm_computation (p0: bf16[64,64], p1: bf16[64,64]) -> bf16[64,64] {
  %p0 = bf16[64,64]{1,0} parameter(0)
  %p1 = bf16[64,64]{1,0} parameter(1)
  ROOT %dot.3 = bf16[64,64]{1,0} dot(%p0, %p1), lhs_contracting_dims={1}, rhs_contracting_dims={0}, metadata={op_name="jit(<lambda>)/transpose(jvp(Bench))/model/layer_3/mlp/dot_general"}
}

%fused_dropout (param_0: bf16[64,64]) -> bf16[64,64] {
  %param_0 = bf16[64,64]{1,0} parameter(0)
  %xor.1 = u32[64,64]{1,0} xor(%param_0, %param_0), metadata={op_name="jit(<lambda>)/jvp(Bench)/model/layer_0/Dropout_0/jit(_bernoulli)/jit(_uniform)/threefry2x32/xor"}
  ROOT %select.2 = bf16[64,64]{1,0} select(%xor.1, %param_0, %param_0), metadata={op_name="jit(<lambda>)/jvp(Bench)/model/layer_0/Dropout_0/select_n"}
}

%add_f32 (a: f32[], b: f32[]) -> f32[] {
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %add.9 = f32[] add(%a, %b)
}

%fused_reduce (param_0.1: f32[64,64]) -> f32[64] {
  %param_0.1 = f32[64,64]{1,0} parameter(0)
  %constant.1 = f32[] constant(0)
  ROOT %reduce.1 = f32[64]{0} reduce(%param_0.1, %constant.1), dimensions={1}, to_apply=%add_f32
}

%body (arg: (s32[], f32[8])) -> (s32[], f32[8]) {
  %arg = (s32[], f32[8]{0}) parameter(0)
  ROOT %copy.7 = (s32[], f32[8]{0}) copy(%arg), metadata={op_name="jit(<lambda>)/jvp(Bench)/model/lstm/while/body/copy"}
}

%cond (arg.1: (s32[], f32[8])) -> pred[] {
  %arg.1 = (s32[], f32[8]{0}) parameter(0)
  ROOT %constant.2 = pred[] constant(false)
}

ENTRY %main.1 (x: f32[8]) -> f32[8] {
  %x = f32[8]{0} parameter(0)
  %custom-call.1 = (bf16[64,64]{1,0}, s8[1024]{0}) custom-call(%x, %x), custom_call_target="__cublas$gemm", metadata={op_name="jit(<lambda>)/jvp(Bench)/model/layer_11/attention/query/dot_general"}, backend_config={"operation_queue_id":"0"}
  %gemm_fusion_dot.3 = bf16[64,64]{1,0} fusion(%x, %x), kind=kCustom, calls=%gemm_computation, metadata={op_name="jit(<lambda>)/transpose(jvp(Bench))/model/layer_3/mlp/dot_general"}, backend_config={"fusion_backend_config":{"kind":"__triton_gemm","triton_gemm_config":{"block_m":"64"}}}
  %custom-call.2 = (bf16[4,8,2,64]{3,2,1,0}, u8[0]{0}) custom-call(%x, %x, %x), custom_call_target="__cudnn$fmhaSoftmax", metadata={op_name="jit(<lambda>)/jvp(Bench)/model/layer_2/attention/dot_product_attention"}
  %loop_select_fusion = bf16[64,64]{1,0} fusion(%x), kind=kLoop, calls=%fused_dropout
  %input_reduce_fusion = f32[64]{0} fusion(%x), kind=kInput, calls=%fused_reduce, metadata={op_name="jit(<lambda>)/jvp(Bench)/model/norm/reduce_sum"}
  %while.1 = (s32[], f32[8]{0}) while(%x), condition=%cond, body=%body
  %all-reduce.1 = f32[8]{0} all-reduce(%x), replica_groups={}, to_apply=%add_f32, metadata={op_name="jit(<lambda>)/add"}
  ROOT %transpose.1 = f32[8]{0} transpose(%x), dimensions={0}, metadata={op_name="jit(<lambda>)/mul"}
}
"""


def test_parse_hlo_reads_opcodes_calls_targets_and_metadata():
    ops = profile.parse_hlo(GPU_HLO)
    assert ops["custom-call.1"].opcode == "custom-call"
    assert ops["custom-call.1"].target == "__cublas$gemm"
    assert ops["gemm_fusion_dot.3"].backend_kind == "__triton_gemm"
    assert ops["gemm_fusion_dot.3"].calls == ("gemm_computation",)
    assert ops["while.1"].calls == ("cond", "body")  # tuple-typed result parsed
    assert ops["copy.7"].computation == "body" and ops["copy.7"].opcode == "copy"
    assert ops["reduce.1"].calls == ("add_f32",)
    assert ops["dot.3"].op_name.endswith("layer_3/mlp/dot_general")
    assert ops["loop_select_fusion"].op_name == ""


def test_categories_of_gpu_ops():
    ops = profile.parse_hlo(GPU_HLO)
    computations = profile._by_computation(ops)

    def category(name: str) -> str:
        return profile.categorize(ops[name], computations)

    assert category("custom-call.1") == "matmul"
    assert category("gemm_fusion_dot.3") == "matmul"
    assert category("custom-call.2") == "attention (fused kernel)"
    assert category("loop_select_fusion") == "rng/dropout"
    assert category("input_reduce_fusion") == "reduction"
    assert category("copy.7") == "copy/transpose"
    assert category("all-reduce.1") == "collective"
    assert category("while.1") == "control flow"
    for code, want in (("copy-done", "copy/transpose"), ("all-reduce-done", "collective")):
        assert profile.categorize(profile.HloOp("x", code, "main"), computations) == want
    # A nested annotation names the innermost op the module has.
    assert profile._resolve("while.1::loop_select_fusion", ops) == "loop_select_fusion"
    assert profile._resolve("gone.1::gone.2", ops) == "gone.1::gone.2"


# Pallas kernels as they compile for an NVIDIA GPU: Triton custom calls (the ir abridged),
# named in their backend_config.
TRITON_HLO = r"""
ENTRY %main.2 (q: bf16[2,64,2,32]) -> bf16[2,64,2,32] {
  %q.1 = bf16[2,64,2,32]{3,2,1,0} parameter(0)
  %pallas_call.11 = (bf16[2,64,2,32]{3,2,1,0}, f32[2,2,64]{2,1,0}) custom-call(%q.1, %q.1, %q.1), custom_call_target="__gpu$xla.gpu.triton", operand_layout_constraints={bf16[2,64,2,32]{3,2,1,0}, bf16[2,64,2,32]{3,2,1,0}, bf16[2,64,2,32]{3,2,1,0}}, api_version=API_VERSION_TYPED_FFI, metadata={op_name="jit(f)/jvp()/cond/branch_0_fun/attention_forward/pallas_call" scheduling_name="pallas_call.11" stack_frame_id=9}, backend_config={debug = false, grid_x = 2 : i32, grid_y = 2 : i32, grid_z = 1 : i32, ir = "ML\EFR\0DMLIR23.0.0git\00\01]\09\22lstm\22\00reduce_max:\00reduce_max\00\05\86\02", name = "attention_forward", num_stages = 2 : i32, num_warps = 4 : i32}
  %pallas_call.14 = (bf16[2,64,2,32]{3,2,1,0}, bf16[2,64,2,32]{3,2,1,0}) custom-call(%q.1, %q.1), custom_call_target="__gpu$xla.gpu.triton", api_version=API_VERSION_TYPED_FFI, metadata={op_name="jit(step)/transpose(jvp(Bert))/encoder/layer_0/attention/pallas_call"}, backend_config={debug = false, grid_x = 2 : i32, grid_y = 2 : i32, grid_z = 1 : i32, ir = "ML\EFR\0D\00dot_general\00", name = "attention_backward_dkdv", num_stages = 2 : i32, num_warps = 4 : i32}
  %pallas_call.20 = (bf16[2,64,2,32]{3,2,1,0}) custom-call(%q.1), custom_call_target="__gpu$xla.gpu.triton", api_version=API_VERSION_TYPED_FFI, metadata={op_name="jit(step)/jvp(LSTMClassifier)/lstm/lstm_forward/pallas_call"}, backend_config={debug = false, grid_x = 1 : i32, grid_y = 1 : i32, grid_z = 1 : i32, ir = "ML\EFR\0D\00attention\00", name = "lstm_forward", num_stages = 1 : i32, num_warps = 4 : i32}
  %pallas_call.21 = (bf16[2,64,2,32]{3,2,1,0}) custom-call(%q.1), custom_call_target="__gpu$xla.gpu.triton", metadata={op_name="jit(step)/transpose(jvp(Bert))/encoder/layer_0/attention/attention_backward_dq"}
  ROOT %pallas_call.22 = (bf16[2,64,2,32]{3,2,1,0}) custom-call(%q.1), custom_call_target="__gpu$xla.gpu.triton", backend_config={ir = "\00", name = "my_kernel"}
}
"""


def test_pallas_kernels_are_categorised_by_their_names():
    """Every Pallas kernel is the same Triton custom-call target: the kernel's name says
    what it computes (attention or LSTM), whatever the layer it sits in."""
    ops = profile.parse_hlo(TRITON_HLO)
    computations = profile._by_computation(ops)
    assert ops["pallas_call.11"].kernel == "attention_forward"
    assert ops["pallas_call.20"].kernel == "lstm_forward"
    assert ops["pallas_call.21"].kernel == ""  # no backend_config: the source names it

    def category(name: str) -> str:
        return profile.categorize(ops[name], computations)

    assert category("pallas_call.11") == "attention (fused kernel)"
    assert category("pallas_call.14") == "attention (fused kernel)"
    assert category("pallas_call.20") == "rnn (Pallas)"
    assert category("pallas_call.21") == "attention (fused kernel)"
    assert category("pallas_call.22") == "custom-call __gpu$xla.gpu.triton"


@pytest.mark.parametrize(
    "op_name, expected",
    [
        (
            "jit(f)/jvp(M)/m/layer_11/attention/query/dot_general",
            ("forward", "m/layer_*/attention/query"),
        ),
        ("jit(f)/transpose(jvp(M))/m/layers_2/mlp/dot_general", ("backward", "m/layers_*/mlp")),
        (
            "jit(f)/jvp(M)/enc/Dropout_0/jit(_bernoulli)/jit(_uniform)/xor",
            ("forward", "enc/Dropout_0"),
        ),
        ("jit(f)/jvp(M)/lstm/while/body/closed_call/add", ("forward", "lstm")),
        (
            "jit(f)/transpose(jvp(M))/enc/while/body/closed_call/layers/layers/attention/value/add",
            ("backward", "enc/layers/attention/value"),
        ),
        ("jit(f)/mul", ("update", "")),
        ("", ("unknown", "")),
    ],
)
def test_place(op_name, expected):
    assert profile.place(op_name) == expected


def test_summarize_attributes_every_microsecond():
    ops = profile.parse_hlo(GPU_HLO)
    events = [
        ("jit__lambda", "custom-call.1", 3e-3),
        ("jit__lambda", "custom-call.1", 1e-3),  # two kernels of one op
        ("jit__lambda", "loop_select_fusion", 2e-3),
        ("jit__lambda", "input_reduce_fusion", 1e-3),
        ("jit__lambda", "copy.7", 1e-3),
        ("jit__lambda", "not-in-hlo.1", 2e-3),
        ("jit__lambda", "while.1", 4e-3),  # encloses its body's events (copy.7): not added
        ("jit_other", "x", 0.5e-3),  # another module: not counted
    ]
    s = profile.summarize(events, ops, steps=2)
    assert s["module"] == "jit__lambda"
    assert s["op_ms_per_step"] == pytest.approx(5.0)
    assert s["control_flow_ms_per_step"] == pytest.approx(2.0)
    by_category = {r["name"]: r["ms_per_step"] for r in s["by_category"]}
    assert by_category == pytest.approx(
        {
            "matmul": 2.0,
            "rng/dropout": 1.0,
            "reduction": 0.5,
            "copy/transpose": 0.5,
            "unknown (not in the HLO)": 1.0,
        }
    )
    assert sum(r["pct"] for r in s["by_category"]) == pytest.approx(100.0)
    by_place = {r["name"]: r["ms_per_step"] for r in s["by_place"]}
    assert by_place["forward  model/layer_*/attention/query"] == pytest.approx(2.0)
    # A fusion without metadata takes its place from the ops inside it.
    assert by_place["forward  model/layer_*/Dropout_0"] == pytest.approx(1.0)
    assert s["top_ops"][0]["op"] == "custom-call.1"
    text = profile.format_summary({"title": "t", "step_ms": 5.5, **s})
    assert "matmul" in text and "custom-call.1" in text


def test_profile_of_a_real_cpu_step(tmp_path):
    """The CLI end to end on the CPU: a row with compile time, and the profile files."""
    out, prof = tmp_path / "rows.json", tmp_path / "prof"
    env = dict(os.environ)
    env["XLA_FLAGS"] = " ".join(
        f for f in env.get("XLA_FLAGS", "").split() if "force_host_platform_device_count" not in f
    )
    env["JAX_PLATFORMS"] = "cpu"
    args = ["--suite", "cpu", "--only", "mnist_cnn", "--steps", "2", "--windows", "2"]
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", *args, "--profile", str(prof), "--json", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    [row] = json.loads(out.read_text())["rows"]
    assert 0 < row["compile_s"] < row["first_step_s"]
    assert row["profile"] == str(prof / "mnist_cnn")
    summary = json.loads((prof / "mnist_cnn" / "summary.json").read_text())
    assert "error" not in summary, summary.get("error")
    assert summary["source"] == "host (XLA CPU runtime, device 0)"
    assert (prof / "mnist_cnn" / "step.hlo.txt").read_text().startswith("HloModule")
    assert summary["cost"]["flops"] > 0 and summary["memory"]["temp_size_in_bytes"] > 0
    assert summary["op_ms_per_step"] > 0
    categories = {r["name"] for r in summary["by_category"]}
    assert "convolution" in categories
    assert sum(r["pct"] for r in summary["by_category"]) == pytest.approx(100.0)
    places = {r["name"] for r in summary["by_place"]}
    assert any(p.startswith("forward  Conv_") for p in places), places
    assert any(p.startswith("backward  Conv_") for p in places), places
    assert (prof / "mnist_cnn" / "summary.txt").read_text().startswith("# mnist_cnn")
