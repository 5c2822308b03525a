"""BERT pretraining, masked LM + next-sentence prediction.

Variants:
  (default) tiny: BERT-tiny (2 layers, 128 wide) on the embedded `stdlib_docs` corpus
      (docstrings of the Python standard library), seq 64, batch 32, 3,000 steps; on a
      2-core CPU in about 8 minutes it reached 20.0% held-out MLM accuracy (always guessing
      the most frequent token: ~6%) and 58.0% NSP accuracy (balanced labels), measured on
      2,000 held-out pairs; tests/test_bert_learning.py asks for
      MLM > 2x that baseline and NSP > 0.55, and for fine-tuning from it to beat training
      from scratch.
  base: BERT-base on TFDS `wikipedia/20230601.en`, seq 128, batch 256, AdamW 1e-4
      (eps 1e-6, weight decay 0.01), 10k warmup, linear decay, clipping at 1.0, bf16: the
      published phase-1 recipe, except that all 1M steps are at seq 128 (the paper's are
      900k of them, then 100k at 512) and the corpus is Wikipedia alone (no BooksCorpus).
  large: BERT-large at the benchmark's shape (seq 512, batch 32), otherwise base's
      optimizer and schedule; bf16.
  smoke: a few steps of a very small model (tests).

  python -m train --config=configs/bert_pretrain.py --workdir=runs/bert_tiny
  python -m train --config=configs/bert_pretrain.py:base --workdir=runs/bert_base \
      --config.vocab_file=/path/to/vocab.txt
"""

from ml_collections.config_dict import placeholder

from train.defaults import base_config, check_variant


def get_config(variant: str | None = None):
    check_variant(variant, ("base", "large", "smoke"))
    c = base_config()
    c.task = "bert_pretraining"
    c.dataset = "stdlib_docs"
    c.vocab_size = 8_000  # when the vocabulary is trained on the corpus
    c.max_length = 64
    c.max_predictions = 10
    # Other `model` keys are BertConfig fields, e.g. remat_policy ("dots", "full", ...),
    # scan_layers=True (one nn.scan over the layers: a several times faster compile) or
    # implementation="pallas" (attention and its dropout in fused GPU kernels).
    c.model = {
        "name": "BertForPreTraining",
        "preset": "tiny",
        # attention: None (auto), "xla", "cudnn" or "pallas" (a str once set)
        "implementation": placeholder(str),
        "remat_policy": placeholder(str),
        "scan_layers": False,
    }
    c.batch_size = 32
    c.optimizer.name = "adamw"
    c.optimizer.learning_rate = 2e-3
    c.optimizer.weight_decay = 0.01
    c.optimizer.warmup_steps = 100
    c.optimizer.schedule = "linear"
    c.optimizer.grad_clip_norm = 1.0
    c.total_steps = 3_000
    c.eval_every = 500
    c.eval_examples = 2_000  # sentence pairs, ~4 per held-out document
    c.checkpoint_every = 500
    c.log_every = 100
    if variant in ("base", "large"):
        c.dataset = "wikipedia/20230601.en"
        c.eval_split = "train[-1000:]"
        c.train_split = "train[:-1000]"
        c.vocab_size = 30_522
        c.max_length = 128
        c.max_predictions = 20
        c.model.preset = variant
        c.dtype = "bfloat16"
        c.optimizer.learning_rate = 1e-4
        c.optimizer.eps = 1e-6
        c.optimizer.warmup_steps = 10_000
        c.total_steps = 1_000_000
        c.eval_every = 10_000
        c.eval_examples = 0  # one pair per held-out article
        c.checkpoint_every = 10_000
        c.data_threads = 16
        c.log_every = 100
        if variant == "base":
            c.batch_size = 256
        else:
            c.batch_size = 32
            c.max_length = 512
            c.max_predictions = 76
    elif variant == "smoke":
        c.vocab_size = 1_000
        c.max_length = 32
        c.max_predictions = 5
        c.model.hidden_size = 32
        c.model.num_heads = 2
        c.model.intermediate_size = 64
        c.batch_size = 16
        c.total_steps = 6
        c.eval_examples = 128
        c.optimizer.warmup_steps = 2
        c.eval_every = 3
        c.checkpoint_every = 3
        c.log_every = 3
    return c
