"""BERT sequence classification: the parts of `text_classification` specific to BERT.

The encoder starts from `config.init_from`, when given:
* a pretraining workdir of this library (`checkpoints/`, `config.json`, `vocab.txt`): the
  `bert` parameters of its latest checkpoint, its vocabulary and model size;
* a Hugging Face BERT directory (`config.json`, `model.safetensors` or
  `pytorch_model.bin`, `vocab.txt`), read with `jaxmodels.bert.from_pretrained`.
Otherwise the model is `config.model.preset` trained from scratch, with a WordPiece
vocabulary trained on the training texts (saved as `workdir/vocab.txt`).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxmodels import bert, checkpoint
from jaxmodels.errors import DataError
from train.data import mlm, text
from train.tasks import bert_pretraining, write_text_atomically

INIT_RECORD = "init_from.json"  # the architecture fine-tuning started from, for resuming


def _is_hf_directory(path: str) -> bool:
    return os.path.exists(os.path.join(path, "config.json")) and not os.path.isdir(
        os.path.join(path, "checkpoints")
    )


def _check_source(source: str) -> None:
    """A clear error for an `init_from` that is neither kind of directory."""
    kinds = (
        "a pretraining workdir of this library (checkpoints/, config.json, vocab.txt) or a "
        "Hugging Face BERT directory (config.json, model.safetensors or pytorch_model.bin, "
        "vocab.txt)"
    )
    if not os.path.isdir(source):
        raise DataError(f"init_from={source} is not a directory; give {kinds}")
    missing = [
        name
        for name in ("config.json", bert_pretraining.VOCAB_FILE)
        if not os.path.exists(os.path.join(source, name))
    ]
    if missing:
        raise DataError(f"init_from={source} has no {' or '.join(missing)}; give {kinds}")


def _pretrained_bert_params(workdir: str) -> Any:
    """The `bert` parameters of the latest checkpoint of a pretraining workdir, as numpy."""
    root = os.path.join(workdir, "checkpoints")
    steps = [s for s in os.listdir(root) if s.isdigit()] if os.path.isdir(root) else []
    if not steps:
        raise DataError(f"init_from={workdir}: no checkpoint in {root}")
    params = checkpoint.load_params(root)
    if "bert" not in params:
        raise DataError(f"init_from={workdir}: its checkpoint holds no BERT encoder")
    return params["bert"]


def _lowercase(source: str) -> bool:
    """Whether `source`'s vocabulary is for lower-cased text: a Hugging Face directory's
    `tokenizer_config.json` says (`do_lower_case`, True where it says nothing, as in
    `transformers`); a pretraining workdir's vocabulary is."""
    path = os.path.join(source, "tokenizer_config.json")
    if not os.path.exists(path):
        return True
    with open(path, encoding="utf-8") as f:
        return bool(json.load(f).get("do_lower_case", True))


def _keep_source(
    workdir: str, source: str, bert_config: bert.BertConfig, vocab_file: str, lowercase: bool
) -> None:
    """Copies what a resumed run needs of `source` into the workdir: the vocabulary, how text
    is cased for it, and the architecture (its parameters are in the run's own checkpoints
    by then)."""
    with open(vocab_file, encoding="utf-8") as f:
        write_text_atomically(os.path.join(workdir, bert_pretraining.VOCAB_FILE), f.read())
    # The layer layout too: the run's checkpoints hold its parameters in it.
    record = {
        "init_from": source,
        "bert": bert_config.to_hf_dict(),
        "scan_layers": bert_config.scan_layers,
        "lowercase": lowercase,
    }
    write_text_atomically(os.path.join(workdir, INIT_RECORD), json.dumps(record, indent=2))


def model_and_tokenizer(
    config: Any, workdir: str, num_classes: int, train_texts: list[str]
) -> tuple[Any, Any, Any]:
    """(model, tokenizer, init_params or None) for fine-tuning.

    A run that resumes from its own checkpoints reads its vocabulary and architecture from
    the workdir (copied there at its start), not from `init_from`, which may be gone.
    """
    dtype = jnp.dtype(config.dtype)
    source = config.init_from
    # The architecture comes from the source; how it runs (remat, scan_layers, dropout)
    # from this config.
    runtime = {
        k: v for k, v in dict(config.model).items() if k in bert.RUNTIME_FIELDS and v is not None
    }
    runtime["dtype"] = dtype
    record = os.path.join(workdir, INIT_RECORD)
    resuming = checkpoint.has_checkpoint(os.path.join(workdir, "checkpoints"))
    if resuming and os.path.exists(record):  # whatever init_from says now
        with open(record, encoding="utf-8") as f:
            kept = json.load(f)
        runtime.setdefault("scan_layers", kept.get("scan_layers", False))
        bert_config = bert.BertConfig.from_hf_dict(kept["bert"], **runtime)
        tokenizer = mlm.wordpiece(
            os.path.join(workdir, bert_pretraining.VOCAB_FILE),
            lowercase=kept.get("lowercase", True),
        )
        return bert.BertForSequenceClassification(bert_config, num_classes), tokenizer, None
    if not source:
        tokenizer = bert_pretraining.tokenizer_for(config, workdir, train_texts)
        bert_config = bert_pretraining.model_config(config, tokenizer.get_vocab_size())
        return bert.BertForSequenceClassification(bert_config, num_classes), tokenizer, None
    _check_source(source)
    vocab_file = os.path.join(source, bert_pretraining.VOCAB_FILE)
    lowercase = _lowercase(source)
    tokenizer = mlm.wordpiece(vocab_file, lowercase=lowercase)
    if _is_hf_directory(source):
        model, variables, _ = bert.from_pretrained(
            source,
            bert.BertForSequenceClassification,
            num_labels=num_classes,
            init_missing=True,
            **runtime,
        )
        encoder = variables["params"]["bert"]
        bert_config = model.config
    else:
        pretrained = _pretrained_bert_params(source)
        with open(os.path.join(source, "config.json")) as f:
            pretrain_config = ml_collections.ConfigDict(json.load(f))
        if pretrain_config.get("task") != "bert_pretraining":
            raise DataError(
                f"init_from={source} is a workdir of task {pretrain_config.get('task')!r}, "
                "not bert_pretraining (configs/bert_pretrain.py)"
            )
        bert_config = bert_pretraining.model_config(pretrain_config, tokenizer.get_vocab_size())
        bert_config = dataclasses.replace(bert_config, **runtime)
        model = bert.BertForSequenceClassification(bert_config, num_labels=num_classes)
        encoder = bert.layer_layout(pretrained, bert_config.scan_layers)
    _keep_source(workdir, source, bert_config, vocab_file, lowercase)

    def init_params(params: Any) -> Any:
        ours = jax.tree.map(np.shape, params["bert"])
        theirs = jax.tree.map(np.shape, encoder)
        if ours != theirs:
            raise DataError(f"init_from={source}: its encoder does not fit this model's")
        return {**params, "bert": encoder}

    return model, tokenizer, init_params


def preprocess(tokenizer: Any, max_length: int, text_key: str) -> Any:
    """record -> {"tokens": [CLS] text [SEP] padded <int32>[max_length], "length", "label"}."""
    cls, sep = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")

    def fn(record: Any, rng: Any) -> dict[str, Any]:  # noqa: ARG001
        ids = tokenizer.encode(text.record_text(record, text_key), add_special_tokens=False).ids
        ids = [cls, *ids[: max_length - 2], sep]
        tokens = np.zeros(max_length, np.int32)
        tokens[: len(ids)] = ids
        return {"tokens": tokens, "length": np.int32(len(ids)), "label": np.int32(record["label"])}

    return fn


def inputs(batch: Any) -> dict[str, Any]:
    return {"input_ids": batch["tokens"], "lengths": jnp.maximum(batch["length"], 1)}
