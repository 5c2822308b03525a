"""Tests for the text-classification data: the embedded stdlib docstrings, words, pipelines."""

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from jaxmodels.errors import DataError
from train.data import pipeline, text

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# ---------------------------------------------------------------------------------------
# The embedded dataset.


@pytest.fixture(scope="module")
def docs_dir(tmp_path_factory):
    data_dir = str(tmp_path_factory.mktemp("stdlib_docs"))
    text.prepare(data_dir)
    return data_dir


def _split(data_dir, split):
    """(texts as str, labels) of a prepared split, in stored order."""
    source = text.prepare(data_dir).as_data_source(split)
    records = [source[i] for i in range(len(source))]
    return [text.record_text(r, "text") for r in records], np.array(
        [int(r["label"]) for r in records]
    )


@pytest.fixture(scope="module")
def train_split(docs_dir):
    return _split(docs_dir, "train")


@pytest.fixture(scope="module")
def test_split(docs_dir):
    return _split(docs_dir, "test")


def test_dataset_has_splits_classes_and_sizes(docs_dir, train_split, test_split):
    builder = text.prepare(docs_dir)
    assert set(builder.info.splits) == {"train", "test"}
    label = builder.info.features["label"]
    assert label.num_classes == len(text.CLASS_NAMES) == 10
    assert list(label.names) == list(text.CLASS_NAMES)
    n_train, n_test = len(train_split[0]), len(test_split[0])
    assert (
        builder.info.splits["train"].num_examples,
        builder.info.splits["test"].num_examples,
    ) == (
        n_train,
        n_test,
    )
    # Several thousand examples, split about 80/20.
    assert n_train + n_test > 3000
    assert 0.15 < n_test / (n_train + n_test) < 0.25


def test_labels_in_range_and_every_class_in_both_splits(train_split, test_split):
    for _, labels in (train_split, test_split):
        assert labels.min() >= 0 and labels.max() < len(text.CLASS_NAMES)
        counts = np.bincount(labels, minlength=len(text.CLASS_NAMES))
        assert (counts >= 20).all(), counts


def test_texts_are_chunks_of_english_and_splits_are_disjoint(train_split, test_split):
    train_texts, test_texts = train_split[0], test_split[0]
    for texts in (train_texts, test_texts):
        assert all(isinstance(t, str) for t in texts)
        lengths = np.array([len(t.split()) for t in texts])
        assert lengths.min() >= text.MIN_WORDS and lengths.max() <= text.MAX_WORDS
        assert len(set(texts)) == len(texts)  # no duplicates within a split
    assert not set(train_texts) & set(test_texts)
    # Real prose: the commonest English words are there.
    words = text.WordTokenizer.build(train_texts, vocab_size=12).vocab[2:]
    assert {"the", "a", "of", "to", "is"} <= set(words)


def _word_ngrams(t, n=4):
    words = t.lower().split()
    return {tuple(words[i : i + n]) for i in range(max(1, len(words) - n + 1))}


def test_no_test_text_has_a_near_copy_in_train(train_split, test_split):
    """Was: 70 of 793 test texts overlapped a train text by half or more of their word
    4-grams (e.g. json.dump's and json.dumps's docstrings, split between the two)."""
    train = [_word_ngrams(t) for t in train_split[0]]
    holders = {}
    for i, grams in enumerate(train):
        for g in grams:
            holders.setdefault(g, []).append(i)
    worst = 0.0
    for t in test_split[0]:
        grams = _word_ngrams(t)
        for i in {i for g in grams for i in holders.get(g, ())}:
            worst = max(worst, len(grams & train[i]) / len(grams | train[i]))
    assert worst < 0.5, worst


def test_near_duplicates_are_grouped():
    from train.data import stdlib_docs

    a = "Return the sum of the squares of the items of the iterable x."
    docs = [[a], ["Frobnicate every widget in the list, slowly."], [a.replace("sum", "mean")]]
    docs.append(["one chunk of its own words here now", a.replace("x.", "y.")])
    groups = stdlib_docs._near_duplicate_groups(docs)
    assert groups[0] == groups[2] == groups[3] != groups[1]


def test_known_docstrings_get_their_area(train_split, test_split):
    texts = train_split[0] + test_split[0]
    labels = np.concatenate([train_split[1], test_split[1]])
    by_text = dict(zip(texts, labels.tolist(), strict=True))
    expected = {
        "Return the Euclidean distance between two points p": "numbers",
        "Connect to the host and port specified in __init__.": "web",
        "Set the charset of the payload to a given character set.": "email",
    }
    for start, area in expected.items():
        found = [label for t, label in by_text.items() if t.startswith(start)]
        assert found and {text.CLASS_NAMES[label] for label in found} == {area}, start


def test_prepare_is_offline_and_deterministic(docs_dir, tmp_path):
    """A second preparation, in another process with the network cut off and a standard
    function patched, writes the same data."""
    other = str(tmp_path / "again")
    code = textwrap.dedent(
        f"""
        import sys

        def no_network(event, args):
            if event.startswith(("socket.connect", "socket.getaddrinfo", "urllib.Request")):
                raise OSError(f"network access during preparation: {{event}}")

        sys.addaudithook(no_network)
        import inspect

        # Some packages patch standard functions on import (their docstrings go with them);
        # the dataset must not depend on what the preparing process imported before.
        inspect.getfile = lambda obj: "patched"
        from train.data import text
        assert text.prepare({other!r}).is_prepared()
        import socket

        try:
            socket.create_connection(("localhost", 9))
        except OSError as e:
            assert "network access during preparation" in str(e), e
        else:
            raise AssertionError("the network was not cut off")
        """
    )
    env = {**os.environ, "PYTHONHASHSEED": "123"}
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-3000:]
    for split in ("train", "test"):
        first_texts, first_labels = _split(docs_dir, split)
        again_texts, again_labels = _split(other, split)
        assert first_texts[:5] == again_texts[:5]
        assert first_texts == again_texts
        np.testing.assert_array_equal(first_labels, again_labels)


def test_open_text_source_embedded(docs_dir):
    source, num_classes, names = text.open_text_source("stdlib_docs", "test", docs_dir)
    assert num_classes == 10 and names == list(text.CLASS_NAMES)
    record = source[0]
    assert isinstance(text.record_text(record, "text"), str)
    assert 0 <= int(record["label"]) < num_classes
    with pytest.raises(DataError, match="'description'"):
        text.open_text_source("stdlib_docs", "test", docs_dir, text_key="description")


def _prose_features():
    """Articles with a title and a text and no label, like `wikipedia`."""
    import tensorflow_datasets as tfds

    return {"title": tfds.features.Text(), "text": tfds.features.Text()}


def _prose_records():
    return [
        {
            "title": f"Title {i}",
            "text": f"Article {i} opens here. It goes on for a while. Then it ends.",
        }
        for i in range(6)
    ]


def test_pretraining_and_language_models_read_corpora_without_labels(tmp_path):
    """Pretraining and language modelling read only text: a corpus without a label (as
    `wikipedia`, `bert_pretrain.py:base`'s) is theirs; text classification refuses it."""
    import ml_collections

    from tests.helpers import prepare_local_dataset
    from train.tasks import bert_pretraining, language_model

    data_dir = str(tmp_path)
    prepare_local_dataset("UnlabelledProse", _prose_features, _prose_records, data_dir)
    source = text.open_corpus("unlabelled_prose", "train", data_dir)
    texts = sorted(text.read_texts(source, "text"))
    assert len(texts) == 6 and texts[0].startswith("Article 0 opens here.")
    with pytest.raises(DataError, match=r"no text feature 'body'.*config key text_key"):
        text.open_corpus("unlabelled_prose", "train", data_dir, text_key="body")
    with pytest.raises(DataError, match="text classification needs .* and a 'label'"):
        text.open_text_source("unlabelled_prose", "train", data_dir)
    config = ml_collections.ConfigDict(
        {"dataset": "unlabelled_prose", "text_key": "", "data_dir": data_dir}
    )
    docs = bert_pretraining.corpus(config, "train")
    assert sorted(docs[i] for i in range(len(docs))) == texts
    stream = language_model.corpus(config, "train")
    assert len(stream) >= sum(len(t) for t in texts)


def test_missing_tfds_dataset_is_a_data_error_with_the_build_command(tmp_path):
    data_dir = str(tmp_path)
    for name in ("imdb_reviews", "ag_news_subset"):
        with pytest.raises(DataError) as info:
            text.open_text_source(name, "train", data_dir)
        message = str(info.value)
        assert name in message and data_dir in message
        assert f"tfds build {name} --data_dir={data_dir} --file_format=array_record" in message
    with pytest.raises(DataError, match="unknown TFDS dataset 'no_such_dataset'"):
        text.open_text_source("no_such_dataset", "train", data_dir)
    # Nothing was downloaded.
    assert not any(name.endswith(".array_record") for _, _, f in os.walk(data_dir) for name in f)


def test_dataset_prepared_at_another_version_names_that_version(tmp_path):
    # Prepared by another TFDS, whose default version differs from this one's.
    from train.data import tfds_local

    prepared = tmp_path / "mnist" / "1.0.0"
    prepared.mkdir(parents=True)
    (prepared / "dataset_info.json").write_text("{}")
    with pytest.raises(
        DataError, match=r"not prepared .* but at 1\.0\.0 .* dataset='mnist:1\.0\.0'"
    ):
        tfds_local.prepared_builder("mnist", str(tmp_path))


def test_text_keys():
    assert text.text_key_for("stdlib_docs") == "text"
    assert text.text_key_for("imdb_reviews") == "text"
    assert text.text_key_for("ag_news_subset") == "description"
    assert text.text_key_for("ag_news_subset", "title") == "title"
    assert text.text_key_for("ag_news_subset:1.0.0") == "description"  # was "text"
    assert text.text_key_for("glue/sst2:2.0.0") == "sentence"


# ---------------------------------------------------------------------------------------
# Words.


def test_tokenizer_vocab_order_is_frequency_then_alphabet():
    texts = ["b a c a", "B, d! a; c", "it's don't 'quoted'"]
    tok = text.WordTokenizer.build(texts, vocab_size=100)
    # a: 3; b, c: 2; then the words seen once, alphabetically.
    assert tok.vocab == ["<pad>", "<unk>", "a", "b", "c", "d", "don't", "it's", "quoted"]
    assert len(tok) == 9
    # The order of the texts does not matter; vocab_size truncates the tail.
    assert text.WordTokenizer.build(texts[::-1], vocab_size=100).vocab == tok.vocab
    assert text.WordTokenizer.build(texts, vocab_size=4).vocab == ["<pad>", "<unk>", "a", "b"]


def test_words_of_any_script_are_words():
    """Were runs of ASCII letters only: Russian text was one `<unk>`, `café` was `caf`."""
    assert text.words("Café naïve Zürich, FUSSBALL") == ["café", "naïve", "zürich", "fussball"]
    assert text.words("Жизнь прекрасна; l'été 2024") == ["жизнь", "прекрасна", "l'été", "2024"]
    assert text.words("cafe\u0301") == text.words("caf\u00e9") == ["caf\u00e9"]  # combining
    assert text.words("snake_case x_1") == ["snake", "case", "x", "1"]
    # Combining marks are part of a word (Devanagari's vowel signs, Arabic's harakat).
    assert text.words("हिन्दी भाषा") == ["हिन्दी", "भाषा"]
    assert text.words("العَرَبِيَّة") == ["العَرَبِيَّة"]


def test_a_vocabulary_saved_before_words_of_every_script_splits_as_it_was_made(tmp_path):
    """A resumed run keeps its ids: a file without the splitting it was made with (older
    versions) splits ASCII runs, as it was built."""
    path = tmp_path / "tokenizer.json"
    path.write_text('{"kind": "word", "vocab": ["<pad>", "<unk>", "caf", "na"]}')
    old = text.WordTokenizer.load(str(path))
    assert old.encode("Café naïve", 4)[0].tolist() == [2, 3, 1, 0]  # caf, na, <unk> (ve)
    new = text.WordTokenizer.build(["Café naïve"], 10)
    new.save(str(path))
    assert text.WordTokenizer.load(str(path)).encode("café", 2)[0].tolist() == [2, 0]
    # A file without the record whose words are not ASCII was made with words of any script.
    path.write_text('{"kind": "word", "vocab": ["<pad>", "<unk>", "café", "жизнь"]}')
    assert text.WordTokenizer.load(str(path)).encode("Жизнь café", 2)[0].tolist() == [3, 2]
    with pytest.raises(ValueError, match="words must be one of"):
        text.WordTokenizer(["<pad>", "<unk>"], words="bytes")


def test_tokenizer_encode_pads_truncates_and_counts():
    tok = text.WordTokenizer.build(["one two three four five"], vocab_size=100)
    ids, length = tok.encode("Two THREE zebra", max_length=6)
    assert ids.dtype == np.int32 and ids.shape == (6,)
    assert ids.tolist() == [tok.vocab.index("two"), tok.vocab.index("three"), 1, 0, 0, 0]
    assert length == 3
    ids, length = tok.encode("one two three four five one", max_length=4)
    assert length == 4 and ids.tolist() == [
        tok.vocab.index(w) for w in ("one", "two", "three", "four")
    ]
    # Nothing but punctuation: one <unk>, never an empty sequence.
    ids, length = tok.encode(" ... !", max_length=3)
    assert ids.tolist() == [1, 0, 0] and length == 1
    with pytest.raises(ValueError, match="max_length"):
        tok.encode("one", max_length=0)


def test_tokenizer_on_the_dataset_ids_in_range_and_round_trip(train_split, tmp_path):
    texts = train_split[0]
    tok = text.WordTokenizer.build(texts, vocab_size=2000)
    assert len(tok) == 2000
    assert text.WordTokenizer.build(texts, vocab_size=2000).vocab == tok.vocab
    encoded = np.stack([tok.encode(t, 64)[0] for t in texts[:300]])
    assert encoded.min() >= 0 and encoded.max() < len(tok)
    assert (encoded == 1).any()  # rare words are unknown at this size
    path = str(tmp_path / "vocab.json")
    tok.save(path)
    loaded = text.WordTokenizer.load(path)
    assert loaded.vocab == tok.vocab
    np.testing.assert_array_equal(loaded.encode(texts[0], 64)[0], tok.encode(texts[0], 64)[0])
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(DataError, match="bad.json"):
        text.WordTokenizer.load(str(tmp_path / "bad.json"))


def test_vocab_from_train_only(train_split, test_split):
    tok = text.WordTokenizer.build(train_split[0], vocab_size=10**9)
    train_words = {w for t in train_split[0] for w in text.words(t)}
    assert set(tok.vocab[2:]) == train_words
    test_only = sorted({w for t in test_split[0] for w in text.words(t)} - train_words)
    assert test_only  # the test split has words of its own...
    ids, length = tok.encode(" ".join(test_only[:10]), max_length=10)
    assert ids.tolist() == [1] * 10 and length == 10  # ...and they are unknown


# ---------------------------------------------------------------------------------------
# Preprocessing and pipelines.


def test_text_preprocess_shapes_and_dtypes():
    tok = text.WordTokenizer.build(["alpha beta gamma"], vocab_size=10)
    preprocess = text.text_preprocess(tok, max_length=5, text_key="description")
    rng = np.random.default_rng(0)
    for value in (b"beta gamma delta", "beta gamma delta", np.array(b"beta gamma delta", object)):
        out = preprocess({"description": value, "label": np.int64(3)}, rng)
        assert set(out) == {"tokens", "length", "label"}
        assert out["tokens"].dtype == np.int32 and out["tokens"].shape == (5,)
        assert out["tokens"].tolist() == [
            tok.vocab.index("beta"),
            tok.vocab.index("gamma"),
            1,
            0,
            0,
        ]
        assert out["length"].dtype == np.int32 and out["length"] == 3
        assert out["label"].dtype == np.int32 and out["label"] == 3


def test_train_iterator_and_eval_batches_over_the_text_source(docs_dir):
    train, num_classes, _ = text.open_text_source("stdlib_docs", "train", docs_dir)
    test, _, _ = text.open_text_source("stdlib_docs", "test", docs_dir)
    tok = text.WordTokenizer.build(text.read_texts(train, "text"), vocab_size=3000)
    preprocess = text.text_preprocess(tok, max_length=48, text_key="text")
    batches = pipeline.train_iterator(
        train, global_batch_size=16, seed=0, preprocess=preprocess, num_threads=2
    )
    for _ in range(3):
        batch = next(batches)
        assert batch["tokens"].shape == (16, 48) and batch["tokens"].dtype == np.int32
        assert batch["length"].shape == (16,) and batch["label"].shape == (16,)
        assert (batch["length"] >= 1).all() and (batch["length"] <= 48).all()
        # Real tokens up to length, padding after.
        positions = np.arange(48)[None, :]
        assert (batch["tokens"][positions < batch["length"][:, None]] > 0).all()
        assert (batch["tokens"][positions >= batch["length"][:, None]] == 0).all()
        assert batch["tokens"].max() < len(tok)
        assert (batch["label"] >= 0).all() and (batch["label"] < num_classes).all()
    seen = 0
    for batch in pipeline.eval_batches(
        test, global_batch_size=128, preprocess=preprocess, num_threads=2
    ):
        assert batch["tokens"].shape == (128, 48)
        seen += int(batch["weight"].sum())
    assert seen == len(test)


# ---------------------------------------------------------------------------------------
# The classes can be learned from the words alone.


def test_bag_of_words_naive_bayes_beats_chance_by_far(train_split, test_split):
    """Multinomial naive Bayes on word counts: 0.77 test accuracy seen (chance ~0.15)."""
    from sklearn.feature_extraction.text import CountVectorizer
    from sklearn.naive_bayes import MultinomialNB

    vectorizer = CountVectorizer(tokenizer=text.words, lowercase=False, token_pattern=None)
    model = MultinomialNB().fit(vectorizer.fit_transform(train_split[0]), train_split[1])
    predicted = model.predict(vectorizer.transform(test_split[0]))
    accuracy = float(np.mean(predicted == test_split[1]))
    majority = np.bincount(test_split[1]).max() / len(test_split[1])
    assert majority < 0.2
    assert accuracy > 0.6, accuracy
