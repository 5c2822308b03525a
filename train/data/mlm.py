"""BERT pretraining data: sentence pairs for next-sentence prediction, WordPiece, masking.

* Documents are split into sentences. As in BERT's data generation, an example starts at
  a random sentence `s` of its document and gathers the following sentences until the
  sequence is full; segment A is the first 1..k-1 of those k sentences (the cut drawn at
  random) and segment B is the rest (label 0, "is next") or, with probability 1/2, text
  of another document (label 1, "random"). Several sentences per segment give NSP far
  more evidence than one sentence each. Where a document gives one sentence, A and B are
  its two parts (cut at a random token). Pairs are truncated longest-first to fit
  `max_length` with `[CLS] A [SEP] B [SEP]`.
* A random B is drawn the way a B that follows is: the rest of another document after a
  random cut, or, where the B that follows fills the sequence, as many tokens of another
  document from a random sentence on. So neither the length, nor where B starts or ends,
  tells the label (a B that follows stops at its document's end; BERT's random B, filled
  to the sequence's length, let the length alone predict 58% of held-out labels of the
  embedded corpus).
* WordPiece with a fast tokenizer (`tokenizers`): loaded from a `vocab.txt`, or trained
  on the training documents.
* Masking: 15% of the non-special tokens (at most `max_predictions`) are chosen; of those
  80% become `[MASK]`, 10% a random token, 10% stay; the model predicts the originals.

Every example is a deterministic function of its index and the seed (augmentation rng in
training, a per-index rng in evaluation), so resumed and multi-process runs see the
same data. Examples are dicts of numpy arrays:
`input_ids`, `token_type_ids` <int32>[max_length], `length` <int32> (real tokens, a prefix),
`masked_positions`, `masked_ids` <int32>[max_predictions], `masked_weights`
<float32>[max_predictions] (0 for unused slots), `nsp_label` <int32>.
"""

from __future__ import annotations

import collections
import functools
import heapq
import itertools
import os
import re
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from jaxmodels.errors import DataError

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9\"'(`])")


def split_sentences(text: str) -> list[str]:
    """Splits prose at sentence ends (a period, ! or ? followed by a capital or digit)."""
    return [s.strip() for s in _SENTENCE_END.split(text.strip()) if s.strip()]


def _tokenizers() -> Any:
    """The `tokenizers` package, or an error that says how to install it."""
    try:
        import tokenizers
    except ImportError as e:
        raise DataError(
            "BERT's WordPiece needs the tokenizers package, in the text extra: "
            "pip install -e '.[text]' (or pip install tokenizers)"
        ) from e
    return tokenizers


def wordpiece(
    vocab_file: str | None,
    texts: Iterable[str] | None = None,
    vocab_size: int = 8000,
    lowercase: bool = True,
):
    """A BERT WordPiece tokenizer from `vocab_file`, or trained on `texts` (`train_vocabulary`:
    the same texts give the same vocabulary in every run; lower-cased).

    `lowercase`: whether text is lower-cased and stripped of accents first, as the vocabulary
    was made (False for a cased model's `vocab.txt`). Special tokens written in a text
    (`"[SEP]"`) are encoded as text. A vocabulary without BERT's special tokens is a
    `DataError`."""
    BertWordPieceTokenizer = _tokenizers().BertWordPieceTokenizer  # noqa: N806

    if vocab_file:
        if not os.path.exists(vocab_file):
            raise DataError(f"vocabulary file {vocab_file} does not exist (config key vocab_file)")
        with open(vocab_file, encoding="utf-8") as f:
            _check_special_tokens((line.rstrip("\n") for line in f), vocab_file)
        tokenizer = BertWordPieceTokenizer(vocab_file, lowercase=lowercase)
    elif texts is None:
        raise ValueError("give a vocab_file or texts to train the vocabulary on")
    else:
        vocab = train_vocabulary(texts, vocab_size)
        tokenizer = BertWordPieceTokenizer({t: i for i, t in enumerate(vocab)}, lowercase=True)
    # "[SEP]" written in a text is text, not the separator the pair's layout depends on.
    tokenizer._tokenizer.encode_special_tokens = True
    return tokenizer


def _check_special_tokens(tokens: Iterable[str], where: str) -> None:
    """A `DataError` naming the special tokens (`SPECIAL_TOKENS`) a vocabulary lacks."""
    have = set(tokens)
    missing = [t for t in SPECIAL_TOKENS if t not in have]
    if missing:
        raise DataError(
            f"{where} has no {', '.join(missing)}: BERT's vocab.txt needs the special tokens "
            f"{', '.join(SPECIAL_TOKENS)}, one per line, at any ids"
        )


def special_ids(tokenizer: Any) -> tuple[int, int, int, int]:
    """The ids of `[PAD]`, `[CLS]`, `[SEP]` and `[MASK]`."""
    _check_special_tokens(tokenizer.get_vocab(), "the vocabulary")
    return tuple(tokenizer.token_to_id(t) for t in ("[PAD]", "[CLS]", "[SEP]", "[MASK]"))


_PREFIX = "##"  # marks a piece that continues a word
_MAX_WORD_CHARS = 100  # longer words are [UNK] to BERT's WordPiece; they teach nothing


def train_vocabulary(
    texts: Iterable[str],
    vocab_size: int,
    min_frequency: int = 2,
    special_tokens: Sequence[str] = SPECIAL_TOKENS,
) -> list[str]:
    """A WordPiece vocabulary learnt from `texts`, deterministically.

    The algorithm of `tokenizers`' WordPiece trainer: words are split as BERT splits them
    (lower-cased, at whitespace and punctuation); every character is a token, and a
    character inside a word also as a `##` piece; then, until `vocab_size` tokens, the most
    frequent pair of adjacent pieces (counted over the words' occurrences; at least
    `min_frequency` times) becomes a new token. Ties go to the pair first in string order.
    `tokenizers`' own trainer breaks ties by ids it hands out in hash-map order, so it learns
    a different vocabulary in each run; processes training on the same texts would not
    agree, and a run could not be repeated.

    Returns the tokens in id order: `special_tokens`, the characters, their `##` pieces
    (all of these, even past `vocab_size`), then the merged pieces in the order they were
    learnt. Pure Python: about 1.5 s for the embedded `stdlib_docs` (650k characters) on
    one CPU core, growing with the number of distinct words.
    """
    tokenizers = _tokenizers()
    normalizers, pre_tokenizers = tokenizers.normalizers, tokenizers.pre_tokenizers

    normalizer = normalizers.BertNormalizer(lowercase=True)
    splitter = pre_tokenizers.BertPreTokenizer()
    counts: collections.Counter[str] = collections.Counter()
    for text in texts:
        counts.update(w for w, _ in splitter.pre_tokenize_str(normalizer.normalize_str(text)))
    words = sorted(w for w in counts if len(w) <= _MAX_WORD_CHARS)
    freqs = [counts[w] for w in words]
    pieces = [[w[0]] + [_PREFIX + c for c in w[1:]] for w in words]

    vocab = list(dict.fromkeys(special_tokens))
    known = set(vocab)
    for token in sorted({c for w in words for c in w}) + sorted({p for w in pieces for p in w[1:]}):
        if token not in known:
            vocab.append(token)
            known.add(token)

    pair_counts: collections.Counter[tuple[str, str]] = collections.Counter()
    where: dict[tuple[str, str], set[int]] = collections.defaultdict(set)
    for i, word in enumerate(pieces):
        for pair in itertools.pairwise(word):
            pair_counts[pair] += freqs[i]
            where[pair].add(i)
    # Max-heap on (count, then string order); stale entries are skipped or refreshed on pop.
    heap = [(-n, pair) for pair, n in pair_counts.items()]
    heapq.heapify(heap)
    while len(vocab) < vocab_size and heap:
        negative, pair = heapq.heappop(heap)
        n = pair_counts.get(pair, 0)
        if n != -negative:  # its count fell since: back in at the count it has now
            if n > 0:
                heapq.heappush(heap, (-n, pair))
            continue
        if n < min_frequency:
            break
        a, b = pair
        merged = a + b[len(_PREFIX) :]
        if merged not in known:
            vocab.append(merged)
            known.add(merged)
        grown = set()  # pairs that occur more often than before: into the heap again
        for i in sorted(where.pop(pair)):
            old, f = pieces[i], freqs[i]
            new, j = [], 0
            while j < len(old):
                if j + 1 < len(old) and old[j] == a and old[j + 1] == b:
                    new.append(merged)
                    j += 2
                else:
                    new.append(old[j])
                    j += 1
            pieces[i] = new
            for p in itertools.pairwise(old):
                pair_counts[p] -= f
            for p in itertools.pairwise(new):
                pair_counts[p] += f
            before, after = set(itertools.pairwise(old)), set(itertools.pairwise(new))
            for p in before - after:
                where[p].discard(i)
            for p in after - before:
                where[p].add(i)
            grown.update(p for p in after if merged in p)
        for p in grown:
            heapq.heappush(heap, (-pair_counts[p], p))
        del pair_counts[pair]
    return vocab


def _joined(sentences: Sequence[np.ndarray]) -> list[int]:
    return [int(t) for sentence in sentences for t in sentence]


def _sentences_until(
    doc: list[np.ndarray], start: int, tokens: int, at_least: int = 1
) -> list[np.ndarray]:
    """Sentences `doc[start:]`, at least `at_least` (if there are), until `tokens` tokens."""
    out, n = [], 0
    for sentence in doc[start:]:
        out.append(sentence)
        n += len(sentence)
        if n >= tokens and len(out) >= at_least:
            break
    return out


class PairSource:
    """Random-access source of pretraining examples over a corpus of documents.

    Example `i` starts in document `i mod len(texts)`: an epoch visits every document once
    and the starting sentence is drawn per example. Fewer examples than documents are
    spread evenly over the corpus. Documents are split into sentences and
    tokenised on demand (cached), so a corpus as large as Wikipedia is never tokenised up
    front.

    Args:
      texts: random-access sequence of document texts (a list, or a TFDS source wrapped
        to return text).
      tokenizer: a `tokenizers` WordPiece tokenizer.
      cache_size: tokenised documents kept in memory.
      num_examples: the source's length (default: one example per document); more than
        the documents gives several pairs per document (e.g. a larger evaluation set).
    """

    def __init__(
        self,
        texts: Sequence[str],
        tokenizer: Any,
        cache_size: int = 4096,
        num_examples: int | None = None,
    ):
        if len(texts) < 2:
            raise DataError("pretraining needs a corpus of at least two documents")
        self.texts = texts
        self.num_examples = num_examples or len(texts)
        self.tokenizer = tokenizer
        self.document = functools.lru_cache(maxsize=cache_size)(self._tokenize)

    def _tokenize(self, d: int) -> list[np.ndarray]:
        sentences = split_sentences(self.texts[d]) or [""]
        encoded = self.tokenizer.encode_batch(sentences, add_special_tokens=False)
        ids = [np.asarray(e.ids, np.int32) for e in encoded if e.ids]
        return ids or [np.asarray([self.tokenizer.token_to_id("[UNK]")], np.int32)]

    def __len__(self) -> int:
        return self.num_examples

    def __getitem__(self, index: int) -> dict[str, int]:
        documents = len(self.texts)
        if self.num_examples < documents:  # spread over the corpus, not its first documents
            return {"index": int(index), "doc": int(index) * documents // self.num_examples}
        return {"index": int(index), "doc": int(index) % documents}


class MaskedPairs:
    """The per-example transform: pair, truncate, assemble, mask.

    Use `train(record, rng)` with Grain's per-example rng, and `eval(record, rng)` for a
    fixed evaluation set (its rng comes from the example's index and `seed`; the task keeps
    that seed fixed, so runs of any seed are scored on the same pairs).
    """

    def __init__(
        self,
        source: PairSource,
        tokenizer: Any,
        max_length: int = 128,
        max_predictions: int = 20,
        mask_rate: float = 0.15,
        seed: int = 0,
    ):
        if max_length < 8:
            raise ValueError(f"max_length must be >= 8, got {max_length}")
        if max_predictions < 1:
            raise ValueError(f"max_predictions must be >= 1, got {max_predictions}")
        self.source = source
        self.max_length = max_length
        self.max_predictions = max_predictions
        self.mask_rate = mask_rate
        self.seed = seed
        self.vocab_size = tokenizer.get_vocab_size()
        self.pad, self.cls, self.sep, self.mask = special_ids(tokenizer)
        # Random replacements: any token but the special ones, wherever the vocabulary has them.
        special = [tokenizer.token_to_id(t) for t in SPECIAL_TOKENS]
        self.regular = np.setdiff1d(np.arange(self.vocab_size), special).astype(np.int32)

    def train(self, record: dict[str, int], rng: np.random.Generator) -> dict[str, np.ndarray]:
        return self._example(record, rng)

    def eval(self, record: dict[str, int], rng: np.random.Generator) -> dict[str, np.ndarray]:  # noqa: ARG002
        return self._example(record, np.random.default_rng([self.seed, record["index"]]))

    def _split(
        self, doc: list[np.ndarray], rng: np.random.Generator, within_sentence: bool = False
    ) -> tuple[list[int], list[int], bool]:
        """Segment A from a random point of `doc`, the text that follows it up to the
        sequence's length (empty where nothing does), and whether A ends inside a sentence:
        where a document cannot give two sentences (or `within_sentence`), A and what
        follows are the two parts of one sentence."""
        budget = self.max_length - 3
        start = int(rng.integers(max(len(doc) - 1, 1)))
        chunk = _sentences_until(doc, start, budget, at_least=2)
        if len(chunk) > 1 and not within_sentence:  # A: the first sentences, then the rest
            cut = int(rng.integers(1, len(chunk)))
            return _joined(chunk[:cut]), _joined(chunk[cut:]), False
        sentence = chunk[0].tolist()
        cut = int(rng.integers(1, len(sentence))) if len(sentence) > 1 else 1
        return sentence[:cut], sentence[cut:], True

    def _example(self, record: dict[str, int], rng: np.random.Generator) -> dict[str, np.ndarray]:
        budget = self.max_length - 3
        a, following, within = self._split(self.source.document(record["doc"]), rng)
        if following and rng.random() < 0.5:
            b, nsp = following, 0
        else:
            n = len(self.source.texts)
            other = int(rng.integers(n - 1))
            other += other >= record["doc"]  # any document but this one
            # B is drawn as the B that follows is: where it starts and ends, and so its
            # length, would otherwise tell the label.
            other_doc = self.source.document(other)
            if len(a) + len(following) > budget:  # one that follows would be cut short
                start = int(rng.integers(len(other_doc)))
                run = _joined(_sentences_until(other_doc, start, len(following)))
                b = run[: len(following)]
            else:
                other_a, other_following, _ = self._split(other_doc, rng, within)
                b = other_following or other_a
            nsp = 1
        while len(a) + len(b) > budget:  # truncate the longer segment, from the end
            (a if len(a) >= len(b) else b).pop()
        tokens = [self.cls, *a, self.sep, *b, self.sep]
        types = [0] * (len(a) + 2) + [1] * (len(b) + 1)
        n = len(tokens)

        candidates = np.array(
            [i for i, t in enumerate(tokens) if t not in (self.cls, self.sep)], np.int64
        )
        count = min(self.max_predictions, max(1, int(round(len(candidates) * self.mask_rate))))
        chosen = np.sort(rng.choice(candidates, size=count, replace=False))
        input_ids = np.full(self.max_length, self.pad, np.int32)
        input_ids[:n] = tokens
        originals = input_ids[chosen].copy()
        roll = rng.random(count)
        random_ids = self.regular[rng.integers(len(self.regular), size=count)]
        input_ids[chosen] = np.where(
            roll < 0.8, self.mask, np.where(roll < 0.9, random_ids, originals)
        )

        token_type_ids = np.zeros(self.max_length, np.int32)
        token_type_ids[:n] = types
        positions = np.zeros(self.max_predictions, np.int32)
        labels = np.zeros(self.max_predictions, np.int32)
        weights = np.zeros(self.max_predictions, np.float32)
        positions[:count], labels[:count], weights[:count] = chosen, originals, 1.0
        return {
            "input_ids": input_ids,
            "token_type_ids": token_type_ids,
            "length": np.int32(n),
            "masked_positions": positions,
            "masked_ids": labels,
            "masked_weights": weights,
            "nsp_label": np.int32(nsp),
        }
