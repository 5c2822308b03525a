"""The embedded default dataset: scikit-learn's handwritten digits as a TFDS dataset.

1,797 real 8x8 digits (UCI "Optical Recognition of Handwritten Digits", shipped inside
scikit-learn, so no network is needed) brought to MNIST's format: each digit is
resized to 20x20 and centred in a 28x28x1 uint8 image, as MNIST centres its digits in a
20x20 box. A fixed, seeded 80/20 split gives `train` (1,437) and `test` (360).

The dataset is registered with TFDS as `sklearn_digits` and written as array_record on
first use (a second or so), after which it is read like any other TFDS dataset with
`tfds.data_source`.
"""

from __future__ import annotations

import numpy as np
import tensorflow_datasets as tfds

from train.data import tfds_local

NUM_TRAIN = 1437
NUM_TEST = 360
_SPLIT_SEED = 20_26


def digits_as_mnist() -> tuple[np.ndarray, np.ndarray]:
    """All 1,797 digits as (<uint8>[n, 28, 28, 1], <int64>[n])."""
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.zeros((len(digits.images), 28, 28, 1), np.uint8)
    for i, img in enumerate(digits.images):
        small = Image.fromarray((img * (255.0 / 16.0)).astype(np.uint8))
        images[i, 4:24, 4:24, 0] = np.asarray(small.resize((20, 20), Image.BILINEAR))
    return images, digits.target.astype(np.int64)


class SklearnDigits(tfds.core.GeneratorBasedBuilder):
    """scikit-learn's handwritten digits at 28x28x1, MNIST-style."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=__doc__,
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Tensor(shape=(28, 28, 1), dtype=np.uint8),
                    "label": tfds.features.ClassLabel(num_classes=10),
                }
            ),
            supervised_keys=("image", "label"),
            homepage="https://archive.ics.uci.edu/dataset/80",
        )

    def _split_generators(self, dl_manager):  # noqa: ARG002 - nothing to download
        return {"train": self._generate_examples("train"), "test": self._generate_examples("test")}

    def _generate_examples(self, split: str):
        images, labels = digits_as_mnist()
        order = np.random.default_rng(_SPLIT_SEED).permutation(len(labels))
        chosen = order[:NUM_TRAIN] if split == "train" else order[NUM_TRAIN:]
        for i in sorted(chosen):
            yield int(i), {"image": images[i], "label": int(labels[i])}


def prepare(data_dir: str) -> SklearnDigits:
    """Writes the dataset under `data_dir` if it is not there yet; returns the builder."""
    return tfds_local.prepare_once(SklearnDigits, data_dir)
