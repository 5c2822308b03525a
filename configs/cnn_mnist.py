"""The article's recipe: its CNN on MNIST with Adam, batch 32, 10 epochs.

Needs TFDS mnist prepared as array_record in the data dir (training never downloads):

  tfds build mnist --file_format=array_record        # once, where there is network
  python -m train --config=configs/cnn_mnist.py --workdir=runs/cnn_mnist
"""

from train.defaults import base_config, check_variant


def get_config(variant: str | None = None):
    check_variant(variant, ("smoke",))
    c = base_config()
    c.dataset = "mnist"
    c.model.name = "SeedCNN"
    c.batch_size = 32
    c.optimizer.name = "adam"
    c.optimizer.learning_rate = 1e-3
    c.total_steps = 10 * 60_000 // 32  # 10 epochs = 18,750 steps
    c.eval_every = 60_000 // 32  # every epoch
    c.checkpoint_every = 60_000 // 32
    c.log_every = 100
    if variant == "smoke":  # same model and optimizer on the embedded digits
        c.dataset = "sklearn_digits"
        c.total_steps = 10
        c.eval_every = 5
        c.checkpoint_every = 5
        c.log_every = 5
    return c
