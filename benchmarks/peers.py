"""PyTorch and Keras peers: the same workloads, shapes and FLOP count, timed the same way.

Run in its own process (``python -m benchmarks --peers`` starts it), so that PyTorch and JAX
never share a device allocator; this process never imports JAX or Keras (the Keras peers run
in processes of their own, below)::

    python -m benchmarks.peers --suite cpu --json peers.json \\
        --flops mnist_cnn=336773120 lstm_article=293683200

``--flops NAME=N`` passes our *forward* FLOPs per workload, so TFLOP/s and MFU of the peer
rows use the same model-FLOP count as ours (3 x forward).

Peers (each an optimizer step in the timing: zero_grad, forward, loss, backward, step):

* ``mnist_cnn``: the same architecture, Conv2d(1,32,3)-ReLU-MaxPool-Conv2d(32,64,3)-ReLU-
  MaxPool-Flatten-Linear(1600,128)-ReLU-Linear(128,10), eager, float32, Adam.
* ``resnet50``: torchvision ``resnet50``, channels_last, bfloat16 autocast where the workload
  is bfloat16, SGD with momentum; eager and ``torch.compile`` (GPU only). Skipped if
  torchvision is missing.
* ``lstm_*``: Embedding + ``nn.LSTM`` (cuDNN on GPU) + Linear on the last layer's final state,
  bfloat16 autocast where the workload is bfloat16, Adam; eager, and ``torch.compile`` on GPU
  (dynamo leaves ``nn.LSTM`` itself eager). On a CPU whose oneDNN cannot train a bfloat16
  LSTM (no bfloat16 instructions) ``nn.LSTM`` runs outside autocast, in float32 (noted).
* ``bert_*``: ``transformers.BertForPreTraining`` with the same sizes (`specs.BERT_PRESETS`,
  random init, ``attn_implementation="sdpa"``, dropout 0.1), bfloat16 autocast, AdamW; eager
  and ``torch.compile`` (GPU only). The same batch shapes: full-length sequences (no
  attention mask, as ours), masked-LM labels -100 except at the masked positions, NSP labels;
  the loss is the model's own (MLM + NSP). Its MLM head runs on every position (the PyTorch
  reference gathers nothing), so it does more arithmetic than ours (seq 128: about 1.2x);
  TFLOP/s and MFU still use our count (head on the masked positions only), as for every
  peer. So there are also rows ``torch eager masked-head`` / ``torch compile masked-head``:
  the same model's own modules (``model.bert``, ``model.cls``) with the MLM head on the
  gathered masked positions only, P slots per sequence and the padding slot weighted 0, as
  ours: the peer that does our work.
* ``transformer_lm``: ``transformers.GPT2LMHeadModel`` with the same sizes (pre-LayerNorm,
  learned positions, tanh GELU, tied embeddings, no dropout, ``attn_implementation="sdpa"``),
  bfloat16 autocast, AdamW, next-token cross-entropy; eager and ``torch.compile`` (GPU only).
  Skipped if ``transformers`` is missing (as the BERT peers).
* Keras (impl ``keras jax``), for ``mnist_cnn`` and ``lstm_*`` only, where ``keras`` (3.x) is
  installed (else a skipped row per workload): the article's Keras models on Keras 3's JAX
  backend, float32. ``mnist_cnn``: ``keras.Sequential`` of Conv2D(32, 3, relu)-MaxPooling2D-
  Conv2D(64, 3, relu)-MaxPooling2D-Flatten-Dense(128, relu)-Dense(10); ``lstm_*``:
  Embedding-``keras.layers.LSTM`` x L (the last returns its final state)-Dense. Both compiled
  with ``jit_compile=True``, sparse categorical cross-entropy on logits, the workload's
  optimizer (Adam). On GPU ``keras.layers.LSTM`` takes its cuDNN path
  (``jax.experimental.rnn``, float32; the row's note says whether it did), on CPU its
  ``lax.scan`` loop. Timed as Keras users train: ``model.fit`` on a generator that yields the
  same device-resident batch, ``verbose=0``. First step: a ``model.fit`` of one step
  (compilation included); then a ``model.fit`` of the warm-up steps; then one ``model.fit``
  of R epochs of K steps, each epoch a window, timed from ``on_epoch_begin`` to
  ``on_epoch_end`` (after ``fit`` has read the epoch's loss back and the weights are ready),
  so a window includes ``fit``'s per-epoch work. Keras sets a process-wide backend and JAX
  takes its own device allocator, so each Keras workload runs in a fresh process of its own
  (``python -m benchmarks.peers --keras ...``, ``KERAS_BACKEND=jax``), started before any
  PyTorch peer touches the device; this process never imports Keras.

On CPU, ``torch.compile`` rows are skipped: compile time would dominate the tiny sizes.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.util
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

from benchmarks import errors, specs, timing

__all__ = ["main", "measure_keras", "run_keras_peers", "run_peers"]

PROG = "python -m benchmarks.peers"

TORCHVISION_MISSING = "torchvision is not installed"
NO_CPU_COMPILE = "torch.compile peers run on GPU only (compile time dominates tiny CPU sizes)"
TRANSFORMERS_MISSING = "transformers is not installed"
KERAS_MISSING = "keras is not installed"
KERAS_IMPL = "keras jax"
# Families with a Keras peer (the article's Keras models).
KERAS_FAMILIES = ("cnn", "lstm")
BERT_MLM_NOTE = "MLM head on all positions (HF); MFU from our count (masked only)"
# BERT's other peer: the MLM head on the masked positions only, as ours.
MASKED_HEAD = "masked-head"
MASKED_HEAD_NOTE = "BertForPreTraining's modules, MLM head on the masked positions only (as ours)"


def _device() -> tuple[Any, str, str]:
    import torch

    if torch.cuda.is_available():
        kind = torch.cuda.get_device_name(0)
        return torch.device("cuda"), kind, f"{kind} x1"
    return torch.device("cpu"), "cpu", "cpu x1"


def _mnist_cnn(num_classes: int) -> Any:
    """The MNIST CNN, the architecture of `jaxmodels.cnn.SeedCNN` (NCHW)."""
    from torch import nn

    return nn.Sequential(
        nn.Conv2d(1, 32, 3),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(1600, 128),
        nn.ReLU(),
        nn.Linear(128, num_classes),
    )


def _lstm_classifier(
    vocab_size: int, embed_dim: int, hidden_size: int, num_layers: int, num_classes: int
) -> Any:
    import torch
    from torch import nn

    class LSTMClassifier(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(vocab_size, embed_dim)
            self.lstm = nn.LSTM(embed_dim, hidden_size, num_layers, batch_first=True)
            self.head = nn.Linear(hidden_size, num_classes)
            self.lstm_autocast = True  # False: nn.LSTM in float32 even under autocast

        def forward(self, tokens: Any) -> Any:
            x = self.embed(tokens)
            if self.lstm_autocast:
                _, (h_n, _) = self.lstm(x)
            else:
                with torch.autocast(tokens.device.type, enabled=False):
                    _, (h_n, _) = self.lstm(x.float())
            return self.head(h_n[-1])

    return LSTMClassifier()


TORCH_TF32_NOTE = (
    "convolutions on TF32 tensor cores (cuDNN's default in PyTorch), linear layers in float32"
)


def _cudnn_runs_tf32() -> bool:
    """Whether PyTorch's float32 convolutions run on TF32 tensor cores here: cuDNN's TF32
    allowed (PyTorch's default) on a GPU of compute capability 8.0 or newer."""
    import torch

    return torch.backends.cudnn.allow_tf32 and torch.cuda.get_device_capability(0)[0] >= 8


def _precision(w: specs.Workload) -> str:
    return "bfloat16 autocast" if w.precision == "bfloat16" else w.precision


def _optimizer(w: specs.Workload, params: Any) -> Any:
    import torch

    if w.optimizer == "sgd":
        return torch.optim.SGD(params, lr=w.learning_rate, momentum=0.9)
    if w.optimizer == "adam":
        return torch.optim.Adam(params, lr=w.learning_rate)
    if w.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=w.learning_rate, weight_decay=w.weight_decay)
    raise ValueError(f"{w.name}: no peer optimizer for {w.optimizer!r}")


def _peer_impls(w: specs.Workload, device: Any) -> list[tuple[str, str | None]]:
    """[(impl, skip reason or None)] for workload `w`."""
    cuda = device.type == "cuda"
    compile_skip = None if cuda else NO_CPU_COMPILE
    if w.family == "cnn":
        return [("torch eager", None)]
    if w.family == "resnet":
        try:
            import torchvision  # noqa: F401
        except ImportError:
            return [("torch eager", TORCHVISION_MISSING), ("torch compile", TORCHVISION_MISSING)]
        if w.model.get("num_filters", 64) != 64:
            reason = "torchvision resnet50 has fixed widths (num_filters 64)"
            return [("torch eager", reason), ("torch compile", reason)]
        return [("torch eager", None), ("torch compile", compile_skip)]
    if w.family == "lstm":
        return [("torch eager", None), ("torch compile", compile_skip)]
    if w.family in ("bert", "transformer_lm"):
        try:
            import transformers  # noqa: F401
        except ImportError:
            return [("torch eager", TRANSFORMERS_MISSING), ("torch compile", TRANSFORMERS_MISSING)]
        impls = [("torch eager", None), ("torch compile", compile_skip)]
        if w.family == "bert":
            impls += [(f"{impl} {MASKED_HEAD}", skip) for impl, skip in impls]
        return impls
    raise ValueError(f"no peer for family {w.family!r}")


def _bert(w: specs.Workload, gen: Any, masked_head: bool = False) -> tuple[Any, dict[str, Any]]:
    """transformers BertForPreTraining of the workload's preset and its batch (kwargs);
    `masked_head`: the model as `_masked_head_bert` makes it, and its batch of masked positions."""
    import torch
    import transformers

    layers, hidden, heads = specs.BERT_PRESETS[w.model["preset"]]
    config = transformers.BertConfig(
        vocab_size=specs.BERT_VOCAB,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=4 * hidden,
        max_position_embeddings=specs.BERT_MAX_POSITIONS,
        hidden_act="gelu",
        attn_implementation="sdpa",
    )
    model = transformers.BertForPreTraining(config)
    b, t, slots = w.batch, w.seq_len, w.model["max_predictions"]
    real = min(slots, max(1, round(0.15 * t)))  # as `benchmarks.workloads.masked_predictions`
    input_ids = torch.randint(0, specs.BERT_VOCAB, (b, t), generator=gen)
    # `real` distinct positions per row, never [CLS] (0); every other label is -100.
    positions = 1 + torch.argsort(torch.rand(b, t - 1, generator=gen), dim=1)[:, :real]
    ids = torch.randint(0, specs.BERT_VOCAB, (b, real), generator=gen)
    token_type_ids = torch.zeros(b, t, dtype=torch.long)
    token_type_ids[:, t // 2 :] = 1
    next_sentence_label = torch.randint(0, 2, (b,), generator=gen)
    if masked_head:  # P slots: the real ones, then padding slots at [CLS] of weight 0
        pad = torch.zeros(b, slots - real, dtype=torch.long)
        return _masked_head_bert(model), {
            "input_ids": input_ids,
            "token_type_ids": token_type_ids,
            "mlm_positions": torch.cat([positions, pad], dim=1),
            "mlm_ids": torch.cat([ids, pad], dim=1),
            "mlm_weights": torch.cat([torch.ones(b, real), pad.float()], dim=1),
            "next_sentence_label": next_sentence_label,
        }
    mlm_labels = torch.full((b, t), -100, dtype=torch.long)
    mlm_labels.scatter_(1, positions, ids)
    # No attention_mask: every sequence is full length (ours takes none either), and an
    # all-ones mask costs transformers a host read per step (eager) or the flash kernel
    # (torch.compile).
    batch = {
        "input_ids": input_ids,
        "token_type_ids": token_type_ids,
        "labels": mlm_labels,
        "next_sentence_label": next_sentence_label,
    }
    return model, batch


def _masked_head_bert(model: Any) -> Any:
    """`model` (a `BertForPreTraining`) with the MLM head on the masked positions only."""
    import torch
    import torch.nn.functional as F

    class MaskedHeadBert(torch.nn.Module):
        """A `BertForPreTraining`'s own modules with the MLM head on the gathered masked
        positions only; returns the loss: the weighted mean MLM cross-entropy + NSP's."""

        def __init__(self, model: Any) -> None:
            super().__init__()
            self.model = model

        def forward(
            self,
            input_ids: Any,
            token_type_ids: Any,
            mlm_positions: Any,
            mlm_ids: Any,
            mlm_weights: Any,
            next_sentence_label: Any,
        ) -> Any:
            bert, heads = self.model.bert, self.model.cls
            sequence, pooled = bert(input_ids, token_type_ids=token_type_ids, return_dict=False)[:2]
            index = mlm_positions[..., None].expand(-1, -1, sequence.shape[-1])
            logits = heads.predictions(torch.gather(sequence, 1, index)).float()
            mlm = F.cross_entropy(logits.flatten(0, 1), mlm_ids.flatten(), reduction="none")
            weights = mlm_weights.flatten()
            mlm = (mlm * weights).sum() / weights.sum().clamp(min=1.0)
            nsp = F.cross_entropy(heads.seq_relationship(pooled).float(), next_sentence_label)
            return mlm + nsp

    return MaskedHeadBert(model)


def _gpt2(w: specs.Workload, gen: Any) -> tuple[Any, dict[str, Any]]:
    """transformers GPT2LMHeadModel with the `DecoderOnlyLM` sizes and its batch (kwargs)."""
    import torch
    import transformers

    m = w.model
    config = transformers.GPT2Config(
        vocab_size=m["vocab_size"],
        n_positions=m["max_len"],
        n_embd=m["embed_dim"],
        n_layer=m["num_layers"],
        n_head=m["num_heads"],
        n_inner=m["mlp_dim"],
        activation_function="gelu_new",
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        layer_norm_epsilon=1e-6,
        tie_word_embeddings=True,
        bos_token_id=0,
        eos_token_id=0,
        attn_implementation="sdpa",
    )
    model = transformers.GPT2LMHeadModel(config)
    tokens = torch.randint(0, m["vocab_size"], (w.batch, w.seq_len), generator=gen)
    return model, {"input_ids": tokens}


def _loss(w: specs.Workload, output: Any, batch: dict[str, Any], labels: Any) -> Any:
    """The training loss of the peer's forward `output` (float32)."""
    import torch.nn.functional as F

    if w.family == "bert":  # the model's own MLM + NSP loss, or `_masked_head_bert`'s
        return output.float() if "mlm_positions" in batch else output.loss.float()
    if w.family == "transformer_lm":
        logits = output.logits[:, :-1].float()
        tokens = batch["input_ids"][:, 1:]
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens.reshape(-1))
    return F.cross_entropy(output.float(), labels)


def _build(w: specs.Workload, device: Any, impl: str) -> tuple[Any, list[Any], dict[str, Any], Any]:
    """(model, positional inputs, keyword inputs, labels) on `device`: the workload's
    synthetic batch."""
    import torch

    gen = torch.Generator().manual_seed(0)
    if w.family == "bert":
        model, batch = _bert(w, gen, masked_head=impl.endswith(MASKED_HEAD))
    elif w.family == "transformer_lm":
        model, batch = _gpt2(w, gen)
    if w.family in ("bert", "transformer_lm"):
        batch = {k: v.to(device) for k, v in batch.items()}
        return model.to(device), [], batch, None
    num_classes = w.model.get("num_classes", 10)
    labels = torch.randint(0, num_classes, (w.batch,), generator=gen)
    if w.family == "cnn":
        model = _mnist_cnn(num_classes)
        h, wd, c = w.input_shape
        inputs = [torch.randn(w.batch, c, h, wd, generator=gen)]
    elif w.family == "resnet":
        import torchvision

        model = torchvision.models.resnet50(num_classes=num_classes)
        h, wd, c = w.input_shape
        images = torch.randn(w.batch, c, h, wd, generator=gen)
        inputs = [images.contiguous(memory_format=torch.channels_last)]
    elif w.family == "lstm":
        model = _lstm_classifier(**w.model)
        inputs = [torch.randint(0, w.model["vocab_size"], (w.batch, w.seq_len), generator=gen)]
    else:
        raise ValueError(f"no peer for family {w.family!r}")
    model = model.to(device)
    if w.family == "resnet":
        model = model.to(memory_format=torch.channels_last)
    inputs = [x.to(device) for x in inputs]  # .to keeps the channels_last layout
    return model, inputs, {}, labels.to(device)


def measure_peer(
    w: specs.Workload,
    impl: str,
    steps: int,
    windows: int,
    warmup: int,
    forward_flops: float | None,
    peak_tflops: float | None,
) -> dict[str, Any]:
    """Times one peer training step; returns its row."""
    import torch

    device, kind, label = _device()
    cuda = device.type == "cuda"
    torch.manual_seed(0)
    model, inputs, kwargs, labels = _build(w, device, impl)
    model.train()
    opt = _optimizer(w, model.parameters())
    forward = torch.compile(model) if impl.startswith("torch compile") else model
    bf16 = w.precision == "bfloat16"

    def autocast() -> Any:
        if bf16:
            return torch.autocast(device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    notes = []
    if w.family == "lstm" and bf16 and not cuda:
        try:  # oneDNN has no bfloat16 LSTM training on CPUs without bfloat16 instructions
            with autocast():
                output = model(inputs[0][:1])
            output.float().sum().backward()
        except RuntimeError as error:
            if "primitive descriptor" not in str(error):
                raise
            model.lstm_autocast = False
            notes.append("outside autocast: this CPU's oneDNN has no bfloat16 LSTM")

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with autocast():
            output = forward(*inputs, **kwargs)
        loss = _loss(w, output, kwargs, labels)
        loss.backward()
        opt.step()

    sync: Callable[[], Any] = torch.cuda.synchronize if cuda else (lambda: None)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    result = timing.time_training(step, sync, steps, windows, warmup)
    precision = _precision(w)
    if w.family == "lstm":
        lstm_dtype = torch.float32
        if model.lstm_autocast:
            with torch.no_grad(), autocast():  # what autocast made of nn.LSTM here
                lstm_dtype = model.lstm(model.embed(inputs[0][:1]))[0].dtype
        computes = str(lstm_dtype).removeprefix("torch.")
        notes.append(f"nn.LSTM computes in {computes}")
        if computes != w.precision:  # cuDNN's RNN under autocast: float16, whatever was asked
            precision = f"{precision}, LSTM {computes}"
        if impl == "torch compile":
            notes.append("dynamo leaves nn.LSTM eager")
    if w.family == "bert":
        notes.append(MASKED_HEAD_NOTE if impl.endswith(MASKED_HEAD) else BERT_MLM_NOTE)
    tf32 = not bf16 and w.family == "cnn" and cuda and _cudnn_runs_tf32()
    if tf32:
        notes.append(TORCH_TF32_NOTE)
    row = timing.empty_row(w, impl, "torch", device=label, note="; ".join(notes))
    # MFU against the peak of the precision the workload computes in (none for TF32).
    row["precision"] = specs.TF32 if tf32 else w.precision
    timing.derive(row, w, result, forward_flops, kind, peak_tflops)
    row["precision"] = specs.TF32 if tf32 else precision
    if cuda:
        row["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return row


def run_peers(
    workloads: list[specs.Workload],
    steps: int,
    windows: int,
    warmup: int,
    forward_flops: dict[str, float],
    peak_tflops: float | None = None,
    log: Callable[[str], Any] = lambda s: print(s, file=sys.stderr, flush=True),
    timeout: float = 1800.0,
) -> list[dict[str, Any]]:
    """Rows of every peer of `workloads` (skipped ones with their reason): PyTorch, then Keras.

    The Keras peers run first, each in a process of its own, before PyTorch here takes any
    device memory.
    """
    keras_rows = run_keras_peers(
        workloads, steps, windows, warmup, forward_flops, peak_tflops, log, timeout
    )
    torch_rows = _torch_peers(workloads, steps, windows, warmup, forward_flops, peak_tflops, log)
    return torch_rows + keras_rows


def _torch_peers(
    workloads: list[specs.Workload],
    steps: int,
    windows: int,
    warmup: int,
    forward_flops: dict[str, float],
    peak_tflops: float | None,
    log: Callable[[str], Any],
) -> list[dict[str, Any]]:
    try:
        import torch
    except ImportError:
        return [
            timing.empty_row(w, "torch", "torch", status="skipped", note="torch is not installed")
            for w in workloads
        ]
    device, _, label = _device()
    torch.backends.cudnn.benchmark = True
    rows = []
    for w in workloads:
        for impl, skip in _peer_impls(w, device):
            if skip:
                rows.append(
                    timing.empty_row(
                        w,
                        impl,
                        "torch",
                        device=label,
                        precision=_precision(w),
                        status="skipped",
                        note=skip,
                    )
                )
                continue
            log(f"peer {w.name} {impl} ...")
            try:
                row = measure_peer(
                    w, impl, steps, windows, warmup, forward_flops.get(w.name), peak_tflops
                )
            except Exception as e:  # report and go on with the other peers
                row = timing.empty_row(
                    w, impl, "torch", device=label, status="failed", note=_one_line(e)
                )
            rows.append(row)
    return rows


# ---------------------------------------------------------------------------------------------
# Keras 3 on its JAX backend: each workload in a fresh `python -m benchmarks.peers --keras`.


def _has_keras() -> bool:
    """Whether keras is installed, without importing it (that would pick a backend here)."""
    return importlib.util.find_spec("keras") is not None


def _suite_of(w: specs.Workload) -> str:
    for name, workloads in specs.SUITES.items():
        if any(dataclasses.replace(w, batch=v.batch) == v for v in workloads):
            return name
    raise ValueError(f"workload {w.name!r} is in no suite of benchmarks.specs")


def run_keras_peers(
    workloads: list[specs.Workload],
    steps: int,
    windows: int,
    warmup: int,
    forward_flops: dict[str, float],
    peak_tflops: float | None = None,
    log: Callable[[str], Any] = lambda s: print(s, file=sys.stderr, flush=True),
    timeout: float = 1800.0,
) -> list[dict[str, Any]]:
    """The Keras rows of `workloads` (families `KERAS_FAMILIES`; none for the others), each
    measured in a fresh process; skipped rows if keras is not installed."""
    todo = [w for w in workloads if w.family in KERAS_FAMILIES]
    if todo and not _has_keras():
        return [
            timing.empty_row(
                w, KERAS_IMPL, "keras", precision="float32", status="skipped", note=KERAS_MISSING
            )
            for w in todo
        ]
    from benchmarks.cli import _child  # the suite's runner of child processes

    rows = []
    for w in todo:
        log(f"peer {w.name} {KERAS_IMPL} (own process) ...")
        cmd = ["benchmarks.peers", "--keras", "--suite", _suite_of(w), "--only", w.name]
        cmd += ["--batch", str(w.batch)]
        cmd += ["--steps", str(steps), "--windows", str(windows), "--warmup", str(warmup)]
        if forward_flops.get(w.name):
            cmd += ["--flops", f"{w.name}={forward_flops[w.name]}"]
        if peak_tflops is not None:
            cmd += ["--peak-tflops", str(peak_tflops)]
        result, error = _child(cmd, timeout, echo=True, new_group=False)
        if result is None:
            result = [
                timing.empty_row(
                    w, KERAS_IMPL, "keras", precision="float32", status="failed", note=error
                )
            ]
        rows += result
    return rows


def _keras_model(w: specs.Workload) -> Any:
    """The article's Keras model of workload `w` (logits out)."""
    import keras
    from keras import layers

    num_classes = w.model.get("num_classes", 10)
    if w.family == "cnn":  # `jaxmodels.cnn.SeedCNN`
        return keras.Sequential(
            [
                keras.Input(w.input_shape),
                layers.Conv2D(32, 3, activation="relu"),
                layers.MaxPooling2D(2),
                layers.Conv2D(64, 3, activation="relu"),
                layers.MaxPooling2D(2),
                layers.Flatten(),
                layers.Dense(128, activation="relu"),
                layers.Dense(num_classes),
            ]
        )
    if w.family == "lstm":  # `jaxmodels.rnn.LSTMClassifier`, "last" pooling
        m = w.model
        stack = [keras.Input((w.seq_len,), dtype="int32")]
        stack.append(layers.Embedding(m["vocab_size"], m["embed_dim"]))
        for i in range(m["num_layers"]):
            stack.append(layers.LSTM(m["hidden_size"], return_sequences=i < m["num_layers"] - 1))
        stack.append(layers.Dense(m["num_classes"]))
        return keras.Sequential(stack)
    raise ValueError(f"no Keras peer for family {w.family!r}")


def _keras_optimizer(w: specs.Workload) -> Any:
    import keras

    if w.optimizer == "sgd":
        return keras.optimizers.SGD(w.learning_rate, momentum=0.9)
    if w.optimizer == "adam":
        return keras.optimizers.Adam(w.learning_rate)
    if w.optimizer == "adamw":
        return keras.optimizers.AdamW(w.learning_rate, weight_decay=w.weight_decay)
    raise ValueError(f"{w.name}: no Keras optimizer for {w.optimizer!r}")


def measure_keras(
    w: specs.Workload,
    steps: int,
    windows: int,
    warmup: int,
    forward_flops: float | None,
    peak_tflops: float | None,
) -> dict[str, Any]:
    """Times `model.fit` of the Keras model of `w` (in a process whose backend is JAX)."""
    timing.check_protocol(steps, windows, warmup)
    import jax
    import keras
    import numpy as np

    if keras.backend.backend() != "jax":
        raise RuntimeError(f"Keras backend is {keras.backend.backend()!r}, not 'jax'")
    device = jax.devices()[0]
    keras.utils.set_random_seed(0)
    cudnn_lstm = _watch_keras_lstm()
    model = _keras_model(w)
    model.compile(
        optimizer=_keras_optimizer(w),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        jit_compile=True,
    )
    rng = np.random.default_rng(0)
    if w.family == "cnn":
        x = rng.standard_normal((w.batch, *w.input_shape), np.float32)
    else:
        x = rng.integers(0, w.model["vocab_size"], (w.batch, w.seq_len), np.int32)
    y = rng.integers(0, w.model.get("num_classes", 10), (w.batch,), np.int32)
    batch = jax.device_put((x, y))  # uncommitted, as fit would put it (committed recompiles)

    def repeat() -> Any:  # one synthetic batch, held on the device, for every step
        while True:
            yield batch

    def weights_ready() -> None:
        jax.block_until_ready([v.value for v in model.variables])

    class Windows(keras.callbacks.Callback):
        """Each epoch of `fit` is a window of K steps."""

        def __init__(self) -> None:
            super().__init__()
            self.per_step: list[float] = []
            self.start = 0.0

        def on_epoch_begin(self, epoch: int, logs: Any = None) -> None:
            self.start = time.perf_counter()

        def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
            weights_ready()  # fit has read the loss back already; the weights too
            self.per_step.append((time.perf_counter() - self.start) / steps)

    start = time.perf_counter()
    model.fit(repeat(), steps_per_epoch=1, epochs=1, verbose=0, shuffle=False)
    weights_ready()
    first = time.perf_counter() - start
    if warmup:
        model.fit(repeat(), steps_per_epoch=warmup, epochs=1, verbose=0, shuffle=False)
    weights_ready()
    timer = Windows()
    with timing.compile_events() as compiled:  # inside the windows: there should be none
        model.fit(
            repeat(),
            steps_per_epoch=steps,
            epochs=windows,
            verbose=0,
            shuffle=False,
            callbacks=[timer],
        )
    result = timing.Timing(first, statistics.median(timer.per_step), timer.per_step)

    notes = ["model.fit, one device-resident batch"]
    precision = "float32"
    if compiled.get("compiles"):
        notes.append(f"{compiled['compiles']} XLA compilation(s) inside the timed windows")
    if w.family == "lstm":
        if cudnn_lstm.get("loop"):  # Keras fell back, for one layer at least
            why = "its cuDNN path needs a GPU" if device.platform != "gpu" else "cuDNN refused"
            notes.append(f"keras.layers.LSTM as a lax.scan loop ({why})")
        elif cudnn_lstm.get("cudnn"):
            notes.append("keras.layers.LSTM on cuDNN (float32 in, TF32 matmuls)")
            precision = specs.TF32
    precision, tf32_note = timing.xla_precision(precision, device)
    notes += filter(None, [tf32_note])
    row = timing.empty_row(
        w,
        KERAS_IMPL,
        "keras",
        device=f"{device.device_kind} x1",
        precision=precision,
        note="; ".join(notes),
    )
    timing.derive(row, w, result, forward_flops, device.device_kind, peak_tflops)
    peak = timing.peak_memory_bytes([device])
    if peak is not None:
        row["peak_mem_gib"] = peak / 2**30
    return row


def _watch_keras_lstm() -> dict[str, int]:
    """Counts, while the model traces, how often `keras.layers.LSTM` took the backend's cuDNN
    path ("cudnn") or fell back to its generic loop ("loop"). Keras falls back silently, so
    this wraps its (internal) backend function; an empty count if that moved."""
    counts: dict[str, int] = {}
    try:
        from keras.src import backend
    except ImportError:
        return counts
    fused = getattr(backend, "lstm", None)
    if fused is None:
        return counts

    def watched(*args: Any, **kwargs: Any) -> Any:
        try:
            out = fused(*args, **kwargs)
        except NotImplementedError:
            counts["loop"] = counts.get("loop", 0) + 1
            raise
        counts["cudnn"] = counts.get("cudnn", 0) + 1
        return out

    backend.lstm = watched
    return counts


def _one_line(e: BaseException) -> str:
    text = f"{type(e).__name__}: {e}".strip().splitlines()
    return text[0][:200] if text else type(e).__name__


def _flops_arg(text: str) -> tuple[str, float]:
    name, _, value = text.partition("=")
    try:
        return name, float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--flops takes NAME=FORWARD_FLOPS, got {text!r}"
        ) from None


def main(argv: list[str] | None = None) -> int:
    """Command line of the peer process; writes its rows as JSON."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--suite", choices=sorted(specs.SUITES), required=True)
    parser.add_argument("--only", nargs="+", metavar="NAME")
    parser.add_argument("--batch", type=int, default=None, help="global batch size instead")
    parser.add_argument("--steps", type=int, default=None, help="steps per timed window")
    parser.add_argument("--windows", type=int, default=None, help="timed windows")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps after the first")
    parser.add_argument(
        "--flops",
        nargs="*",
        type=_flops_arg,
        default=[],
        metavar="NAME=N",
        help="our forward FLOPs per workload (for TFLOP/s and MFU)",
    )
    parser.add_argument("--peak-tflops", type=float, default=None)
    parser.add_argument(
        "--timeout", type=float, default=1800, help="seconds allowed per Keras peer process"
    )
    parser.add_argument(
        "--keras",
        action="store_true",
        help="measure the Keras peers here, on Keras's JAX backend (what the peer process "
        "starts per workload)",
    )
    parser.add_argument("--json", required=True, metavar="FILE")
    args = parser.parse_args(argv)
    workloads = specs.suite(args.suite, args.only, args.batch)
    timed = timing.protocol(args.suite, args.steps, args.windows, args.warmup)
    flops = dict(args.flops)
    if args.keras:
        if "keras" in sys.modules and os.environ.get("KERAS_BACKEND") != "jax":
            raise SystemExit("keras is already imported with another backend")
        os.environ["KERAS_BACKEND"] = "jax"  # before keras is imported
        with timing.without_compilation_cache():
            rows = [
                measure_keras(w, *timed, flops.get(w.name), args.peak_tflops)
                for w in workloads
                if w.family in KERAS_FAMILIES
            ]
    else:
        # torch.compile's first step compiles from scratch, as ours does: its on-disk caches
        # (Inductor's, Triton's) start empty, whatever earlier runs left.
        with tempfile.TemporaryDirectory() as caches:
            for variable in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR"):
                os.environ[variable] = os.path.join(caches, variable.lower())
            rows = run_peers(workloads, *timed, flops, args.peak_tflops, timeout=args.timeout)
    with open(args.json, "w") as f:
        json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(errors.run(main, PROG))
