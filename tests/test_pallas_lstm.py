"""The LSTM's fused Pallas kernels: the scan path's numbers (on CPU through Pallas's
interpreter), and kernels that lower to Triton for an NVIDIA GPU (checked here without one)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxmodels import pallas_lstm, rnn

B, T, F, H = 20, 7, 5, 16  # a batch that is not a whole number of kernel blocks


def _data(seed=0):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.normal(size=(B, T, F)), jnp.float32)
    lengths = jnp.asarray(rng.integers(1, T + 1, B), jnp.int32)
    return x, lengths


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("bidirectional", [False, True])
def test_pallas_backend_equals_scan_forward_and_gradients(dtype, bidirectional):
    x, lengths = _data()
    scan = rnn.LSTM(H, 2, bidirectional, backend="scan", dtype=jnp.dtype(dtype))
    fused = scan.clone(backend="pallas")
    params = nn.meta.unbox(scan.init(jax.random.key(0), x, lengths))
    rng = np.random.default_rng(1)
    state = tuple(
        jnp.asarray(rng.normal(size=(2 * (1 + bidirectional), B, H)), jnp.float32) for _ in range(2)
    )
    ys_weight = jnp.asarray(rng.normal(size=(B, T, H * (1 + bidirectional))), jnp.float32)

    def loss(model, params, x, state):
        ys, (h, c) = model.apply(params, x, lengths, state)
        return jnp.sum(ys.astype(jnp.float32) * ys_weight) + jnp.sum(jnp.sin(h)) + jnp.sum(c**2)

    want = jax.jit(jax.value_and_grad(lambda *a: loss(scan, *a), argnums=(0, 1, 2)))
    got = jax.jit(jax.value_and_grad(lambda *a: loss(fused, *a), argnums=(0, 1, 2)))
    (want_loss, want_grads), (got_loss, got_grads) = want(params, x, state), got(params, x, state)
    tol = 1e-5 if dtype == "float32" else 1e-3  # the same arithmetic; bf16 rounding differs
    np.testing.assert_allclose(got_loss, want_loss, rtol=tol)
    for a, b in zip(jax.tree.leaves(got_grads), jax.tree.leaves(want_grads), strict=True):
        assert a.dtype == b.dtype
        scale = float(jnp.max(jnp.abs(b))) + 1e-6
        assert float(jnp.max(jnp.abs(a - b))) <= 10 * tol * scale
    outputs = (fused.apply(params, x, lengths), scan.apply(params, x, lengths))
    for a, b in zip(*map(jax.tree.leaves, outputs), strict=True):
        np.testing.assert_allclose(
            np.asarray(a, np.float32), np.asarray(b, np.float32), atol=tol, rtol=tol
        )


def test_sharded_batch_runs_per_shard_and_equals_one_device():
    """Batch split over 8 devices: the kernels run per shard (no all-gather) and the loss and
    gradients equal one device's."""
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from jaxmodels import sharding, training

    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.normal(size=(32, T, F)), jnp.float32)
    lengths = jnp.asarray(rng.integers(1, T + 1, 32), jnp.int32)
    model = rnn.LSTM(H, 2, backend="pallas")
    params = nn.meta.unbox(model.init(jax.random.key(0), x, lengths))

    def loss(params, x, lengths):
        ys, (h, c) = model.apply(params, x, lengths)
        return jnp.sum(ys**2) + jnp.sum(h) + jnp.sum(c)

    step = jax.jit(jax.value_and_grad(loss))
    want = step(params, x, lengths)
    mesh = sharding.make_mesh(data=8)
    batch = NamedSharding(mesh, P(("data", "fsdp")))
    args = (params, jax.device_put(x, batch), jax.device_put(lengths, batch))
    with training.mesh_context(mesh, sharding.logical_rules("data")):
        got = step(*args)
        hlo = step.lower(*args).compile().as_text()
    assert "all-gather" not in hlo
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_classifier_trains_with_the_pallas_backend():
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 50, (B, T)), jnp.int32)
    lengths = jnp.full((B,), T, jnp.int32)
    model = rnn.LSTMClassifier(50, 8, H, 2, 3, backend="pallas")
    params = model.init(jax.random.key(0), tokens, lengths)
    ref = model.clone(backend="scan")
    np.testing.assert_allclose(
        model.apply(params, tokens, lengths), ref.apply(params, tokens, lengths), atol=1e-5
    )


@pytest.mark.parametrize("hidden", [6, 12, 256])
def test_unsupported_hidden_sizes_are_named(hidden):
    x, lengths = _data()
    with pytest.raises(ValueError, match=rf"powers of two from 16 to 128, got {hidden}; use"):
        rnn.LSTM(hidden, backend="pallas").init(jax.random.key(0), x, lengths)
    assert not pallas_lstm.supported(hidden)


def test_kernels_lower_to_triton_for_an_nvidia_gpu():
    """The article's shape (seq 100, batch 512, 2 x 128, bfloat16), lowered for CUDA on this
    machine: Pallas's Triton lowering accepts every op of both kernels (chosen by the platform
    lowered for; for the CPU, the interpreter)."""
    t, b, h = 100, 512, 128
    dtype = jnp.dtype(jnp.bfloat16)
    zx = jax.ShapeDtypeStruct((t, b, 4 * h), jnp.float32)
    mask = jax.ShapeDtypeStruct((t, b, 1), jnp.bool_)
    state = jax.ShapeDtypeStruct((b, h), jnp.float32)
    wh = jax.ShapeDtypeStruct((h, 4 * h), jnp.float32)
    per_step = jax.ShapeDtypeStruct((t, b, h), jnp.float32)

    def lowered(fn, *args, platform="cuda"):
        return jax.jit(fn).trace(*args).lower(lowering_platforms=(platform,)).as_text()

    forward_args = (zx, mask, state, state, wh)
    forward = lowered(lambda *a: pallas_lstm.forward(*a, dtype=dtype), *forward_args)
    backward = lowered(
        lambda *a: pallas_lstm.backward(*a, dtype=dtype),
        per_step,
        mask,
        per_step,
        zx,
        state,
        state,
        wh,
    )
    for text, name in ((forward, "lstm_forward"), (backward, "lstm_backward")):
        assert "__gpu$xla.gpu.triton" in text and name in text
    on_cpu = lowered(lambda *a: pallas_lstm.forward(*a, dtype=dtype), *forward_args, platform="cpu")
    assert "triton" not in on_cpu


def test_a_jax_without_pallas_triton_is_named(monkeypatch):
    import sys

    import jax.experimental.pallas as pallas_package

    monkeypatch.delattr(pallas_package, "triton", raising=False)
    monkeypatch.setitem(sys.modules, "jax.experimental.pallas.triton", None)
    assert not pallas_lstm.triton_available()
    x = jnp.zeros((2, 4, 4 * H))
    state = jnp.zeros((4, H))
    mask = jnp.ones((2, 4, 1), bool)
    with pytest.raises(RuntimeError, match="need Pallas's Triton backend.*use LSTM backend"):
        pallas_lstm.forward(
            x, mask, state, state, jnp.zeros((H, 4 * H)), jnp.dtype("float32"), interpret=False
        )


@pytest.mark.gpu
@pytest.mark.skipif(not rnn.cudnn_available(), reason="needs an NVIDIA GPU")
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_pallas_kernels_on_the_gpu_equal_scan(dtype):
    x, lengths = _data()
    scan = rnn.LSTM(H, 2, True, backend="scan", dtype=jnp.dtype(dtype))
    fused = scan.clone(backend="pallas")
    params = nn.meta.unbox(scan.init(jax.random.key(0), x, lengths))

    def loss(model, params):
        ys, (h, c) = model.apply(params, x, lengths)
        return jnp.sum(ys.astype(jnp.float32) ** 2) + jnp.sum(h) + jnp.sum(c)

    # TF32 / bfloat16 matmuls on the GPU: compared with a tolerance of that size.
    want, got = (jax.jit(jax.grad(lambda p, m=m: loss(m, p)))(params) for m in (scan, fused))
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        scale = float(jnp.max(jnp.abs(b))) + 1e-6
        assert float(jnp.max(jnp.abs(a - b))) <= 2e-2 * scale
