"""`jaxmodels.losses`: cross-entropy equals optax's, and its gradient has no scatter."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxmodels import losses


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_cross_entropy_equals_optax_and_its_gradient_is_elementwise(dtype):
    logits = (jax.random.normal(jax.random.key(0), (4, 6, 37)) * 5).astype(dtype)
    labels = jax.random.randint(jax.random.key(1), (4, 6), 0, 37)
    weights = jax.random.uniform(jax.random.key(2), (4, 6))

    def ours(x):
        total, count = losses.cross_entropy(x, labels, weights)
        return total / count

    def reference(x):
        ce = optax.softmax_cross_entropy_with_integer_labels(x.astype(jnp.float32), labels)
        return jnp.sum(ce * weights) / jnp.sum(weights)

    np.testing.assert_allclose(ours(logits), reference(logits), rtol=1e-6)
    np.testing.assert_allclose(
        np.float32(jax.grad(ours)(logits)), np.float32(jax.grad(reference)(logits)), atol=1e-6
    )
    assert "scatter" not in str(jax.make_jaxpr(jax.grad(ours))(logits))
    # Label smoothing and counts unchanged.
    total, count = losses.cross_entropy(logits, labels, None, label_smoothing=0.1)
    smoothed = optax.softmax_cross_entropy(
        logits.astype(jnp.float32), optax.smooth_labels(jax.nn.one_hot(labels, 37), 0.1)
    )
    np.testing.assert_allclose(total, jnp.sum(smoothed), rtol=1e-5)
    assert count == labels.size


def test_labels_and_weights_of_another_shape_are_refused():
    """A [B, 1] label column broadcast against the class axis into a wrong loss, silently."""
    logits = jnp.zeros((4, 10))
    with pytest.raises(ValueError, match=r"labels of shape \(4, 1\) for logits of shape"):
        losses.cross_entropy(logits, jnp.zeros((4, 1), jnp.int32))
    with pytest.raises(ValueError, match=r"labels of shape \(4, 1\)"):
        losses.correct(logits, jnp.zeros((4, 1), jnp.int32))
    with pytest.raises(ValueError, match=r"weights of shape \(4, 1\) for labels of shape \(4,\)"):
        losses.cross_entropy(logits, jnp.zeros((4,), jnp.int32), jnp.ones((4, 1)))
    # Were accepted: the loss truncated float labels, the accuracy compared them as floats.
    for fn in (losses.cross_entropy, losses.correct):
        with pytest.raises(TypeError, match="labels of dtype float32: labels are integer"):
            fn(logits, jnp.array([0.9, 1.2, 0.0, 3.0]))
        flags = jnp.array([True, False, True, True])  # classes 1 and 0, as ever
        np.testing.assert_array_equal(fn(logits, flags), fn(logits, flags.astype(jnp.int32)))


def test_label_smoothing_outside_0_1_is_refused():
    """1.5 gave negative targets and a loss with no error."""
    logits, labels = jnp.zeros((2, 3)), jnp.array([0, 1])
    with pytest.raises(ValueError, match="label_smoothing .* between 0 and 1, got 1.5"):
        losses.cross_entropy(logits, labels, label_smoothing=1.5)
    total, _ = losses.cross_entropy(logits, labels, label_smoothing=1.0)  # uniform: allowed
    np.testing.assert_allclose(total, 2 * np.log(3), rtol=1e-6)
