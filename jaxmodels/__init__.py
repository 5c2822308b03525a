"""jaxmodels: fast, pure JAX/Flax models and the building blocks to train them sharded.

Modules:
  cnn         SeedCNN (the classic MNIST CNN) and the ResNet v1.5 family.
  rnn         LSTMCell, LSTM (scan or cuDNN), LSTMClassifier.
  sharding    the device mesh and the one logical-axis rules table.
  optim       optimizers and schedules over optax.
  training    TrainState, sharded init, pure train/eval steps compiled with jit.
  checkpoint  Orbax checkpoints: async, atomic, keep-last-K, restore onto any mesh.
  losses      cross-entropy and accuracy in float32.
  errors      user-facing errors (what is wrong and how to fix it).
"""

from jaxmodels import checkpoint, cnn, errors, losses, optim, rnn, sharding, training

__version__ = "0.1.0"
__all__ = ["checkpoint", "cnn", "errors", "losses", "optim", "rnn", "sharding", "training"]
