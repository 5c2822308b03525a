"""Building blocks shared by the model families.

`Dropout` (and the function `dropout`) is `flax.linen.Dropout` with cheaper random bits.
Flax draws a Bernoulli mask through `jax.random.uniform`: one 32-bit word per element,
turned into a float and compared. With JAX's default (partitionable) threefry generator each
32-bit word costs a whole threefry-2x32 hash, about a hundred integer operations, and BERT-base
at batch 256 masks about 1.2 billion elements per step (hidden states and every attention
probability), so the hashes rival the step's matmuls on a GPU. Here each 32-bit word gives
two 16-bit numbers and the mask is an integer comparison: half the hashes, no float
conversion. The drop probability is `rate` rounded to a multiple of 2**-16 (0.1 -> 6554 /
65536 = 0.100006) and the kept elements are divided by the exact keep probability, so the
output's expectation is the input, as in Flax.

`Embed` is `flax.linen.Embed` with a lookup that suits mixed precision: Flax's converts the
whole table to the computation dtype before gathering, so in bfloat16 every training step
converts all V x E entries, and the gradient is a bfloat16 scatter-add into a fresh
bfloat16 copy of the table. Here the rows are gathered from the parameter table (float32)
and only they are cast; the gradient is a float32 scatter-add. Tables of at most
`SELECT_MAX_ROWS` rows (BERT's two token types) are looked up with selects, whose gradient
is a masked sum over the batch per row instead of a scatter-add of every token into a
couple of rows. The outputs are the same numbers; parameters (`embedding`) and `attend` are Flax's.

`gelu` and `silu` are JAX's activations computed in float32 (rounded once to the input's
dtype) whose backward pass recomputes them from the input. Differentiating `jax.nn.gelu`
directly keeps several intermediates of the input's size for the backward pass (the erf or
tanh term, the scaled input, ...); BERT-base at batch 256 then holds two extra
[32768, 3072] tensors per layer, about 4.5 GiB, and writes and reads them every step. Here
only the input is kept (`jax.checkpoint` around the activation), the backward pass
recomputes the rest where it computes the gradient, and forward-mode differentiation still
works. `Dense` with an `activation` takes the bias add into that recomputed function too.

`max_pool` is `flax.linen.max_pool` whose backward pass is one elementwise pass over an
int8 record of each window's winner instead of XLA's select-and-scatter (an atomic scatter
on GPUs).

`BatchNorm` is `flax.linen.BatchNorm` (features last) whose training-mode normalisation
has a hand-written backward pass. It needs two per-channel sums over the batch, of the
output's gradient g and of g times the normalised input. Differentiating Flax's, XLA's GPU
backend makes them two reduction kernels, and the second one reads g again; in ResNet-50,
where g itself is computed from the ReLU mask and written for the shortcut, that is one
more read of every normalised activation per step. Here both sums are one reduction over
complex numbers (g + i g x_hat: float32 parts, added part by part), which XLA fuses with the
kernel that computes g, and the mean and the mean of squares of the forward pass are one
reduction the same way.

`add_positions` adds a position table to a batch of embeddings with the table's gradient
computed as a matmul rather than a sum over the batch, which on GPUs would make XLA lay out
the whole residual stream batch-minor (see its docstring).

Example:
    >>> import jax, jax.numpy as jnp
    >>> embed = Embed(num_embeddings=10, features=4, dtype=jnp.bfloat16)
    >>> variables = embed.init(jax.random.key(0), jnp.zeros((2, 3), jnp.int32))
    >>> embed.apply(variables, jnp.array([[1, 2, 3]])).dtype
    dtype(bfloat16)
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "REMAT_POLICIES",
    "SELECT_MAX_ROWS",
    "BatchNorm",
    "Dense",
    "Dropout",
    "Embed",
    "add_positions",
    "apply_dropout_mask",
    "batch_norm",
    "check_lengths",
    "drop_threshold",
    "dropout",
    "dropout_mask",
    "dot_float32",
    "keep_probability",
    "match_varying",
    "max_pool",
    "gelu",
    "silu",
]

_HALF_WORD = 2**16

# Rematerialisation of each layer of a stack in the backward pass (BERT's and the
# Transformers'), by name: "none" keeps every activation; "full" (or "nothing_saveable")
# recomputes each layer from its input; the "dots" policies save the matmul outputs (all
# of them, or those without batch dimensions) and recompute the rest. Each has JAX's
# `jax.checkpoint_policies` name and a short one.
_POLICIES = jax.checkpoint_policies
REMAT_POLICIES: dict[str, Callable[..., bool] | None] = {
    "none": None,
    "full": None,  # `jax.checkpoint` without a policy saves nothing
    "nothing_saveable": _POLICIES.nothing_saveable,
    "everything_saveable": _POLICIES.everything_saveable,
    "dots": _POLICIES.dots_saveable,
    "dots_saveable": _POLICIES.dots_saveable,
    "dots_no_batch": _POLICIES.dots_with_no_batch_dims_saveable,
    "dots_with_no_batch_dims_saveable": _POLICIES.dots_with_no_batch_dims_saveable,
}


def check_lengths(lengths: Any, batch: int, time: int, name: str = "lengths") -> None:
    """Raises ValueError for a lengths array (called `name` in the messages) that cannot
    describe a [batch, time] batch of right-padded sequences.

    Shapes are always checked; values only when concrete (outside jit).
    """
    if jnp.shape(lengths) != (batch,):
        raise ValueError(
            f"{name} has shape {jnp.shape(lengths)} but the batch has {batch} sequences: "
            "pass one length per sequence, <int>[batch]"
        )
    if isinstance(lengths, jax.core.Tracer):
        return
    values = np.asarray(lengths)
    if values.size and values.min() < 1:
        raise ValueError(
            f"{name} must be >= 1 (found {values.min()}): empty sequences have no last "
            "step; drop them or give them one padding token"
        )
    if values.size and values.max() > time:
        raise ValueError(
            f"{name} must be <= the sequence length {time} (found {values.max()}); "
            "truncate the lengths or pad the tokens to the longest sequence"
        )


def drop_threshold(rate: float) -> int:
    """The 16-bit threshold below which an element is dropped (rate rounded to 2**-16)."""
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"dropout rate must be in [0, 1], got {rate}")
    return round(rate * _HALF_WORD)


def keep_probability(rate: float) -> float:
    """The exact probability that `dropout_mask` keeps an element: 1 - `rate` rounded to a
    multiple of 2**-16."""
    return 1.0 - drop_threshold(rate) / _HALF_WORD


def dropout_mask(key: jax.Array, rate: float, shape: Sequence[int]) -> jax.Array:
    """<bool>[*shape]: True where an element is kept, with probability 1 - rate (rounded to a
    multiple of 2**-16), from 16-bit halves of 32-bit random words (see the module docstring).

    The words are drawn over the leading dimensions as given and the last one halved, so a
    sharded mask is generated where it is used.
    """
    shape = tuple(int(d) for d in shape)
    threshold = drop_threshold(rate)
    if threshold == _HALF_WORD:  # not representable as a 16-bit threshold
        return jnp.zeros(shape, bool)
    if not shape:
        shape_words, last = (1,), 1
    else:
        shape_words, last = shape[:-1] + (-(-shape[-1] // 2),), shape[-1]
    words = jax.random.bits(key, shape_words, jnp.uint32)
    halves = jax.lax.bitcast_convert_type(words, jnp.uint16)  # [..., words, 2]
    halves = halves.reshape(*shape_words[:-1], 2 * shape_words[-1])[..., :last]
    return (halves >= threshold).reshape(shape)


def dropout(
    key: jax.Array, inputs: jax.Array, rate: float, broadcast_dims: Sequence[int] = ()
) -> jax.Array:
    """Drops elements of `inputs` with probability `rate` and divides the others by the keep
    probability (the training-mode `Dropout`). `broadcast_dims` share one mask value."""
    threshold = drop_threshold(rate)
    if threshold == 0:
        return inputs
    if threshold == _HALF_WORD:
        return jnp.zeros_like(inputs)
    mask_shape = list(inputs.shape)
    for dim in broadcast_dims:
        mask_shape[dim] = 1
    return apply_dropout_mask(inputs, dropout_mask(key, rate, mask_shape), rate)


def apply_dropout_mask(inputs: jax.Array, keep: jax.Array, rate: float) -> jax.Array:
    """`inputs` where `keep` (a `dropout_mask` of `rate`, broadcastable to `inputs`) is True,
    divided by the keep probability; zeros elsewhere. `dropout` with a mask drawn before."""
    threshold = drop_threshold(rate)
    if threshold == 0:
        return inputs
    if threshold == _HALF_WORD:
        return jnp.zeros_like(inputs)
    keep = jnp.broadcast_to(keep, inputs.shape)
    # Scaled in float32 (or wider) and rounded once: 1 / 0.9 is not exact in bfloat16.
    wide = jnp.promote_types(inputs.dtype, jnp.float32)
    scaled = (inputs.astype(wide) / np.asarray(keep_probability(rate), wide)).astype(inputs.dtype)
    return jax.lax.select(keep, scaled, jnp.zeros_like(inputs))


@functools.partial(jax.checkpoint, static_argnums=(1,))
def _recomputed(
    x: jax.Array, fn: Callable[[jax.Array], jax.Array], bias: jax.Array | None = None
) -> jax.Array:
    if bias is not None:
        x = x + bias
    wide = jnp.promote_types(x.dtype, jnp.float32)
    return fn(x.astype(wide)).astype(x.dtype)


def gelu(x: jax.Array, approximate: bool = False) -> jax.Array:
    """GELU: the exact (erf) form, or the tanh approximation with `approximate=True`;
    computed in float32, output in `x`'s dtype; the backward pass keeps only `x` (see the
    module docstring)."""
    return _recomputed(x, _GELU[bool(approximate)])


def silu(x: jax.Array) -> jax.Array:
    """SiLU (swish), x * sigmoid(x), computed and differentiated as `gelu` is."""
    return _recomputed(x, jax.nn.silu)


_GELU = {
    False: functools.partial(jax.nn.gelu, approximate=False),
    True: functools.partial(jax.nn.gelu, approximate=True),
}


def _elementwise(fn: Callable[[jax.Array], jax.Array]) -> Callable[[jax.Array], jax.Array]:
    """What `gelu` or `silu` (or a partial of them) computes in float32, without their own
    recomputation: nested in `Dense`'s, that would keep float32 copies; other functions as
    they are."""
    base, kwargs = fn, {}
    if isinstance(fn, functools.partial) and not fn.args:
        base, kwargs = fn.func, fn.keywords
    if base is gelu:
        return _GELU[bool(kwargs.get("approximate", False))]
    if base is silu and not kwargs:
        return jax.nn.silu
    return fn


class Dropout(nn.Dropout):
    """`nn.Dropout` drawing its mask with `dropout_mask` (see the module docstring); the
    attributes and call are Flax's, plus `keep`: a mask drawn before (e.g. one slice of
    the masks of several layers drawn at once), used instead of drawing one."""

    @nn.compact
    def __call__(
        self,
        inputs: jax.Array,
        deterministic: bool | None = None,
        rng: jax.Array | None = None,
        keep: jax.Array | None = None,
    ) -> jax.Array:
        deterministic = nn.merge_param("deterministic", self.deterministic, deterministic)
        if deterministic or drop_threshold(self.rate) == 0:
            return inputs
        if keep is not None:
            return apply_dropout_mask(inputs, keep, self.rate)
        if rng is None:
            rng = self.make_rng(self.rng_collection)
        return dropout(rng, inputs, self.rate, self.broadcast_dims)


def _varying_axes(x: jax.Array) -> frozenset[str]:
    """The manual (`jax.shard_map`) mesh axes `x` varies over; empty outside shard_map."""
    aval = jax.typeof(x)
    axes = getattr(aval, "vma", None)
    if axes is None:
        axes = getattr(getattr(aval, "manual_axis_type", None), "varying", ())
    return frozenset(axes)


def match_varying(*xs: jax.Array | None) -> tuple[jax.Array | None, ...]:
    """`xs` with each marked as varying over every manual mesh axis any of them varies over.

    Inside `jax.shard_map` a hand-written backward pass (`jax.custom_vjp`) returns gradients
    that vary where the other inputs do, and JAX rejects a varying gradient for an input
    that does not vary (e.g. a replicated weight or bias). Passing the inputs through this
    first makes the types agree; outside shard_map it returns them unchanged.
    """
    axes = frozenset().union(*(_varying_axes(x) for x in xs if x is not None))
    if not axes:
        return xs
    out = []
    for x in xs:
        missing = tuple(sorted(axes - _varying_axes(x))) if x is not None else ()
        out.append(jax.lax.pcast(x, missing, to="varying") if missing else x)
    return tuple(out)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def dot_float32(x: jax.Array, y: jax.Array, dimension_numbers: tuple[Any, Any]) -> jax.Array:
    """`jax.lax.dot_general` of `x` and `y` (of one computation dtype, e.g. bfloat16),
    accumulated and returned in float32 (or wider), whose backward matmuls take the output's
    gradient rounded to the inputs' dtype, as under PyTorch's autocast.

    Differentiating `preferred_element_type=float32` directly gives a float32 output
    gradient, and both backward matmuls then run in float32 on float32 copies of the
    operands: for the 2x1024 LSTM's input projection four 275-GFLOP float32 matmuls per
    step. With float32 inputs the gradient is autodiff's.
    """
    wide = jnp.promote_types(jnp.result_type(x, y), jnp.float32)
    return jax.lax.dot_general(x, y, dimension_numbers, preferred_element_type=wide)


def _dot_float32_fwd(x, y, dimension_numbers):
    return dot_float32(x, y, dimension_numbers), (x, y)


def _dot_float32_bwd(dimension_numbers, residuals, d_out):
    x, y = residuals
    dtype = jnp.result_type(x, y)
    # Through jax.vjp, a gradient inside jax.shard_map gets its input's (varying) type.
    _, vjp = jax.vjp(
        lambda a, b: jax.lax.dot_general(a.astype(dtype), b.astype(dtype), dimension_numbers),
        x,
        y,
    )
    return vjp(d_out.astype(dtype))


dot_float32.defvjp(_dot_float32_fwd, _dot_float32_bwd)


def add_positions(x: jax.Array, table: jax.Array) -> jax.Array:
    """`x + table`: <[..., length, embed]> plus a <[length, embed]> table broadcast over the
    leading (batch) dimensions, whose table gradient is a matmul of the output's gradient
    with a vector of ones rather than a sum over the batch.

    The numbers are those of the sum. The reason is the layout: to make that one reduction
    contiguous, XLA's GPU layout assignment lays out the whole residual stream that feeds it
    batch-minor ([length, embed, batch] in memory), and every matmul and LayerNorm of every
    layer then works through transposes. For the GPT-2-small LM at batch 32 that was about
    a fifth of the step's memory traffic; a matmul's operands keep their row-major layout.
    Forward- and reverse-mode differentiation both work (the broadcast is written as an
    outer product with ones, whose transpose is the matmul).
    """
    dtype = jnp.result_type(x, table)
    return _add_positions(x.astype(dtype), table.astype(dtype))


@jax.custom_jvp
def _add_positions(x: jax.Array, table: jax.Array) -> jax.Array:
    return x + table


@_add_positions.defjvp
def _add_positions_jvp(primals, tangents):
    (x, table), (dx, d_table) = primals, tangents
    ones = jnp.ones(x.shape[: x.ndim - 2], d_table.dtype)
    spread = jax.lax.dot_general(ones, d_table, (((), ()), ((), ())))  # an outer product
    return x + table, dx + spread


def max_pool(
    inputs: jax.Array,
    window_shape: Sequence[int],
    strides: Sequence[int] | None = None,
    padding: str | Sequence[tuple[int, int]] = "VALID",
) -> jax.Array:
    """`flax.linen.max_pool` (the same arguments and outputs) with a derivative that needs
    no scatter.

    XLA's GPU backend differentiates a max pool through select-and-scatter, which it lowers
    to four int32 index arrays of the output's size and an atomic scatter-add into a padded
    zero copy of the input. Here the forward pass also records which element of each window
    is the maximum (the first one, in row-major window order, as XLA and PyTorch pick among
    ties) in one int8 per output; the derivative picks that element's tangent, and its
    transpose (the backward pass) puts each output's gradient back with strided pads, one
    elementwise pass. Forward- and reverse-mode differentiation both work.

    Args:
      inputs: <float or int>[batch dims..., spatial dims..., features].
      window_shape: the window's size in each spatial dimension.
      strides: the step between windows (default 1 in each dimension).
      padding: "SAME", "VALID", or (low, high) per spatial dimension; padded elements
        never win.

    Returns:
      The maximum of each window.
    """
    window = tuple(int(w) for w in window_shape)
    steps = tuple(int(s) for s in strides) if strides else (1,) * len(window)
    if len(steps) != len(window):
        raise ValueError(f"max_pool: {len(steps)} strides for a {len(window)}-d window")
    spatial = inputs.shape[inputs.ndim - len(window) - 1 : -1]
    if isinstance(padding, str):
        pads = tuple(jax.lax.padtype_to_pads(spatial, window, steps, padding))
    else:
        pads = tuple((int(lo), int(hi)) for lo, hi in padding)
        if len(pads) != len(window):
            raise ValueError(f"max_pool: padding {padding} for a {len(window)}-d window")
    return _max_pool(inputs, window, steps, pads)


def _window_views(
    x: jax.Array,
    window: tuple[int, ...],
    steps: tuple[int, ...],
    pads: tuple[Any, ...],
    fill: float,
) -> list[jax.Array]:
    """Each window position's strided view of `x` padded with `fill` (output-shaped), in
    row-major window order."""
    lead = x.ndim - len(window) - 1
    config = [(0, 0, 0)] * lead + [(lo, hi, 0) for lo, hi in pads] + [(0, 0, 0)]
    padded = jax.lax.pad(x, jnp.array(fill, x.dtype), config)
    out = tuple(
        (padded.shape[lead + i] - w) // s + 1
        for i, (w, s) in enumerate(zip(window, steps, strict=True))
    )
    views = []
    for offset in np.ndindex(*window):
        start = (0,) * lead + tuple(offset) + (0,)
        limit = (
            padded.shape[:lead]
            + tuple(o + (n - 1) * s + 1 for o, n, s in zip(offset, out, steps, strict=True))
            + padded.shape[-1:]
        )
        views.append(jax.lax.slice(padded, start, limit, (1,) * lead + steps + (1,)))
    return views


def _lowest(dtype: Any) -> Any:
    """The padding that never wins a maximum: -inf, or an integer type's least value."""
    if jnp.issubdtype(dtype, jnp.integer):
        return jnp.iinfo(dtype).min
    return False if dtype == jnp.bool_ else -jnp.inf


@functools.partial(jax.custom_jvp, nondiff_argnums=(1, 2, 3))
def _max_pool(x, window, steps, pads):
    return functools.reduce(jnp.maximum, _window_views(x, window, steps, pads, _lowest(x.dtype)))


@_max_pool.defjvp
def _max_pool_jvp(window, steps, pads, primals, tangents):
    (x,), (dx,) = primals, tangents
    views = _window_views(x, window, steps, pads, _lowest(x.dtype))
    y = functools.reduce(jnp.maximum, views)
    winner = jnp.full(y.shape, len(views), jnp.int8 if len(views) < 127 else jnp.int32)
    for k in reversed(range(len(views))):
        winner = jnp.where(views[k] == y, k, winner).astype(winner.dtype)
    d_views = _window_views(dx, window, steps, pads, 0.0)
    zero = jnp.zeros((), dx.dtype)
    dy = functools.reduce(jnp.add, [jnp.where(winner == k, d, zero) for k, d in enumerate(d_views)])
    return y, dy


def _two_sums(a: jax.Array, b: jax.Array, axes: tuple[int, ...]) -> tuple[jax.Array, jax.Array]:
    """(sum of `a`, sum of `b`) over `axes`, both float32 arrays of one shape, as ONE
    reduction: the sum of the complex numbers a + ib, whose parts are added separately, so
    the numbers are those of two float32 sums. XLA fuses one reduction, with the kernel
    computing its operands, where it leaves two reductions of one operand as two kernels."""
    total = jax.lax.complex(a, b).sum(axes)
    return jnp.real(total), jnp.imag(total)


def batch_norm(
    x: jax.Array,
    scale: jax.Array,
    bias: jax.Array,
    epsilon: float,
    dtype: Any = None,
    axis_name: str | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Batch normalisation with the batch's statistics, over all axes but the last.

    `(x - mean) * rsqrt(var + epsilon) * scale + bias`, the statistics and the arithmetic in
    float32 (the variance as the mean of squares minus the squared mean, at least 0), as
    `flax.linen.BatchNorm` computes it in training mode. Its backward pass is hand-written:
    the two per-channel sums it needs are one reduction (see the module docstring). Reverse
    mode only (`jax.grad`, `jax.vjp`); forward mode is not defined.

    Args:
      x: <float>[..., features] activations.
      scale, bias: <float>[features] parameters.
      epsilon: added to the variance.
      dtype: the output's dtype (default: that of `x`).
      axis_name: a `pmap`, `vmap` or `shard_map` axis to take the statistics over as well
        (its members' batches together); under `jax.jit` a sharded batch needs none. The
        backward pass sums over the axis too, so under `vmap` take the gradient inside the
        mapped function (a `jax.grad` outside a `vmap` with an axis name finds it unbound).

    Returns:
      (normalised <dtype>[..., features], the batch's <float32>[features] mean and
      (biased) variance). The statistics carry no gradient.
    """
    x, scale, bias = match_varying(x, scale, bias)  # inside shard_map (see match_varying)
    return _batch_norm(x, scale, bias, epsilon, dtype, axis_name)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _batch_norm(x, scale, bias, epsilon, dtype, axis_name):
    return _batch_norm_forward(x, scale, bias, epsilon, dtype, axis_name)[0]


def _count(x: jax.Array, axis_name: str | None) -> int | jax.Array:
    """Elements per channel of `x`, over `axis_name`'s members too."""
    n = math.prod(x.shape[:-1])
    return n if axis_name is None else n * jax.lax.psum(1, axis_name)


def _normalise(x, mean, inv, scale, bias, dtype):
    """`(x - mean) * (inv * scale) + bias` in float32 (`inv`: the reciprocal standard
    deviation), cast to `dtype`: both modes of `BatchNorm`."""
    f32 = jnp.float32
    return ((x.astype(f32) - mean) * (inv * scale.astype(f32)) + bias.astype(f32)).astype(dtype)


def _batch_norm_forward(x, scale, bias, epsilon, dtype, axis_name):
    axes = tuple(range(x.ndim - 1))
    wide = x.astype(jnp.float32)
    sums = _two_sums(wide, wide * wide, axes)
    if axis_name is not None:
        sums = jax.lax.psum(sums, axis_name)
    n = _count(x, axis_name)
    mean = sums[0] / n
    var = jnp.maximum(sums[1] / n - mean * mean, 0.0)
    inv = jax.lax.rsqrt(var + epsilon)
    outputs = (_normalise(x, mean, inv, scale, bias, dtype or x.dtype), mean, var)
    # The bias's gradient needs only its dtype: an empty array of that dtype stands for it.
    return outputs, (x, mean, inv, scale, jnp.zeros((0,), bias.dtype))


def _batch_norm_backward(epsilon, dtype, axis_name, residuals, cotangents):
    x, mean, inv, scale, bias = residuals
    g = cotangents[0].astype(jnp.float32)  # the statistics' cotangents: no gradient (see above)
    normalised = (x.astype(jnp.float32) - mean) * inv
    d_bias, d_scale = _two_sums(g, g * normalised, tuple(range(x.ndim - 1)))
    totals = (d_bias, d_scale)
    if axis_name is not None:  # the parameters' gradients stay per member, as autodiff's
        totals = jax.lax.psum(totals, axis_name)
    n = _count(x, axis_name)
    dx = (inv * scale.astype(jnp.float32)) * (g - totals[0] / n - normalised * (totals[1] / n))
    return dx.astype(x.dtype), d_scale.astype(scale.dtype), d_bias.astype(bias.dtype)


_batch_norm.defvjp(_batch_norm_forward, _batch_norm_backward)


class BatchNorm(nn.Module):
    """`flax.linen.BatchNorm` over all axes but the last (the features), whose training
    mode is `batch_norm`: the same parameters (`scale`, `bias`), running statistics
    (`batch_stats`: `mean`, `var`), attributes and numbers, with a backward pass that
    reduces once per call instead of twice (see the module docstring). In training mode
    it supports reverse-mode differentiation only.

    Under `jax.jit` with the batch sharded over devices the statistics are the global
    batch's (XLA adds the cross-device sums); under `pmap` or `shard_map`, set `axis_name`.
    """

    use_running_average: bool | None = None
    momentum: float = 0.99
    epsilon: float = 1e-5
    dtype: Any = None
    param_dtype: Any = jnp.float32
    use_bias: bool = True
    use_scale: bool = True
    bias_init: Callable[..., jax.Array] = nn.initializers.zeros_init()
    scale_init: Callable[..., jax.Array] = nn.initializers.ones_init()
    axis_name: str | None = None

    @nn.compact
    def __call__(self, x: jax.Array, use_running_average: bool | None = None) -> jax.Array:
        """x <float>[..., features] -> <dtype>[..., features], normalised with the batch's
        statistics (updating the running ones) or, with `use_running_average`, with the
        running ones."""
        use_running_average = nn.merge_param(
            "use_running_average", self.use_running_average, use_running_average
        )
        shape = (x.shape[-1],)
        ra_mean = self.variable("batch_stats", "mean", lambda s: jnp.zeros(s, jnp.float32), shape)
        ra_var = self.variable("batch_stats", "var", lambda s: jnp.ones(s, jnp.float32), shape)
        params = []  # those that exist set the output dtype with x (as in Flax)
        scale = jnp.ones(shape, self.param_dtype)
        bias = jnp.zeros(shape, self.param_dtype)
        if self.use_scale:
            scale = self.param("scale", self.scale_init, shape, self.param_dtype)
            params.append(scale)
        if self.use_bias:
            bias = self.param("bias", self.bias_init, shape, self.param_dtype)
            params.append(bias)
        dtype = self.dtype or jnp.result_type(x, *params)
        if use_running_average:
            inv = jax.lax.rsqrt(ra_var.value + self.epsilon)
            return _normalise(x, ra_mean.value, inv, scale, bias, dtype)
        # As Flax: initialisation (usually outside the pmap / shard_map) takes no axis.
        axis_name = None if self.is_initializing() else self.axis_name
        y, mean, var = batch_norm(x, scale, bias, self.epsilon, dtype, axis_name)
        if not self.is_initializing():
            mean, var = jax.lax.stop_gradient(mean), jax.lax.stop_gradient(var)
            ra_mean.value = self.momentum * ra_mean.value + (1 - self.momentum) * mean
            ra_var.value = self.momentum * ra_var.value + (1 - self.momentum) * var
        return y


class Dense(nn.Dense):
    """`nn.Dense` (the same attributes, parameters and numbers) that can end in an
    activation: `activation(inputs @ kernel + bias)`, the bias added in the computation
    dtype and the activation computed in float32 and rounded once (as `gelu` and `silu`
    are; the same numbers as `nn.Dense` followed by them), all in one recomputed function.
    Its backward pass keeps only the matmul's output, where a `Dense` followed by `gelu`
    keeps the biased copy that the forward pass then writes besides the activation (for
    BERT-base at batch 256, one [32768, 3072] write less per layer).

    Attributes:
        activation: an elementwise function (e.g. `gelu`, `jax.nn.relu`), or None for a
            plain `nn.Dense`.
    """

    activation: Callable[[jax.Array], jax.Array] | None = None

    @nn.compact
    def __call__(self, inputs: jax.Array) -> jax.Array:
        kernel = self.param(
            "kernel", self.kernel_init, (jnp.shape(inputs)[-1], self.features), self.param_dtype
        )
        bias = None
        if self.use_bias:
            bias = self.param("bias", self.bias_init, (self.features,), self.param_dtype)
        inputs, kernel, bias = self.promote_dtype(inputs, kernel, bias, dtype=self.dtype)
        if self.dot_general_cls is not None:
            dot_general = self.dot_general_cls()
        else:
            dot_general = self.dot_general or jax.lax.dot_general
        y = dot_general(
            inputs, kernel, (((inputs.ndim - 1,), (0,)), ((), ())), precision=self.precision
        )
        if self.activation is not None:
            return _recomputed(y, _elementwise(self.activation), bias)
        return y if bias is None else y + bias


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
            # The whole table (all-gathered where sharded, as FSDP does every kernel) before
            # the lookup: with the table split on embed over `fsdp`, XLA looked up the split
            # rows and then all-gathered the [batch, length, embed] activations and the
            # global batch's gradient of them instead.
            # (Traced only: an eager call's table is on one device already.)
            if isinstance(table, jax.core.Tracer):
                table = nn.with_logical_constraint(table, (None, None))
            rows = jnp.take(table, inputs, axis=0)
        return rows.astype(dtype)
