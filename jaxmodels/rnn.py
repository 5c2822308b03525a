"""Recurrent models: the LSTM cell, a fast multi-layer (bi)LSTM, and a text classifier.

The cell is the classic one (gate order i, f, g, o, as in PyTorch and cuDNN):

    i = sigmoid(W_i x + U_i h + b_i)      f = sigmoid(W_f x + U_f h + b_f)
    g = tanh(W_g x + U_g h + b_g)         o = sigmoid(W_o x + U_o h + b_o)
    c_t = f * c_{t-1} + i * g             h_t = o * tanh(c_t)

`LSTM` runs sequences with `lax.scan`: the input projection `x @ W` for all time steps is
ONE matmul before the loop, and only the recurrent `h @ U` is inside it. Its backward pass
(a custom VJP) likewise carries only (dh, dc) through the reversed loop; the gradient of
`U` is ONE matmul over all steps afterwards instead of a matmul and an accumulation per
step. Each forward step writes only what the backward pass needs (gates, output and cell
state), which on GPUs is a kernel launch per array and step. Being a custom VJP, the scan
path supports reverse-mode differentiation only (`jax.grad`, `jax.vjp`), not forward mode
(`jax.jvp`, `jax.jacfwd`). Variable-length batches are given by `lengths`: padded steps
never change the state and output zeros, and the backward direction of a bidirectional
layer starts at each sequence's own last token.
On an NVIDIA GPU a cuDNN backend (`jax.experimental.rnn`) computes the same function from
the same parameters (`backend="cudnn"`, or `"auto"`; elsewhere, a ROCm GPU included, "auto"
takes the scan path), and so does `backend="pallas"`: the scan path's arithmetic with the
loop over time fused into one GPU kernel per direction and pass (`jaxmodels.pallas_lstm`,
hidden sizes that are powers of two from 16 to 128).

Example:
  >>> import jax, jax.numpy as jnp
  >>> model = LSTMClassifier(vocab_size=100, embed_dim=8, hidden_size=16, num_layers=2,
  ...                        num_classes=3)
  >>> tokens = jnp.ones((4, 10), jnp.int32)
  >>> lengths = jnp.array([10, 7, 3, 1])
  >>> variables = model.init(jax.random.PRNGKey(0), tokens, lengths)
  >>> model.apply(variables, tokens, lengths).shape
  (4, 3)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxmodels import _pallas
from jaxmodels.layers import Dropout, Embed, check_lengths, dot_float32

Dtype = Any
State = tuple[jax.Array, jax.Array]  # (h, c)

BACKENDS = ("auto", "scan", "cudnn", "pallas")
POOLINGS = ("last", "mean", "max")


def _uniform(scale: float) -> Callable[..., jax.Array]:
    """U(-scale, scale), PyTorch's LSTM initialisation with scale = 1/sqrt(hidden)."""

    def init(key: jax.Array, shape: tuple[int, ...], dtype: Dtype = jnp.float32) -> jax.Array:
        return jax.random.uniform(key, shape, dtype, -scale, scale)

    return init


def lstm_gates(z: jax.Array, c: jax.Array) -> State:
    """The cell update from pre-activations `z` <float32>[..., 4H] and cell state `c`."""
    i, f, g, o = jnp.split(z, 4, axis=-1)
    c = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
    h = jax.nn.sigmoid(o) * jnp.tanh(c)
    return h, c


class LSTMCell(nn.Module):
    """One LSTM step (the gates above), for use in custom loops.

    Parameters: `input_kernel` <[features, 4H]>, `recurrent_kernel` <[H, 4H]>, `bias` <[4H]>,
    the same names and layout as each direction of `LSTM`.

    Attributes:
      hidden_size: H.
      dtype: matmul computation dtype (gates and cell state are float32).
      param_dtype: parameter storage dtype.
    """

    hidden_size: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, carry: State, x: jax.Array) -> tuple[State, jax.Array]:
        """Args: carry (h, c) <[batch, H]> each; x <[batch, features]>.

        Returns ((h, c), h).
        """
        wi, wh, b = _direction_params(self, x.shape[-1], self.hidden_size, self.param_dtype)
        h, c = carry
        z = _matmul(x, wi, self.dtype) + _matmul(h, wh, self.dtype) + b
        h, c = lstm_gates(z, c.astype(_acc(self.dtype)))
        return (h, c), h


def _direction_params(
    module: nn.Module, features: int, hidden: int, param_dtype: Dtype, prefix: str = ""
) -> tuple[jax.Array, jax.Array, jax.Array]:
    init = _uniform(1.0 / np.sqrt(hidden))
    wi = module.param(
        f"{prefix}input_kernel",
        nn.with_logical_partitioning(init, ("embed", None)),
        (features, 4 * hidden),
        param_dtype,
    )
    wh = module.param(
        f"{prefix}recurrent_kernel",
        nn.with_logical_partitioning(init, (None, None)),
        (hidden, 4 * hidden),
        param_dtype,
    )
    b = module.param(
        f"{prefix}bias", nn.with_logical_partitioning(init, (None,)), (4 * hidden,), param_dtype
    )
    return wi, wh, b


def _acc(dtype: Dtype) -> Any:
    """Accumulation / state dtype: float32, or wider if the computation dtype is wider."""
    return jnp.promote_types(dtype, jnp.float32)


def _matmul(x: jax.Array, w: jax.Array, dtype: Dtype) -> jax.Array:
    """x @ w in `dtype`, accumulated and returned in float32 (at least); the backward
    matmuls in `dtype` too (`jaxmodels.layers.dot_float32`)."""
    dims = (((x.ndim - 1,), (0,)), ((), ()))
    return dot_float32(x.astype(dtype), w.astype(dtype), dims)


def reverse_padded(x: jax.Array, lengths: jax.Array) -> jax.Array:
    """Reverses each sequence's first `lengths[b]` steps; padding stays in place.

    x: <[batch, time, ...]>, lengths: <int>[batch].
    """
    t = jnp.arange(x.shape[1])[None, :]
    idx = jnp.where(t < lengths[:, None], lengths[:, None] - 1 - t, t)
    idx = idx.reshape(idx.shape + (1,) * (x.ndim - 2))
    return jnp.take_along_axis(x, idx, axis=1)


def _activations(z: jax.Array) -> jax.Array:
    """The gate activations (sigmoid i, f; tanh g; sigmoid o) of pre-activations z [..., 4H]."""
    i, f, g, o = jnp.split(z, 4, axis=-1)
    return jnp.concatenate(
        [jax.nn.sigmoid(i), jax.nn.sigmoid(f), jnp.tanh(g), jax.nn.sigmoid(o)], axis=-1
    )


# The scan path's unroll where it is lowered for a GPU when `LSTM.unroll` is None: a loop
# step's kernels are short enough there for their launches to dominate, and XLA writes the
# per-step arrays of several unrolled steps in one kernel (for an H200, the 2x1024 LSTM's
# training step at batch 256: 3,408 kernels unrolled once, 1,872 unrolled 4 times). On a CPU
# the same unrolling made the training steps 3-11% slower (benchmarks/RESULTS.md).
GPU_UNROLL = 4


def _unrolled_by_platform(fn: Callable[..., Any], *args: Any) -> Any:
    """`fn(*args, unroll)` with unroll `GPU_UNROLL` where the computation is lowered for a
    GPU and 1 elsewhere."""

    def with_unroll(unroll: int) -> Callable[..., Any]:
        return lambda *a: fn(*a, unroll)

    return jax.lax.platform_dependent(
        *args, cuda=with_unroll(GPU_UNROLL), rocm=with_unroll(GPU_UNROLL), default=with_unroll(1)
    )


def _recurrence_fwd(
    zx: jax.Array,
    mask: jax.Array,
    h0: jax.Array,
    c0: jax.Array,
    wh: jax.Array,
    dtype: Dtype,
    unroll: int | None,
) -> tuple[tuple[jax.Array, jax.Array, jax.Array], Any]:
    """The recurrence as a `lax.scan`: ((outputs, h, c), residuals for `_recurrence_bwd`).

    zx <acc>[time, batch, 4H] input projections (bias included), mask <bool>[time, batch, 1]
    (a prefix of each sequence's steps), h0, c0 <acc>[batch, H], wh [H, 4H] (the parameter,
    any float dtype; multiplied in `dtype`). Outputs <acc>[time, batch, H] (zeros at masked
    steps) and the final h, c.

    Each step writes two arrays for the backward pass: its gate activations and one
    [2, batch, H] array of its output and cell state. The h that the next step multiplies
    (in `dtype`) is carried, not written: the backward pass takes it from the outputs. On
    GPUs every array a step writes is a kernel launch per step, and a loop's steps are short
    enough for launches to dominate; the carried h in `dtype` is made by the step's
    elementwise kernel instead of a cast kernel of its own. `unroll` None: by platform
    (`GPU_UNROLL`).
    """
    if unroll is None:
        return _unrolled_by_platform(
            lambda *a: _recurrence_fwd(*a[:5], dtype, a[5]), zx, mask, h0, c0, wh
        )
    wh_c = wh.astype(dtype)

    def step(carry: tuple[jax.Array, ...], inputs: tuple[jax.Array, jax.Array]) -> Any:
        h, c, h_in = carry
        z, m = inputs
        z = z + jnp.matmul(h_in, wh_c, preferred_element_type=z.dtype)
        acts = _activations(z)
        i, f, g, o = jnp.split(acts, 4, axis=-1)
        c_new = f * c + i * g
        h_new = o * jnp.tanh(c_new)
        h, c = jnp.where(m, h_new, h), jnp.where(m, c_new, c)
        return (h, c, h.astype(dtype)), (jnp.stack([jnp.where(m, h_new, 0.0), c]), acts)

    (h, c, _), (yc, gates) = jax.lax.scan(
        step, (h0, c0, h0.astype(dtype)), (zx, mask), unroll=unroll
    )
    ys, cs = yc[:, 0], yc[:, 1]
    return (ys, h, c), (gates, ys, cs, h0, c0, mask, wh)


def _recurrence_scan(*args: Any) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(outputs, h, c) of `_recurrence_fwd(*args)`, differentiated by JAX when called
    directly (the unused residuals are dropped by XLA)."""
    return _recurrence_fwd(*args)[0]


def _recurrence_bwd(
    dtype: Dtype, unroll: int | None, residuals: Any, cotangents: Any
) -> tuple[Any, ...]:
    """Backpropagation through time that carries only (dh, dc) through the loop: the
    gradient of the recurrent kernel is ONE matmul over all steps afterwards (as cuDNN does),
    not a matmul and an accumulation per step.

    Each step's h_prev (in `dtype`) is the previous step's output: at a masked step that is 0
    instead of the carried state, which changes nothing, since no gradient flows through a
    masked step."""
    if unroll is None:
        return _unrolled_by_platform(
            lambda r, c, u: _recurrence_bwd(dtype, u, r, c), residuals, cotangents
        )
    gates, ys, cs, h0, c0, mask, wh = residuals
    dys, dh_last, dc_last = cotangents
    h_prev = jnp.concatenate([h0[None], ys[:-1]]).astype(dtype)
    c_prev = jnp.concatenate([c0[None], cs[:-1]])
    wh_t = wh.astype(dtype).T

    def step(carry: State, inputs: Any) -> tuple[State, jax.Array]:
        dh, dc = carry
        dy, m, c, acts = inputs
        i, f, g, o = jnp.split(acts, 4, axis=-1)
        c_new = f * c + i * g
        tc = jnp.tanh(c_new)
        dh_new = jnp.where(m, dh + dy, 0.0)
        dc_total = jnp.where(m, dc, 0.0) + dh_new * o * (1.0 - tc * tc)
        dz = jnp.concatenate(
            [
                dc_total * g * i * (1.0 - i),
                dc_total * c * f * (1.0 - f),
                dc_total * i * (1.0 - g * g),
                dh_new * tc * o * (1.0 - o),
            ],
            axis=-1,
        )
        dh_prev = jnp.where(m, 0.0, dh) + jnp.matmul(
            dz.astype(dtype), wh_t, preferred_element_type=dh.dtype
        )
        dc_prev = jnp.where(m, dc_total * f, dc)
        return (dh_prev, dc_prev), dz

    (dh0, dc0), dzs = jax.lax.scan(
        step, (dh_last, dc_last), (dys, mask, c_prev, gates), reverse=True, unroll=unroll
    )
    return _input_grads(dzs, dh0, dc0, h_prev, wh, dtype)


def _input_grads(
    dzs: jax.Array, dh0: jax.Array, dc0: jax.Array, h_prev: jax.Array, wh: jax.Array, dtype: Dtype
) -> tuple[Any, ...]:
    """The recurrence's input cotangents from the loop's: the recurrent kernel's gradient is
    one matmul over all steps, in float32 (at least) up to the parameter's own dtype."""
    dwh = jnp.einsum("tbh,tbg->hg", h_prev, dzs.astype(dtype), preferred_element_type=dzs.dtype)
    return dzs, None, dh0, dc0, dwh.astype(wh.dtype)


# The recurrence with the hand-written backward pass; dtype and unroll are static.
_recurrence = jax.custom_vjp(_recurrence_scan, nondiff_argnums=(5, 6))
_recurrence.defvjp(_recurrence_fwd, _recurrence_bwd)


def _fused_primal(
    zx: jax.Array, mask: jax.Array, h0: jax.Array, c0: jax.Array, wh: jax.Array, dtype: Dtype
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(outputs, h, c) of the recurrence as one Pallas kernel (`jaxmodels.pallas_lstm`),
    writing no residuals (nothing differentiates it)."""
    from jaxmodels import pallas_lstm

    return pallas_lstm.forward(zx, mask, h0, c0, wh, dtype, residuals=False)


def _fused_fwd(
    zx: jax.Array, mask: jax.Array, h0: jax.Array, c0: jax.Array, wh: jax.Array, dtype: Dtype
) -> tuple[tuple[jax.Array, jax.Array, jax.Array], Any]:
    """The forward recurrence as one Pallas kernel (`jaxmodels.pallas_lstm`), writing the
    residuals `_fused_bwd` takes: each step's h_prev, c_prev and gate activations."""
    from jaxmodels import pallas_lstm

    ys, h, c, h_prev, c_prev, gates = pallas_lstm.forward(zx, mask, h0, c0, wh, dtype)
    return (ys, h, c), ((h_prev, c_prev, gates), mask, wh)


def _fused_bwd(dtype: Dtype, residuals: Any, cotangents: Any) -> tuple[Any, ...]:
    from jaxmodels import pallas_lstm

    (h_prev, c_prev, gates), mask, wh = residuals
    dys, dh_last, dc_last = cotangents
    dzs, dh0, dc0 = pallas_lstm.backward(dys, mask, c_prev, gates, dh_last, dc_last, wh, dtype)
    return _input_grads(dzs, dh0, dc0, h_prev, wh, dtype)


# The recurrence as two fused kernels (forward, backward); dtype is static.
_fused_recurrence = jax.custom_vjp(_fused_primal, nondiff_argnums=(5,))
_fused_recurrence.defvjp(_fused_fwd, _fused_bwd)


def _scan_direction(
    x: jax.Array,
    lengths: jax.Array,
    h0: jax.Array,
    c0: jax.Array,
    wi: jax.Array,
    wh: jax.Array,
    b: jax.Array,
    dtype: Dtype,
    unroll: int | None,
    fused: bool = False,
) -> tuple[jax.Array, State]:
    """One direction of one layer over [batch, time, features]; returns (outputs, (h, c)).
    `fused`: the recurrence as Pallas kernels (`jaxmodels.pallas_lstm`) instead of scans."""
    acc = _acc(dtype)
    zx = _matmul(x, wi, dtype) + b.astype(acc)  # the one big input projection
    zx = jnp.swapaxes(zx, 0, 1)  # [time, batch, 4H]
    mask = (jnp.arange(x.shape[1])[:, None] < lengths[None, :])[..., None]  # [time, batch, 1]
    state = (h0.astype(acc), c0.astype(acc))
    if fused:
        ys, h, c = _fused_recurrence(zx, mask, *state, wh, jnp.dtype(dtype))
    else:
        ys, h, c = _recurrence(zx, mask, *state, wh, jnp.dtype(dtype), unroll)
    return jnp.swapaxes(ys, 0, 1), (h, c)


def cudnn_available() -> bool:
    """True when the default backend is an NVIDIA GPU (cuDNN's LSTM applies); False on any
    other, a ROCm GPU included."""
    return _pallas.on_nvidia_gpu()


class LSTM(nn.Module):
    """A stack of (bi)LSTM layers over a batch of variable-length sequences.

    Attributes:
      hidden_size: H per direction.
      num_layers: stacked layers; layer l+1 reads layer l's outputs.
      bidirectional: also run each layer backwards (outputs concatenated: 2H).
      dropout: dropout rate between layers (not after the last), in training only.
      unroll: the scan path's loop unroll factor (a speed knob; numbers are unchanged).
        None (default): `GPU_UNROLL` (4) where the step is lowered for a GPU, 1 elsewhere.
      backend: "scan" (portable), "cudnn" (NVIDIA GPU; jax.experimental.rnn), "pallas"
        (the scan path's arithmetic, each direction's loop over time one fused GPU kernel
        per pass; hidden sizes that are powers of two from 16 to 128; Pallas's slow
        interpreter elsewhere) or "auto" (cuDNN on an NVIDIA GPU, scan elsewhere, a ROCm
        GPU included, and while dropout between layers is on: cuDNN's LSTM here has none).
        All compute the same function of the same parameters; cuDNN computes in float32
        (jaxlib's cuDNN RNN rejects bfloat16).
      dtype: matmul dtype of the scan path (gates and cell state are float32).
      param_dtype: parameter storage dtype.

    Parameters: for layer l and direction d in (fwd, bwd): `l{l}_{d}_input_kernel`
    <[in, 4H]>, `l{l}_{d}_recurrent_kernel` <[H, 4H]>, `l{l}_{d}_bias` <[4H]>, gates in
    order i, f, g, o. A PyTorch `nn.LSTM` maps as weight_ih = input_kernel.T,
    weight_hh = recurrent_kernel.T, bias_ih + bias_hh = bias.
    """

    hidden_size: int
    num_layers: int = 1
    bidirectional: bool = False
    dropout: float = 0.0
    unroll: int | None = None
    backend: str = "auto"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @property
    def num_directions(self) -> int:
        return 2 if self.bidirectional else 1

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        lengths: jax.Array | None = None,
        initial_state: State | None = None,
        deterministic: bool = True,
    ) -> tuple[jax.Array, State]:
        """Runs the stack.

        Args:
          x: <float>[batch, time, features].
          lengths: <int>[batch] valid steps per sequence (default: all `time`).
          initial_state: (h0, c0), each <float>[num_layers * num_directions, batch, H]
            (PyTorch's layout: index = layer * num_directions + direction); default zeros.
          deterministic: disables dropout.

        Returns:
          outputs <dtype>[batch, time, num_directions * H] (zeros at padded steps) and
          (h_n, c_n) <float32>[num_layers * num_directions, batch, H]: each sequence's state
          after its last valid step.
        """
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {self.backend!r}")
        if self.backend == "pallas":
            from jaxmodels import pallas_lstm

            if not pallas_lstm.supported(self.hidden_size):
                raise ValueError(
                    f"backend 'pallas' takes hidden sizes that are powers of two from 16 to "
                    f"{pallas_lstm.MAX_HIDDEN}, got {self.hidden_size}; use backend 'scan' or "
                    "'cudnn'"
                )
        if x.ndim != 3:
            raise ValueError(f"x must be [batch, time, features], got shape {x.shape}")
        batch, time, _ = x.shape
        lengths = jnp.full((batch,), time, jnp.int32) if lengths is None else lengths
        check_lengths(lengths, batch, time)
        lengths = jnp.asarray(lengths, jnp.int32)
        n_states = self.num_layers * self.num_directions
        if initial_state is None:
            zeros = jnp.zeros((n_states, batch, self.hidden_size), _acc(self.dtype))
            initial_state = (zeros, zeros)
        h0, c0 = initial_state
        if h0.shape != (n_states, batch, self.hidden_size) or c0.shape != h0.shape:
            raise ValueError(
                f"initial_state must be two arrays of shape {(n_states, batch, self.hidden_size)}"
                f" (layers*directions, batch, hidden), got {h0.shape} and {c0.shape}"
            )

        params = []
        features = x.shape[-1]
        for layer in range(self.num_layers):
            for d in ("fwd", "bwd")[: self.num_directions]:
                params.append(
                    _direction_params(
                        self, features, self.hidden_size, self.param_dtype, f"l{layer}_{d}_"
                    )
                )
            features = self.num_directions * self.hidden_size

        # Dropout acts between layers: with one layer, or in evaluation, there is none.
        drops = bool(self.dropout) and not deterministic and self.num_layers > 1
        if self.backend == "cudnn":
            if not cudnn_available():
                raise ValueError(
                    f"backend='cudnn' needs an NVIDIA GPU (the default backend is "
                    f"{jax.default_backend()!r}); use backend 'auto' or 'scan'"
                )
            if drops:
                raise ValueError(
                    "dropout between layers is not in cuDNN's LSTM here; train with backend "
                    "'auto' (which takes the scan path while dropout is on) or 'scan'"
                )
        if self.backend == "cudnn" or (self.backend == "auto" and cudnn_available() and not drops):
            return self._cudnn(x, lengths, h0, c0, params)

        hs, cs = [], []
        for layer in range(self.num_layers):
            outs = []
            for d in range(self.num_directions):
                k = layer * self.num_directions + d
                wi, wh, b = params[k]
                inp = x if d == 0 else reverse_padded(x, lengths)
                y, (h, c) = _scan_direction(
                    inp,
                    lengths,
                    h0[k],
                    c0[k],
                    wi,
                    wh,
                    b,
                    self.dtype,
                    self.unroll,
                    fused=self.backend == "pallas",
                )
                outs.append(y if d == 0 else reverse_padded(y, lengths))
                hs.append(h)
                cs.append(c)
            x = jnp.concatenate(outs, axis=-1).astype(self.dtype)
            if self.dropout and layer < self.num_layers - 1:
                x = Dropout(self.dropout)(x, deterministic=deterministic)
        return x, (jnp.stack(hs), jnp.stack(cs))

    def _cudnn(
        self,
        x: jax.Array,
        lengths: jax.Array,
        h0: jax.Array,
        c0: jax.Array,
        params: list[tuple[jax.Array, jax.Array, jax.Array]],
    ) -> tuple[jax.Array, State]:
        from jax.experimental import rnn

        weights = pack_cudnn_weights(params)
        y, h, c = rnn.lstm(
            x.astype(jnp.float32),
            h0.astype(jnp.float32),
            c0.astype(jnp.float32),
            weights,
            lengths,
            input_size=x.shape[-1],
            hidden_size=self.hidden_size,
            num_layers=self.num_layers,
            dropout=0.0,
            bidirectional=self.bidirectional,
        )
        mask = jnp.arange(x.shape[1])[None, :, None] < lengths[:, None, None]
        return jnp.where(mask, y, 0.0).astype(self.dtype), (h, c)


def pack_cudnn_weights(params: list[tuple[jax.Array, jax.Array, jax.Array]]) -> jax.Array:
    """Our per-direction (input_kernel, recurrent_kernel, bias) as cuDNN's flat vector.

    cuDNN's layout: for each layer*direction, W_ih [4H, in] then W_hh [4H, H]; then for each,
    b_ih [4H] then b_hh [4H]. Our single bias goes to b_ih; b_hh is zero.
    """
    weights = []
    for wi, wh, _ in params:
        weights += [wi.T.reshape(-1), wh.T.reshape(-1)]
    for _, _, b in params:
        weights += [b, jnp.zeros_like(b)]
    return jnp.concatenate([w.astype(jnp.float32) for w in weights])


class LSTMClassifier(nn.Module):
    """Embedding -> stacked (bi)LSTM -> pooled state -> dense logits.

    The article's Keras model is `LSTMClassifier(10000, 64, 128, 2, 10)` on sequences of
    length 100.

    Attributes:
      vocab_size, embed_dim, hidden_size, num_layers, num_classes: the sizes.
      bidirectional: biLSTM layers.
      pooling: "last" (each sequence's state after its last valid token; for a biLSTM the
        forward final state and the backward state at the first token), "mean" or "max"
        over valid steps. Lengths must be >= 1 (checked where they are concrete); under jit
        an empty sequence (e.g. a padding row of an evaluation batch) pools to zeros with
        "mean" and "max", so its logits stay finite.
      dropout: between LSTM layers and before the head (training only).
      unroll, backend, dtype, param_dtype: see `LSTM`.
    """

    vocab_size: int
    embed_dim: int
    hidden_size: int
    num_layers: int
    num_classes: int
    bidirectional: bool = False
    pooling: str = "last"
    dropout: float = 0.0
    unroll: int | None = None
    backend: str = "auto"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(
        self, tokens: jax.Array, lengths: jax.Array | None = None, train: bool = False
    ) -> jax.Array:
        """tokens: <int>[batch, time]; lengths: <int>[batch]. Returns <float32>[batch, classes]."""
        if self.pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {self.pooling!r}")
        if tokens.ndim != 2:
            raise ValueError(f"tokens must be <int>[batch, time], got shape {tokens.shape}")
        if not isinstance(tokens, jax.core.Tracer) and tokens.size:
            values = np.asarray(tokens)  # concrete: checked on the host, outside any trace
            top, low = int(values.max()), int(values.min())
            if top >= self.vocab_size or low < 0:
                raise ValueError(
                    f"token ids must be in [0, {self.vocab_size}) (vocab_size), found "
                    f"{low if low < 0 else top}; check the tokenizer's vocabulary size"
                )
        batch, time = tokens.shape
        lengths = jnp.full((batch,), time, jnp.int32) if lengths is None else lengths
        check_lengths(lengths, batch, time)
        tokens = nn.with_logical_constraint(tokens, ("batch", None))
        embed = Embed(
            self.vocab_size,
            self.embed_dim,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            embedding_init=nn.with_logical_partitioning(
                nn.initializers.normal(1.0), ("vocab", "embed")
            ),
        )
        x = embed(tokens)
        lstm = LSTM(
            self.hidden_size,
            self.num_layers,
            self.bidirectional,
            self.dropout,
            self.unroll,
            self.backend,
            self.dtype,
            self.param_dtype,
        )
        ys, (h_n, _) = lstm(x, lengths, deterministic=not train)
        mask = (jnp.arange(time)[None, :] < jnp.asarray(lengths)[:, None])[..., None]
        if self.pooling == "last":
            pooled = jnp.concatenate(list(h_n[-lstm.num_directions :]), axis=-1)
        elif self.pooling == "mean":
            total = jnp.sum(jnp.where(mask, ys.astype(jnp.float32), 0.0), axis=1)
            pooled = total / jnp.maximum(jnp.sum(mask, axis=1), 1)
        else:  # an empty sequence (e.g. padding rows of an evaluation batch) pools to 0
            pooled = jnp.max(jnp.where(mask, ys.astype(jnp.float32), -jnp.inf), axis=1)
            pooled = jnp.where(jnp.any(mask, axis=1), pooled, 0.0)
        pooled = Dropout(self.dropout)(pooled, deterministic=not train)
        logits = nn.Dense(
            self.num_classes,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            kernel_init=nn.with_logical_partitioning(
                nn.initializers.lecun_normal(), ("embed", "classes")
            ),
            bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("classes",)),
        )(pooled.astype(self.dtype))
        return logits.astype(jnp.float32)
