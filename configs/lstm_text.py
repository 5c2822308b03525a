"""The article's LSTM text classifier: Embedding(10000, 64) -> LSTM(128) -> LSTM(128) ->
Dense, on sequences of 100 words; Adam, batch 32, 10 epochs (`ag_news`: 2 epochs of its
120k examples).

Default data: the embedded `stdlib_docs` (docstrings of the Python standard library,
labelled by the area of the library they document; 10 classes; offline). Any TFDS text
dataset by name when prepared locally (training never downloads):

  python -m train --config=configs/lstm_text.py --workdir=runs/lstm_text
  python -m train --config=configs/lstm_text.py:imdb --workdir=runs/lstm_imdb
  python -m train --config=configs/lstm_text.py:smoke --workdir=runs/lstm_text_smoke
"""

from train.defaults import base_config, check_variant

_TRAIN = 3_158  # stdlib_docs train examples (about; depends a little on the Python version)


def get_config(variant: str | None = None):
    check_variant(variant, ("imdb", "ag_news", "smoke"))
    c = base_config()
    c.task = "text_classification"
    c.dataset = "stdlib_docs"
    c.vocab_size = 10_000
    c.max_length = 100
    c.model = {
        "name": "LSTMClassifier",
        "embed_dim": 64,
        "hidden_size": 128,
        "num_layers": 2,
        "pooling": "last",
        "backend": "auto",  # cuDNN on an NVIDIA GPU, scan elsewhere
    }
    c.batch_size = 32
    c.optimizer.name = "adam"
    c.optimizer.learning_rate = 1e-3
    # 10 epochs of whole batches, evaluated every 2 (an evaluation and a checkpoint at the
    # end, not a second one a few steps after the last).
    c.eval_every = c.checkpoint_every = 2 * (_TRAIN // 32)
    c.total_steps = 10 * (_TRAIN // 32)
    c.log_every = 50
    if variant == "imdb":  # binary sentiment, 25k train reviews
        c.dataset = "imdb_reviews"
        c.max_length = 200  # not the article's 100: a review runs to ~230 words
        c.eval_every = c.checkpoint_every = 25_000 // 32
        c.total_steps = 10 * (25_000 // 32)
    elif variant == "ag_news":  # 4 news topics, 120k train
        c.dataset = "ag_news_subset"
        c.total_steps = 2 * 120_000 // 32
        c.eval_every = 120_000 // 32
        c.checkpoint_every = 120_000 // 32
    elif variant == "smoke":
        c.vocab_size = 2_000
        c.max_length = 32
        c.model.embed_dim = 16
        c.model.hidden_size = 16
        c.total_steps = 10
        c.eval_every = 5
        c.checkpoint_every = 5
        c.log_every = 5
    return c
