# ruff: noqa: E501  (the HLO text is kept as XLA prints it, one instruction per line)
"""`python -m benchmarks.compiled`: the HLO accounting (on CPU-compiled programs, whose
answers are known) and compilation for a GPU without one (where jax's CUDA plugin is
installed)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import pytest

from benchmarks import compiled, specs


def _hlo(fn, *args) -> str:
    return jax.jit(fn).lower(*args).compile().as_text()


def test_kernels_bytes_and_flops_of_a_known_program():
    hlo = _hlo(lambda a, b: jnp.tanh(a @ b) * 2, jnp.ones((64, 32)), jnp.ones((32, 16)))
    stats = compiled.analyze_hlo(hlo, top=5)
    assert (stats["kernels"], stats["matmuls"], stats["custom"]) == (2, 1, 0)
    matmul_io = (64 * 32 + 32 * 16 + 64 * 16) * 4  # both operands and the result
    elementwise_io = 2 * 64 * 16 * 4
    assert stats["kernel_io_gb"] * 1e9 == pytest.approx(matmul_io + elementwise_io)
    assert stats["matmul_tflop"] * 1e12 == pytest.approx(2 * 64 * 32 * 16)
    assert stats["f32_matmul_tflop"] == stats["matmul_tflop"]  # float32 operands
    assert stats["top"] == [("dot_general", matmul_io, 1), ("mul", elementwise_io, 1)]


_TWO_DOTS = """HloModule m

ENTRY %main (a: bf16[8,32], b: bf16[32,16], c: f32[8,32], d: f32[32,8]) -> (f32[8,16], f32[8,8]) {
  %a = bf16[8,32]{1,0} parameter(0)
  %b = bf16[32,16]{1,0} parameter(1)
  %c = f32[8,32]{1,0} parameter(2)
  %d = f32[32,8]{1,0} parameter(3)
  %x = f32[8,16]{1,0} dot(%a, %b), lhs_contracting_dims={1}, rhs_contracting_dims={0}
  %y = f32[8,8]{1,0} dot(%c, %d), lhs_contracting_dims={1}, rhs_contracting_dims={0}
  ROOT %t = (f32[8,16]{1,0}, f32[8,8]{1,0}) tuple(%x, %y)
}
"""


def test_float32_matmul_flops_are_those_of_dots_with_a_float32_operand():
    stats = compiled.analyze_hlo(_TWO_DOTS)
    assert stats["matmul_tflop"] * 1e12 == pytest.approx(2 * 8 * 32 * (16 + 8))
    assert stats["f32_matmul_tflop"] * 1e12 == pytest.approx(2 * 8 * 32 * 8)


def test_loops_count_every_iteration_and_only_the_slices_they_touch():
    def f(x):
        def body(c, xt):
            c = jnp.tanh(c * xt)
            return c, c

        return jax.lax.scan(body, jnp.ones(64), x)[1]

    stats = compiled.analyze_hlo(_hlo(f, jnp.ones((10, 64))), top=10)
    top = {name: (size, count) for name, size, count in stats["top"]}
    # Each of the 10 steps: reads the carry and one row of x (not all of x) and the step
    # index, writes the new carry.
    assert top["while/body/closed_call/tanh"] == (10 * (3 * 64 * 4 + 4), 10)
    # Writing the step's output row in place costs the row, not the [10, 64] buffer.
    size, count = top["while/body/jit(dynamic_update_index_in_dim)/dynamic_update_slice"]
    assert count == 10 and size < 10 * 10 * 64 * 4
    assert stats["kernels"] >= 30 and "note" not in stats


_SLICE_OF_A_BITCAST = """HloModule m

%fused (p0: f32[8,4]) -> f32[2,4,2] {
  %p0 = f32[8,4]{1,0} parameter(0)
  %b = f32[2,4,4]{2,1,0} bitcast(%p0)
  %s = f32[2,4,2]{2,1,0} slice(%b), slice={[0:2], [0:4], [0:2]}
  ROOT %n = f32[2,4,2]{2,1,0} negate(%s)
}

ENTRY %main (a: f32[8,4]) -> f32[2,4,2] {
  %a = f32[8,4]{1,0} parameter(0)
  ROOT %f = f32[2,4,2]{2,1,0} fusion(%a), kind=kLoop, calls=%fused
}
"""


def test_a_slice_read_through_a_bitcast_counts_the_slice():
    stats = compiled.analyze_hlo(_SLICE_OF_A_BITCAST)
    assert stats["kernels"] == 1
    assert stats["kernel_io_gb"] * 1e9 == pytest.approx(2 * (2 * 4 * 2 * 4))  # half of [8, 4]


_SLICE_AFTER_ELEMENTWISE = """HloModule m

%fused (p0: u16[4,8,2], p1: f32[8,2]) -> f32[8,2] {
  %p0 = u16[4,8,2]{2,1,0} parameter(0)
  %t = u16[] constant(7)
  %tb = u16[4,8,2]{2,1,0} broadcast(%t), dimensions={}
  %c = pred[4,8,2]{2,1,0} compare(%p0, %tb), direction=GE
  %s = pred[1,8,2]{2,1,0} slice(%c), slice={[1:2], [0:8], [0:2]}
  %b = pred[8,2]{1,0} bitcast(%s)
  %p1 = f32[8,2]{1,0} parameter(1)
  %z = f32[8,2]{1,0} broadcast(f32[] constant(0)), dimensions={}
  ROOT %r = f32[8,2]{1,0} select(%b, %p1, %z)
}

ENTRY %main (a: u16[4,8,2], x: f32[8,2]) -> f32[8,2] {
  %a = u16[4,8,2]{2,1,0} parameter(0)
  %x = f32[8,2]{1,0} parameter(1)
  ROOT %f = f32[8,2]{1,0} fusion(%a, %x), kind=kLoop, calls=%fused
}
"""


def test_a_slice_after_elementwise_operations_counts_the_slice():
    """(As a layer's dropout mask compared and sliced out of the masks of all layers.)"""
    stats = compiled.analyze_hlo(_SLICE_AFTER_ELEMENTWISE)
    assert stats["kernels"] == 1
    # A quarter of the u16 masks (2 x 32 bytes of 128), the input and the output.
    assert stats["kernel_io_gb"] * 1e9 == pytest.approx(32 + 64 + 64)


_ONE_ARRAY_THRICE = """HloModule m

ENTRY %main (a: f32[8,4], b: f32[2]) -> f32[8,4] {
  %a = f32[8,4]{1,0} parameter(0)
  %b = f32[2]{0} parameter(1)
  ROOT %k = f32[8,4]{1,0} custom-call(%b, %a, %a, %a), custom_call_target="kernel"
}
"""


def test_an_array_passed_to_a_kernel_several_times_is_read_once():
    """(As a packed query/key/value array passed to the fused attention kernels.)"""
    stats = compiled.analyze_hlo(_ONE_ARRAY_THRICE)
    assert stats["kernels"] == 1
    assert stats["kernel_io_gb"] * 1e9 == pytest.approx(4 * (2 + 32 + 32))


_TRANSPOSES = """HloModule m

%moved (p0: f32[8,4]) -> f32[4,8] {
  %p0 = f32[8,4]{1,0} parameter(0)
  %t = f32[4,8]{1,0} transpose(%p0), dimensions={1,0}
  ROOT %n = f32[4,8]{1,0} negate(%t)
}

%matmul (p0: f32[8,4], p1: f32[8,2]) -> f32[4,2] {
  %p0 = f32[8,4]{1,0} parameter(0)
  %p1 = f32[8,2]{1,0} parameter(1)
  %t = f32[4,8]{1,0} transpose(%p0), dimensions={1,0}
  ROOT %d = f32[4,2]{1,0} dot(%t, %p1), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}

%kept (p0: f32[8,4]) -> f32[8,4] {
  %p0 = f32[8,4]{1,0} parameter(0)
  ROOT %n = f32[8,4]{1,0} negate(%p0)
}

ENTRY %main (a: f32[8,4], b: f32[8,2]) -> (f32[4,8], f32[4,2], f32[8,4], f32[4,8]) {
  %a = f32[8,4]{1,0} parameter(0)
  %b = f32[8,2]{1,0} parameter(1)
  %f = f32[4,8]{1,0} fusion(%a), kind=kLoop, calls=%moved
  %g = f32[4,2]{1,0} fusion(%a, %b), kind=kCustom, calls=%matmul
  %h = f32[8,4]{1,0} fusion(%a), kind=kLoop, calls=%kept
  %t = f32[4,8]{1,0} transpose(%a), dimensions={1,0}
  ROOT %r = (f32[4,8]{1,0}, f32[4,2]{1,0}, f32[8,4]{1,0}, f32[4,8]{1,0}) tuple(%f, %g, %h, %t)
}
"""


def test_transposing_io_is_that_of_the_kernels_that_transpose_but_matmuls():
    stats = compiled.analyze_hlo(_TRANSPOSES)
    assert (stats["kernels"], stats["matmuls"]) == (4, 1)
    # The transposing fusion and the bare transpose: each reads and writes 32 floats. The
    # matmul reading its operand transposed and the plain negation do not count.
    assert stats["transpose_gb"] * 1e9 == pytest.approx(2 * (2 * 32 * 4))
    assert stats["kernel_io_gb"] > stats["transpose_gb"]


def test_a_conditional_counts_its_largest_branch():
    """(As `optim.accumulate` applying the optimizer's update under a `lax.cond`.)"""

    def f(p, a, b):
        return jax.lax.cond(p, lambda: a @ b, lambda: (a @ b) * 2)

    stats = compiled.analyze_hlo(_hlo(f, True, jnp.ones((16, 16)), jnp.ones((16, 16))))
    assert stats["matmuls"] == 1  # the dot of one branch
    assert stats["matmul_tflop"] * 1e12 == pytest.approx(2 * 16**3)
    assert stats["kernels"] == 3  # the predicate's conversion, then the dot and the product
    assert stats["note"] == "1 conditional(s): the largest branch counted"


# Each number counts its largest branch: the FLOPs of one branch, the kernels and I/O of the
# other (the older true_computation/false_computation form).
_TWO_BRANCHES = """HloModule m

%matmul (t0: (bf16[8,32], bf16[32,16])) -> bf16[8,16] {
  %t0 = (bf16[8,32]{1,0}, bf16[32,16]{1,0}) parameter(0)
  %a = bf16[8,32]{1,0} get-tuple-element(%t0), index=0
  %b = bf16[32,16]{1,0} get-tuple-element(%t0), index=1
  ROOT %d = bf16[8,16]{1,0} dot(%a, %b), lhs_contracting_dims={1}, rhs_contracting_dims={0}, metadata={op_name="jit(f)/dot_general"}
}

%elementwise (t1: (bf16[8,32], bf16[32,16])) -> bf16[8,16] {
  %t1 = (bf16[8,32]{1,0}, bf16[32,16]{1,0}) parameter(0)
  %b.1 = bf16[32,16]{1,0} get-tuple-element(%t1), index=1
  %n = bf16[32,16]{1,0} negate(%b.1), metadata={op_name="jit(f)/neg"}
  ROOT %s = bf16[8,16]{1,0} slice(%n), slice={[0:8], [0:16]}, metadata={op_name="jit(f)/slice"}
}

ENTRY %main (p: pred[], a: bf16[8,32], b: bf16[32,16]) -> bf16[8,16] {
  %p = pred[] parameter(0)
  %a.2 = bf16[8,32]{1,0} parameter(1)
  %b.2 = bf16[32,16]{1,0} parameter(2)
  %t = (bf16[8,32]{1,0}, bf16[32,16]{1,0}) tuple(%a.2, %b.2)
  ROOT %c = bf16[8,16]{1,0} conditional(%p, %t, %t), true_computation=%matmul, false_computation=%elementwise
}
"""


def test_each_number_of_a_conditional_takes_its_largest_branch():
    stats = compiled.analyze_hlo(_TWO_BRANCHES, top=5)
    assert (stats["kernels"], stats["matmuls"]) == (2, 1)
    assert stats["matmul_tflop"] * 1e12 == pytest.approx(2 * 8 * 32 * 16)
    matmul_io = 2 * (8 * 32 + 32 * 16 + 8 * 16)
    negate_io, slice_io = 2 * 2 * 32 * 16, 2 * (32 * 16 + 8 * 16)
    assert stats["kernel_io_gb"] * 1e9 == pytest.approx(negate_io + slice_io)
    assert sorted(stats["top"]) == sorted(
        [("dot_general", matmul_io, 1), ("neg", negate_io, 1), ("slice", slice_io, 1)]
    )


# cuBLAS GEMMs as XLA's GPU compiler writes them (an H200, deviceless, Triton GEMMs off), and
# the older cuBLAS target: (result, s8[workspace]), dimension numbers in backend_config.
_CUBLAS = """HloModule m

ENTRY %main (a.1: bf16[4096,768], b.1: bf16[768,3072], c.1: f32[96,128,64], d.1: f32[96,64,128]) -> (bf16[4096,3072], f32[96,128,128]) {
  %a.1 = bf16[4096,768]{1,0} parameter(0)
  %b.1 = bf16[768,3072]{1,0} parameter(1)
  %c.1 = f32[96,128,64]{2,1,0} parameter(2)
  %d.1 = f32[96,64,128]{2,1,0} parameter(3)
  %custom-call.1 = (bf16[4096,3072]{1,0}, s8[4194304]{0}) custom-call(%a.1, %b.1), custom_call_target="__cublas$lt$matmul", metadata={op_name="jit(<lambda>)/dot_general" scheduling_name="custom-call.1" stack_frame_id=2}, backend_config={"operation_queue_id":"0","gemm_backend_config":{"selected_algorithm":"0","alpha_real":1,"beta":0,"dot_dimension_numbers":{"lhs_contracting_dimensions":["1"],"rhs_contracting_dimensions":["0"],"lhs_batch_dimensions":[],"rhs_batch_dimensions":[]},"alpha_imag":0,"precision_config":{"operand_precision":["DEFAULT","DEFAULT"],"algorithm":"ALG_UNSET"},"epilogue":"DEFAULT","lhs_stride":"3145728","rhs_stride":"2359296","grad_x":false,"grad_y":false,"damax_output":false,"autotune_workspace_size":"4194304","scale_mode":0},"force_earliest_schedule":false,"reification_cost":[],"device_type":"DEVICE_TYPE_INVALID"}
  %gte.1 = bf16[4096,3072]{1,0} get-tuple-element(%custom-call.1), index=0
  %custom-call.2 = (f32[96,128,128]{2,1,0}, s8[4194304]{0}) custom-call(%c.1, %d.1), custom_call_target="__cublas$gemm", metadata={op_name="jit(<lambda>)/bij,bjk->bik/dot_general"}, backend_config={"operation_queue_id":"0","gemm_backend_config":{"alpha_real":1,"beta":0,"dot_dimension_numbers":{"lhs_contracting_dimensions":["2"],"rhs_contracting_dimensions":["1"],"lhs_batch_dimensions":["0"],"rhs_batch_dimensions":["0"]},"alpha_imag":0,"epilogue":"DEFAULT"}}
  %gte.2 = f32[96,128,128]{2,1,0} get-tuple-element(%custom-call.2), index=0
  ROOT %r = (bf16[4096,3072]{1,0}, f32[96,128,128]{2,1,0}) tuple(%gte.1, %gte.2)
}
"""


def test_cublas_gemms_count_their_flops_and_not_their_workspace():
    stats = compiled.analyze_hlo(_CUBLAS)
    assert (stats["kernels"], stats["matmuls"], stats["custom"]) == (2, 2, 0)
    bf16_flops, f32_flops = 2 * 4096 * 3072 * 768, 2 * 96 * 128 * 128 * 64
    assert stats["matmul_tflop"] * 1e12 == pytest.approx(bf16_flops + f32_flops)
    assert stats["f32_matmul_tflop"] * 1e12 == pytest.approx(f32_flops)
    bf16_io = 2 * (4096 * 768 + 768 * 3072 + 4096 * 3072)
    f32_io = 4 * 96 * (128 * 64 + 64 * 128 + 128 * 128)
    assert stats["kernel_io_gb"] * 1e9 == pytest.approx(bf16_io + f32_io)  # no 2 x 4 MiB


def test_gpu_attention_choices_follow_the_automatic_rule():
    """Off a GPU the automatic choice is the explicit path; on an NVIDIA GPU it would be
    cuDNN for half-precision inputs that need nothing the explicit path alone has."""
    from jaxmodels import attention

    q = jnp.ones((1, 8, 1, 16), jnp.bfloat16)
    f = jax.jit(attention.dot_product_attention, static_argnames=("causal", "implementation"))
    with compiled.gpu_attention_choices() as choices:
        out = f(q, q, q, causal=True)
        jax.eval_shape(f, q.astype(jnp.float32), q, q)
        jax.eval_shape(
            lambda q: attention.dot_product_attention(
                q, q, q, dropout_rate=0.1, deterministic=False, dropout_rng=jax.random.key(0)
            ),
            q,
        )
        jax.eval_shape(functools.partial(f, implementation="xla"), q, q, q)
    assert choices == ["cudnn", "xla", "xla"]  # "xla" asked for: no automatic choice
    expected = f(q, q, q, causal=True, implementation="xla")
    assert jnp.array_equal(out, expected)  # the call itself kept this host's path
    assert attention._auto_implementation(q, q, False) == "xla"  # restored


@pytest.mark.parametrize(
    "name, impl, cudnn",
    [
        ("transformer_lm", "", True),
        ("bert_base", "no_attn_dropout", True),
        ("bert_base", "", False),
    ],
)
def test_steps_whose_attention_a_gpu_would_run_in_cudnn(name, impl, cudnn):
    """Lowered on a host without a GPU, attention's automatic choice is the explicit path;
    the causal LM and BERT without attention dropout would get cuDNN's on the GPU, BERT's
    recipe (attention dropout 0.1) the explicit path there too (tiny sizes, for the CPU)."""
    (w,) = specs.suite("cpu", [name])
    _, cudnn_attention = compiled.lower_step(w, impl, jax.devices()[:1], {})
    assert (cudnn_attention > 0) is cudnn


def test_a_row_says_where_a_gpu_would_run_cudnn_attention(monkeypatch):
    program = jax.jit(lambda x: x + 1).lower(1.0).compile()
    (w,) = specs.suite("gpu", ["transformer_lm"])
    for calls, noted in ((2, True), (0, False)):
        monkeypatch.setattr(compiled, "compile_step", lambda *args, n=calls: (program, 1.0, n))
        note = compiled.row(w, "", "h200", {}, top=0)["note"]
        assert ("the explicit path, where a GPU run uses cuDNN's fused one" in note) is noted


def test_a_missing_cuda_plugin_is_named(monkeypatch):
    monkeypatch.setattr(compiled, "cuda_plugin", lambda: None)
    with pytest.raises(SystemExit, match=r'needs jax\'s CUDA plugin.*pip install "jax\[cuda13\]"'):
        compiled.main(["--only", "mnist_cnn"])


def test_outputs_that_cannot_be_written_are_refused_before_compiling(tmp_path, monkeypatch):
    """Was: a traceback after every workload had been compiled (--json a folder), or at the
    first row (--hlo a file)."""
    monkeypatch.setattr(compiled, "_plugin_versions", lambda: pytest.fail("compiling started"))
    (tmp_path / "afile").write_text("")
    with pytest.raises(SystemExit, match=f"--json {tmp_path} is a folder"):
        compiled.main(["--only", "mnist_cnn", "--json", str(tmp_path)])
    with pytest.raises(SystemExit, match=f"--hlo {tmp_path}/afile is a file"):
        compiled.main(["--only", "mnist_cnn", "--hlo", str(tmp_path / "afile")])


def test_an_implementation_no_workload_has_is_named(monkeypatch):
    monkeypatch.setattr(compiled, "_plugin_versions", lambda: ((13, 0), (9, 12)))
    with pytest.raises(SystemExit, match=r"--impls \['palas'\]: none of these workloads"):
        compiled.main(["--only", "bert_base", "--impls", "default", "palas"])


@pytest.mark.skipif(
    compiled.cuda_plugin() is None, reason="needs jax's CUDA plugin (compiles without a GPU)"
)
def test_compiles_the_fused_lstm_kernels_for_an_h200_without_one():
    (w,) = specs.suite("gpu", ["lstm_article"])
    fused = compiled.row(w, "pallas", "h200", {}, top=3)
    scan = compiled.row(w, "scan", "h200", {}, top=3)
    assert fused["custom"] == 4  # forward and backward kernels of both layers
    assert "lstm_forward" in fused["hlo"] and "__gpu$xla.gpu.triton" in fused["hlo"]
    assert scan["custom"] == 0 and scan["kernels"] > fused["kernels"]
    # The scan's loops: every time step's kernels and recurrent matmuls are counted (the
    # fused kernels' own matmuls are not: they are custom calls).
    assert scan["kernels"] > 100 * 2 * 2 and scan["matmul_tflop"] > fused["matmul_tflop"]
    assert 0 < fused["temp_gib"] < scan["temp_gib"]
    assert 'device_description_str: "NVIDIA H200"' in compiled.target_config("h200")
