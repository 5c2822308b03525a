"""Transformers: positions, encoder/decoder blocks and stacks, seq2seq and decoder-only LMs.

Building blocks, smallest first:

* `sinusoidal_positions` / `PositionEmbedding`: the fixed sin/cos table of "Attention is
  all you need" or a learned table, with a clear error for a sequence longer than it.
* `Mlp`: Dense -> activation -> dropout -> Dense.
* `EncoderBlock` (self-attention + MLP) and `DecoderBlock` (causal self-attention,
  cross-attention to an encoder output, MLP), each pre- or post-LayerNorm.
* `Encoder` / `Decoder`: stacks of blocks with two switches that do not change the
  function computed: `remat_policy` (recompute activations in the backward pass, see
  `REMAT_POLICIES`) and `scan_layers` (one `nn.scan` over the layers: parameters stacked on
  a leading `layers` axis, one compiled layer instead of `num_layers`).
* `EncoderDecoder` (seq2seq, with a KV cache on the target side and `greedy_translate`)
  and `DecoderOnlyLM` (with a KV cache, `init_cache` and `generate`).

KV-cache decoding is one mechanism for both models: the decoder's self-attention keeps its
keys/values in the `cache` collection (`MultiHeadAttention(decode=True)`, stacked on the
`layers` axis under `scan_layers`), next to `position` <int32>[batch], the next position of
each sequence; `init_cache` creates it for either model.

Sequences are right-padded and described by lengths <int>[batch]; padded keys are never
attended to. Logits are float32 whatever the compute `dtype`.

Parameter names: a plain stack names its blocks `layers_0`, `layers_1`, ...; a scanned
stack has one `layers` subtree whose leaves have a leading [num_layers] axis (stack the
per-layer trees with `jnp.stack` to convert, after `nn.meta.unbox`: `init` returns boxed
leaves, which carry their logical names and do not stack).

Example:
    >>> import jax, jax.numpy as jnp
    >>> lm = DecoderOnlyLM(vocab_size=11, embed_dim=16, num_layers=2, num_heads=2,
    ...                    mlp_dim=32, max_len=12)
    >>> tokens = jnp.ones((2, 5), jnp.int32)
    >>> params = lm.init(jax.random.key(0), tokens)["params"]
    >>> lm.apply({"params": params}, tokens).shape
    (2, 5, 11)
    >>> generate(lm, params, tokens, jnp.array([5, 3]), max_new_tokens=4, greedy=True).shape
    (2, 4)
    >>> s2s = EncoderDecoder(vocab_size=11, embed_dim=16, num_heads=2, mlp_dim=32,
    ...                      num_encoder_layers=1, num_decoder_layers=1, max_len=12)
    >>> params = s2s.init(jax.random.key(0), tokens, None, tokens)["params"]
    >>> greedy_translate(s2s, params, tokens, jnp.array([5, 3]), max_length=6, bos_id=1).shape
    (2, 6)
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxmodels import layers
from jaxmodels.attention import MultiHeadAttention
from jaxmodels.errors import ConfigError
from jaxmodels.layers import Dense, Dropout, Embed, add_positions, check_lengths, gelu, silu

__all__ = [
    "ACTIVATIONS",
    "REMAT_POLICIES",
    "sinusoidal_positions",
    "PositionEmbedding",
    "Mlp",
    "EncoderBlock",
    "DecoderBlock",
    "Encoder",
    "Decoder",
    "EncoderDecoder",
    "DecoderOnlyLM",
    "generate",
    "greedy_translate",
    "init_cache",
]

Dtype = Any
Array = jax.Array

ACTIVATIONS: dict[str, Callable[[Array], Array]] = {
    "gelu": partial(gelu, approximate=True),  # tanh approximation
    "gelu_exact": gelu,
    "relu": nn.relu,
    "silu": silu,
}

# "none": no remat; "full": save nothing, recompute the whole layer; otherwise a policy of
# `jax.checkpoint_policies` by name.
# By name (see `layers.REMAT_POLICIES`, the one table of both BERT and the Transformers).
REMAT_POLICIES = layers.REMAT_POLICIES

POSITION_KINDS = ("sinusoidal", "learned")

# Glorot/Xavier uniform for the dense kernels, as Flax's WMT Transformer example
# (BERT's N(0, 0.02) is the default of `MultiHeadAttention` alone; pass it as kernel_init).
_default_init = nn.initializers.xavier_uniform()
_position_init = nn.initializers.normal(0.02)
EMBED_AXES = ("batch", "length", "embed")


def _activation(name: str) -> Callable[[Array], Array]:
    if name not in ACTIVATIONS:
        raise ConfigError(f"unknown activation {name!r}; choose one of {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]


def _layer_norm(module: nn.Module, name: str) -> nn.LayerNorm:
    return nn.LayerNorm(
        epsilon=module.layer_norm_epsilon,
        dtype=module.dtype,
        param_dtype=module.param_dtype,
        scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), ("embed",)),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("embed",)),
        name=name,
    )


def _check_heads(module: Any) -> None:
    """`module.embed_dim` splits into `num_heads` heads, or `head_dim` is given."""
    if module.num_heads < 1:
        raise ConfigError(f"num_heads must be >= 1, got {module.num_heads}")
    if module.head_dim is None and module.embed_dim % module.num_heads:
        raise ConfigError(
            f"embed_dim {module.embed_dim} is not divisible by num_heads {module.num_heads}; "
            "choose num_heads dividing embed_dim, or give head_dim"
        )


def _check_tokens(tokens: Array, vocab_size: int, what: str = "token") -> None:
    """Raises ValueError for tokens that are not [batch, length], or (only when concrete)
    for ids outside [0, vocab_size)."""
    if jnp.ndim(tokens) != 2:
        raise ValueError(f"{what}s must be <int>[batch, length], got shape {jnp.shape(tokens)}")
    if isinstance(tokens, jax.core.Tracer):
        return
    values = np.asarray(tokens)
    if values.size and (values.min() < 0 or values.max() >= vocab_size):
        raise ValueError(
            f"{what} ids must lie in [0, {vocab_size}) (vocab_size); found "
            f"[{values.min()}, {values.max()}]: check the tokenizer's vocabulary size"
        )


def sinusoidal_positions(length: int, dim: int) -> np.ndarray:
    """The fixed position table of "Attention is all you need".

    PE[pos, 2i] = sin(pos / 10000^(2i/dim)) and PE[pos, 2i+1] = cos(pos / 10000^(2i/dim)).

    Args:
        length: number of positions.
        dim: embedding size (odd sizes drop the last cosine column).

    Returns:
        <float32>[length, dim].

    Example:
        >>> sinusoidal_positions(3, 4)[1].astype(float).round(3).tolist()  # position 1
        [0.841, 0.54, 0.01, 1.0]
    """
    pos = np.arange(length, dtype=np.float64)[:, None]
    inv_freq = 1.0 / (10000.0 ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
    angles = pos * inv_freq[None, :]  # [length, ceil(dim / 2)]
    table = np.zeros((length, dim), np.float64)
    table[:, 0::2] = np.sin(angles)
    table[:, 1::2] = np.cos(angles[:, : dim // 2])
    return table.astype(np.float32)


class PositionEmbedding(nn.Module):
    """Adds position embeddings to a batch of token embeddings.

    Attributes:
        max_len: number of positions in the table; longer sequences are an error.
        kind: "sinusoidal" (fixed, no parameters) or "learned" (parameter `embedding`
            <[max_len, embed]>, logical axes ('length', 'embed')).
        embedding_init: initialiser of the learned table.
        dtype: computation dtype of the output.
        param_dtype: parameter storage dtype.
    """

    max_len: int
    kind: str = "sinusoidal"
    embedding_init: Callable[..., Array] = _position_init
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array, positions: Array | None = None) -> Array:
        """Adds the embedding of each position.

        Args:
            x: <float>[batch, length, embed].
            positions: <int>[batch, length] position of each token; default
                0..length-1 (used by KV-cache decoding, where a chunk starts later).

        Returns:
            <dtype>[batch, length, embed].

        Raises:
            ValueError: when `length` exceeds `max_len`.
        """
        if self.kind not in POSITION_KINDS:
            raise ConfigError(
                f"unknown position embedding {self.kind!r}; choose one of {POSITION_KINDS}"
            )
        length, dim = x.shape[-2], x.shape[-1]
        if length > self.max_len:
            raise ValueError(
                f"sequence of length {length} is longer than the position table "
                f"(max_len={self.max_len}); truncate the input or build the model with a "
                "larger max_len"
            )
        if self.kind == "learned":
            table = self.param(
                "embedding",
                nn.with_logical_partitioning(self.embedding_init, ("length", "embed")),
                (self.max_len, dim),
                self.param_dtype,
            )
        else:
            table = jnp.asarray(sinusoidal_positions(self.max_len, dim))
        table = jnp.asarray(table, self.dtype)
        if positions is None:
            y = add_positions(x.astype(self.dtype), table[:length])
        else:
            y = x.astype(self.dtype) + jnp.take(table, positions, axis=0, mode="clip")
        return nn.with_logical_constraint(y, EMBED_AXES)


class Mlp(nn.Module):
    """The Transformer feed-forward block: Dense -> activation -> dropout -> Dense.

    Parameters: `wi` kernel <[embed, hidden]> ('embed', 'mlp'), bias ('mlp',); `wo` kernel
    <[hidden, out]> ('mlp', 'embed'), bias ('embed',).

    Attributes:
        hidden_dim: width of the hidden layer.
        out_dim: output width; default the input width.
        activation: a name in `ACTIVATIONS`: "gelu" is GELU's tanh approximation (as in
          GPT-2), "gelu_exact" the erf form (BERT's "gelu", `jaxmodels.layers.gelu`).
        dropout_rate: dropout on the hidden activations in training.
        use_bias: biases in both layers.
        kernel_init: kernel initialiser (default Glorot uniform).
        dtype: computation dtype.
        param_dtype: parameter storage dtype.
    """

    hidden_dim: int
    out_dim: int | None = None
    activation: str = "gelu"
    dropout_rate: float = 0.0
    use_bias: bool = True
    kernel_init: Callable[..., Array] = _default_init
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array, deterministic: bool = True) -> Array:
        """x: <float>[..., embed] -> <dtype>[..., out_dim]."""
        act = _activation(self.activation)
        dense = partial(
            Dense, use_bias=self.use_bias, dtype=self.dtype, param_dtype=self.param_dtype
        )
        h = dense(
            self.hidden_dim,
            activation=act,
            kernel_init=nn.with_logical_partitioning(self.kernel_init, ("embed", "mlp")),
            bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("mlp",)),
            name="wi",
        )(x)
        if h.ndim == 3:
            h = nn.with_logical_constraint(h, ("batch", "length", "mlp"))
        h = Dropout(self.dropout_rate)(h, deterministic=deterministic)
        return dense(
            self.out_dim or x.shape[-1],
            kernel_init=nn.with_logical_partitioning(self.kernel_init, ("mlp", "embed")),
            bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("embed",)),
            name="wo",
        )(h)


class EncoderBlock(nn.Module):
    """Self-attention + MLP, each a residual branch, with pre- or post-LayerNorm.

    pre_norm:  x = x + Dropout(Attn(LN(x))); x = x + Dropout(Mlp(LN(x)))
    post_norm: x = LN(x + Dropout(Attn(x))); x = LN(x + Dropout(Mlp(x)))   (original / BERT)

    Submodules: `attention` (`MultiHeadAttention`), `attention_norm`, `mlp` (`Mlp`),
    `mlp_norm`.

    Attributes:
        num_heads: attention heads.
        mlp_dim: MLP hidden width.
        head_dim: size of each head; default embed // num_heads.
        dropout_rate: residual and MLP dropout in training.
        attention_dropout_rate: attention-probability dropout in training.
        pre_norm: LayerNorm before each branch (True) or after each residual sum (False).
        activation: MLP activation, a name in `ACTIVATIONS`.
        layer_norm_epsilon: LayerNorm epsilon.
        implementation: attention implementation (None = auto, "xla", "cudnn").
        kernel_init: initialiser of all kernels (default Glorot uniform).
        dtype: computation dtype.
        param_dtype: parameter storage dtype.
    """

    num_heads: int
    mlp_dim: int
    head_dim: int | None = None
    dropout_rate: float = 0.0
    attention_dropout_rate: float = 0.0
    pre_norm: bool = True
    activation: str = "gelu"
    layer_norm_epsilon: float = 1e-6
    implementation: str | None = None
    kernel_init: Callable[..., Array] = _default_init
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array, lengths: Array | None = None, deterministic: bool = True) -> Array:
        """x: <float>[batch, length, embed], lengths: <int>[batch] -> same shape as x."""
        attention = MultiHeadAttention(
            num_heads=self.num_heads,
            head_dim=self.head_dim,
            dropout_rate=self.attention_dropout_rate,
            implementation=self.implementation,
            kernel_init=self.kernel_init,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="attention",
        )
        x = _residual(
            self,
            x,
            lambda h: attention(h, kv_lengths=lengths, deterministic=deterministic),
            "attention_norm",
            deterministic,
        )
        return _residual(self, x, _mlp_branch(self, deterministic), "mlp_norm", deterministic)


def _mlp_branch(block: nn.Module, deterministic: bool) -> Callable[[Array], Array]:
    """The block's `mlp` submodule as a function of the (normalised) input."""
    mlp = Mlp(
        block.mlp_dim,
        activation=block.activation,
        dropout_rate=block.dropout_rate,
        kernel_init=block.kernel_init,
        dtype=block.dtype,
        param_dtype=block.param_dtype,
        name="mlp",
    )
    return lambda h: mlp(h, deterministic=deterministic)


def _residual(
    block: nn.Module, x: Array, branch: Callable[[Array], Array], norm: str, deterministic: bool
) -> Array:
    """x + Dropout(branch(LN(x))) (pre-norm) or LN(x + Dropout(branch(x))) (post-norm)."""
    ln = _layer_norm(block, norm)
    h = branch(ln(x) if block.pre_norm else x)
    h = Dropout(block.dropout_rate)(h, deterministic=deterministic)
    x = x + h
    if not block.pre_norm:
        x = ln(x)
    return nn.with_logical_constraint(x, EMBED_AXES)


class DecoderBlock(nn.Module):
    """Causal self-attention, cross-attention to an encoder output, MLP (pre/post-LN).

    Submodules: `self_attention`, `self_attention_norm`, `cross_attention`,
    `cross_attention_norm` (absent when `cross_attention` is False, as in a decoder-only
    LM), `mlp`, `mlp_norm`.

    Attributes:
        num_heads, mlp_dim, head_dim, dropout_rate, attention_dropout_rate, pre_norm,
        activation, layer_norm_epsilon, implementation, kernel_init, dtype, param_dtype:
            as in `EncoderBlock`.
        cross_attention: include the cross-attention branch.
        decode: keep a KV cache in the self-attention (see `MultiHeadAttention`).
    """

    num_heads: int
    mlp_dim: int
    head_dim: int | None = None
    dropout_rate: float = 0.0
    attention_dropout_rate: float = 0.0
    pre_norm: bool = True
    activation: str = "gelu"
    layer_norm_epsilon: float = 1e-6
    implementation: str | None = None
    kernel_init: Callable[..., Array] = _default_init
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    cross_attention: bool = True
    decode: bool = False

    @nn.compact
    def __call__(
        self,
        x: Array,
        encoded: Array | None = None,
        src_lengths: Array | None = None,
        tgt_lengths: Array | None = None,
        deterministic: bool = True,
    ) -> Array:
        """Runs the block.

        Args:
            x: <float>[batch, tgt_len, embed] decoder inputs.
            encoded: <float>[batch, src_len, embed_src] encoder output (cross-attention).
            src_lengths: <int>[batch] real source tokens (padded keys of `encoded`).
            tgt_lengths: <int>[batch] real target tokens; in decode mode the real tokens
                of this chunk.
            deterministic: True disables dropout.

        Returns:
            <dtype>[batch, tgt_len, embed].
        """
        attention = partial(
            MultiHeadAttention,
            num_heads=self.num_heads,
            head_dim=self.head_dim,
            dropout_rate=self.attention_dropout_rate,
            implementation=self.implementation,
            kernel_init=self.kernel_init,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
        )
        self_attention = attention(decode=self.decode, name="self_attention")
        x = _residual(
            self,
            x,
            lambda h: self_attention(
                h, kv_lengths=tgt_lengths, causal=True, deterministic=deterministic
            ),
            "self_attention_norm",
            deterministic,
        )
        if self.cross_attention:
            if encoded is None:
                raise ValueError(
                    "DecoderBlock with cross_attention=True needs the encoder output "
                    "`encoded`; build it with cross_attention=False for a decoder-only model"
                )
            cross = attention(name="cross_attention")
            x = _residual(
                self,
                x,
                lambda h: cross(h, encoded, kv_lengths=src_lengths, deterministic=deterministic),
                "cross_attention_norm",
                deterministic,
            )
        return _residual(self, x, _mlp_branch(self, deterministic), "mlp_norm", deterministic)


class _ScannedEncoderBlock(EncoderBlock):
    """`EncoderBlock` with the (carry, output) signature `nn.scan` needs."""

    def __call__(self, x, lengths=None, deterministic=True):
        return super().__call__(x, lengths, deterministic), None


class _ScannedDecoderBlock(DecoderBlock):
    """`DecoderBlock` with the (carry, output) signature `nn.scan` needs."""

    def __call__(self, x, encoded=None, src_lengths=None, tgt_lengths=None, deterministic=True):
        return super().__call__(x, encoded, src_lengths, tgt_lengths, deterministic), None


def _remat_policy(name: str) -> Callable[..., bool] | None:
    if name not in REMAT_POLICIES:
        raise ConfigError(
            f"unknown remat_policy {name!r}; choose one of {tuple(REMAT_POLICIES)} "
            "('none' disables rematerialisation)"
        )
    return REMAT_POLICIES[name]


def _stack_layers(
    parent: nn.Module,
    block_cls: type[nn.Module],
    scanned_cls: type[nn.Module],
    block_kwargs: dict[str, Any],
    x: Array,
    args: tuple[Any, ...],
    deterministic: bool,
) -> Array:
    """Applies `parent.num_layers` blocks as a loop or one `nn.scan`, with optional remat."""
    scan = parent.scan_layers
    cls = scanned_cls if scan else block_cls
    if parent.remat_policy not in (None, "none"):
        # deterministic (the last argument, after self and x) is a Python bool: static.
        cls = nn.remat(
            cls,
            policy=_remat_policy(parent.remat_policy),
            prevent_cse=not scan,
            static_argnums=(len(args) + 2,),
        )
    if scan:
        scanned = nn.scan(
            cls,
            variable_axes={"params": 0, "cache": 0, "intermediates": 0},
            split_rngs={"params": True, "dropout": True},
            in_axes=(nn.broadcast,) * (len(args) + 1),
            length=parent.num_layers,
            metadata_params={nn.PARTITION_NAME: "layers"},
        )
        x, _ = scanned(**block_kwargs, name="layers")(x, *args, deterministic)
        return x
    for i in range(parent.num_layers):
        x = cls(**block_kwargs, name=f"layers_{i}")(x, *args, deterministic)
    return x


def _block_kwargs(module: nn.Module) -> dict[str, Any]:
    names = (
        "num_heads",
        "mlp_dim",
        "head_dim",
        "dropout_rate",
        "attention_dropout_rate",
        "pre_norm",
        "activation",
        "layer_norm_epsilon",
        "implementation",
        "kernel_init",
        "dtype",
        "param_dtype",
    )
    return {n: getattr(module, n) for n in names}


class Encoder(nn.Module):
    """A stack of `EncoderBlock`s (plus a final LayerNorm when pre-norm).

    Attributes:
        num_layers: number of blocks.
        remat_policy: one of `REMAT_POLICIES`; "none" keeps all activations.
        scan_layers: run the blocks as one `nn.scan` (parameters under `layers`, stacked on
            a leading axis) instead of a Python loop (`layers_0`, `layers_1`, ...).
        other attributes: as in `EncoderBlock`.
    """

    num_layers: int
    num_heads: int
    mlp_dim: int
    head_dim: int | None = None
    dropout_rate: float = 0.0
    attention_dropout_rate: float = 0.0
    pre_norm: bool = True
    activation: str = "gelu"
    layer_norm_epsilon: float = 1e-6
    implementation: str | None = None
    kernel_init: Callable[..., Array] = _default_init
    remat_policy: str = "none"
    scan_layers: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array, lengths: Array | None = None, deterministic: bool = True) -> Array:
        """x: <float>[batch, length, embed] embeddings, lengths: <int>[batch] -> encoded."""
        x = _stack_layers(
            self,
            EncoderBlock,
            _ScannedEncoderBlock,
            _block_kwargs(self),
            x,
            (lengths,),
            deterministic,
        )
        if self.pre_norm:
            x = _layer_norm(self, "final_norm")(x)
        return x


class Decoder(nn.Module):
    """A stack of `DecoderBlock`s (plus a final LayerNorm when pre-norm).

    Attributes:
        num_layers: number of blocks.
        cross_attention: blocks attend to an encoder output (False for decoder-only LMs).
        decode: KV-cache decoding in the self-attention of every block.
        remat_policy, scan_layers: as in `Encoder`.
        other attributes: as in `EncoderBlock`.
    """

    num_layers: int
    num_heads: int
    mlp_dim: int
    head_dim: int | None = None
    dropout_rate: float = 0.0
    attention_dropout_rate: float = 0.0
    pre_norm: bool = True
    activation: str = "gelu"
    layer_norm_epsilon: float = 1e-6
    implementation: str | None = None
    kernel_init: Callable[..., Array] = _default_init
    remat_policy: str = "none"
    scan_layers: bool = False
    cross_attention: bool = True
    decode: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(
        self,
        x: Array,
        encoded: Array | None = None,
        src_lengths: Array | None = None,
        tgt_lengths: Array | None = None,
        deterministic: bool = True,
    ) -> Array:
        """x: <float>[batch, tgt_len, embed]; see `DecoderBlock` for the rest."""
        kwargs = _block_kwargs(self) | {
            "cross_attention": self.cross_attention,
            "decode": self.decode,
        }
        x = _stack_layers(
            self,
            DecoderBlock,
            _ScannedDecoderBlock,
            kwargs,
            x,
            (encoded, src_lengths, tgt_lengths),
            deterministic,
        )
        if self.pre_norm:
            x = _layer_norm(self, "final_norm")(x)
        return x


def _embed(module: nn.Module, vocab_size: int, name: str) -> Embed:
    return Embed(
        vocab_size,
        module.embed_dim,
        dtype=module.dtype,
        param_dtype=module.param_dtype,
        embedding_init=nn.with_logical_partitioning(
            nn.initializers.normal(1.0), ("vocab", "embed")
        ),
        name=name,
    )


def _output_projection(module: nn.Module, vocab_size: int, name: str) -> nn.Dense:
    return nn.Dense(
        vocab_size,
        dtype=module.dtype,
        param_dtype=module.param_dtype,
        kernel_init=nn.with_logical_partitioning(module.kernel_init, ("embed", "vocab")),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("vocab",)),
        name=name,
    )


def _logits(x: Array, embed: Embed | None, projection: nn.Dense | None) -> Array:
    """float32 logits from the tied embedding (scaled by 1/sqrt(embed)) or a projection."""
    if projection is not None:
        logits = projection(x)
    else:
        logits = embed.attend(x) / jnp.sqrt(jnp.asarray(x.shape[-1], x.dtype))
    logits = nn.with_logical_constraint(logits, ("batch", "length", "vocab"))
    return logits.astype(jnp.float32)


def _check_chunk_lengths(lengths: Array | None, batch: int, length: int, name: str) -> None:
    """Raises ValueError for the real-token counts `lengths` (called `name`) of a decode
    chunk of shape [batch, length] that are not <int>[batch] in [0, length].

    0 is allowed (a sequence that takes no step in this chunk). The shape is always
    checked; the values only when concrete (outside jit).
    """
    if lengths is None:
        return
    if jnp.shape(lengths) != (batch,):
        raise ValueError(
            f"{name} has shape {jnp.shape(lengths)} but the decode chunk has {batch} "
            f"sequences: pass one count of real chunk tokens per sequence, <int>[batch]"
        )
    if isinstance(lengths, jax.core.Tracer):
        return
    values = np.asarray(lengths)
    if values.size and (values.min() < 0 or values.max() > length):
        raise ValueError(
            f"{name} in decode mode counts the real tokens of the chunk and must lie in "
            f"[0, {length}] (the chunk length); found [{values.min()}, {values.max()}]: pass "
            "the lengths of this chunk, not of the whole sequence"
        )


def _decode_positions(
    module: nn.Module, batch: int, length: int, lengths: Array | None, name: str = "lengths"
) -> Array | None:
    """Positions <int32>[batch, length] of a chunk in KV-cache decoding.

    Keeps `position` <int32>[batch] (the next position of each sequence) in the `cache`
    collection of `module` and advances it by `lengths` (the chunk's real tokens, each in
    [0, length], checked when concrete and reported as `name`; default all `length`).
    Returns None in the sizing pass of `init`, which creates the cache (and sees positions
    0..length-1). Call it from a compact method.
    """
    _check_chunk_lengths(lengths, batch, length, name)
    initialized = module.has_variable("cache", "position")
    position = module.variable("cache", "position", jnp.zeros, (batch,), jnp.int32)
    if not initialized:
        return None
    start = position.value
    position.value = start + (length if lengths is None else jnp.asarray(lengths, jnp.int32))
    return start[:, None] + jnp.arange(length)[None, :]


class EncoderDecoder(nn.Module):
    """Sequence-to-sequence Transformer ("Attention is all you need", pre- or post-LN).

    Source and target tokens are right-padded and described by their lengths. The target
    input is the target shifted right (starting with a BOS token); the logits at position t
    predict target token t.

    Parameters: `src_embed` (`tgt_embed` too unless the vocabularies are shared) <[vocab,
    embed]> ('vocab', 'embed'), `src_pos` / `tgt_pos` (learned tables only), `encoder`,
    `decoder`, and `output` <[embed, tgt_vocab]> unless `tie_output`.

    KV-cache decoding of the target (`kv_cache=True`, or use `greedy_translate`): the same
    mechanism as `DecoderOnlyLM(decode=True)`, on the `decode` method. Encode the source once
    (`method=EncoderDecoder.encode`), create the cache with `init_cache(model, batch,
    tgt_len)`, then call `model.clone(kv_cache=True).apply({"params": ..., "cache": ...},
    encoded, src_lengths, chunk, chunk_lengths, method=EncoderDecoder.decode,
    mutable=["cache"])` with a chunk of target tokens (BOS first), usually one token at a
    time; `chunk_lengths` <int>[batch] (default: all) marks the chunk's real tokens, and the
    `cache` collection's `position` <int32>[batch] the next target position of each
    sequence. Only the decoder's self-attention is cached: the cross-attention projects the
    encoder output to keys/values again at every step (per layer, O(src_len * embed^2) work
    a step, no extra memory), which leaves `MultiHeadAttention` with one kind of cache.

    Attributes:
        vocab_size: source vocabulary (and target, when `tgt_vocab_size` is None).
        tgt_vocab_size: target vocabulary when different.
        embed_dim: model width.
        num_heads: attention heads.
        mlp_dim: MLP hidden width.
        num_encoder_layers: encoder blocks.
        num_decoder_layers: decoder blocks.
        max_len: longest source or target sequence (position table size).
        head_dim: size of each head; default embed_dim // num_heads.
        dropout_rate: residual / MLP / embedding dropout in training.
        attention_dropout_rate: attention-probability dropout in training.
        pre_norm: pre-LayerNorm (True) or the original post-LayerNorm (False).
        activation: MLP activation.
        position_embedding: "sinusoidal" or "learned".
        share_embeddings: one embedding table for source and target (same vocabulary).
        tie_output: logits from the target embedding (transposed) instead of a projection,
            divided by sqrt(embed_dim): `y @ tgt_embed.T / sqrt(embed_dim)`, no bias. For
            weights trained with unscaled tied logits, set tie_output=False and copy the
            table, transposed, into `output` (bias zero).
        remat_policy, scan_layers: as in `Encoder`.
        layer_norm_epsilon: LayerNorm epsilon.
        implementation: attention implementation (None = auto, "xla", "cudnn").
        kernel_init: initialiser of the dense kernels (default Glorot uniform).
        dtype: computation dtype.
        param_dtype: parameter storage dtype.
        kv_cache: KV-cache mode of the target side (see above; the `decode` field of
            `DecoderOnlyLM`, named differently because `decode` is a method here).

    Example:
        >>> import jax, jax.numpy as jnp
        >>> model = EncoderDecoder(vocab_size=20, embed_dim=16, num_heads=2, mlp_dim=32,
        ...                        num_encoder_layers=1, num_decoder_layers=1, max_len=8)
        >>> src, tgt = jnp.ones((2, 6), jnp.int32), jnp.ones((2, 5), jnp.int32)
        >>> src_len, tgt_len = jnp.array([6, 4]), jnp.array([5, 2])
        >>> variables = model.init(jax.random.key(0), src, src_len, tgt, tgt_len)
        >>> model.apply(variables, src, src_len, tgt, tgt_len).shape
        (2, 5, 20)
    """

    vocab_size: int
    embed_dim: int = 512
    num_heads: int = 8
    mlp_dim: int = 2048
    num_encoder_layers: int = 6
    num_decoder_layers: int = 6
    max_len: int = 512
    tgt_vocab_size: int | None = None
    head_dim: int | None = None
    dropout_rate: float = 0.1
    attention_dropout_rate: float = 0.0
    pre_norm: bool = True
    activation: str = "relu"
    position_embedding: str = "sinusoidal"
    share_embeddings: bool = True
    tie_output: bool = True
    remat_policy: str = "none"
    scan_layers: bool = False
    layer_norm_epsilon: float = 1e-6
    implementation: str | None = None
    kernel_init: Callable[..., Array] = _default_init
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    kv_cache: bool = False

    @property
    def target_vocab_size(self) -> int:
        return self.tgt_vocab_size or self.vocab_size

    def setup(self) -> None:
        _check_heads(self)
        if self.share_embeddings and self.target_vocab_size != self.vocab_size:
            raise ConfigError(
                f"share_embeddings needs one vocabulary, but vocab_size={self.vocab_size} "
                f"and tgt_vocab_size={self.tgt_vocab_size}; set share_embeddings=False"
            )
        self.src_embed = _embed(self, self.vocab_size, "src_embed")
        self.tgt_embed = (
            self.src_embed
            if self.share_embeddings
            else _embed(self, self.target_vocab_size, "tgt_embed")
        )
        position = partial(
            PositionEmbedding,
            self.max_len,
            kind=self.position_embedding,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
        )
        self.src_pos = position(name="src_pos")
        self.tgt_pos = position(name="tgt_pos")
        stack = dict(
            _block_kwargs(self),
            remat_policy=self.remat_policy,
            scan_layers=self.scan_layers,
        )
        self.encoder = Encoder(self.num_encoder_layers, **stack, name="encoder")
        self.decoder = Decoder(
            self.num_decoder_layers, **stack, decode=self.kv_cache, name="decoder"
        )
        self.output = (
            None if self.tie_output else _output_projection(self, self.target_vocab_size, "output")
        )
        self.dropout = Dropout(self.dropout_rate)

    def encode(self, src_tokens: Array, src_lengths: Array, train: bool = False) -> Array:
        """src_tokens: <int>[batch, src_len], src_lengths: <int>[batch] -> <dtype>[batch,
        src_len, embed]."""
        _check_tokens(src_tokens, self.vocab_size, "source token")
        x = self.src_pos(self.src_embed(src_tokens))
        x = self.dropout(x, deterministic=not train)
        return self.encoder(x, src_lengths, deterministic=not train)

    @nn.compact  # only for the `position` cache variable; the submodules come from setup
    def decode(
        self,
        encoded: Array,
        src_lengths: Array,
        tgt_in_tokens: Array,
        tgt_lengths: Array | None = None,
        train: bool = False,
    ) -> Array:
        """Decoder logits given the encoder output.

        Args:
            encoded: <dtype>[batch, src_len, embed] the output of `encode`.
            src_lengths: <int>[batch] real source tokens.
            tgt_in_tokens: <int>[batch, tgt_len] decoder input; with `kv_cache`, the next
                chunk of it (usually one token).
            tgt_lengths: <int>[batch] real target tokens (None: all); with `kv_cache`, the
                real tokens of the chunk, each in [0, chunk length] (ValueError otherwise,
                when concrete).
            train: enables dropout.

        Returns:
            <float32>[batch, tgt_len, tgt_vocab] logits.
        """
        _check_tokens(tgt_in_tokens, self.target_vocab_size, "target token")
        positions = None
        if self.kv_cache:
            positions = _decode_positions(self, *tgt_in_tokens.shape, tgt_lengths, "tgt_lengths")
        y = self.tgt_pos(self.tgt_embed(tgt_in_tokens), positions)
        y = self.dropout(y, deterministic=not train)
        y = self.decoder(y, encoded, src_lengths, tgt_lengths, deterministic=not train)
        return _logits(y, self.tgt_embed, self.output)

    def __call__(
        self,
        src_tokens: Array,
        src_lengths: Array,
        tgt_in_tokens: Array,
        tgt_lengths: Array | None = None,
        train: bool = False,
    ) -> Array:
        """Teacher-forced logits.

        Args:
            src_tokens: <int>[batch, src_len] right-padded source.
            src_lengths: <int>[batch] real source tokens.
            tgt_in_tokens: <int>[batch, tgt_len] decoder input (target shifted right).
            tgt_lengths: <int>[batch] real target tokens (None: all).
            train: enables dropout (needs a 'dropout' PRNG stream).

        Returns:
            <float32>[batch, tgt_len, tgt_vocab] logits.
        """
        encoded = self.encode(src_tokens, src_lengths, train)
        return self.decode(encoded, src_lengths, tgt_in_tokens, tgt_lengths, train)


class DecoderOnlyLM(nn.Module):
    """A GPT-style causal language model.

    Parameters: `embed` <[vocab, embed]> ('vocab', 'embed'), `pos` (learned table only),
    `decoder` (blocks without cross-attention), and `output` <[embed, vocab]> unless
    `tie_embeddings`.

    KV-cache decoding (`decode=True`, or use `generate`): create the cache with
    `model.clone(decode=True).init(rng, tokens)` on a [batch, total_len] input (it sizes
    each layer's cache; any values), then call `apply({"params": ..., "cache": ...},
    chunk, lengths, mutable=["cache"])` with a prompt chunk and then one token at a time.
    `lengths` <int>[batch] marks how many tokens of the chunk are real (0..chunk length),
    so right-padded prompts of different lengths continue at their own positions. The
    `cache` collection also holds `position` <int32>[batch], the next position of each
    sequence.

    Attributes:
        vocab_size: vocabulary size.
        embed_dim: model width.
        num_layers: decoder blocks.
        num_heads: attention heads.
        mlp_dim: MLP hidden width.
        max_len: longest sequence (position table and cache bound).
        head_dim: size of each head; default embed_dim // num_heads.
        dropout_rate: residual / MLP / embedding dropout in training.
        attention_dropout_rate: attention-probability dropout in training.
        pre_norm: pre-LayerNorm (GPT-2) or post-LayerNorm.
        activation: MLP activation.
        position_embedding: "learned" or "sinusoidal".
        tie_embeddings: logits from the token embedding (transposed) instead of a
            separate output projection, divided by sqrt(embed_dim): `x @ embed.T /
            sqrt(embed_dim)`, no bias. Weights trained with unscaled tied logits (GPT-2)
            would give logits sqrt(embed_dim) times too small: for them set
            tie_embeddings=False and copy the table, transposed, into `output` (bias zero).
        remat_policy, scan_layers: as in `Encoder`.
        layer_norm_epsilon: LayerNorm epsilon.
        implementation: attention implementation (None = auto, "xla", "cudnn").
        kernel_init: initialiser of the dense kernels (default Glorot uniform).
        dtype: computation dtype.
        param_dtype: parameter storage dtype.
        decode: KV-cache mode (see above).
    """

    vocab_size: int
    embed_dim: int = 512
    num_layers: int = 6
    num_heads: int = 8
    mlp_dim: int = 2048
    max_len: int = 1024
    head_dim: int | None = None
    dropout_rate: float = 0.0
    attention_dropout_rate: float = 0.0
    pre_norm: bool = True
    activation: str = "gelu"
    position_embedding: str = "learned"
    tie_embeddings: bool = True
    remat_policy: str = "none"
    scan_layers: bool = False
    layer_norm_epsilon: float = 1e-6
    implementation: str | None = None
    kernel_init: Callable[..., Array] = _default_init
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    decode: bool = False

    @nn.compact
    def __call__(self, tokens: Array, lengths: Array | None = None, train: bool = False) -> Array:
        """Next-token logits.

        Args:
            tokens: <int>[batch, length] right-padded tokens (in decode mode: the chunk).
            lengths: <int>[batch] real tokens per sequence (None: all); in decode mode, the
                real tokens of the chunk, each in [0, length] (ValueError otherwise, when
                concrete).
            train: enables dropout (needs a 'dropout' PRNG stream).

        Returns:
            <float32>[batch, length, vocab]: the logits at t predict token t + 1.
        """
        _check_heads(self)
        _check_tokens(tokens, self.vocab_size)
        batch, length = tokens.shape
        embed = _embed(self, self.vocab_size, "embed")
        positions = _decode_positions(self, batch, length, lengths) if self.decode else None
        x = PositionEmbedding(
            self.max_len,
            kind=self.position_embedding,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="pos",
        )(embed(tokens), positions)
        x = Dropout(self.dropout_rate)(x, deterministic=not train)
        x = Decoder(
            self.num_layers,
            **_block_kwargs(self),
            remat_policy=self.remat_policy,
            scan_layers=self.scan_layers,
            cross_attention=False,
            decode=self.decode,
            name="decoder",
        )(x, None, None, lengths, deterministic=not train)
        projection = (
            None if self.tie_embeddings else _output_projection(self, self.vocab_size, "output")
        )
        return _logits(x, embed, projection)


def _sample(
    logits: Array, rng: Array, temperature: Array | float, top_k: int | None, greedy: bool
) -> Array:
    """Next tokens <int32>[batch] from logits <float32>[batch, vocab]."""
    if greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / temperature
    if top_k is not None:  # exactly k tokens, ties with the k-th included or not by index
        top = jax.lax.top_k(logits, top_k)[1]
        keep = jnp.zeros(logits.shape, bool).at[jnp.arange(logits.shape[0])[:, None], top].set(True)
        logits = jnp.where(keep, logits, -jnp.inf)
    return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


def _cached(model: DecoderOnlyLM | EncoderDecoder) -> DecoderOnlyLM | EncoderDecoder:
    """The model's KV-cache decoding variant."""
    if isinstance(model, EncoderDecoder):
        return model.clone(kv_cache=True)
    return model.clone(decode=True)


def init_cache(model: DecoderOnlyLM | EncoderDecoder, batch: int, length: int) -> Any:
    """An empty KV cache (all zeros) for `batch` sequences of up to `length` tokens.

    For an `EncoderDecoder`, `length` counts target (decoder input) tokens; the cache does
    not depend on the source.
    """
    decoder = _cached(model)
    tokens = jnp.zeros((batch, length), jnp.int32)
    if isinstance(model, EncoderDecoder):  # the decoder alone, on a stand-in encoder output
        encoded = jnp.zeros((batch, 1, model.embed_dim), model.dtype)
        ones = jnp.ones((batch,), jnp.int32)
        init = lambda: decoder.init(
            jax.random.key(0), encoded, ones, tokens, method=EncoderDecoder.decode
        )
    else:
        init = lambda: decoder.init(jax.random.key(0), tokens)
    shapes = jax.eval_shape(init)["cache"]
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


@partial(jax.jit, static_argnames=("model", "max_new_tokens", "top_k", "greedy"))
def _generate(
    model: DecoderOnlyLM,
    params: Any,
    prompt: Array,
    prompt_lengths: Array,
    rng: Array,
    temperature: Array,
    max_new_tokens: int,
    top_k: int | None,
    greedy: bool,
) -> Array:
    decoder = _cached(model)
    batch, prompt_len = prompt.shape
    # The last new token is returned, never fed back: the cache holds the prompt and the
    # first max_new_tokens - 1 new tokens.
    cache = init_cache(model, batch, prompt_len + max_new_tokens - 1)

    def step(cache: Any, tokens: Array, lengths: Array | None) -> tuple[Any, Array]:
        logits, mutated = decoder.apply(
            {"params": params, "cache": cache}, tokens, lengths, mutable=["cache"]
        )
        return mutated["cache"], logits

    cache, logits = step(cache, prompt, prompt_lengths)  # prefill the whole prompt at once
    last = jnp.take_along_axis(logits, (prompt_lengths - 1)[:, None, None], axis=1)[:, 0]
    keys = jax.random.split(rng, max_new_tokens)
    first = _sample(last, keys[0], temperature, top_k, greedy)

    def body(carry: tuple[Any, Array], key: Array) -> tuple[tuple[Any, Array], Array]:
        cache, token = carry
        cache, logits = step(cache, token[:, None], None)
        nxt = _sample(logits[:, 0], key, temperature, top_k, greedy)
        return (cache, nxt), nxt

    _, rest = jax.lax.scan(body, (cache, first), keys[1:])
    return jnp.concatenate([first[:, None], rest.T], axis=1)


def generate(
    model: DecoderOnlyLM,
    params: Any,
    prompt: Array,
    prompt_lengths: Array | None = None,
    *,
    max_new_tokens: int,
    rng: Array | None = None,
    temperature: float = 1.0,
    top_k: int | None = None,
    greedy: bool = False,
) -> Array:
    """Autoregressive sampling from a `DecoderOnlyLM` with a KV cache, compiled with `jit`.

    The prompt is run through the model in one call (prefill), then each new token in one
    step of a `lax.scan`, attending to the cache. Right-padded prompts of different lengths
    each continue right after their own last token.

    Args:
        model: the (non-decode) model; its `decode` variant is derived.
        params: the model's parameters (`variables["params"]`).
        prompt: <int>[batch, prompt_len] right-padded prompts.
        prompt_lengths: <int>[batch] real prompt tokens, >= 1 (default: prompt_len).
        max_new_tokens: tokens to generate; prompt_len + max_new_tokens - 1 <= model.max_len
            (the last new token is returned, never fed back, so it needs no position).
        rng: PRNG key for sampling (unused, and optional, when `greedy`).
        temperature: divides the logits before sampling; > 0 (`greedy` for the limit 0).
        top_k: sample only among the k most likely tokens (None: all); of tokens tied with
            the k-th, those of lower id.
        greedy: take the most likely token (deterministic).

    Returns:
        <int32>[batch, max_new_tokens] the generated tokens (without the prompt).

    Raises:
        ValueError: when the prompt plus all new tokens but the last do not fit in
            `max_len`, or the arguments are inconsistent.
    """
    if not isinstance(model, DecoderOnlyLM):
        hint = (
            "; an EncoderDecoder decodes with greedy_translate"
            if isinstance(model, EncoderDecoder)
            else ""
        )
        raise TypeError(f"generate samples from a DecoderOnlyLM, got {type(model).__name__}{hint}")
    prompt = jnp.asarray(prompt, jnp.int32)
    _check_tokens(prompt, model.vocab_size, "prompt token")
    batch, prompt_len = prompt.shape
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if prompt_len + max_new_tokens - 1 > model.max_len:
        raise ValueError(
            f"prompt length {prompt_len} + max_new_tokens {max_new_tokens} - 1 (the last new "
            f"token is not fed back) exceeds the model's max_len={model.max_len}; shorten the "
            "prompt or generate fewer tokens"
        )
    if top_k is not None and not 1 <= top_k <= model.vocab_size:
        raise ValueError(f"top_k must lie in [1, vocab_size={model.vocab_size}], got {top_k}")
    if not greedy and rng is None:
        raise ValueError("sampling needs an rng key; pass rng=... or greedy=True")
    if not greedy and not isinstance(temperature, jax.core.Tracer) and not temperature > 0:
        raise ValueError(
            f"temperature must be > 0, got {temperature}; for the most likely token at every "
            "step pass greedy=True"
        )
    if prompt_lengths is None:
        prompt_lengths = jnp.full((batch,), prompt_len, jnp.int32)
    check_lengths(prompt_lengths, batch, prompt_len, "prompt_lengths")
    prompt_lengths = jnp.asarray(prompt_lengths, jnp.int32)
    if rng is None:
        rng = jax.random.key(0)
    return _generate(
        model.clone(decode=False),
        params,
        prompt,
        prompt_lengths,
        rng,
        jnp.asarray(temperature, jnp.float32),
        max_new_tokens,
        top_k,
        greedy,
    )


@partial(jax.jit, static_argnames=("model", "max_length", "bos_id", "eos_id", "pad_id"))
def _greedy_translate(
    model: EncoderDecoder,
    params: Any,
    src_tokens: Array,
    src_lengths: Array,
    max_length: int,
    bos_id: int,
    eos_id: int | None,
    pad_id: int,
) -> Array:
    batch = src_tokens.shape[0]
    variables = {"params": params}
    encoded = model.apply(variables, src_tokens, src_lengths, method=EncoderDecoder.encode)
    decoder = _cached(model)
    cache = init_cache(model, batch, max_length)

    def body(carry: tuple[Any, Array, Array], _: None) -> tuple[tuple[Any, Array, Array], Array]:
        cache, token, done = carry
        logits, mutated = decoder.apply(
            {"params": params, "cache": cache},
            encoded,
            src_lengths,
            token[:, None],
            method=EncoderDecoder.decode,
            mutable=["cache"],
        )
        nxt = jnp.argmax(logits[:, 0], axis=-1).astype(jnp.int32)
        if eos_id is not None:
            nxt = jnp.where(done, pad_id, nxt)
            done = done | (nxt == eos_id)
        return (mutated["cache"], nxt, done), nxt

    first = jnp.full((batch,), bos_id, jnp.int32)
    done = jnp.zeros((batch,), bool)
    _, tokens = jax.lax.scan(body, (cache, first, done), None, length=max_length)
    return tokens.T


def greedy_translate(
    model: EncoderDecoder,
    params: Any,
    src_tokens: Array,
    src_lengths: Array | None = None,
    *,
    max_length: int,
    bos_id: int,
    eos_id: int | None = None,
    pad_id: int = 0,
) -> Array:
    """Greedy decoding of an `EncoderDecoder` with a KV cache, compiled with `jit`.

    The source is encoded once; then each target token is one step of a `lax.scan` that
    feeds the previous token (BOS first) to the decoder, attending to the cached keys/values
    of the earlier target tokens (the cross-attention recomputes its keys/values from the
    encoder output, see `EncoderDecoder`). The result equals re-running the teacher-forced
    decoder over the growing target and taking the argmax at its last position.

    Args:
        model: the (non-cache) model; its `kv_cache` variant is derived.
        params: the model's parameters (`variables["params"]`).
        src_tokens: <int>[batch, src_len] right-padded source.
        src_lengths: <int>[batch] real source tokens, >= 1 (default: src_len).
        max_length: target tokens to decode (EOS included); at most `model.max_len`.
        bos_id: the first decoder input.
        eos_id: when given, every token after a sequence's first `eos_id` is `pad_id`.
            None: decode all `max_length` tokens.
        pad_id: the token after EOS.

    Returns:
        <int32>[batch, max_length]: position t holds the token decoded after BOS and the t
        tokens before it.

    Raises:
        ValueError: when `max_length` does not fit the position table, or the arguments are
            inconsistent.
    """
    src_tokens = jnp.asarray(src_tokens, jnp.int32)
    _check_tokens(src_tokens, model.vocab_size, "source token")
    batch, src_len = src_tokens.shape
    if not 1 <= max_length <= model.max_len:
        raise ValueError(
            f"max_length must lie in [1, max_len={model.max_len}] (the model's position "
            f"table), got {max_length}"
        )
    if src_lengths is None:
        src_lengths = jnp.full((batch,), src_len, jnp.int32)
    check_lengths(src_lengths, batch, src_len, "src_lengths")
    src_lengths = jnp.asarray(src_lengths, jnp.int32)
    for name, value in (("bos_id", bos_id), ("eos_id", eos_id), ("pad_id", pad_id)):
        if value is not None and not 0 <= value < model.target_vocab_size:
            raise ValueError(
                f"{name}={value} is not a target token id in [0, {model.target_vocab_size})"
            )
    return _greedy_translate(
        model.clone(kv_cache=False),
        params,
        src_tokens,
        src_lengths,
        max_length,
        bos_id,
        eos_id,
        pad_id,
    )
