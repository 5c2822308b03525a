"""What is measured: the workloads of each suite and the peak FLOP/s table.

Pure data, no JAX or PyTorch import: the JAX side (`benchmarks.workloads`) and the PyTorch peer
process (`benchmarks.peers`) read the same sizes from here, so both always measure the same
shapes.

Suites: ``gpu`` holds the sizes that mean something on an accelerator; ``cpu`` holds tiny
sizes of the same workloads that keep the whole suite to a few minutes on a 2-core CPU
(with peers too), most of it compilation. CPU numbers exercise the code path; they say
nothing about accelerator targets.

Transformer workloads:

* ``bert_base`` / ``bert_large``: `jaxmodels.bert.BertForPreTraining` (masked LM + next-sentence
  prediction, dropout 0.1 as published), AdamW, the two phases of BERT pretraining: base at
  seq 128, batch 256; large at seq 512, batch 32. 15% of the tokens are masked; the model
  takes P = ``max_predictions`` masked positions per sequence, the fixed-size slots of the
  original recipe: 0.15 x 128 = 19.2 -> 20 slots (the original ``max_predictions_per_seq``
  for seq 128; 19 real predictions, 1 padding slot of weight 0), 0.15 x 512 = 76.8 -> 76 slots
  (all real). CPU sizes: preset tiny, seq 32 / P 5 and seq 64 / P 10. Sequences are full
  length and passed as ``lengths`` (the fast attention path), not as an attention mask. With
  attention dropout active, the training step computes attention on the explicit path of
  `jaxmodels.attention` (float32 softmax), not cuDNN.
* ``transformer_lm``: `jaxmodels.transformer.DecoderOnlyLM` at GPT-2-small size (12 layers,
  768 wide, 12 heads, MLP 3072) with a 32768-token vocabulary, next-token cross-entropy,
  AdamW; seq 512 and batch 32 (16k tokens per step) rather than GPT-2's 1024 context, to keep
  the float32 logits (batch x seq x vocab) and activation memory modest. CPU: 2 layers,
  64 wide, seq 32, batch 4.

Items are sequences for every token workload; tokens/s = batch x sequence length / step time.

Peak FLOP/s (for MFU), by ``jax.devices()[0].device_kind`` (PyTorch's
``torch.cuda.get_device_name()`` gives the same string), per compute precision, dense
(no structured sparsity):

| device        | bfloat16        | float32        |
|---------------|-----------------|----------------|
| NVIDIA H200   | 790 TFLOP/s     | 67 TFLOP/s     |

The H200's bfloat16 peak is the one the published peer MFU figures this suite is compared
with are computed against (a bfloat16 8192^3 matmul reaches 708 TFLOP/s there), so the
percentages compare; NVIDIA's data sheet gives 989 dense for the SXM part, against which
every MFU here would be 0.8x. With N devices MFU is over N peaks. Rows whose float32
matmuls or convolutions run on TF32 tensor cores (XLA's default precision on NVIDIA GPUs
of compute capability 8.0 and newer; cuDNN's convolutions in PyTorch) are labelled
`TF32` and have no MFU: against the plain FP32 peak it would be far too high.

On a device missing from the table MFU is left blank unless ``--peak-tflops X`` (one
device's peak) is given; then X is used for every row but the TF32 ones (or those of
another float32 matmul algorithm), which keep no MFU. Add a device by adding a line to
`PEAK_FLOPS`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from benchmarks.errors import UsageError

__all__ = [
    "BACKWARD_FACTOR",
    "BERT_PRESETS",
    "DEFAULT_TIMING",
    "NOT_THE_PEERS_WORK",
    "PEAK_FLOPS",
    "TF32",
    "SUITES",
    "Workload",
    "impl_label",
    "peak_flops",
    "suite",
]

# Our implementations that are not what the peers run, left out of the ours/peer ratios:
# BERT with attention-probability dropout off (the peers keep it), and stock Flax's nn.RNN
# (a baseline, not ours).
NOT_THE_PEERS_WORK = ("no_attn_dropout", "flax_rnn")

# Model FLOPs per training step = BACKWARD_FACTOR x forward FLOPs (see `benchmarks.flops`).
BACKWARD_FACTOR = 3

PEAK_FLOPS: dict[str, dict[str, float]] = {
    "NVIDIA H200": {"bfloat16": 790e12, "float32": 67e12},
}

# The precision of rows whose float32 matmuls run on TF32 tensor cores (cuDNN's RNN, which
# takes float32 only and allows TF32 by default; XLA's float32 matmuls and convolutions on
# NVIDIA GPUs of compute capability >= 8.0, `timing.xla_float32_arithmetic`). No peak is listed for
# it, so their MFU is blank: against the plain FP32 peak it would be far too high.
TF32 = "float32 (TF32)"


def impl_label(impl: str) -> str:
    """The table's impl column for our rows ("jax", "jax cudnn", ...)."""
    return f"jax {impl}".strip()


def peak_flops(
    device_kind: str, precision: str, override_tflops: float | None = None
) -> float | None:
    """Peak FLOP/s of `device_kind` at `precision`; `override_tflops` (TFLOP/s) wins; else None.

    Float32 rows whose matmuls run in another arithmetic (`TF32`, or an XLA algorithm, as
    ``float32 (BF16_BF16_F32_X3)``) have no peak, given or listed."""
    if precision.startswith("float32 ("):
        return None
    if override_tflops is not None:
        return override_tflops * 1e12
    return PEAK_FLOPS.get(device_kind, {}).get(precision)


@dataclasses.dataclass(frozen=True)
class Workload:
    """One training workload at one size.

    Attributes:
      name: row name (``--only`` selects by it).
      family: which builder makes the model (`benchmarks.workloads.BUILDERS`) and which peer.
      precision: compute dtype, ``float32`` or ``bfloat16`` (parameters are float32).
      batch: global batch (examples per step).
      input_shape: one example's shape: (height, width, channels) or (sequence length,).
      model: keyword arguments of the family's model. BERT (``bert``): ``preset`` (a name of
        `BERT_PRESETS`) and ``max_predictions``, P, the masked-LM slots per sequence (see the
        module docstring); ``transformer_lm``: the fields of `jaxmodels.transformer.DecoderOnlyLM`.
      optimizer, learning_rate: for `jaxmodels.optim.make_optimizer` (and the peers' twin);
        the weight decay is `weight_decay`'s.
    """

    name: str
    family: str
    precision: str
    batch: int
    input_shape: tuple[int, ...]
    model: dict[str, Any]
    optimizer: str = "adam"
    learning_rate: float = 1e-3

    @property
    def weight_decay(self) -> float:
        """Decoupled weight decay: BERT's and GPT-2's 0.01 with adamw, else none. Given to
        ours and to every peer, whose defaults differ (PyTorch's AdamW 0.01, Keras's 0.004);
        ours spares biases and norm scales as the recipes do, the peers decay every
        parameter: the same arithmetic but for those few vectors."""
        return 0.01 if self.optimizer == "adamw" else 0.0

    @property
    def seq_len(self) -> int | None:
        """Tokens per example for sequence models, else None."""
        return self.input_shape[0] if self.family in _TOKEN_FAMILIES else None

    @property
    def shape(self) -> str:
        """One example's shape for the table, e.g. ``224x224x3`` or ``seq 128``."""
        if self.seq_len is not None:
            return f"seq {self.seq_len}"
        return "x".join(str(d) for d in self.input_shape)


_TOKEN_FAMILIES = ("lstm", "bert", "transformer_lm")

# BERT sizes by preset: (layers, hidden, heads); intermediate 4 x hidden, vocabulary 30522,
# 512 positions. The same table as `jaxmodels.bert.PRESETS` (a test keeps them equal), here
# because the peer process does not import JAX.
BERT_PRESETS: dict[str, tuple[int, int, int]] = {
    "tiny": (2, 128, 2),
    "base": (12, 768, 12),
    "large": (24, 1024, 16),
}
BERT_VOCAB = 30522
BERT_MAX_POSITIONS = 512

# GPT-2-small-like decoder-only LM (`jaxmodels.transformer.DecoderOnlyLM`): pre-LayerNorm,
# learned positions, tanh GELU, tied embeddings, no dropout; a 32768-token vocabulary.
_GPT2_SMALL = dict(
    vocab_size=32768, embed_dim=768, num_layers=12, num_heads=12, mlp_dim=3072, max_len=512
)

_ARTICLE_LSTM = dict(vocab_size=10000, embed_dim=64, hidden_size=128, num_layers=2, num_classes=10)
_BIG_LSTM = dict(vocab_size=10000, embed_dim=1024, hidden_size=1024, num_layers=2, num_classes=10)

SUITES: dict[str, tuple[Workload, ...]] = {
    "gpu": (
        Workload("mnist_cnn", "cnn", "float32", 1024, (28, 28, 1), {"num_classes": 10}),
        Workload(
            "resnet50",
            "resnet",
            "bfloat16",
            256,
            (224, 224, 3),
            {"num_classes": 1000},
            optimizer="sgd",
            learning_rate=0.1,
        ),
        Workload("lstm_article", "lstm", "bfloat16", 512, (100,), _ARTICLE_LSTM),
        Workload("lstm_2x1024", "lstm", "bfloat16", 256, (128,), _BIG_LSTM),
        # BERT pretraining phase 1 (seq 128) and phase 2 (seq 512) shapes: MLM + NSP.
        Workload(
            "bert_base",
            "bert",
            "bfloat16",
            256,
            (128,),
            {"preset": "base", "max_predictions": 20},
            "adamw",
            1e-4,
        ),
        Workload(
            "bert_large",
            "bert",
            "bfloat16",
            32,
            (512,),
            {"preset": "large", "max_predictions": 76},
            "adamw",
            1e-4,
        ),
        Workload("transformer_lm", "transformer_lm", "bfloat16", 32, (512,), _GPT2_SMALL, "adamw"),
    ),
    "cpu": (
        Workload("mnist_cnn", "cnn", "float32", 64, (28, 28, 1), {"num_classes": 10}),
        # The real ResNet-50 (same widths as torchvision's), on small images.
        Workload(
            "resnet50",
            "resnet",
            "float32",
            4,
            (32, 32, 3),
            {"num_classes": 1000},
            optimizer="sgd",
            learning_rate=0.1,
        ),
        Workload("lstm_article", "lstm", "bfloat16", 32, (20,), _ARTICLE_LSTM),
        Workload(
            "lstm_2x1024",
            "lstm",
            "bfloat16",
            16,
            (16,),
            {**_BIG_LSTM, "embed_dim": 64, "hidden_size": 64},
        ),
        Workload(
            "bert_base",
            "bert",
            "bfloat16",
            4,
            (32,),
            {"preset": "tiny", "max_predictions": 5},
            "adamw",
            1e-4,
        ),
        Workload(
            "bert_large",
            "bert",
            "bfloat16",
            2,
            (64,),
            {"preset": "tiny", "max_predictions": 10},
            "adamw",
            1e-4,
        ),
        Workload(
            "transformer_lm",
            "transformer_lm",
            "bfloat16",
            4,
            (32,),
            {**_GPT2_SMALL, "embed_dim": 64, "num_layers": 2, "num_heads": 4, "mlp_dim": 256},
            "adamw",
        ),
    ),
}


# Timing per suite: K steps per window, R windows, untimed warm-up steps after the first.
DEFAULT_TIMING: dict[str, dict[str, int]] = {
    "gpu": {"steps": 20, "windows": 5, "warmup": 5},
    "cpu": {"steps": 3, "windows": 3, "warmup": 10},
}


def suite(name: str, only: list[str] | None = None, batch: int | None = None) -> list[Workload]:
    """The workloads of suite `name`, optionally only those named in `only` (in suite order),
    with global batch size `batch` instead of their own if given."""
    if name not in SUITES:
        raise UsageError(f"unknown suite {name!r}; choose one of {sorted(SUITES)}")
    workloads = list(SUITES[name])
    if only:
        known = {w.name for w in workloads}
        unknown = [n for n in only if n not in known]
        if unknown:
            raise UsageError(
                f"unknown workload(s) {unknown} for --only; choose from {sorted(known)}"
            )
        workloads = [w for w in workloads if w.name in only]
    if batch is not None:
        if batch < 1:
            raise UsageError(f"--batch must be >= 1, got {batch}")
        workloads = [dataclasses.replace(w, batch=batch) for w in workloads]
    return workloads
