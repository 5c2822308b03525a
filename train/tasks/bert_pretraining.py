"""BERT pretraining: masked LM (on the masked positions only) + next-sentence prediction.

Corpus: the embedded `stdlib_docs` (real English prose shipped with Python) or any TFDS
text dataset by name (e.g. `wikipedia/20230601.en`, whose `text` is one article per
record), read lazily. WordPiece vocabulary: `config.vocab_file` if given (copied to
`workdir/vocab.txt`), else trained on the training corpus at the first start and saved as
`workdir/vocab.txt` (a resumed run loads it, so ids never change under a checkpoint).
"""

from __future__ import annotations

import os
import sys
from typing import Any

import jax
import jax.numpy as jnp

from jaxmodels import bert, losses
from jaxmodels.errors import ConfigError
from train.data import mlm, text
from train.tasks import Task, make_iterators, resuming, write_text_atomically

VOCAB_FILE = "vocab.txt"
_VOCAB_TRAIN_DOCS = 100_000  # documents read to train a vocabulary on a large corpus


class _Texts:
    """A TFDS source seen as a random-access sequence of document texts."""

    def __init__(self, source: Any, key: str):
        self.source, self.key = source, key

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int) -> str:
        return text.record_text(self.source[i], self.key)


def corpus(config: Any, split: str) -> Any:
    key = text.text_key_for(config.dataset, config.text_key or None)
    source = text.open_corpus(config.dataset, split, config.data_dir, key)
    if config.dataset == text.EMBEDDED:
        # Single-sentence docstrings could only give "random" pairs and skew the NSP labels.
        return [t for t in text.read_texts(source, key) if len(mlm.split_sentences(t)) >= 2]
    return _Texts(source, key)


def tokenizer_for(config: Any, workdir: str, train_texts: Any) -> Any:
    """The WordPiece tokenizer: the configured vocab file, the workdir's, or a new one.

    A configured file is copied to `workdir/vocab.txt`, which a fine-tuning run starting
    from the workdir reads; one that differs from the vocabulary the workdir already holds
    (its checkpoints' token ids) is a `ConfigError`."""
    saved = os.path.join(workdir, VOCAB_FILE)
    kept = resuming(workdir) and os.path.exists(saved)
    if config.vocab_file:
        tokenizer = mlm.wordpiece(config.vocab_file)  # checks the file
        with open(config.vocab_file, encoding="utf-8") as f:
            vocab = f.read()
        if kept:
            with open(saved, encoding="utf-8") as f:
                if f.read() != vocab:
                    raise ConfigError(
                        f"config key vocab_file={config.vocab_file} is not the vocabulary "
                        f"{saved} this workdir was started with; use that file, or another "
                        "workdir"
                    )
        else:
            write_text_atomically(saved, vocab)
        return tokenizer
    if kept:
        return mlm.wordpiece(saved)
    n = min(len(train_texts), _VOCAB_TRAIN_DOCS)
    vocab = mlm.train_vocabulary((train_texts[i] for i in range(n)), config.vocab_size)
    # vocab.txt: a token per line, in id order. Processes that train at once learn the same
    # vocabulary (see train_vocabulary).
    write_text_atomically(saved, "".join(f"{token}\n" for token in vocab))
    return mlm.wordpiece(saved)


def model_config(config: Any, vocab_size: int) -> bert.BertConfig:
    spec = {k: v for k, v in dict(config.model).items() if v is not None}  # None: default
    spec.pop("name", None)
    preset = spec.pop("preset", "tiny")
    spec.setdefault("max_position_embeddings", max(512, config.max_length))
    return bert.BertConfig.preset(
        preset, vocab_size=vocab_size, dtype=jnp.dtype(config.dtype), **spec
    )


def _note_masking_cap(pairs: mlm.MaskedPairs) -> None:
    """Says where `max_predictions` masks fewer than the mask rate of a full sequence (e.g.
    after raising max_length alone), which a run would otherwise never show."""
    tokens = pairs.max_length - 3  # [CLS] A [SEP] B [SEP]
    wanted = int(round(tokens * pairs.mask_rate))
    if pairs.max_predictions < wanted:
        print(
            f"note: max_predictions={pairs.max_predictions} masks at most "
            f"{pairs.max_predictions / tokens:.0%} of a full sequence's {tokens} tokens, not "
            f"{pairs.mask_rate:.0%}: --config.max_predictions={wanted} masks "
            f"{pairs.mask_rate:.0%} at max_length={pairs.max_length}",
            file=sys.stderr,
        )


def masked_pairs(
    config: Any, texts: Any, tokenizer: Any, num_examples: int | None = None
) -> mlm.MaskedPairs:
    """The pretraining examples over `texts` (see `train.data.mlm`), sized by `config`."""
    return mlm.MaskedPairs(
        mlm.PairSource(texts, tokenizer, num_examples=num_examples),
        tokenizer,
        max_length=config.max_length,
        max_predictions=config.max_predictions,
    )


def build(config: Any, process_index: int, process_count: int, workdir: str) -> Task:
    train_texts = corpus(config, config.train_split)
    eval_texts = corpus(config, config.eval_split)
    tokenizer = tokenizer_for(config, workdir, train_texts)
    model = bert.BertForPreTraining(model_config(config, tokenizer.get_vocab_size()))
    train_pairs = masked_pairs(config, train_texts, tokenizer)
    eval_pairs = masked_pairs(config, eval_texts, tokenizer, config.eval_examples or None)
    if jax.process_index() == 0:  # (process_index: this process's part of the batch)
        _note_masking_cap(train_pairs)

    def apply(params: Any, batch: Any, train: bool, rngs: Any = None) -> Any:
        return model.apply(
            {"params": params},
            batch["input_ids"],
            None,
            batch["token_type_ids"],
            batch["masked_positions"],
            train,
            lengths=jnp.maximum(batch["length"], 1),  # eval padding rows have length 0
            rngs=rngs,
        )

    def loss_fn(params: Any, model_state: Any, batch: Any, rng: Any) -> Any:
        mlm_logits, nsp_logits = apply(params, batch, True, {"dropout": rng})
        total, metrics = bert.pretraining_loss(
            mlm_logits,
            batch["masked_ids"],
            batch["masked_weights"],
            nsp_logits,
            batch["nsp_label"],
        )
        # No loss_weight: the loss is the sum of two means over different counts (masked
        # tokens, pairs), so accumulated micro-batches weigh alike. Their masked-token
        # counts differ only where sequences are shorter than max_length (15% of each).
        return total, (model_state, metrics)

    def eval_fn(params: Any, model_state: Any, batch: Any) -> Any:  # noqa: ARG001
        mlm_logits, nsp_logits = apply(params, batch, False)
        w = batch["weight"].astype(jnp.float32)
        token_w = batch["masked_weights"] * w[:, None]
        mlm_sum, tokens = losses.cross_entropy(mlm_logits, batch["masked_ids"], token_w)
        nsp_sum, count = losses.cross_entropy(nsp_logits, batch["nsp_label"], w)
        return {
            "mlm_loss": mlm_sum,
            "mlm_loss_count": tokens,
            "mlm_accuracy": losses.correct(mlm_logits, batch["masked_ids"], token_w),
            "mlm_accuracy_count": tokens,
            "nsp_loss": nsp_sum,
            "nsp_accuracy": losses.correct(nsp_logits, batch["nsp_label"], w),
            "count": count,
        }

    train_iterator, eval_iterator = make_iterators(
        config,
        process_index,
        process_count,
        train_pairs.source,
        train_pairs.train,
        eval_pairs.source,
        eval_pairs.eval,
    )
    length, p = config.max_length, config.max_predictions
    example = [
        jnp.zeros((1, length), jnp.int32),
        None,
        jnp.zeros((1, length), jnp.int32),
        jnp.zeros((1, p), jnp.int32),
    ]
    info = {
        "dataset": config.dataset,
        "train_documents": len(train_texts),
        "eval_documents": len(eval_texts),
        "eval_examples": len(eval_pairs.source),
        "vocabulary": tokenizer.get_vocab_size(),
        "bert": {k: getattr(model.config, k) for k in ("num_layers", "hidden_size", "num_heads")},
        "max_length": length,
    }
    return Task(model, example, loss_fn, eval_fn, train_iterator, eval_iterator, info)
