"""ResNet-50 v1.5 on ImageNet-1k: the Flax ImageNet example's recipe (SGD + Nesterov
momentum 0.9, learning rate 0.1 x batch/256 with 5 warmup epochs then cosine, weight decay
1e-4 not on biases/BatchNorm, inception crop + flip, evaluation at a 224 px centre crop)
with label smoothing 0.1 (He et al. 2019, "Bag of tricks"), 90 epochs, batch 1024, bf16.

The learning rate, the step counts and the evaluation cadence follow the batch size:
`--config.batch_size=256` trains 90 epochs at rate 0.1.

  tfds build imagenet2012 --file_format=array_record  # needs the manual download
  python -m train --config=configs/resnet50_imagenet.py --workdir=runs/resnet50
"""

from ml_collections import FieldReference

from train.defaults import base_config, check_variant

_TRAIN_IMAGES = 1_281_167


def get_config(variant: str | None = None):
    check_variant(variant, ("smoke",))
    c = base_config()
    c.dataset = "imagenet2012"
    c.eval_split = "validation"
    c.augment = "inception"
    c.image_size = 224
    c.image_mean = (0.485, 0.456, 0.406)
    c.image_std = (0.229, 0.224, 0.225)
    c.model = {"name": "ResNet50"}
    c.dtype = "bfloat16"
    c.label_smoothing = 0.1
    # References: what is derived from the batch size follows an override of it. Each key
    # gets a reference of its own (setting a key that shares one would set them all).
    c.batch_size = FieldReference(1024)

    def epochs(n: int) -> FieldReference:
        return n * (_TRAIN_IMAGES // c.get_ref("batch_size"))

    c.total_steps = epochs(90)
    c.optimizer.name = "sgd"
    c.optimizer.learning_rate = c.get_ref("batch_size").to_float() * (0.1 / 256)
    c.optimizer.nesterov = True
    c.optimizer.weight_decay = 1e-4
    c.optimizer.schedule = "cosine"
    c.optimizer.warmup_steps = epochs(5)
    c.eval_every = epochs(1)
    c.checkpoint_every = epochs(1)
    c.data_threads = 32
    c.log_every = 100
    if variant == "smoke":  # a narrow ResNet-50 on small synthetic images
        c.dataset = "synthetic"
        c.synthetic_shape = (80, 80, 3)
        c.image_size = 64  # the inception crop, at a small size
        c.num_classes = 10
        c.model.num_filters = 8
        c.dtype = "float32"
        c.batch_size = 8
        c.total_steps = 2
        c.optimizer.warmup_steps = 1
        c.eval_every = 0
        c.checkpoint_every = 0
        c.log_every = 1
        c.data_threads = 2
    return c
