"""The LSTM text classifier in the application: it learns the embedded text, keeps its
vocabulary across restarts, and a sharded step equals the single-device step."""

from __future__ import annotations

import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxmodels import optim, rnn, sharding, training
from jaxmodels.errors import ConfigError
from tests.test_train_app import load_config
from train import logs
from train.data import text
from train.trainer import train_and_evaluate

# The most frequent class is ~15% of the test split; 0.35 is well over twice that (runs of
# this size reach ~0.50).
LEARNS = 0.35


def test_lstm_text_learns_the_embedded_docstrings(tmp_path):
    config = load_config("lstm_text.py")
    config.total_steps = 400
    config.eval_every = 200
    config.checkpoint_every = 200
    config.max_length = 64
    config.model.hidden_size = 64
    config.model.embed_dim = 32
    config.optimizer.learning_rate = 3e-3
    result = train_and_evaluate(config, str(tmp_path))
    assert result["eval/accuracy"] > LEARNS, result
    rows = logs.read_metrics(str(tmp_path))
    first = next(r for r in rows if "train/loss" in r)
    last = [r for r in rows if "train/loss" in r][-1]
    assert last["train/loss"] < first["train/loss"]


def test_vocabulary_is_saved_and_reused_on_resume(tmp_path):
    config = load_config("lstm_text.py", "smoke")
    train_and_evaluate(config, str(tmp_path))
    path = tmp_path / "tokenizer.json"
    vocab = text.WordTokenizer.load(str(path)).vocab
    assert 2 < len(vocab) <= config.vocab_size
    stamp = os.path.getmtime(path)
    config.total_steps = 15
    train_and_evaluate(config, str(tmp_path))
    assert os.path.getmtime(path) == stamp
    assert text.WordTokenizer.load(str(path)).vocab == vocab


def test_a_vocabulary_left_by_a_start_without_checkpoints_is_made_anew(tmp_path):
    """A start stopped before its first checkpoint leaves `tokenizer.json`; the next start,
    perhaps of another dataset or vocab_size, was quietly given it (most words `<unk>`)."""
    config = load_config("lstm_text.py", "smoke")
    text.WordTokenizer.build(["stale words only"], 100).save(str(tmp_path / "tokenizer.json"))
    config.total_steps = 1
    train_and_evaluate(config, str(tmp_path))
    vocab = text.WordTokenizer.load(str(tmp_path / "tokenizer.json")).vocab
    assert "stale" not in vocab and len(vocab) > 10


def test_vocabulary_larger_than_the_model_is_refused(tmp_path):
    config = load_config("lstm_text.py", "smoke")
    train_and_evaluate(config, str(tmp_path))
    config.vocab_size = 10
    with pytest.raises(Exception, match="vocab_size=10"):
        train_and_evaluate(config, str(tmp_path))


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        (
            "pooling",
            "avg",
            r"cannot build its model and data: ValueError: pooling must be one of .*got "
            r"'avg' \(raised at \S+:\d+; most likely",
        ),
        # Were a ZeroDivisionError where the model first used it, and the size-0
        # parameters below: the key is named.
        ("hidden_size", 0, "config key model.hidden_size must be >= 1 .*got 0"),
        ("num_layers", -1, "config key model.num_layers must be >= 1 .*got -1"),
        ("embed_dim", 0, "config key model.embed_dim must be >= 1"),
        # A size the keys' pattern misses is still found before the first checkpoint (which
        # cannot save an array of size 0).
        ("embed_dim", "unchecked 0", r"makes parameters of size 0 \(Embed_0/embedding, "),
    ],
)
def test_a_model_setting_the_model_cannot_take_is_a_config_error(
    tmp_path, monkeypatch, key, value, message
):
    """Were the model's own errors, tracebacks and all, and the new workdir was left with
    the run's vocabulary in it."""
    from train import trainer

    config = load_config("lstm_text.py", "smoke")
    if value == "unchecked 0":
        monkeypatch.setattr(trainer, "_MODEL_COUNT", re.compile("(?!)"))
        value = 0
    config.model[key] = value
    with pytest.raises(ConfigError, match=message):
        train_and_evaluate(config, str(tmp_path / "new"))
    assert not os.path.exists(tmp_path / "new")  # made by this start, and nothing of the run


def _lstm_step(mesh_kw, rules_name):
    mesh = sharding.make_mesh(**mesh_kw)
    rules = sharding.logical_rules(rules_name)
    model = rnn.LSTMClassifier(64, 16, 16, 2, 5, bidirectional=True)
    # SGD is linear in the gradient: float32 reordering noise stays at its own size.
    tx = optim.make_optimizer("sgd", 0.5, total_steps=10)
    example = [jnp.zeros((1, 12), jnp.int32), jnp.array([12])]
    state, shardings = training.create_train_state(
        model, tx, example, jax.random.PRNGKey(0), mesh, rules
    )
    loss_fn, _ = training.classification_fns(model, inputs=lambda b: (b["tokens"], b["length"]))
    step = training.compile_train_step(loss_fn, shardings, mesh, rules)
    rng = np.random.default_rng(0)
    for _ in range(2):
        batch = {
            "tokens": rng.integers(0, 64, size=(16, 12)).astype(np.int32),
            "length": rng.integers(1, 13, size=(16,)).astype(np.int32),
            "label": rng.integers(0, 5, size=(16,)).astype(np.int32),
        }
        state, metrics = step(state, batch)
    return jax.device_get(state.params), float(metrics["loss"])


@pytest.mark.parametrize(
    "mesh_kw,rules_name", [({"data": 8}, "data"), ({"data": 2, "fsdp": 4}, "fsdp")]
)
def test_sharded_lstm_step_equals_single_device(mesh_kw, rules_name):
    ref, ref_loss = _lstm_step({"devices": jax.devices()[:1], "data": 1}, "data")
    got, got_loss = _lstm_step(mesh_kw, rules_name)
    np.testing.assert_allclose(got_loss, ref_loss, rtol=1e-5)
    for (path, a), b in zip(
        jax.tree_util.tree_leaves_with_path(ref), jax.tree.leaves(got), strict=True
    ):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6, err_msg=jax.tree_util.keystr(path))
