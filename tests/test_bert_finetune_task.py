"""BERT fine-tuning in the application: from scratch, from a pretraining workdir of this
library, and from a Hugging Face directory."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("tokenizers", reason="needs the text extra (tokenizers)")

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from jaxmodels import bert  # noqa: E402
from tests.test_train_app import load_config  # noqa: E402
from train import logs  # noqa: E402
from train.tasks import bert_finetune, bert_pretraining  # noqa: E402
from train.trainer import train_and_evaluate  # noqa: E402


def _finetune(tmp_path, name, model=None, **overrides):
    config = load_config("bert_finetune.py", "smoke")
    for k, v in overrides.items():
        setattr(config, k, v)
    for k, v in (model or {}).items():
        setattr(config.model, k, v)
    result = train_and_evaluate(config, str(tmp_path / name))
    assert np.isfinite(result["eval/loss"]) and 0 <= result["eval/accuracy"] <= 1
    return config, result


def test_from_scratch(tmp_path):
    _finetune(tmp_path, "scratch")
    assert (tmp_path / "scratch" / "vocab.txt").exists()


@pytest.mark.parametrize(
    "pre_scan,ft_scan", [(False, True), (True, False)], ids=["unrolled->scan", "scan->unrolled"]
)
def test_from_a_pretraining_workdir(tmp_path, pre_scan, ft_scan):
    """The architecture comes from the pretraining run, how it runs from the fine-tuning
    config (None: the default, not what pretraining ran with), except the layer layout
    (None: the pretraining run's; another is converted). A resumed run runs as it did."""
    pre = load_config("bert_pretrain.py", "smoke")
    pre.model.scan_layers = pre_scan
    pre.model.remat_policy = "full"
    train_and_evaluate(pre, str(tmp_path / "pre"))
    # As a run on a GPU records it: an implementation this machine has not.
    pre_json = json.loads((tmp_path / "pre" / "config.json").read_text())
    pre_json["model"]["implementation"] = "cudnn"
    (tmp_path / "pre" / "config.json").write_text(json.dumps(pre_json))
    # A new run takes none of how the pretraining ran but its layer layout.
    config = load_config("bert_finetune.py", "smoke")
    config.init_from = str(tmp_path / "pre")
    (tmp_path / "ft1").mkdir()
    model, _, _ = bert_finetune.model_and_tokenizer(config, str(tmp_path / "ft1"), 10, [])
    c = model.config
    assert (c.remat_policy, c.implementation, c.scan_layers) == (None, None, pre_scan)
    assert c.to_hf_dict() == bert_pretraining.model_config(pre, c.vocab_size).to_hf_dict()
    config, _ = _finetune(
        tmp_path,
        "ft",
        model={"remat_policy": "dots", "implementation": "xla"},
        init_from=str(tmp_path / "pre"),
    )
    assert logs.read_metrics(str(tmp_path / "ft"))
    # Resuming, the run keeps how it ran unless the config now says otherwise.
    config.model.remat_policy = config.model.implementation = None
    resumed, _, _ = bert_finetune.model_and_tokenizer(config, str(tmp_path / "ft"), 10, [])
    c = resumed.config
    assert (c.remat_policy, c.implementation, c.scan_layers) == ("dots", "xla", pre_scan)
    assert c.param_dtype == jnp.float32
    config.model.remat_policy = "full"
    resumed, _, _ = bert_finetune.model_and_tokenizer(config, str(tmp_path / "ft"), 10, [])
    assert resumed.config.remat_policy == "full"
    config.model.remat_policy = None
    # The encoder it starts from is exactly the pretrained one.
    config.model.scan_layers = ft_scan
    (tmp_path / "ft2").mkdir()
    model, tokenizer, init_params = bert_finetune.model_and_tokenizer(
        config, str(tmp_path / "ft2"), 10, []
    )
    assert init_params is not None
    assert model.config.scan_layers == ft_scan
    assert tokenizer.get_vocab_size() == model.config.vocab_size
    variables = nn.meta.unbox(model.init(jax.random.PRNGKey(0), np.zeros((1, 8), np.int32)))
    started = init_params(jax.device_get(variables["params"]))
    saved = bert.layer_layout(bert_finetune._pretrained_bert_params(str(tmp_path / "pre")), ft_scan)
    for a, b in zip(jax.tree.leaves(started["bert"]), jax.tree.leaves(saved), strict=True):
        np.testing.assert_array_equal(a, b)
    assert "classifier" in started
    # Resuming needs its own checkpoints, not the pretraining workdir (was: FileNotFoundError).
    (tmp_path / "pre").rename(tmp_path / "gone")
    config.total_steps += 3
    _finetune(tmp_path, "ft", init_from=str(tmp_path / "pre"), total_steps=config.total_steps)
    assert logs.read_metrics(str(tmp_path / "ft"))[-1]["step"] == config.total_steps


@pytest.mark.reference
def test_from_a_hugging_face_directory(tmp_path):
    transformers = pytest.importorskip("transformers", reason="needs the reference extra")
    pre = load_config("bert_pretrain.py", "smoke")
    train_and_evaluate(pre, str(tmp_path / "pre"))  # only for a vocabulary
    vocab = (tmp_path / "pre" / "vocab.txt").read_text()
    hf = tmp_path / "hf"
    hf_config = transformers.BertConfig(
        vocab_size=len(vocab.split("\n")) - 1,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
    )
    transformers.BertForPreTraining(hf_config).save_pretrained(str(hf))
    (hf / "vocab.txt").write_text(vocab)
    _finetune(tmp_path, "ft", init_from=str(hf))


def test_a_pretraining_vocab_file_is_kept_in_the_workdir(tmp_path):
    """Fine-tuning from a pretraining workdir reads its vocab.txt, also when the run was
    given config.vocab_file; a workdir keeps the vocabulary it started with."""
    from jaxmodels.errors import ConfigError

    special = "[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\n"
    (tmp_path / "mine.txt").write_text(special + "the\nof\n")
    (tmp_path / "other.txt").write_text(special + "of\nthe\n")
    config = load_config("bert_pretrain.py", "smoke")
    config.vocab_file = str(tmp_path / "mine.txt")
    workdir = tmp_path / "pre"
    workdir.mkdir()
    tokenizer = bert_pretraining.tokenizer_for(config, str(workdir), [])
    assert (workdir / "vocab.txt").read_text() == (tmp_path / "mine.txt").read_text()
    assert tokenizer.token_to_id("of") == 6
    assert bert_pretraining.tokenizer_for(config, str(workdir), []).token_to_id("of") == 6
    config.vocab_file = str(tmp_path / "other.txt")
    # Before the first checkpoint nothing holds the workdir to its vocabulary: a new start
    # takes the file it is given.
    assert bert_pretraining.tokenizer_for(config, str(workdir), []).token_to_id("of") == 5
    config.vocab_file = str(tmp_path / "mine.txt")
    bert_pretraining.tokenizer_for(config, str(workdir), [])
    _checkpointed(workdir)
    config.vocab_file = str(tmp_path / "other.txt")
    with pytest.raises(ConfigError, match=r"vocab_file=\S*other.txt is not the vocabulary"):
        bert_pretraining.tokenizer_for(config, str(workdir), [])


def _checkpointed(workdir):
    """`workdir` as a run that saved a checkpoint leaves it (what the state is does not
    matter to the task's files)."""
    from jaxmodels import checkpoint

    ckpt = checkpoint.Checkpointer(workdir / "checkpoints", async_save=False)
    ckpt.save(1, {"w": jnp.zeros(2)}, {})
    ckpt.close()


def _hf_directory(path, hf_class="BertModel", **fields):
    """A small Hugging Face BERT directory at `path`: `hf_class` of `fields` (over a
    one-layer, 45-token, 64-position default) and a vocab.txt of 45 tokens."""
    transformers = pytest.importorskip("transformers", reason="needs the reference extra")
    sizes = dict(vocab_size=45, hidden_size=32, num_hidden_layers=1, num_attention_heads=2)
    sizes.update(intermediate_size=64, max_position_embeddings=64)
    config = transformers.BertConfig(**{**sizes, **fields})
    getattr(transformers, hf_class)(config).save_pretrained(str(path))
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *(f"w{i}" for i in range(40))]
    (path / "vocab.txt").write_text("".join(f"{t}\n" for t in words))
    return path


def test_a_run_started_from_scratch_keeps_its_vocabulary_given_init_from_later(tmp_path):
    """Was: resuming with --config.init_from newly set replaced the workdir's vocab.txt
    with the source's (the checkpoint then trained under other token ids) and recorded the
    source as the run's start, or, for a source of another architecture, was refused after
    both files were rewritten, so that the run could not be resumed at all."""
    config = load_config("bert_finetune.py", "smoke")
    texts = [f"Document {i} has words. It has a second sentence {i}." for i in range(8)]
    workdir = tmp_path / "ft"
    workdir.mkdir()
    bert_finetune.model_and_tokenizer(config, str(workdir), 3, texts)
    vocab = (workdir / "vocab.txt").read_text()
    _checkpointed(workdir)
    config.init_from = str(tmp_path / "somewhere")  # never read: the run has its own start
    model, tokenizer, init_params = bert_finetune.model_and_tokenizer(config, str(workdir), 3, [])
    assert init_params is None and tokenizer.get_vocab_size() == model.config.vocab_size
    assert (workdir / "vocab.txt").read_text() == vocab
    assert json.loads((workdir / bert_finetune.INIT_RECORD).read_text()) == {"init_from": ""}


def test_a_start_record_left_without_checkpoints_is_replaced(tmp_path):
    """A start from init_from that ended before its first checkpoint leaves init_from.json;
    a run then started from scratch there read it when it resumed (another model)."""
    config = load_config("bert_finetune.py", "smoke")
    texts = [f"Document {i} has words. It has a second sentence {i}." for i in range(8)]
    (tmp_path / bert_finetune.INIT_RECORD).write_text('{"init_from": "elsewhere"}')
    bert_finetune.model_and_tokenizer(config, str(tmp_path), 3, texts)
    assert json.loads((tmp_path / bert_finetune.INIT_RECORD).read_text()) == {"init_from": ""}


@pytest.mark.reference
def test_a_run_of_a_version_that_kept_no_start_record_reads_its_source_again(tmp_path):
    """Versions before the start record resumed a run started from init_from by reading
    the source again; taking such a run for one started from scratch trained a new
    vocabulary over its checkpoints' ids."""
    from jaxmodels.errors import DataError

    hf = _hf_directory(tmp_path / "hf")
    config = load_config("bert_finetune.py", "smoke")
    config.init_from = str(hf)
    workdir = tmp_path / "ft"
    workdir.mkdir()
    (workdir / "config.json").write_text(config.to_json_best_effort())  # what it started with
    _checkpointed(workdir)
    config.init_from = ""
    model, tokenizer, _ = bert_finetune.model_and_tokenizer(config, str(workdir), 3, [])
    assert tokenizer.get_vocab_size() == model.config.vocab_size == 45
    assert json.loads((workdir / bert_finetune.INIT_RECORD).read_text())["init_from"] == str(hf)
    # Its source gone, the error says where the path comes from (not --config.init_from).
    (workdir / bert_finetune.INIT_RECORD).unlink()
    hf.rename(tmp_path / "moved")
    config.init_from = str(tmp_path / "moved")
    with pytest.raises(DataError, match=r"started from init_from=\S*hf \(its config.json\) .*put"):
        bert_finetune.model_and_tokenizer(config, str(workdir), 3, [])


@pytest.mark.reference
@pytest.mark.parametrize(
    "hf_class,extra",
    [
        ("BertForSequenceClassification", {"num_labels": 2}),
        ("BertForMaskedLM", {}),
        ("BertForPreTraining", {"tie_word_embeddings": False}),
    ],
    ids=["2-label-classifier", "masked-lm-no-pooler", "untied-decoder"],
)
def test_from_a_hugging_face_encoder_whatever_its_heads(tmp_path, hf_class, extra):
    """Only the encoder of a Hugging Face directory is used: another classifier (of another
    number of labels) or an untied decoder does not matter, a missing pooler starts new."""
    hf = _hf_directory(tmp_path / "hf", hf_class, num_hidden_layers=2, **extra)
    config = load_config("bert_finetune.py", "smoke")
    config.init_from = str(hf)
    (tmp_path / "ft").mkdir()
    model, tokenizer, init_params = bert_finetune.model_and_tokenizer(
        config, str(tmp_path / "ft"), 10, []
    )
    assert model.num_labels == 10 and tokenizer.get_vocab_size() == 45
    variables = nn.meta.unbox(model.init(jax.random.PRNGKey(0), np.zeros((1, 8), np.int32)))
    fresh = jax.device_get(variables["params"])
    if hf_class == "BertForMaskedLM":
        with pytest.warns(UserWarning, match="has no pooler"):
            started = init_params(fresh)
        jax.tree.map(
            np.testing.assert_array_equal, started["bert"]["pooler"], fresh["bert"]["pooler"]
        )
    else:
        started = init_params(fresh)
    _, encoder, _ = bert.from_pretrained(str(hf), bert.BertModel)
    for name, tree in encoder["params"].items():
        jax.tree.map(np.testing.assert_array_equal, started["bert"][name], tree)
    assert started["classifier"]["kernel"].shape == (32, 10)


@pytest.mark.reference
def test_a_source_that_cannot_hold_the_inputs_is_named_before_anything_is_written(tmp_path):
    """Were: NaN at step 1 blamed on the learning rate (a vocab.txt longer than the model's
    embedding table), a traceback naming no config key (max_length past the positions),
    and in both cases init_from.json and vocab.txt left in the workdir."""
    from jaxmodels.errors import ConfigError, DataError

    config = load_config("bert_finetune.py", "smoke")
    for name, sizes, error, message in (
        ("short_vocab", {"vocab_size": 30}, DataError, r"has 45 tokens but its model's vocab_"),
        (
            "short_positions",
            {"max_position_embeddings": 16},
            ConfigError,
            rf"max_length={config.max_length} is longer than the 16 positions of init_from=",
        ),
    ):
        hf = _hf_directory(tmp_path / name, **sizes)
        config.init_from = str(hf)
        workdir = tmp_path / f"ft_{name}"
        workdir.mkdir()
        with pytest.raises(error, match=message):
            bert_finetune.model_and_tokenizer(config, str(workdir), 3, [])
        assert not list(workdir.iterdir())


def test_bad_init_from_is_a_clear_error(tmp_path):
    from jaxmodels.errors import DataError

    with pytest.raises(DataError, match=r"init_from=\S*nowhere is not a directory; give a pre"):
        _finetune(tmp_path, "ft", init_from=str(tmp_path / "nowhere"))
    (tmp_path / "pre" / "checkpoints").mkdir(parents=True)
    (tmp_path / "pre" / "config.json").write_text("{}")
    with pytest.raises(DataError, match=r"init_from=\S*pre has no vocab.txt; give"):
        _finetune(tmp_path, "ft", init_from=str(tmp_path / "pre"))
    (tmp_path / "pre" / "vocab.txt").write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\n")
    with pytest.raises(DataError, match=r"init_from=\S*pre: no checkpoint in"):
        _finetune(tmp_path, "ft", init_from=str(tmp_path / "pre"))
    # A pretraining workdir whose checkpoints/ was deleted (was read as a Hugging Face
    # directory: "no weights ...: expected model.safetensors or pytorch_model.bin").
    (tmp_path / "pre" / "checkpoints").rmdir()
    (tmp_path / "pre" / "config.json").write_text('{"task": "bert_pretraining"}')
    with pytest.raises(DataError, match=r"init_from=\S*pre: no checkpoint in"):
        _finetune(tmp_path, "ft", init_from=str(tmp_path / "pre"))
