"""Fused attention with dropout (Pallas): the explicit path's numbers (on CPU through Pallas's
interpreter), its dropout mask, and kernels that lower to Triton for an NVIDIA GPU."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from jaxmodels import attention, bert, pallas_attention

B, T, H, D = 3, 128, 2, 16
LENGTHS = jnp.array([128, 70, 1], jnp.int32)


def _qkv(dtype=jnp.float32, seed=0, q_len=T, kv_len=T):
    rng = np.random.default_rng(seed)
    shapes = [(B, q_len, H, D), (B, kv_len, H, D), (B, kv_len, H, D), (B, q_len, H, D)]
    return tuple(jnp.asarray(rng.normal(size=shape), dtype) for shape in shapes)


def _kernels(q, k, v, bias, packed, lengths, rate, key, **kwargs):
    """The fused kernels on Q, K and V as three arrays (no bias), or packed with `bias`."""
    if packed:
        qkv = jnp.stack([q, k, v], axis=2)
        return pallas_attention.packed_attention(qkv, bias, lengths, rate, key, **kwargs)
    return pallas_attention.attention(q, k, v, lengths, rate, key, **kwargs)


def _reference(q, k, v, lengths, rate, seeds):
    """The explicit computation with the kernels' own dropout mask."""
    q_len, kv_len = q.shape[1], k.shape[1]
    s = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) / np.sqrt(D)
    visible = (jnp.arange(kv_len)[None, :] < lengths[:, None])[:, None, None, :]
    p = jnp.where(visible, jax.nn.softmax(jnp.where(visible, s, -1e30), axis=-1), 0.0)
    if rate:
        threshold = round(rate * 2**16)
        grid = (jnp.arange(n) for n in (B, H, q_len, kv_len))
        b, h, i, j = jnp.meshgrid(*grid, indexing="ij")
        matrix = pallas_attention._matrix(b, h, H)
        counter = pallas_attention._counters(i, j, kv_len)
        keep = pallas_attention.keep_mask(seeds[0], seeds[1], matrix, counter, threshold)
        p = jnp.where(keep, p, 0.0) * (2**16 / (2**16 - threshold))
    return jnp.einsum("bhqk,bkhd->bqhd", p.astype(v.dtype), v, preferred_element_type=jnp.float32)


@pytest.mark.parametrize(
    "rate,q_len,kv_len", [(0.0, T, T), (0.1, T, T), (0.1, 32, 48)], ids=["64", "64-drop", "16"]
)
def test_outputs_and_gradients_equal_the_explicit_computation(rate, q_len, kv_len):
    q, k, v, do = _qkv(q_len=q_len, kv_len=kv_len)
    key = jax.random.key(3)
    seeds = jax.random.bits(key, (2,), jnp.uint32)

    lengths = jnp.minimum(LENGTHS, kv_len)

    def ours(q, k, v):
        return pallas_attention.attention(q, k, v, lengths, rate, key, interpret=True)

    def ref(q, k, v):
        return _reference(q, k, v, lengths, rate, seeds)

    assert pallas_attention.block(kv_len) == (64 if kv_len % 64 == 0 else 16)
    np.testing.assert_allclose(ours(q, k, v), ref(q, k, v), atol=2e-6)
    grads = [
        jax.grad(lambda *a, f=f: jnp.sum(f(*a) * do), argnums=(0, 1, 2))(q, k, v)
        for f in (ours, ref)
    ]
    for a, b in zip(*grads, strict=True):
        np.testing.assert_allclose(a, b, atol=2e-5 * float(jnp.max(jnp.abs(b))))


def test_without_dropout_equals_dot_product_attention_in_bfloat16():
    q, k, v, _ = _qkv(jnp.bfloat16)
    got = attention.dot_product_attention(q, k, v, kv_lengths=LENGTHS, implementation="pallas")
    want = attention.dot_product_attention(q, k, v, kv_lengths=LENGTHS, implementation="xla")
    assert got.dtype == jnp.bfloat16
    np.testing.assert_allclose(
        np.asarray(got, np.float32), np.asarray(want, np.float32), atol=2e-2, rtol=2e-2
    )
    # A sequence with no visible key outputs zeros, as on the explicit path.
    empty = attention.dot_product_attention(
        q, k, v, kv_lengths=jnp.array([5, 0, 3]), implementation="pallas"
    )
    np.testing.assert_array_equal(np.asarray(empty[1], np.float32), 0.0)


def test_dropout_mask_statistics():
    rate = 0.1
    threshold = round(rate * 2**16)
    counter = jnp.arange(1 << 20, dtype=jnp.uint32)
    seeds = jax.random.bits(jax.random.key(0), (2,), jnp.uint32)

    def drops(seeds, matrix):
        keep = pallas_attention.keep_mask(
            seeds[0], seeds[1], jnp.uint32(matrix), counter, threshold
        )
        return 1.0 - np.asarray(keep)

    drop = drops(seeds, 0)
    n = drop.size
    assert abs(drop.mean() - threshold / 2**16) < 5 * np.sqrt(rate * (1 - rate) / n)
    both = (drop[:-1] * drop[1:]).mean()  # neighbours drop independently
    assert abs(both - rate**2) < 5 * np.sqrt(rate**2 / n)
    # Another (batch, head) matrix, or another key: an independent mask.
    for other in (drops(seeds, 1), drops(jax.random.bits(jax.random.key(1), (2,), jnp.uint32), 0)):
        assert abs((drop * other).mean() - rate**2) < 5 * np.sqrt(rate**2 / n)


def test_training_dropout_drops_the_rate_and_keeps_the_mean():
    q = k = jnp.zeros((2, 128, 2, 16))  # uniform attention: each output is a mean of v rows
    v = jnp.ones((2, 128, 2, 16))
    out = pallas_attention.attention(q, k, v, None, 0.5, jax.random.key(0), interpret=True)
    # Each output is (kept rows / 128) / keep: mean 1 over rows, spread by the dropout.
    assert abs(float(out.mean()) - 1.0) < 0.02
    assert float(out.std()) > 0.05
    again = pallas_attention.attention(q, k, v, None, 0.5, jax.random.key(0), interpret=True)
    np.testing.assert_array_equal(out, again)


@pytest.mark.parametrize("rate", [0.0, 0.1])
def test_packed_inputs_with_their_bias_equal_the_separate_ones(rate):
    """`packed_attention` reads Q, K and V from one [batch, length, 3, heads, head_dim] array
    and adds their bias itself: the same outputs, dropout mask and gradients (the bias's
    summed) as `attention` on the three biased arrays."""
    q, k, v, do = _qkv()
    bias = jnp.asarray(np.random.default_rng(7).normal(size=(3, H, D)), jnp.float32)
    key = jax.random.key(3)

    def packed(qkv, bias):
        return pallas_attention.packed_attention(qkv, bias, LENGTHS, rate, key, interpret=True)

    def separate(qkv, bias):
        q, k, v = (qkv[:, :, i] + bias[i] for i in range(3))
        return pallas_attention.attention(q, k, v, LENGTHS, rate, key, interpret=True)

    qkv = jnp.stack([q, k, v], axis=2)
    np.testing.assert_allclose(packed(qkv, bias), separate(qkv, bias), atol=1e-6)
    grads = [
        jax.grad(lambda *a, f=f: jnp.sum(f(*a) * do), argnums=(0, 1))(qkv, bias)
        for f in (packed, separate)
    ]
    for a, b in zip(*grads, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5 * float(jnp.max(jnp.abs(b))))
    with pytest.raises(ValueError, match=r"bias has shape \(2, 16\).*\[3, heads, head_dim\]"):
        pallas_attention.packed_attention(qkv, bias[0])
    with pytest.raises(ValueError, match="one \\[batch, length, 3, heads, head_dim\\] array"):
        pallas_attention.packed_attention(q)


def test_self_attention_gradients_through_the_packed_kernels():
    """MultiHeadAttention's pallas path (packed Q, K, V, bias inside the kernels): the
    parameters' gradients equal the explicit path's."""
    x = jnp.asarray(np.random.default_rng(4).normal(size=(B, T, 32)), jnp.float32)
    layers = [
        attention.MultiHeadAttention(num_heads=H, implementation=impl) for impl in ("pallas", "xla")
    ]
    params = nn.unbox(layers[1].init(jax.random.key(0), x)["params"])

    def loss(params, layer):
        return jnp.sum(jnp.sin(layer.apply({"params": params}, x, kv_lengths=LENGTHS)))

    got, want = (jax.grad(loss)(params, layer) for layer in layers)
    # (The key bias's gradient is 0 up to rounding: it shifts a query's logits all alike.)
    scale = max(float(jnp.max(jnp.abs(b))) for b in jax.tree.leaves(want))
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5 * scale)
    assert float(jnp.max(jnp.abs(got["query"]["bias"]))) > 1e-2  # reached, not zero


@pytest.mark.parametrize("rules", ["data", "fsdp_tp"])
@pytest.mark.parametrize("packed", [False, True], ids=["separate", "packed"])
def test_sharded_kernels_run_per_shard_and_equal_one_device(rules, packed):
    """Batch (and with fsdp_tp heads) split over 8 devices: shard_map runs the kernels on each
    shard, no all-gather, and the outputs, dropout mask included, and the gradients equal one
    device's (Q, K, V as three arrays, or packed in one with a bias whose gradient sums over
    the shards)."""
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from jaxmodels import sharding, training

    q, k, v, do = (x[:, :64] for x in _qkv(seed=2))
    q, k, v, do = (jnp.concatenate([x] * 4)[:8] for x in (q, k, v, do))  # batch 8
    heads_axis = "tensor" if rules == "fsdp_tp" else None
    mesh = sharding.make_mesh(data=4 if heads_axis else 8, tensor=2 if heads_axis else 1)
    key = jax.random.key(5)
    lengths = jnp.array([64, 30, 1, 64, 17, 64, 2, 40])

    bias = jnp.asarray(np.random.default_rng(3).normal(size=(3, H, D)), jnp.float32)

    def loss(q, k, v, bias):
        out = _kernels(q, k, v, bias, packed, lengths, 0.2, key, interpret=True)
        return jnp.sum(out * do), out

    grad = jax.value_and_grad(loss, argnums=(0, 1, 2, 3), has_aux=True)
    want = jax.jit(grad)(q, k, v, bias)
    spec = NamedSharding(mesh, P(("data", "fsdp"), None, heads_axis, None))
    args = [*(jax.device_put(x, spec) for x in (q, k, v)), bias]
    step = jax.jit(grad)
    with training.mesh_context(mesh, sharding.logical_rules(rules)):
        got = step(*args)
        hlo = step.lower(*args).compile().as_text()
    assert "all-gather" not in hlo
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        # Summation order: the loss; the bias's gradient, summed over shards (the key
        # bias's is 0 up to rounding).
        scale = max(1.0, float(jnp.max(jnp.abs(b))))
        np.testing.assert_allclose(a, b, atol=1e-5 * scale, rtol=1e-5)


def test_bert_with_pallas_attention():
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 100, (2, 64)), jnp.int32)
    config = bert.BertConfig.preset("tiny", vocab_size=100, max_position_embeddings=64)
    ref = bert.BertModel(config)
    fused = bert.BertModel(
        bert.BertConfig.preset(
            "tiny", vocab_size=100, max_position_embeddings=64, implementation="pallas"
        )
    )
    variables = ref.init(jax.random.key(0), ids)
    lengths = jnp.array([64, 20])
    want = ref.apply(variables, ids, lengths=lengths)
    got = fused.apply(variables, ids, lengths=lengths)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(a, b, atol=2e-5)
    train = fused.apply(
        variables, ids, train=True, lengths=lengths, rngs={"dropout": jax.random.key(1)}
    )
    assert all(bool(jnp.isfinite(x).all()) for x in jax.tree.leaves(train))


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"mask": jnp.ones((B, 1, T, T), bool)}, "not mask"),
        ({"bias": jnp.zeros((B, 1, T, T))}, "not bias"),
        ({"causal": True}, "not causal"),
    ],
)
def test_what_the_kernels_do_not_take_is_named(kwargs, message):
    q, k, v, _ = _qkv()
    with pytest.raises(ValueError, match=f"takes padding as kv_lengths only, {message}"):
        attention.dot_product_attention(q, k, v, implementation="pallas", **kwargs)


@pytest.mark.parametrize(
    "shapes,dtypes,message",
    [
        (((2, 16, 1, 16), (1, 16, 1, 16), (1, 16, 1, 16)), None, "query's batch"),
        (((1, 16, 2, 16), (1, 16, 1, 16), (1, 16, 1, 16)), None, "query's heads"),
        (((1, 16, 1, 16), (1, 16, 1, 32), (1, 16, 1, 32)), None, "query's head_dim"),
        (((1, 16, 1, 16), (1, 32, 1, 16), (1, 16, 1, 16)), None, "key and value shapes differ"),
        (((1, 16, 1, 16), (1, 16, 1, 16), (1, 16, 1, 32)), None, "key and value shapes differ"),
        (((1, 16, 16), (1, 16, 16), (1, 16, 16)), None, r"\[batch, length, heads, head_dim\]"),
        (((1, 16, 1, 16),) * 3, (jnp.float32, jnp.bfloat16, jnp.float32), "dtypes differ"),
    ],
    ids=["batch", "heads", "head_dim", "value_length", "value_head_dim", "rank", "dtype"],
)
def test_mismatched_inputs_are_named(shapes, dtypes, message):
    """The kernels take batch, heads and head_dim from the query: keys and values that
    disagree would be read out of bounds, so they are an error."""
    dtypes = dtypes or (jnp.float32,) * 3
    q, k, v = (jnp.zeros(s, d) for s, d in zip(shapes, dtypes, strict=True))
    with pytest.raises(ValueError, match=message):
        pallas_attention.attention(q, k, v, interpret=True)


def test_unsupported_sizes_are_named():
    q = jnp.zeros((1, 100, 2, 16))
    with pytest.raises(ValueError, match="lengths divisible by 16 .* got q_len 100"):
        attention.dot_product_attention(q, q, q, implementation="pallas")
    assert not pallas_attention.supported(128, 128, 24)


@pytest.mark.parametrize("packed", [False, True], ids=["separate", "packed"])
def test_kernels_lower_to_triton_for_an_nvidia_gpu(packed):
    """BERT-base's attention (seq 128, 12 heads of 64, bfloat16) with dropout, forward and
    backward, lowered for CUDA on this machine: three Triton kernels (chosen by the platform
    lowered for, not the machine's backend); lowered for the CPU: the interpreter."""
    shape = jax.ShapeDtypeStruct((8, 128, 12, 64), jnp.bfloat16)
    lengths = jnp.full((8,), 128, jnp.int32)

    def loss(q, k, v):
        bias = jnp.ones((3, 12, 64), jnp.bfloat16)
        out = _kernels(q, k, v, bias, packed, lengths, 0.1, jax.random.key(0))
        return jnp.sum(out.astype(jnp.float32))

    traced = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).trace(shape, shape, shape)
    text = traced.lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("__gpu$xla.gpu.triton") == 3
    for name in ("attention_forward", "attention_backward_dkdv", "attention_backward_dq"):
        assert name in text
    assert "triton" not in traced.lower(lowering_platforms=("cpu",)).as_text()


@pytest.mark.gpu
@pytest.mark.skipif(not attention._on_nvidia_gpu(), reason="needs an NVIDIA GPU")
@pytest.mark.parametrize("packed", [False, True], ids=["separate", "packed"])
@pytest.mark.parametrize("rate", [0.0, 0.1])
def test_kernels_on_the_gpu_equal_the_explicit_computation(rate, packed):
    q, k, v, do = _qkv(jnp.bfloat16)
    key = jax.random.key(3)
    seeds = jax.random.bits(key, (2,), jnp.uint32)
    bias = jnp.zeros((3, H, D), jnp.bfloat16)
    if packed:  # the kernels add the bias as they load Q, K and V
        bias = jnp.asarray(np.random.default_rng(7).normal(size=(3, H, D)), jnp.bfloat16)

    def ours(q, k, v):
        return _kernels(q, k, v, bias, packed, LENGTHS, rate, key).astype(jnp.float32)

    def ref(q, k, v):
        return _reference(q + bias[0], k + bias[1], v + bias[2], LENGTHS, rate, seeds)

    np.testing.assert_allclose(ours(q, k, v), ref(q, k, v), atol=3e-2, rtol=3e-2)
    grads = [
        jax.jit(jax.grad(lambda *a, f=f: jnp.sum(f(*a) * do), argnums=(0, 1, 2)))(q, k, v)
        for f in (ours, ref)
    ]
    for a, b in zip(*grads, strict=True):
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        assert np.max(np.abs(a - b)) <= 3e-2 * np.max(np.abs(b))
