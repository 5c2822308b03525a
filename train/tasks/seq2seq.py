"""Sequence to sequence: an `EncoderDecoder` Transformer trained with teacher forcing.

Data (`train.data.sequences`): the generated `toy_reverse` / `toy_sort` (offline, learnt in
about a minute on a CPU) or a prepared TFDS translation dataset by name, e.g.
`wmt14_translate/de-en`, tokenised at byte level.

Decoder input `tgt_in` = BOS + target, labels `tgt_out` = target + EOS. Loss: token-level
cross-entropy over the real target tokens (padding has weight 0). Eval metrics:

* `loss` and `token_accuracy`: teacher-forced, per target token (EOS included);
* `sequence_accuracy`: greedy decoding, the fraction of examples whose decoded tokens up to
  and including the first EOS equal the labels exactly. Decoding encodes the source once,
  then runs the decoder `max_length + 1` times on one token each, with a KV cache
  (`transformer.greedy_translate`), inside the compiled eval step.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from jaxmodels import losses, transformer
from jaxmodels.transformer import EncoderDecoder
from train.data import sequences
from train.tasks import Task, make_iterators, make_module


def _sources(config: Any) -> tuple[Any, Any, int]:
    """(train source, eval source, vocabulary size) for `config.dataset`."""
    if config.dataset in sequences.TOY_DATASETS:
        kind = sequences.TOY_DATASETS[config.dataset]
        make = lambda split, size: sequences.ToyTranslation(  # noqa: E731
            kind, split, config.vocab_size, config.min_length, config.max_length, size
        )
        return make("train", None), make("test", config.eval_examples or 1024), config.vocab_size
    src_lang, tgt_lang = sequences.translation_languages(config.dataset)
    make = lambda split: sequences.TranslationPairs(  # noqa: E731
        sequences.tfds_source(config.dataset, split, config.data_dir),
        src_lang,
        tgt_lang,
        config.max_length,
    )
    return make(config.train_split), make(config.eval_split), sequences.BYTE_VOCAB


def greedy_decode(model: EncoderDecoder, params: Any, batch: Any, steps: int) -> jax.Array:
    """Greedy predictions <int32>[batch, steps]: position t holds the token decoded after
    BOS and the t tokens before it (decoding goes on after EOS; the metric ignores it)."""
    src_lengths = jnp.maximum(batch["src_length"], 1)  # eval padding rows have length 0
    return transformer.greedy_translate(
        model, params, batch["src"], src_lengths, max_length=steps, bos_id=sequences.BOS
    )


def build(config: Any, process_index: int, process_count: int, workdir: str) -> Task:  # noqa: ARG001
    train_source, eval_source, vocab_size = _sources(config)
    steps = config.max_length + 1  # target + EOS
    spec = dict(config.model)
    spec.setdefault("max_len", steps)
    model = make_module(transformer, spec, vocab_size=vocab_size, dtype=jnp.dtype(config.dtype))

    def apply(params: Any, batch: Any, train: bool, rngs: Any = None) -> jax.Array:
        return model.apply(
            {"params": params},
            batch["src"],
            jnp.maximum(batch["src_length"], 1),
            batch["tgt_in"],
            jnp.maximum(batch["tgt_length"], 1),
            train,
            rngs=rngs,
        )

    def token_weights(batch: Any) -> jax.Array:
        positions = jnp.arange(batch["tgt_out"].shape[1])[None, :]
        return (positions < batch["tgt_length"][:, None]).astype(jnp.float32)

    def loss_fn(params: Any, model_state: Any, batch: Any, rng: Any) -> Any:
        logits = apply(params, batch, True, {"dropout": rng})
        w = token_weights(batch)
        loss_sum, count = losses.cross_entropy(logits, batch["tgt_out"], w, config.label_smoothing)
        tokens = jnp.maximum(count, 1.0)
        accuracy = losses.correct(logits, batch["tgt_out"], w) / tokens
        # Target lengths vary: accumulated micro-batches weigh by their tokens.
        metrics = {"token_accuracy": accuracy, "loss_weight": count}
        return loss_sum / tokens, (model_state, metrics)

    def eval_fn(params: Any, model_state: Any, batch: Any) -> Any:  # noqa: ARG001
        logits = apply(params, batch, False)
        weight = batch["weight"].astype(jnp.float32)
        w = token_weights(batch) * weight[:, None]
        loss_sum, tokens = losses.cross_entropy(logits, batch["tgt_out"], w)
        preds = greedy_decode(model, params, batch, steps)
        wrong = (preds != batch["tgt_out"]) & (token_weights(batch) > 0)
        exact = (~jnp.any(wrong, axis=1)).astype(jnp.float32)
        return {
            "loss": loss_sum,
            "loss_count": tokens,
            "token_accuracy": losses.correct(logits, batch["tgt_out"], w),
            "token_accuracy_count": tokens,
            "sequence_accuracy": jnp.sum(exact * weight),
            "count": jnp.sum(weight),
        }

    identity = lambda record, rng: record  # noqa: ARG005, E731 - examples come ready
    train_iterator, eval_iterator = make_iterators(
        config, process_index, process_count, train_source, identity, eval_source, identity
    )
    example = [
        jnp.zeros((1, config.max_length), jnp.int32),
        jnp.ones((1,), jnp.int32),
        jnp.zeros((1, steps), jnp.int32),
        jnp.ones((1,), jnp.int32),
    ]
    info = {
        "dataset": config.dataset,
        "train_examples": len(train_source),
        "eval_examples": len(eval_source),
        "vocabulary": vocab_size,
        "max_length": config.max_length,
    }
    return Task(model, example, loss_fn, eval_fn, train_iterator, eval_iterator, info)
