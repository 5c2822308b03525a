"""Building blocks shared by the model families.

`Embed` is `flax.linen.Embed` with a lookup that suits mixed precision: Flax's converts the
whole table to the computation dtype before gathering, so in bfloat16 every training step
converts all V x E entries, and the gradient is a bfloat16 scatter-add into a fresh
bfloat16 copy of the table. Here the rows are gathered from the parameter table (float32)
and only they are cast; the gradient is a float32 scatter-add. Tables of at most
`SELECT_MAX_ROWS` rows (BERT's two token types) are looked up with selects, whose gradient
is a masked sum over the batch per row instead of a scatter-add of every token into a
couple of rows. The outputs are the same numbers; parameters (`embedding`) and `attend` are Flax's.

Example:
    >>> import jax, jax.numpy as jnp
    >>> embed = Embed(num_embeddings=10, features=4, dtype=jnp.bfloat16)
    >>> variables = embed.init(jax.random.key(0), jnp.zeros((2, 3), jnp.int32))
    >>> embed.apply(variables, jnp.array([[1, 2, 3]])).dtype
    dtype(bfloat16)
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

__all__ = ["SELECT_MAX_ROWS", "Embed"]

SELECT_MAX_ROWS = 16


class Embed(nn.Embed):
    """`nn.Embed` that gathers in the parameter dtype and casts the rows (see the module
    docstring). Attributes as `nn.Embed`'s."""

    def __call__(self, inputs: jax.Array) -> jax.Array:
        """inputs <int>[...] -> <dtype>[..., features].

        Ids >= num_embeddings give NaN rows, as in Flax (negative ids: NaN rows in small
        tables, rows counted from the end in gathered ones, as `jnp.take` does); callers
        check their ids first.
        """
        if not jnp.issubdtype(inputs.dtype, jnp.integer):
            raise ValueError(f"embedding ids must be integers, got {inputs.dtype}")
        table = self.embedding
        dtype = self.dtype if self.dtype is not None else table.dtype
        if self.num_embeddings <= SELECT_MAX_ROWS:
            # A chain of selects: exact, no scatter in the gradient (each row's gradient is
            # a masked sum over the batch) and no matmul for the FLOP count.
            ids = inputs[..., None]
            rows = jnp.full(inputs.shape + table.shape[1:], jnp.nan, table.dtype)
            for v in range(self.num_embeddings):
                rows = jnp.where(ids == v, table[v], rows)
        else:
            rows = jnp.take(table, inputs, axis=0)
        return rows.astype(dtype)
