"""Text-classification data: the embedded standard-library docstrings, TFDS sources, words.

The embedded dataset, `stdlib_docs`, is made of the docstrings of the Python standard
library, labelled by the area of the library they document. It is real English prose
written by many authors over three decades, it ships with every Python, and so it needs
no network. The ten classes (label, name), each a fixed set of top-level modules and
packages with all of their importable submodules:

* 0 `email`: e-mail messages and mail protocols (email, mailbox, smtplib, imaplib,
  poplib, mimetypes, quopri).
* 1 `web`: the web and markup (http, urllib, html, xml, wsgiref, xmlrpc, webbrowser).
* 2 `concurrency`: running things at once (asyncio, concurrent, multiprocessing,
  threading, queue, sched, subprocess).
* 3 `files`: files, paths and archives (os, posixpath, io, pathlib, shutil, tempfile,
  glob, fnmatch, filecmp, zipfile, tarfile, gzip, bz2, lzma, zlib).
* 4 `text`: strings and text formats (string, re, textwrap, difflib, unicodedata,
  codecs, csv, json).
* 5 `testing`: testing, debugging and profiling (unittest, doctest, pdb, bdb, trace,
  cProfile, profile, pstats, timeit).
* 6 `numbers`: numbers and randomness (math, cmath, decimal, fractions, random,
  statistics, numbers).
* 7 `datatypes`: containers and types (collections, dataclasses, enum, typing, array,
  heapq, bisect, copy, weakref, types).
* 8 `language`: Python inspecting and processing Python (ast, dis, inspect, importlib,
  tokenize, symtable, compileall, pydoc).
* 9 `networking`: sockets and network protocols (socket, ssl, select, selectors,
  socketserver, ftplib, ipaddress).

How it is made: every allowed module is imported (submodules that fail to import, test
packages and `__main__` modules are skipped), and the module's own docstring and those of
the classes, functions and methods it defines (in sorted order; docstrings inherited from
elsewhere are not counted) are collected. A docstring found in more than one area is
dropped as ambiguous; of the rest, those of at least 8 words are kept, whitespace
collapsed, and one longer than 120 words is cut into near-equal chunks of at most 120
words. Each chunk is one example, `{"text": str, "label": int}`. About 4,000 examples
(their number depends a little on the Python version); the classes are not balanced.
Whole docstrings go to `train` or `test` (a fixed hash of where they were found, ~80/20),
so no docstring is split across the two, and near-duplicates go together (docstrings with
a chunk whose word 4-grams overlap another's by half or more, e.g. those of `json.dump`
and `json.dumps`, or of the `os.spawn*` family): no test text has a near copy in `train`.

The dataset is registered with TFDS as `stdlib_docs` and written as array_record on
first use (about a second), then read like any TFDS dataset with `as_data_source`.

Words become ids with `WordTokenizer`, a vocabulary built from a training split, and
`text_preprocess` turns records into fixed-length `{"tokens", "length", "label"}` examples
for the Grain pipelines in `train.data.pipeline`.

Example:
    >>> import tempfile
    >>> from train.data import pipeline
    >>> data_dir = tempfile.mkdtemp()
    >>> source, num_classes, names = open_text_source(
    ...     "stdlib_docs", "train", data_dir)  # doctest: +ELLIPSIS
    Downloading and preparing dataset ...
    Dataset stdlib_docs downloaded and prepared to ...
    >>> num_classes, names[:3]
    (10, ['email', 'web', 'concurrency'])
    >>> tokenizer = WordTokenizer.build(read_texts(source, "text"), vocab_size=5000)
    >>> preprocess = text_preprocess(tokenizer, max_length=128, text_key="text")
    >>> batches = pipeline.train_iterator(
    ...     source, global_batch_size=32, seed=0, preprocess=preprocess)
    >>> batch = next(batches)
    >>> batch["tokens"].shape, batch["length"].shape, batch["label"].shape
    ((32, 128), (32,), (32,))
"""

from __future__ import annotations

import collections
import functools
import json
import re
import subprocess
import sys
import unicodedata
from collections.abc import Iterable
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from jaxmodels.errors import DataError
from train.data import stdlib_docs, tfds_local
from train.data.images import default_data_dir
from train.data.stdlib_docs import (  # noqa: F401 - re-exported: the dataset's definition
    AREAS,
    CLASS_NAMES,
    MAX_WORDS,
    MIN_WORDS,
    stdlib_examples,
)

EMBEDDED = "stdlib_docs"

# Feature holding the text, for TFDS datasets whose text is not under "text".
_TEXT_KEYS = {"ag_news_subset": "description", "glue": "sentence"}


def collect_examples() -> dict[str, list[tuple[str, str, int]]]:
    """`stdlib_examples()` computed in a fresh, isolated interpreter (see stdlib_docs)."""
    proc = subprocess.run(
        [sys.executable, "-I", "-S", stdlib_docs.__file__],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        raise DataError(f"collecting the stdlib_docs examples failed:\n{proc.stderr[-2000:]}")
    return {k: [tuple(x) for x in v] for k, v in json.loads(proc.stdout).items()}


class StdlibDocs(tfds.core.GeneratorBasedBuilder):
    """Docstrings of the Python standard library, labelled by the area they document."""

    VERSION = tfds.core.Version("1.1.0")
    RELEASE_NOTES = {
        "1.0.0": "Initial release.",
        "1.1.0": "Near-duplicate docstrings go to the same split.",
    }

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=__doc__,
            features=tfds.features.FeaturesDict(
                {
                    "text": tfds.features.Text(),
                    "label": tfds.features.ClassLabel(names=list(CLASS_NAMES)),
                }
            ),
            supervised_keys=("text", "label"),
            homepage="https://docs.python.org/3/library/",
        )

    def _split_generators(self, dl_manager):  # noqa: ARG002 - nothing to download
        examples = collect_examples()
        return {split: self._generate_examples(examples[split]) for split in ("train", "test")}

    def _generate_examples(self, examples: list[tuple[str, str, int]]):
        for key, text, label in examples:
            yield key, {"text": text, "label": label}


def prepare(data_dir: str) -> StdlibDocs:
    """Writes the dataset under `data_dir` if it is not there yet; returns the builder."""
    return tfds_local.prepare_once(StdlibDocs, data_dir)


# ---------------------------------------------------------------------------------------
# Sources.


def text_key_for(name: str, text_key: str | None = None) -> str:
    """The feature holding the text in dataset `name` (`text_key` if given)."""
    if text_key:
        return text_key
    base = name.split(":", 1)[0]  # "glue/sst2:2.0.0" -> "glue/sst2"
    return _TEXT_KEYS.get(base, _TEXT_KEYS.get(base.split("/")[0], "text"))


def _builder(name: str, data_dir: str | None) -> Any:
    """The TFDS builder of text dataset `name`: the embedded one prepared on first use, any
    other already prepared in `data_dir` (nothing is downloaded)."""
    data_dir = data_dir or default_data_dir()
    if name == EMBEDDED:
        return prepare(data_dir)
    return tfds_local.prepared_builder(
        name, data_dir, f"The embedded dataset {EMBEDDED!r} needs no download."
    )


def open_corpus(name: str, split: str, data_dir: str | None, text_key: str | None = None) -> Any:
    """A random-access source for `split` of text dataset `name`, for tasks that read only
    its text (pretraining, language modelling): any prepared TFDS dataset whose records
    hold a text feature, labelled or not (e.g. `wikipedia/20230601.en`, `lm1b`).

    Records hold the text under `text_key_for(name, text_key)` (possibly as bytes; see
    `record_text`).
    """
    builder = _builder(name, data_dir)
    key = text_key_for(name, text_key)
    if key not in builder.info.features:
        raise DataError(
            f"dataset {name!r} has features {sorted(builder.info.features)} and no text "
            f"feature {key!r}; name the one that holds the text with the config key text_key"
        )
    return tfds_local.split_source(builder, name, split, data_dir or default_data_dir())


def open_text_source(
    name: str, split: str, data_dir: str | None, text_key: str | None = None
) -> tuple[Any, int, list[str]]:
    """A random-access source for `split` of text classification dataset `name`, its class
    count and names.

    `stdlib_docs` is prepared on first use; any other TFDS dataset (e.g. `imdb_reviews`,
    `ag_news_subset`) must already be prepared in `data_dir`: nothing is downloaded.
    Records hold the text under `text_key_for(name, text_key)` (possibly as bytes; see
    `record_text`) and an integer `label`.
    """
    builder = _builder(name, data_dir)
    features = builder.info.features
    key = text_key_for(name, text_key)
    if key not in features or "label" not in features:
        raise DataError(
            f"dataset {name!r} has features {sorted(features)}; text classification needs a "
            f"text feature {key!r} (config key text_key) and a 'label'"
        )
    label = features["label"]
    if not isinstance(label, tfds.features.ClassLabel):
        raise DataError(f"the 'label' of dataset {name!r} is not a class label: {label}")
    source = tfds_local.split_source(builder, name, split, data_dir or default_data_dir())
    return source, int(label.num_classes), list(label.names)


def record_text(record: Any, text_key: str) -> str:
    """The text of a record as str (TFDS may return it as bytes)."""
    text = record[text_key]
    if isinstance(text, np.ndarray):
        text = text.item()
    return text.decode("utf-8") if isinstance(text, bytes) else str(text)


def read_texts(source: Any, text_key: str) -> list[str]:
    """Every text of a source, in order (e.g. to build a vocabulary from `train`)."""
    return [record_text(source[i], text_key) for i in range(len(source))]


# ---------------------------------------------------------------------------------------
# Words to ids.

PAD, UNK = 0, 1
_ASCII_WORD = re.compile(r"[a-z0-9]+(?:'[a-z0-9]+)*")


@functools.cache
def _word() -> re.Pattern[str]:
    """Runs of letters, digits and combining marks (which `\\w` lacks: the vowel signs of
    Devanagari, Arabic's harakat), with inner apostrophes. Built on first use (a pass over
    the code points, some 0.2 s)."""
    marks, start = [], None
    for cp in range(sys.maxunicode + 2):
        mark = cp <= sys.maxunicode and unicodedata.category(chr(cp)).startswith("M")
        if mark and start is None:
            start = cp
        elif not mark and start is not None:
            marks.append(f"{re.escape(chr(start))}-{re.escape(chr(cp - 1))}")
            start = None
    char = f"(?:[^\\W_]|[{''.join(marks)}])"
    return re.compile(f"{char}+(?:'{char}+)*")


def words(text: str) -> list[str]:
    """Lower-cased words: runs of letters, digits and combining marks of any script
    (`café`, `жизнь`, `हिन्दी`), with inner apostrophes; text is composed first (NFC), so a
    word is one token however its accents are written."""
    return _word().findall(unicodedata.normalize("NFC", text).lower())


def ascii_words(text: str) -> list[str]:
    """The words of vocabularies saved before `words` took every script: runs of ASCII
    letters and digits (a resumed run splits its text as its vocabulary was made)."""
    return _ASCII_WORD.findall(text.lower())


class WordTokenizer:
    """A word-level vocabulary: id 0 is `<pad>`, 1 is `<unk>`, then words by frequency.

    Example:
        >>> tok = WordTokenizer.build(["the cat sat", "the dog"], vocab_size=10)
        >>> tok.vocab
        ['<pad>', '<unk>', 'the', 'cat', 'dog', 'sat']
        >>> tok.encode("The bird sat", max_length=5)
        (array([2, 1, 5, 0, 0], dtype=int32), 3)
    """

    SPLITS = {"unicode": words, "ascii": ascii_words}  # how text becomes words

    def __init__(self, vocab: list[str], words: str = "unicode"):
        """`words`: a key of `SPLITS`: `unicode`; `ascii` for vocabularies made before."""
        if vocab[:2] != ["<pad>", "<unk>"] or len(set(vocab)) != len(vocab):
            raise ValueError("vocab must start with '<pad>', '<unk>' and have no duplicates")
        if words not in self.SPLITS:
            raise ValueError(f"words must be one of {sorted(self.SPLITS)}, got {words!r}")
        self.vocab = list(vocab)
        self.words = words
        self._split = self.SPLITS[words]
        self._ids = {word: i for i, word in enumerate(self.vocab)}

    @classmethod
    def build(cls, texts: Iterable[str], vocab_size: int = 10_000) -> WordTokenizer:
        """The `vocab_size - 2` most frequent words of `texts` (ties alphabetical)."""
        if vocab_size < 2:
            raise ValueError(f"vocab_size must be at least 2 (<pad>, <unk>), got {vocab_size}")
        counts = collections.Counter()
        for text in texts:
            counts.update(words(text))
        ranked = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
        return cls(["<pad>", "<unk>"] + [word for word, _ in ranked[: vocab_size - 2]])

    def __len__(self) -> int:
        return len(self.vocab)

    def encode(self, text: str, max_length: int) -> tuple[np.ndarray, int]:
        """(<int32>[max_length] ids, zero-padded and truncated; number of real tokens).

        A text without words encodes as one `<unk>`, so no sequence is empty.
        """
        if max_length < 1:
            raise ValueError(f"max_length must be at least 1, got {max_length}")
        ids = [self._ids.get(word, UNK) for word in self._split(text)[:max_length]] or [UNK]
        out = np.zeros(max_length, np.int32)
        out[: len(ids)] = ids
        return out, len(ids)

    def save(self, path: str) -> None:
        """Writes the vocabulary as JSON, with how text is split into its words."""
        with open(path, "w", encoding="utf-8") as f:
            record = {"kind": "word", "words": self.words, "vocab": self.vocab}
            json.dump(record, f, ensure_ascii=False)

    @classmethod
    def load(cls, path: str) -> WordTokenizer:
        """Reads a vocabulary written by `save`, with the word splitting it was made with (a
        file of a version that did not record it: ASCII runs, its words show)."""
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
            vocab = data["vocab"]
            ascii_only = all(_ASCII_WORD.fullmatch(w) for w in vocab[2:])
            return cls(vocab, data.get("words", "ascii" if ascii_only else "unicode"))
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise DataError(f"cannot read the vocabulary {path}: {e}") from e


def _encode_record(
    record: Any,
    rng: np.random.Generator,  # noqa: ARG001 - no randomness
    *,
    tokenizer: WordTokenizer,
    max_length: int,
    text_key: str,
) -> dict[str, np.ndarray]:
    tokens, length = tokenizer.encode(record_text(record, text_key), max_length)
    return {
        "tokens": tokens,
        "length": np.int32(length),
        "label": np.int32(record["label"]),
    }


def text_preprocess(tokenizer: WordTokenizer, max_length: int, text_key: str = "text") -> Any:
    """`(record, rng) -> {"tokens": <int32>[max_length], "length": int32, "label": int32}`.

    For `pipeline.train_iterator` and `pipeline.eval_batches` (whose padding examples have
    `length` 0 and `weight` 0).
    """
    if max_length < 1:
        raise ValueError(f"max_length must be at least 1, got {max_length}")
    return functools.partial(
        _encode_record, tokenizer=tokenizer, max_length=max_length, text_key=text_key
    )
