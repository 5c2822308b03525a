"""ResNet-18 (CIFAR stem: 3x3 conv, no max-pool) on CIFAR-10: SGD + Nesterov momentum,
cosine schedule with warmup, weight decay 5e-4 (not on biases and BatchNorm, as every
config here), pad-crop-flip augmentation, 200 epochs.

  tfds build cifar10 --file_format=array_record      # once, where there is network
  python -m train --config=configs/resnet18_cifar10.py --workdir=runs/resnet18_cifar10
"""

from train.defaults import base_config, check_variant


def get_config(variant: str | None = None):
    check_variant(variant, ("smoke",))
    c = base_config()
    c.dataset = "cifar10"
    c.augment = "cifar"
    c.image_mean = (0.4914, 0.4822, 0.4465)
    c.image_std = (0.2470, 0.2435, 0.2616)
    c.model = {"name": "ResNet18", "small_images": True}
    c.dtype = "bfloat16"
    c.batch_size = 512
    # 200 epochs, evaluated every 10 (rounded to whole evaluations: one at the end, not a
    # second one a few steps after the last)
    c.total_steps = 20 * (10 * 50_000 // 512)
    c.optimizer.name = "sgd"
    c.optimizer.learning_rate = 0.4
    c.optimizer.momentum = 0.9
    c.optimizer.nesterov = True
    c.optimizer.weight_decay = 5e-4
    c.optimizer.schedule = "cosine"
    c.optimizer.warmup_steps = 5 * 50_000 // 512
    c.eval_every = 10 * 50_000 // 512
    c.checkpoint_every = 10 * 50_000 // 512
    c.log_every = 100
    if variant == "smoke":  # a narrow ResNet-18 on small synthetic CIFAR-shaped images
        c.dataset = "synthetic"
        c.synthetic_shape = (32, 32, 3)
        c.num_classes = 10
        c.model.num_filters = 8
        c.dtype = "float32"
        c.batch_size = 16
        c.total_steps = 4
        c.optimizer.warmup_steps = 1
        c.eval_every = 0
        c.checkpoint_every = 2
        c.log_every = 2
    return c
