"""Language modelling: a `DecoderOnlyLM` (GPT-style) trained on next-token prediction.

Corpus: the embedded `stdlib_docs` (docstrings of the Python standard library: real
English prose, offline) or any prepared TFDS text dataset by name whose records hold a
text feature (read whole into memory: meant for small corpora for now). Tokens are bytes
(UTF-8, id = byte + 3; PAD/BOS/EOS = 0/1/2; vocabulary 259), so there is no vocabulary to
build or keep; each document ends with EOS, the documents are concatenated, and the
examples are non-overlapping windows of `max_length + 1` tokens (`train.data.sequences`).

Eval metrics: `loss` (nats per byte; the perplexity is `exp(eval/loss)`), `bits_per_byte`
(`loss / ln 2`) and `token_accuracy` (arg-max next byte). `sample` restores a trained
workdir and continues a prompt with `jaxmodels.transformer.generate` (temperature and top-k
from the config keys `sample_temperature`, `sample_top_k`).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxmodels import checkpoint, losses, transformer
from jaxmodels.errors import ConfigError
from train.data import sequences, text
from train.tasks import Task, make_iterators, make_module, run_config


def corpus(config: Any, split: str) -> np.ndarray:
    """The split as one stream of byte ids."""
    key = text.text_key_for(config.dataset, config.text_key or None)
    source = text.open_corpus(config.dataset, split, config.data_dir, key)
    return sequences.byte_stream(text.read_texts(source, key))


def make_model(config: Any) -> transformer.DecoderOnlyLM:
    spec = dict(config.model)
    spec.setdefault("max_len", config.max_length)
    return make_module(
        transformer, spec, vocab_size=sequences.BYTE_VOCAB, dtype=jnp.dtype(config.dtype)
    )


def build(config: Any, process_index: int, process_count: int, workdir: str) -> Task:  # noqa: ARG001
    length = config.max_length
    train_windows = sequences.Windows(corpus(config, config.train_split), length)
    eval_windows = sequences.Windows(
        corpus(config, config.eval_split), length, config.eval_examples
    )
    model = make_model(config)

    def loss_fn(params: Any, model_state: Any, batch: Any, rng: Any) -> Any:
        logits = model.apply({"params": params}, batch["tokens"], None, True, rngs={"dropout": rng})
        loss_sum, tokens = losses.cross_entropy(
            logits, batch["labels"], None, config.label_smoothing
        )
        accuracy = losses.correct(logits, batch["labels"]) / tokens
        return loss_sum / tokens, (model_state, {"token_accuracy": accuracy})

    def eval_fn(params: Any, model_state: Any, batch: Any) -> Any:  # noqa: ARG001
        logits = model.apply({"params": params}, batch["tokens"], None, False)
        w = jnp.broadcast_to(batch["weight"].astype(jnp.float32)[:, None], batch["labels"].shape)
        loss_sum, tokens = losses.cross_entropy(logits, batch["labels"], w)
        return {
            "loss": loss_sum,
            "loss_count": tokens,
            "bits_per_byte": loss_sum / math.log(2),
            "bits_per_byte_count": tokens,
            "token_accuracy": losses.correct(logits, batch["labels"], w),
            "token_accuracy_count": tokens,
            "count": jnp.sum(batch["weight"].astype(jnp.float32)),
        }

    identity = lambda record, rng: record  # noqa: ARG005, E731 - windows come ready
    train_iterator, eval_iterator = make_iterators(
        config, process_index, process_count, train_windows, identity, eval_windows, identity
    )
    info = {
        "dataset": config.dataset,
        "tokenizer": "bytes",
        "train_tokens": int(len(train_windows.stream)),
        "train_windows": len(train_windows),
        "eval_windows": len(eval_windows),
        "vocabulary": sequences.BYTE_VOCAB,
        "max_length": length,
    }
    example = [jnp.zeros((1, length), jnp.int32)]
    return Task(model, example, loss_fn, eval_fn, train_iterator, eval_iterator, info)


def prompt_tokens(prompts: list[str], max_len: int) -> tuple[np.ndarray, np.ndarray]:
    """The model's input for `prompts`: each one starts with EOS, the way every document
    but the first follows an EOS in the training stream (`sequences.byte_stream`), so an
    empty prompt continues like the start of a document.

    Prompts longer than `max_len - 1` bytes keep their last `max_len - 1` bytes, which
    leaves room for the EOS.

    Returns:
        tokens <int32>[len(prompts), longest] right-padded and lengths <int32>[len(prompts)]
        (each >= 1: the EOS counts).

    Example:
        >>> tokens, lengths = prompt_tokens(["", "ab", "abcdef"], max_len=4)
        >>> tokens.tolist(), lengths.tolist()  # EOS = 2, "a" = 97 + 3; keeps "def"
        ([[2, 0, 0, 0], [2, 100, 101, 0], [2, 103, 104, 105]], [1, 3, 4])
    """
    keep = max(max_len - 1, 0)
    encoded = [sequences.encode_bytes(p) for p in prompts]
    encoded = [e[len(e) - min(len(e), keep) :] for e in encoded]
    lengths = np.array([len(e) + 1 for e in encoded], np.int32)
    tokens = np.full((len(prompts), int(lengths.max(initial=1))), sequences.PAD, np.int32)
    for i, e in enumerate(encoded):
        tokens[i, 0] = sequences.EOS
        tokens[i, 1 : len(e) + 1] = e
    return tokens, lengths


def sample(
    config: Any, workdir: str, prompts: list[str], max_new_tokens: int | None = None
) -> list[str]:
    """Continues each prompt with the model of the latest checkpoint in `workdir`.

    `config`: the run's config; None reads it from the workdir (`run_config`). From a shell:
    `python -m train.tasks.language_model WORKDIR "prompt" ... [--tokens N] [--seed S]`.

    Each prompt is fed after an EOS, the document separator of the training stream (see
    `prompt_tokens`), so an empty prompt samples the start of a document. Sampling uses
    the config keys `sample_temperature` and `sample_top_k` (0: all tokens; temperature 0:
    greedy), its random draws the key `seed` (the same seed, the same samples);
    `max_new_tokens` defaults to `sample_tokens`, and is cut so that the prompt
    (with its EOS) plus all new tokens but the last (which is never fed back) fit in the
    model's `max_len`.

    Returns:
        The continuations (text after the prompt; stops at EOS).
    """
    if config is None:
        config = run_config(workdir)
    if config.get("task") != "language_model":
        raise ConfigError(
            f"{workdir} is a run of task {config.get('task')!r}, not a language model "
            "(configs/transformer_lm.py): sampling continues text with one"
        )
    model = make_model(config)
    wanted = config.sample_tokens if max_new_tokens is None else max_new_tokens
    _check_sampling(wanted, config.sample_temperature, config.sample_top_k, model.vocab_size)
    params = checkpoint.load_params(os.path.join(workdir, "checkpoints"))
    prompt, lengths = prompt_tokens(prompts, model.max_len)
    new = min(wanted, model.max_len - prompt.shape[1] + 1)
    if new < wanted:
        print(
            f"note: {new} new tokens, not {wanted}: the model's max_length ({model.max_len}) "
            f"holds the longest prompt ({prompt.shape[1]} with its EOS) and them",
            file=sys.stderr,
        )
    greedy = config.sample_temperature <= 0
    out = transformer.generate(
        model,
        params,
        prompt,
        lengths,
        max_new_tokens=new,
        rng=jax.random.key(config.seed),
        temperature=config.sample_temperature if not greedy else 1.0,
        top_k=config.sample_top_k or None,
        greedy=greedy,
    )
    return [sequences.decode_bytes(row) for row in np.asarray(out)]


def _check_sampling(tokens: int, temperature: float, top_k: int, vocab_size: int) -> None:
    """A `ConfigError` naming the setting (and its flag) that `sample` cannot use."""
    if tokens < 1:
        raise ConfigError(
            f"new tokens (--tokens, config key sample_tokens) must be >= 1, got {tokens}"
        )
    if not temperature >= 0:  # NaN too
        raise ConfigError(
            f"sample_temperature (--temperature) must be >= 0 (0: greedy), got {temperature}"
        )
    if not 0 <= top_k <= vocab_size:
        raise ConfigError(
            f"sample_top_k (--top-k) must be between 0 (all tokens) and the model's "
            f"vocabulary size {vocab_size}, got {top_k}"
        )


def main(argv: list[str] | None = None) -> int:
    """Samples continuations of prompts from a trained workdir (the run's own config)."""
    parser = argparse.ArgumentParser(
        prog="python -m train.tasks.language_model",
        description="Continue prompts with the language model trained in WORKDIR.",
    )
    parser.add_argument("workdir")
    parser.add_argument("prompts", nargs="*", default=[""], help="default: one empty prompt")
    parser.add_argument("--tokens", type=int, help="new bytes (config: sample_tokens)")
    parser.add_argument("--temperature", type=float, help="0: greedy (config: sample_temperature)")
    parser.add_argument("--top-k", type=int, help="0: all tokens (config: sample_top_k)")
    parser.add_argument("--seed", type=int, help="of the random draws (config: seed)")
    args = parser.parse_args(argv)
    from jaxmodels.errors import UserError

    try:
        config = run_config(args.workdir)
        if args.temperature is not None:
            config.sample_temperature = args.temperature
        if args.top_k is not None:
            config.sample_top_k = args.top_k
        if args.seed is not None:
            config.seed = args.seed
        outs = sample(config, args.workdir, args.prompts, args.tokens)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for prompt, out in zip(args.prompts, outs, strict=True):
        print(repr(prompt + out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
