"""The LSTM recurrence as two fused GPU kernels (Pallas on Triton), for small hidden sizes.

The scan backend runs one XLA while-loop iteration per time step, each a handful of kernel
launches (the recurrent matmul, the gates, the state updates), so at small hidden sizes (the
article's 2 x 128) a step costs launch latency, not arithmetic. Here the whole loop over time
is ONE kernel: each program owns a block of `block_batch` sequences, keeps (h, c) on chip for
all T steps and reads the recurrent kernel (L2-resident) once per step; the backward pass is
a second kernel running the loop in reverse with only (dh, dc) on chip. The arithmetic is the
scan backend's (`jaxmodels.rnn`): matmuls in the computation dtype with float32
accumulation, gates and cell state in float32, masked steps leave the state unchanged, and
the same residuals, so the recurrent kernel's gradient is the same single matmul after the
loop (done by the caller).

Requirements: the hidden size a power of two from 16 to 128 (`supported`: each gate's
[H, H] block of the recurrent kernel is one matmul operand on chip); any batch (padded to
whole blocks here) and sequence length. Without gradients the forward kernel writes no
residuals. On a sharded batch the kernels run per shard (`jax.shard_map`). Lowered for an
NVIDIA GPU they compile through Pallas's Triton backend (`triton_available`; jax 0.11
deprecates it in favour of Mosaic GPU, and where a jax lacks it the kernels raise an error
saying so); for other platforms they run in Pallas's interpreter (exact, slow: for tests).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.sharding import PartitionSpec as P

from jaxmodels import _pallas
from jaxmodels._pallas import mesh_axes, triton_available

__all__ = ["BLOCK_BATCH", "backward", "forward", "supported", "triton_available"]

BLOCK_BATCH = 16  # sequences per program: the matmul's M (>= 16 for the tensor cores)
_GATES = 4  # i, f, g, o


MAX_HIDDEN = 128


def supported(hidden: int) -> bool:
    """Whether the kernels take this hidden size (a power of two, 16..MAX_HIDDEN)."""
    return 16 <= hidden <= MAX_HIDDEN and hidden & (hidden - 1) == 0


_CALL = {
    "what": "the LSTM's Pallas kernels",
    "instead": "LSTM backend 'scan' or 'cudnn'",
    "triton": {"num_warps": 4, "num_stages": 1},
}


def _padded(x: jax.Array, batch: int, axis: int) -> jax.Array:
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, batch - x.shape[axis])
    return jnp.pad(x, pad)


def _gate_block(k: int, hidden: int) -> Any:
    return pl.ds(k * hidden, hidden)


def _forward_kernel(*refs, save: bool):
    """Inputs zx, mask, h0, c0, wh; outputs ys, h_n, c_n and, when `save`, the residuals."""
    zx_ref, m_ref, h0_ref, c0_ref, wh_ref, ys_ref, hn_ref, cn_ref = refs[:8]
    time, _, gates = zx_ref.shape
    hidden = gates // _GATES
    dtype = wh_ref.dtype

    def step(t, carry):
        h, c = carry
        h_in = h.astype(dtype)
        z = [
            zx_ref[t, :, _gate_block(k, hidden)]
            + jnp.dot(h_in, wh_ref[:, _gate_block(k, hidden)], preferred_element_type=h.dtype)
            for k in range(_GATES)
        ]
        i, f, o = jax.nn.sigmoid(z[0]), jax.nn.sigmoid(z[1]), jax.nn.sigmoid(z[3])
        g = jnp.tanh(z[2])
        c_new = f * c + i * g
        h_new = o * jnp.tanh(c_new)
        keep = m_ref[t] > 0.5  # [block, 1]
        if save:
            hp_ref, cp_ref, act_ref = refs[8:]
            hp_ref[t] = h_in
            cp_ref[t] = c
            for k, act in enumerate((i, f, g, o)):
                act_ref[t, :, _gate_block(k, hidden)] = act
        ys_ref[t] = jnp.where(keep, h_new, 0.0)
        return jnp.where(keep, h_new, h), jnp.where(keep, c_new, c)

    h, c = jax.lax.fori_loop(0, time, step, (h0_ref[...], c0_ref[...]))
    hn_ref[...] = h
    cn_ref[...] = c


def _backward_kernel(
    dys_ref, m_ref, cp_ref, act_ref, dhn_ref, dcn_ref, wht_ref, dz_ref, dh0_ref, dc0_ref
):
    time, _, gates = act_ref.shape
    hidden = gates // _GATES
    dtype = wht_ref.dtype

    def step(s, carry):
        t = time - 1 - s
        dh, dc = carry
        keep = m_ref[t] > 0.5
        i, f, g, o = (act_ref[t, :, _gate_block(k, hidden)] for k in range(_GATES))
        c = cp_ref[t]
        c_new = f * c + i * g
        tc = jnp.tanh(c_new)
        dh_new = jnp.where(keep, dh + dys_ref[t], 0.0)
        dc_total = jnp.where(keep, dc, 0.0) + dh_new * o * (1.0 - tc * tc)
        dz = (
            dc_total * g * i * (1.0 - i),
            dc_total * c * f * (1.0 - f),
            dc_total * i * (1.0 - g * g),
            dh_new * tc * o * (1.0 - o),
        )
        dh_prev = jnp.where(keep, 0.0, dh)
        for k in range(_GATES):
            dz_ref[t, :, _gate_block(k, hidden)] = dz[k]
            dh_prev = dh_prev + jnp.dot(
                dz[k].astype(dtype),
                wht_ref[_gate_block(k, hidden), :],
                preferred_element_type=dh.dtype,
            )
        return dh_prev, jnp.where(keep, dc_total * f, dc)

    dh, dc = jax.lax.fori_loop(0, time, step, (dhn_ref[...], dcn_ref[...]))
    dh0_ref[...] = dh
    dc0_ref[...] = dc


def _specs(time: int, block: int, widths: tuple[int, ...], batch_axis: tuple[bool, ...]) -> list:
    """BlockSpecs: per-time arrays [time, batch, width] or per-sequence ones [batch, width]."""
    specs = []
    for width, timed in zip(widths, batch_axis, strict=True):
        if timed:
            specs.append(pl.BlockSpec((time, block, width), lambda b: (0, b, 0)))
        else:
            specs.append(pl.BlockSpec((block, width), lambda b: (b, 0)))
    return specs


def _per_shard(local: Any, args: tuple[Any, ...], timed: tuple[bool | None, ...], out_timed: Any):
    """`local(*args)` on each shard of a batch split over the mesh (`jax.shard_map`), or on
    the whole batch. `timed`: per argument, True for [time, batch, ...], False for
    [batch, ...], None for unsharded; `out_timed` likewise for the outputs."""
    batch = args[timed.index(False)].shape[0]
    axes = mesh_axes("batch", batch)
    if not axes:
        return local(*args)

    def spec(t: bool | None) -> P:
        return P() if t is None else P(None, axes) if t else P(axes)

    return jax.shard_map(
        local,
        in_specs=tuple(spec(t) for t in timed),
        out_specs=tuple(spec(t) for t in out_timed),
        check_vma=False,
    )(*args)


def forward(
    zx: jax.Array,
    mask: jax.Array,
    h0: jax.Array,
    c0: jax.Array,
    wh: jax.Array,
    dtype: Any,
    interpret: bool | None = None,
    residuals: bool = True,
    block_batch: int = BLOCK_BATCH,
) -> tuple[jax.Array, ...]:
    """The forward recurrence: (outputs, h, c) and, with `residuals`, (h_prev, c_prev, gate
    activations) for `backward`.

    zx <float32>[time, batch, 4H] input projections with bias, mask <bool>[time, batch, 1],
    h0, c0 <float32>[batch, H], wh [H, 4H]. The residuals are per step the state before it
    (h in `dtype`) and the activations i, f, g, o. `interpret`: Pallas's interpreter (None:
    for any platform but CUDA, chosen where the step is lowered).
    """
    time, batch, gates = zx.shape
    hidden = gates // _GATES
    acc = zx.dtype
    dtype = jnp.dtype(dtype)

    def local(zx, mask, h0, c0, wh):
        batch = zx.shape[1]
        padded = -(-batch // block_batch) * block_batch
        args = (
            _padded(zx, padded, 1),
            _padded(mask.astype(acc), padded, 1),
            _padded(h0, padded, 0),
            _padded(c0, padded, 0),
            wh.astype(dtype),
        )
        in_specs = _specs(time, block_batch, (gates, 1, hidden, hidden), (True, True, False, False))
        in_specs.append(pl.BlockSpec((hidden, gates), lambda b: (0, 0)))
        shapes = [((time, padded, hidden), acc), ((padded, hidden), acc), ((padded, hidden), acc)]
        widths, timed = [hidden] * 3, [True, False, False]
        if residuals:
            shapes += [
                ((time, padded, hidden), dtype),
                ((time, padded, hidden), acc),
                ((time, padded, gates), acc),
            ]
            widths, timed = widths + [hidden, hidden, gates], timed + [True] * 3
        outs = _pallas.pallas_call(
            functools.partial(_forward_kernel, save=residuals),
            out_shape=[jax.ShapeDtypeStruct(s, d) for s, d in shapes],
            grid=(padded // block_batch,),
            in_specs=in_specs,
            out_specs=_specs(time, block_batch, tuple(widths), tuple(timed)),
            name="lstm_forward",
            interpret=interpret,
            **_CALL,
        )(*args)
        return tuple(x[:, :batch] if t else x[:batch] for x, t in zip(outs, timed, strict=True))

    out_timed = (True, False, False) + ((True,) * 3 if residuals else ())
    return _per_shard(local, (zx, mask, h0, c0, wh), (True, True, False, False, None), out_timed)


def backward(
    dys: jax.Array,
    mask: jax.Array,
    c_prev: jax.Array,
    acts: jax.Array,
    dh_last: jax.Array,
    dc_last: jax.Array,
    wh: jax.Array,
    dtype: Any,
    interpret: bool | None = None,
    block_batch: int = BLOCK_BATCH,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Backpropagation through time: (d pre-activations <float32>[time, batch, 4H], dh0, dc0)
    from the output cotangents and `forward`'s residuals; `interpret` as in `forward`."""
    time, _, gates = acts.shape
    hidden = gates // _GATES
    acc = acts.dtype
    dtype = jnp.dtype(dtype)

    def local(dys, mask, c_prev, acts, dh_last, dc_last, wh):
        batch = acts.shape[1]
        padded = -(-batch // block_batch) * block_batch
        args = (
            _padded(dys.astype(acc), padded, 1),
            _padded(mask.astype(acc), padded, 1),
            _padded(c_prev, padded, 1),
            _padded(acts, padded, 1),
            _padded(dh_last.astype(acc), padded, 0),
            _padded(dc_last.astype(acc), padded, 0),
            wh.astype(dtype).T,
        )
        in_specs = _specs(
            time,
            block_batch,
            (hidden, 1, hidden, gates, hidden, hidden),
            (True, True, True, True, False, False),
        )
        in_specs.append(pl.BlockSpec((gates, hidden), lambda b: (0, 0)))
        dz, dh0, dc0 = _pallas.pallas_call(
            _backward_kernel,
            out_shape=[
                jax.ShapeDtypeStruct((time, padded, gates), acc),
                jax.ShapeDtypeStruct((padded, hidden), acc),
                jax.ShapeDtypeStruct((padded, hidden), acc),
            ],
            grid=(padded // block_batch,),
            in_specs=in_specs,
            out_specs=_specs(time, block_batch, (gates, hidden, hidden), (True, False, False)),
            name="lstm_backward",
            interpret=interpret,
            **_CALL,
        )(*args)
        return dz[:, :batch], dh0[:batch], dc0[:batch]

    return _per_shard(
        local,
        (dys, mask, c_prev, acts, dh_last, dc_last, wh),
        (True, True, True, True, False, False, None),
        (True, False, False),
    )
