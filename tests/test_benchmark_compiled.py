"""`python -m benchmarks.compiled`: the HLO accounting (on CPU-compiled programs, whose
answers are known) and compilation for a GPU without one (where jax's CUDA plugin is
installed)."""

from __future__ import annotations

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


def test_a_missing_cuda_plugin_is_named(monkeypatch):
    monkeypatch.setattr(compiled, "cuda_plugin", lambda: None)
    with pytest.raises(SystemExit, match=r'needs jax\'s CUDA plugin.*pip install "jax\[cuda13\]"'):
        compiled.main(["--only", "mnist_cnn"])


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
