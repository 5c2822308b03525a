"""Image-classification data: TFDS sources by name, the embedded digits, augmentation.

Images stay uint8 on the host (4x less to move than float32); scaling and normalisation
happen on the device inside the jitted step (`normalize_on_device`).

Augmentation presets (`config.augment`, `auto` picks by dataset, version aside):
* `none`: as stored (MNIST-like datasets, the embedded digits, SVHN: digits are not
  mirrored).
* `cifar`: 4-pixel zero padding, random 32x32 crop, random horizontal flip.
* `inception`: the standard ResNet ImageNet recipe: random-resized crop (area 8%-100%,
  aspect 3/4-4/3) to `image_size`, random flip; evaluation resizes the shorter side to
  `image_size / 0.875` and takes the central `image_size` crop.
"""

from __future__ import annotations

import functools
import os
from typing import Any

import numpy as np

from jaxmodels.errors import DataError

EMBEDDED = "sklearn_digits"
SYNTHETIC = "synthetic"
_UNAUGMENTED = ("sklearn_digits", "mnist", "fashion_mnist", "kmnist", "emnist", "svhn_cropped")
_CIFAR_LIKE = ("cifar10", "cifar100")


def default_data_dir() -> str:
    """TFDS's data directory: `$TFDS_DATA_DIR`, else `~/tensorflow_datasets`."""
    return os.environ.get("TFDS_DATA_DIR") or os.path.expanduser("~/tensorflow_datasets")


def augment_preset(dataset: str, augment: str) -> str:
    if augment != "auto":
        if augment not in ("none", "cifar", "inception"):
            raise DataError(
                f"unknown augment {augment!r} (config key augment); "
                "choose auto, none, cifar or inception"
            )
        return augment
    base = dataset.split("/")[0].split(":")[0]  # "cifar10/plain:3.0.2" -> "cifar10"
    if base in _UNAUGMENTED or dataset == SYNTHETIC:
        return "none"
    if base in _CIFAR_LIKE:
        return "cifar"
    return "inception"


def open_source(
    name: str, split: str, data_dir: str | None, preset: str = "inception"
) -> tuple[Any, int]:
    """A random-access source for `split` of TFDS dataset `name`, and its class count.

    Nothing is downloaded: a dataset that is not prepared in `data_dir` is an error that
    says how to get it. `preset`: the augmentation the images get; all but `inception`
    batch them at their stored size, which must then be one.
    """
    import tensorflow_datasets as tfds

    from train.data import tfds_local

    data_dir = data_dir or default_data_dir()
    if name == EMBEDDED:
        from train.data import digits

        builder = digits.prepare(data_dir)
    else:
        builder = tfds_local.prepared_builder(
            name, data_dir, f"The embedded dataset {EMBEDDED!r} needs no download."
        )
    features = builder.info.features
    label = features["label"] if "label" in features else None  # noqa: SIM401 - no .get
    if "image" not in features or not isinstance(label, tfds.features.ClassLabel):
        raise DataError(
            f"dataset {name!r} has features {sorted(features)}; image classification needs "
            "an image feature 'image' and a class label 'label' (config key dataset: e.g. "
            f"mnist, cifar10, imagenet2012, or the embedded {EMBEDDED!r})"
        )
    shape = tuple(features["image"].shape)
    if preset != "inception" and None in shape[:2]:
        raise DataError(
            f"dataset {name!r} has images of varying size (feature shape {shape}), which "
            f"augment={preset} batches as they are stored: set --config.augment=inception, "
            "which crops every image to --config.image_size"
        )
    source = tfds_local.split_source(builder, name, split, data_dir)
    return source, int(label.num_classes)


def _label(record: Any) -> np.int32:
    return np.int32(record["label"])


def plain(record: Any, rng: np.random.Generator) -> dict[str, Any]:  # noqa: ARG001
    image = np.asarray(record["image"], np.uint8)
    if image.ndim == 2:
        image = image[..., None]
    return {"image": image, "label": _label(record)}


def cifar_train(record: Any, rng: np.random.Generator) -> dict[str, Any]:
    image = np.asarray(record["image"], np.uint8)
    h, w = image.shape[:2]
    padded = np.pad(image, ((4, 4), (4, 4), (0, 0)))
    y, x = rng.integers(0, 9, size=2)
    image = padded[y : y + h, x : x + w]
    if rng.random() < 0.5:
        image = image[:, ::-1]
    return {"image": np.ascontiguousarray(image), "label": _label(record)}


def _resize(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """[h, w, channels] resized to `size` (bilinear); one channel (greyscale) as well."""
    from PIL import Image

    if image.ndim == 3 and image.shape[-1] == 1:
        return _resize(image[..., 0], size)[..., None]
    return np.asarray(Image.fromarray(image).resize((size[1], size[0]), Image.BILINEAR))


def random_resized_crop(
    image: np.ndarray,
    rng: np.random.Generator,
    size: int,
    area: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    attempts: int = 10,
) -> np.ndarray:
    """Inception-style crop of a random area and aspect ratio, resized to size x size."""
    h, w = image.shape[:2]
    for _ in range(attempts):
        target = rng.uniform(*area) * h * w
        aspect = np.exp(rng.uniform(np.log(ratio[0]), np.log(ratio[1])))
        cw = int(round(np.sqrt(target * aspect)))
        ch = int(round(np.sqrt(target / aspect)))
        if 0 < cw <= w and 0 < ch <= h:
            y = int(rng.integers(0, h - ch + 1))
            x = int(rng.integers(0, w - cw + 1))
            return _resize(image[y : y + ch, x : x + cw], (size, size))
    return center_crop(image, size)


def center_crop(image: np.ndarray, size: int, crop_fraction: float = 0.875) -> np.ndarray:
    """Resize the shorter side to size / crop_fraction, then take the central square."""
    h, w = image.shape[:2]
    scale = size / crop_fraction / min(h, w)
    nh, nw = max(size, int(round(h * scale))), max(size, int(round(w * scale)))
    image = _resize(image, (nh, nw))
    y, x = (nh - size) // 2, (nw - size) // 2
    return image[y : y + size, x : x + size]


def inception_train(record: Any, rng: np.random.Generator, size: int) -> dict[str, Any]:
    image = random_resized_crop(np.asarray(record["image"], np.uint8), rng, size)
    if rng.random() < 0.5:
        image = image[:, ::-1]
    return {"image": np.ascontiguousarray(image), "label": _label(record)}


def inception_eval(record: Any, rng: np.random.Generator, size: int) -> dict[str, Any]:  # noqa: ARG001
    image = center_crop(np.asarray(record["image"], np.uint8), size)
    return {"image": np.ascontiguousarray(image), "label": _label(record)}


def preprocessors(preset: str, image_size: int) -> tuple[Any, Any]:
    """(train, eval) preprocessing functions for an augmentation preset."""
    if preset == "none":
        return plain, plain
    if preset == "cifar":
        return cifar_train, plain
    return (
        functools.partial(inception_train, size=image_size),
        functools.partial(inception_eval, size=image_size),
    )


def normalize_on_device(image: Any, mean: Any, std: Any, dtype: Any) -> Any:
    """uint8 -> dtype, scaled to [0, 1], then (x - mean) / std per channel."""
    import jax.numpy as jnp

    x = image.astype(jnp.float32) / 255.0
    x = (x - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)
    return x.astype(dtype)
