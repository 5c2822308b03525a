"""BERT pretraining data: sentence pairs, WordPiece, and the 80/10/10 masking of 15%."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("tokenizers", reason="needs the text extra (tokenizers)")

from jaxmodels.errors import DataError  # noqa: E402
from train.data import mlm  # noqa: E402

TEXTS = [
    "The cat sat on the mat. It was warm there. The dog did not mind at all.",
    "Numbers can be added. They can also be multiplied! Division needs care.",
    "Files live on disks. Paths name them. Some paths are relative to the cwd.",
    "Sockets carry bytes. A server listens on a port. Clients connect to it.",
] * 5


@pytest.fixture(scope="module")
def setup():
    tokenizer = mlm.wordpiece(None, TEXTS, vocab_size=200)
    source = mlm.PairSource(TEXTS, tokenizer)
    pairs = mlm.MaskedPairs(source, tokenizer, max_length=32, max_predictions=6, seed=0)
    return tokenizer, source, pairs


def test_without_tokenizers_the_error_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "tokenizers", None)  # as if not installed
    with pytest.raises(DataError, match=r"tokenizers package, in the text extra: pip install"):
        mlm.wordpiece(None, TEXTS, vocab_size=200)


def test_split_sentences():
    assert mlm.split_sentences("One thing. Two things! Three? 4 is a number. e.g. not this.") == [
        "One thing.",
        "Two things!",
        "Three?",
        "4 is a number. e.g. not this.",
    ]


def test_wordpiece_special_tokens_and_round_trip(setup, tmp_path):
    tokenizer, _, _ = setup
    assert [tokenizer.token_to_id(t) for t in mlm.SPECIAL_TOKENS] == [0, 1, 2, 3, 4]
    tokenizer.save_model(str(tmp_path))
    loaded = mlm.wordpiece(str(tmp_path / "vocab.txt"))
    text = "the cat sat on a warm mat"
    assert loaded.encode(text, add_special_tokens=False).ids == (
        tokenizer.encode(text, add_special_tokens=False).ids
    )
    with pytest.raises(DataError, match="does not exist"):
        mlm.wordpiece(str(tmp_path / "missing.txt"))


def _unmask(example):
    ids = example["input_ids"].copy()
    w = example["masked_weights"] > 0
    ids[example["masked_positions"][w]] = example["masked_ids"][w]
    return ids[: example["length"]]


def test_vocabulary_merges_the_most_frequent_pair_ties_in_string_order():
    # Pieces: l ##o ##w (x3), l ##o ##w ##e ##r, n ##e ##w ##e ##s ##t. (l, ##o) and
    # (##o, ##w) both occur 4 times; "##o" sorts before "l", so ##ow comes first, then
    # (l, ##ow) is the most frequent pair. Pairs seen once are never merged.
    texts = ["Low low LOW lower", "newest"]
    base = mlm.train_vocabulary(texts, vocab_size=0)
    assert base[:5] == mlm.SPECIAL_TOKENS
    assert base[5:] == sorted(set("lowernst")) + ["##" + c for c in sorted(set("oweerst"))]
    assert mlm.train_vocabulary(texts, vocab_size=len(base) + 2)[len(base) :] == ["##ow", "low"]
    learnt = mlm.train_vocabulary(texts, vocab_size=1000)[len(base) :]
    assert learnt == ["##ow", "low"]  # every other pair occurs once


def test_vocabulary_is_the_same_in_every_process():
    """String hashing differs between processes; the vocabulary must not."""
    script = (
        "import json, sys; from train.data import mlm; "
        "print(json.dumps(mlm.train_vocabulary(json.load(sys.stdin), 150)))"
    )
    vocabs = []
    for seed in ("1", "2"):
        done = subprocess.run(
            [sys.executable, "-c", script],
            input=json.dumps(TEXTS),
            capture_output=True,
            text=True,
            env={**os.environ, "PYTHONHASHSEED": seed},
            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
            check=True,
        )
        vocabs.append(json.loads(done.stdout))
    assert vocabs[0] == vocabs[1] == mlm.train_vocabulary(TEXTS, 150)
    assert len(vocabs[0]) == 150


def test_example_layout_and_labels(setup):
    tokenizer, source, pairs = setup
    for i in range(40):
        ex = pairs.eval(source[i], None)
        n = int(ex["length"])
        ids = _unmask(ex)
        assert ids[0] == pairs.cls and ids[-1] == pairs.sep and list(ids).count(pairs.sep) == 2
        assert np.all(ex["input_ids"][n:] == pairs.pad)
        first_sep = list(ids).index(pairs.sep)
        assert np.all(ex["token_type_ids"][: first_sep + 1] == 0)
        assert np.all(ex["token_type_ids"][first_sep + 1 : n] == 1)
        k = int(ex["masked_weights"].sum())
        assert 1 <= k <= 6
        pos = ex["masked_positions"][:k]
        assert np.all(np.diff(pos) > 0) and np.all(ids[pos] != pairs.cls)
        assert np.all(ids[pos] != pairs.sep)
        doc = [list(x) for x in source.document(source[i]["doc"])]
        a, b = list(ids[1:first_sep]), list(ids[first_sep + 1 : -1])
        # Segment A is a run of whole sentences of the example's document from some
        # sentence s (truncation may cut its end); for "is next", B continues right after.
        runs = [(s, sum(doc[s:], [])) for s in range(len(doc))]
        starts = [s for s, run in runs if run[: len(a)] == a and a]
        assert starts, "segment A is a run of sentences of the example's document"
        if ex["nsp_label"] == 0:
            ends = [
                s + k
                for s in starts
                for k in range(1, len(doc) - s)
                if sum(doc[s : s + k], []) == a
            ]
            assert any(sum(doc[e:], [])[: len(b)] == b for e in ends), "B follows A"


def test_masking_statistics(setup):
    tokenizer, source, _ = setup
    pairs = mlm.MaskedPairs(source, tokenizer, max_length=32, max_predictions=32, seed=1)
    kinds = {"mask": 0, "random": 0, "same": 0}
    chosen = real = nsp = 0
    rng = np.random.default_rng(0)
    n = 3000
    for i in range(n):
        ex = pairs.train(source[i % len(source)], rng)
        w = ex["masked_weights"] > 0
        got = ex["input_ids"][ex["masked_positions"][w]]
        want = ex["masked_ids"][w]
        kinds["mask"] += int(np.sum(got == pairs.mask))
        kinds["same"] += int(np.sum(got == want))
        kinds["random"] += int(np.sum((got != pairs.mask) & (got != want)))
        chosen += int(w.sum())
        real += int(ex["length"]) - 3
        nsp += int(ex["nsp_label"])
    assert abs(chosen / real - 0.15) < 0.02
    assert abs(kinds["mask"] / chosen - 0.8) < 0.03
    # A random replacement can hit the original token: "same" is 10% plus a little.
    assert 0.08 < kinds["same"] / chosen < 0.14
    assert 0.06 < kinds["random"] / chosen < 0.12
    assert abs(nsp / n - 0.5) < 0.04


def test_eval_examples_are_fixed_by_index_and_seed(setup):
    _, source, pairs = setup
    a = pairs.eval(source[7], np.random.default_rng(1))
    b = pairs.eval(source[7], np.random.default_rng(2))
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])


def test_too_little_text_is_a_clear_error(setup):
    tokenizer, _, _ = setup
    with pytest.raises(DataError, match="at least two documents"):
        mlm.PairSource(["Only one. Document here."], tokenizer)


# Documents of 1 to 6 sentences of varied length, as real corpora have.
_WORDS = [f"word{chr(97 + i)}" for i in range(16)]


def _varied_corpus(n=1000):
    rng = np.random.default_rng(0)
    docs = []
    for _ in range(n):
        sentences = [
            " ".join(rng.choice(_WORDS, size=rng.integers(3, 12))).capitalize() + "."
            for _ in range(rng.integers(1, 7))
        ]
        docs.append(" ".join(sentences))
    return docs


def _cue_accuracy(examples, cue):
    """Held-out accuracy of predicting the NSP label from `cue(example)` alone (a majority
    vote per cue value, fitted on the first half of `examples`)."""
    fit, held_out = examples[: len(examples) // 2], examples[len(examples) // 2 :]
    votes: dict = {}
    for ex in fit:
        votes.setdefault(cue(ex), [0, 0])[int(ex["nsp_label"])] += 1
    guess = {k: int(v[1] > v[0]) for k, v in votes.items()}
    return np.mean([guess.get(cue(ex), 1) == ex["nsp_label"] for ex in held_out])


def test_nothing_but_the_text_tells_the_nsp_label():
    """A "random" B used to be filled up to the sequence's length while the B that follows
    stops where its document ends: the length alone gave the label away (58% on held-out
    stdlib_docs pairs). Where B starts and how it ends must not give it away either."""
    texts = _varied_corpus()
    tokenizer = mlm.wordpiece(None, texts, vocab_size=120)
    source = mlm.PairSource(texts, tokenizer, num_examples=4000)
    pairs = mlm.MaskedPairs(source, tokenizer, max_length=64, max_predictions=10)
    examples = [pairs.eval(source[i], None) for i in range(len(source))]
    labels = np.array([int(ex["nsp_label"]) for ex in examples])
    assert abs(labels.mean() - 0.5) < 0.03
    chance = max(labels[2000:].mean(), 1 - labels[2000:].mean())

    def segment_b(ex):
        ids = _unmask(ex)
        return ids[list(ids).index(pairs.sep) + 1 : -1]

    cues = {
        "length": lambda ex: int(ex["length"]),
        "B's length": lambda ex: len(segment_b(ex)),
        "B's first token": lambda ex: int(segment_b(ex)[0]) if len(segment_b(ex)) else -1,
        "B's last token": lambda ex: int(segment_b(ex)[-1]) if len(segment_b(ex)) else -1,
    }
    for name, cue in cues.items():
        assert _cue_accuracy(examples, cue) < chance + 0.04, name


def test_one_sentence_documents_still_give_balanced_labels():
    """Every record of a corpus like lm1b is one sentence: all its pairs were "random". A
    sentence's two parts are A and the B that follows."""
    texts = [" ".join(_WORDS[i % 5 : i % 5 + 8]) + f" number {i}." for i in range(40)]
    tokenizer = mlm.wordpiece(None, texts, vocab_size=120)
    source = mlm.PairSource(texts, tokenizer, num_examples=1000)
    pairs = mlm.MaskedPairs(source, tokenizer, max_length=32, max_predictions=4)
    labels = []
    for i in range(len(source)):
        ex = pairs.eval(source[i], None)
        labels.append(int(ex["nsp_label"]))
        if ex["nsp_label"] == 0:
            ids = _unmask(ex)
            sep = list(ids).index(pairs.sep)
            joined = [*ids[1:sep], *ids[sep + 1 : -1]]
            assert joined == list(source.document(source[i]["doc"])[0]), "A then its rest"
    assert abs(np.mean(labels) - 0.5) < 0.05


def test_special_tokens_may_have_any_ids_and_are_never_random_replacements(setup, tmp_path):
    """The masking used to assume the special tokens were the lowest ids: with them at the
    end of vocab.txt it failed inside a loader thread, and with [MASK] in the middle half
    the vocabulary was never drawn as a random replacement."""
    tokenizer, _, _ = setup
    vocab = sorted(tokenizer.get_vocab(), key=tokenizer.get_vocab().get)
    regular = [t for t in vocab if t not in mlm.SPECIAL_TOKENS]
    path = tmp_path / "vocab.txt"
    path.write_text("".join(f"{t}\n" for t in regular + mlm.SPECIAL_TOKENS))
    moved = mlm.wordpiece(str(path))
    source = mlm.PairSource(TEXTS, moved)
    pairs = mlm.MaskedPairs(source, moved, max_length=32, max_predictions=32)
    special = {moved.token_to_id(t) for t in mlm.SPECIAL_TOKENS}
    assert min(special) == len(regular)
    drawn = set()
    rng = np.random.default_rng(0)
    for i in range(3000):
        ex = pairs.train(source[i % len(source)], rng)
        w = ex["masked_weights"] > 0
        got, want = ex["input_ids"][ex["masked_positions"][w]], ex["masked_ids"][w]
        drawn.update(got[(got != pairs.mask) & (got != want)].tolist())
    assert not drawn & special
    assert len(drawn) > 0.9 * len(regular)

    path.write_text("".join(f"{t}\n" for t in regular + ["[PAD]", "[UNK]", "[CLS]"]))
    with pytest.raises(
        DataError, match=r"vocab.txt has no \[SEP\], \[MASK\]: BERT.s vocab.txt needs"
    ):
        mlm.wordpiece(str(path))


def test_special_tokens_written_in_a_text_are_text(setup):
    tokenizer, _, _ = setup
    ids = tokenizer.encode("the [SEP] cat [MASK]", add_special_tokens=False).ids
    assert not {tokenizer.token_to_id(t) for t in mlm.SPECIAL_TOKENS[2:]} & set(ids)


def test_a_cased_vocabulary_keeps_the_case(tmp_path):
    path = tmp_path / "vocab.txt"
    path.write_text("".join(f"{t}\n" for t in [*mlm.SPECIAL_TOKENS, "Paris", "paris", "é"]))
    assert mlm.wordpiece(str(path), lowercase=False).encode("Paris").tokens[1:-1] == ["Paris"]
    assert mlm.wordpiece(str(path)).encode("Paris").tokens[1:-1] == ["paris"]


def test_fewer_examples_than_documents_spread_over_the_corpus(setup):
    tokenizer, _, _ = setup
    source = mlm.PairSource(TEXTS[:10], tokenizer, num_examples=5)
    assert [source[i]["doc"] for i in range(5)] == [0, 2, 4, 6, 8]
    source = mlm.PairSource(TEXTS[:4], tokenizer, num_examples=10)
    assert [source[i]["doc"] for i in range(10)] == [0, 1, 2, 3, 0, 1, 2, 3, 0, 1]
