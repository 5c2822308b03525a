"""Losses and metrics, computed in float32 whatever the model's compute dtype.

Every function takes optional per-example `weights` (0 for padding examples), so an
evaluation over a dataset whose size the batch does not divide counts each real example
exactly once.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def _weights(labels: jax.Array, weights: jax.Array | None) -> jax.Array:
    return jnp.ones(labels.shape, jnp.float32) if weights is None else weights.astype(jnp.float32)


def _check_labels(logits: jax.Array, labels: jax.Array, weights: jax.Array | None) -> None:
    """Labels (and weights) of one class index per row of logits: a [B, 1] label column
    would broadcast against the class axis into a wrong loss, without an error."""
    if labels.shape != logits.shape[:-1]:
        raise ValueError(
            f"labels of shape {labels.shape} for logits of shape {logits.shape}: labels hold "
            f"one class index per row of logits, shape {logits.shape[:-1]} (e.g. squeeze a "
            "trailing axis of 1)"
        )
    if weights is not None and weights.shape != labels.shape:
        raise ValueError(
            f"weights of shape {weights.shape} for labels of shape {labels.shape}: one "
            "weight per label"
        )
    integers = jnp.issubdtype(labels.dtype, jnp.integer) or labels.dtype == jnp.bool_
    if not integers:  # float labels: the loss would truncate them, the accuracy not
        raise TypeError(
            f"labels of dtype {labels.dtype}: labels are integer class indices; convert them "
            "(e.g. labels.astype(jnp.int32)), or pass one-hot targets to optax directly"
        )


def cross_entropy(
    logits: jax.Array,
    labels: jax.Array,
    weights: jax.Array | None = None,
    label_smoothing: float = 0.0,
) -> tuple[jax.Array, jax.Array]:
    """Softmax cross-entropy with integer labels.

    Args:
      logits: <float>[..., num_classes].
      labels: <int>[...], in [0, num_classes) (an index outside picks no logit).
      weights: <float>[...] or None.
      label_smoothing: mass spread uniformly over the classes.

    Returns:
      (sum of weighted losses, sum of weights), both float32 scalars; divide for the mean.

    Raises:
      ValueError: labels (or weights) not of shape `logits.shape[:-1]`; label_smoothing
        outside [0, 1].
    """
    _check_labels(logits, labels, weights)
    if isinstance(label_smoothing, int | float) and not 0 <= label_smoothing <= 1:
        raise ValueError(
            f"label_smoothing is the share of the target spread over the classes: between 0 "
            f"and 1, got {label_smoothing}"
        )
    logits = logits.astype(jnp.float32)
    w = _weights(labels, weights)
    if label_smoothing:
        num_classes = logits.shape[-1]
        onehot = jax.nn.one_hot(labels, num_classes)
        targets = onehot * (1 - label_smoothing) + label_smoothing / num_classes
        losses = optax.softmax_cross_entropy(logits, targets)
    else:
        # log-sum-exp minus the label's logit, the label's logit picked by a comparison with
        # the class index (not a gather): its gradient is elementwise and fuses with the
        # softmax's, where a gather's is a scatter-add into a zero [..., num_classes] array.
        classes = jax.lax.broadcasted_iota(jnp.int32, logits.shape, logits.ndim - 1)
        hit = classes == labels.astype(jnp.int32)[..., None]
        label_logits = jnp.sum(jnp.where(hit, logits, 0.0), axis=-1)
        losses = jax.nn.logsumexp(logits, axis=-1) - label_logits
    return jnp.sum(losses * w), jnp.sum(w)


def correct(logits: jax.Array, labels: jax.Array, weights: jax.Array | None = None) -> jax.Array:
    """Weighted number of examples whose arg-max prediction equals the label (labels and
    weights as `cross_entropy` takes them)."""
    _check_labels(logits, labels, weights)
    hits = (jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32)
    return jnp.sum(hits * _weights(labels, weights))
