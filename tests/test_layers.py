"""jaxmodels.layers.Embed: Flax's numbers forward, float32 gradients, selects for small tables."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxmodels.layers import SELECT_MAX_ROWS, Embed


@pytest.mark.parametrize("rows", [2, SELECT_MAX_ROWS, 50], ids=["select", "select-max", "gather"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_same_outputs_as_flax_embed_and_better_gradients(rows, dtype):
    ids = jnp.asarray(np.random.default_rng(0).integers(0, rows, (4, 9)))
    ours, flax_embed = Embed(rows, 8, dtype=dtype), nn.Embed(rows, 8, dtype=dtype)
    variables = ours.init(jax.random.key(0), ids)
    assert jax.tree.map(jnp.shape, variables) == jax.tree.map(
        jnp.shape, flax_embed.init(jax.random.key(0), ids)
    )
    out = ours.apply(variables, ids)
    assert out.dtype == dtype
    np.testing.assert_array_equal(out, flax_embed.apply(variables, ids))
    query = jnp.ones((3, 8), dtype)
    np.testing.assert_array_equal(
        ours.apply(variables, query, method="attend"),
        flax_embed.apply(variables, query, method="attend"),
    )

    def grad(module):
        loss = lambda v: jnp.sum(module.apply(v, ids).astype(jnp.float32) ** 2)  # noqa: E731
        return jax.grad(loss)(variables)["params"]["embedding"]

    exact = grad(nn.Embed(rows, 8))  # float32 throughout
    got = grad(ours)
    assert got.dtype == jnp.float32
    err, flax_err = (float(jnp.max(jnp.abs(g - exact))) for g in (got, grad(flax_embed)))
    if dtype == jnp.float32:
        np.testing.assert_allclose(got, exact, rtol=1e-6, atol=1e-6)
    else:  # rows summed in float32, not in a bfloat16 copy of the table
        assert err <= flax_err


def test_lookups_under_jit_keep_logical_names_and_reject_floats():
    embed = Embed(
        100,
        8,
        embedding_init=nn.with_logical_partitioning(
            nn.initializers.normal(1.0), ("vocab", "embed")
        ),
    )
    ids = jnp.array([[1, 2, 99]])
    boxed = embed.init(jax.random.key(0), ids)["params"]["embedding"]
    assert isinstance(boxed, nn.LogicallyPartitioned) and boxed.names == ("vocab", "embed")
    variables = nn.meta.unbox(embed.init(jax.random.key(0), ids))
    out = jax.jit(embed.apply)(variables, ids)
    np.testing.assert_array_equal(out[0], variables["params"]["embedding"][jnp.array([1, 2, 99])])
    with pytest.raises(ValueError, match="must be integers"):
        embed.apply(variables, jnp.ones((1, 2)))


def test_ids_past_the_table_give_nan_rows():
    for rows in (2, 50):
        embed = Embed(rows, 4)
        variables = embed.init(jax.random.key(0), jnp.zeros((1,), jnp.int32))
        out = jax.jit(embed.apply)(variables, jnp.array([0, rows, rows + 7]))
        assert np.isfinite(out[0]).all() and np.isnan(out[1:]).all()
