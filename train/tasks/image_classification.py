"""Image classification: CNNs and ResNets on TFDS datasets, the embedded digits or
synthetic images; softmax cross-entropy, accuracy."""

from __future__ import annotations

import functools
from typing import Any

import jax.numpy as jnp
import numpy as np

from jaxmodels import cnn, training
from jaxmodels.errors import ConfigError
from train.data import images, pipeline
from train.tasks import Task, class_count, make_iterators, make_module


def build(config: Any, process_index: int, process_count: int, workdir: str) -> Task:  # noqa: ARG001
    dtype = jnp.dtype(config.dtype)
    augment = images.augment_preset(config.dataset, config.augment)
    train_pre, eval_pre = images.preprocessors(augment, config.image_size)
    if config.dataset == images.SYNTHETIC:
        num_classes = config.num_classes or 1000
        train_source = pipeline.SyntheticImages(tuple(config.synthetic_shape), num_classes)
        eval_source = None
    else:
        train_source, num_classes = images.open_source(
            config.dataset, config.train_split, config.data_dir, augment
        )
        eval_source, _ = images.open_source(
            config.dataset, config.eval_split, config.data_dir, augment
        )
        num_classes = class_count(config, num_classes)
    sample = train_pre(train_source[0], np.random.default_rng(0))["image"]
    if len(config.image_mean) not in (1, sample.shape[-1]):
        raise ConfigError(
            f"config keys image_mean/image_std have {len(config.image_mean)} values for images "
            f"of {sample.shape[-1]} channel(s) ({config.dataset!r}); give one value or one per "
            "channel"
        )

    model = make_module(cnn, config.model, num_classes=num_classes, dtype=dtype)
    transform = functools.partial(
        images.normalize_on_device, mean=config.image_mean, std=config.image_std, dtype=dtype
    )
    loss_fn, eval_fn = training.classification_fns(
        model,
        label_smoothing=config.label_smoothing,
        inputs=lambda batch: (transform(batch["image"]),),
    )
    train_iterator, eval_iterator = make_iterators(
        config,
        process_index,
        process_count,
        train_source,
        train_pre,
        eval_source,
        eval_pre,
        num_classes=num_classes,
    )
    info = {
        "dataset": config.dataset,
        "num_classes": num_classes,
        "train_examples": len(train_source),
        "eval_examples": len(eval_source) if eval_source is not None else 0,
        "image_shape": tuple(sample.shape),
    }
    example = transform(jnp.zeros((1, *sample.shape), jnp.uint8))
    return Task(model, [example], loss_fn, eval_fn, train_iterator, eval_iterator, info)
