"""JAX side of the workloads: one builder per model family.

A builder takes a `benchmarks.specs.Workload` and an implementation name and returns a
`Built`: the model, a synthetic host batch, the loss (and eval) functions for
`jaxmodels.training`, and the model + inputs whose forward pass `benchmarks.flops` counts.

Adding a family is writing one builder and registering it in `BUILDERS` (plus `IMPLS` if it
has several implementations); until then its workloads show up as skipped rows with
`NOT_BUILT` as the reason.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import specs
from benchmarks.specs import Workload
from jaxmodels import bert, cnn, losses, optim, rnn, training, transformer

__all__ = [
    "BUILDERS",
    "IMPLS",
    "NOT_BUILT",
    "Built",
    "impls",
    "optimizer",
    "settings",
]

NOT_BUILT = "no JAX builder for this family yet (benchmarks.workloads.BUILDERS)"

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@dataclasses.dataclass
class Built:
    """Everything needed to time one workload with one implementation.

    Attributes:
      model: the Flax module trained.
      batch: the synthetic batch, host numpy arrays with the global batch size.
      inputs: the keys of `batch` that are the model's positional inputs, in order.
      loss_fn, eval_fn: for `training.compile_train_step` / `compile_eval_step`.
      flops_model: the module whose forward pass is counted (the same function as `model`,
        possibly another backend: a cuDNN call has no jaxpr to count).
      precision: the precision the implementation computes in (shown in the row).
      note: shown in the row.
    """

    model: nn.Module
    batch: dict[str, np.ndarray]
    inputs: tuple[str, ...]
    loss_fn: training.LossFn
    eval_fn: training.EvalFn
    flops_model: nn.Module
    precision: str
    note: str = ""

    def model_inputs(self) -> list[np.ndarray]:
        return [self.batch[k] for k in self.inputs]


Builder = Callable[[Workload, str], Built]


def _images(w: Workload, rng: np.random.Generator) -> dict[str, np.ndarray]:
    num_classes = w.model.get("num_classes", 10)
    return {
        "image": rng.standard_normal((w.batch, *w.input_shape), np.float32),
        "label": rng.integers(0, num_classes, (w.batch,), np.int32),
    }


def build_cnn(w: Workload, impl: str) -> Built:
    """SeedCNN (the MNIST CNN)."""
    del impl
    model = cnn.SeedCNN(dtype=_DTYPES[w.precision], **w.model)
    loss_fn, eval_fn = training.classification_fns(model)
    batch = _images(w, np.random.default_rng(0))
    return Built(model, batch, ("image",), loss_fn, eval_fn, model, w.precision)


def build_resnet(w: Workload, impl: str) -> Built:
    """ResNet-50 v1.5 with BatchNorm in training mode."""
    del impl
    model = cnn.ResNet50(dtype=_DTYPES[w.precision], **w.model)
    loss_fn, eval_fn = training.classification_fns(model)
    batch = _images(w, np.random.default_rng(0))
    return Built(model, batch, ("image",), loss_fn, eval_fn, model, w.precision)


class FlaxRNNClassifier(nn.Module):
    """The stock-Flax baseline: Embed -> nn.RNN(OptimizedLSTMCell) x L -> last state -> Dense.

    The same function as `LSTMClassifier` with "last" pooling (its FLOPs are counted on
    ours), built from Flax's own parts, to measure what the scan path gains over them.
    """

    vocab_size: int
    embed_dim: int
    hidden_size: int
    num_layers: int
    num_classes: int
    dtype: Any = jnp.float32
    # nn.RNN's own default; ours unrolls `jaxmodels.rnn.GPU_UNROLL` times on GPUs by default.
    # `--set unroll=N` sets both.
    unroll: int = 1

    @nn.compact
    def __call__(self, tokens: jax.Array, lengths: jax.Array, train: bool = False) -> jax.Array:
        x = nn.Embed(self.vocab_size, self.embed_dim, dtype=self.dtype)(tokens)
        for _ in range(self.num_layers):
            cell = nn.OptimizedLSTMCell(self.hidden_size, dtype=self.dtype)
            x = nn.RNN(cell, unroll=self.unroll)(x, seq_lengths=lengths)
        last = x[jnp.arange(x.shape[0]), lengths - 1]
        return nn.Dense(self.num_classes, dtype=self.dtype)(last).astype(jnp.float32)


def build_lstm(w: Workload, impl: str) -> Built:
    """LSTMClassifier on full-length sequences, backend `impl` (scan, cudnn or pallas), or
    the stock-Flax baseline (`flax_rnn`)."""
    if impl == "flax_rnn":
        ours = build_lstm(w, "scan")
        model = FlaxRNNClassifier(**w.model, dtype=_DTYPES[w.precision])
        loss_fn, eval_fn = training.classification_fns(
            model, inputs=lambda b: (b["tokens"], b["lengths"])
        )
        note = "stock Flax nn.RNN(OptimizedLSTMCell) baseline"
        return Built(
            model, ours.batch, ours.inputs, loss_fn, eval_fn, ours.flops_model, w.precision, note
        )
    model = rnn.LSTMClassifier(**w.model, backend=impl, dtype=_DTYPES[w.precision])
    rng = np.random.default_rng(0)
    seq = w.seq_len
    batch = {
        "tokens": rng.integers(0, w.model["vocab_size"], (w.batch, seq), np.int32),
        "lengths": np.full((w.batch,), seq, np.int32),
        "label": rng.integers(0, w.model["num_classes"], (w.batch,), np.int32),
    }
    loss_fn, eval_fn = training.classification_fns(
        model, inputs=lambda b: (b["tokens"], b["lengths"])
    )
    precision, note = w.precision, ""
    if impl == "cudnn":
        precision = specs.TF32
        note = "cuDNN LSTM: float32 in, TF32 matmuls (jaxlib's cuDNN RNN takes float32 only)"
    elif impl == "pallas":
        note = "each direction's loop over time one fused Pallas (Triton) kernel per pass"
    return Built(
        model,
        batch,
        ("tokens", "lengths"),
        loss_fn,
        eval_fn,
        model.clone(backend="scan"),
        precision,
        note,
    )


class BertPretrainingBench(nn.Module):
    """`bert.BertForPreTraining` with `lengths` as a positional input (what `Built.inputs`
    and `training.create_train_state` pass); no attention mask, so attention takes its
    sequence-length path. Parameters under `model`."""

    config: bert.BertConfig

    @nn.compact
    def __call__(
        self,
        input_ids: jax.Array,
        token_type_ids: jax.Array,
        masked_positions: jax.Array,
        lengths: jax.Array,
        train: bool = False,
    ) -> tuple[jax.Array, jax.Array]:
        return bert.BertForPreTraining(self.config, name="model")(
            input_ids, None, token_type_ids, masked_positions, train, lengths=lengths
        )


def masked_predictions(seq_len: int, slots: int) -> int:
    """Real masked-LM predictions per sequence: 15% of the tokens, at most `slots`."""
    return min(slots, max(1, round(0.15 * seq_len)))


def build_bert(w: Workload, impl: str) -> Built:
    """BERT pretraining (masked LM on P masked positions + NSP), full-length sequences.

    `impl` "no_attn_dropout": the same with attention-probability dropout off, so the fused
    attention kernel runs (hidden dropout stays 0.1); "pallas": attention dropout on, in the
    fused Pallas kernels (`jaxmodels.pallas_attention`).

    FLOPs are counted with the XLA attention (`implementation="xla"`): cuDNN attention is a
    custom call with no matmuls in the jaxpr. The MLM head is counted where it runs, on the
    P masked positions only (the model gathers them before the vocabulary projection).
    """
    # Keys of w.model other than these two are BertConfig fields (e.g. from --set).
    fields = {k: v for k, v in w.model.items() if k not in ("preset", "max_predictions")}
    config = bert.BertConfig.preset(w.model["preset"], dtype=_DTYPES[w.precision], **fields)
    if impl == "no_attn_dropout":
        config = dataclasses.replace(config, attention_dropout=0.0)
    elif impl == "pallas":
        config = dataclasses.replace(config, implementation="pallas")
    model = BertPretrainingBench(config)
    rng = np.random.default_rng(0)
    batch_size, seq, slots = w.batch, w.seq_len, w.model["max_predictions"]
    real = masked_predictions(seq, slots)
    # Distinct positions per row, sorted; [CLS] (position 0) is never masked.
    positions = np.stack(
        [np.sort(rng.choice(np.arange(1, seq), slots, replace=False)) for _ in range(batch_size)]
    ).astype(np.int32)
    weights = np.zeros((batch_size, slots), np.float32)
    weights[:, :real] = 1.0
    half = seq // 2
    batch = {
        "input_ids": rng.integers(0, config.vocab_size, (batch_size, seq), np.int32),
        "token_type_ids": np.repeat(
            np.concatenate([np.zeros(half, np.int32), np.ones(seq - half, np.int32)])[None],
            batch_size,
            axis=0,
        ),
        "masked_positions": positions,
        "lengths": np.full((batch_size,), seq, np.int32),
        "masked_ids": rng.integers(0, config.vocab_size, (batch_size, slots), np.int32),
        "masked_weights": weights,
        "nsp_label": rng.integers(0, 2, (batch_size,), np.int32),
    }
    inputs = ("input_ids", "token_type_ids", "masked_positions", "lengths")

    def loss_fn(params: Any, model_state: Any, b: Any, key: jax.Array) -> Any:
        mlm_logits, nsp_logits = model.apply(
            {"params": params, **model_state},
            *(b[k] for k in inputs),
            train=True,
            rngs={"dropout": key},
        )
        total, metrics = bert.pretraining_loss(
            mlm_logits, b["masked_ids"], b["masked_weights"], nsp_logits, b["nsp_label"]
        )
        return total, (model_state, metrics)

    def eval_fn(params: Any, model_state: Any, b: Any) -> Any:
        mlm_logits, nsp_logits = model.apply(
            {"params": params, **model_state}, *(b[k] for k in inputs), train=False
        )
        loss_sum, count = losses.cross_entropy(mlm_logits, b["masked_ids"], b["masked_weights"])
        return {"loss": loss_sum, "count": count}

    flops_model = BertPretrainingBench(dataclasses.replace(config, implementation="xla"))
    note = f"MLM on {real} of {seq} tokens ({slots} slots)"
    if impl == "no_attn_dropout":
        note += "; attention-probability dropout 0 (cuDNN's fused attention on a GPU)"
    elif impl == "pallas":
        note += "; attention with dropout in fused Pallas kernels"
    return Built(model, batch, inputs, loss_fn, eval_fn, flops_model, w.precision, note)


def next_token_fns(model: nn.Module) -> tuple[training.LossFn, training.EvalFn]:
    """Next-token cross-entropy for `model(tokens, train=...) -> logits [batch, seq, vocab]`:
    the logits at t predict token t + 1 (seq - 1 predictions per sequence). The last
    position gets weight 0 rather than its logits sliced off, whose gradient would be a
    zero-padded copy of every logit."""

    def next_token_loss(logits: jax.Array, tokens: jax.Array) -> tuple[jax.Array, jax.Array]:
        seq = tokens.shape[1]
        weights = jnp.broadcast_to(jnp.arange(seq) < seq - 1, tokens.shape)
        return losses.cross_entropy(logits, jnp.roll(tokens, -1, axis=1), weights)

    def loss_fn(params: Any, model_state: Any, b: Any, key: jax.Array) -> Any:
        logits = model.apply(
            {"params": params, **model_state}, b["tokens"], train=True, rngs={"dropout": key}
        )
        loss_sum, count = next_token_loss(logits, b["tokens"])
        return loss_sum / count, (model_state, {})

    def eval_fn(params: Any, model_state: Any, b: Any) -> Any:
        logits = model.apply({"params": params, **model_state}, b["tokens"], train=False)
        loss_sum, count = next_token_loss(logits, b["tokens"])
        return {"loss": loss_sum, "count": count}

    return loss_fn, eval_fn


def build_transformer_lm(w: Workload, impl: str) -> Built:
    """Decoder-only LM (GPT-2 style), next-token loss on full-length sequences.

    FLOPs are counted with the XLA attention, as for BERT; the causal attention matmuls
    count in full (seq x seq), as the XLA path computes them and as the usual 6N + attention
    convention counts them, though fused kernels (cuDNN's, the peer's SDPA) skip the masked
    half (at seq 512, about 4% of the step's count).
    """
    del impl
    model = transformer.DecoderOnlyLM(**w.model, dtype=_DTYPES[w.precision])
    rng = np.random.default_rng(0)
    batch = {"tokens": rng.integers(0, w.model["vocab_size"], (w.batch, w.seq_len), np.int32)}
    loss_fn, eval_fn = next_token_fns(model)
    flops_model = model.clone(implementation="xla")
    return Built(model, batch, ("tokens",), loss_fn, eval_fn, flops_model, w.precision)


BUILDERS: dict[str, Builder] = {
    "cnn": build_cnn,
    "resnet": build_resnet,
    "lstm": build_lstm,
    "bert": build_bert,
    "transformer_lm": build_transformer_lm,
}

# What `--set` changes per family: the model's constructor arguments (BERT: `BertConfig`'s
# fields, and the workload's own two keys), less those the builders set themselves.
_SETTINGS_OF = {
    "cnn": cnn.SeedCNN,
    "resnet": cnn.ResNet,
    "lstm": rnn.LSTMClassifier,
    "bert": bert.BertConfig,
    "transformer_lm": transformer.DecoderOnlyLM,
}
_SET_BY_BUILDERS = {"parent", "name", "dtype", "backend"}


def optimizer(w: Workload) -> Any:
    """The optimizer of workload `w`'s training step (its name, rate and weight decay; a
    constant rate: a schedule would only add a scalar)."""
    return optim.make_optimizer(
        w.optimizer, w.learning_rate, total_steps=1_000_000, weight_decay=w.weight_decay
    )


def settings(w: Workload) -> list[str]:
    """The model settings `--set` may change in workload `w`."""
    fields = {f.name for f in dataclasses.fields(_SETTINGS_OF[w.family]) if f.init}
    return sorted(fields - _SET_BY_BUILDERS | set(w.model))


_PLAIN_TYPES = {"bool": bool, "int": int, "float": float, "str": str, "None": type(None)}


def _setting_types(default: Any, annotation: Any) -> tuple[type, ...] | None:
    """The plain types a setting takes: its default's, or where the default is None those
    its annotation names (``"int | None"``); None where that is not known."""
    if default is not None:
        return (type(default),) if type(default) in _PLAIN_TYPES.values() else None
    names = [n.strip() for n in str(annotation).split("|")]
    if "None" not in names or any(n not in _PLAIN_TYPES for n in names):
        return None
    return tuple(_PLAIN_TYPES[n] for n in names)


def setting_error(w: Workload, key: str, value: Any) -> str | None:
    """Why `--set key=value` does not fit workload `w` (a value of another type than the
    setting's: "maybe" where scan_layers is a bool would be a true string), or None. A
    setting whose default is None takes the types of its annotation (`remat_policy`, a
    `str | None`, takes a string or None)."""
    fields = {f.name: f for f in dataclasses.fields(_SETTINGS_OF[w.family])}
    field = fields.get(key)
    default = w.model.get(key, getattr(field, "default", None))
    types = _setting_types(default, getattr(field, "type", None))
    if types is None:
        return None
    # A float setting takes an int; a bool (an int to Python) only where bool is named.
    accepted = types + ((int,) if float in types else ())
    if isinstance(value, accepted) and (not isinstance(value, bool) or bool in types):
        return None
    kind = " or ".join(t.__name__ if t is not type(None) else "None" for t in types)
    article = "an" if kind[0] in "aeiou" else "a"
    return f"{key}={value!r}: {w.name}'s {key} is {article} {kind} (here {default!r})"


def _lstm_impls(w: Workload, nvidia: bool) -> list[str]:
    """scan, and on an NVIDIA GPU cuDNN and the fused Pallas kernels (hidden sizes they
    take); then the stock-Flax baseline."""
    gpu = []
    if nvidia:
        from jaxmodels import pallas_lstm

        fused = pallas_lstm.supported(w.model["hidden_size"]) and pallas_lstm.triton_available()
        gpu = ["cudnn"] + (["pallas"] if fused else [])
    return ["scan", *gpu, "flax_rnn"]


def _bert_impls(w: Workload, nvidia: bool) -> list[str]:
    from jaxmodels import pallas_attention

    fused = (
        nvidia
        and pallas_attention.triton_available()
        and pallas_attention.supported(
            w.seq_len, w.seq_len, bert.BertConfig.preset(w.model["preset"]).head_dim
        )
    )
    return ["", "no_attn_dropout"] + (["pallas"] if fused else [])


# Families with several implementations: a function of the workload and whether it runs on
# an NVIDIA GPU, listing the implementations that apply.
IMPLS: dict[str, Callable[[Workload, bool], list[str]]] = {
    "lstm": _lstm_impls,
    # BERT's recipe drops attention probabilities (0.1), which needs the explicit attention
    # path; without it the fused (cuDNN) kernel runs. Both are measured, and on an NVIDIA
    # GPU our fused kernels with dropout.
    "bert": _bert_impls,
}


def impls(w: Workload, nvidia: bool | None = None) -> list[str]:
    """Implementations of `w` ("" when there is only one) on an NVIDIA GPU (`nvidia`; None:
    whether this machine's backend is one)."""
    if w.family not in IMPLS:
        return [""]
    if nvidia is None:
        from jaxmodels import _pallas

        nvidia = _pallas.on_nvidia_gpu()
    return IMPLS[w.family](w, nvidia)
