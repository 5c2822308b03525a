"""BERT pretraining in the application: metrics, vocabulary kept across restarts."""

from __future__ import annotations

import os

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
