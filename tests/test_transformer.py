"""Transformer: positions, blocks, remat/scan switches, KV-cache decoding, generation, training.

XLA compiles dominate the run time on CPU, so the tests build parameters from numpy with the
structure `jax.eval_shape(model.init)` gives (no compile) where the initial distribution does
not matter, and call each model through few, shared `jit`s.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxmodels import sharding
from jaxmodels.errors import ConfigError
from jaxmodels.training import mesh_context
from jaxmodels.transformer import (
    Decoder,
    DecoderBlock,
    DecoderOnlyLM,
    Encoder,
    EncoderBlock,
    EncoderDecoder,
    Mlp,
    PositionEmbedding,
    generate,
    greedy_translate,
    init_cache,
    sinusoidal_positions,
)

B, L, E = 2, 6, 16
LM = dict(vocab_size=13, embed_dim=16, num_layers=2, num_heads=2, mlp_dim=32, max_len=12)


def _abstract(model, *args, **kwargs):
    """The variables `model.init` would create, as shapes (boxed with logical names)."""
    return jax.eval_shape(lambda: model.init(jax.random.key(0), *args, **kwargs))


def _random_params(model, *args, seed=0, **kwargs):
    """Random parameters with the structure of `model.init(...)["params"]`, built in numpy."""
    shapes = nn.meta.unbox(_abstract(model, *args, **kwargs))["params"]
    rng = np.random.default_rng(seed)

    def fill(path, s):
        name = path[-1].key
        std = {"kernel": 0.2, "bias": 0.05, "scale": 0.1, "embedding": 1.0}[name]
        return jnp.asarray(rng.normal(0.0, std, s.shape) + (name == "scale"), s.dtype)

    return jax.tree_util.tree_map_with_path(fill, shapes)


def _tokens(shape, vocab=LM["vocab_size"], seed=0):
    return jnp.asarray(np.random.default_rng(seed).integers(0, vocab, size=shape), jnp.int32)


def _count(params):
    return sum(math.prod(x.shape) for x in jax.tree.leaves(params))


def _stack_layers(tree, num_layers):
    """Loop parameters (`layers_0`, ...) -> scanned parameters (`layers`, leading axis)."""
    tree = dict(tree)
    layers = [tree.pop(f"layers_{i}") for i in range(num_layers)]
    tree["layers"] = jax.tree.map(lambda *xs: jnp.stack(xs), *layers)
    return tree


# --- positions -------------------------------------------------------------------------------


def test_sinusoidal_table_matches_the_formula():
    length, dim = 60, 10
    table = sinusoidal_positions(length, dim)
    assert table.shape == (length, dim) and table.dtype == np.float32
    for pos in (0, 1, 7, 59):
        for i in range(dim // 2):
            angle = pos / 10000 ** (2 * i / dim)
            assert table[pos, 2 * i] == pytest.approx(math.sin(angle), abs=1e-6)
            assert table[pos, 2 * i + 1] == pytest.approx(math.cos(angle), abs=1e-6)
    np.testing.assert_array_equal(table[0, 0::2], 0.0)
    np.testing.assert_array_equal(table[0, 1::2], 1.0)
    odd = sinusoidal_positions(5, 7)  # odd width: the last column is a sine
    assert odd.shape == (5, 7)
    for d in range(7):
        angle = 3 / 10000 ** (2 * (d // 2) / 7)
        expected = math.sin(angle) if d % 2 == 0 else math.cos(angle)
        assert odd[3, d] == pytest.approx(expected, abs=1e-6)


def test_position_embeddings_sinusoidal_and_learned():
    x = jnp.zeros((B, L, E))
    fixed = PositionEmbedding(max_len=10)
    assert fixed.init(jax.random.key(0), x) == {}  # no parameters
    np.testing.assert_allclose(fixed.apply({}, x)[1], sinusoidal_positions(L, E), atol=1e-6)
    learned = PositionEmbedding(max_len=10, kind="learned")
    variables = learned.init(jax.random.key(0), x)
    assert tuple(nn.get_partition_spec(variables)["params"]["embedding"]) == ("length", "embed")
    table = variables["params"]["embedding"].value
    assert table.shape == (10, E)
    np.testing.assert_allclose(learned.apply(variables, x)[0], table[:L])
    positions = jnp.array([[3, 4], [0, 9]])
    out = learned.apply(variables, jnp.zeros((B, 2, E)), positions)
    np.testing.assert_allclose(out, table[positions])
    with pytest.raises(ConfigError, match="sinusoidal"):
        PositionEmbedding(max_len=10, kind="rotary").init(jax.random.key(0), x)


def test_sequence_longer_than_the_position_table_is_a_clear_error():
    for kind in ("sinusoidal", "learned"):
        with pytest.raises(ValueError, match=r"length 9 .*max_len=8"):
            _abstract(PositionEmbedding(max_len=8, kind=kind), jnp.zeros((1, 9, 4)))
    with pytest.raises(ValueError, match="max_len=8"):
        _abstract(DecoderOnlyLM(**{**LM, "max_len": 8}), jnp.zeros((1, 9), jnp.int32))
    s2s = EncoderDecoder(vocab_size=10, embed_dim=8, num_heads=2, mlp_dim=8, max_len=4,
                         num_encoder_layers=1, num_decoder_layers=1)  # fmt: skip
    src, tgt = jnp.zeros((1, 5), jnp.int32), jnp.zeros((1, 3), jnp.int32)
    with pytest.raises(ValueError, match="max_len=4"):
        _abstract(s2s, src, jnp.array([5]), tgt, jnp.array([3]))
    # Out-of-vocabulary ids are named too (checked when the tokens are concrete).
    with pytest.raises(ValueError, match=r"\[0, 13\)"):
        DecoderOnlyLM(**LM).apply({"params": {}}, jnp.full((1, 3), 13, jnp.int32))


# --- blocks ----------------------------------------------------------------------------------


def test_mlp_shapes_and_logical_axes():
    mlp = Mlp(hidden_dim=24, activation="relu", dropout_rate=0.5)
    x = jnp.ones((B, L, E))
    variables = mlp.init(jax.random.key(0), x)
    specs = nn.get_partition_spec(variables)["params"]
    assert tuple(specs["wi"]["kernel"]) == ("embed", "mlp")
    assert tuple(specs["wo"]["kernel"]) == ("mlp", "embed")
    assert variables["params"]["wi"]["kernel"].value.shape == (E, 24)
    assert mlp.apply(variables, x).shape == (B, L, E)
    train = mlp.apply(variables, x, deterministic=False, rngs={"dropout": jax.random.key(1)})
    assert not np.allclose(train, mlp.apply(variables, x))
    with pytest.raises(ConfigError, match="activation"):
        Mlp(8, activation="swish2").init(jax.random.key(0), x)


@pytest.mark.parametrize("pre_norm", [True, False])
def test_encoder_block_ignores_padding(pre_norm):
    block = EncoderBlock(num_heads=2, mlp_dim=32, pre_norm=pre_norm)
    x = jax.random.normal(jax.random.key(0), (B, L, E))
    lengths = jnp.array([L, 3])
    params = _random_params(block, x, lengths)
    assert set(params) == {"attention", "attention_norm", "mlp", "mlp_norm"}
    run = jax.jit(lambda x: block.apply({"params": params}, x, lengths))
    out = run(x)
    out2 = run(x.at[1, 3:].set(100.0))  # garbage in the padding
    np.testing.assert_allclose(out2[1, :3], out[1, :3], atol=1e-5)
    np.testing.assert_allclose(out2[0], out[0], atol=1e-6)
    assert not np.allclose(out2[1, 3:], out[1, 3:])


@pytest.mark.parametrize("pre_norm", [True, False])
def test_decoder_block_is_causal_and_ignores_source_padding(pre_norm):
    block = DecoderBlock(num_heads=2, mlp_dim=32, pre_norm=pre_norm)
    y = jax.random.normal(jax.random.key(0), (B, L, E))
    enc = jax.random.normal(jax.random.key(1), (B, 5, E))
    src_lengths = jnp.array([5, 2])
    params = _random_params(block, y, enc, src_lengths)
    assert "cross_attention" in params
    run = jax.jit(lambda y, enc: block.apply({"params": params}, y, enc, src_lengths))
    out = run(y, enc)
    changed_future = run(y.at[:, 4:].set(7.0), enc)
    np.testing.assert_allclose(changed_future[:, :4], out[:, :4], atol=1e-5)
    assert not np.allclose(changed_future[:, 4:], out[:, 4:])
    np.testing.assert_allclose(run(y, enc.at[1, 2:].set(-50.0)), out, atol=1e-5)
    assert not np.allclose(run(y, enc.at[1, :2].set(-50.0))[1], out[1])
    with pytest.raises(ValueError, match="cross_attention=False"):
        block.apply({"params": params}, y)
    no_cross = DecoderBlock(num_heads=2, mlp_dim=32, cross_attention=False)
    assert "cross_attention" not in _abstract(no_cross, y)["params"]


# --- remat / scan switches -------------------------------------------------------------------

ENC = dict(num_layers=3, num_heads=2, mlp_dim=32)


@pytest.fixture(scope="module")
def encoder_reference():
    """A plain-loop encoder, its parameters, and its jitted (loss, grads)."""
    x = jax.random.normal(jax.random.key(0), (B, L, E))
    lengths = jnp.array([L, 4])
    loop = Encoder(**ENC)
    params = _random_params(loop, x, lengths)
    value_and_grad = _loss_and_grad(loop, x, lengths)
    return x, lengths, params, value_and_grad(params)


def _loss_and_grad(model, *args):
    def loss(p):
        out = model.apply({"params": p}, *args)
        return jnp.sum(out**2) / out.size, out

    return jax.jit(jax.value_and_grad(loss, has_aux=True))


@pytest.mark.parametrize(
    "remat_policy,scan_layers", [("none", True), ("full", False), ("dots_saveable", True)]
)
def test_encoder_remat_and_scan_compute_the_same_function(
    encoder_reference, remat_policy, scan_layers
):
    x, lengths, params, ((ref_loss, ref_out), ref_grads) = encoder_reference
    variant = Encoder(**ENC, remat_policy=remat_policy, scan_layers=scan_layers)
    v_shapes = nn.meta.unbox(_abstract(variant, x, lengths))["params"]
    assert _count(v_shapes) == _count(params)
    if scan_layers:
        assert set(v_shapes) == {"layers", "final_norm"}
        assert jax.tree.leaves(v_shapes["layers"])[0].shape[0] == ENC["num_layers"]
        v_params = _stack_layers(params, ENC["num_layers"])
        ref_grads = _stack_layers(ref_grads, ENC["num_layers"])
    else:
        v_params = params
    assert jax.tree.structure(v_params) == jax.tree.structure(v_shapes)
    (loss, out), grads = _loss_and_grad(variant, x, lengths)(v_params)
    np.testing.assert_allclose(out, ref_out, atol=1e-5)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4)


def test_scanned_parameters_carry_a_layers_axis_name():
    model = Decoder(num_layers=2, num_heads=2, mlp_dim=32, cross_attention=False, scan_layers=True)
    with mesh_context(sharding.make_mesh(data=-1), sharding.logical_rules("fsdp_tp")):
        variables = _abstract(model, jnp.ones((B, L, E)))
    spec = nn.get_partition_spec(variables)["params"]["layers"]["mlp"]["wi"]["kernel"]
    assert tuple(spec) == ("layers", "embed", "mlp")
    with pytest.raises(ConfigError, match="remat_policy"):
        bad = Decoder(num_layers=1, num_heads=2, mlp_dim=8, cross_attention=False,
                      remat_policy="some")  # fmt: skip
        _abstract(bad, jnp.ones((B, L, E)))


@pytest.fixture(scope="module")
def lm_reference():
    lm = DecoderOnlyLM(**LM)
    tokens = _tokens((B, 8), seed=1)
    params = _random_params(lm, tokens)
    forward = jax.jit(lambda p, t: lm.apply({"params": p}, t))
    return lm, tokens, params, forward


@pytest.fixture(scope="module")
def lm_loss_and_grad(lm_reference):
    lm, tokens, params, _ = lm_reference
    return _lm_loss_and_grad(lm)(params, tokens)


def _lm_loss_and_grad(model):
    def loss(p, tokens):
        logits = model.apply({"params": p}, tokens[:, :-1])
        return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

    return jax.jit(jax.value_and_grad(loss))


@pytest.mark.parametrize(
    "remat_policy,scan_layers", [("full", False), ("dots_saveable", True), ("dots", False)]
)
def test_lm_switches_give_the_same_loss_and_gradients(
    lm_reference, lm_loss_and_grad, remat_policy, scan_layers
):
    _, tokens, params, _ = lm_reference
    variant = DecoderOnlyLM(**LM, remat_policy=remat_policy, scan_layers=scan_layers)
    v_shapes = nn.meta.unbox(_abstract(variant, tokens))["params"]
    assert _count(v_shapes) == _count(params)
    v_params, stack = params, lambda t: t
    if scan_layers:
        stack = lambda t: dict(t, decoder=_stack_layers(t["decoder"], LM["num_layers"]))  # noqa: E731
        v_params = stack(params)
    assert jax.tree.structure(v_params) == jax.tree.structure(v_shapes)
    loss, grads = _lm_loss_and_grad(variant)(v_params, tokens)
    ref_loss, ref_grads = lm_loss_and_grad
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(stack(ref_grads)), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4)


# --- decoder-only LM: KV cache and generation ------------------------------------------------


@pytest.mark.parametrize(
    "scan_layers,position_embedding", [(False, "learned"), (True, "sinusoidal")]
)
def test_kv_cache_decoding_equals_the_full_forward(lm_reference, scan_layers, position_embedding):
    _, tokens, params, _ = lm_reference
    lm = DecoderOnlyLM(**LM, scan_layers=scan_layers, position_embedding=position_embedding)
    if scan_layers:
        params = dict(params, decoder=_stack_layers(params["decoder"], LM["num_layers"]))
    if position_embedding != "learned":
        params = {k: v for k, v in params.items() if k != "pos"}
    full = jax.jit(lambda t: lm.apply({"params": params}, t))(tokens)
    decoder = lm.clone(decode=True)
    # The cache as `init` in decode mode on a full-length input creates it (all zeros).
    cache = init_cache(lm, B, tokens.shape[1])
    expected = _abstract(decoder, tokens)["cache"]
    assert jax.tree.map(jnp.shape, cache) == jax.tree.map(lambda s: s.shape, expected)

    @jax.jit
    def step(cache, chunk, lengths=None):
        return decoder.apply({"params": params, "cache": cache}, chunk, lengths, mutable=["cache"])

    outs = []
    for t in range(tokens.shape[1]):
        logits, mutated = step(cache, tokens[:, t : t + 1])
        cache = mutated["cache"]
        outs.append(logits)
    np.testing.assert_allclose(jnp.concatenate(outs, axis=1), full, atol=1e-5)
    # Prefill a ragged prompt in one chunk, then continue token by token.
    lengths = jnp.array([5, 2])
    logits, mutated = step(init_cache(lm, B, tokens.shape[1]), tokens[:, :5], lengths)
    np.testing.assert_allclose(logits[0], full[0, :5], atol=1e-5)
    np.testing.assert_allclose(logits[1, :2], full[1, :2], atol=1e-5)
    cache = mutated["cache"]
    for t in range(2):
        nxt = jnp.stack([tokens[0, 5 + t], tokens[1, 2 + t]])[:, None]
        logits, mutated = step(cache, nxt)
        cache = mutated["cache"]
        np.testing.assert_allclose(logits[0, 0], full[0, 5 + t], atol=1e-5)
        np.testing.assert_allclose(logits[1, 0], full[1, 2 + t], atol=1e-5)


def test_greedy_generation_is_deterministic_and_equals_argmax_decoding(lm_reference):
    lm, tokens, params, forward = lm_reference
    prompt, lengths, n = tokens[:, :4], np.array([4, 2]), 4
    got = generate(lm, params, prompt, lengths, max_new_tokens=n, greedy=True)
    assert got.shape == (B, n) and got.dtype == jnp.int32
    again = generate(lm, params, prompt, lengths, max_new_tokens=n, greedy=True,
                     rng=jax.random.key(9))  # fmt: skip
    np.testing.assert_array_equal(got, again)
    # By hand: the full forward pass on the growing sequences, argmax at each one's end (the
    # buffer is longer than the sequences; causality makes the tail irrelevant).
    buf = np.zeros(tokens.shape, np.int32)
    buf[:, :4] = prompt
    ends = lengths.copy()
    by_hand = np.zeros((B, n), np.int32)
    for k in range(n):
        logits = np.asarray(forward(params, buf))
        for b in range(B):
            by_hand[b, k] = buf[b, ends[b]] = np.argmax(logits[b, ends[b] - 1])
            ends[b] += 1
    np.testing.assert_array_equal(got, by_hand)
    # top-k with k = 1 is greedy, whatever the rng and temperature.
    top1 = generate(lm, params, prompt, lengths, max_new_tokens=n, rng=jax.random.key(3),
                    top_k=1, temperature=0.7)  # fmt: skip
    np.testing.assert_array_equal(top1, got)


def test_sampling_respects_the_rng_and_top_k(lm_reference):
    lm, tokens, params, forward = lm_reference
    prompt = tokens[:, :3]
    kw = dict(max_new_tokens=5, temperature=3.0)
    a = generate(lm, params, prompt, rng=jax.random.key(1), **kw)
    np.testing.assert_array_equal(generate(lm, params, prompt, rng=jax.random.key(1), **kw), a)
    others = [generate(lm, params, prompt, rng=jax.random.key(s), **kw) for s in (2, 3, 4)]
    assert any(not np.array_equal(a, c) for c in others)
    assert a.min() >= 0 and a.max() < LM["vocab_size"]
    # top_k=2, compiled inside an outer jit: every token is one of the two most likely ones.
    sample = jax.jit(lambda p, r: generate(lm, p, prompt, rng=r, top_k=2, **kw))
    k2 = np.asarray(sample(params, jax.random.key(5)))
    logits = np.asarray(forward(params, jnp.concatenate([prompt, k2], axis=1)))
    top2 = np.argsort(logits, axis=-1)[..., -2:]
    for t in range(kw["max_new_tokens"]):
        for b in range(B):
            assert k2[b, t] in top2[b, prompt.shape[1] + t - 1]
    with pytest.raises(ValueError, match="max_len=12"):  # 3 + 11 - 1 positions > 12
        generate(lm, params, prompt, max_new_tokens=11, greedy=True)
    with pytest.raises(ValueError, match="rng"):
        generate(lm, params, prompt, max_new_tokens=2)


def test_generation_arguments_that_cannot_be_meant_are_errors(lm_reference):
    """Were: token 0 for ever (temperature 0: NaN logits), tokens from a prompt of length 0
    or past the prompt, an unpacking error for 1-D prompts."""
    lm, tokens, params, _ = lm_reference
    prompt = tokens[:, :3]
    kw = dict(max_new_tokens=2, rng=jax.random.key(0))
    for temperature in (0.0, -1.0):
        with pytest.raises(ValueError, match="temperature must be > 0.*greedy=True"):
            generate(lm, params, prompt, temperature=temperature, **kw)
    generate(lm, params, prompt, temperature=0.0, greedy=True, max_new_tokens=2)  # unused
    for lengths, message in (([3, 0], "must be >= 1"), ([3, 4], "must be <= the sequence")):
        with pytest.raises(ValueError, match=f"prompt_lengths {message}"):
            generate(lm, params, prompt, jnp.array(lengths[:1] * (B - 1) + lengths[1:]), **kw)
    with pytest.raises(ValueError, match=r"prompt tokens must be <int>\[batch, length\]"):
        generate(lm, params, prompt[0], **kw)
    with pytest.raises(ValueError, match=r"tokens must be <int>\[batch, length\]"):
        lm.apply({"params": params}, tokens[0])
    # Was "EncoderDecoder.__init__() got an unexpected keyword argument 'decode'".
    s2s = EncoderDecoder(vocab_size=11, embed_dim=8, num_heads=2, mlp_dim=16, max_len=8)
    with pytest.raises(
        TypeError,
        match="from a DecoderOnlyLM, got EncoderDecoder; an EncoderDecoder decodes with greedy_tr",
    ):
        generate(s2s, params, prompt, **kw)


def test_generation_fills_the_position_table(lm_reference):
    """The last new token is never fed back, so prompt_len + max_new_tokens - 1 = max_len
    fits (was refused); greedy and sampled tokens equal the full forward pass on a buffer of
    max_len tokens, each step drawn with the key `generate` uses for it."""
    from jaxmodels.transformer import _sample

    lm, tokens, params, forward = lm_reference
    prompt, lengths = tokens[:, :4], np.array([4, 2])
    n = LM["max_len"] - prompt.shape[1] + 1
    key = jax.random.key(4)
    for greedy, temperature, top_k in ((True, 1.0, None), (False, 1.5, 5)):
        got = generate(lm, params, prompt, lengths, max_new_tokens=n, rng=key, greedy=greedy,
                       temperature=temperature, top_k=top_k)  # fmt: skip
        keys = jax.random.split(key, n)
        buf = np.zeros((B, LM["max_len"]), np.int32)
        buf[:, :4] = prompt
        ends = lengths.copy()
        by_hand = np.zeros((B, n), np.int32)
        for k in range(n):
            last = np.asarray(forward(params, buf))[np.arange(B), ends - 1]
            by_hand[:, k] = _sample(jnp.asarray(last), keys[k], temperature, top_k, greedy)
            for b in range(B):
                if ends[b] < LM["max_len"]:
                    buf[b, ends[b]] = by_hand[b, k]
            ends += 1
        np.testing.assert_array_equal(got, by_hand)
    with pytest.raises(ValueError, match="max_len=12"):
        generate(lm, params, prompt, max_new_tokens=n + 1, greedy=True)


def test_decode_chunk_lengths_outside_the_chunk_are_errors(lm_reference, s2s_reference):
    """Were: positions silently advanced past the chunk (or backwards). 0 is a sequence
    that takes no step: it continues at its own position."""
    lm, tokens, params, forward = lm_reference
    decoder = lm.clone(decode=True)

    def apply(cache, chunk, lengths):
        variables = {"params": params, "cache": cache}
        return decoder.apply(variables, chunk, lengths, mutable=["cache"])

    for lengths in ([4, 7], [4, -2]):
        with pytest.raises(ValueError, match=r"^lengths in decode mode .* \[0, 4\]"):
            apply(init_cache(lm, B, 8), tokens[:, :4], jnp.array(lengths))
    with pytest.raises(ValueError, match="lengths has shape"):
        apply(init_cache(lm, B, 8), tokens[:, :4], jnp.array([4]))
    logits, mutated = apply(init_cache(lm, B, 8), tokens[:, :4], jnp.array([4, 0]))
    np.testing.assert_array_equal(mutated["cache"]["position"], [4, 0])
    full = forward(params, tokens)
    np.testing.assert_allclose(logits[0], full[0, :4], atol=1e-5)
    chunk = jnp.stack([tokens[0, 4:6], tokens[1, :2]])
    logits, mutated = apply(mutated["cache"], chunk, None)
    np.testing.assert_array_equal(mutated["cache"]["position"], [6, 2])
    np.testing.assert_allclose(logits[0], full[0, 4:6], atol=1e-5)
    np.testing.assert_allclose(logits[1], full[1, :2], atol=1e-5)

    model, s2s_params, src, src_lengths, tgt_in, _ = s2s_reference
    encoded = model.apply({"params": s2s_params}, src, src_lengths, method=EncoderDecoder.encode)
    for lengths in ([3, 5], [-1, 3]):
        with pytest.raises(ValueError, match=r"^tgt_lengths in decode mode .* \[0, 3\]"):
            model.clone(kv_cache=True).apply(
                {"params": s2s_params, "cache": init_cache(model, B, 8)},
                encoded,
                src_lengths,
                tgt_in[:, :3],
                jnp.array(lengths),
                method=EncoderDecoder.decode,
                mutable=["cache"],
            )


def test_decode_mode_without_a_cache_is_an_error(lm_reference, s2s_reference):
    """Was: the call ran as init's cache-sizing pass, logits as if at position 0."""
    lm, tokens, params, _ = lm_reference
    message = "decode mode without a KV cache: create it with `transformer.init_cache`"
    with pytest.raises(ValueError, match=message):
        lm.clone(decode=True).apply({"params": params}, tokens[:, :1], mutable=["cache"])
    model, s2s_params, src, src_lengths, tgt_in, _ = s2s_reference
    encoded = model.apply({"params": s2s_params}, src, src_lengths, method=EncoderDecoder.encode)
    with pytest.raises(ValueError, match=message):
        model.clone(kv_cache=True).apply(
            {"params": s2s_params},
            encoded,
            src_lengths,
            tgt_in[:, :1],
            method=EncoderDecoder.decode,
            mutable=["cache"],
        )


def test_tied_logits_are_divided_by_sqrt_embed_dim(lm_reference):
    """As the docstring says: untied with the table, transposed, as the output kernel (bias
    zero) gives sqrt(embed_dim) times the tied logits."""
    _, tokens, params, forward = lm_reference
    untied = DecoderOnlyLM(**LM, tie_embeddings=False)
    table = params["embed"]["embedding"]
    output = {"kernel": table.T, "bias": jnp.zeros(LM["vocab_size"])}
    logits = untied.apply({"params": dict(params, output=output)}, tokens)
    expected = forward(params, tokens) * math.sqrt(LM["embed_dim"])
    np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-4)


def test_top_k_samples_exactly_k_tokens_when_logits_tie():
    """Logits tied with the k-th do not widen the choice: top_k=1 is one token."""
    from jaxmodels.transformer import _sample

    logits = jnp.array([[3.0, 3.0, 3.0, 0.0, 0.0]] * 64)
    drawn = {int(t) for s in range(8) for t in _sample(logits, jax.random.key(s), 1.0, 1, False)}
    assert drawn == {0}
    drawn = {int(t) for s in range(8) for t in _sample(logits, jax.random.key(s), 1.0, 2, False)}
    assert drawn == {0, 1}


def test_untied_output_projection_and_bfloat16():
    lm = DecoderOnlyLM(**LM, tie_embeddings=False, dtype=jnp.bfloat16)
    tokens = _tokens((B, L))
    variables = _abstract(lm, tokens)
    assert tuple(nn.get_partition_spec(variables)["params"]["output"]["kernel"]) == (
        "embed",
        "vocab",
    )
    params = _random_params(lm, tokens)
    assert params["output"]["kernel"].shape == (LM["embed_dim"], LM["vocab_size"])
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))
    logits = jax.jit(lambda p: lm.apply({"params": p}, tokens))(params)
    assert logits.dtype == jnp.float32 and logits.shape == (B, L, LM["vocab_size"])
    assert np.all(np.isfinite(logits))
    tied = nn.meta.unbox(_abstract(DecoderOnlyLM(**LM), tokens))["params"]
    assert "output" not in tied
    assert _count(params) - _count(tied) == LM["embed_dim"] * LM["vocab_size"] + LM["vocab_size"]


# --- training lowers the loss ----------------------------------------------------------------

# Cyclic; the next token is determined by the previous two, not by the previous one alone.
PATTERN = np.array([3, 1, 4, 1, 5, 9, 2, 6, 5, 3])


def _train(model, params, loss_fn, batches, lr):
    opt = optax.adam(lr)

    @jax.jit
    def step(p, s, batch, rng):
        loss, g = jax.value_and_grad(loss_fn)(p, batch, rng)
        updates, s = opt.update(g, s, p)
        return optax.apply_updates(p, updates), s, loss

    opt_state = opt.init(params)
    losses = []
    for i, batch in enumerate(batches):
        params, opt_state, loss = step(params, opt_state, batch, jax.random.key(i))
        losses.append(float(loss))
    return losses


def test_decoder_only_lm_learns_a_repeating_sequence():
    lm = DecoderOnlyLM(**LM, dropout_rate=0.05)
    rng = np.random.default_rng(0)

    def batches(n, size=16, length=12):
        for _ in range(n):
            starts = rng.integers(0, len(PATTERN), size=size)
            idx = (starts[:, None] + np.arange(length)[None, :]) % len(PATTERN)
            yield jnp.asarray(PATTERN[idx], jnp.int32)

    def loss_fn(p, tokens, rng):
        logits = lm.apply({"params": p}, tokens[:, :-1], train=True, rngs={"dropout": rng})
        return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

    init = jax.jit(lm.init)  # the model's own initialisation
    params = nn.meta.unbox(init(jax.random.key(0), jnp.zeros((1, 11), jnp.int32)))["params"]
    losses = _train(lm, params, loss_fn, batches(60), lr=1e-2)
    assert losses[0] > 2.0  # about log(vocab) at the start
    # The best a model that ignores the context can do is the unigram entropy (1.9 nats).
    assert np.mean(losses[-5:]) < 0.5, losses


def test_encoder_decoder_learns_to_reverse_sequences():
    vocab, bos, n = 10, 1, 5  # 0 = padding, 1 = BOS, 2..9 symbols
    model = EncoderDecoder(vocab_size=vocab, embed_dim=32, num_heads=4, mlp_dim=64,
                           num_encoder_layers=1, num_decoder_layers=1, max_len=8,
                           dropout_rate=0.0)  # fmt: skip
    rng = np.random.default_rng(0)

    def batches(steps, size=64):
        for _ in range(steps):
            src = rng.integers(2, vocab, size=(size, n)).astype(np.int32)
            tgt = src[:, ::-1]
            tgt_in = np.concatenate([np.full((size, 1), bos, np.int32), tgt[:, :-1]], axis=1)
            yield src, tgt_in, tgt

    def loss_fn(p, batch, rng):
        src, tgt_in, tgt = batch
        lengths = jnp.full(src.shape[:1], n, jnp.int32)
        logits = model.apply({"params": p}, src, lengths, tgt_in, lengths, train=True)
        return optax.softmax_cross_entropy_with_integer_labels(logits, tgt).mean()

    src = jnp.zeros((1, n), jnp.int32)
    lengths = jnp.array([n])
    params = _random_params(model, src, lengths, src, lengths)
    losses = _train(model, params, loss_fn, batches(70), lr=1e-2)
    assert losses[0] > 2.0
    # Not looking at the source costs log(8) = 2.08 nats, copying it unordered log(5) = 1.6.
    assert np.mean(losses[-5:]) < 1.0, losses


# --- encoder-decoder: KV-cache decoding and greedy translation -------------------------------

# Untied output and learned positions: with these random parameters greedy decoding does not
# just repeat one token (the tied sinusoidal model does).
S2S = dict(vocab_size=13, embed_dim=16, num_heads=2, mlp_dim=32, num_encoder_layers=2,
           num_decoder_layers=2, max_len=12, dropout_rate=0.0, tie_output=False,
           position_embedding="learned")  # fmt: skip
BOS = 1


@pytest.fixture(scope="module")
def s2s_reference():
    """A plain-loop seq2seq model, its parameters, a ragged batch and a jitted forward."""
    model = EncoderDecoder(**S2S)
    src = _tokens((B, 7), seed=2)
    src_lengths = jnp.array([7, 3])
    src = src.at[1, 3:].set(0)  # right padding
    tgt_in = _tokens((B, 8), seed=3).at[:, 0].set(BOS)
    params = _random_params(model, src, src_lengths, tgt_in, seed=1)
    forward = jax.jit(lambda p, t: model.apply({"params": p}, src, src_lengths, t))
    return model, params, src, src_lengths, tgt_in, forward


def _s2s_variant(s2s_reference, scan_layers, remat_policy):
    """The reference model with the switches set, and its parameters restacked to match."""
    model, params, *_ = s2s_reference
    variant = model.clone(scan_layers=scan_layers, remat_policy=remat_policy)
    if scan_layers:
        params = dict(
            params,
            encoder=_stack_layers(params["encoder"], S2S["num_encoder_layers"]),
            decoder=_stack_layers(params["decoder"], S2S["num_decoder_layers"]),
        )
    return variant, params


SWITCHES = [(False, "none"), (True, "dots_saveable")]


@pytest.mark.parametrize("scan_layers,remat_policy", SWITCHES)
def test_encoder_decoder_kv_cache_decoding_equals_the_full_forward(
    s2s_reference, scan_layers, remat_policy
):
    _, _, src, src_lengths, tgt_in, forward = s2s_reference
    full = forward(s2s_reference[1], tgt_in)  # teacher-forced, causal
    model, params = _s2s_variant(s2s_reference, scan_layers, remat_policy)
    encoded = jax.jit(
        lambda p: model.apply({"params": p}, src, src_lengths, method=EncoderDecoder.encode)
    )(params)
    decoder = model.clone(kv_cache=True)
    cache = init_cache(model, B, tgt_in.shape[1])
    expected = _abstract(decoder, src, src_lengths, tgt_in)["cache"]  # init on the full input
    assert jax.tree.map(jnp.shape, cache) == jax.tree.map(lambda s: s.shape, expected)
    assert cache["position"].shape == (B,)
    if scan_layers:  # the per-layer caches are stacked on the layers axis
        key = cache["decoder"]["layers"]["self_attention"]["cached_key"]
        assert key.shape[:3] == (S2S["num_decoder_layers"], B, tgt_in.shape[1])

    @jax.jit
    def step(cache, chunk, lengths=None):
        return decoder.apply(
            {"params": params, "cache": cache},
            encoded,
            src_lengths,
            chunk,
            lengths,
            method=EncoderDecoder.decode,
            mutable=["cache"],
        )

    outs = []
    for t in range(tgt_in.shape[1]):
        logits, mutated = step(cache, tgt_in[:, t : t + 1])
        cache = mutated["cache"]
        outs.append(logits)
    np.testing.assert_allclose(jnp.concatenate(outs, axis=1), full, atol=1e-5)
    np.testing.assert_array_equal(cache["position"], [tgt_in.shape[1]] * B)
    if scan_layers:
        return
    # A ragged first chunk (5 and 2 real tokens), then one token at a time.
    logits, mutated = step(init_cache(model, B, tgt_in.shape[1]), tgt_in[:, :5], jnp.array([5, 2]))
    np.testing.assert_allclose(logits[0], full[0, :5], atol=1e-5)
    np.testing.assert_allclose(logits[1, :2], full[1, :2], atol=1e-5)
    cache = mutated["cache"]
    for t in range(2):
        nxt = jnp.stack([tgt_in[0, 5 + t], tgt_in[1, 2 + t]])[:, None]
        logits, mutated = step(cache, nxt)
        cache = mutated["cache"]
        np.testing.assert_allclose(logits[0, 0], full[0, 5 + t], atol=1e-5)
        np.testing.assert_allclose(logits[1, 0], full[1, 2 + t], atol=1e-5)


def _uncached_greedy(forward, params, batch, steps):
    """The reference: the whole teacher-forced decoder over the growing target, each step."""
    buf = np.zeros((batch, steps), np.int32)
    buf[:, 0] = BOS
    out = np.zeros((batch, steps), np.int32)
    for t in range(steps):
        logits = np.asarray(forward(params, jnp.asarray(buf)))
        out[:, t] = np.argmax(logits[:, t], axis=-1)
        if t + 1 < steps:
            buf[:, t + 1] = out[:, t]
    return out


@pytest.fixture(scope="module")
def s2s_uncached_greedy(s2s_reference):
    _, params, _, _, tgt_in, forward = s2s_reference
    return _uncached_greedy(forward, params, B, tgt_in.shape[1])


@pytest.mark.parametrize("scan_layers,remat_policy", SWITCHES)
def test_greedy_translate_equals_the_uncached_greedy_loop(
    s2s_reference, s2s_uncached_greedy, scan_layers, remat_policy
):
    _, _, src, src_lengths, tgt_in, _ = s2s_reference
    model, params = _s2s_variant(s2s_reference, scan_layers, remat_policy)
    steps = tgt_in.shape[1]
    got = greedy_translate(model, params, src, src_lengths, max_length=steps, bos_id=BOS)
    assert got.shape == (B, steps) and got.dtype == jnp.int32
    ref = s2s_uncached_greedy
    assert len(np.unique(ref)) > 2  # the random model does not just repeat one token
    np.testing.assert_array_equal(got, ref)
    if scan_layers:
        return
    # With an EOS: everything after each sequence's first EOS is padding.
    eos = int(ref[1, 3])
    with_eos = np.asarray(greedy_translate(model, params, src, src_lengths, max_length=steps,
                                           bos_id=BOS, eos_id=eos, pad_id=0))  # fmt: skip
    ends = []
    for b in range(B):
        hits = np.flatnonzero(ref[b] == eos)
        ends.append(hits[0] + 1 if hits.size else steps)
        np.testing.assert_array_equal(with_eos[b, : ends[-1]], ref[b, : ends[-1]])
        assert not with_eos[b, ends[-1] :].any()
    assert any(1 < end < steps for end in ends)  # some sequence stops in the middle
    # Inside an outer jit (as in the eval step), and the argument checks.
    jitted = jax.jit(lambda p, s: greedy_translate(model, p, s, src_lengths, max_length=steps,
                                                    bos_id=BOS))  # fmt: skip
    np.testing.assert_array_equal(jitted(params, src), ref)
    with pytest.raises(ValueError, match="max_len=12"):
        greedy_translate(model, params, src, src_lengths, max_length=13, bos_id=BOS)
    with pytest.raises(ValueError, match="src_lengths"):
        greedy_translate(model, params, src, jnp.array([3]), max_length=4, bos_id=BOS)
    with pytest.raises(ValueError, match="eos_id=13"):
        greedy_translate(model, params, src, max_length=4, bos_id=BOS, eos_id=13)


def test_heads_that_do_not_split_the_width_are_named():
    """Was attention's "features (16) not divisible by num_heads (3); set head_dim
    explicitly", from deep inside the first layer."""
    tokens = jnp.zeros((1, 4), jnp.int32)
    small = {"vocab_size": 11, "embed_dim": 16, "mlp_dim": 32, "max_len": 8}
    layers = {"num_encoder_layers": 1, "num_decoder_layers": 1}
    for model, args in (
        (DecoderOnlyLM(**small, num_layers=1, num_heads=3), (tokens,)),
        (EncoderDecoder(**small, **layers, num_heads=3), (tokens, tokens)),
    ):
        with pytest.raises(ConfigError, match="embed_dim 16 is not divisible by num_heads 3"):
            model.init(jax.random.key(0), *args)
    with pytest.raises(
        ConfigError, match="num_heads must be >= 1, got 0"
    ):  # (was a ZeroDivisionError)
        DecoderOnlyLM(**small, num_layers=1, num_heads=0).init(jax.random.key(0), tokens)
    # A head size given: any number of heads.
    DecoderOnlyLM(**small, num_layers=1, num_heads=3, head_dim=8).init(jax.random.key(0), tokens)
