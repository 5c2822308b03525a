"""jaxmodels: fast, pure JAX/Flax models and the building blocks to train them sharded.

Modules:
  cnn         SeedCNN (the classic MNIST CNN) and the ResNet v1.5 family.
  rnn         LSTMCell, LSTM (scan or cuDNN), LSTMClassifier.
  attention   multi-head attention (cuDNN; explicit with its own backward; Pallas), KV cache.
  transformer positions, encoder/decoder blocks, encoder-decoder, decoder-only LM, generate.
  layers      building blocks shared by the families (Embed: mixed-precision lookups).
  bert        BertConfig presets, BertModel, pretraining and classification heads,
              Hugging Face checkpoints (from_pretrained / save_pretrained).
  sharding    the device mesh and the one logical-axis rules table.
  optim       optimizers and schedules over optax.
  training    TrainState, sharded init, pure train/eval steps compiled with jit.
  checkpoint  Orbax checkpoints: async, atomic, keep-last-K, restore onto any mesh.
  losses      cross-entropy and accuracy in float32.
  errors      user-facing errors (what is wrong and how to fix it).
"""

from jaxmodels import (
    attention,
    bert,
    checkpoint,
    cnn,
    errors,
    layers,
    losses,
    optim,
    rnn,
    sharding,
    training,
    transformer,
)

__version__ = "0.1.0"
__all__ = [
    "attention",
    "bert",
    "checkpoint",
    "cnn",
    "errors",
    "layers",
    "losses",
    "optim",
    "rnn",
    "sharding",
    "training",
    "transformer",
]
