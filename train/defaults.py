"""The keys every config has, with their defaults. Config files start from `base_config()`
and change what they need; a key that is not here is an error at start."""

from __future__ import annotations

import ml_collections
from ml_collections.config_dict import placeholder


def check_variant(variant: str | None, known: tuple[str, ...]) -> None:
    """A config file's variant (`--config=configs/X.py:VARIANT`) must be one it defines."""
    if variant is not None and variant not in known:
        from jaxmodels.errors import ConfigError  # only now: the library imports jax

        raise ConfigError(
            f"unknown config variant {variant!r}; this config file has "
            f"{', '.join(repr(k) for k in known)} (or none: --config=configs/X.py)"
        )


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    # image_classification | text_classification | bert_pretraining | seq2seq | language_model
    c.task = "image_classification"

    # Data.
    # TFDS name; embedded: "sklearn_digits" (images), "stdlib_docs" (text); or "synthetic"
    c.dataset = "sklearn_digits"
    c.data_dir = ""  # TFDS data dir; "" = $TFDS_DATA_DIR or ~/tensorflow_datasets
    c.train_split = "train"
    c.eval_split = "test"
    c.augment = "auto"  # auto | none | cifar | inception
    c.image_size = 224  # crop size for the inception preset
    c.image_mean = (0.0,)  # per-channel, after scaling to [0, 1]
    c.image_std = (1.0,)
    c.num_classes = 0  # 0: from the dataset
    c.synthetic_shape = (224, 224, 3)
    c.vocab_size = 10_000  # text: word vocabulary built from the training split
    c.max_length = 100  # text: tokens per example (padded / truncated)
    c.text_key = ""  # text: the TFDS feature holding the text ("" = by dataset)
    c.vocab_file = ""  # BERT: a WordPiece vocab.txt ("" = train one on the corpus)
    c.max_predictions = 20  # BERT pretraining: masked positions per sequence (15% of tokens)
    # Fine-tuning: start from a pretraining workdir of this library or a Hugging Face
    # checkpoint directory (config.json + model.safetensors / pytorch_model.bin + vocab.txt).
    c.init_from = ""
    c.min_length = 1  # seq2seq toy_reverse / toy_sort: shortest generated sequence
    # seq2seq toy: test-split size; language_model: eval windows (0 = all);
    # bert_pretraining: eval sentence pairs (0 = one per document)
    c.eval_examples = 0
    c.sample_tokens = 64  # language_model `sample`: new tokens per prompt
    c.sample_temperature = 0.8  # language_model `sample`: 0 = greedy
    c.sample_top_k = 0  # language_model `sample`: sample among the k likeliest (0 = all)
    c.data_threads = 4
    c.prefetch = 4  # batches prepared ahead (at least data_threads: a thread makes a batch)

    # Model.
    c.model = ml_collections.ConfigDict({"name": "SeedCNN"})
    c.dtype = "float32"  # computation dtype; parameters are always stored in float32
    c.label_smoothing = 0.0

    # Optimization.
    c.batch_size = 128  # global, over all processes and devices
    c.eval_batch_size = 0  # 0: batch_size
    c.total_steps = 1000
    c.optimizer = ml_collections.ConfigDict(
        {
            "name": "adam",  # adam | adamw | rmsprop | sgd | lamb | lars
            "learning_rate": 1e-3,
            "schedule": "constant",  # constant | cosine | linear (after warmup)
            "warmup_steps": 0,  # training steps (batches), as total_steps
            "end_factor": 0.0,
            "weight_decay": 0.0,
            # None: the optimizer's usual (momentum 0.9 for sgd and lars, none for rmsprop;
            # eps 1e-8, lamb's 1e-6): jaxmodels.optim.DEFAULT_MOMENTUM / DEFAULT_EPS.
            "momentum": placeholder(float),
            "nesterov": False,
            "b1": 0.9,
            "b2": 0.999,
            "eps": placeholder(float),
            "grad_clip_norm": 0.0,  # 0: off
            "accumulate_steps": 1,  # batches per update; the schedule counts updates
        }
    )

    # Parallelism: mesh axis sizes (-1: all remaining devices) and the logical-axis rules.
    c.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1})
    c.sharding_rules = "data"  # data | fsdp | fsdp_tp

    # Loop, logs and checkpoints.
    c.seed = 0
    # Generator of each step's dropout bits: threefry (sharding-invariant, the default) or
    # rbg / unsafe_rbg (XLA's RngBitGenerator: much cheaper masks on GPU/TPU; the bits then
    # depend on the partitioning). See jaxmodels.training.step_key.
    c.step_rng = "threefry"
    # Persistent XLA compilation cache (compiled steps and GPU autotuning results), so a
    # resumed or repeated run skips most of its compilation: "auto" = the directory of
    # $JAX_COMPILATION_CACHE_DIR if set, else WORKDIR/compilation_cache; "" = off; or a path.
    # Only compilations of at least $JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS (1 s) are kept.
    c.compilation_cache_dir = "auto"
    # Trace `profile_steps` training steps with jax.profiler into WORKDIR/profile (TensorBoard's
    # profile plugin, xprof or Perfetto read it), starting `profile_skip_steps` steps after
    # this run starts (past compilation and warm-up); 0 = no trace.
    c.profile_steps = 0
    c.profile_skip_steps = 10
    c.log_every = 50
    c.eval_every = 500  # 0: only at the end
    c.checkpoint_every = 500  # 0: only at the end
    c.keep_checkpoints = 3
    c.progress_bar = True
    return c
