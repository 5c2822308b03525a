"""PyTorch peers: the same workloads, shapes and FLOP count, timed the same way.

Run in its own process (``python -m benchmarks --peers`` starts it), so that PyTorch and JAX
never share a device allocator and this module never imports JAX::

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
  (dynamo leaves ``nn.LSTM`` itself eager).
* ``bert_*``: ``transformers.BertForPreTraining`` with the same sizes (`specs.BERT_PRESETS`,
  random init, ``attn_implementation="sdpa"``, dropout 0.1), bfloat16 autocast, AdamW; eager
  and ``torch.compile`` (GPU only). The same batch shapes: full-length sequences (an all-ones
  attention mask), masked-LM labels -100 except at the masked positions, NSP labels; the loss
  is the model's own (MLM + NSP). Its MLM head runs on every position (the PyTorch
  reference gathers nothing), so it does more arithmetic than ours; TFLOP/s and MFU still
  use our count (head on the masked positions only), as for every peer.
* ``transformer_lm``: ``transformers.GPT2LMHeadModel`` with the same sizes (pre-LayerNorm,
  learned positions, tanh GELU, tied embeddings, no dropout, ``attn_implementation="sdpa"``),
  bfloat16 autocast, AdamW, next-token cross-entropy; eager and ``torch.compile`` (GPU only).
  Skipped if ``transformers`` is missing (as the BERT peers).
* Keras: only if ``keras`` is importable (no Keras peer is written yet).

On CPU, ``torch.compile`` rows are skipped: compile time would dominate the tiny sizes.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from collections.abc import Callable
from typing import Any

from benchmarks import specs, timing

__all__ = ["main", "run_peers"]

TORCHVISION_MISSING = "torchvision is not installed"
NO_CPU_COMPILE = "torch.compile peers run on GPU only (compile time dominates tiny CPU sizes)"
TRANSFORMERS_MISSING = "transformers is not installed"
BERT_MLM_NOTE = "MLM head on all positions (HF); MFU from our count (masked only)"


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
    from torch import nn

    class LSTMClassifier(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(vocab_size, embed_dim)
            self.lstm = nn.LSTM(embed_dim, hidden_size, num_layers, batch_first=True)
            self.head = nn.Linear(hidden_size, num_classes)

        def forward(self, tokens: Any) -> Any:
            _, (h_n, _) = self.lstm(self.embed(tokens))
            return self.head(h_n[-1])

    return LSTMClassifier()


def _precision(w: specs.Workload) -> str:
    return "bfloat16 autocast" if w.precision == "bfloat16" else w.precision


def _optimizer(w: specs.Workload, params: Any) -> Any:
    import torch

    if w.optimizer == "sgd":
        return torch.optim.SGD(params, lr=w.learning_rate, momentum=0.9)
    if w.optimizer == "adam":
        return torch.optim.Adam(params, lr=w.learning_rate)
    if w.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=w.learning_rate)
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
        return [("torch eager", None), ("torch compile", compile_skip)]
    raise ValueError(f"no peer for family {w.family!r}")


def _bert(w: specs.Workload, gen: Any) -> tuple[Any, dict[str, Any]]:
    """transformers BertForPreTraining of the workload's preset and its batch (kwargs)."""
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
    mlm_labels = torch.full((b, t), -100, dtype=torch.long)
    mlm_labels.scatter_(1, positions, torch.randint(0, specs.BERT_VOCAB, (b, real), generator=gen))
    token_type_ids = torch.zeros(b, t, dtype=torch.long)
    token_type_ids[:, t // 2 :] = 1
    batch = {
        "input_ids": input_ids,
        "attention_mask": torch.ones(b, t, dtype=torch.long),
        "token_type_ids": token_type_ids,
        "labels": mlm_labels,
        "next_sentence_label": torch.randint(0, 2, (b,), generator=gen),
    }
    return model, batch


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

    if w.family == "bert":
        return output.loss.float()  # the model's own MLM + NSP loss
    if w.family == "transformer_lm":
        logits = output.logits[:, :-1].float()
        tokens = batch["input_ids"][:, 1:]
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens.reshape(-1))
    return F.cross_entropy(output.float(), labels)


def _build(w: specs.Workload, device: Any) -> tuple[Any, list[Any], dict[str, Any], Any]:
    """(model, positional inputs, keyword inputs, labels) on `device`: the workload's
    synthetic batch."""
    import torch

    gen = torch.Generator().manual_seed(0)
    if w.family in ("bert", "transformer_lm"):
        model, batch = (_bert if w.family == "bert" else _gpt2)(w, gen)
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
    model, inputs, kwargs, labels = _build(w, device)
    model.train()
    opt = _optimizer(w, model.parameters())
    forward = torch.compile(model) if impl == "torch compile" else model
    bf16 = w.precision == "bfloat16"

    def autocast() -> Any:
        if bf16:
            return torch.autocast(device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

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
    notes = []
    if w.family == "lstm":
        with torch.no_grad(), autocast():  # what autocast made of nn.LSTM here
            lstm_dtype = model.lstm(model.embed(inputs[0][:1]))[0].dtype
        notes.append(f"nn.LSTM computes in {str(lstm_dtype).removeprefix('torch.')}")
        if impl == "torch compile":
            notes.append("dynamo leaves nn.LSTM eager")
    if w.family == "bert":
        notes.append(BERT_MLM_NOTE)
    row = timing.empty_row(w, impl, "torch", device=label, note="; ".join(notes))
    # MFU against the peak of the precision the workload computes in.
    timing.derive(row, w, result, forward_flops, kind, peak_tflops)
    row["precision"] = _precision(w)
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
) -> list[dict[str, Any]]:
    """Rows of every peer of `workloads` (skipped ones with their reason)."""
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
    try:
        import keras  # noqa: F401
    except ImportError:
        keras_note = "keras is not installed"
    else:
        keras_note = "no Keras peer written yet"
    if workloads:
        rows.append(
            timing.empty_row(
                workloads[0],
                "keras",
                "keras",
                workload="all",
                batch=None,
                shape=None,
                precision=None,
                status="skipped",
                note=keras_note,
            )
        )
    return rows


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
        prog="python -m benchmarks.peers",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--suite", choices=sorted(specs.SUITES), required=True)
    parser.add_argument("--only", nargs="+", metavar="NAME")
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
    parser.add_argument("--json", required=True, metavar="FILE")
    args = parser.parse_args(argv)
    defaults = specs.DEFAULT_TIMING[args.suite]
    rows = run_peers(
        specs.suite(args.suite, args.only),
        args.steps or defaults["steps"],
        args.windows or defaults["windows"],
        defaults["warmup"] if args.warmup is None else args.warmup,
        dict(args.flops),
        args.peak_tflops,
    )
    with open(args.json, "w") as f:
        json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
