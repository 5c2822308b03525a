"""BERT fine-tuning in the application: from scratch, from a pretraining workdir of this
library, and from a Hugging Face directory."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("tokenizers", reason="needs the text extra (tokenizers)")

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402

from jaxmodels import bert  # noqa: E402
from tests.test_train_app import load_config  # noqa: E402
from train import logs  # noqa: E402
from train.tasks import bert_finetune  # noqa: E402
from train.trainer import train_and_evaluate  # noqa: E402


def _finetune(tmp_path, name, **overrides):
    config = load_config("bert_finetune.py", "smoke")
    for k, v in overrides.items():
        setattr(config, k, v)
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
    """The architecture comes from the pretraining run, how it runs (here the layer layout)
    from the fine-tuning config: the checkpoint's layers are converted."""
    pre = load_config("bert_pretrain.py", "smoke")
    pre.model.scan_layers = pre_scan
    train_and_evaluate(pre, str(tmp_path / "pre"))
    config, _ = _finetune(tmp_path, "ft", init_from=str(tmp_path / "pre"))
    assert logs.read_metrics(str(tmp_path / "ft"))
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
