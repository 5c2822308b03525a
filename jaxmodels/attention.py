"""Scaled dot-product attention and multi-head attention with masks and a KV cache.

`dot_product_attention` computes softmax(Q K^T / sqrt(d_k) + bias) V per head on arrays in
the BTNH layout of `jax.nn.dot_product_attention` (batch, length, heads, head_dim), with
three ways to hide keys, which combine:

* `kv_lengths` <int>[batch]: padding; keys at positions >= length get zero weight.
* `mask`: a boolean array broadcastable to [batch, heads, q_len, kv_len], True = attend
  (not 3-D, which reads as [heads, ...] where [batch, ...] is usually meant).
* `causal`: query i sees keys j <= i (+ kv_len - q_len when the queries are the last
  q_len positions of a longer key sequence, as in a KV cache).

Three paths compute it:

* cuDNN flash attention (`jax.nn.dot_product_attention`, implementation "cudnn"), chosen
  automatically on an NVIDIA GPU for bfloat16/float16 inputs when nothing in the call
  needs the explicit path (dropout, weights, a general mask or bias);
* the explicit path (implementation "xla", and the automatic choice everywhere else): the
  softmax in float32, the weights rounded to the values' dtype for the product with V, and
  a hand-written backward pass that keeps those weights (not the float32 logits) for the
  gradient (see `_explicit_attention`). It does attention-probability dropout and returns
  the weights. A query whose keys are all hidden gets weight 0 everywhere and outputs
  zeros, never NaN;
* `implementation="pallas"`: fused kernels WITH dropout (`jaxmodels.pallas_attention`,
  FlashAttention-style, nothing of size q_len x kv_len stored), for padding given as
  `kv_lengths` and no other mask, bias or causality; attention weights still take the
  explicit path. `MultiHeadAttention`'s self-attention hands the kernels its one
  query/key/value matmul's output and their biases as they are
  (`pallas_attention.packed_attention`): no kernel adds the biases or splits Q, K and V.

`MultiHeadAttention` projects inputs to heads with `DenseGeneral` layers named `query`,
`key`, `value` (kernels <[embed, heads, head_dim]>) and `out` (<[heads, head_dim, embed]>),
all carrying logical axis names, and keeps an optional KV cache for autoregressive decoding.

Example:
    >>> import jax, jax.numpy as jnp
    >>> q = k = v = jnp.ones((2, 5, 4, 8))  # [batch, length, heads, head_dim]
    >>> dot_product_attention(q, k, v, kv_lengths=jnp.array([5, 3]), causal=True).shape
    (2, 5, 4, 8)
    >>> mha = MultiHeadAttention(num_heads=4)
    >>> x = jnp.ones((2, 5, 32))
    >>> variables = mha.init(jax.random.key(0), x)
    >>> variables["params"]["query"]["kernel"].value.shape  # [embed, heads, head_dim]
    (32, 4, 8)
    >>> mha.apply(variables, x, causal=True).shape
    (2, 5, 32)
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxmodels._pallas import on_nvidia_gpu as _on_nvidia_gpu
from jaxmodels.layers import dropout_mask, keep_probability, match_varying

__all__ = ["IMPLEMENTATIONS", "dot_product_attention", "MultiHeadAttention", "combine_masks"]

Dtype = Any
Array = jax.Array

IMPLEMENTATIONS = (None, "xla", "cudnn", "pallas")

# Logical axis names of the activations and parameters.
QKV_AXES = ("batch", "length", "heads", "kv")
OUT_AXES = ("batch", "length", "embed")


def combine_masks(*masks: Array | None) -> Array | None:
    """Logical AND of boolean (or 0/1 integer) masks (None entries ignored); None when all
    are None. A float mask is refused (see `dot_product_attention`'s `mask`)."""
    masks = [_as_mask(m) for m in masks if m is not None]
    if not masks:
        return None
    out = masks[0]
    for m in masks[1:]:
        out = jnp.logical_and(out, m)
    return out


def _to_4d(x: Array, name: str, full: tuple[int, int, int, int]) -> Array:
    """`x` (`mask` or `bias`) as a 4-D array broadcastable to `full`, [batch, heads, q_len,
    kv_len]. A 3-D mask is refused, as [batch, q, kv] would be read as [heads, q, kv]; a
    3-D bias is [heads, q, kv] (relative positions, ALiBi)."""
    x = jnp.asarray(x)
    if x.ndim == 3 and name == "mask":
        raise ValueError(
            f"mask has shape {x.shape}: a 3-D mask reads as [heads, q_len, kv_len], which "
            "is rarely what is meant; give [batch, 1, q_len, kv_len] (mask[:, None]) or "
            "[1, heads, q_len, kv_len] (mask[None])"
        )
    trailing = zip(x.shape[::-1], full[::-1], strict=False)  # as numpy broadcasts
    if x.ndim > 4 or any(d not in (1, f) for d, f in trailing):
        raise ValueError(
            f"{name} has shape {x.shape}, which does not broadcast to [batch, heads, q_len, "
            f"kv_len] = {list(full)}"
        )
    return x.reshape((1,) * (4 - x.ndim) + x.shape)


def _as_mask(mask: Array) -> Array:
    """A boolean mask; a floating-point one (an additive mask, 0 / -inf?) is refused: cast
    to bool it would attend to exactly what it hides."""
    mask = jnp.asarray(mask)
    if jnp.issubdtype(mask.dtype, jnp.floating):
        raise ValueError(
            f"mask has dtype {mask.dtype}: a mask is boolean (or 0/1 integers), True = attend; "
            "an additive mask (0 to attend, a large negative number to hide) goes in `bias`"
        )
    return mask.astype(bool)


def _causal_mask(q_len: int, kv_len: int) -> Array:
    """[1, 1, q_len, kv_len]: query i sees keys j <= i + (kv_len - q_len)."""
    offset = kv_len - q_len
    q = jnp.arange(q_len)[:, None]
    k = jnp.arange(kv_len)[None, :]
    return (k <= q + offset)[None, None]


def _lengths_mask(kv_lengths: Array, kv_len: int) -> Array:
    """[batch, 1, 1, kv_len]: key j is visible when j < kv_lengths[b]."""
    return (jnp.arange(kv_len)[None, :] < jnp.asarray(kv_lengths)[:, None])[:, None, None, :]


def _auto_implementation(query: Array, key: Array, needs_xla: bool) -> str:
    """cuDNN on an NVIDIA GPU for half-precision inputs it supports; XLA otherwise."""
    head_dim = query.shape[-1]
    if (
        not needs_xla
        and query.dtype in (jnp.bfloat16, jnp.float16)
        and query.dtype == key.dtype
        and head_dim % 8 == 0
        and head_dim <= 128
        and _on_nvidia_gpu()
    ):
        return "cudnn"
    return "xla"


def _refuse_drawn_mask(use_dropout: bool, dropout_keep: Array | None) -> None:
    """The fused kernels draw their own dropout bits: a mask drawn before has no place."""
    if use_dropout and dropout_keep is not None:
        raise ValueError(
            "implementation='pallas' draws its dropout bits in its kernels; pass "
            "dropout_rng (MultiHeadAttention: the 'dropout' RNG), not dropout_keep"
        )


def _partitioned(
    init: Callable[..., Array], shape: tuple[int, ...], names: tuple[str, ...]
) -> Callable[..., Array]:
    """A `DenseGeneral` initialiser carrying logical names for a kernel/bias of `shape`.

    `DenseGeneral` calls its initialiser with a flattened 2D (kernel) or 1D (bias) shape and
    reshapes afterwards; a plain `nn.with_logical_partitioning` would then constrain the
    flat array with the names of the full one, which fails under logical axis rules
    (google/flax#3676). Here the value is reshaped to `shape` before it is boxed, so the
    numbers are exactly `DenseGeneral`'s (fan-in and fan-out from the flat shape).
    """

    def reshaped(key: Array, flat_shape: tuple[int, ...], dtype: Dtype = jnp.float32) -> Array:
        return jnp.reshape(init(key, flat_shape, dtype), shape)

    return nn.with_logical_partitioning(reshaped, names)


def _check_inputs(query: Array, key: Array, value: Array, implementation: str | None) -> None:
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(
            f"unknown attention implementation {implementation!r}; choose one of "
            f"{IMPLEMENTATIONS} (None picks cudnn on an NVIDIA GPU, else xla)"
        )
    if query.ndim != 4 or key.ndim != 4 or value.ndim != 4:
        raise ValueError(
            "query, key and value must be [batch, length, heads, head_dim]; got shapes "
            f"{query.shape}, {key.shape}, {value.shape}"
        )
    if key.shape != value.shape:
        raise ValueError(f"key and value shapes differ: {key.shape} vs {value.shape}")
    if query.shape[0] != key.shape[0] or query.shape[-1] != key.shape[-1]:
        raise ValueError(
            f"query {query.shape} and key {key.shape} must agree on batch and head_dim"
        )
    if query.shape[2] % key.shape[2]:
        raise ValueError(
            f"query heads ({query.shape[2]}) must be a multiple of key/value heads ({key.shape[2]})"
        )


def _weights(query: Array, key: Array, bias: Array | None, mask: Array | None) -> Array:
    """<float32>[batch, heads, q_len, kv_len]: softmax(Q K^T / sqrt(d) + bias) in float32,
    zero where `mask` hides a key (a query whose keys are all hidden gets zeros)."""
    scale = 1.0 / np.sqrt(query.shape[-1])
    logits = jnp.einsum("bqhd,bkhd->bhqk", query, key, preferred_element_type=jnp.float32)
    logits = logits.astype(jnp.float32) * scale
    if bias is not None:
        logits = logits + bias.astype(jnp.float32)
    if mask is not None:
        logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    weights = jax.nn.softmax(logits, axis=-1)
    # Rows with every key hidden would be uniform after the softmax: make them zero.
    return weights if mask is None else jnp.where(mask, weights, 0.0)


def _dropped(weights: Array, keep: Array | None, keep_prob: float, dtype: Dtype) -> Array:
    """The weights after dropout (kept ones divided by `keep_prob` in float32), in `dtype`."""
    if keep is None:
        return weights.astype(dtype)
    scaled = weights.astype(jnp.float32) / np.float32(keep_prob)
    return jnp.where(keep, scaled, 0.0).astype(dtype)


def _weighted_values(probs: Array, value: Array, dtype: Dtype) -> Array:
    out = jnp.einsum(
        "bhqk,bkhd->bqhd",
        probs.astype(value.dtype),
        value,
        preferred_element_type=jnp.promote_types(value.dtype, jnp.float32),
    )
    return out.astype(dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _softmax_attention(
    query: Array,
    key: Array,
    value: Array,
    bias: Array | None,
    mask: Array | None,
    keep: Array | None,
    keep_prob: float,
) -> Array:
    """softmax(Q K^T / sqrt(d) + bias), dropout (`keep`, kept weights / `keep_prob`), times V:
    the explicit path's training form, whose backward pass keeps the weights in the values'
    dtype instead of the float32 logits (see `_explicit_attention`)."""
    weights = _weights(query, key, bias, mask).astype(value.dtype)
    return _weighted_values(_dropped(weights, keep, keep_prob, value.dtype), value, query.dtype)


def _softmax_attention_fwd(query, key, value, bias, mask, keep, keep_prob):
    # The barrier keeps XLA from recomputing the weights in the backward pass from the
    # float32 logits (which it would then keep instead).
    weights = jax.lax.optimization_barrier(_weights(query, key, bias, mask).astype(value.dtype))
    out = _weighted_values(_dropped(weights, keep, keep_prob, value.dtype), value, query.dtype)
    return out, (query, key, value, bias, mask, keep, weights)


def _softmax_attention_bwd(keep_prob, residuals, d_out):
    query, key, value, bias, mask, keep, weights = residuals
    f32 = jnp.float32
    probs = _dropped(weights, keep, keep_prob, value.dtype)
    d_value = jnp.einsum(
        "bhqk,bqhd->bkhd", probs, d_out.astype(value.dtype), preferred_element_type=f32
    )
    # bfloat16 has float32's range; a float16 dP could overflow under loss scaling.
    dp_dtype = value.dtype if value.dtype == jnp.bfloat16 else jnp.promote_types(value.dtype, f32)
    d_probs = jnp.einsum(
        "bqhd,bkhd->bhqk", d_out.astype(value.dtype), value, preferred_element_type=dp_dtype
    )
    d_weights = _dropped(d_probs, keep, keep_prob, f32)
    row = jnp.sum(weights.astype(f32) * d_weights, axis=-1, keepdims=True)
    d_logits = weights.astype(f32) * (d_weights - row)
    d_bias = None
    if bias is not None:
        summed = tuple(i for i, n in enumerate(bias.shape) if n == 1 and d_logits.shape[i] != 1)
        d_bias = d_logits.sum(axis=summed, keepdims=True).astype(bias.dtype)
    scale = 1.0 / np.sqrt(query.shape[-1])
    d_scores = (d_logits * scale).astype(query.dtype)
    d_query = jnp.einsum("bhqk,bkhd->bqhd", d_scores, key, preferred_element_type=f32)
    d_key = jnp.einsum("bhqk,bqhd->bkhd", d_scores, query, preferred_element_type=f32)
    return (
        d_query.astype(query.dtype),
        d_key.astype(key.dtype),
        d_value.astype(value.dtype),
        d_bias,
        None,
        None,
    )


_softmax_attention.defvjp(_softmax_attention_fwd, _softmax_attention_bwd)


def _explicit_attention(
    query: Array,
    key: Array,
    value: Array,
    bias: Array | None,
    mask: Array | None,
    dropout_rate: float,
    dropout_rng: Array | None,
    return_weights: bool = False,
    dropout_keep: Array | None = None,
) -> Array | tuple[Array, Array]:
    """softmax(QK^T/sqrt(d) + bias) V with the softmax in float32; with `return_weights`,
    also the float32 weights (before dropout). The dropout mask is `dropout_keep` if given,
    else drawn with `dropout_rng`.

    The weights are rounded to the values' dtype before dropout and the product with V.
    Without `return_weights` the gradient is hand-written (`_softmax_attention`): the
    backward pass keeps those rounded weights and the dropout mask, where differentiating
    the forward keeps the float32 logits (and XLA then recomputes the softmax from them in
    the backward pass), and the gradient of the dropped weights (dO V^T) comes out of its
    matmul in bfloat16 for bfloat16 values, as under PyTorch's autocast (float32 otherwise);
    the softmax's backward is computed in float32. With float32 inputs it is the exact
    gradient. For BERT-base training (batch 256, seq 128, bfloat16) this takes the step's
    kernel I/O from 137.0 to 127.3 GB and its temporary memory from 15.1 to 13.9 GiB
    (`benchmarks.compiled`, H200).
    """
    groups = query.shape[2] // key.shape[2]
    if groups > 1:  # grouped-query attention: share each key/value head among `groups`
        key = jnp.repeat(key, groups, axis=2)
        value = jnp.repeat(value, groups, axis=2)
    keep, keep_prob = None, keep_probability(dropout_rate)
    if keep_prob < 1.0:
        shape = (query.shape[0], query.shape[2], query.shape[1], key.shape[1])
        if dropout_keep is None:
            keep = dropout_mask(dropout_rng, dropout_rate, shape)
        elif dropout_keep.shape != shape or dropout_keep.dtype != jnp.bool_:
            raise ValueError(
                f"dropout_keep is {dropout_keep.dtype}{list(dropout_keep.shape)}; pass "
                f"bool{list(shape)} (batch, heads, q_len, kv_len), e.g. from "
                "layers.dropout_mask"
            )
        else:
            keep = dropout_keep
        keep_prob = max(keep_prob, 2**-16)  # rate 1 keeps nothing: no 0 / 0
    if not return_weights:
        query, key, value, bias = match_varying(query, key, value, bias)
        return _softmax_attention(query, key, value, bias, mask, keep, keep_prob)
    weights = _weights(query, key, bias, mask)
    probs = _dropped(weights.astype(value.dtype), keep, keep_prob, value.dtype)
    return _weighted_values(probs, value, query.dtype), weights


def dot_product_attention(
    query: Array,
    key: Array,
    value: Array,
    *,
    bias: Array | None = None,
    mask: Array | None = None,
    kv_lengths: Array | None = None,
    causal: bool = False,
    implementation: str | None = None,
    dropout_rate: float = 0.0,
    dropout_rng: Array | None = None,
    deterministic: bool = True,
    return_weights: bool = False,
    dropout_keep: Array | None = None,
) -> Array | tuple[Array, Array]:
    """Scaled dot-product attention, softmax(Q K^T / sqrt(d_k) + bias) V, per head.

    Args:
        query: <dtype>[batch, q_len, heads, head_dim].
        key: <dtype>[batch, kv_len, kv_heads, head_dim]; kv_heads divides heads (equal for
            ordinary multi-head attention, fewer for grouped-query attention).
        value: <dtype>[batch, kv_len, kv_heads, head_dim].
        bias: optional additive logits bias, broadcastable to [batch, heads, q_len, kv_len].
        mask: optional <bool> (or 0/1 integer) array broadcastable to [batch, heads,
            q_len, kv_len], not 3-D; True = attend. A float mask (additive) is refused:
            that is a `bias`.
        kv_lengths: optional <int>[batch] number of real keys per sequence; keys at
            positions >= length get zero weight (right padding).
        causal: query i attends to keys j <= i + (kv_len - q_len), i.e. the queries are
            the last q_len positions of the key sequence (q_len == kv_len: j <= i).
        implementation: None (auto: "cudnn" on an NVIDIA GPU for bfloat16/float16 inputs
            when no feature of the call needs the explicit path, else "xla"), "xla" (the
            explicit path), "cudnn" or "pallas" (fused kernels with dropout: see the module
            docstring; Pallas's interpreter off an NVIDIA GPU).
        dropout_rate: attention-probability dropout rate, applied only when
            `deterministic` is False.
        dropout_rng: PRNG key for the dropout; required when dropout is active, unless
            `dropout_keep` is given.
        deterministic: True disables dropout (evaluation).
        return_weights: also return the attention weights (before dropout).
        dropout_keep: a <bool>[batch, heads, q_len, kv_len] dropout mask drawn before
            (`layers.dropout_mask` with `dropout_rate`), used instead of `dropout_rng`
            (e.g. one slice of the masks of all layers drawn at once); explicit path only.

    Dropout and `return_weights` use the explicit path (float32 softmax, weights
    materialised) whatever `implementation` says, except that "pallas" does dropout in its
    fused kernels. The explicit and "pallas" paths output zeros for a query row whose keys
    are all hidden. The explicit path's gradient is hand-written (a custom VJP), so it has
    no forward-mode derivative (`jax.jvp`).

    Returns:
        <dtype of query>[batch, q_len, heads, head_dim], and with `return_weights` also
        <float32>[batch, heads, q_len, kv_len] attention weights.

    Example:
        >>> import jax.numpy as jnp
        >>> q = k = v = jnp.ones((1, 3, 2, 4))
        >>> out, w = dot_product_attention(q, k, v, causal=True, return_weights=True)
        >>> w[0, 0, :2].tolist()  # [batch, heads, q_len, kv_len]
        [[1.0, 0.0, 0.0], [0.5, 0.5, 0.0]]
    """
    query, key, value = jnp.asarray(query), jnp.asarray(key), jnp.asarray(value)
    _check_inputs(query, key, value, implementation)
    batch, q_len, _, _ = query.shape
    kv_len = key.shape[1]
    if kv_lengths is not None:
        kv_lengths = jnp.asarray(kv_lengths)
        if kv_lengths.shape != (batch,):
            raise ValueError(
                f"kv_lengths has shape {kv_lengths.shape}; pass one length per sequence, "
                f"<int>[{batch}]"
            )
        kv_lengths = kv_lengths.astype(jnp.int32)
    full = (batch, query.shape[2], q_len, kv_len)
    if mask is not None:
        mask = _to_4d(_as_mask(mask), "mask", full)
    if bias is not None:
        bias = _to_4d(bias, "bias", full)
    use_dropout = dropout_rate > 0.0 and not deterministic
    if use_dropout and dropout_rng is None and dropout_keep is None:
        raise ValueError(
            "attention dropout is active (deterministic=False) but dropout_rng is None; "
            "pass a PRNG key"
        )

    if implementation == "pallas" and not return_weights:
        _refuse_drawn_mask(use_dropout, dropout_keep)
        from jaxmodels import pallas_attention

        unsupported = [
            name
            for name, used in (("mask", mask), ("bias", bias), ("causal", causal or None))
            if used is not None
        ]
        if unsupported:
            raise ValueError(
                f"implementation='pallas' takes padding as kv_lengths only, not "
                f"{', '.join(unsupported)}; use implementation None or 'xla'"
            )
        return pallas_attention.attention(
            query,
            key,
            value,
            kv_lengths,
            dropout_rate if use_dropout else 0.0,
            dropout_rng,
        )

    # jax's causal mask is aligned top-left (j <= i); with fewer queries than keys the
    # queries are the *last* positions, so pass that case as an explicit mask.
    is_causal = causal and q_len == kv_len
    if causal and not is_causal:
        mask = combine_masks(mask, _causal_mask(q_len, kv_len))
    if implementation is None:
        needs_xla = mask is not None or bias is not None or use_dropout or return_weights
        implementation = _auto_implementation(query, key, needs_xla)
    if implementation != "cudnn" or use_dropout or return_weights:
        full_mask = combine_masks(
            mask,
            _causal_mask(q_len, kv_len) if is_causal else None,
            _lengths_mask(kv_lengths, kv_len) if kv_lengths is not None else None,
        )
        return _explicit_attention(
            query,
            key,
            value,
            bias,
            full_mask,
            dropout_rate if use_dropout else 0.0,
            dropout_rng,
            return_weights,
            dropout_keep,
        )
    if not _on_nvidia_gpu():
        raise ValueError(
            "implementation='cudnn' needs an NVIDIA GPU (default backend is "
            f"{jax.default_backend()!r}); use implementation=None or 'xla'"
        )
    # cuDNN wants a bias/mask with full [q_len, kv_len] trailing dimensions.
    if mask is not None:
        mask = jnp.broadcast_to(mask, mask.shape[:2] + (q_len, kv_len))
    if bias is not None:
        bias = jnp.broadcast_to(bias, bias.shape[:2] + (q_len, kv_len))
    return jax.nn.dot_product_attention(
        query,
        key,
        value,
        bias=bias,
        mask=mask,
        is_causal=is_causal,
        key_value_seq_lengths=kv_lengths,
        implementation="cudnn",
    )


class _HeadsProjection(nn.Module):
    """The parameters of `nn.DenseGeneral(features=heads, axis=-1)` on `in_features` inputs
    (kernel [in_features, *heads], bias [*heads]), initialised as it does (from the
    flattened shapes), for projections computed together."""

    in_features: int
    heads: tuple[int, int]
    use_bias: bool
    param_dtype: Dtype
    kernel_init: Callable[..., Array]
    bias_init: Callable[..., Array]

    @nn.compact
    def __call__(self) -> tuple[Array, Array | None]:
        flat = math.prod(self.heads)
        kernel = self.param(
            "kernel",
            lambda key, _, dtype: self.kernel_init(key, (self.in_features, flat), dtype),
            (self.in_features, *self.heads),
            self.param_dtype,
        )
        bias = None
        if self.use_bias:
            bias = self.param(
                "bias",
                lambda key, _, dtype: self.bias_init(key, (flat,), dtype),
                self.heads,
                self.param_dtype,
            )
        return kernel, bias


class MultiHeadAttention(nn.Module):
    """Multi-head attention: project to heads, attend, project back.

    Parameters (logical axes in brackets): `query`, `key`, `value`: `kernel`
    <[embed, heads, head_dim]> ('embed', 'heads', 'kv') and `bias` <[heads, head_dim]>
    ('heads', 'kv'); `out`: `kernel` <[heads, head_dim, out_features]>
    ('heads', 'kv', 'embed') and `bias` <[out_features]> ('embed',). A PyTorch/Hugging Face
    projection weight W <[heads * head_dim, embed]> maps as
    `kernel = W.T.reshape(embed, heads, head_dim)`, and an output projection
    W <[embed, heads * head_dim]> as `kernel = W.T.reshape(heads, head_dim, embed)`.
    In self-attention (no `inputs_kv`) the three input projections run as one matmul on
    their stacked kernels: the input is read once, and the backward pass computes its
    gradient in one matmul instead of three summed ones (fewer, larger kernels).

    KV cache (`decode=True`): the `cache` collection holds `cached_key` and `cached_value`
    <[batch, max_len, heads, head_dim]> and `cache_index` <int32>[batch], the next position
    to write for each sequence. Create it with `init` on a [batch, max_len, embed] input
    (that pass is an ordinary causal self-attention); afterwards each `apply(...,
    mutable=["cache"])` with a [batch, chunk, embed] input (chunk = 1 for token-by-token
    decoding, or a whole prompt) writes the chunk's keys/values at `cache_index` and lets
    the token at position p attend to the cached positions <= p. In decode mode
    `kv_lengths` <int>[batch] says how many of the chunk's tokens are real (right-padded
    prompts of different lengths): each sequence's `cache_index` advances by that many
    (default: the chunk length), so the padding is overwritten by the next tokens before
    anything attends to it. Writing beyond max_len is an error outside `jit`; under `jit`
    it is not checked (the write would land on the last positions).

    Attributes:
        num_heads: number of attention heads.
        head_dim: size of each head; default `features // num_heads`.
        out_features: output size; default the input's feature size.
        use_bias: add biases in the four projections.
        dropout_rate: attention-probability dropout in training. With implementation
            "pallas" (and no `return_weights`) it runs in the fused kernels; otherwise
            it makes the call take the explicit path whatever `implementation` says.
        implementation: None (auto), "xla", "cudnn" or "pallas"; see
            `dot_product_attention`. "pallas" (fused kernels, dropout included) takes
            padding as `kv_lengths` only: a `mask`, `causal` or `decode` is an error
            with it, except with `return_weights`, which takes the explicit path. In
            self-attention the kernels read the one query/key/value matmul's output and
            add its biases as they load it (`pallas_attention.packed_attention`).
        dtype: computation dtype (activations, attention inputs, cache).
        param_dtype: parameter storage dtype.
        kernel_init: projection kernel initialiser (default N(0, 0.02), as BERT).
        decode: keep a KV cache for autoregressive decoding (self-attention only).
        bias_init: projection bias initialiser (default zeros).
    """

    num_heads: int
    head_dim: int | None = None
    out_features: int | None = None
    use_bias: bool = True
    dropout_rate: float = 0.0
    implementation: str | None = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    kernel_init: Callable[..., Array] = nn.initializers.normal(0.02)
    decode: bool = False
    bias_init: Callable[..., Array] = nn.initializers.zeros_init()

    @nn.compact
    def __call__(
        self,
        inputs_q: Array,
        inputs_kv: Array | None = None,
        *,
        kv_lengths: Array | None = None,
        mask: Array | None = None,
        causal: bool = False,
        deterministic: bool = True,
        return_weights: bool = False,
        dropout_keep: Array | None = None,
    ) -> Array | tuple[Array, Array]:
        """Attends from `inputs_q` to `inputs_kv` (itself when None).

        Args:
            inputs_q: <float>[batch, q_len, embed].
            inputs_kv: <float>[batch, kv_len, embed_kv], or None for self-attention.
            kv_lengths: <int>[batch] real keys per sequence (right padding); in decode
                mode, the real tokens of this chunk (see the class docstring).
            mask: <bool> broadcastable to [batch, heads, q_len, kv_len]; True = attend.
                In decode mode kv_len is the cache length.
            causal: no attending to later positions (implied in decode mode).
            deterministic: True disables dropout; False needs a 'dropout' PRNG stream.
            return_weights: also return <float32>[batch, heads, q_len, kv_len] weights.
            dropout_keep: the attention dropout's <bool>[batch, heads, q_len, kv_len]
                mask drawn before (see `dot_product_attention`), instead of drawing one
                from the 'dropout' stream; not with implementation "pallas".

        Returns:
            <dtype>[batch, q_len, out_features], or (that, weights).
        """
        if inputs_kv is None:
            inputs_kv = inputs_q
        elif self.decode:
            raise ValueError(
                "decode=True caches self-attention keys/values; pass inputs_kv=None, or "
                "use decode=False for cross-attention"
            )
        features = inputs_q.shape[-1]
        head_dim = self.head_dim
        if head_dim is None:
            if features % self.num_heads:
                raise ValueError(
                    f"features ({features}) not divisible by num_heads ({self.num_heads}); "
                    "set head_dim explicitly"
                )
            head_dim = features // self.num_heads
        out_features = self.out_features or features

        def projection(name: str, in_features: int) -> nn.DenseGeneral:
            heads = (self.num_heads, head_dim)
            kernel_init, bias_init = self._projection_inits(in_features, heads)
            return nn.DenseGeneral(
                features=heads,
                axis=-1,
                use_bias=self.use_bias,
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                kernel_init=kernel_init,
                bias_init=bias_init,
                name=name,
            )

        kv_features = inputs_kv.shape[-1]
        dropout_rng = None
        if self.dropout_rate > 0.0 and not deterministic and dropout_keep is None:
            dropout_rng = self.make_rng("dropout")
        if inputs_kv is inputs_q:
            qkv, bias = self._self_projections(inputs_q, head_dim)
            if self.implementation == "pallas" and not (
                self.decode or return_weights or causal or mask is not None
            ):
                # The fused kernels read Q, K and V from the projection matmul's output and
                # add the bias themselves: no kernel in between.
                from jaxmodels import pallas_attention

                _refuse_drawn_mask(self.dropout_rate > 0.0 and not deterministic, dropout_keep)
                qkv = nn.with_logical_constraint(qkv, (*QKV_AXES[:2], None, *QKV_AXES[2:]))
                rate = self.dropout_rate if dropout_rng is not None else 0.0
                x = pallas_attention.packed_attention(qkv, bias, kv_lengths, rate, dropout_rng)
                return self._output(x, out_features, head_dim, None, return_weights)
            if bias is not None:
                qkv = qkv + bias
            query, key, value = (qkv[..., i, :, :] for i in range(3))
        else:
            query = projection("query", features)(inputs_q)
            key = projection("key", kv_features)(inputs_kv)
            value = projection("value", kv_features)(inputs_kv)
        query = nn.with_logical_constraint(query, QKV_AXES)
        key = nn.with_logical_constraint(key, QKV_AXES)
        value = nn.with_logical_constraint(value, QKV_AXES)

        if self.decode:
            key, value, mask, kv_lengths, causal = self._use_cache(key, value, mask, kv_lengths)

        result = dot_product_attention(
            query,
            key,
            value,
            mask=mask,
            kv_lengths=kv_lengths,
            causal=causal,
            implementation=self.implementation,
            dropout_rate=self.dropout_rate,
            dropout_rng=dropout_rng,
            deterministic=deterministic,
            return_weights=return_weights,
            dropout_keep=dropout_keep,
        )
        x, weights = result if return_weights else (result, None)
        return self._output(x, out_features, head_dim, weights, return_weights)

    def _output(
        self,
        x: Array,
        out_features: int,
        head_dim: int,
        weights: Array | None,
        return_weights: bool,
    ) -> Array | tuple[Array, Array]:
        """The output projection of the attended values <[batch, q_len, heads, head_dim]>
        (and `weights` with `return_weights`)."""
        x = nn.with_logical_constraint(x, QKV_AXES)
        out = nn.DenseGeneral(
            features=out_features,
            axis=(-2, -1),
            use_bias=self.use_bias,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            kernel_init=_partitioned(
                self.kernel_init, (self.num_heads, head_dim, out_features), ("heads", "kv", "embed")
            ),
            bias_init=nn.with_logical_partitioning(self.bias_init, ("embed",)),
            name="out",
        )(x)
        out = nn.with_logical_constraint(out, OUT_AXES)
        return (out, weights) if return_weights else out

    def _projection_inits(
        self, in_features: int, heads: tuple[int, int]
    ) -> tuple[Callable[..., Array], Callable[..., Array]]:
        """The (kernel, bias) initialisers of a query/key/value projection, with their
        logical axes."""
        return (
            _partitioned(self.kernel_init, (in_features, *heads), ("embed", "heads", "kv")),
            _partitioned(self.bias_init, heads, ("heads", "kv")),
        )

    def _self_projections(self, x: Array, head_dim: int) -> tuple[Array, Array | None]:
        """Self-attention's query, key and value projections as ONE matmul (one read of `x`
        forward, one input-gradient matmul backward), with the parameters of three
        `DenseGeneral`s (same names, shapes, initial values and logical axes).

        Returns (<dtype>[batch, length, 3, heads, head_dim] queries, keys and values before
        their bias, the bias <dtype>[3, heads, head_dim] or None without biases)."""
        heads = (self.num_heads, head_dim)
        inits = self._projection_inits(x.shape[-1], heads)
        kernels, biases = [], []
        for name in ("query", "key", "value"):
            kernel, bias = _HeadsProjection(
                x.shape[-1], heads, self.use_bias, self.param_dtype, *inits, name=name
            )()
            kernels.append(kernel)
            biases.append(bias)
        # Stacked on a new axis (not along heads), so a heads-sharded kernel stays local.
        kernel = jnp.stack(kernels, axis=1).astype(self.dtype)  # [embed, 3, heads, head_dim]
        x = x.astype(self.dtype)
        qkv = jax.lax.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())))
        return qkv, jnp.stack(biases).astype(self.dtype) if self.use_bias else None

    def _use_cache(
        self, key: Array, value: Array, mask: Array | None, kv_lengths: Array | None
    ) -> tuple[Array, Array, Array | None, Array | None, bool]:
        """Writes the chunk into the cache; returns what to attend to."""
        batch, chunk = key.shape[:2]
        initialized = self.has_variable("cache", "cached_key")
        if not initialized and not self.is_initializing():
            # (else this call would run as `init`'s sizing pass: plain attention, position 0)
            raise ValueError(
                "decode mode without a KV cache: create it with `transformer.init_cache` (or "
                "`init` of the decoding module, e.g. `lm.clone(decode=True)`, on a [batch, "
                "total_len] input) and pass it as the `cache` collection, mutable: "
                "apply({'params': ..., 'cache': ...}, ..., mutable=['cache'])"
            )
        cached_key = self.variable("cache", "cached_key", jnp.zeros, key.shape, key.dtype)
        cached_value = self.variable("cache", "cached_value", jnp.zeros, value.shape, value.dtype)
        cache_index = self.variable("cache", "cache_index", lambda: jnp.zeros((batch,), jnp.int32))
        if not initialized:  # sizing pass of `init`: plain causal self-attention
            return key, value, mask, kv_lengths, True
        max_len = cached_key.value.shape[1]
        if chunk > max_len:
            raise ValueError(f"decode chunk of {chunk} tokens exceeds the cache length {max_len}")
        index = cache_index.value
        if not isinstance(index, jax.core.Tracer) and int(jnp.max(index)) + chunk > max_len:
            raise ValueError(
                f"decoding past the cache: a chunk of {chunk} token(s) at position "
                f"{int(jnp.max(index))} needs {int(jnp.max(index)) + chunk} positions, the "
                f"cache holds {max_len}; create the cache with a longer input (init_cache)"
            )
        write = jax.vmap(lambda c, u, i: jax.lax.dynamic_update_slice(c, u, (i, 0, 0)))
        cached_key.value = write(cached_key.value, key.astype(cached_key.value.dtype), index)
        cached_value.value = write(
            cached_value.value, value.astype(cached_value.value.dtype), index
        )
        step = chunk if kv_lengths is None else jnp.asarray(kv_lengths, jnp.int32)
        cache_index.value = index + step
        # The chunk's token t sits at position index + t and sees cached positions <= it.
        positions = index[:, None] + jnp.arange(chunk)[None, :]  # [batch, chunk]
        visible = jnp.arange(max_len)[None, None, :] <= positions[:, :, None]
        mask = combine_masks(mask, visible[:, None])  # [batch, 1, chunk, max_len]
        return cached_key.value, cached_value.value, mask, None, False
