"""BERT: the encoder, masked-LM + next-sentence pretraining, sequence classification.

The architecture is the original post-LayerNorm BERT (Devlin et al., 2018), layer by layer
the same function as Hugging Face `transformers`' `BertModel`, so its checkpoints load
(`from_pretrained`) and ours save back (`save_pretrained`).

Sizes are named presets (`BertConfig.preset`), the published ones:

| preset | layers | hidden | heads | parameters (`BertModel`) |
|--------|--------|--------|-------|--------------------------|
| tiny   | 2      | 128    | 2     | 4.4M                     |
| mini   | 4      | 256    | 4     | 11.2M                    |
| small  | 4      | 512    | 8     | 28.8M                    |
| medium | 8      | 512    | 8     | 41.4M                    |
| base   | 12     | 768    | 12    | 109.5M                   |
| large  | 24     | 1024   | 16    | 335.1M                   |

(intermediate size 4 x hidden, vocabulary 30522, 512 positions.)

Padding. The models take either `lengths` <int>[batch] (real tokens form a prefix of each
row: the usual case) or a Hugging Face style `attention_mask` <int>[batch, length] (1 = real
token). A concrete (not traced) `attention_mask` that is a prefix mask is turned into
lengths, which lets attention use its fast sequence-length path (cuDNN on GPU); any other
mask, or any mask under `jit` (its values cannot be inspected while tracing), is applied as
a general key mask, which gives the same numbers, except with `implementation="pallas"`,
whose kernels take padding as lengths only: there such a mask is a ValueError. Inside a
jitted train step, pass `lengths` for the fast path.

The MLM head runs only on the masked positions: `BertForPreTraining` gathers the
`masked_positions` <int>[batch, P] of each example before the transform and the vocabulary
projection, so the [batch, length, vocab] logits are never formed.

Parameters carry logical axis names (`vocab`, `embed`, `heads`, `kv`, `mlp`) and the hidden
states are constrained to (`batch`, `length`, `embed`); see `jaxmodels.sharding`.

Example:
  >>> import jax, jax.numpy as jnp
  >>> config = BertConfig.preset("tiny", vocab_size=100, max_position_embeddings=32)
  >>> model = BertForPreTraining(config)
  >>> input_ids = jnp.ones((2, 16), jnp.int32)
  >>> lengths = jnp.array([16, 9])
  >>> positions = jnp.array([[1, 2, 3], [4, 5, 0]])
  >>> variables = model.init(jax.random.PRNGKey(0), input_ids, lengths=lengths)
  >>> mlm_logits, nsp_logits = model.apply(
  ...     variables, input_ids, lengths=lengths, masked_positions=positions)
  >>> mlm_logits.shape, nsp_logits.shape
  ((2, 3, 100), (2, 2))
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
import warnings
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxmodels import layers, losses
from jaxmodels.attention import IMPLEMENTATIONS, MultiHeadAttention
from jaxmodels.errors import CheckpointError, ConfigError
from jaxmodels.layers import (
    Dense,
    Dropout,
    Embed,
    add_positions,
    drop_threshold,
    dropout_mask,
    gelu,
    silu,
)

__all__ = [
    "ACTIVATIONS",
    "PRESETS",
    "REMAT_POLICIES",
    "RUNTIME_FIELDS",
    "BertConfig",
    "BertEmbeddings",
    "BertLayer",
    "BertEncoder",
    "BertPooler",
    "BertModel",
    "BertMLMHead",
    "BertForPreTraining",
    "BertForSequenceClassification",
    "Pretrained",
    "pretraining_loss",
    "from_pretrained",
    "layer_layout",
    "stack_layers",
    "unstack_layers",
    "save_pretrained",
]

Dtype = Any
Array = jax.Array

# name: (num_layers, hidden_size, num_heads); intermediate_size = 4 * hidden_size.
PRESETS: dict[str, tuple[int, int, int]] = {
    "tiny": (2, 128, 2),
    "mini": (4, 256, 4),
    "small": (4, 512, 8),
    "medium": (8, 512, 8),
    "base": (12, 768, 12),
    "large": (24, 1024, 16),
}

ACTIVATIONS: dict[str, Callable[[Array], Array]] = {
    "gelu": gelu,  # exact (erf), as in BERT
    "gelu_new": functools.partial(gelu, approximate=True),
    "gelu_pytorch_tanh": functools.partial(gelu, approximate=True),
    "relu": jax.nn.relu,
    "silu": silu,
    "swish": silu,
}

# None / "none": keep all activations; the others: see `layers.REMAT_POLICIES` (the one
# table of both BERT and the Transformers).
REMAT_POLICIES = layers.REMAT_POLICIES

# Our field -> the Hugging Face `config.json` key.
_HF_KEYS = {
    "vocab_size": "vocab_size",
    "hidden_size": "hidden_size",
    "num_layers": "num_hidden_layers",
    "num_heads": "num_attention_heads",
    "intermediate_size": "intermediate_size",
    "max_position_embeddings": "max_position_embeddings",
    "type_vocab_size": "type_vocab_size",
    "hidden_dropout": "hidden_dropout_prob",
    "attention_dropout": "attention_probs_dropout_prob",
    "layer_norm_eps": "layer_norm_eps",
    "hidden_act": "hidden_act",
    "initializer_range": "initializer_range",
    "classifier_dropout": "classifier_dropout",
}
# Fields that define the function and the parameter shapes (not run-time choices).
# BertConfig fields that change how the model runs, not its parameters: a checkpoint can be
# loaded with any values of these (`from_pretrained(**overrides)`).
RUNTIME_FIELDS = (
    "dtype",
    "param_dtype",
    "implementation",
    "remat_policy",
    "scan_layers",
    "hidden_dropout",
    "attention_dropout",
    "classifier_dropout",
)
_DROPOUT_FIELDS = ("hidden_dropout", "attention_dropout", "classifier_dropout")

_SIZE_FIELDS = (
    "vocab_size",
    "hidden_size",
    "num_layers",
    "num_heads",
    "intermediate_size",
    "max_position_embeddings",
    "type_vocab_size",
)
_ARCH_FIELDS = (*_SIZE_FIELDS, "layer_norm_eps", "hidden_act")


@dataclasses.dataclass(frozen=True)
class BertConfig:
    """BERT hyperparameters; the defaults are BERT-base (uncased vocabulary).

    Attributes:
      vocab_size: WordPiece vocabulary size V.
      hidden_size: H, the width of the residual stream.
      num_layers: L, the number of Transformer layers.
      num_heads: A, attention heads (H must be divisible by A; head size H / A).
      intermediate_size: width of the feed-forward layer (4H in every published size).
      max_position_embeddings: rows of the learned position table: the longest sequence.
      type_vocab_size: token types (segments A / B).
      hidden_dropout: dropout on embeddings, attention and feed-forward outputs.
      attention_dropout: dropout on the attention probabilities.
      classifier_dropout: dropout on the pooled output `BertForSequenceClassification`
        classifies; None: hidden_dropout (as Hugging Face's `classifier_dropout`).
      layer_norm_eps: LayerNorm epsilon.
      hidden_act: feed-forward and MLM-transform activation, one of `ACTIVATIONS`
        ("gelu" is the exact erf form, Hugging Face's "gelu").
      initializer_range: standard deviation of the normal initialisers.
      dtype: computation dtype (e.g. jnp.bfloat16); logits and losses are float32.
      param_dtype: parameter storage dtype.
      implementation: attention implementation passed to `MultiHeadAttention`, one of
        None, "xla", "cudnn", "pallas" (None: cuDNN on GPU with bfloat16 when attention
        dropout is off, else XLA; "pallas": fused kernels that also do the attention
        dropout, see `jaxmodels.pallas_attention`).
      remat_policy: rematerialisation of each layer in the backward pass, one of
        `REMAT_POLICIES` or None (none).
      scan_layers: run the layers as one `nn.scan` (parameters stacked under
        `encoder/layers`): one layer is compiled instead of `num_layers`, so the step
        compiles several times faster. The same function as the unrolled layers (only
        the dropout masks are drawn differently).
    """

    vocab_size: int = 30522
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    intermediate_size: int = 3072
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    hidden_dropout: float = 0.1
    attention_dropout: float = 0.1
    layer_norm_eps: float = 1e-12
    hidden_act: str = "gelu"
    initializer_range: float = 0.02
    classifier_dropout: float | None = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    implementation: str | None = None
    remat_policy: str | None = None
    scan_layers: bool = False

    def __post_init__(self) -> None:
        for name in _SIZE_FIELDS:
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.hidden_size % self.num_heads:
            raise ConfigError(
                f"hidden_size {self.hidden_size} is not divisible by num_heads "
                f"{self.num_heads}; choose num_heads dividing hidden_size"
            )
        for name in _DROPOUT_FIELDS:
            rate = getattr(self, name)
            if rate is not None and not 0 <= rate < 1:
                raise ConfigError(f"{name} must be in [0, 1), got {rate}")
        if self.hidden_act not in ACTIVATIONS:
            raise ConfigError(
                f"hidden_act {self.hidden_act!r} is not supported; use one of {sorted(ACTIVATIONS)}"
            )
        if self.remat_policy is not None and self.remat_policy not in REMAT_POLICIES:
            raise ConfigError(
                f"remat_policy {self.remat_policy!r} is unknown; use None or one of "
                f"{sorted(REMAT_POLICIES)}"
            )
        if self.implementation not in IMPLEMENTATIONS:
            raise ConfigError(
                f"implementation {self.implementation!r} is unknown; use one of "
                f"{list(IMPLEMENTATIONS)}"
            )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> BertConfig:
        """The published size `name` (see `PRESETS`), with any field overridden.

        Example:
          >>> BertConfig.preset("base").hidden_size
          768
        """
        if name not in PRESETS:
            raise ConfigError(f"unknown BERT preset {name!r}; choose one of {list(PRESETS)}")
        layers, hidden, heads = PRESETS[name]
        fields = dict(
            num_layers=layers, hidden_size=hidden, num_heads=heads, intermediate_size=4 * hidden
        )
        fields.update(overrides)
        return cls(**fields)

    @classmethod
    def from_hf_dict(cls, hf: Mapping[str, Any], **overrides: Any) -> BertConfig:
        """Builds a config from a Hugging Face `config.json` dict (`transformers.BertConfig`).

        Raises:
          ConfigError: when the dict describes a model this implementation does not compute
            (not BERT, relative positions, a decoder, cross-attention).
        """
        model_type = hf.get("model_type", "bert")
        if model_type != "bert":
            raise ConfigError(f"model_type is {model_type!r}, not 'bert'")
        position = hf.get("position_embedding_type", "absolute")
        if position != "absolute":
            raise ConfigError(
                f"position_embedding_type {position!r} is not supported (only 'absolute')"
            )
        for flag in ("is_decoder", "add_cross_attention"):
            if hf.get(flag):
                raise ConfigError(f"{flag}=true is not supported: BERT here is an encoder only")
        fields = {ours: hf[theirs] for ours, theirs in _HF_KEYS.items() if theirs in hf}
        fields.update(overrides)
        return cls(**fields)

    def to_hf_dict(self) -> dict[str, Any]:
        """The Hugging Face `config.json` dict of this config (architecture fields)."""
        hf = {theirs: getattr(self, ours) for ours, theirs in _HF_KEYS.items()}
        hf.update(model_type="bert", position_embedding_type="absolute", pad_token_id=0)
        return hf


# ----------------------------------------------------------------------------- modules


def _dense(
    config: BertConfig,
    features: int,
    axes: tuple[str | None, str | None],
    name: str,
    activation: Callable[[Array], Array] | None = None,
) -> nn.Dense:
    return Dense(
        features,
        activation=activation,
        dtype=config.dtype,
        param_dtype=config.param_dtype,
        kernel_init=nn.with_logical_partitioning(
            nn.initializers.normal(config.initializer_range), axes
        ),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, axes[1:]),
        name=name,
    )


def _layer_norm(config: BertConfig, name: str) -> nn.LayerNorm:
    return nn.LayerNorm(
        epsilon=config.layer_norm_eps,
        dtype=config.dtype,
        param_dtype=config.param_dtype,
        scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("embed",)),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)),
        name=name,
    )


def _embed(config: BertConfig, rows: int, axes: tuple[str | None, str], name: str) -> Embed:
    return Embed(
        rows,
        config.hidden_size,
        dtype=config.dtype,
        param_dtype=config.param_dtype,
        embedding_init=nn.with_logical_partitioning(
            nn.initializers.normal(config.initializer_range), axes
        ),
        name=name,
    )


def _constrain(x: Array) -> Array:
    return nn.with_logical_constraint(x, ("batch", "length", "embed"))


class BertEmbeddings(nn.Module):
    """Word + position + token-type embeddings, then LayerNorm and dropout.

    Parameters: `word_embeddings/embedding` <[vocab, embed]> (also the MLM decoder: see
    `attend`), `position_embeddings/embedding` <[max_position_embeddings, embed]>,
    `token_type_embeddings/embedding` <[type_vocab_size, embed]>, `norm/{scale,bias}`.

    Attributes:
      config: the sizes, dtypes and rates.
    """

    config: BertConfig

    def setup(self) -> None:
        c = self.config
        self.word_embeddings = _embed(c, c.vocab_size, ("vocab", "embed"), "word_embeddings")
        self.position_embeddings = _embed(
            c, c.max_position_embeddings, (None, "embed"), "position_embeddings"
        )
        self.token_type_embeddings = _embed(
            c, c.type_vocab_size, (None, "embed"), "token_type_embeddings"
        )
        self.norm = _layer_norm(c, "norm")
        self.dropout = Dropout(c.hidden_dropout)

    def __call__(
        self, input_ids: Array, token_type_ids: Array, deterministic: bool = True
    ) -> Array:
        """input_ids, token_type_ids: <int>[batch, length] -> <dtype>[batch, length, embed]."""
        # Positions 0..length-1: a slice of the table (no gather, no scatter-add gradient).
        positions = self.position_embeddings.embedding[: input_ids.shape[1]]
        x = add_positions(
            self.word_embeddings(input_ids) + self.token_type_embeddings(token_type_ids),
            positions.astype(self.config.dtype),
        )
        x = self.norm(x)
        return _constrain(self.dropout(x, deterministic=deterministic))

    def attend(self, x: Array) -> Array:
        """Projects <[..., embed]> onto the vocabulary with the word embeddings (tied decoder):
        <dtype>[..., vocab], accumulated in float32 and rounded to `dtype` (as under PyTorch's
        autocast). In bfloat16 this halves what the loss's passes over the logits read (BERT's
        MLM logits are 5120 x 30522 at batch 256); the loss upcasts them.
        """
        table = self.word_embeddings.embedding
        dtype = self.config.dtype
        dims = (((x.ndim - 1,), (1,)), ((), ()))
        return jax.lax.dot_general(x.astype(dtype), table.astype(dtype), dims)


class BertLayer(nn.Module):
    """One post-LayerNorm Transformer encoder layer.

    x -> self-attention -> dropout -> LayerNorm(x + .) = y;
    y -> dense(intermediate) -> act -> dense(hidden) -> dropout -> LayerNorm(y + .).

    Parameters: `attention/{query,key,value}/kernel` <[embed, heads, kv]>, `.../bias`
    <[heads, kv]>, `attention/out/kernel` <[heads, kv, embed]>, `attention/out/bias`
    <[embed]>, `attention_norm`, `intermediate` <[embed, mlp]>, `output` <[mlp, embed]>,
    `output_norm`.

    Attributes:
      config: the sizes, dtypes, rates and activation.
    """

    config: BertConfig

    @nn.compact
    def __call__(
        self,
        x: Array,
        kv_lengths: Array | None = None,
        mask: Array | None = None,
        deterministic: bool = True,
        dropout_keeps: tuple[Array | None, Array | None, Array | None] | None = None,
    ) -> Array:
        """Args:
          x: <dtype>[batch, length, embed].
          kv_lengths: <int>[batch] real tokens per row (a prefix), or None.
          mask: <bool>[batch, 1, 1, length] keys to attend to, or None.
          deterministic: disables dropout.
          dropout_keeps: masks drawn before for the attention dropout (<bool>[batch, heads,
            length, length]) and the two hidden-state dropouts (<bool>[batch, length,
            embed]), each None to draw it here (see `BertEncoder`).

        Returns:
          <dtype>[batch, length, embed].
        """
        c = self.config
        attention = MultiHeadAttention(
            num_heads=c.num_heads,
            head_dim=c.head_dim,
            dropout_rate=c.attention_dropout,
            implementation=c.implementation,
            dtype=c.dtype,
            param_dtype=c.param_dtype,
            kernel_init=nn.initializers.normal(c.initializer_range),
            name="attention",
        )
        keeps = dropout_keeps or (None, None, None)
        h = attention(
            x, kv_lengths=kv_lengths, mask=mask, deterministic=deterministic, dropout_keep=keeps[0]
        )
        h = Dropout(c.hidden_dropout)(h, deterministic=deterministic, keep=keeps[1])
        x = _layer_norm(c, "attention_norm")(x + h)
        act = ACTIVATIONS[c.hidden_act]
        h = _dense(c, c.intermediate_size, ("embed", "mlp"), "intermediate", act)(x)
        h = _dense(c, c.hidden_size, ("mlp", "embed"), "output")(h)
        h = Dropout(c.hidden_dropout)(h, deterministic=deterministic, keep=keeps[2])
        return _constrain(_layer_norm(c, "output_norm")(x + h))


class _ScannedBertLayer(BertLayer):
    """`BertLayer` with the (carry, output) signature `nn.scan` needs."""

    def __call__(self, x, kv_lengths=None, mask=None, deterministic=True):
        return super().__call__(x, kv_lengths, mask, deterministic), None


class BertEncoder(nn.Module):
    """`num_layers` `BertLayer`s, rematerialised per `config.remat_policy`.

    Parameters: `layer_0`, `layer_1`, ... or, with `config.scan_layers`, one `layers` tree
    whose arrays are stacked on a leading `layers` axis (`stack_layers` / `unstack_layers`
    convert between the two).

    In training, unrolled layers get their hidden-state dropout masks from one draw for all
    layers, each layer a slice (their attention draws its own). Compiled, every draw is a
    threefry computation that XLA optimises and compiles on its own: with a draw per layer
    and dropout, dropout more than doubled BERT-base's compilation for an H200 (15.1 s
    without, 35.4 s with); drawing the hidden-state masks at once takes it from about 36 to
    29 s, for 0.5% more kernel I/O (`benchmarks/RESULTS.md`, 2026-11-30). Scanned layers
    draw their own (one computation in the loop body).

    Attributes:
      config: the sizes, dtypes, rates, remat policy and layout.
    """

    config: BertConfig

    @nn.compact
    def __call__(
        self,
        x: Array,
        kv_lengths: Array | None = None,
        mask: Array | None = None,
        deterministic: bool = True,
    ) -> Array:
        """x: <dtype>[batch, length, embed]; kv_lengths, mask: see `BertLayer`."""
        c = self.config
        scan = c.scan_layers
        layer_cls = _ScannedBertLayer if scan else BertLayer
        if c.remat_policy not in (None, "none"):
            # static_argnums counts `self` as 0: `deterministic` is argument 4.
            layer_cls = nn.remat(
                layer_cls,
                policy=REMAT_POLICIES[c.remat_policy],
                prevent_cse=not scan,
                static_argnums=(4,),
            )
        if scan:
            layers = nn.scan(
                layer_cls,
                variable_axes={"params": 0, "intermediates": 0},
                split_rngs={"params": True, "dropout": True},
                in_axes=(nn.broadcast,) * 3,  # kv_lengths, mask, deterministic
                length=c.num_layers,
                metadata_params={nn.PARTITION_NAME: "layers"},
            )
            x, _ = layers(c, name="layers")(x, kv_lengths, mask, deterministic)
            return x
        keeps = self._dropout_masks(x) if not deterministic else [None] * c.num_layers
        for i in range(c.num_layers):
            x = layer_cls(c, name=f"layer_{i}")(x, kv_lengths, mask, deterministic, keeps[i])
        return x

    def _dropout_masks(self, x: Array) -> list[tuple[None, Array, Array] | None]:
        """Each layer's (attention: drawn in the layer, hidden, hidden) dropout masks,
        sliced from one draw."""
        c = self.config
        if drop_threshold(c.hidden_dropout) == 0:  # as `Dropout`: nothing dropped
            return [None] * c.num_layers
        hidden = dropout_mask(
            self.make_rng("dropout"), c.hidden_dropout, (c.num_layers, 2, *x.shape)
        )
        hidden = nn.with_logical_constraint(hidden, (None, None, "batch", "length", "embed"))
        return [(None, hidden[i, 0], hidden[i, 1]) for i in range(c.num_layers)]


def _replace_encoders(tree: Any, fn: Callable[[dict[str, Any]], dict[str, Any]]) -> Any:
    if not isinstance(tree, Mapping):
        return tree
    if "layers" in tree or "layer_0" in tree:
        return fn(dict(tree))
    return {k: _replace_encoders(v, fn) for k, v in tree.items()}


def stack_layers(params: Any) -> Any:
    """Parameters with `layer_0..layer_{L-1}` turned into the `scan_layers` layout: one
    `layers` tree, each array stacked on a new leading axis. Already stacked: unchanged.
    Boxed leaves (`init`'s, with their logical names) come back unboxed."""

    def stack(encoder: dict[str, Any]) -> dict[str, Any]:
        index = {int(m.group(1)): k for k in encoder if (m := re.fullmatch(r"layer_(\d+)", k))}
        if not index:
            return encoder
        if sorted(index) != list(range(len(index))):
            raise ValueError(f"encoder layers {sorted(index)} are not layer_0..layer_{{L-1}}")
        layers = [encoder.pop(index[i]) for i in range(len(index))]
        encoder["layers"] = jax.tree.map(lambda *xs: jnp.stack(xs), *layers)
        return encoder

    return _replace_encoders(nn.meta.unbox(params), stack)


def unstack_layers(params: Any) -> Any:
    """The inverse of `stack_layers`: `layers` (stacked) -> `layer_0..layer_{L-1}`; boxed
    leaves come back unboxed."""

    def unstack(encoder: dict[str, Any]) -> dict[str, Any]:
        if "layers" not in encoder:
            return encoder
        stacked = encoder.pop("layers")
        count = jax.tree.leaves(stacked)[0].shape[0]
        for i in range(count):
            encoder[f"layer_{i}"] = jax.tree.map(lambda x, i=i: x[i], stacked)
        return encoder

    return _replace_encoders(nn.meta.unbox(params), unstack)


def layer_layout(params: Any, scan_layers: bool) -> Any:
    """`params` in the layout of a model with `scan_layers` (converted if it is the other)."""
    return stack_layers(params) if scan_layers else unstack_layers(params)


class BertPooler(nn.Module):
    """tanh(dense(hidden state of the first token, [CLS])).

    Attributes:
      config: the sizes and dtypes.
    """

    config: BertConfig

    @nn.compact
    def __call__(self, x: Array) -> Array:
        """x: <dtype>[batch, length, embed]. Returns <dtype>[batch, embed]."""
        return jnp.tanh(
            _dense(self.config, self.config.hidden_size, ("embed", "mlp"), "dense")(x[:, 0])
        )


def _is_concrete(x: Any) -> bool:
    return not isinstance(x, jax.core.Tracer)


def _check_ids(name: str, ids: Any, limit: int, what: str, hint: str) -> None:
    """Range check of integer inputs, when concrete (values are unknown under jit)."""
    if not _is_concrete(ids) or not np.size(ids):
        return
    values = np.asarray(ids)
    low, high = int(values.min()), int(values.max())
    if low < 0 or high >= limit:
        raise ValueError(
            f"{name} must be in [0, {limit}) ({what}), found {low if low < 0 else high}; {hint}"
        )


def _padding(
    attention_mask: Any, lengths: Any, batch: int, length: int
) -> tuple[Array | None, Array | None]:
    """(kv_lengths, mask) for attention from the user's `attention_mask` or `lengths`."""
    if attention_mask is not None and lengths is not None:
        raise ValueError("pass attention_mask or lengths, not both")
    if lengths is not None:
        if jnp.shape(lengths) != (batch,):
            raise ValueError(
                f"lengths has shape {jnp.shape(lengths)}; expected one length per sequence, "
                f"<int>[{batch}]"
            )
        lengths = jnp.asarray(lengths)
        if not jnp.issubdtype(lengths.dtype, jnp.integer):
            raise ValueError(
                f"lengths has dtype {lengths.dtype}; expected integers <int>[{batch}] (counts "
                "of real tokens)"
            )
        if _is_concrete(lengths) and batch:
            values = np.asarray(lengths)
            if values.min() < 1 or values.max() > length:
                raise ValueError(
                    f"lengths must be in [1, {length}] (the padded sequence length), found "
                    f"{values.min() if values.min() < 1 else values.max()}"
                )
        return jnp.asarray(lengths, jnp.int32), None
    if attention_mask is None:
        return None, None
    if jnp.shape(attention_mask) != (batch, length):
        raise ValueError(
            f"attention_mask has shape {jnp.shape(attention_mask)}; expected <int>[batch, "
            f"length] = {(batch, length)} like input_ids (1 = real token, 0 = padding)"
        )
    if _is_concrete(attention_mask):
        real = np.asarray(attention_mask) != 0
        n = real.sum(axis=1)
        if np.array_equal(real, np.arange(length)[None, :] < n[:, None]) and n.min(initial=1) > 0:
            return jnp.asarray(n, jnp.int32), None  # a prefix mask: the fast path
    return None, (jnp.asarray(attention_mask) != 0)[:, None, None, :]


class BertModel(nn.Module):
    """The BERT encoder: embeddings, `num_layers` layers and the [CLS] pooler.

    Attributes:
      config: a `BertConfig`.
      add_pooling_layer: build the pooler (`pooled_output` is None without it).
    """

    config: BertConfig
    add_pooling_layer: bool = True

    def setup(self) -> None:
        self.embeddings = BertEmbeddings(self.config)
        self.encoder = BertEncoder(self.config)
        if self.add_pooling_layer:
            self.pooler = BertPooler(self.config)

    def __call__(
        self,
        input_ids: Array,
        attention_mask: Array | None = None,
        token_type_ids: Array | None = None,
        train: bool = False,
        *,
        lengths: Array | None = None,
    ) -> tuple[Array, Array | None]:
        """Encodes a batch.

        Args:
          input_ids: <int>[batch, length] token ids in [0, vocab_size).
          attention_mask: <int>[batch, length], 1 for real tokens, 0 for padding (see the
            module docstring: a prefix mask is turned into lengths). Default: no padding.
          token_type_ids: <int>[batch, length] segment ids (default 0).
          train: enables dropout (needs a `dropout` rng).
          lengths: <int>[batch] real tokens per row (a prefix), instead of attention_mask.

        Returns:
          sequence_output <dtype>[batch, length, embed] and pooled_output
          <dtype>[batch, embed] (tanh(dense([CLS])); None without the pooler).

        Raises:
          ValueError: on a sequence longer than `max_position_embeddings`, token or type
            ids out of range (checked when concrete, i.e. outside jit), bad mask shapes.
        """
        c = self.config
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be <int>[batch, length], got shape {input_ids.shape}")
        batch, length = input_ids.shape
        if length > c.max_position_embeddings:
            raise ValueError(
                f"sequence length {length} exceeds max_position_embeddings="
                f"{c.max_position_embeddings}; truncate the inputs to at most "
                f"{c.max_position_embeddings} tokens"
            )
        _check_ids(
            "input_ids",
            input_ids,
            c.vocab_size,
            "vocab_size",
            "check that the tokenizer's vocabulary matches the model's",
        )
        if token_type_ids is None:
            token_type_ids = jnp.zeros_like(input_ids)
        elif jnp.shape(token_type_ids) != (batch, length):
            raise ValueError(
                f"token_type_ids has shape {jnp.shape(token_type_ids)}, expected {(batch, length)}"
            )
        _check_ids(
            "token_type_ids",
            token_type_ids,
            c.type_vocab_size,
            "type_vocab_size",
            "segment ids are 0 (first segment) or 1 (second)",
        )
        kv_lengths, mask = _padding(attention_mask, lengths, batch, length)

        input_ids = nn.with_logical_constraint(input_ids, ("batch", "length"))
        deterministic = not train
        x = self.embeddings(input_ids, token_type_ids, deterministic)
        x = self.encoder(x, kv_lengths, mask, deterministic)
        pooled = self.pooler(x) if self.add_pooling_layer else None
        return x, pooled

    def attend(self, x: Array) -> Array:
        """<[..., embed]> -> <dtype>[..., vocab] logits with the tied word embeddings."""
        return self.embeddings.attend(x)


class BertMLMHead(nn.Module):
    """The masked-LM head: dense + activation + LayerNorm, then the tied decoder + bias.

    Parameters: `dense` <[embed, mlp]> (hidden -> hidden), `norm`, `bias` <[vocab]>.
    The decoder matrix is the word embedding table, passed in as `attend`.

    Attributes:
      config: the sizes, dtypes and activation.
    """

    config: BertConfig

    @nn.compact
    def __call__(self, x: Array, attend: Callable[[Array], Array]) -> Array:
        """x: <dtype>[batch, P, embed]. Returns <float32>[batch, P, vocab]."""
        c = self.config
        x = _dense(c, c.hidden_size, ("embed", "mlp"), "dense", ACTIVATIONS[c.hidden_act])(x)
        # Pinned to the residual stream's layout before the tied decoder: left to XLA's
        # partitioner on a data x fsdp x tensor mesh (fsdp_tp rules), the two matmuls came
        # back with rows of different batch shards swapped, so every gradient below the head
        # was wrong while the summed loss was right.
        x = _constrain(_layer_norm(c, "norm")(x))
        bias = self.param(
            "bias",
            nn.with_logical_partitioning(nn.initializers.zeros, ("vocab",)),
            (c.vocab_size,),
            c.param_dtype,
        )
        # The bias is added in `dtype` (the decoder matmul's epilogue), then upcast for the loss.
        return (attend(x) + bias.astype(c.dtype)).astype(jnp.float32)


def _gather(x: Array, positions: Array) -> Array:
    """x <[batch, length, embed]>, positions <int>[batch, P] -> <[batch, P, embed]>."""
    return jnp.take_along_axis(x, positions[..., None].astype(jnp.int32), axis=1)


class BertForPreTraining(nn.Module):
    """BERT with the pretraining heads: masked LM (on the masked positions only) and NSP.

    Parameters: `bert` (a `BertModel`), `mlm` (a `BertMLMHead`), `nsp/{kernel,bias}`
    <[embed, 2]>.

    Attributes:
      config: a `BertConfig`.
    """

    config: BertConfig

    @nn.compact
    def __call__(
        self,
        input_ids: Array,
        attention_mask: Array | None = None,
        token_type_ids: Array | None = None,
        masked_positions: Array | None = None,
        train: bool = False,
        *,
        lengths: Array | None = None,
    ) -> tuple[Array, Array]:
        """Pretraining logits.

        Args:
          input_ids, attention_mask, token_type_ids, train, lengths: see `BertModel`.
          masked_positions: <int>[batch, P] positions whose tokens to predict (padding slots
            may point anywhere, e.g. 0, and get weight 0 in the loss); None: every position.

        Returns:
          mlm_logits <float32>[batch, P, vocab] (P = length when masked_positions is None)
          and nsp_logits <float32>[batch, 2] (is segment B the next sentence: 0 yes, 1 no,
          as in the original BERT).
        """
        bert = BertModel(self.config, name="bert")
        sequence, pooled = bert(input_ids, attention_mask, token_type_ids, train, lengths=lengths)
        if masked_positions is not None:
            if (
                jnp.ndim(masked_positions) != 2
                or jnp.shape(masked_positions)[0] != sequence.shape[0]
            ):
                raise ValueError(
                    f"masked_positions must be <int>[batch, P], got shape "
                    f"{jnp.shape(masked_positions)}"
                )
            _check_ids(
                "masked_positions",
                masked_positions,
                sequence.shape[1],
                "the sequence length",
                "positions index the tokens of each row",
            )
            sequence = _gather(sequence, jnp.asarray(masked_positions))
        mlm_logits = BertMLMHead(self.config, name="mlm")(sequence, bert.attend)
        nsp = _dense(self.config, 2, ("embed", None), "nsp")(pooled)
        return mlm_logits, nsp.astype(jnp.float32)


class BertForSequenceClassification(nn.Module):
    """BERT, pooled [CLS] output -> dropout -> dense logits.

    Parameters: `bert` (a `BertModel`), `classifier/{kernel,bias}` <[embed, num_labels]>.

    Attributes:
      config: a `BertConfig`.
      num_labels: number of classes.
    """

    config: BertConfig
    num_labels: int = 2

    @nn.compact
    def __call__(
        self,
        input_ids: Array,
        attention_mask: Array | None = None,
        token_type_ids: Array | None = None,
        train: bool = False,
        *,
        lengths: Array | None = None,
    ) -> Array:
        """Arguments as `BertModel`. Returns logits <float32>[batch, num_labels]."""
        c = self.config
        _, pooled = BertModel(c, name="bert")(
            input_ids, attention_mask, token_type_ids, train, lengths=lengths
        )
        rate = c.hidden_dropout if c.classifier_dropout is None else c.classifier_dropout
        pooled = Dropout(rate)(pooled, deterministic=not train)
        logits = _dense(c, self.num_labels, ("embed", "classes"), "classifier")(pooled)
        return logits.astype(jnp.float32)


def pretraining_loss(
    mlm_logits: Array,
    mlm_labels: Array,
    mlm_weights: Array | None,
    nsp_logits: Array | None = None,
    nsp_labels: Array | None = None,
) -> tuple[Array, dict[str, Array]]:
    """The BERT pretraining objective: mean masked-LM loss + mean NSP loss, in float32.

    Args:
      mlm_logits: <float>[batch, P, vocab].
      mlm_labels: <int>[batch, P] the original tokens at the masked positions.
      mlm_weights: <float>[batch, P], 1 for real predictions, 0 for padding slots (None:
        all 1).
      nsp_logits: <float>[batch, 2], or None for an MLM-only objective.
      nsp_labels: <int>[batch]; None exactly when `nsp_logits` is (ValueError otherwise).

    Returns:
      (total loss, metrics): metrics has `mlm_loss`, `nsp_loss`, `mlm_accuracy`,
      `nsp_accuracy`, float32 scalars (the NSP ones 0 without NSP logits).

    Example:
      >>> import jax.numpy as jnp
      >>> total, m = pretraining_loss(jnp.zeros((2, 3, 5)), jnp.zeros((2, 3), jnp.int32),
      ...                             jnp.ones((2, 3)), jnp.zeros((2, 2)),
      ...                             jnp.zeros((2,), jnp.int32))
      >>> round(float(total), 4), round(float(m["mlm_loss"]), 4)  # ln 5 + ln 2
      (2.3026, 1.6094)
    """
    if (nsp_logits is None) != (nsp_labels is None):
        given, missing = ("nsp_logits", "nsp_labels")[:: 1 if nsp_labels is None else -1]
        raise ValueError(
            f"{given} without {missing}: pass both for the NSP loss, or neither for MLM only"
        )
    loss_sum, weight_sum = losses.cross_entropy(mlm_logits, mlm_labels, mlm_weights)
    hits = losses.correct(mlm_logits, mlm_labels, mlm_weights)
    safe = jnp.maximum(weight_sum, jnp.finfo(jnp.float32).tiny)
    mlm_loss = jnp.where(weight_sum > 0, loss_sum / safe, 0.0)
    mlm_accuracy = jnp.where(weight_sum > 0, hits / safe, 0.0)
    if nsp_logits is None:
        nsp_loss = nsp_accuracy = jnp.zeros((), jnp.float32)
    else:
        nsp_sum, count = losses.cross_entropy(nsp_logits, nsp_labels)
        nsp_loss = nsp_sum / count
        nsp_accuracy = losses.correct(nsp_logits, nsp_labels) / count
    metrics = {
        "mlm_loss": mlm_loss,
        "nsp_loss": nsp_loss,
        "mlm_accuracy": mlm_accuracy,
        "nsp_accuracy": nsp_accuracy,
    }
    return mlm_loss + nsp_loss, metrics


# ------------------------------------------------------------- Hugging Face checkpoints


class _Tensor(NamedTuple):
    """One parameter: our path, its Hugging Face names (first is canonical) and layouts."""

    path: tuple[str, ...]
    names: tuple[str, ...]
    to_ours: Callable[[np.ndarray], np.ndarray]
    to_hf: Callable[[np.ndarray], np.ndarray]


def _same(x: np.ndarray) -> np.ndarray:
    return x


def _transpose(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x.T)


def _linear(path: tuple[str, ...], hf: str) -> list[_Tensor]:
    """nn.Linear weight [out, in] <-> our Dense kernel [in, out]; biases as they are."""
    return [
        _Tensor(path + ("kernel",), (f"{hf}.weight",), _transpose, _transpose),
        _Tensor(path + ("bias",), (f"{hf}.bias",), _same, _same),
    ]


def _norm(path: tuple[str, ...], hf: str) -> list[_Tensor]:
    """LayerNorm weight/bias (or the old gamma/beta) <-> our scale/bias."""
    return [
        _Tensor(path + ("scale",), (f"{hf}.weight", f"{hf}.gamma"), _same, _same),
        _Tensor(path + ("bias",), (f"{hf}.bias", f"{hf}.beta"), _same, _same),
    ]


def _bert_tensors(
    config: BertConfig, pooler: bool, ours: tuple[str, ...], hf: str
) -> list[_Tensor]:
    """The `BertModel` tensors under our path `ours` and Hugging Face prefix `hf`."""
    heads, dim, embed = config.num_heads, config.head_dim, config.hidden_size
    emb = ours + ("embeddings",)
    out = [
        _Tensor(
            emb + (f"{n}_embeddings", "embedding"),
            (f"{hf}embeddings.{n}_embeddings.weight",),
            _same,
            _same,
        )
        for n in ("word", "position", "token_type")
    ]
    out += _norm(emb + ("norm",), f"{hf}embeddings.LayerNorm")

    def qkv_kernel(x: np.ndarray) -> np.ndarray:  # [H*D, E] -> [E, H, D]
        return np.ascontiguousarray(x.T).reshape(embed, heads, dim)

    def qkv_kernel_hf(x: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(x.reshape(embed, heads * dim).T)

    def out_kernel(x: np.ndarray) -> np.ndarray:  # [E, H*D] -> [H, D, E]
        return np.ascontiguousarray(x.T).reshape(heads, dim, embed)

    def out_kernel_hf(x: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(x.reshape(heads * dim, embed).T)

    def split(x: np.ndarray) -> np.ndarray:
        return x.reshape(heads, dim)

    def merge(x: np.ndarray) -> np.ndarray:
        return x.reshape(heads * dim)

    for i in range(config.num_layers):
        layer = ours + ("encoder", f"layer_{i}")
        p = f"{hf}encoder.layer.{i}."
        att = layer + ("attention",)
        for n in ("query", "key", "value"):
            out.append(
                _Tensor(
                    att + (n, "kernel"),
                    (f"{p}attention.self.{n}.weight",),
                    qkv_kernel,
                    qkv_kernel_hf,
                )
            )
            out.append(_Tensor(att + (n, "bias"), (f"{p}attention.self.{n}.bias",), split, merge))
        out.append(
            _Tensor(
                att + ("out", "kernel"),
                (f"{p}attention.output.dense.weight",),
                out_kernel,
                out_kernel_hf,
            )
        )
        out.append(
            _Tensor(att + ("out", "bias"), (f"{p}attention.output.dense.bias",), _same, _same)
        )
        out += _norm(layer + ("attention_norm",), f"{p}attention.output.LayerNorm")
        out += _linear(layer + ("intermediate",), f"{p}intermediate.dense")
        out += _linear(layer + ("output",), f"{p}output.dense")
        out += _norm(layer + ("output_norm",), f"{p}output.LayerNorm")
    if pooler:
        out += _linear(ours + ("pooler", "dense"), f"{hf}pooler.dense")
    return out


_MODEL_CLASSES = ("BertModel", "BertForPreTraining", "BertForSequenceClassification")
_HEAD_PREFIXES = ("cls.", "classifier.")


def _tensors(model: nn.Module, prefix_base: bool) -> list[_Tensor]:
    """Every parameter of `model` with its Hugging Face name(s) and layout conversions.

    prefix_base: whether the base model's Hugging Face names carry `bert.` (always for the
    head models; for a bare `BertModel` checkpoint, names have no prefix).
    """
    config = model.config
    if isinstance(model, BertModel):
        return _bert_tensors(config, model.add_pooling_layer, (), "bert." if prefix_base else "")
    out = _bert_tensors(config, True, ("bert",), "bert.")
    if isinstance(model, BertForPreTraining):
        out += _linear(("mlm", "dense"), "cls.predictions.transform.dense")
        out += _norm(("mlm", "norm"), "cls.predictions.transform.LayerNorm")
        out.append(
            _Tensor(
                ("mlm", "bias"),
                ("cls.predictions.bias", "cls.predictions.decoder.bias"),
                _same,
                _same,
            )
        )
        out += _linear(("nsp",), "cls.seq_relationship")
    elif isinstance(model, BertForSequenceClassification):
        out += _linear(("classifier",), "classifier")
    else:
        raise TypeError(f"no Hugging Face layout for {type(model).__name__}")
    return out


class Pretrained(NamedTuple):
    """What `from_pretrained` returns.

    Attributes:
      model: the Flax module (its `config` from the checkpoint's `config.json`).
      variables: `{"params": ...}`, ready for `model.apply(variables, ...)`.
      vocab_file: path of the checkpoint's WordPiece `vocab.txt`, or None if it has none.
    """

    model: nn.Module
    variables: dict[str, Any]
    vocab_file: str | None


def _read_json(path: str) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"cannot read {path}: {e}") from e


def _torch_to_numpy(t: Any) -> np.ndarray:
    import torch

    if t.dtype == torch.bfloat16:
        return t.to(torch.float32).numpy()
    return t.numpy()


def _load_file(path: str) -> dict[str, np.ndarray]:
    try:
        if path.endswith(".safetensors"):
            try:
                from safetensors.numpy import load_file
            except ImportError as e:
                raise CheckpointError(
                    f"reading {path} needs the safetensors package (pip install safetensors)"
                ) from e

            return load_file(path)
        try:
            import torch
        except ImportError as e:
            raise CheckpointError(
                f"{path} is a PyTorch pickle: reading it needs torch (the reference extra); "
                "or convert the checkpoint to model.safetensors"
            ) from e
        state = torch.load(path, map_location="cpu", weights_only=True)
        return {k: _torch_to_numpy(v) for k, v in state.items()}
    except CheckpointError:
        raise
    except Exception as e:  # a corrupt or truncated file
        raise CheckpointError(f"cannot read the weights in {path}: {e}") from e


def _read_weights(directory: str) -> tuple[dict[str, np.ndarray], str]:
    """All tensors of the checkpoint in `directory` (single-file or sharded)."""
    for index, single in (
        ("model.safetensors.index.json", "model.safetensors"),
        ("pytorch_model.bin.index.json", "pytorch_model.bin"),
    ):
        if os.path.exists(os.path.join(directory, single)):
            path = os.path.join(directory, single)
            return _load_file(path), path
        index_path = os.path.join(directory, index)
        if os.path.exists(index_path):
            files = sorted(set(_read_json(index_path).get("weight_map", {}).values()))
            tensors: dict[str, np.ndarray] = {}
            for name in files:
                shard = os.path.join(directory, name)
                if not os.path.exists(shard):
                    raise CheckpointError(f"{index_path} lists {name}, which is missing")
                tensors.update(_load_file(shard))
            return tensors, index_path
    raise CheckpointError(
        f"no weights in {directory}: expected model.safetensors or pytorch_model.bin "
        "(as written by transformers' save_pretrained)"
    )


def _set(tree: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def _get(tree: Mapping[str, Any], path: tuple[str, ...]) -> Any:
    for key in path:
        tree = tree[key]
    return tree


def _init_params(model: nn.Module, key: jax.Array) -> dict[str, Any]:
    return nn.meta.unbox(model.init(key, jnp.zeros((1, 1), jnp.int32)))["params"]


def _check_tied_decoder(
    hf: Mapping[str, Any], tensors: Mapping[str, np.ndarray], config_path: str, weights_path: str
) -> None:
    """Refuses a checkpoint whose masked-LM decoder is not the word-embedding table."""
    decoder = tensors.get("cls.predictions.decoder.weight")
    embeddings = tensors.get("bert.embeddings.word_embeddings.weight")
    if hf.get("tie_word_embeddings", True) is False:
        why = f"{config_path} says tie_word_embeddings=false"
    elif (
        decoder is not None
        and embeddings is not None
        and not np.array_equal(np.asarray(decoder), np.asarray(embeddings))
    ):
        why = f"cls.predictions.decoder.weight in {weights_path} differs from the word embeddings"
    else:
        return
    raise CheckpointError(
        f"the checkpoint's masked-LM decoder is not tied to its word embeddings ({why}), but "
        "BertForPreTraining here ties them (its decoder is the word-embedding table), so its "
        "MLM logits would not be the checkpoint's. Load the encoder only, with "
        "model_cls=BertModel or BertForSequenceClassification, which do not use the decoder"
    )


def from_pretrained(
    directory: str | os.PathLike[str],
    model_cls: type[nn.Module] = BertForPreTraining,
    *,
    num_labels: int | None = None,
    add_pooling_layer: bool | None = None,
    init_missing: bool = False,
    rng: jax.Array | None = None,
    **overrides: Any,
) -> Pretrained:
    """Loads a Hugging Face BERT checkpoint directory into one of our models.

    Reads `config.json` and `model.safetensors` (or `pytorch_model.bin`, through torch,
    imported only then; sharded `*.index.json` checkpoints too). The base-model tensors may
    be named with or without the `bert.` prefix, LayerNorms as `weight/bias` or the old
    `gamma/beta`; extra tensors (e.g. another model's heads) are ignored.

    The masked-LM decoder here is the word-embedding table (tied, as in BERT): a
    `BertForPreTraining` is not loaded from a checkpoint whose decoder is a matrix of its
    own (`tie_word_embeddings: false`, or a `cls.predictions.decoder.weight` that differs
    from the word embeddings); its encoder loads into the other model classes.

    Args:
      directory: the checkpoint directory (what `save_pretrained` wrote).
      model_cls: `BertModel`, `BertForPreTraining` or `BertForSequenceClassification`.
      num_labels: classes of `BertForSequenceClassification` (default: from
        `config.json`'s `id2label`, else 2).
      add_pooling_layer: `BertModel` only: build and load the [CLS] pooler (default:
        whether the checkpoint has its weights, `pooler.dense.*`; Hugging Face
        `BertForMaskedLM` checkpoints have none).
      init_missing: initialise tensors the checkpoint lacks (e.g. a new classifier on a
        pretrained encoder) randomly, with a warning naming them, instead of failing.
      rng: PRNG key for `init_missing` (default PRNGKey(0)).
      **overrides: run-time `BertConfig` fields (`RUNTIME_FIELDS`: dtype, param_dtype,
        implementation, remat_policy, scan_layers, hidden_dropout, attention_dropout,
        classifier_dropout). An
        architecture field is accepted only if it equals the checkpoint's.

    Returns:
      `Pretrained(model, variables, vocab_file)`: unpack as
      `model, variables, vocab_file = from_pretrained(directory)`; `variables` is
      `{"params": ...}` in `param_dtype`, `vocab_file` the path of `vocab.txt` (None when
      the directory has none).

    Raises:
      CheckpointError: a missing directory or file, an unsupported or contradicted config,
        tensors missing (named) or of the wrong shape (named, ours vs the checkpoint's), a
        `BertForPreTraining` from a checkpoint with an untied MLM decoder.

    Example::

        model, variables, vocab = from_pretrained("bert-base-uncased/")
        mlm_logits, nsp_logits = model.apply(variables, input_ids, attention_mask)
    """
    directory = os.fspath(directory)
    if not os.path.isdir(directory):
        raise CheckpointError(f"checkpoint directory {directory} does not exist")
    config_path = os.path.join(directory, "config.json")
    if not os.path.exists(config_path):
        raise CheckpointError(
            f"{config_path} is missing: a Hugging Face checkpoint directory has config.json "
            "and model.safetensors (or pytorch_model.bin)"
        )
    hf = _read_json(config_path)
    try:
        saved = BertConfig.from_hf_dict(hf)
    except (ConfigError, TypeError) as e:
        raise CheckpointError(f"{config_path}: {e}") from e
    conflicts = [
        f"{k}={v!r} (checkpoint: {getattr(saved, k)!r})"
        for k, v in overrides.items()
        if k in _ARCH_FIELDS and v != getattr(saved, k)
    ]
    if conflicts:
        raise CheckpointError(
            f"config mismatch with {config_path}: {', '.join(conflicts)}; these fields define "
            "the checkpoint's parameters and cannot be overridden"
        )
    try:
        config = dataclasses.replace(saved, **overrides)
    except (ConfigError, TypeError) as e:
        raise CheckpointError(f"bad override for {config_path}: {e}") from e

    if model_cls not in (BertModel, BertForPreTraining, BertForSequenceClassification):
        raise TypeError(f"model_cls must be one of {_MODEL_CLASSES}, got {model_cls}")
    if add_pooling_layer is not None and model_cls is not BertModel:
        raise ValueError(
            f"add_pooling_layer is an option of BertModel; {model_cls.__name__} always has "
            "the pooler"
        )

    tensors, weights_path = _read_weights(directory)
    bare = not any(k.startswith("bert.") for k in tensors)  # a `BertModel` checkpoint
    if bare:
        tensors = {
            k if k.startswith(_HEAD_PREFIXES) else f"bert.{k}": v for k, v in tensors.items()
        }
    if model_cls is BertForSequenceClassification:
        if num_labels is None:
            num_labels = len(hf.get("id2label") or {}) or hf.get("num_labels", 2)
        model: nn.Module = BertForSequenceClassification(config, num_labels)
    elif model_cls is BertModel:
        if add_pooling_layer is None:
            add_pooling_layer = "bert.pooler.dense.weight" in tensors
        model = BertModel(config, add_pooling_layer=add_pooling_layer)
    else:
        _check_tied_decoder(hf, tensors, config_path, weights_path)
        model = BertForPreTraining(config)

    # Tensors are matched layer by layer (`layer_i`); a scan_layers model gets them stacked.
    unrolled = model.clone(config=dataclasses.replace(config, scan_layers=False))
    expected = jax.eval_shape(functools.partial(_init_params, unrolled), jax.random.PRNGKey(0))
    params: dict[str, Any] = {}
    missing: list[tuple[str, tuple[str, ...]]] = []
    wrong: list[str] = []

    def shown(name: str) -> str:  # the name as the checkpoint spells it
        return name.removeprefix("bert.") if bare else name

    for t in _tensors(unrolled, prefix_base=True):
        name = next((n for n in t.names if n in tensors), None)
        ours = _get(expected, t.path)
        if name is None:
            missing.append((shown(t.names[0]), t.path))
            continue
        theirs = tensors[name]
        want = t.to_hf(np.empty(ours.shape, np.float32)).shape
        if theirs.shape != want:
            wrong.append(
                f"{shown(name)}: checkpoint {tuple(theirs.shape)}, model expects {tuple(want)} "
                f"(ours: {'/'.join(t.path)} {tuple(ours.shape)})"
            )
            continue
        value = t.to_ours(np.asarray(theirs))
        _set(params, t.path, jnp.asarray(value, dtype=config.param_dtype))
    if wrong:
        raise CheckpointError(
            f"{len(wrong)} tensor(s) of {weights_path} do not match the shapes that "
            f"{config_path} implies: " + "; ".join(wrong)
        )
    if missing and not init_missing:
        names = ", ".join(n for n, _ in missing[:10])
        more = f" and {len(missing) - 10} more" if len(missing) > 10 else ""
        raise CheckpointError(
            f"{weights_path} lacks {len(missing)} tensor(s) that {type(model).__name__} needs: "
            f"{names}{more}. Load a checkpoint with these weights, choose a model_cls it "
            "contains (e.g. BertModel for an encoder-only checkpoint, with "
            "add_pooling_layer=False for one without the pooler), or pass "
            "init_missing=True to initialise them randomly"
        )
    if missing:
        warnings.warn(
            f"initialised randomly (absent from {weights_path}): "
            + ", ".join(n for n, _ in missing),
            stacklevel=2,
        )
        key = jax.random.PRNGKey(0) if rng is None else rng
        fresh = jax.jit(functools.partial(_init_params, unrolled))(key)
        for _, path in missing:
            _set(params, path, _get(fresh, path))
    params = layer_layout(params, config.scan_layers)
    vocab = os.path.join(directory, "vocab.txt")
    return Pretrained(model, {"params": params}, vocab if os.path.exists(vocab) else None)


def save_pretrained(
    model: nn.Module,
    variables: Mapping[str, Any],
    directory: str | os.PathLike[str],
    vocab_file: str | os.PathLike[str] | None = None,
) -> None:
    """Writes `config.json` + `model.safetensors` that Hugging Face `transformers` loads.

    `transformers.BertForPreTraining.from_pretrained(directory)` (or `BertModel`,
    `BertForSequenceClassification`, matching `model`) computes the same logits. Tensors
    are written in float32; the MLM decoder is tied to the word embeddings, so only its
    bias (`cls.predictions.bias`) is stored.

    Args:
      model: a `BertModel`, `BertForPreTraining` or `BertForSequenceClassification`.
      variables: `{"params": ...}` (or the params tree itself).
      directory: created if needed; existing files of these names are replaced.
      vocab_file: a WordPiece vocabulary to copy in as `vocab.txt`.
    """
    from safetensors.numpy import save_file

    params = variables.get("params", variables)
    params = unstack_layers(nn.meta.unbox(params))
    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    tensors = {}
    for t in _tensors(model, prefix_base=False):
        value = np.asarray(jax.device_get(_get(params, t.path)), dtype=np.float32)
        tensors[t.names[0]] = np.ascontiguousarray(t.to_hf(value))
    hf = model.config.to_hf_dict()
    hf["architectures"] = [type(model).__name__]
    hf["tie_word_embeddings"] = True
    if isinstance(model, BertForSequenceClassification):
        hf["id2label"] = {str(i): f"LABEL_{i}" for i in range(model.num_labels)}
        hf["label2id"] = {f"LABEL_{i}": i for i in range(model.num_labels)}
    save_file(tensors, os.path.join(directory, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(directory, "config.json"), "w", encoding="utf-8") as f:
        json.dump(hf, f, indent=2, sort_keys=True)
    target = os.path.join(directory, "vocab.txt")
    # Saving back where it was loaded from: the file is already there (opening it for
    # writing first would empty it).
    if vocab_file is not None and not (
        os.path.exists(target) and os.path.samefile(vocab_file, target)
    ):
        with open(vocab_file, "rb") as src:
            vocab = src.read()
        with open(target, "wb") as dst:
            dst.write(vocab)
