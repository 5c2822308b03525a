"""A small GPT-style decoder-only Transformer on the embedded `stdlib_docs` corpus
(docstrings of the Python standard library: real English prose, offline), byte-level
tokens (vocabulary 259), non-overlapping windows of 128 bytes. Next-token loss; eval
loss (nats per byte; perplexity = exp(eval/loss)), bits per byte and next-byte accuracy.
Eval loss falls from ~5.6 (uniform over 259) to ~2.6 nats/byte after 200 steps and ~2.47
after 600 (next-byte accuracy ~0.29): a few minutes on a 2-core CPU.

Remat and scan-over-layers are `model` keys (`remat_policy`, `scan_layers`); the `sample_*`
keys set the temperature / top-k of `train.tasks.language_model.sample`.

  python -m train --config=configs/transformer_lm.py --workdir=runs/lm
  python -m train --config=configs/transformer_lm.py:smoke --workdir=runs/transformer_lm_smoke
  python -m train.tasks.language_model runs/lm "The " "Return" --tokens 64   # samples
"""

from ml_collections.config_dict import placeholder

from train.defaults import base_config, check_variant


def get_config(variant: str | None = None):
    check_variant(variant, ("smoke",))
    c = base_config()
    c.task = "language_model"
    c.dataset = "stdlib_docs"
    c.max_length = 128  # tokens (bytes) per example
    c.eval_examples = 256  # eval windows, evenly spaced over the test split (0: all)
    c.model = {
        "name": "DecoderOnlyLM",
        "embed_dim": 128,
        "num_layers": 2,
        "num_heads": 4,
        "head_dim": placeholder(int),  # None: embed_dim // num_heads
        "mlp_dim": 512,
        "dropout_rate": 0.0,
        "remat_policy": "none",  # none | full | dots_saveable | ... (transformer.REMAT_POLICIES)
        "scan_layers": False,  # one nn.scan over the layers: faster compiles
    }
    c.batch_size = 32
    c.total_steps = 600
    c.optimizer.name = "adamw"
    c.optimizer.learning_rate = 2e-3
    c.optimizer.schedule = "cosine"
    c.optimizer.warmup_steps = 50
    c.optimizer.end_factor = 0.1
    c.optimizer.weight_decay = 0.01
    c.optimizer.grad_clip_norm = 1.0
    c.eval_every = 200
    c.checkpoint_every = 200
    c.log_every = 50
    c.sample_tokens = 64
    c.sample_temperature = 0.8
    c.sample_top_k = 20
    if variant == "smoke":
        c.max_length = 32
        c.eval_examples = 32
        c.model.embed_dim = 16
        c.model.mlp_dim = 32
        c.model.num_heads = 2
        c.model.num_layers = 1
        c.batch_size = 16
        c.total_steps = 6
        c.optimizer.warmup_steps = 2
        c.eval_every = 3
        c.checkpoint_every = 3
        c.log_every = 3
    return c
