"""jaxmodels.layers: Embed (Flax's numbers forward, float32 gradients, selects for small tables)
and Dropout (masks from 16-bit halves of the random words)."""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxmodels import sharding
from jaxmodels.layers import (
    SELECT_MAX_ROWS,
    BatchNorm,
    Dense,
    Dropout,
    Embed,
    add_positions,
    batch_norm,
    dot_float32,
    dropout,
    dropout_mask,
    gelu,
    max_pool,
    silu,
)


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


def test_sharded_lookup_gathers_the_table_not_the_activations():
    # Was: with the table split on embed over fsdp, the rows were looked up split, then the
    # [batch, length, embed] activations, and in the backward pass the global batch's
    # gradient of them, all-gathered onto every device.
    import re

    from jaxmodels import training

    batch, length, vocab, features = 16, 32, 512, 64
    embed = Embed(
        vocab,
        features,
        embedding_init=nn.with_logical_partitioning(
            nn.initializers.normal(1.0), ("vocab", "embed")
        ),
    )
    mesh, rules = sharding.make_mesh(data=2, fsdp=4), sharding.logical_rules("fsdp")
    ids = jnp.zeros((batch, length), jnp.int32)
    abstract = jax.eval_shape(lambda: embed.init(jax.random.key(0), ids))
    shardings = sharding.state_shardings(abstract, mesh, rules)
    variables = jax.device_put(nn.meta.unbox(embed.init(jax.random.key(0), ids)), shardings)
    ids = jax.device_put(
        jnp.asarray(np.random.default_rng(0).integers(0, vocab, (batch, length))),
        sharding.batch_sharding(mesh, 2),
    )
    weights = jnp.linspace(-1.0, 1.0, features)

    def loss(v, i):
        rows = nn.with_logical_constraint(embed.apply(v, i), ("batch", "length", "embed"))
        return jnp.sum(jnp.sin(rows) * weights)

    with training.mesh_context(mesh, rules):
        step = jax.jit(jax.value_and_grad(loss))
        hlo = step.lower(variables, ids).compile().as_text()
        value, grads = step(variables, ids)
    gathered = re.findall(r"= \w+\[([\d,]*)\]\S* all-gather(?:-start)?\(", hlo)
    assert gathered, "the table is sharded: something must be gathered"
    assert gathered == [f"{vocab},{features}"], gathered  # the table, nothing else
    local = jax.tree.map(np.asarray, nn.meta.unbox(embed.init(jax.random.key(0), ids)))
    expected_value, expected_grads = jax.value_and_grad(loss)(local, np.asarray(ids))
    np.testing.assert_allclose(value, expected_value, rtol=1e-5)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), grads, expected_grads
    )
    # An eager call inside the mesh context, on a table on one device, still looks up.
    with training.mesh_context(mesh, rules):
        out = embed.apply(local, np.asarray(ids))
    np.testing.assert_array_equal(out, local["params"]["embedding"][np.asarray(ids)])


def test_ids_past_the_table_give_nan_rows():
    for rows in (2, 50):
        embed = Embed(rows, 4)
        variables = embed.init(jax.random.key(0), jnp.zeros((1,), jnp.int32))
        out = jax.jit(embed.apply)(variables, jnp.array([0, rows, rows + 7]))
        assert np.isfinite(out[0]).all() and np.isnan(out[1:]).all()


@pytest.mark.parametrize("rate", [0.1, 0.5, 0.9])
def test_dropout_drops_at_the_rate_independently_and_keeps_the_mean(rate):
    n = 1 << 20
    keep = np.asarray(dropout_mask(jax.random.key(0), rate, (n,)))
    drop = 1.0 - keep
    sigma = np.sqrt(rate * (1 - rate) / n)
    assert abs(drop.mean() - rate) < 5 * sigma
    # The two halves of a word, and neighbouring words, drop independently.
    pairs = drop.reshape(-1, 2)
    both = (pairs[:, 0] * pairs[:, 1]).mean()
    assert abs(both - rate**2) < 5 * np.sqrt(rate**2 * (1 - rate**2) / (n // 2))
    across = (drop[1:-1:2] * drop[2::2]).mean()
    assert abs(across - rate**2) < 5 * np.sqrt(rate**2 * (1 - rate**2) / (n // 2))
    # Kept elements are divided by the exact keep probability of the 16-bit threshold.
    x = jnp.full((n,), 3.0)
    out = np.asarray(dropout(jax.random.key(0), x, rate))
    np.testing.assert_array_equal(out == 0, ~keep)
    np.testing.assert_allclose(out[keep], 3.0 / (1.0 - round(rate * 65536) / 65536), rtol=1e-7)


@pytest.mark.parametrize("rate", [0.0, 1.0])
def test_dropout_masks_at_rates_zero_and_one_keep_everything_or_nothing(rate):
    keep = np.asarray(dropout_mask(jax.random.key(0), rate, (3, 1000)))
    assert keep.shape == (3, 1000) and np.all(keep == (rate == 0.0))


def test_dropout_masks_depend_on_the_key_and_shape_details():
    key = jax.random.key(1)
    a = dropout_mask(key, 0.5, (4, 7, 33))
    np.testing.assert_array_equal(a, dropout_mask(key, 0.5, (4, 7, 33)))
    assert (np.asarray(a) != np.asarray(dropout_mask(jax.random.key(2), 0.5, (4, 7, 33)))).any()
    assert a.shape == (4, 7, 33) and a.dtype == jnp.bool_
    assert dropout_mask(key, 0.5, ()).shape == ()
    x = jnp.arange(1.0, 25.0).reshape(4, 6)
    shared = np.asarray(dropout(key, x, 0.5, broadcast_dims=(0,)))
    np.testing.assert_array_equal(shared == 0, np.broadcast_to((shared == 0)[:1], (4, 6)))
    np.testing.assert_array_equal(dropout(key, x, 0.0), x)
    np.testing.assert_array_equal(dropout(key, x, 1.0), jnp.zeros_like(x))
    with pytest.raises(ValueError, match=r"dropout rate must be in \[0, 1\], got 1.5"):
        dropout(key, x, 1.5)


def test_dropout_module_is_flax_dropout_with_our_mask():
    x = jnp.ones((8, 16), jnp.bfloat16)
    layer = Dropout(0.25)
    np.testing.assert_array_equal(layer.apply({}, x, deterministic=True), x)
    out = layer.apply({}, x, deterministic=False, rngs={"dropout": jax.random.key(3)})
    assert out.dtype == jnp.bfloat16
    assert 0 < int(jnp.sum(out == 0)) < out.size
    key = jax.random.key(3)
    np.testing.assert_array_equal(
        Dropout(0.25).apply({}, x, deterministic=False, rng=key), dropout(key, x, 0.25)
    )
    # Flax's module fields, deterministic merged from the field or the call.
    fixed = Dropout(0.25, deterministic=True)
    np.testing.assert_array_equal(fixed.apply({}, x), x)
    with pytest.raises(Exception, match="dropout"):
        Dropout(0.25).apply({}, x, deterministic=False)  # no 'dropout' PRNG stream


def test_dropout_takes_a_mask_drawn_before():
    x = jnp.arange(1.0, 25.0).reshape(4, 6)
    key = jax.random.key(3)
    keep = dropout_mask(key, 0.25, x.shape)
    out = Dropout(0.25).apply({}, x, deterministic=False, keep=keep)  # no 'dropout' stream
    np.testing.assert_array_equal(out, dropout(key, x, 0.25))
    np.testing.assert_array_equal(Dropout(0.25).apply({}, x, deterministic=True, keep=keep), x)


def test_sharded_dropout_equals_single_device():
    mesh = sharding.make_mesh(data=8)
    x = jnp.asarray(np.random.default_rng(0).normal(size=(16, 4, 10, 10)), jnp.float32)
    key = jax.random.key(5)
    single = dropout(key, x, 0.1)
    spec = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(("data", "fsdp")))
    sharded = jax.jit(lambda k, v: dropout(k, v, 0.1), out_shardings=spec)(
        key, jax.device_put(x, spec)
    )
    np.testing.assert_array_equal(sharded, single)


_ACTIVATIONS = {
    "gelu": (gelu, lambda x: jax.nn.gelu(x, approximate=False)),
    "gelu_tanh": (lambda x: gelu(x, approximate=True), lambda x: jax.nn.gelu(x, approximate=True)),
    "silu": (silu, jax.nn.silu),
}


@pytest.mark.parametrize("name", sorted(_ACTIVATIONS))
def test_activations_are_jax_computed_in_float32_and_keep_only_their_input(name):
    ours, reference = _ACTIVATIONS[name]
    x = jax.random.normal(jax.random.key(0), (64, 48), jnp.float32) * 3
    np.testing.assert_allclose(ours(x), reference(x), rtol=1e-6, atol=1e-7)
    grad = jax.grad(lambda v: jnp.sum(jnp.sin(ours(v))))(x)
    expected = jax.grad(lambda v: jnp.sum(jnp.sin(reference(v))))(x)
    np.testing.assert_allclose(grad, expected, rtol=1e-5, atol=1e-6)
    # bfloat16: computed in float32 and rounded once; the gradient also in float32 inside.
    xb = x.astype(jnp.bfloat16)
    assert ours(xb).dtype == jnp.bfloat16
    np.testing.assert_array_equal(ours(xb), reference(xb.astype(jnp.float32)).astype(jnp.bfloat16))
    gb = jax.grad(lambda v: jnp.sum(ours(v).astype(jnp.float32)))(xb)
    gb_ref = jax.grad(lambda v: jnp.sum(reference(v)))(xb.astype(jnp.float32))
    np.testing.assert_array_equal(gb, gb_ref.astype(jnp.bfloat16))
    # Forward mode (and so Hessian-vector products) works.
    _, tangent = jax.jvp(ours, (x,), (jnp.ones_like(x),))
    np.testing.assert_allclose(
        tangent, jax.jvp(reference, (x,), (jnp.ones_like(x),))[1], rtol=1e-5, atol=1e-6
    )
    # The backward pass keeps the input only (jax.nn's keeps intermediates of its size too).
    from jax._src.ad_checkpoint import saved_residuals

    saved = [aval for aval, _ in saved_residuals(ours, xb) if aval.shape]
    assert [(a.shape, a.dtype) for a in saved] == [(xb.shape, xb.dtype)]
    assert len([a for a, _ in saved_residuals(reference, xb) if a.shape]) > 1


@pytest.mark.parametrize(
    "activation", [gelu, functools.partial(gelu, approximate=True), silu, jax.nn.relu]
)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_dense_with_an_activation_is_flax_dense_then_the_activation_keeping_the_matmul(
    activation, dtype
):
    x = jax.random.normal(jax.random.key(1), (6, 5, 16), jnp.float32)
    bias_init = nn.initializers.normal(1.0)
    ours = Dense(24, activation=activation, dtype=dtype, bias_init=bias_init)
    flax_dense = nn.Dense(24, dtype=dtype, bias_init=bias_init)
    variables = ours.init(jax.random.key(2), x)
    assert jax.tree.map(jnp.shape, variables) == jax.tree.map(
        jnp.shape, flax_dense.init(jax.random.key(2), x)
    )
    jax.tree.map(np.testing.assert_array_equal, variables, flax_dense.init(jax.random.key(2), x))

    def reference(params, x):
        return activation(flax_dense.apply(params, x))

    out = ours.apply(variables, x)
    assert out.dtype == dtype
    np.testing.assert_array_equal(
        out, reference(variables, x)
    )  # the same roundings in the same order
    grad = jax.grad(lambda p: jnp.sum(jnp.sin(ours.apply(p, x).astype(jnp.float32))))(variables)
    expected = jax.grad(lambda p: jnp.sum(jnp.sin(reference(p, x).astype(jnp.float32))))(variables)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), grad, expected
    )
    # The backward pass keeps the matmul's output (not output + bias) as its one
    # activation-sized residual.
    _, vjp = jax.vjp(lambda x: ours.apply(variables, x), x)
    kept = [a for a in jax.tree.leaves(vjp) if a.shape == (6, 5, 24)]
    params = variables["params"]
    matmul = x.astype(dtype) @ params["kernel"].astype(dtype)
    assert len(kept) == 1 and kept[0].dtype == dtype
    np.testing.assert_array_equal(kept[0], matmul)
    assert Dense(24).apply(variables, x).shape == (6, 5, 24)  # no activation: nn.Dense
    np.testing.assert_array_equal(
        Dense(24, dtype=dtype).apply(variables, x), flax_dense.apply(variables, x)
    )


def _dot_general_operand_dtypes(fn, *args):
    jaxpr = jax.make_jaxpr(fn)(*args)
    found = []

    def visit(jaxpr):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "dot_general":
                found.append(tuple(v.aval.dtype for v in eqn.invars))
            for sub in jax.core.jaxprs_in_params(eqn.params):
                visit(sub)

    visit(jaxpr.jaxpr)
    return found


@pytest.mark.parametrize("dims", [(((2,), (0,)), ((), ())), (((2,), (1,)), ((), ()))])
def test_dot_float32_returns_float32_and_its_backward_matmuls_run_in_the_inputs_dtype(dims):
    x = jax.random.normal(jax.random.key(0), (3, 4, 8), jnp.float32)
    y = jax.random.normal(jax.random.key(1), (8, 5) if dims[0][1] == (0,) else (5, 8))

    def loss(dot, x, y):
        return jnp.sum(jnp.sin(dot(x, y)))

    ours = functools.partial(dot_float32, dimension_numbers=dims)

    def reference(x, y):
        return jax.lax.dot_general(x, y, dims, preferred_element_type=jnp.float32)

    # float32 inputs: autodiff's numbers.
    np.testing.assert_array_equal(ours(x, y), reference(x, y))
    for g, r in zip(
        jax.grad(loss, (1, 2))(ours, x, y), jax.grad(loss, (1, 2))(reference, x, y), strict=True
    ):
        np.testing.assert_allclose(g, r, rtol=1e-6, atol=1e-6)
    # bfloat16 inputs: float32 output, bfloat16 gradients close to the float32 ones, and every
    # backward matmul on bfloat16 operands (autodiff's take the float32 output gradient,
    # which XLA runs as float32 matmuls).
    xb, yb = x.astype(jnp.bfloat16), y.astype(jnp.bfloat16)
    assert ours(xb, yb).dtype == jnp.float32
    np.testing.assert_array_equal(ours(xb, yb), reference(xb, yb))
    grads = jax.grad(loss, (1, 2))(ours, xb, yb)
    for g, r in zip(grads, jax.grad(loss, (1, 2))(reference, x, y), strict=True):
        assert g.dtype == jnp.bfloat16
        np.testing.assert_allclose(np.asarray(g, np.float32), r, rtol=0.05, atol=0.05)
    grad_fn = jax.grad(functools.partial(loss, ours), (0, 1))
    bf16 = jnp.dtype(jnp.bfloat16)
    assert set(_dot_general_operand_dtypes(grad_fn, xb, yb)) == {(bf16, bf16)}
    autodiff = jax.grad(functools.partial(loss, reference), (0, 1))
    assert (jnp.dtype(jnp.float32), bf16) in _dot_general_operand_dtypes(autodiff, xb, yb)


def _assert_shard_map_grads_match_one_device(total, x, replicated):
    """`total(x, replicated)` summed over a 2-device `shard_map` (`x` split on its first axis,
    `replicated` on every device) has the gradients of the unsharded sum."""
    from jax.sharding import Mesh
    from jax.sharding import PartitionSpec as P

    mesh = Mesh(np.array(jax.devices()[:2]), ("x",))
    sharded = jax.shard_map(
        lambda x, r: jax.lax.psum(total(x, r), "x"),
        mesh=mesh,
        in_specs=(P("x"), P()),
        out_specs=P(),
    )
    got = jax.jit(jax.grad(sharded, (0, 1)))(x, replicated)
    for g, want in zip(got, jax.grad(total, (0, 1))(x, replicated), strict=True):
        np.testing.assert_allclose(g, want, rtol=1e-5, atol=1e-6)


def test_dot_float32_inside_shard_map_with_a_replicated_weight():
    x = jax.random.normal(jax.random.key(0), (4, 8), jnp.float32)
    w = jax.random.normal(jax.random.key(1), (8, 3), jnp.float32)
    dims = (((1,), (0,)), ((), ()))
    _assert_shard_map_grads_match_one_device(
        lambda x, w: jnp.sum(jnp.sin(dot_float32(x, w, dims))), x, w
    )


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_add_positions_equals_the_broadcast_sum_and_its_table_gradient_is_a_matmul(dtype):
    x = jax.random.normal(jax.random.key(0), (3, 5, 8), jnp.float32).astype(dtype)
    table = jax.random.normal(jax.random.key(1), (5, 8), jnp.float32).astype(dtype)
    cotangent = jax.random.normal(jax.random.key(2), (3, 5, 8), jnp.float32)

    def ours(x, t):
        return jnp.sum(add_positions(x, t).astype(jnp.float32) * cotangent)

    def broadcast(x, t):
        return jnp.sum((x + t[None]).astype(jnp.float32) * cotangent)

    assert add_positions(x, table).dtype == dtype
    np.testing.assert_array_equal(np.float32(add_positions(x, table)), np.float32(x + table[None]))
    got, want = jax.grad(ours, (0, 1))(x, table), jax.grad(broadcast, (0, 1))(x, table)
    tol = 1e-6 if dtype == jnp.float32 else 1e-2
    for g, w in zip(got, want, strict=True):
        assert g.dtype == w.dtype == dtype
        np.testing.assert_allclose(np.float32(g), np.float32(w), rtol=tol, atol=tol)
    # The table's gradient is a matmul with ones, not a sum over the batch (whose reduction
    # makes XLA lay the residual stream out batch-minor on GPUs).
    _, vjp = jax.vjp(add_positions, x, table)
    jaxpr = str(jax.make_jaxpr(vjp)(x))
    assert "dot_general" in jaxpr and "reduce_sum" not in jaxpr
    # Forward mode too.
    tangents = (jnp.ones_like(x), jnp.full_like(table, 2))
    _, d_out = jax.jvp(add_positions, (x, table), tangents)
    np.testing.assert_array_equal(np.float32(d_out), np.full(x.shape, 3.0))


def test_add_positions_takes_mixed_dtypes_and_several_batch_dimensions():
    x = jnp.ones((2, 3, 4, 6), jnp.bfloat16)
    table = jnp.arange(24, dtype=jnp.float32).reshape(4, 6)
    out = add_positions(x, table)
    assert out.dtype == jnp.float32
    np.testing.assert_array_equal(out, x.astype(jnp.float32) + table)
    d_x, d_table = jax.grad(lambda a, b: jnp.sum(add_positions(a, b)), (0, 1))(x, table)
    assert d_x.dtype == jnp.bfloat16 and d_table.dtype == jnp.float32
    np.testing.assert_array_equal(d_table, np.full((4, 6), 6.0))


def test_add_positions_inside_shard_map_with_a_replicated_table():
    x = jax.random.normal(jax.random.key(0), (4, 3, 8), jnp.float32)
    table = jax.random.normal(jax.random.key(1), (3, 8), jnp.float32)
    _assert_shard_map_grads_match_one_device(
        lambda x, t: jnp.sum(jnp.sin(add_positions(x, t))), x, table
    )


@pytest.mark.parametrize(
    "shape, window, strides, padding",
    [
        ((2, 9, 9, 3), (3, 3), (2, 2), ((1, 1), (1, 1))),  # ResNet's stem pool
        ((2, 8, 8, 3), (2, 2), (2, 2), "VALID"),  # the MNIST CNN's
        ((2, 7, 6, 3), (3, 2), (1, 2), "SAME"),
        ((3, 2, 10, 10, 2), (3, 3), (2, 2), "SAME"),  # two batch dimensions
        ((2, 11, 3), (4,), (3,), ((2, 1),)),  # one spatial dimension
    ],
)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("ties", [False, True], ids=["distinct", "ties"])
def test_max_pool_equals_flax_and_its_gradient_picks_the_same_elements(
    shape, window, strides, padding, dtype, ties
):
    x = jax.random.normal(jax.random.key(0), shape)
    if ties:  # ReLU'd integers: windows of equal maxima, all-zero windows
        x = jnp.maximum(jnp.round(x), 0)
    x = x.astype(dtype)

    def flax_pool(x):
        return nn.max_pool(x, window, strides, padding)

    def ours(x):
        return max_pool(x, window, strides, padding)

    want, flax_vjp = jax.vjp(flax_pool, x)
    got, our_vjp = jax.vjp(ours, x)
    assert got.dtype == want.dtype and got.shape == want.shape
    np.testing.assert_array_equal(np.float32(got), np.float32(want))
    g = jax.random.normal(jax.random.key(1), want.shape).astype(dtype)
    (d_got,), (d_want,) = our_vjp(g), flax_vjp(g)
    assert d_got.dtype == dtype
    # The same elements receive gradient (the first maximum of each window); where windows
    # overlap, the sums may differ in rounding (ours adds in float32).
    np.testing.assert_array_equal(np.float32(d_got) != 0, np.float32(d_want) != 0)
    tol = 1e-6 if dtype == jnp.float32 else 2e-2
    np.testing.assert_allclose(np.float32(d_got), np.float32(d_want), rtol=tol, atol=tol)
    # No scatter (select-and-scatter) in the backward pass.
    assert "scatter" not in str(jax.make_jaxpr(our_vjp)(g))
    # Forward mode: the winner's tangent, the transpose of the backward pass (<J t, g> =
    # <t, J^T g>); without ties the same as Flax's (whose forward mode may pick another of
    # tied elements than its backward pass does).
    t = jax.random.normal(jax.random.key(2), shape).astype(dtype)
    tangent = np.float32(jax.jvp(ours, (x,), (t,))[1])
    np.testing.assert_allclose(
        np.sum(tangent * np.float32(g)), np.sum(np.float32(t) * np.float32(d_got)), rtol=tol
    )
    if not ties:
        np.testing.assert_array_equal(tangent, np.float32(jax.jvp(flax_pool, (x,), (t,))[1]))


def test_max_pool_gradient_goes_to_the_first_maximum_of_a_window():
    x = jnp.array([[1.0, 3.0, 3.0, 0.0]])[..., None]  # [batch 1, width 4, features 1]
    d_x = jax.grad(lambda x: jnp.sum(max_pool(x, (2,), (1,))))(x)
    # Windows [1, 3], [3, 3], [3, 0]: the middle one's gradient goes to its first 3.
    np.testing.assert_array_equal(d_x[0, :, 0], [0.0, 2.0, 1.0, 0.0])
    with pytest.raises(ValueError, match="strides"):
        max_pool(x, (2,), (1, 1))
    with pytest.raises(ValueError, match="padding"):
        max_pool(x, (2,), (1,), ((0, 0), (0, 0)))


def _bn_pair(dtype, **kw):
    """Flax's BatchNorm and ours, configured alike, and shared random variables."""
    kw = dict(momentum=0.9, epsilon=1e-3, dtype=dtype, **kw)
    x = jax.random.normal(jax.random.key(0), (4, 5, 3, 6)) * 3 + 1
    flax_bn, ours = nn.BatchNorm(**kw), BatchNorm(**kw)
    unnamed = {k: v for k, v in kw.items() if k != "axis_name"}
    variables = nn.BatchNorm(**unnamed).init(jax.random.key(1), x, use_running_average=False)
    assert jax.tree.structure(variables) == jax.tree.structure(
        BatchNorm(**unnamed).init(jax.random.key(1), x, use_running_average=False)
    )
    keys = iter(jax.random.split(jax.random.key(2), 4))
    variables = jax.tree.map(lambda v: v + jax.random.normal(next(keys), v.shape), variables)
    variables["batch_stats"]["var"] = jnp.abs(variables["batch_stats"]["var"])
    return flax_bn, ours, variables, x.astype(dtype)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_batch_norm_equals_flax_in_values_gradients_and_running_statistics(dtype):
    flax_bn, ours, variables, x = _bn_pair(dtype)
    residual = jax.random.normal(jax.random.key(3), x.shape).astype(dtype)
    w = jax.random.normal(jax.random.key(4), x.shape)

    def loss(module, params, x):  # ResNet's use: residual add, ReLU; the statistics' update
        y, updates = module.apply(
            {**variables, "params": params}, x, use_running_average=False, mutable="batch_stats"
        )
        return jnp.sum(jax.nn.relu(y + residual) * w), (y, updates["batch_stats"])

    grads = {}
    for name, module in (("flax", flax_bn), ("ours", ours)):
        grad_fn = jax.jit(jax.grad(functools.partial(loss, module), (0, 1), has_aux=True))
        grads[name] = grad_fn(variables["params"], x)
    (want_dp, want_dx), (want, want_stats) = grads["flax"]
    (got_dp, got_dx), (got, got_stats) = grads["ours"]
    assert got.dtype == want.dtype == dtype and got_dx.dtype == dtype
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == jnp.float32 else dict(rtol=2e-2, atol=5e-2)
    np.testing.assert_allclose(np.float32(got), np.float32(want), **tol)
    np.testing.assert_allclose(np.float32(got_dx), np.float32(want_dx), **tol)
    got_rest, want_rest = (
        jax.tree.leaves((got_dp, got_stats)),
        jax.tree.leaves((want_dp, want_stats)),
    )
    for a, b in zip(got_rest, want_rest, strict=True):
        assert a.dtype == b.dtype == jnp.float32
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
    # Eval mode: the running statistics.
    got = ours.apply(variables, x, use_running_average=True)
    want = flax_bn.apply(variables, x, use_running_average=True)
    assert got.dtype == want.dtype
    np.testing.assert_allclose(np.float32(got), np.float32(want), **tol)


def _reductions_of(jaxpr, shape) -> int:
    """reduce_sum equations over an operand of `shape` in a jaxpr and the jaxprs it calls."""
    count = 0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "reduce_sum" and eqn.invars[0].aval.shape == shape:
            count += 1
        for value in eqn.params.values():
            for sub in value if isinstance(value, tuple | list) else (value,):
                sub = getattr(sub, "jaxpr", sub)  # a ClosedJaxpr's Jaxpr
                if hasattr(sub, "eqns"):
                    count += _reductions_of(sub, shape)
    return count


def test_batch_norm_reduces_once_in_each_direction():
    """One reduction over the activations forward and one backward; Flax's: two each."""
    x = jax.random.normal(jax.random.key(0), (8, 4, 4, 3))
    g = jax.random.normal(jax.random.key(1), x.shape)
    flax_bn = nn.BatchNorm(use_running_average=False)
    variables = flax_bn.init(jax.random.key(0), x)
    counts = {}
    for name, fn in (
        ("ours", lambda x: batch_norm(x, jnp.ones(3), jnp.zeros(3), 1e-5)[0]),
        ("flax", lambda x: flax_bn.apply(variables, x, mutable="batch_stats")[0]),
    ):
        jaxpr = jax.make_jaxpr(lambda x, g, fn=fn: jax.vjp(fn, x)[1](g))(x, g)
        counts[name] = _reductions_of(jaxpr.jaxpr, x.shape)
    assert counts == {"ours": 2, "flax": 4}, counts


def test_batch_norm_over_a_named_axis_takes_the_statistics_over_all_members():
    """Under vmap (as under pmap) with `axis_name`: Flax's numbers, per-member parameter
    gradients, and the same result as one big batch."""
    flax_bn, ours, variables, x = _bn_pair(jnp.float32, axis_name="members")
    xs = x.reshape(2, 2, *x.shape[1:])  # 2 members of 2 examples
    w = jax.random.normal(jax.random.key(4), xs.shape)

    def member_loss(module, params, x, w):
        y, updates = module.apply(
            {**variables, "params": params}, x, use_running_average=False, mutable="batch_stats"
        )
        return jnp.sum(jnp.tanh(y) * w), updates["batch_stats"]

    results = {}
    for name, module in (("flax", flax_bn), ("ours", ours)):
        grad_fn = jax.grad(functools.partial(member_loss, module), (0, 1), has_aux=True)
        results[name] = jax.jit(jax.vmap(grad_fn, in_axes=(None, 0, 0), axis_name="members"))(
            variables["params"], xs, w
        )
    for a, b in zip(
        jax.tree.leaves(results["ours"]), jax.tree.leaves(results["flax"]), strict=True
    ):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    # The summed parameter gradients and the input gradient equal one batch of 4's.
    single = BatchNorm(momentum=0.9, epsilon=1e-3)
    (d_params, d_x), _ = jax.grad(functools.partial(member_loss, single), (0, 1), has_aux=True)(
        variables["params"], x, w.reshape(x.shape)
    )
    (m_params, m_x), _ = results["ours"]
    np.testing.assert_allclose(m_x.reshape(x.shape), d_x, rtol=1e-4, atol=1e-5)
    for a, b in zip(jax.tree.leaves(m_params), jax.tree.leaves(d_params), strict=True):
        np.testing.assert_allclose(a.sum(0), b, rtol=1e-4, atol=1e-5)


def test_batch_norm_init_outside_the_axis_and_output_dtype_without_parameters():
    """As Flax: initialising in training mode with `axis_name` outside any mapped axis works
    (was: unbound axis name), and without scale and bias the output keeps x's dtype (was:
    float32 from the placeholder parameters)."""
    x = jnp.ones((4, 3), jnp.bfloat16)
    for module in (nn.BatchNorm, BatchNorm):
        variables = module(axis_name="batch").init(jax.random.key(0), x, False)
        assert variables["params"]["scale"].shape == (3,)
        bare = module(use_scale=False, use_bias=False)
        for running in (True, False):
            y, _ = bare.apply(bare.init({}, x, running), x, running, mutable="batch_stats")
            assert y.dtype == jnp.bfloat16, (module, running)


def test_batch_norm_inside_shard_map_over_the_mesh_axis_equals_one_batch():
    from jax.sharding import Mesh
    from jax.sharding import PartitionSpec as P

    keys = jax.random.split(jax.random.key(0), 4)
    x = jax.random.normal(keys[0], (4, 3, 5)) * 2 + 1
    w = jax.random.normal(keys[1], x.shape)
    scale, bias = jax.random.normal(keys[2], (5,)), jax.random.normal(keys[3], (5,))

    def loss(x, w, scale, bias, axis_name=None):
        return jnp.sum(jnp.tanh(batch_norm(x, scale, bias, 1e-5, axis_name=axis_name)[0]) * w)

    sharded = jax.shard_map(
        lambda *args: jax.lax.psum(loss(*args, axis_name="x"), "x"),
        mesh=Mesh(np.array(jax.devices()[:2]), ("x",)),
        in_specs=(P("x"), P("x"), P(), P()),
        out_specs=P(),
    )
    got = jax.jit(jax.value_and_grad(sharded, (0, 2, 3)))(x, w, scale, bias)
    want = jax.value_and_grad(loss, (0, 2, 3))(x, w, scale, bias)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [jnp.int32, jnp.uint8, jnp.bool_])
def test_max_pool_of_integers_equals_flax(dtype):
    """Was an OverflowError: the padding was -inf whatever the dtype."""
    x = (jnp.arange(2 * 5 * 5 * 3) % 17).reshape(2, 5, 5, 3).astype(dtype)
    for padding in ("SAME", "VALID"):
        ours = max_pool(x, (2, 2), (2, 2), padding)
        assert ours.dtype == x.dtype
        np.testing.assert_array_equal(ours, nn.max_pool(x, (2, 2), (2, 2), padding))
