"""Fused attention WITH attention-probability dropout, as Pallas (Triton) GPU kernels.

cuDNN's fused attention in jax takes its dropout seed as a compile-time constant (the same
positions would be dropped at every step), so training with attention dropout, BERT's
recipe, otherwise takes the explicit path: the [batch, heads, q_len, kv_len] logits,
probabilities and dropout mask are written to and read back from memory, forward and
backward. Here, FlashAttention-style, one kernel computes each block of queries against all
keys with an online softmax and never stores the probabilities; the backward pass
recomputes them from the saved log-sum-exp (one kernel for dK/dV, one for dQ). The dropout
mask is a counter-based hash, recomputed identically in all three kernels: the element's
index within its [q_len, kv_len] matrix goes through MurmurHash3's 32-bit finaliser with one
seed word, then again xor a key of its (batch, head) matrix derived from the other seed
word (both words drawn from the caller's PRNG key); the top 16 bits are compared with
rate * 2**16 (as in `jaxmodels.layers.dropout`) and kept probabilities are divided by the
exact keep probability. On a sharded batch the kernels run per shard (`jax.shard_map`) with
global batch and head numbers, so the mask does not depend on the partitioning.

`packed_attention` takes self-attention's queries, keys and values as the one projection
matmul writes them, [batch, length, 3, heads, head_dim] before their biases: each kernel
reads its blocks of Q, K and V from that array and adds the biases as it loads them, so no
kernel splits the array or adds the biases beforehand (for BERT-base at batch 256 a 302 MB
pass per layer), and the backward kernels sum the rows they write for the biases' gradient.

Supported: queries and keys of lengths divisible by 16 (blocks of 64, 32 or 16 rows: the
largest that divides), head_dim a power of two
from 16 to 128, as many key/value heads as query heads, padding given as `kv_lengths`
(`supported`). Matmuls in the inputs' dtype with float32 accumulation; softmax in float32.
Lowered for an NVIDIA GPU the kernels compile through Pallas's Triton backend (jax 0.11
deprecates it in favour of Mosaic GPU); for other platforms they run in Pallas's interpreter
(exact, slow: tests).
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.sharding import PartitionSpec as P

from jaxmodels import _pallas
from jaxmodels._pallas import mesh_axes, shard_offset, triton_available
from jaxmodels.layers import drop_threshold

__all__ = [
    "attention",
    "block",
    "keep_mask",
    "packed_attention",
    "supported",
    "triton_available",
]

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


_GOLDEN = 0x9E3779B1


def keep_mask(
    seed0: jax.Array, seed1: jax.Array, matrix: jax.Array, counter: jax.Array, threshold: int
) -> jax.Array:
    """True where an element is kept: `matrix` (uint32) numbers the (batch, head) pair,
    `counter` (uint32) the element within its [q_len, kv_len] matrix. Each matrix hashes its
    counters under a key of its own, so no two matrices share a stream."""
    key = _fmix32(matrix * jnp.uint32(_GOLDEN) + seed1)
    x = _fmix32(counter * jnp.uint32(_GOLDEN) + seed0)
    x = _fmix32(x ^ key)
    return (x >> 16) >= jnp.uint32(threshold)


def _matrix(b: Any, h: Any, heads: int) -> jax.Array:
    """The uint32 number of the (batch, head) attention matrix (global indices)."""
    return (b * heads + h).astype(jnp.uint32)


def _counters(rows: jax.Array, cols: jax.Array, kv_len: int) -> jax.Array:
    """The uint32 index of elements (rows, cols) of one [q_len, kv_len] matrix."""
    return rows.astype(jnp.uint32) * jnp.uint32(kv_len) + cols.astype(jnp.uint32)


def _kernel_mask(seed_ref, b, h, blocks, cfg) -> jax.Array:
    """The dropout keep-mask of a block inside a kernel; `seed_ref` holds the two seed words
    and this shard's batch and head offsets (`jax.shard_map`)."""
    heads, kv_len = cfg["dims"]
    matrix = _matrix(b + seed_ref[2], h + seed_ref[3], heads)
    counter = _counters(blocks.rows, blocks.cols, kv_len)
    return keep_mask(seed_ref[0], seed_ref[1], matrix, counter, cfg["threshold"])


class _Blocks:
    """Index helpers shared by the three kernels: global row / column ids of a block."""

    def __init__(self, shape: tuple[int, int], row0: Any, col0: Any) -> None:
        self.rows = row0 + jax.lax.broadcasted_iota(jnp.int32, shape, 0)
        self.cols = col0 + jax.lax.broadcasted_iota(jnp.int32, shape, 1)


def _logits(q, k, n, blocks, scale):
    """Logits of a [queries, keys] block with hidden keys at _MASKED, and whether each key
    is visible."""
    s = jnp.dot(q, k.T, preferred_element_type=jnp.float32) * scale
    visible = blocks.cols < n
    return jnp.where(visible, s, _MASKED), visible


def _forward_kernel(
    seed_ref, len_ref, q_ref, k_ref, v_ref, bq_ref, bk_ref, bv_ref, o_ref, lse_ref, *, cfg
):
    b, h, i = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    n = len_ref[b]
    q = q_ref[...] + bq_ref[...]
    bq, head_dim = q.shape
    bk = cfg["block_k"]

    def body(j, carry):
        m, denom, acc = carry
        k = k_ref[pl.ds(j * bk, bk), :] + bk_ref[...]
        v = v_ref[pl.ds(j * bk, bk), :] + bv_ref[...]
        blocks = _Blocks((bq, bk), i * bq, j * bk)
        s, visible = _logits(q, k, n, blocks, cfg["scale"])
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        alpha = jnp.exp(m - m_new)
        p = jnp.where(visible, jnp.exp(s - m_new[:, None]), 0.0)
        denom = denom * alpha + jnp.sum(p, axis=1)
        if cfg["threshold"]:
            p = jnp.where(_kernel_mask(seed_ref, b, h, blocks, cfg), p, 0.0)
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


def _grad_block(q, k, v, do, lse, delta, n, blocks, seed_ref, b, h, cfg):
    """The shared part of both backward kernels for one [queries, keys] block: the dropped
    and rescaled probabilities (for dV) and the logits' gradient dS."""
    s, visible = _logits(q, k, n, blocks, cfg["scale"])
    p = jnp.where(visible, jnp.exp(s - lse[:, None]), 0.0)
    dp = jnp.dot(do, v.T, preferred_element_type=jnp.float32)
    if cfg["threshold"]:
        keep = _kernel_mask(seed_ref, b, h, blocks, cfg)
        p_dropped = jnp.where(keep, p, 0.0) * cfg["keep_scale"]
        dp = jnp.where(keep, dp, 0.0) * cfg["keep_scale"]
    else:
        p_dropped = p
    ds = p * (dp - delta[:, None])
    return p_dropped, ds


def _dkdv_kernel(
    seed_ref,
    len_ref,
    q_ref,
    k_ref,
    v_ref,
    bq_ref,
    bk_ref,
    bv_ref,
    do_ref,
    lse_ref,
    delta_ref,
    dk_ref,
    dv_ref,
    dbk_ref,
    dbv_ref,
    *,
    cfg,
):
    b, h, j = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    n = len_ref[b]
    k, v = k_ref[...] + bk_ref[...], v_ref[...] + bv_ref[...]
    bk, head_dim = k.shape
    bq = cfg["block_q"]

    def body(i, carry):
        dk, dv = carry
        rows = pl.ds(i * bq, bq)
        q, do = q_ref[rows, :] + bq_ref[...], do_ref[rows, :]
        blocks = _Blocks((bq, bk), i * bq, j * bk)
        p_dropped, ds = _grad_block(
            q, k, v, do, lse_ref[rows], delta_ref[rows], n, blocks, seed_ref, b, h, cfg
        )
        dv = dv + jnp.dot(p_dropped.astype(do.dtype).T, do, preferred_element_type=jnp.float32)
        dk = dk + jnp.dot(ds.astype(q.dtype).T, q, preferred_element_type=jnp.float32)
        return dk, dv

    zeros = jnp.zeros((bk, head_dim), jnp.float32)
    dk, dv = jax.lax.fori_loop(0, q_ref.shape[0] // bq, body, (zeros, zeros))
    _write_with_sum(dk_ref, dbk_ref, dk * cfg["scale"])
    _write_with_sum(dv_ref, dbv_ref, dv)


def _write_with_sum(ref, sum_ref, x) -> None:
    """Writes the block `x` rounded to the output's dtype, and the sum of its rows (as
    rounded) to `sum_ref`: the block's part of the bias gradient."""
    x = x.astype(ref.dtype)
    ref[...] = x
    sum_ref[...] = jnp.sum(x.astype(jnp.float32), axis=0)


def _dq_kernel(
    seed_ref,
    len_ref,
    q_ref,
    k_ref,
    v_ref,
    bq_ref,
    bk_ref,
    bv_ref,
    do_ref,
    lse_ref,
    delta_ref,
    dq_ref,
    dbq_ref,
    *,
    cfg,
):
    b, h, i = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    n = len_ref[b]
    q, do = q_ref[...] + bq_ref[...], do_ref[...]
    lse, delta = lse_ref[...], delta_ref[...]
    bq, head_dim = q.shape
    bk = cfg["block_k"]

    def body(j, dq):
        cols = pl.ds(j * bk, bk)
        k, v = k_ref[cols, :] + bk_ref[...], v_ref[cols, :] + bv_ref[...]
        blocks = _Blocks((bq, bk), i * bq, j * bk)
        _, ds = _grad_block(q, k, v, do, lse, delta, n, blocks, seed_ref, b, h, cfg)
        return dq + jnp.dot(ds.astype(k.dtype), k, preferred_element_type=jnp.float32)

    dq = jax.lax.fori_loop(0, k_ref.shape[0] // bk, body, jnp.zeros((bq, head_dim), jnp.float32))
    _write_with_sum(dq_ref, dbq_ref, dq * cfg["scale"])


_CALL = {
    "what": "the fused attention kernels",
    "instead": "attention implementation None or 'xla'",
    "triton": {"num_warps": 4, "num_stages": 2},
}


def _config(q: jax.Array, k: jax.Array, rate: float, heads: int) -> dict[str, Any]:
    """Static settings of the kernels; `heads`: the global head count (for the mask)."""
    q_len, head_dim = q.shape[1], q.shape[-1]
    threshold = drop_threshold(rate)
    if threshold >= _HALF_WORD:
        raise ValueError(f"attention dropout rate {rate} rounds to 1 (all dropped); use < 1")
    return {
        "scale": 1.0 / math.sqrt(head_dim),
        "threshold": threshold,
        "keep_scale": _HALF_WORD / (_HALF_WORD - threshold),
        "dims": (heads, k.shape[1]),
        "block_q": block(q_len),
        "block_k": block(k.shape[1]),
    }


def _sizes(q: jax.Array, k: jax.Array, packed: bool) -> tuple[int, int, int, int, int]:
    """(batch, q_len, kv_len, heads, head_dim). `packed`: q (= k = v) is one
    [batch, length, 3, heads, head_dim] array holding the queries, keys and values."""
    if packed:
        batch, length, _, heads, head_dim = q.shape
        return batch, length, length, heads, head_dim
    batch, q_len, heads, head_dim = q.shape
    return batch, q_len, k.shape[1], heads, head_dim


def _row_spec(
    length: int, head_dim: int, by_program: bool, slot: int | None = None
) -> pl.BlockSpec:
    """[batch, length, heads, head_dim] arrays: the program's block of rows, or all rows;
    with `slot`, that slot of a packed [batch, length, 3, heads, head_dim] array (the kernel
    sees the same block)."""
    rows = block(length) if by_program else length

    def first_row(i: Any) -> Any:
        return i if by_program else 0

    if slot is None:
        return pl.BlockSpec((_SQ, rows, _SQ, head_dim), lambda b, h, i: (b, first_row(i), h, 0))
    return pl.BlockSpec(
        (_SQ, rows, _SQ, _SQ, head_dim), lambda b, h, i: (b, first_row(i), slot, h, 0)
    )


def _stat_spec(length: int, by_program: bool) -> pl.BlockSpec:
    """[batch, heads, length] float32 statistics (log-sum-exp, delta)."""
    if by_program:
        return pl.BlockSpec((_SQ, _SQ, block(length)), lambda b, h, i: (b, h, i))
    return pl.BlockSpec((_SQ, _SQ, length), lambda b, h, i: (b, h, 0))


def _in_specs(sizes: tuple[int, ...], per_query_block: bool, packed: bool) -> list[pl.BlockSpec]:
    """BlockSpecs of (seeds, lengths, q, k, v, q bias, k bias, v bias, dO, lse, delta), the
    inputs of every kernel (the forward takes the first eight): a program owns a block of
    queries and loops over all keys (`per_query_block`: forward, dQ), or owns a block of keys
    and loops over all queries (dK/dV). `packed`: q, k and v are slots 0, 1, 2 of one array.
    The biases are one [3, heads, head_dim] array."""
    batch, q_len, kv_len, _, head_dim = sizes
    slots = (0, 1, 2) if packed else (None, None, None)
    stat = _stat_spec(q_len, per_query_block)

    def bias(slot: int) -> pl.BlockSpec:
        return pl.BlockSpec((_SQ, _SQ, head_dim), lambda b, h, i: (slot, h, 0))

    return [
        pl.BlockSpec((4,), lambda b, h, i: (0,)),
        pl.BlockSpec((batch,), lambda b, h, i: (0,)),
        _row_spec(q_len, head_dim, per_query_block, slots[0]),
        _row_spec(kv_len, head_dim, not per_query_block, slots[1]),
        _row_spec(kv_len, head_dim, not per_query_block, slots[2]),
        bias(0),
        bias(1),
        bias(2),
        _row_spec(q_len, head_dim, per_query_block),
        stat,
        stat,
    ]


def _forward(q, k, v, bias, seeds, lengths, rate, interpret, total_heads, packed):
    sizes = batch, q_len, _, heads, head_dim = _sizes(q, k, packed)
    cfg = _config(q, k, rate, total_heads)
    return _pallas.pallas_call(
        functools.partial(_forward_kernel, cfg=cfg),
        out_shape=[
            jax.ShapeDtypeStruct((batch, q_len, heads, head_dim), q.dtype),
            jax.ShapeDtypeStruct((batch, heads, q_len), jnp.float32),
        ],
        grid=(batch, heads, q_len // block(q_len)),
        in_specs=_in_specs(sizes, True, packed)[:8],
        out_specs=[_row_spec(q_len, head_dim, True), _stat_spec(q_len, True)],
        name="attention_forward",
        interpret=interpret,
        **_CALL,
    )(seeds, lengths, q, k, v, bias, bias, bias)


def _backward(q, k, v, bias, out, lse, seeds, lengths, do, rate, interpret, total_heads, packed):
    """(dQ, dK, dV), each <[batch, length, heads, head_dim]>, and their row sums by block,
    each <float32>[batch, heads, blocks, head_dim] (the kernels sum each block's rows as they
    write it: the parts of a bias's gradient)."""
    sizes = batch, q_len, kv_len, heads, head_dim = _sizes(q, k, packed)
    cfg = _config(q, k, rate, total_heads)
    # delta_i = sum_d dO_id O_id: the softmax backward's row term (dropout included).
    delta = jnp.einsum("bqhd,bqhd->bhq", do.astype(jnp.float32), out.astype(jnp.float32))
    args = (seeds, lengths, q, k, v, bias, bias, bias, do, lse, delta)
    kv_rows = jax.ShapeDtypeStruct((batch, kv_len, heads, head_dim), q.dtype)
    kv_sums, kv_sum_spec = _block_sums(batch, heads, kv_len, head_dim)
    dk, dv, dbk, dbv = _pallas.pallas_call(
        functools.partial(_dkdv_kernel, cfg=cfg),
        out_shape=[kv_rows, kv_rows, kv_sums, kv_sums],
        grid=(batch, heads, kv_len // block(kv_len)),
        in_specs=_in_specs(sizes, False, packed),
        out_specs=[*[_row_spec(kv_len, head_dim, True)] * 2, kv_sum_spec, kv_sum_spec],
        name="attention_backward_dkdv",
        interpret=interpret,
        **_CALL,
    )(*args)
    q_sums, q_sum_spec = _block_sums(batch, heads, q_len, head_dim)
    dq, dbq = _pallas.pallas_call(
        functools.partial(_dq_kernel, cfg=cfg),
        out_shape=[jax.ShapeDtypeStruct((batch, q_len, heads, head_dim), q.dtype), q_sums],
        grid=(batch, heads, q_len // block(q_len)),
        in_specs=_in_specs(sizes, True, packed),
        out_specs=[_row_spec(q_len, head_dim, True), q_sum_spec],
        name="attention_backward_dq",
        interpret=interpret,
        **_CALL,
    )(*args)
    return dq, dk, dv, (dbq, dbk, dbv)


def _block_sums(batch: int, heads: int, length: int, head_dim: int) -> tuple[Any, pl.BlockSpec]:
    """The shape and BlockSpec of <float32>[batch, heads, blocks, head_dim]: each program's
    row sums of the block it writes."""
    blocks = length // block(length)
    shape = jax.ShapeDtypeStruct((batch, heads, blocks, head_dim), jnp.float32)
    return shape, pl.BlockSpec((_SQ, _SQ, _SQ, head_dim), lambda b, h, i: (b, h, i, 0))


def _no_bias(q: jax.Array) -> jax.Array:
    """Zero biases for unpacked <[batch, length, heads, head_dim]> inputs."""
    return jnp.zeros((3, *q.shape[-2:]), q.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def _attention(q, k, v, seeds, lengths, rate, interpret, total_heads):
    bias = _no_bias(q)
    return _forward(q, k, v, bias, seeds, lengths, rate, interpret, total_heads, False)[0]


def _attention_fwd(q, k, v, seeds, lengths, rate, interpret, total_heads):
    bias = _no_bias(q)
    out, lse = _forward(q, k, v, bias, seeds, lengths, rate, interpret, total_heads, False)
    return out, (q, k, v, out, lse, seeds, lengths)


def _attention_bwd(rate, interpret, total_heads, residuals, do):
    q, k, v, out, lse, seeds, lengths = residuals
    args = (q, k, v, _no_bias(q), out, lse, seeds, lengths, do)
    dq, dk, dv, _ = _backward(*args, rate, interpret, total_heads, False)
    return dq, dk, dv, None, None


_attention.defvjp(_attention_fwd, _attention_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _packed_attention(qkv, bias, seeds, lengths, rate, interpret, total_heads):
    args = (qkv, qkv, qkv, bias, seeds, lengths)
    return _forward(*args, rate, interpret, total_heads, True)[0]


def _packed_attention_fwd(qkv, bias, seeds, lengths, rate, interpret, total_heads):
    args = (qkv, qkv, qkv, bias, seeds, lengths)
    out, lse = _forward(*args, rate, interpret, total_heads, True)
    return out, (qkv, bias, out, lse, seeds, lengths)


def _packed_attention_bwd(rate, interpret, total_heads, residuals, do):
    qkv, bias, out, lse, seeds, lengths = residuals
    args = (qkv, qkv, qkv, bias, out, lse, seeds, lengths, do)
    dq, dk, dv, sums = _backward(*args, rate, interpret, total_heads, True)
    dbias = jnp.sum(jnp.stack(sums), axis=(1, 3))  # one small reduction
    return jnp.stack([dq, dk, dv], axis=2), dbias.astype(bias.dtype), None, None


_packed_attention.defvjp(_packed_attention_fwd, _packed_attention_bwd)


def attention(
    query: jax.Array,
    key: jax.Array,
    value: jax.Array,
    kv_lengths: jax.Array | None = None,
    dropout_rate: float = 0.0,
    dropout_rng: jax.Array | None = None,
    interpret: bool | None = None,
) -> jax.Array:
    """softmax(Q K^T / sqrt(d)) V with keys past `kv_lengths` hidden and, when
    `dropout_rate` > 0, attention-probability dropout drawn from `dropout_rng`.

    query: <dtype>[batch, q_len, heads, head_dim]; key, value: <dtype>[batch, kv_len, heads,
    head_dim] with the query's batch, heads, head_dim and dtype (`supported` sizes; anything
    else is a ValueError); kv_lengths: <int>[batch] or None (all keys). Returns
    <dtype>[batch, q_len, heads, head_dim]; a query with no visible key outputs zeros. Under
    a mesh whose logical-axis rules split ``batch`` (and ``heads``), each device runs the
    kernels on its own shard; the dropout mask is the same as on one device. `interpret`:
    Pallas's interpreter (None: for any platform but CUDA, chosen where the step is lowered).
    """
    _check_separate(query, key, value)
    arrays = (query, key, value)
    return _run(arrays, None, kv_lengths, dropout_rate, dropout_rng, interpret)


def _check_separate(query: jax.Array, key: jax.Array, value: jax.Array) -> None:
    """ValueError unless query, key and value are [batch, length, heads, head_dim] arrays of
    one dtype with key.shape == value.shape and the query's batch, heads and head_dim."""
    shapes = f"query {query.shape}, key {key.shape}, value {value.shape}"
    if query.ndim != 4 or key.ndim != 4 or value.ndim != 4:
        raise ValueError(
            f"the fused attention kernels take query, key and value as [batch, length, heads, "
            f"head_dim] arrays, got {shapes}"
        )
    if key.shape != value.shape:
        raise ValueError(f"key and value shapes differ ({shapes}); they must be equal")
    for i, name in ((0, "batch"), (2, "heads"), (3, "head_dim")):
        if key.shape[i] != query.shape[i]:
            needs = " (no grouped-query attention here)" if name == "heads" else ""
            raise ValueError(
                f"the fused attention kernels need the query's {name} in key and value"
                f"{needs}: {shapes}"
            )
    if not query.dtype == key.dtype == value.dtype:
        raise ValueError(
            f"query, key and value dtypes differ ({query.dtype}, {key.dtype}, {value.dtype}); "
            f"the fused attention kernels take one dtype"
        )


def packed_attention(
    qkv: jax.Array,
    bias: jax.Array | None = None,
    kv_lengths: jax.Array | None = None,
    dropout_rate: float = 0.0,
    dropout_rng: jax.Array | None = None,
    interpret: bool | None = None,
) -> jax.Array:
    """`attention` of self-attention's queries, keys and values as one projection matmul
    writes them: qkv <dtype>[batch, length, 3, heads, head_dim] (queries, keys, values)
    before its bias <[3, heads, head_dim]> (None: no bias). The kernels read each of them
    from `qkv` and add the bias as they load it, so no kernel adds it or splits `qkv`
    beforehand; the gradients come back the same way: `qkv`'s packed, the bias's summed over
    batch and length by the backward kernels as they write dQ, dK and dV (so that no pass
    reads them again for it). Returns <dtype>[batch, length, heads, head_dim]."""
    if qkv.ndim != 5 or qkv.shape[2] != 3:
        raise ValueError(
            f"packed_attention takes one [batch, length, 3, heads, head_dim] array, got shape "
            f"{qkv.shape}"
        )
    if bias is None:
        bias = jnp.zeros((3, *qkv.shape[3:]), qkv.dtype)
    elif bias.shape != (3, *qkv.shape[3:]):
        raise ValueError(
            f"packed_attention's bias has shape {bias.shape}; it takes [3, heads, head_dim] = "
            f"{(3, *qkv.shape[3:])}"
        )
    return _run((qkv,), bias.astype(qkv.dtype), kv_lengths, dropout_rate, dropout_rng, interpret)


def _run(arrays, bias, kv_lengths, dropout_rate, dropout_rng, interpret) -> jax.Array:
    """The kernels on (q, k, v), or on (qkv,) with `bias` (packed), per shard under a mesh."""
    packed = bias is not None
    key = arrays[0] if packed else arrays[1]
    batch, q_len, kv_len, heads, head_dim = _sizes(arrays[0], key, packed)
    if not supported(q_len, kv_len, head_dim):
        raise ValueError(
            f"the fused attention kernels take lengths divisible by 16 and head_dim a "
            f"power of two from 16 to 128, got q_len {q_len}, kv_len {kv_len}, "
            f"head_dim {head_dim}"
        )
    if kv_lengths is None:
        lengths = jnp.full((batch,), kv_len, jnp.int32)
    else:
        lengths = jnp.asarray(kv_lengths, jnp.int32)
        if lengths.shape != (batch,):
            raise ValueError(
                f"kv_lengths has shape {lengths.shape}; pass one length per sequence, "
                f"<int>[{batch}]"
            )
    rate = float(dropout_rate)
    if rate > 0.0:
        if dropout_rng is None:
            raise ValueError("attention dropout is active but dropout_rng is None")
        seeds = jax.random.bits(dropout_rng, (2,), jnp.uint32)
    else:
        seeds = jnp.zeros((2,), jnp.uint32)
    batch_axes, head_axes = mesh_axes("batch", batch), mesh_axes("heads", heads)
    head_axis = 3 if packed else 2

    def local(seeds, lengths, *arrays):
        offsets = [
            shard_offset(batch_axes, arrays[0].shape[0]),
            shard_offset(head_axes, arrays[0].shape[head_axis]),
        ]
        seeds = jnp.concatenate([seeds, jnp.stack(offsets).astype(jnp.uint32)])
        if packed:
            return _packed_attention(*arrays, seeds, lengths, rate, interpret, heads)
        return _attention(*arrays, seeds, lengths, rate, interpret, heads)

    inputs = (*arrays, bias) if packed else arrays
    if not (batch_axes or head_axes):
        return local(seeds, lengths, *inputs)
    batch_spec, head_spec = batch_axes or None, head_axes or None
    rows = P(batch_spec, None, head_spec, None)
    specs = (P(batch_spec, None, None, head_spec, None), P(None, head_spec, None))
    return jax.shard_map(
        local,
        in_specs=(P(), P(batch_spec), *(specs if packed else [rows] * 3)),
        out_specs=rows,
        check_vma=False,
    )(seeds, lengths, *inputs)
