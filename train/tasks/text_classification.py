"""Text classification: LSTM classifiers on word ids, or BERT fine-tuning on WordPiece ids
(see `bert_finetune`), on the embedded stdlib docstrings or a TFDS text dataset by name;
softmax cross-entropy, accuracy.

The word vocabulary is built from the training split at the first start and saved as
`workdir/tokenizer.json`; a resumed run loads it, so ids never change under a checkpoint.
"""

from __future__ import annotations

import os
from typing import Any

import jax.numpy as jnp

from jaxmodels import rnn, training
from jaxmodels.errors import DataError
from train.data import text
from train.tasks import (
    Task,
    bert_finetune,
    class_count,
    make_iterators,
    make_module,
    resuming,
    write_atomically,
)

TOKENIZER_FILE = "tokenizer.json"


def _tokenizer(config: Any, workdir: str, train_source: Any, text_key: str) -> Any:
    path = os.path.join(workdir, TOKENIZER_FILE)
    if resuming(workdir) and os.path.exists(path):
        tokenizer = text.WordTokenizer.load(path)
        if len(tokenizer) > config.vocab_size:
            raise DataError(
                f"{path} has {len(tokenizer)} words but vocab_size={config.vocab_size}; "
                "use the config that wrote this workdir, or a new --workdir"
            )
        return tokenizer
    tokenizer = text.WordTokenizer.build(text.read_texts(train_source, text_key), config.vocab_size)
    write_atomically(path, tokenizer.save)  # processes sharing the workdir agree on one file
    return tokenizer


def _inputs(batch: Any) -> tuple[Any, Any]:
    # Eval padding examples have length 0 (and weight 0); give them one step so that
    # every length is valid for every LSTM backend.
    return batch["tokens"], jnp.maximum(batch["length"], 1)


def build(config: Any, process_index: int, process_count: int, workdir: str) -> Task:
    dtype = jnp.dtype(config.dtype)
    text_key = text.text_key_for(config.dataset, config.text_key or None)
    train_source, num_classes, names = text.open_text_source(
        config.dataset, config.train_split, config.data_dir, text_key
    )
    eval_source, _, _ = text.open_text_source(
        config.dataset, config.eval_split, config.data_dir, text_key
    )
    num_classes = class_count(config, num_classes)
    init_params = None
    if config.model.name.startswith("Bert"):
        model, tokenizer, init_params = bert_finetune.model_and_tokenizer(
            config, workdir, num_classes, text.read_texts(train_source, text_key)
        )
        preprocess = bert_finetune.preprocess(tokenizer, config.max_length, text_key)
        inputs, vocabulary = bert_finetune.inputs, tokenizer.get_vocab_size()
    else:
        tokenizer = _tokenizer(config, workdir, train_source, text_key)
        preprocess = text.text_preprocess(tokenizer, config.max_length, text_key)
        model = make_module(
            rnn, config.model, vocab_size=config.vocab_size, num_classes=num_classes, dtype=dtype
        )
        inputs, vocabulary = _inputs, len(tokenizer)
    loss_fn, eval_fn = training.classification_fns(
        model, label_smoothing=config.label_smoothing, inputs=inputs
    )
    train_iterator, eval_iterator = make_iterators(
        config,
        process_index,
        process_count,
        train_source,
        preprocess,
        eval_source,
        preprocess,
        num_classes=num_classes,
    )
    info = {
        "dataset": config.dataset,
        "num_classes": num_classes,
        "classes": names[:10],
        "train_examples": len(train_source),
        "eval_examples": len(eval_source),
        "vocabulary": vocabulary,
        "max_length": config.max_length,
    }
    example = [jnp.zeros((1, config.max_length), jnp.int32)]
    if init_params is None and not config.model.name.startswith("Bert"):
        example.append(jnp.full((1,), config.max_length, jnp.int32))
    return Task(model, example, loss_fn, eval_fn, train_iterator, eval_iterator, info, init_params)
