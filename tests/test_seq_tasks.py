"""The Transformer tasks in the application: the seq2seq toy translation (reversal) and the
byte-level language model on the embedded docstrings. Configs parse, smoke variants run,
both tasks learn, sampling works, and an unprepared WMT fails with a clear message."""

from __future__ import annotations

import ast
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxmodels.errors import ConfigError, DataError
from jaxmodels.transformer import EncoderDecoder
from tests.test_train_app import load_config
from tests.test_transformer import S2S, _random_params
from train import logs
from train.data import sequences
from train.tasks import language_model, seq2seq
from train.trainer import train_and_evaluate, validate_config

VARIANTS = [
    ("transformer_seq2seq.py", None),
    ("transformer_seq2seq.py", "smoke"),
    ("transformer_seq2seq.py", "sort"),
    ("transformer_seq2seq.py", "wmt"),
    ("transformer_lm.py", None),
    ("transformer_lm.py", "smoke"),
]

# Reversal over 29 symbols: chance is ~1/29 per token (a model that knows only the length
# and EOS gets ~0.1). 0.5 is far above that; these 250 steps at lr 3e-3 reach ~0.93
# (sequence accuracy ~0.5); at lr 1e-3 they reach only ~0.6.
REVERSAL_LEARNS = 0.5


@pytest.mark.parametrize("name,variant", VARIANTS)
def test_configs_parse_and_validate(name, variant):
    config = load_config(name, variant)
    validate_config(config)
    assert config.model.remat_policy in ("none", "full", "dots_saveable")
    assert isinstance(config.model.scan_layers, bool)


def test_toy_data_is_deterministic_and_correct():
    for kind in ("reverse", "sort"):
        source = sequences.ToyTranslation(kind, "train", 32, 4, 16)
        a, b = source[123], source[123]
        assert all(np.array_equal(a[k], b[k]) for k in a)
        n = int(a["src_length"])
        assert 4 <= n <= 16 and int(a["tgt_length"]) == n + 1
        src = a["src"][:n]
        expected = src[::-1] if kind == "reverse" else np.sort(src)
        assert a["tgt_out"][:n].tolist() == expected.tolist()
        assert a["tgt_out"][n] == sequences.EOS and a["tgt_in"][0] == sequences.BOS
        assert a["tgt_in"][1 : n + 1].tolist() == expected.tolist()
        assert src.min() >= 3 and src.max() < 32 and not a["src"][n:].any()
    test = sequences.ToyTranslation("reverse", "test", 32, 4, 16, size=10)
    assert len(test) == 10 and not np.array_equal(test[0]["src"], source[0]["src"])
    with pytest.raises(ConfigError, match="min_length"):
        sequences.ToyTranslation("reverse", "train", 32, 5, 4)
    assert sequences.decode_bytes(sequences.encode_bytes("héllo")) == "héllo"


@pytest.mark.parametrize("name", ["transformer_seq2seq.py", "transformer_lm.py"])
def test_smoke_variants_train(name, tmp_path):
    config = load_config(name, "smoke")
    result = train_and_evaluate(config, str(tmp_path))
    rows = [r for r in logs.read_metrics(str(tmp_path)) if "train/loss" in r]
    assert rows[-1]["step"] == config.total_steps
    assert np.isfinite(rows[-1]["train/loss"])
    assert {"eval/loss", "eval/token_accuracy"} <= set(result)
    assert np.isfinite(result["eval/loss"])
    if name == "transformer_seq2seq.py":
        assert 0.0 <= result["eval/sequence_accuracy"] <= 1.0


def test_reversal_learns(tmp_path):
    config = load_config("transformer_seq2seq.py")
    config.total_steps = 250
    config.eval_every = 0
    config.checkpoint_every = 0
    config.optimizer.warmup_steps = 50
    config.optimizer.learning_rate = 3e-3
    config.eval_examples = 128
    result = train_and_evaluate(config, str(tmp_path))
    assert result["eval/token_accuracy"] > REVERSAL_LEARNS, result
    assert result["eval/sequence_accuracy"] <= result["eval/token_accuracy"]


def test_language_model_lowers_eval_loss_and_samples(tmp_path, capsys):
    config = load_config("transformer_lm.py")
    config.max_length = 64
    config.model.embed_dim = 64
    config.model.mlp_dim = 128
    config.model.num_layers = 1
    config.model.scan_layers = True  # the switch reaches the model
    config.model.remat_policy = "dots_saveable"
    config.batch_size = 16
    config.total_steps = 60
    config.eval_every = 20
    config.checkpoint_every = 0
    config.eval_examples = 64
    train_and_evaluate(config, str(tmp_path))
    evals = [r["eval/loss"] for r in logs.read_metrics(str(tmp_path)) if "eval/loss" in r]
    assert len(evals) == 3, evals
    assert evals[-1] < evals[0], evals
    out = language_model.sample(config, str(tmp_path), ["The ", "Return"], max_new_tokens=8)
    assert len(out) == 2 and all(isinstance(s, str) for s in out)
    # The run's own config by default, and from a shell.
    assert language_model.sample(None, str(tmp_path), ["The ", "Return"], 8) == out
    assert language_model.main([str(tmp_path), "The ", "Return", "--tokens", "8"]) == 0
    printed = capsys.readouterr().out.splitlines()[-2:]
    assert printed == [repr("The " + out[0]), repr("Return" + out[1])]
    assert "note:" not in capsys.readouterr().err
    # Other draws with another seed (was: the run's seed, always the same samples).
    config.sample_temperature, config.sample_top_k = 1.0, 0
    drawn = language_model.sample(config, str(tmp_path), ["The "] * 4, 16)
    assert (
        language_model.main(
            [str(tmp_path), *["The "] * 4, "--tokens", "16", "--temperature", "1", "--top-k", "0"]
        )
        == 0
    )
    assert capsys.readouterr().out.splitlines()[-4:] == [repr("The " + s) for s in drawn]
    assert (
        language_model.main(
            [
                str(tmp_path),
                *["The "] * 4,
                "--tokens",
                "16",
                "--temperature",
                "1",
                "--top-k",
                "0",
                "--seed",
                "7",
            ]
        )
        == 0
    )
    assert capsys.readouterr().out.splitlines()[-4:] != [repr("The " + s) for s in drawn]
    # More than the model's 64 positions hold: cut, and said so (was silent).
    assert language_model.main([str(tmp_path), "The ", "--tokens", "100"]) == 0
    captured = capsys.readouterr()
    assert "note: 60 new tokens, not 100: the model's max_length (64)" in captured.err
    assert len(ast.literal_eval(captured.out.splitlines()[-1])) <= 4 + 60
    assert language_model.main([str(tmp_path / "nowhere")]) == 2
    assert "is " + str(tmp_path / "nowhere") + " a run's workdir?" in capsys.readouterr().err
    # A run of another task (was: "unknown model 'SeedCNN' (config key model.name)").
    config = json.loads((tmp_path / "config.json").read_text())
    other = tmp_path / "images"
    other.mkdir()
    (other / "config.json").write_text(json.dumps(dict(config, task="image_classification")))
    assert language_model.main([str(other)]) == 2
    assert "is a run of task 'image_classification', not a language model" in (
        capsys.readouterr().err
    )


def test_language_model_prompts_start_with_eos_like_documents(monkeypatch):
    """The training stream separates documents with EOS and never holds BOS, so every prompt
    (empty or not) is fed after an EOS (was: BOS for an empty prompt, nothing before the
    others); long prompts keep their last max_len - 1 bytes. The budget counts the EOS and
    not the last new token, which is never fed back; the continuation stops at EOS."""
    from jaxmodels import checkpoint, transformer

    config = load_config("transformer_lm.py", "smoke")
    config.max_length = 8
    calls = []

    def fake_generate(model, params, prompt, lengths, *, max_new_tokens, **kwargs):
        calls.append((np.asarray(prompt), np.asarray(lengths), max_new_tokens))
        row = list(sequences.encode_bytes("hi")) + [sequences.EOS, 70]
        return np.array([row] * len(prompt), np.int32)

    monkeypatch.setattr(checkpoint, "load_params", lambda directory: None)
    monkeypatch.setattr(transformer, "generate", fake_generate)
    out = language_model.sample(config, "unused", ["", "ab", "0123456789"], max_new_tokens=50)
    assert out == ["hi"] * 3
    ((prompt, lengths, new),) = calls
    eos = sequences.EOS
    assert prompt[:, 0].tolist() == [eos] * 3
    assert lengths.tolist() == [1, 3, 8]
    assert prompt[1, :3].tolist() == [eos, *sequences.encode_bytes("ab")]
    assert prompt[2].tolist() == [eos, *sequences.encode_bytes("3456789")]
    assert new == 1  # 8 prompt positions + 1 new token - 1 = max_len
    language_model.sample(config, "unused", ["ab"], max_new_tokens=50)
    assert calls[-1][2] == 8 - 3 + 1


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        # was "the config's default" (0 meant unset): 28 tokens where 0 were asked for
        ("tokens", 0, r"new tokens \(--tokens, config key sample_tokens\) must be >= 1, got 0"),
        ("sample_tokens", -3, r"must be >= 1, got -3"),  # was a ValueError traceback
        (
            "sample_temperature",
            -1.0,
            r"sample_temperature \(--temperature\) must be >= 0",
        ),  # greedy
        ("sample_temperature", float("nan"), r"must be >= 0 \(0: greedy\), got nan"),
        ("sample_top_k", 1000, r"between 0 \(all tokens\) and the model's vocabulary size 259"),
    ],
)
def test_language_model_sampling_settings_it_cannot_use_are_named(monkeypatch, key, value, message):
    from jaxmodels import checkpoint

    monkeypatch.setattr(checkpoint, "load_params", lambda directory: pytest.fail("loaded"))
    config = load_config("transformer_lm.py", "smoke")
    tokens = None
    if key == "tokens":
        tokens = value
    else:
        setattr(config, key, value)
    with pytest.raises(ConfigError, match=message):
        language_model.sample(config, "unused", ["ab"], max_new_tokens=tokens)


def test_language_model_empty_prompt_samples_a_document_start(monkeypatch):
    """Every document starts with 'Q': greedy sampling from an empty prompt gives 'Q' first
    (from BOS, never seen in training, the model predicted noise)."""
    import optax

    from jaxmodels import checkpoint

    config = load_config("transformer_lm.py", "smoke")
    config.max_length = 16
    config.model.update(embed_dim=32, mlp_dim=64, num_heads=2, num_layers=1)
    config.sample_temperature = 0.0
    rng = np.random.default_rng(0)
    docs = ["Q" + "".join(rng.choice(list("abcde"), rng.integers(3, 8))) for _ in range(400)]
    windows = sequences.Windows(sequences.byte_stream(docs), config.max_length)
    model = language_model.make_model(config)
    params = model.init(jax.random.key(0), jnp.zeros((1, config.max_length), jnp.int32))
    params = params["params"]
    opt = optax.adam(3e-3)

    @jax.jit
    def step(params, state, tokens, labels):
        def loss(p):
            logits = model.apply({"params": p}, tokens)
            return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

        grads = jax.grad(loss)(params)
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    state = opt.init(params)
    for _ in range(100):
        batch = [windows[int(i)] for i in rng.integers(0, len(windows), 32)]
        tokens, labels = (np.stack([b[k] for b in batch]) for k in ("tokens", "labels"))
        params, state = step(params, state, tokens, labels)
    monkeypatch.setattr(checkpoint, "load_params", lambda directory: params)
    out = language_model.sample(config, "unused", ["", "Q"], max_new_tokens=3)
    assert out[0].startswith("Q"), out
    assert out[1] and set(out[1]) <= set("abcde"), out


def test_wmt_variant_fails_offline_naming_tfds_build(tmp_path):
    config = load_config("transformer_seq2seq.py", "wmt")
    config.data_dir = str(tmp_path / "tfds")
    with pytest.raises(DataError, match="tfds build wmt14_translate/de-en"):
        train_and_evaluate(config, str(tmp_path / "work"))


def test_translation_languages_of_tfds_names():
    assert sequences.translation_languages("wmt14_translate/de-en") == ("de", "en")
    assert sequences.translation_languages("wmt14_translate/de-en:1.0.0") == ("de", "en")
    assert sequences.translation_languages("ted_hrlr_translate/pt_to_en") == ("pt", "en")
    with pytest.raises(ConfigError, match="cannot tell the languages"):
        sequences.translation_languages("wmt14_translate")


def _uncached_greedy_decode(model, params, batch, steps):
    """The greedy decoding `seq2seq.greedy_decode` had before the KV cache: the whole decoder
    over the target buffer at every step."""
    src_lengths = jnp.maximum(batch["src_length"], 1)
    variables = {"params": params}
    encoded = model.apply(variables, batch["src"], src_lengths, method=EncoderDecoder.encode)
    n = batch["src"].shape[0]
    tokens = jnp.zeros((n, steps), jnp.int32).at[:, 0].set(sequences.BOS)
    preds = jnp.zeros((n, steps), jnp.int32)

    def body(t, carry):
        tokens, preds = carry
        logits = model.apply(
            variables, encoded, src_lengths, tokens, None, method=EncoderDecoder.decode
        )
        nxt = jnp.argmax(jax.lax.dynamic_index_in_dim(logits, t, 1, False), -1).astype(jnp.int32)
        preds = jax.lax.dynamic_update_index_in_dim(preds, nxt, t, 1)
        write = jnp.minimum(t + 1, steps - 1)
        tokens = jax.lax.dynamic_update_index_in_dim(tokens, nxt, write, 1)
        return tokens, preds

    return jax.lax.fori_loop(0, steps, body, (tokens, preds))[1]


def test_cached_greedy_decode_equals_the_uncached_loop():
    model = EncoderDecoder(**S2S)
    rng = np.random.default_rng(4)
    src = rng.integers(3, S2S["vocab_size"], size=(3, 7)).astype(np.int32)
    src_length = np.array([7, 3, 0], np.int32)  # the last row is eval padding
    src[np.arange(7)[None, :] >= src_length[:, None]] = 0
    batch = {"src": jnp.asarray(src), "src_length": jnp.asarray(src_length)}
    steps = 8
    params = _random_params(model, batch["src"], batch["src_length"], jnp.zeros((3, steps), int))
    got = jax.jit(lambda p, b: seq2seq.greedy_decode(model, p, b, steps))(params, batch)
    ref = jax.jit(lambda p, b: _uncached_greedy_decode(model, p, b, steps))(params, batch)
    assert got.shape == (3, steps) and len(np.unique(ref)) > 2
    np.testing.assert_array_equal(got, ref)


def test_a_head_size_is_a_config_key_of_both_transformer_tasks():
    """The heads error's advice ("or give head_dim") had no key to take it."""

    from train.tasks import language_model

    config = load_config("transformer_lm.py", "smoke")
    config.model.num_heads, config.model.head_dim = 3, 8
    model = language_model.make_model(config)
    assert (model.num_heads, model.head_dim) == (3, 8)
    model.init(jax.random.key(0), np.zeros((1, 4), np.int32))
    assert load_config("transformer_seq2seq.py").model.head_dim is None
