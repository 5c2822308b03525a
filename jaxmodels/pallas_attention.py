"""Fused attention WITH attention-probability dropout, as Pallas (Triton) GPU kernels.

cuDNN's fused attention in jax takes its dropout seed as a compile-time constant (the same
positions would be dropped at every step), so training with attention dropout, BERT's
recipe, otherwise takes the explicit path: the [batch, heads, q_len, kv_len] logits,
probabilities and dropout mask are written to and read back from memory, forward and
backward. Here, FlashAttention-style, one kernel computes each block of queries against all
keys with an online softmax and never stores the probabilities; the backward pass
recomputes them from the saved log-sum-exp (one kernel for dK/dV, one for dQ). The dropout
mask is a counter-based hash of (seed, batch, head, query, key), recomputed identically in
all three kernels: two rounds of MurmurHash3's 32-bit finaliser keyed by two seed words
drawn from the caller's PRNG key, whose top 16 bits are compared with rate * 2**16 (as in
`jaxmodels.layers.dropout`); kept probabilities are divided by the exact keep probability.

Supported: queries and keys of lengths divisible by 16 (blocks of 64, 32 or 16 rows: the
largest that divides), head_dim a power of two
from 16 to 128, as many key/value heads as query heads, padding given as `kv_lengths`
(`supported`). Matmuls in the inputs' dtype with float32 accumulation; softmax in float32.
On an NVIDIA GPU the kernels compile through Pallas's Triton backend (jax 0.11 deprecates it
in favour of Mosaic GPU); elsewhere they run in Pallas's interpreter (exact, slow: tests).
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from jaxmodels._pallas import call_params, triton_available

__all__ = ["attention", "block", "keep_mask", "supported", "triton_available"]

_BLOCKS = (64, 32, 16)  # rows per block: the largest that divides the length
_MASKED = -1e30  # logits of hidden keys (finite: no inf - inf)
_HALF_WORD = 2**16
_SQ = pl.squeezed  # a block dimension of size 1 that the kernel does not see


def supported(q_len: int, kv_len: int, head_dim: int) -> bool:
    """Whether the kernels take these sizes (see the module docstring)."""
    return (
        q_len % _BLOCKS[-1] == 0
        and kv_len % _BLOCKS[-1] == 0
        and 16 <= head_dim <= 128
        and head_dim & (head_dim - 1) == 0
    )


def block(length: int) -> int:
    """Rows per block for a sequence of `length` (queries per program, keys per step)."""
    return next(b for b in _BLOCKS if length % b == 0)


def _fmix32(x: jax.Array) -> jax.Array:
    """MurmurHash3's 32-bit finaliser (a bijection with full avalanche)."""
    x = x ^ (x >> 16)
    x = x * jnp.uint32(0x85EBCA6B)
    x = x ^ (x >> 13)
    x = x * jnp.uint32(0xC2B2AE35)
    return x ^ (x >> 16)


def keep_mask(seed0: jax.Array, seed1: jax.Array, counter: jax.Array, threshold: int) -> jax.Array:
    """True where the element with this counter (a uint32 index) is kept."""
    x = _fmix32(counter * jnp.uint32(0x9E3779B1) + seed0)
    x = _fmix32(x ^ seed1)
    return (x >> 16) >= jnp.uint32(threshold)


def _counters(b, h, rows, cols, heads: int, q_len: int, kv_len: int) -> jax.Array:
    """The uint32 index of elements (b, h, rows, cols) of [batch, heads, q_len, kv_len]."""
    base = ((b * heads + h) * q_len).astype(jnp.uint32)
    return (base + rows.astype(jnp.uint32)) * jnp.uint32(kv_len) + cols.astype(jnp.uint32)


class _Blocks:
    """Index helpers shared by the three kernels: global row / column ids of a block."""

    def __init__(self, shape: tuple[int, int], row0: Any, col0: Any) -> None:
        self.rows = row0 + jax.lax.broadcasted_iota(jnp.int32, shape, 0)
        self.cols = col0 + jax.lax.broadcasted_iota(jnp.int32, shape, 1)


def _probabilities(q, k, n, blocks, scale):
    """Logits of a [queries, keys] block with hidden keys at _MASKED, and whether each key
    is visible."""
    s = jnp.dot(q, k.T, preferred_element_type=jnp.float32) * scale
    visible = blocks.cols < n
    return jnp.where(visible, s, _MASKED), visible


def _forward_kernel(seed_ref, len_ref, q_ref, k_ref, v_ref, o_ref, lse_ref, *, cfg):
    b, h, i = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    n = len_ref[b]
    q = q_ref[...]
    bq, head_dim = q.shape
    bk = cfg["block_k"]

    def body(j, carry):
        m, denom, acc = carry
        k = k_ref[pl.ds(j * bk, bk), :]
        v = v_ref[pl.ds(j * bk, bk), :]
        blocks = _Blocks((bq, bk), i * bq, j * bk)
        s, visible = _probabilities(q, k, n, blocks, cfg["scale"])
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        alpha = jnp.exp(m - m_new)
        p = jnp.where(visible, jnp.exp(s - m_new[:, None]), 0.0)
        denom = denom * alpha + jnp.sum(p, axis=1)
        if cfg["threshold"]:
            counter = _counters(b, h, blocks.rows, blocks.cols, *cfg["dims"])
            p = jnp.where(keep_mask(seed_ref[0], seed_ref[1], counter, cfg["threshold"]), p, 0.0)
        acc = acc * alpha[:, None] + jnp.dot(
            p.astype(v.dtype), v, preferred_element_type=jnp.float32
        )
        return m_new, denom, acc

    init = (
        jnp.full((bq,), -jnp.inf, jnp.float32),
        jnp.zeros((bq,), jnp.float32),
        jnp.zeros((bq, head_dim), jnp.float32),
    )
    m, denom, acc = jax.lax.fori_loop(0, k_ref.shape[0] // bk, body, init)
    safe_l = jnp.where(denom > 0.0, denom, 1.0)  # a row with no visible key outputs zeros
    o_ref[...] = (acc * (cfg["keep_scale"] / safe_l)[:, None]).astype(o_ref.dtype)
    lse_ref[...] = m + jnp.log(safe_l)


def _grad_block(q, k, v, do, lse, delta, n, blocks, seeds, b, h, cfg):
    """The shared part of both backward kernels for one [queries, keys] block: the dropped
    and rescaled probabilities (for dV) and the logits' gradient dS."""
    s, visible = _probabilities(q, k, n, blocks, cfg["scale"])
    p = jnp.where(visible, jnp.exp(s - lse[:, None]), 0.0)
    dp = jnp.dot(do, v.T, preferred_element_type=jnp.float32)
    if cfg["threshold"]:
        counter = _counters(b, h, blocks.rows, blocks.cols, *cfg["dims"])
        keep = keep_mask(seeds[0], seeds[1], counter, cfg["threshold"])
        p_dropped = jnp.where(keep, p, 0.0) * cfg["keep_scale"]
        dp = jnp.where(keep, dp, 0.0) * cfg["keep_scale"]
    else:
        p_dropped = p
    ds = p * (dp - delta[:, None])
    return p_dropped, ds


def _dkdv_kernel(
    seed_ref, len_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref, *, cfg
):
    b, h, j = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    n = len_ref[b]
    k, v = k_ref[...], v_ref[...]
    bk, head_dim = k.shape
    bq = cfg["block_q"]
    seeds = (seed_ref[0], seed_ref[1])

    def body(i, carry):
        dk, dv = carry
        rows = pl.ds(i * bq, bq)
        q, do = q_ref[rows, :], do_ref[rows, :]
        blocks = _Blocks((bq, bk), i * bq, j * bk)
        p_dropped, ds = _grad_block(
            q, k, v, do, lse_ref[rows], delta_ref[rows], n, blocks, seeds, b, h, cfg
        )
        dv = dv + jnp.dot(p_dropped.astype(do.dtype).T, do, preferred_element_type=jnp.float32)
        dk = dk + jnp.dot(ds.astype(q.dtype).T, q, preferred_element_type=jnp.float32)
        return dk, dv

    zeros = jnp.zeros((bk, head_dim), jnp.float32)
    dk, dv = jax.lax.fori_loop(0, q_ref.shape[0] // bq, body, (zeros, zeros))
    dk_ref[...] = (dk * cfg["scale"]).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def _dq_kernel(seed_ref, len_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref, *, cfg):
    b, h, i = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    n = len_ref[b]
    q, do = q_ref[...], do_ref[...]
    lse, delta = lse_ref[...], delta_ref[...]
    bq, head_dim = q.shape
    bk = cfg["block_k"]
    seeds = (seed_ref[0], seed_ref[1])

    def body(j, dq):
        cols = pl.ds(j * bk, bk)
        k, v = k_ref[cols, :], v_ref[cols, :]
        blocks = _Blocks((bq, bk), i * bq, j * bk)
        _, ds = _grad_block(q, k, v, do, lse, delta, n, blocks, seeds, b, h, cfg)
        return dq + jnp.dot(ds.astype(k.dtype), k, preferred_element_type=jnp.float32)

    dq = jax.lax.fori_loop(0, k_ref.shape[0] // bk, body, jnp.zeros((bq, head_dim), jnp.float32))
    dq_ref[...] = (dq * cfg["scale"]).astype(dq_ref.dtype)


def _params(interpret: bool) -> dict[str, Any]:
    return call_params(
        interpret,
        "the fused attention kernels",
        "attention implementation None or 'xla'",
        num_warps=4,
        num_stages=2,
    )


def _config(q: jax.Array, k: jax.Array, rate: float) -> dict[str, Any]:
    batch, q_len, heads, head_dim = q.shape
    threshold = round(rate * _HALF_WORD)
    if threshold >= _HALF_WORD:
        raise ValueError(f"attention dropout rate must be < 1, got {rate}")
    return {
        "scale": 1.0 / math.sqrt(head_dim),
        "threshold": threshold,
        "keep_scale": _HALF_WORD / (_HALF_WORD - threshold),
        "dims": (heads, q_len, k.shape[1]),
        "block_q": block(q_len),
        "block_k": block(k.shape[1]),
    }


def _row_spec(length: int, head_dim: int, by_program: bool) -> pl.BlockSpec:
    """[batch, length, heads, head_dim] arrays: the program's block of rows, or all rows."""
    if by_program:
        rows = block(length)
        return pl.BlockSpec((_SQ, rows, _SQ, head_dim), lambda b, h, i: (b, i, h, 0))
    return pl.BlockSpec((_SQ, length, _SQ, head_dim), lambda b, h, i: (b, 0, h, 0))


def _stat_spec(length: int, by_program: bool) -> pl.BlockSpec:
    """[batch, heads, length] float32 statistics (log-sum-exp, delta)."""
    if by_program:
        return pl.BlockSpec((_SQ, _SQ, block(length)), lambda b, h, i: (b, h, i))
    return pl.BlockSpec((_SQ, _SQ, length), lambda b, h, i: (b, h, 0))


def _scalar_specs(batch: int) -> list[pl.BlockSpec]:
    return [pl.BlockSpec((2,), lambda b, h, i: (0,)), pl.BlockSpec((batch,), lambda b, h, i: (0,))]


def _forward(q, k, v, seeds, lengths, rate, interpret):
    batch, q_len, heads, head_dim = q.shape
    kv_len = k.shape[1]
    cfg = _config(q, k, rate)
    return pl.pallas_call(
        functools.partial(_forward_kernel, cfg=cfg),
        out_shape=[
            jax.ShapeDtypeStruct(q.shape, q.dtype),
            jax.ShapeDtypeStruct((batch, heads, q_len), jnp.float32),
        ],
        grid=(batch, heads, q_len // block(q_len)),
        in_specs=[
            *_scalar_specs(batch),
            _row_spec(q_len, head_dim, True),
            _row_spec(kv_len, head_dim, False),
            _row_spec(kv_len, head_dim, False),
        ],
        out_specs=[_row_spec(q_len, head_dim, True), _stat_spec(q_len, True)],
        name="attention_forward",
        **_params(interpret),
    )(seeds, lengths, q, k, v)


def _backward(q, k, v, out, lse, seeds, lengths, do, rate, interpret):
    batch, q_len, heads, head_dim = q.shape
    kv_len = k.shape[1]
    cfg = _config(q, k, rate)
    # delta_i = sum_d dO_id O_id: the softmax backward's row term (dropout included).
    delta = jnp.einsum("bqhd,bqhd->bhq", do.astype(jnp.float32), out.astype(jnp.float32))
    args = (seeds, lengths, q, k, v, do, lse, delta)
    dk, dv = pl.pallas_call(
        functools.partial(_dkdv_kernel, cfg=cfg),
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        grid=(batch, heads, kv_len // block(kv_len)),
        in_specs=[
            *_scalar_specs(batch),
            _row_spec(q_len, head_dim, False),
            _row_spec(kv_len, head_dim, True),
            _row_spec(kv_len, head_dim, True),
            _row_spec(q_len, head_dim, False),
            _stat_spec(q_len, False),
            _stat_spec(q_len, False),
        ],
        out_specs=[_row_spec(kv_len, head_dim, True), _row_spec(kv_len, head_dim, True)],
        name="attention_backward_dkdv",
        **_params(interpret),
    )(*args)
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, cfg=cfg),
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        grid=(batch, heads, q_len // block(q_len)),
        in_specs=[
            *_scalar_specs(batch),
            _row_spec(q_len, head_dim, True),
            _row_spec(kv_len, head_dim, False),
            _row_spec(kv_len, head_dim, False),
            _row_spec(q_len, head_dim, True),
            _stat_spec(q_len, True),
            _stat_spec(q_len, True),
        ],
        out_specs=_row_spec(q_len, head_dim, True),
        name="attention_backward_dq",
        **_params(interpret),
    )(*args)
    return dq, dk, dv


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _attention(q, k, v, seeds, lengths, rate, interpret):
    return _forward(q, k, v, seeds, lengths, rate, interpret)[0]


def _attention_fwd(q, k, v, seeds, lengths, rate, interpret):
    out, lse = _forward(q, k, v, seeds, lengths, rate, interpret)
    return out, (q, k, v, out, lse, seeds, lengths)


def _attention_bwd(rate, interpret, residuals, do):
    q, k, v, out, lse, seeds, lengths = residuals
    dq, dk, dv = _backward(q, k, v, out, lse, seeds, lengths, do, rate, interpret)
    return dq, dk, dv, None, None


_attention.defvjp(_attention_fwd, _attention_bwd)


def attention(
    query: jax.Array,
    key: jax.Array,
    value: jax.Array,
    kv_lengths: jax.Array | None = None,
    dropout_rate: float = 0.0,
    dropout_rng: jax.Array | None = None,
    interpret: bool = False,
) -> jax.Array:
    """softmax(Q K^T / sqrt(d)) V with keys past `kv_lengths` hidden and, when
    `dropout_rate` > 0, attention-probability dropout drawn from `dropout_rng`.

    query, key, value: <dtype>[batch, length, heads, head_dim] (`supported` sizes);
    kv_lengths: <int>[batch] or None (all keys). Returns <dtype>[batch, q_len, heads,
    head_dim]; a query with no visible key outputs zeros.
    """
    batch = query.shape[0]
    if not supported(query.shape[1], key.shape[1], query.shape[-1]):
        raise ValueError(
            f"the fused attention kernels take lengths divisible by 16 and head_dim a "
            f"power of two from 16 to 128, got q_len {query.shape[1]}, kv_len {key.shape[1]}, "
            f"head_dim {query.shape[-1]}"
        )
    if key.shape[2] != query.shape[2]:
        raise ValueError("the fused attention kernels need as many key/value heads as heads")
    lengths = (
        jnp.full((batch,), key.shape[1], jnp.int32)
        if kv_lengths is None
        else jnp.asarray(kv_lengths, jnp.int32)
    )
    if dropout_rate > 0.0:
        if dropout_rng is None:
            raise ValueError("attention dropout is active but dropout_rng is None")
        seeds = jax.random.bits(dropout_rng, (2,), jnp.uint32)
    else:
        seeds = jnp.zeros((2,), jnp.uint32)
    return _attention(query, key, value, seeds, lengths, float(dropout_rate), interpret)
