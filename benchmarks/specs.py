"""What is measured: the workloads of each suite and the peak FLOP/s table.

Pure data, no JAX or PyTorch import: the JAX side (`benchmarks.workloads`) and the PyTorch peer
process (`benchmarks.peers`) read the same sizes from here, so both always measure the same
shapes.

Suites: ``gpu`` holds the sizes that mean something on an accelerator; ``cpu`` holds tiny
sizes of the same workloads that keep the whole suite (with peers) to a minute or two on a
laptop. CPU numbers exercise the code path; they say nothing about accelerator targets.

Peak FLOP/s (for MFU), by ``jax.devices()[0].device_kind`` (PyTorch's
``torch.cuda.get_device_name()`` gives the same string), per compute precision, dense
(no structured sparsity):

| device        | bfloat16        | float32        |
|---------------|-----------------|----------------|
| NVIDIA H200   | 790 TFLOP/s     | 67 TFLOP/s     |

On a device missing from the table MFU is left blank unless ``--peak-tflops X`` is given
(then X is used for every row). Add a device by adding a line to `PEAK_FLOPS`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

__all__ = [
    "BACKWARD_FACTOR",
    "DEFAULT_TIMING",
    "PEAK_FLOPS",
    "SUITES",
    "Workload",
    "peak_flops",
    "suite",
]

# Model FLOPs per training step = BACKWARD_FACTOR x forward FLOPs (see `benchmarks.flops`).
BACKWARD_FACTOR = 3

PEAK_FLOPS: dict[str, dict[str, float]] = {
    "NVIDIA H200": {"bfloat16": 790e12, "float32": 67e12},
}


def peak_flops(
    device_kind: str, precision: str, override_tflops: float | None = None
) -> float | None:
    """Peak FLOP/s of `device_kind` at `precision`; `override_tflops` (TFLOP/s) wins; else None."""
    if override_tflops:
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
      model: keyword arguments of the family's model.
      optimizer, learning_rate: for `jaxmodels.optim.make_optimizer` (and the peers' twin).
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
        # Sizes provisional until the families exist.
        Workload("bert_base", "bert", "bfloat16", 32, (512,), {"preset": "base"}, "adamw"),
        Workload("bert_large", "bert", "bfloat16", 16, (512,), {"preset": "large"}, "adamw"),
        Workload("transformer_lm", "transformer_lm", "bfloat16", 32, (1024,), {}, "adamw"),
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
        # Sizes provisional until the families exist.
        Workload("bert_base", "bert", "float32", 2, (32,), {"preset": "tiny"}, "adamw"),
        Workload("bert_large", "bert", "float32", 2, (32,), {"preset": "mini"}, "adamw"),
        Workload("transformer_lm", "transformer_lm", "float32", 2, (32,), {}, "adamw"),
    ),
}


# Timing per suite: K steps per window, R windows, untimed warm-up steps after the first.
DEFAULT_TIMING: dict[str, dict[str, int]] = {
    "gpu": {"steps": 20, "windows": 5, "warmup": 5},
    "cpu": {"steps": 3, "windows": 3, "warmup": 1},
}


def suite(name: str, only: list[str] | None = None) -> list[Workload]:
    """The workloads of suite `name`, optionally only those named in `only` (in suite order)."""
    if name not in SUITES:
        raise SystemExit(f"unknown suite {name!r}; choose one of {sorted(SUITES)}")
    workloads = list(SUITES[name])
    if only:
        known = {w.name for w in workloads}
        unknown = [n for n in only if n not in known]
        if unknown:
            raise SystemExit(
                f"unknown workload(s) {unknown} for --only; choose from {sorted(known)}"
            )
        workloads = [w for w in workloads if w.name in only]
    return workloads
