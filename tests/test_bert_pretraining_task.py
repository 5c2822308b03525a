"""BERT pretraining in the application: metrics, vocabulary kept across restarts."""

from __future__ import annotations

import os

import numpy as np
import pytest

pytest.importorskip("tokenizers", reason="needs the text extra (tokenizers)")

from tests.test_train_app import load_config  # noqa: E402
from train import logs  # noqa: E402
from train.trainer import train_and_evaluate  # noqa: E402


def test_pretraining_logs_mlm_and_nsp_and_keeps_its_vocabulary(tmp_path):
    config = load_config("bert_pretrain.py", "smoke")
    result = train_and_evaluate(config, str(tmp_path))
    assert {"eval/mlm_accuracy", "eval/nsp_accuracy", "eval/mlm_loss", "eval/nsp_loss"} <= set(
        result
    )
    rows = [r for r in logs.read_metrics(str(tmp_path)) if "train/loss" in r]
    assert {"train/mlm_loss", "train/nsp_loss"} <= set(rows[0])
    vocab = tmp_path / "vocab.txt"
    words = vocab.read_text().split("\n")
    assert words[:5] == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    stamp = os.path.getmtime(vocab)
    config.total_steps = 9
    train_and_evaluate(config, str(tmp_path))  # resumes: same vocabulary file, untouched
    assert os.path.getmtime(vocab) == stamp


def test_runs_of_any_seed_are_scored_on_the_same_pairs():
    from tests.test_train_app import load_config
    from train.data import mlm
    from train.tasks import bert_pretraining

    config = load_config("bert_pretrain.py", "smoke")
    texts = [f"Document {i} has words. It has a second sentence {i}." for i in range(8)]
    tokenizer = mlm.wordpiece(None, texts, vocab_size=100)
    examples = []
    for seed in (0, 1):
        config.seed = seed
        pairs = bert_pretraining.masked_pairs(config, texts, tokenizer)
        examples.append([pairs.eval(pairs.source[i], None) for i in range(8)])
    for a, b in zip(*examples, strict=True):
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])


def test_a_vocabulary_left_by_a_start_without_checkpoints_is_made_anew(tmp_path):
    """A start stopped before its first checkpoint leaves `vocab.txt`; the next start may
    have another corpus or vocab_size, and was quietly given the old vocabulary."""
    from train.tasks import bert_pretraining

    config = load_config("bert_pretrain.py", "smoke")
    stale = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "stale"]
    (tmp_path / "vocab.txt").write_text("".join(f"{w}\n" for w in stale))
    texts = [f"Document {i} has words. It has a second sentence {i}." for i in range(8)]
    tokenizer = bert_pretraining.tokenizer_for(config, str(tmp_path), texts)
    assert "stale" not in tokenizer.get_vocab()
    assert "document" in tokenizer.get_vocab()
    assert "stale" not in (tmp_path / "vocab.txt").read_text().split("\n")


def test_a_masking_cap_under_the_mask_rate_is_noted(capsys):
    """max_length raised alone (128 with the tiny config's 10 predictions) masked 8% of a
    full sequence, without a word."""
    from train.data import mlm
    from train.tasks import bert_pretraining

    texts = [f"Document {i} has words. It has a second sentence {i}." for i in range(4)]
    tokenizer = mlm.wordpiece(None, texts, vocab_size=100)
    config = load_config("bert_pretrain.py", "smoke")
    for max_length, max_predictions, noted in ((128, 10, True), (128, 19, False), (64, 9, False)):
        config.max_length, config.max_predictions = max_length, max_predictions
        bert_pretraining._note_masking_cap(bert_pretraining.masked_pairs(config, texts, tokenizer))
        err = capsys.readouterr().err
        assert (
            "note: max_predictions=10 masks at most 8% of a full sequence's 125 tokens, not "
            "15%: --config.max_predictions=19 masks 15% at max_length=128" in err
        ) == noted
