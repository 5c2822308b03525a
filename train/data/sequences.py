"""Sequence data for the Transformer tasks: generated toy translation, TFDS translation
pairs, and fixed-length windows of a text corpus for language modelling.

Token ids share one convention: `PAD` = 0, `BOS` = 1, `EOS` = 2, then the symbols.

* Toy translation (`toy_reverse`, `toy_sort`): source = a random sequence of symbols
  3..vocab_size-1 of a random length in [min_length, max_length]; target = the same
  sequence reversed (or sorted ascending). Each example is a deterministic function of its
  split and index (no files, no network): `train` is a nominally endless stream (2**20
  indices), `test` a separate stream (a different seed) of `eval_examples` examples. The
  streams are drawn independently, so a short test sequence can also occur in `train`;
  with 29 symbols and lengths >= 4 this is rare and does not matter for a task that is
  solved by a rule, not by memory.
* TFDS translation (e.g. `wmt14_translate/de-en`): the two languages are read from the
  dataset's config name (`de-en`: German to English). Tokenisation is byte level for now:
  the UTF-8 bytes of each sentence, id = byte + 3, vocabulary 259, truncated to
  `max_length` bytes. Training never downloads: an unprepared dataset is a `DataError`
  that says how to `tfds build` it.
* Language-model windows: documents are encoded (bytes + 3, then `EOS`), concatenated, and
  cut into non-overlapping windows of `max_length + 1` tokens (inputs = the first
  `max_length`, labels = the last `max_length`).

Examples are dicts of numpy arrays, ready for `train.data.pipeline` (identity preprocess).

Example:
    >>> source = ToyTranslation("reverse", "train", vocab_size=8, min_length=2, max_length=4)
    >>> ex = source[0]
    >>> n = int(ex["src_length"])
    >>> ex["tgt_out"][:n].tolist() == ex["src"][:n][::-1].tolist()
    True
    >>> int(ex["tgt_out"][n]) == EOS and int(ex["tgt_in"][0]) == BOS
    True
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np

from jaxmodels.errors import ConfigError, DataError
from train.data import tfds_local
from train.data.images import default_data_dir

PAD, BOS, EOS = 0, 1, 2
NUM_SPECIAL = 3
BYTE_VOCAB = 256 + NUM_SPECIAL

TOY_DATASETS = {"toy_reverse": "reverse", "toy_sort": "sort"}
_TRAIN_SIZE = 1 << 20
_SPLIT_SEEDS = {"train": 0, "test": 1}


def _target(src: np.ndarray, kind: str) -> np.ndarray:
    return src[::-1] if kind == "reverse" else np.sort(src)


def _example(src: np.ndarray, tgt: np.ndarray, max_length: int) -> dict[str, np.ndarray]:
    """Padded arrays of one pair: `src` [L], `tgt_in` = BOS + tgt, `tgt_out` = tgt + EOS
    (both [L + 1]), and the lengths (`tgt_length` counts the EOS)."""
    src, tgt = src[:max_length], tgt[:max_length]
    out = {
        "src": np.zeros(max_length, np.int32),
        "tgt_in": np.zeros(max_length + 1, np.int32),
        "tgt_out": np.zeros(max_length + 1, np.int32),
        "src_length": np.int32(len(src)),
        "tgt_length": np.int32(len(tgt) + 1),
    }
    out["src"][: len(src)] = src
    out["tgt_in"][0] = BOS
    out["tgt_in"][1 : len(tgt) + 1] = tgt
    out["tgt_out"][: len(tgt)] = tgt
    out["tgt_out"][len(tgt)] = EOS
    return out


class ToyTranslation:
    """A random-access source of generated (source, target) pairs; see the module doc.

    Args:
        kind: "reverse" or "sort".
        split: "train" or "test".
        vocab_size: all ids, including PAD/BOS/EOS (symbols are 3..vocab_size-1).
        min_length, max_length: sequence length range (inclusive).
        size: number of examples (default: 2**20 for train; required for test).
    """

    def __init__(
        self,
        kind: str,
        split: str,
        vocab_size: int,
        min_length: int,
        max_length: int,
        size: int | None = None,
    ):
        if kind not in ("reverse", "sort"):
            raise ConfigError(f"unknown toy task {kind!r}; choose reverse or sort")
        if split not in _SPLIT_SEEDS:
            raise ConfigError(f"toy datasets have splits {sorted(_SPLIT_SEEDS)}, not {split!r}")
        if vocab_size < NUM_SPECIAL + 2:
            raise ConfigError(
                f"vocab_size={vocab_size} leaves fewer than 2 symbols after PAD/BOS/EOS; "
                "use vocab_size >= 5 (config key vocab_size)"
            )
        if not 1 <= min_length <= max_length:
            raise ConfigError(
                f"toy sequences need 1 <= min_length <= max_length, got min_length="
                f"{min_length}, max_length={max_length} (config keys min_length, max_length)"
            )
        self.kind, self.split = kind, split
        self.vocab_size, self.min_length, self.max_length = vocab_size, min_length, max_length
        self.size = size or _TRAIN_SIZE

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        rng = np.random.default_rng((_SPLIT_SEEDS[self.split], int(index)))
        n = int(rng.integers(self.min_length, self.max_length + 1))
        src = rng.integers(NUM_SPECIAL, self.vocab_size, n).astype(np.int32)
        return _example(src, _target(src, self.kind), self.max_length)


def encode_bytes(text: str | bytes) -> np.ndarray:
    """UTF-8 bytes as ids (byte + 3)."""
    data = text.encode("utf-8") if isinstance(text, str) else bytes(text)
    return np.frombuffer(data, np.uint8).astype(np.int32) + NUM_SPECIAL


def decode_bytes(ids: Any) -> str:
    """The inverse of `encode_bytes`; stops at the first EOS, drops PAD/BOS."""
    out = bytearray()
    for i in np.asarray(ids).tolist():
        if i == EOS:
            break
        if i >= NUM_SPECIAL:
            out.append(i - NUM_SPECIAL)
    return out.decode("utf-8", errors="replace")


def translation_languages(name: str) -> tuple[str, str]:
    """(source, target) language codes from a TFDS name like `wmt14_translate/de-en`."""
    config = name.split("/", 1)[1].split(":", 1)[0] if "/" in name else ""
    m = re.fullmatch(r"([a-z]+)(?:-|_to_)([a-z]+)", config)
    if not m:
        raise ConfigError(
            f"cannot tell the languages of dataset {name!r} (config key dataset); use a TFDS "
            "translation dataset with a language-pair config, e.g. wmt14_translate/de-en, or "
            f"one of the embedded {sorted(TOY_DATASETS)}"
        )
    return m.group(1), m.group(2)


def tfds_source(name: str, split: str, data_dir: str | None) -> Any:
    """A random-access source of split `split` of a prepared TFDS dataset (never downloads)."""
    data_dir = data_dir or default_data_dir()
    builder = tfds_local.prepared_builder(name, data_dir)
    return tfds_local.split_source(builder, name, split, data_dir)


class TranslationPairs:
    """A TFDS translation source as padded byte-level pairs (see the module doc)."""

    def __init__(self, source: Any, src_lang: str, tgt_lang: str, max_length: int):
        self.source, self.src_lang, self.tgt_lang = source, src_lang, tgt_lang
        self.max_length = max_length

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        record = self.source[int(index)]
        src, tgt = (encode_bytes(_text(record[k])) for k in (self.src_lang, self.tgt_lang))
        return _example(src, tgt, self.max_length)


def _text(value: Any) -> bytes:
    if isinstance(value, np.ndarray):
        value = value.item()
    return value if isinstance(value, bytes) else str(value).encode("utf-8")


class Windows:
    """Non-overlapping windows of a token stream: `{"tokens", "labels"}`, each [length].

    Args:
        stream: <int32>[n] the concatenated corpus.
        length: tokens per example (the window holds length + 1).
        limit: keep at most this many windows, evenly spaced over the stream (0: all).
    """

    def __init__(self, stream: np.ndarray, length: int, limit: int = 0):
        self.stream, self.length = np.asarray(stream, np.int32), length
        n = (len(self.stream) - 1) // length
        if n < 1:
            raise DataError(
                f"the corpus has {len(self.stream)} tokens, fewer than one window of "
                f"max_length + 1 = {length + 1}; lower max_length"
            )
        self.starts = np.arange(n) * length
        if limit and limit < n:
            self.starts = self.starts[np.linspace(0, n - 1, limit).astype(np.int64)]

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        s = int(self.starts[int(index)])
        w = self.stream[s : s + self.length + 1]
        return {"tokens": w[:-1].copy(), "labels": w[1:].copy()}


def byte_stream(texts: list[str]) -> np.ndarray:
    """Documents as one stream of byte ids, each followed by EOS."""
    eos = np.array([EOS], np.int32)
    parts = [p for t in texts for p in (encode_bytes(t), eos)]
    return np.concatenate(parts) if parts else np.zeros(0, np.int32)
