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

import json
import os
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxmodels import bert, checkpoint
from jaxmodels.errors import ConfigError, DataError
from train.data import mlm, text
from train.tasks import (
    bert_pretraining,
    resuming,
    run_config,
    write_text_atomically,
)

INIT_RECORD = "init_from.json"  # the architecture fine-tuning started from, for resuming


def _is_hf_directory(path: str) -> bool:
    """A Hugging Face directory: a config.json that is not a run's of this library (which
    names its task; its checkpoints may have been deleted)."""
    config = os.path.join(path, "config.json")
    if not os.path.exists(config) or os.path.isdir(os.path.join(path, "checkpoints")):
        return False
    try:
        with open(config, encoding="utf-8") as f:
            return "task" not in json.load(f)
    except (OSError, ValueError, TypeError):
        return True  # (and from_pretrained says what it cannot read)


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
    if not checkpoint.has_checkpoint(root):
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


# The `BertConfig` fields of how the fine-tuning run runs, which its config decides (None:
# the `BertConfig` default, except `scan_layers`: the source's layout). The source gives the
# rest: the architecture, its dropout rates and initialiser range.
_RUN_FIELDS = ("dtype", "param_dtype", "implementation", "remat_policy", "scan_layers")


def _runtime(config: Any) -> dict[str, Any]:
    """The run-time `BertConfig` fields that `config` sets (`bert.RUNTIME_FIELDS`; None in
    `config.model` sets nothing), dtypes as numpy dtypes."""
    runtime = {
        k: v for k, v in dict(config.model).items() if k in bert.RUNTIME_FIELDS and v is not None
    }
    runtime["dtype"] = jnp.dtype(config.dtype)
    if "param_dtype" in runtime:
        runtime["param_dtype"] = jnp.dtype(runtime["param_dtype"])
    return runtime


def _keep_source(
    workdir: str, source: str, bert_config: bert.BertConfig, vocab_file: str, lowercase: bool
) -> None:
    """Copies what a resumed run needs of `source` into the workdir: the vocabulary, how text
    is cased for it, the architecture (its parameters are in the run's own checkpoints by
    then) and how the model ran (the layer layout of those checkpoints among it)."""
    with open(vocab_file, encoding="utf-8") as f:
        write_text_atomically(os.path.join(workdir, bert_pretraining.VOCAB_FILE), f.read())
    runtime = {k: getattr(bert_config, k) for k in _RUN_FIELDS}
    for k in ("dtype", "param_dtype"):
        runtime[k] = jnp.dtype(runtime[k]).name
    record = {
        "init_from": source,
        "bert": bert_config.to_hf_dict(),
        "runtime": runtime,
        "lowercase": lowercase,
    }
    write_text_atomically(os.path.join(workdir, INIT_RECORD), json.dumps(record, indent=2))


def _pretraining_architecture(source: str, vocab_size: int) -> tuple[dict[str, Any], bool]:
    """(the architecture as a Hugging Face config dict, scan_layers) of a pretraining
    workdir's model."""
    pretrain_config = run_config(source)
    if pretrain_config.get("task") != "bert_pretraining":
        raise DataError(
            f"init_from={source} is a workdir of task {pretrain_config.get('task')!r}, "
            "not bert_pretraining (configs/bert_pretrain.py)"
        )
    pretrained = bert_pretraining.model_config(pretrain_config, vocab_size)
    return pretrained.to_hf_dict(), pretrained.scan_layers


def _start_record(workdir: str) -> dict[str, Any] | None:
    """How the run in `workdir` started, if it holds checkpoints (None: a new run): its
    `INIT_RECORD`; for a run of a version that kept none (of a start from scratch, or of
    any), the `init_from` of its `config.json` (under "config.json": its source is read
    again, as that version did)."""
    if not resuming(workdir):
        return None
    path = os.path.join(workdir, INIT_RECORD)
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    try:
        source = run_config(workdir).get("init_from") or ""
    except ConfigError:  # no config.json to read: nothing to go by (as `resumed_config`)
        source = ""
    return {"init_from": "", "config.json": source} if source else {"init_from": ""}


def _check_fits(config: Any, source: str, bert_config: bert.BertConfig, tokenizer: Any) -> None:
    """`source`'s vocabulary and positions hold what this run feeds its model."""
    tokens = tokenizer.get_vocab_size()
    if tokens > bert_config.vocab_size:
        raise DataError(
            f"init_from={source}: its vocab.txt has {tokens} tokens but its model's "
            f"vocab_size is {bert_config.vocab_size} (config.json): ids past the embedding "
            "table have no row; give the vocab.txt the model was trained with"
        )
    if config.max_length > bert_config.max_position_embeddings:
        raise ConfigError(
            f"config key max_length={config.max_length} is longer than the "
            f"{bert_config.max_position_embeddings} positions of init_from={source} "
            f"(max_position_embeddings): use --config.max_length="
            f"{bert_config.max_position_embeddings} or less"
        )


def model_and_tokenizer(
    config: Any, workdir: str, num_classes: int, train_texts: list[str]
) -> tuple[Any, Any, Any]:
    """(model, tokenizer, init_params or None) for fine-tuning.

    From `init_from`, the model takes the architecture (with its dropout rates and
    initialiser range); how it runs (dtype, param_dtype, implementation, remat_policy) comes
    from this config, None there meaning the `BertConfig` default, never what the source
    ran with; scan_layers None keeps the source's layer layout. An encoder without the
    pooler (e.g. a Hugging Face `BertForMaskedLM`) gets a new one, as the classifier does.

    A run that resumes from its own checkpoints reads its vocabulary and architecture from
    the workdir (copied there at its start), not from `init_from`, which may be gone, and
    runs as it did, except where this config now sets a field; one that started without
    `init_from` goes on from its checkpoints, whatever `init_from` says now.

    Raises:
      DataError: a source whose vocabulary has more tokens than its model's embedding rows.
      ConfigError: `max_length` longer than the source's positions.
    """
    source = config.init_from
    runtime = _runtime(config)
    record = os.path.join(workdir, INIT_RECORD)
    kept = _start_record(workdir)
    if kept is not None and kept.get("init_from") and "bert" in kept:  # whatever init_from says
        ran = dict(kept.get("runtime", {"scan_layers": kept.get("scan_layers", False)}))
        for k in ("dtype", "param_dtype"):
            if k in ran:
                ran[k] = jnp.dtype(ran[k])
        bert_config = bert.BertConfig.from_hf_dict(kept["bert"], **{**ran, **runtime})
        tokenizer = mlm.wordpiece(
            os.path.join(workdir, bert_pretraining.VOCAB_FILE),
            lowercase=kept.get("lowercase", True),
        )
        _check_fits(config, kept["init_from"], bert_config, tokenizer)
        return bert.BertForSequenceClassification(bert_config, num_classes), tokenizer, None
    if kept is not None:  # resumed: started from scratch, or from a source it reads again
        source = kept.get("config.json", "")
        if source and not os.path.isdir(source):
            raise DataError(
                f"the run in {workdir} started from init_from={source} (its config.json) with a "
                f"version that kept no {INIT_RECORD}: it resumes by reading that source again "
                "(whatever --config.init_from says now); put it back at that path"
            )
    if not source:
        tokenizer = bert_pretraining.tokenizer_for(config, workdir, train_texts)
        bert_config = bert_pretraining.model_config(config, tokenizer.get_vocab_size())
        if kept is None:  # a new start: its record (over one a failed start may have left)
            write_text_atomically(record, json.dumps({"init_from": ""}))
        return bert.BertForSequenceClassification(bert_config, num_classes), tokenizer, None
    _check_source(source)
    vocab_file = os.path.join(source, bert_pretraining.VOCAB_FILE)
    lowercase = _lowercase(source)
    tokenizer = mlm.wordpiece(vocab_file, lowercase=lowercase)
    if _is_hf_directory(source):
        # The encoder only: whatever heads the checkpoint has (another classifier, with
        # another number of labels; the pretraining heads) are not used.
        encoder_model, variables, _ = bert.from_pretrained(source, bert.BertModel, **runtime)
        encoder = variables["params"]
        bert_config = encoder_model.config
    else:
        pretrained = _pretrained_bert_params(source)
        hf, scan_layers = _pretraining_architecture(source, tokenizer.get_vocab_size())
        runtime.setdefault("scan_layers", scan_layers)
        bert_config = bert.BertConfig.from_hf_dict(hf, **runtime)
        encoder = bert.layer_layout(pretrained, bert_config.scan_layers)
    _check_fits(config, source, bert_config, tokenizer)  # before anything is written
    model = bert.BertForSequenceClassification(bert_config, num_labels=num_classes)
    _keep_source(workdir, source, bert_config, vocab_file, lowercase)

    def init_params(params: Any) -> Any:
        fresh = params["bert"]
        if "pooler" not in encoder:
            warnings.warn(
                f"init_from={source} has no pooler (pooler.dense.*): it starts from a random "
                "initialisation, as the classifier does",
                stacklevel=2,
            )
        ours = jax.tree.map(np.shape, {k: fresh[k] for k in encoder if k in fresh})
        theirs = jax.tree.map(np.shape, encoder)
        if ours != theirs:
            raise DataError(f"init_from={source}: its encoder does not fit this model's")
        return {**params, "bert": {**fresh, **encoder}}

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
