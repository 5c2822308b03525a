"""BERT fine-tuning for sequence classification.

Default: the embedded `stdlib_docs` (10 classes), starting from a pretraining workdir of
this library (`--config.init_from=runs/bert_tiny`, see configs/bert_pretrain.py) or a
Hugging Face BERT directory (config.json + model.safetensors + vocab.txt); without
`init_from` the same model trains from scratch (the baseline). Sequences of 128 tokens:
from `configs/bert_pretrain.py`'s tiny run (trained at 64) positions 64-127 start as
initialised, and fine-tuning trains them.

`:sst2` reads TFDS `glue/sst2` by name (prepared locally; training never downloads) with
the published recipe for BERT-base (Devlin et al.: AdamW 2e-5, eps 1e-6, weight decay
0.01, 10% warmup then linear decay, clipping at 1.0, batch 32, 128 tokens, 3 epochs), for
a Hugging Face BERT-base in `init_from`; a model as small as BERT-tiny wants a higher
rate (e.g. `--config.optimizer.learning_rate=1e-4`).

  python -m train --config=configs/bert_pretrain.py --workdir=runs/bert_tiny
  python -m train --config=configs/bert_finetune.py --workdir=runs/bert_ft \
      --config.init_from=runs/bert_tiny
"""

from ml_collections.config_dict import placeholder

from train.defaults import base_config, check_variant


def get_config(variant: str | None = None):
    check_variant(variant, ("sst2", "smoke"))
    c = base_config()
    c.task = "text_classification"
    c.dataset = "stdlib_docs"
    c.max_length = 128
    c.vocab_size = 8_000  # only when training from scratch without a vocabulary
    # Other `model` keys are BertConfig fields of how the model runs (the architecture comes
    # from init_from when given, how that run ran does not; None: the BertConfig default):
    # remat_policy, scan_layers, implementation (see configs/bert_pretrain.py).
    c.model = {
        "name": "BertForSequenceClassification",
        "preset": "tiny",
        "implementation": placeholder(str),
        "remat_policy": placeholder(str),
        "scan_layers": placeholder(bool),  # None: as init_from's (else False)
    }
    c.batch_size = 32
    c.optimizer.name = "adamw"
    c.optimizer.learning_rate = 1e-4
    c.optimizer.weight_decay = 0.01
    c.optimizer.warmup_steps = 100
    c.optimizer.schedule = "linear"
    c.total_steps = 1_000
    c.eval_every = 250
    c.checkpoint_every = 500
    c.log_every = 50
    if variant == "sst2":
        c.dataset = "glue/sst2"
        c.eval_split = "validation"
        epoch = 67_349 // 32
        c.total_steps = 3 * epoch
        c.eval_every = c.checkpoint_every = epoch
        c.optimizer.learning_rate = 2e-5
        c.optimizer.eps = 1e-6
        c.optimizer.warmup_steps = c.total_steps // 10
        c.optimizer.grad_clip_norm = 1.0
    elif variant == "smoke":
        c.max_length = 32
        c.vocab_size = 1_000
        c.model.hidden_size = 32
        c.model.num_heads = 2
        c.model.intermediate_size = 64
        c.total_steps = 6
        c.optimizer.warmup_steps = 2
        c.eval_every = 3
        c.checkpoint_every = 3
        c.log_every = 3
    return c
