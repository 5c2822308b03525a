"""Attention: against a numpy reference and PyTorch, masks provably hide keys, KV cache."""

from __future__ import annotations

from functools import partial

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxmodels import attention, sharding
from jaxmodels.attention import MultiHeadAttention, dot_product_attention
from jaxmodels.training import mesh_context

B, T, S, H, D = 2, 5, 7, 3, 4


def _qkv(q_len=T, kv_len=S, seed=0, dtype=np.float32):
    rng = np.random.default_rng(seed)
    q = rng.normal(size=(B, q_len, H, D)).astype(dtype)
    k = rng.normal(size=(B, kv_len, H, D)).astype(dtype)
    v = rng.normal(size=(B, kv_len, H, D)).astype(dtype)
    return q, k, v


def _numpy_attention(q, k, v, mask=None, bias=None):
    """softmax(QK^T/sqrt(d) + bias)V in float64; mask [B|1, H|1, T, S], True = attend."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    logits = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
    if bias is not None:
        logits = logits + bias
    if mask is not None:
        logits = np.where(mask, logits, -np.inf)
    m = np.max(logits, axis=-1, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    e = np.exp(logits - m)
    s = e.sum(-1, keepdims=True)
    w = np.divide(e, s, out=np.zeros_like(e), where=s > 0)
    return np.einsum("bhqk,bkhd->bqhd", w, v), w


@pytest.mark.parametrize("return_weights", [False, True])
def test_matches_numpy_softmax_qk_v(return_weights):
    q, k, v = _qkv()
    bias = np.random.default_rng(1).normal(size=(1, H, T, S)).astype(np.float32)
    for b in (None, bias):
        ref, ref_w = _numpy_attention(q, k, v, bias=b)
        got = dot_product_attention(q, k, v, bias=b, return_weights=return_weights)
        if return_weights:
            got, w = got
            assert w.shape == (B, H, T, S) and w.dtype == jnp.float32
            np.testing.assert_allclose(w, ref_w, atol=1e-6)
        assert got.shape == (B, T, H, D) and got.dtype == jnp.float32
        np.testing.assert_allclose(got, ref, atol=1e-5)


def test_masked_keys_get_exactly_zero_weight_and_cannot_leak():
    q, k, v = _qkv()
    rng = np.random.default_rng(2)
    mask = rng.random((B, 1, T, S)) < 0.6
    mask[..., 0] = True  # every query sees at least one key
    _, w = dot_product_attention(q, k, v, mask=mask, return_weights=True)
    w = np.asarray(w)
    assert np.all(w[np.broadcast_to(~mask, w.shape)] == 0.0)
    np.testing.assert_allclose(w.sum(-1), 1.0, atol=1e-6)
    ref, _ = _numpy_attention(q, k, v, mask=mask)
    # Garbage in the values a query cannot see changes nothing, on both paths.
    k2, v2 = k.copy(), v.copy()
    hidden_everywhere = ~mask.any(axis=(1, 2))  # [B, S] keys no query attends
    k2[hidden_everywhere] = 1e3
    v2[hidden_everywhere] = -1e3
    for rw in (False, True):
        out = dot_product_attention(q, k2, v2, mask=mask, return_weights=rw)
        out = out[0] if rw else out
        np.testing.assert_allclose(out, ref, atol=1e-5)


def test_fully_masked_query_row_gives_zeros_not_nan():
    q, k, v = _qkv()
    mask = np.ones((B, 1, T, S), bool)
    mask[0, :, 2, :] = False  # query 2 of sequence 0 sees nothing

    def f(q):
        out, w = dot_product_attention(q, k, v, mask=mask, return_weights=True)
        return out, w

    out, w = f(q)
    assert np.all(np.isfinite(out)) and np.all(np.isfinite(w))
    np.testing.assert_array_equal(out[0, 2], 0.0)
    np.testing.assert_array_equal(w[0, :, 2], 0.0)
    grad = jax.grad(lambda q: f(q)[0].sum())(q)
    assert np.all(np.isfinite(grad))
    # kv_lengths == 0 hides a whole sequence.
    out = dot_product_attention(q, k, v, kv_lengths=jnp.array([0, S]), return_weights=True)[0]
    np.testing.assert_array_equal(out[0], 0.0)


@pytest.mark.parametrize("return_weights", [False, True])
def test_causal_never_looks_ahead(return_weights):
    q, k, v = _qkv(q_len=S)

    def run(q, k, v):
        out = dot_product_attention(q, k, v, causal=True, return_weights=return_weights)
        return np.asarray(out[0] if return_weights else out)

    base = run(q, k, v)
    ref, _ = _numpy_attention(q, k, v, mask=np.tril(np.ones((S, S), bool)))
    np.testing.assert_allclose(base, ref, atol=1e-5)
    for t in range(S - 1):
        q2, k2, v2 = q.copy(), k.copy(), v.copy()
        q2[:, t + 1 :] += 5.0
        k2[:, t + 1 :] -= 5.0
        v2[:, t + 1 :] *= -3.0
        changed = run(q2, k2, v2)
        np.testing.assert_allclose(changed[:, : t + 1], base[:, : t + 1], atol=1e-6)
        assert not np.allclose(changed[:, t + 1 :], base[:, t + 1 :])


def test_causal_with_fewer_queries_is_aligned_to_the_last_keys():
    """Queries that are the last positions of the keys (a KV cache) get the right offset."""
    q, k, v = _qkv(q_len=S)
    full = dot_product_attention(q, k, v, causal=True)
    for n in (1, 3):
        for rw in (False, True):
            last = dot_product_attention(q[:, -n:], k, v, causal=True, return_weights=rw)
            last = last[0] if rw else last
            np.testing.assert_allclose(last, full[:, -n:], atol=1e-5)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("return_weights", [False, True])
def test_kv_lengths_equal_the_boolean_mask(causal, return_weights):
    q, k, v = _qkv(q_len=S)
    lengths = np.array([S, 3], np.int32)
    mask = (np.arange(S)[None, :] < lengths[:, None])[:, None, None, :]
    a = dot_product_attention(
        q, k, v, kv_lengths=lengths, causal=causal, return_weights=return_weights
    )
    b = dot_product_attention(q, k, v, mask=mask, causal=causal, return_weights=return_weights)
    if return_weights:
        np.testing.assert_array_equal(a[1], b[1])
        a, b = a[0], b[0]
    np.testing.assert_allclose(a, b, atol=1e-6)
    full = mask & np.tril(np.ones((S, S), bool)) if causal else mask
    ref, _ = _numpy_attention(q, k, v, mask=full)
    np.testing.assert_allclose(a, ref, atol=1e-5)


def test_dropout_only_in_training_and_reproducible():
    q, k, v = _qkv()
    rng = jax.random.key(0)
    base = dot_product_attention(q, k, v)
    same = dot_product_attention(q, k, v, dropout_rate=0.5, dropout_rng=rng, deterministic=True)
    np.testing.assert_allclose(same, base, atol=1e-6)
    d1 = dot_product_attention(q, k, v, dropout_rate=0.5, dropout_rng=rng, deterministic=False)
    d2 = dot_product_attention(q, k, v, dropout_rate=0.5, dropout_rng=rng, deterministic=False)
    np.testing.assert_array_equal(d1, d2)
    assert not np.allclose(d1, base, atol=1e-3)
    with pytest.raises(ValueError, match="dropout_rng"):
        dot_product_attention(q, k, v, dropout_rate=0.5, deterministic=False)


def _explicit_grads(q, k, v, bias, autodiff, **kwargs):
    """Gradients of a scalar of the explicit path's output with respect to q, k, v (and
    bias): through the hand-written backward pass, or (`autodiff`) through differentiating
    the forward (the `return_weights` form computes the same function without it)."""
    cotangent = np.random.default_rng(9).normal(size=(q.shape[0], q.shape[1], H, D))

    def loss(q, k, v, bias):
        out = dot_product_attention(q, k, v, bias=bias, return_weights=autodiff, **kwargs)
        out = out[0] if autodiff else out
        return jnp.sum(out.astype(jnp.float32) * cotangent)

    return jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))(q, k, v, bias)


_TRAINING = dict(dropout_rate=0.3, dropout_rng=jax.random.key(3), deterministic=False)


@pytest.mark.parametrize(
    "case",
    ["dropout", "bias_per_head", "bias_per_query", "masked_rows", "causal_lengths", "gqa"],
)
def test_explicit_backward_pass_equals_autodiff(case):
    q, k, v = _qkv(seed=4)
    bias, kwargs = None, dict(_TRAINING)
    rng = np.random.default_rng(5)
    if case == "bias_per_head":
        bias = rng.normal(size=(1, H, 1, S)).astype(np.float32)
    elif case == "bias_per_query":
        bias = rng.normal(size=(B, 1, T, S)).astype(np.float32)
    elif case == "masked_rows":
        mask = rng.random((B, 1, T, S)) < 0.6
        mask[0, 0, 1] = False  # a query that sees nothing
        kwargs["mask"] = mask
    elif case == "causal_lengths":
        kwargs.update(causal=True, kv_lengths=jnp.array([S, 2]))
    elif case == "gqa":
        k, v = k[:, :, :1], v[:, :, :1]
    got = _explicit_grads(q, k, v, bias, autodiff=False, **kwargs)
    want = _explicit_grads(q, k, v, bias, autodiff=True, **kwargs)
    for g, w in zip(got, want, strict=True):
        if w is None:
            assert g is None
            continue
        assert g.shape == w.shape and g.dtype == w.dtype
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)
    if case == "masked_rows":
        assert np.all(np.asarray(got[0])[0, 1] == 0.0)  # no gradient from a query seeing nothing


def test_explicit_backward_pass_in_bfloat16_keeps_bfloat16_weights_not_float32_logits():
    q, k, v = (jnp.asarray(a, jnp.bfloat16) for a in _qkv(seed=6))
    got = _explicit_grads(q, k, v, None, autodiff=False, **_TRAINING)
    want = _explicit_grads(q, k, v, None, autodiff=True, **_TRAINING)
    for g, w in zip(got[:3], want[:3], strict=True):
        assert g.dtype == jnp.bfloat16
        g, w = np.asarray(g, np.float32), np.asarray(w, np.float32)
        assert np.max(np.abs(g - w)) <= 0.02 * np.max(np.abs(w))

    def attend(q, k, v):
        return dot_product_attention(q, k, v, **_TRAINING)

    _, vjp = jax.vjp(attend, q, k, v)
    kept = [(a.shape, a.dtype) for a in jax.tree.leaves(vjp) if a.ndim == 4]
    assert ((B, H, T, S), jnp.bfloat16) in kept  # the weights, in the values' dtype
    assert ((B, H, T, S), jnp.float32) not in kept  # not the logits


def test_a_dropout_mask_drawn_before_equals_drawing_it_inside():
    """`dropout_keep` (e.g. one layer's slice of all layers' masks) is the mask that
    `dropout_rng` would draw: the same outputs and gradients."""
    from jaxmodels.layers import dropout_mask

    q, k, v = (jax.random.normal(jax.random.key(i), (2, 8, 4, 16)) for i in range(3))
    rng = jax.random.key(3)
    keep = dropout_mask(rng, 0.2, (2, 4, 8, 8))

    def run(q, k, v, **how):
        out = dot_product_attention(
            q, k, v, dropout_rate=0.2, deterministic=False, kv_lengths=jnp.array([8, 5]), **how
        )
        return jnp.sum(out**2)

    drawn = jax.value_and_grad(run, argnums=(0, 1, 2))(q, k, v, dropout_rng=rng)
    given = jax.value_and_grad(run, argnums=(0, 1, 2))(q, k, v, dropout_keep=keep)
    for a, b in zip(jax.tree.leaves(drawn), jax.tree.leaves(given), strict=True):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match=r"dropout_keep is bool\[2, 4, 8, 7\]; pass"):
        run(q, k, v, dropout_keep=keep[..., :7])
    with pytest.raises(ValueError, match="pallas"):
        run(q, k, v, dropout_keep=keep, implementation="pallas")
    mha = MultiHeadAttention(num_heads=4, dropout_rate=0.2, implementation="pallas")
    x = jnp.ones((2, 16, 64))  # the fused kernels' sizes: lengths of 16, heads of 16
    variables = mha.init(jax.random.key(0), x)
    with pytest.raises(ValueError, match="pallas"):
        mha.apply(variables, x, deterministic=False, dropout_keep=keep)
    # Without dropout a mask has nothing to do, on every path (as `dot_product_attention`).
    mha.apply(variables, x, deterministic=True, dropout_keep=keep)


def test_dropout_rate_one_drops_everything_without_nans():
    q, k, v = _qkv()
    kwargs = dict(dropout_rate=1.0, dropout_rng=jax.random.key(0), deterministic=False)
    out = dot_product_attention(q, k, v, **kwargs)
    grads = _explicit_grads(q, k, v, None, autodiff=False, **kwargs)
    assert np.all(np.asarray(out) == 0.0)
    assert all(np.all(np.asarray(g) == 0.0) for g in grads[:3])


def test_bad_arguments_are_named():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="implementation"):
        dot_product_attention(q, k, v, implementation="flash")
    with pytest.raises(ValueError, match="kv_lengths"):
        dot_product_attention(q, k, v, kv_lengths=jnp.array([1, 2, 3]))
    with pytest.raises(ValueError, match="batch, length, heads, head_dim"):
        dot_product_attention(q[0], k[0], v[0])
    if jax.default_backend() != "gpu":
        with pytest.raises(ValueError, match="NVIDIA GPU"):
            dot_product_attention(q, k, v, implementation="cudnn")


def test_auto_picks_xla_off_gpu_and_for_float32():
    q, k, _ = _qkv()
    assert attention._auto_implementation(jnp.asarray(q), jnp.asarray(k), False) == "xla"


def test_dispatch_to_cudnn_or_the_explicit_path(monkeypatch):
    """What reaches jax.nn.dot_product_attention (cuDNN only), as if on an NVIDIA GPU; every
    other call takes the explicit path."""
    calls = []

    def spy(query, key, value, **kwargs):
        calls.append(kwargs)
        return query

    monkeypatch.setattr(attention, "_on_nvidia_gpu", lambda: True)
    monkeypatch.setattr(jax.nn, "dot_product_attention", spy)
    q16, k16, v16 = (jnp.ones((B, S, H, 8), jnp.bfloat16) for _ in range(3))
    lengths = jnp.array([S, 3])
    dot_product_attention(q16, k16, v16, kv_lengths=lengths, causal=True)
    assert calls[-1]["implementation"] == "cudnn" and calls[-1]["is_causal"]
    assert calls[-1]["mask"] is None and calls[-1]["key_value_seq_lengths"].dtype == jnp.int32
    n = len(calls)
    # Head dim 4, a general mask, float32 inputs, "xla", dropout and weights: explicit path.
    dot_product_attention(q16[..., :4], k16[..., :4], v16[..., :4])
    dot_product_attention(q16, k16, v16, mask=jnp.ones((B, 1, 1, S), bool))
    dot_product_attention(*_qkv(q_len=S, kv_len=S))
    dot_product_attention(q16, k16, v16, implementation="xla")
    dot_product_attention(q16, k16, v16, return_weights=True)
    rng = jax.random.key(0)
    dot_product_attention(q16, k16, v16, dropout_rate=0.1, dropout_rng=rng, deterministic=False)
    assert len(calls) == n
    # Explicit cuDNN gets masks with full [q_len, kv_len] trailing dimensions.
    dot_product_attention(q16, k16, v16, mask=jnp.ones((B, 1, 1, S), bool), implementation="cudnn")
    assert calls[-1]["mask"].shape == (B, 1, S, S)
    # Causal with fewer queries than keys becomes an explicit, offset mask.
    dot_product_attention(q16[:, -2:], k16, v16, causal=True, implementation="cudnn")
    assert not calls[-1]["is_causal"]
    np.testing.assert_array_equal(calls[-1]["mask"][0, 0], np.tril(np.ones((S, S), bool))[-2:])


def test_explicit_path_equals_jax_xla_attention():
    q, k, v = _qkv(q_len=S, kv_len=S, seed=2)
    bias = np.random.default_rng(3).normal(size=(1, H, S, S)).astype(np.float32)
    lengths = jnp.array([S, 4])
    for causal in (False, True):
        got = dot_product_attention(q, k, v, bias=bias, kv_lengths=lengths, causal=causal)
        want = jax.nn.dot_product_attention(
            q,
            k,
            v,
            bias=bias,
            key_value_seq_lengths=lengths,
            is_causal=causal,
            implementation="xla",
        )
        np.testing.assert_allclose(got, want, atol=1e-6)


needs_gpu = pytest.mark.skipif(
    jax.default_backend() != "gpu", reason="needs an NVIDIA GPU (cuDNN attention)"
)


def _close(a, b, rel):
    """max |a - b| within `rel` of max |b| (bfloat16 tolerances scale with the values)."""
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    assert np.max(np.abs(a - b)) <= rel * max(np.max(np.abs(b)), 1.0), np.max(np.abs(a - b))


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("causal", [False, True])
def test_cudnn_matches_xla(causal):
    rng = np.random.default_rng(0)
    shape = (4, 128, 4, 64)
    q, k, v = (jnp.asarray(rng.normal(size=shape), jnp.bfloat16) for _ in range(3))
    lengths = jnp.array([128, 100, 64, 1], jnp.int32)
    assert attention._auto_implementation(q, k, needs_xla=False) == "cudnn"

    def loss(q, k, v, impl):
        out = dot_product_attention(q, k, v, kv_lengths=lengths, causal=causal, implementation=impl)
        return out.astype(jnp.float32).sum(), out

    grad = jax.jit(jax.grad(loss, (0, 1, 2), has_aux=True), static_argnums=3)
    g_x, out_x = grad(q, k, v, "xla")
    g_c, out_c = grad(q, k, v, "cudnn")
    _close(out_c, out_x, 2e-2)
    for a, b in zip(g_c, g_x, strict=True):
        _close(a, b, 5e-2)
    auto = jax.jit(partial(dot_product_attention, kv_lengths=lengths, causal=causal))(q, k, v)
    _close(auto, out_c, 2e-2)


@pytest.mark.gpu
@needs_gpu
def test_mha_cudnn_matches_xla_in_bfloat16():
    x = jax.random.normal(jax.random.key(0), (4, 64, 128))
    lengths = jnp.array([64, 30, 2, 64], jnp.int32)
    variables = MultiHeadAttention(num_heads=4).init(jax.random.key(1), x)
    outs = {
        impl: jax.jit(
            lambda v, x, impl=impl: MultiHeadAttention(
                num_heads=4, dtype=jnp.bfloat16, implementation=impl
            ).apply(v, x, kv_lengths=lengths, causal=True)
        )(variables, x)
        for impl in ("xla", "cudnn", None)
    }
    _close(outs["cudnn"], outs["xla"], 2e-2)
    _close(outs[None], outs["cudnn"], 2e-2)


# ---------------------------------------------------------------------------------------------
# MultiHeadAttention

E = 12


def _mha_params(model, *inputs, seed=0, random_bias=True):
    params = nn.meta.unbox(model.init(jax.random.key(seed), *inputs))["params"]
    if random_bias:  # non-zero biases so that the parity tests check their mapping too
        keys = iter(jax.random.split(jax.random.key(seed + 1), 8))
        for name in ("query", "key", "value", "out"):
            b = params[name]["bias"]
            params[name]["bias"] = 0.1 * jax.random.normal(next(keys), b.shape, b.dtype)
    return {"params": params}


def test_mha_parameter_shapes_and_logical_axes():
    model = MultiHeadAttention(num_heads=H, out_features=7)
    x = jnp.ones((B, T, E))
    variables = model.init(jax.random.key(0), x)
    specs = nn.get_partition_spec(variables)["params"]
    params = nn.meta.unbox(variables)["params"]
    for name in ("query", "key", "value"):
        assert params[name]["kernel"].shape == (E, H, E // H)
        assert params[name]["bias"].shape == (H, E // H)
        assert tuple(specs[name]["kernel"]) == ("embed", "heads", "kv")
        assert tuple(specs[name]["bias"]) == ("heads", "kv")
    assert params["out"]["kernel"].shape == (H, E // H, 7)
    assert tuple(specs["out"]["kernel"]) == ("heads", "kv", "embed")
    assert tuple(specs["out"]["bias"]) == ("embed",)
    np.testing.assert_allclose(np.std(params["query"]["kernel"]), 0.02, rtol=0.5)
    out = model.apply(variables, x)
    assert out.shape == (B, T, 7) and out.dtype == jnp.float32
    # Explicit head_dim, cross-attention with a different length and width.
    model = MultiHeadAttention(num_heads=2, head_dim=5)
    kv = jnp.ones((B, S, 9))
    variables = model.init(jax.random.key(0), x, kv)
    assert variables["params"]["key"]["kernel"].value.shape == (9, 2, 5)
    assert model.apply(variables, x, kv).shape == (B, T, E)
    with pytest.raises(ValueError, match="head_dim"):
        MultiHeadAttention(num_heads=5).init(jax.random.key(0), x)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_self_attention_projects_in_one_matmul_with_the_three_projections_parameters(dtype):
    """Self-attention computes query, key and value as one matmul; the parameters (names,
    shapes, initial values, logical axes) and the results are those of three DenseGenerals,
    which cross-attention (a different key/value input) still uses."""
    model = MultiHeadAttention(num_heads=H, dtype=dtype)
    x = jax.random.normal(jax.random.key(1), (B, T, E))
    same = model.init(jax.random.key(0), x)
    separate = model.init(jax.random.key(0), x, x + 0.0)  # equal values, another array
    assert jax.tree.map(lambda a: (a.shape, a.dtype), same) == jax.tree.map(
        lambda a: (a.shape, a.dtype), separate
    )
    assert jax.tree.all(jax.tree.map(np.array_equal, same, separate))
    assert nn.get_partition_spec(same) == nn.get_partition_spec(separate)

    def loss(params, kv):
        out = model.apply({"params": params}, x, kv)
        return jnp.sum(jnp.sin(out.astype(jnp.float32))), out

    params = nn.meta.unbox(same)["params"]
    (_, fused), fused_grads = jax.value_and_grad(loss, has_aux=True)(params, None)
    (_, apart), apart_grads = jax.value_and_grad(loss, has_aux=True)(params, x + 0.0)
    tol = 1e-5 if dtype == jnp.float32 else 2e-2
    np.testing.assert_allclose(np.float32(fused), np.float32(apart), atol=tol, rtol=tol)
    for a, b in zip(jax.tree.leaves(fused_grads), jax.tree.leaves(apart_grads), strict=True):
        np.testing.assert_allclose(np.float32(a), np.float32(b), atol=tol * 10, rtol=tol * 10)

    # Matmuls of the forward pass: query/key/value together, scores, weighted values, output.
    def matmuls(*kv):
        jaxpr = jax.make_jaxpr(lambda p: model.apply({"params": p}, x, *kv))(params)
        return str(jaxpr).count("dot_general[")

    assert (matmuls(), matmuls(x + 0.0)) == (4, 6)


def test_mha_initialises_under_logical_axis_rules():
    """The 3D kernels keep their names when rules are active (DenseGeneral's flat init)."""
    model = MultiHeadAttention(num_heads=H)
    x = jnp.ones((B, T, E))
    with mesh_context(sharding.make_mesh(data=-1), sharding.logical_rules("fsdp_tp")):
        variables = jax.eval_shape(lambda: model.init(jax.random.key(0), x))
    specs = nn.get_partition_spec(variables)["params"]
    assert tuple(specs["key"]["kernel"]) == ("embed", "heads", "kv")
    assert tuple(specs["key"]["bias"]) == ("heads", "kv")
    assert tuple(specs["out"]["kernel"]) == ("heads", "kv", "embed")
    assert variables["params"]["out"]["kernel"].value.shape == (H, E // H, E)


def test_mha_bfloat16_compute_float32_params():
    model = MultiHeadAttention(num_heads=H, dtype=jnp.bfloat16)
    x = jnp.ones((B, T, E))
    variables = model.init(jax.random.key(0), x)
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(nn.meta.unbox(variables)))
    out, w = model.apply(variables, x, return_weights=True)
    assert out.dtype == jnp.bfloat16 and w.dtype == jnp.float32
    assert model.apply(variables, x).dtype == jnp.bfloat16


def _torch_mha(params, kdim=None):
    torch = pytest.importorskip("torch", reason="needs the reference extra (torch)")
    p = jax.tree.map(lambda a: np.asarray(a, np.float32), params["params"])
    kdim = kdim or E
    ref = torch.nn.MultiheadAttention(E, H, batch_first=True, kdim=kdim, vdim=kdim)

    def w(name, fan_in):  # [fan_in, H, D] -> torch [H*D, fan_in]
        return torch.tensor(p[name]["kernel"].reshape(fan_in, -1).T.copy())

    with torch.no_grad():
        if kdim == E:
            ref.in_proj_weight.copy_(torch.cat([w("query", E), w("key", E), w("value", E)]))
        else:
            ref.q_proj_weight.copy_(w("query", E))
            ref.k_proj_weight.copy_(w("key", kdim))
            ref.v_proj_weight.copy_(w("value", kdim))
        ref.in_proj_bias.copy_(
            torch.tensor(
                np.concatenate([p[n]["bias"].reshape(-1) for n in ("query", "key", "value")])
            )
        )
        ref.out_proj.weight.copy_(torch.tensor(p["out"]["kernel"].reshape(-1, E).T.copy()))
        ref.out_proj.bias.copy_(torch.tensor(p["out"]["bias"]))
    return torch, ref.eval()


@pytest.mark.reference
@pytest.mark.parametrize("causal", [False, True])
def test_mha_matches_torch_self_attention_with_padding(causal):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(B, S, E)).astype(np.float32)
    lengths = np.array([S, 4], np.int32)
    model = MultiHeadAttention(num_heads=H)
    params = _mha_params(model, x)
    torch, ref = _torch_mha(params)
    out, w = model.apply(params, x, kv_lengths=lengths, causal=causal, return_weights=True)
    fast = model.apply(params, x, kv_lengths=lengths, causal=causal)
    pad = torch.tensor(np.arange(S)[None, :] >= lengths[:, None])  # True = ignore
    attn_mask = torch.triu(torch.ones(S, S, dtype=torch.bool), 1) if causal else None
    with torch.no_grad():
        tx = torch.tensor(x)
        r_out, r_w = ref(
            tx,
            tx,
            tx,
            key_padding_mask=pad,
            attn_mask=attn_mask,
            need_weights=True,
            average_attn_weights=False,
        )
    np.testing.assert_allclose(out, r_out.numpy(), atol=1e-5)
    np.testing.assert_allclose(fast, r_out.numpy(), atol=1e-5)
    np.testing.assert_allclose(w, r_w.numpy(), atol=1e-5)


@pytest.mark.reference
def test_mha_matches_torch_cross_attention():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(B, T, E)).astype(np.float32)
    mem = rng.normal(size=(B, S, 8)).astype(np.float32)
    lengths = np.array([2, S], np.int32)
    model = MultiHeadAttention(num_heads=H)
    params = _mha_params(model, x, mem)
    torch, ref = _torch_mha(params, kdim=8)
    out = model.apply(params, x, mem, kv_lengths=lengths)
    pad = torch.tensor(np.arange(S)[None, :] >= lengths[:, None])
    with torch.no_grad():
        tm = torch.tensor(mem)
        r_out, _ = ref(torch.tensor(x), tm, tm, key_padding_mask=pad, need_weights=False)
    np.testing.assert_allclose(out, r_out.numpy(), atol=1e-5)
    # The same against torch's fused SDPA on the projected heads.
    p = params["params"]
    proj = {n: np.einsum("bse,ehd->bshd", a, p[n]["kernel"]) + p[n]["bias"] for n, a in
            (("query", x), ("key", mem), ("value", mem))}  # fmt: skip
    keep = torch.tensor(np.arange(S)[None, None, None, :] < lengths[:, None, None, None])
    heads = torch.nn.functional.scaled_dot_product_attention(
        *(torch.tensor(np.asarray(proj[n])).transpose(1, 2) for n in ("query", "key", "value")),
        attn_mask=keep,
    ).transpose(1, 2)
    sdpa_out = np.einsum("bthd,hde->bte", heads.numpy(), p["out"]["kernel"]) + p["out"]["bias"]
    np.testing.assert_allclose(out, sdpa_out, atol=1e-5)


def test_mha_dropout_uses_the_dropout_stream():
    model = MultiHeadAttention(num_heads=H, dropout_rate=0.3)
    x = jax.random.normal(jax.random.key(0), (B, T, E))
    variables = model.init(jax.random.key(1), x)
    eval_out = model.apply(variables, x)
    np.testing.assert_allclose(eval_out, model.apply(variables, x, deterministic=True))
    train = model.apply(variables, x, deterministic=False, rngs={"dropout": jax.random.key(2)})
    assert not np.allclose(train, eval_out, atol=1e-4)
    with pytest.raises(Exception, match="dropout"):
        model.apply(variables, x, deterministic=False)


def _decode_setup(max_len=6, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(B, max_len, E)).astype(np.float32)
    model = MultiHeadAttention(num_heads=H, decode=True)
    variables = model.init(jax.random.key(seed), x)
    plain = MultiHeadAttention(num_heads=H)
    params = {"params": variables["params"]}
    full = plain.apply(params, x, causal=True)
    return model, variables, params, x, full


def test_mha_kv_cache_token_by_token_equals_full_causal_forward():
    model, variables, params, x, full = _decode_setup()
    cache = variables["cache"]
    assert cache["cached_key"].shape == (B, x.shape[1], H, E // H)
    assert cache["cache_index"].shape == (B,)
    step = jax.jit(lambda cache, xt: model.apply({**params, "cache": cache}, xt, mutable=["cache"]))
    outs = []
    for t in range(x.shape[1]):
        out, mutated = step(cache, x[:, t : t + 1])
        cache = mutated["cache"]
        outs.append(out)
    np.testing.assert_allclose(jnp.concatenate(outs, axis=1), full, atol=1e-5)
    np.testing.assert_array_equal(cache["cache_index"], [x.shape[1]] * B)


def test_mha_kv_cache_writing_past_its_end_is_an_error():
    """Outside jit a chunk that does not fit is refused (the write used to land on the last
    cached position, silently)."""
    model, variables, params, x, _ = _decode_setup()
    cache = variables["cache"]
    for t in range(x.shape[1]):
        _, mutated = model.apply({**params, "cache": cache}, x[:, t : t + 1], mutable=["cache"])
        cache = mutated["cache"]
    with pytest.raises(ValueError, match=f"needs {x.shape[1] + 1} positions, the cache holds"):
        model.apply({**params, "cache": cache}, x[:, :1], mutable=["cache"])


def test_mha_kv_cache_prefill_with_ragged_lengths_then_tokens():
    """A right-padded prompt chunk, then single tokens: each sequence continues at its length."""
    model, variables, params, x, _ = _decode_setup(max_len=7, seed=3)
    plain = MultiHeadAttention(num_heads=H)
    lengths = np.array([4, 2], np.int32)
    prompt = x[:, :4].copy()
    prompt[1, 2:] = 99.0  # padding garbage beyond sequence 1's length
    out, mutated = model.apply(
        {**params, "cache": variables["cache"]}, prompt, kv_lengths=lengths, mutable=["cache"]
    )
    cache = mutated["cache"]
    np.testing.assert_array_equal(cache["cache_index"], lengths)
    # Continue: sequence b's next tokens are x[b, lengths[b]:].
    steps = 3
    nxt = np.stack([x[b, lengths[b] : lengths[b] + steps] for b in range(B)])
    step_outs = []
    for t in range(steps):
        o, mutated = model.apply({**params, "cache": cache}, nxt[:, t : t + 1], mutable=["cache"])
        cache = mutated["cache"]
        step_outs.append(o)
    step_outs = np.concatenate(step_outs, axis=1)
    for b in range(B):
        seq = np.concatenate([x[b, : lengths[b]], nxt[b]])[None]
        ref = plain.apply(params, seq, causal=True)[0]
        n = lengths[b]
        np.testing.assert_allclose(out[b, :n], ref[:n], atol=1e-5)
        np.testing.assert_allclose(step_outs[b], ref[n : n + steps], atol=1e-5)


def test_mha_decode_rejects_cross_attention():
    model, variables, params, x, _ = _decode_setup()
    with pytest.raises(ValueError, match="cross-attention"):
        model.apply(variables, x[:, :1], x, mutable=["cache"])


def test_explicit_backward_pass_inside_shard_map_with_replicated_inputs():
    """Gradients inside `jax.shard_map` (its type checks on): a replicated bias with sharded
    queries/keys/values, and sharded queries with replicated keys/values, equal one device's."""
    from jax.sharding import Mesh
    from jax.sharding import PartitionSpec as P

    mesh = Mesh(np.array(jax.devices()[:2]), ("x",))
    rng = np.random.default_rng(8)
    q, k, v = (jnp.asarray(rng.normal(size=(4, 4, H, D)), jnp.float32) for _ in range(3))
    bias = jnp.asarray(rng.normal(size=(1, H, 4, 4)), jnp.float32)

    def total(q, k, v, b):
        return dot_product_attention(q, k, v, bias=b).sum()

    want = jax.grad(total, (0, 1, 2, 3))(q, k, v, bias)
    for specs in [(P("x"), P("x"), P("x"), P()), (P(None, "x"), P(), P(), P(None, None, "x"))]:
        sharded = jax.shard_map(
            lambda *a: jax.lax.psum(total(*a), "x"), mesh=mesh, in_specs=specs, out_specs=P()
        )
        got = jax.jit(jax.grad(sharded, (0, 1, 2, 3)))(q, k, v, bias)
        for g, w in zip(got, want, strict=True):
            np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)


def test_masks_that_would_be_read_otherwise_are_refused():
    """Were taken: a float (additive) mask cast to bool attended to exactly what it hid; a
    [batch, q, kv] mask was read as [heads, q, kv] (per head where per example was meant)."""
    q = k = v = jnp.ones((2, 3, 2, 4))  # batch 2, 3 positions, 2 heads
    additive = jnp.where(jnp.arange(3) < 2, 0.0, -1e9)[None, None, None, :]
    with pytest.raises(ValueError, match="mask has dtype float32: .* goes in `bias`"):
        attention.dot_product_attention(q, k, v, mask=additive)
    out = attention.dot_product_attention(q, k, v, bias=additive)  # what was meant
    keep = attention.dot_product_attention(q, k, v, mask=additive == 0)
    np.testing.assert_allclose(out, keep, atol=1e-6)
    per_example = jnp.ones((2, 3, 3), bool)
    with pytest.raises(ValueError, match=r"mask has shape \(2, 3, 3\): a 3-D mask reads as"):
        attention.dot_product_attention(q, k, v, mask=per_example)
    attention.dot_product_attention(q, k, v, mask=per_example[:, None])  # as the error says
    with pytest.raises(ValueError, match=r"bias has shape \(3, 5\), which does not broadcast"):
        attention.dot_product_attention(q, k, v, bias=jnp.zeros((3, 5)))
    attention.dot_product_attention(q, k, v, bias=jnp.zeros((2, 3, 3)))  # [heads, q, kv]
    with pytest.raises(ValueError, match="mask has dtype float32"):  # combined masks too
        attention.combine_masks(additive, None)
    # 0/1 integers are a boolean mask
    ints = attention.dot_product_attention(q, k, v, mask=(additive == 0).astype(jnp.int32))
    np.testing.assert_allclose(ints, keep)
