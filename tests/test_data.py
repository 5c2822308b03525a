"""Tests for the data pipeline: the embedded digits, Grain iterators, augmentation."""

import math
import os
import time

import jax.numpy as jnp
import numpy as np
import pytest

from jaxmodels.errors import DataError
from train.data import digits, images, pipeline

# ---------------------------------------------------------------------------------------
# The embedded digits dataset.


@pytest.fixture(scope="module")
def digits_dir(tmp_path_factory):
    data_dir = str(tmp_path_factory.mktemp("digits"))
    digits.prepare(data_dir)
    return data_dir


def _all(source):
    return [source[i] for i in range(len(source))]


def _files(root):
    out = {}
    for dirpath, _, names in os.walk(root):
        for name in names:
            path = os.path.join(dirpath, name)
            out[path] = os.stat(path).st_mtime_ns
    return out


def test_digits_splits_have_mnist_format(digits_dir):
    builder = digits.prepare(digits_dir)
    train, test = builder.as_data_source("train"), builder.as_data_source("test")
    assert (len(train), len(test)) == (digits.NUM_TRAIN, digits.NUM_TEST) == (1437, 360)
    for split in (train, test):
        records = _all(split)
        imgs = np.stack([r["image"] for r in records])
        labels = np.array([int(r["label"]) for r in records])
        assert imgs.dtype == np.uint8 and imgs.shape[1:] == (28, 28, 1)
        # All ink lies in the central 20x20 box, and every digit has some.
        border = imgs.copy()
        border[:, 4:24, 4:24] = 0
        assert not border.any()
        assert (imgs[:, 4:24, 4:24].reshape(len(imgs), -1).max(axis=1) > 0).all()
        assert set(labels.tolist()) == set(range(10))
    assert builder.info.features["label"].num_classes == 10


def test_digits_train_and_test_are_disjoint_and_cover_everything(digits_dir):
    builder = digits.prepare(digits_dir)
    train = {r["image"].tobytes() for r in _all(builder.as_data_source("train"))}
    test = {r["image"].tobytes() for r in _all(builder.as_data_source("test"))}
    everything, labels = digits.digits_as_mnist()
    assert len(everything) == len(labels) == 1797
    # The stored splits are exactly the 1,797 digits, split without overlap.
    assert len(train) == 1437 and len(test) == 360
    assert not train & test
    assert train | test == {img.tobytes() for img in everything}
    assert labels.min() == 0 and labels.max() == 9


def test_digits_second_prepare_reuses_the_data(digits_dir):
    before = _files(digits_dir)
    start = time.perf_counter()
    builder = digits.prepare(digits_dir)
    assert time.perf_counter() - start < 1.0
    assert builder.is_prepared()
    assert _files(digits_dir) == before


def test_open_source_embedded_digits(digits_dir):
    source, num_classes = images.open_source(images.EMBEDDED, "test", digits_dir)
    assert num_classes == 10
    assert len(source) == 360
    example = images.plain(source[0], np.random.default_rng(0))
    assert example["image"].shape == (28, 28, 1) and example["label"].dtype == np.int32


def test_open_source_missing_dataset_says_how_to_prepare_it(tmp_path):
    with pytest.raises(DataError) as err:
        images.open_source("mnist", "train", str(tmp_path))
    message = str(err.value)
    assert "tfds build mnist" in message
    assert "never downloads" in message
    assert not (tmp_path / "downloads").exists()


def test_open_source_unknown_dataset(tmp_path):
    with pytest.raises(DataError, match="no_such_dataset_xyz"):
        images.open_source("no_such_dataset_xyz", "train", str(tmp_path))


def test_open_source_needs_an_image_and_a_class_label(tmp_path):
    """A dataset whose features are named otherwise (as `smallnorb`'s `label_category`) is a
    DataError naming its features, not a KeyError from deep inside the pipeline."""
    import tensorflow_datasets as tfds

    from tests.helpers import prepare_local_dataset

    def features():
        return {
            "image": tfds.features.Tensor(shape=(4, 4, 1), dtype=np.uint8),
            "label_category": tfds.features.ClassLabel(num_classes=2),
        }

    def records():
        return [{"image": np.full((4, 4, 1), i, np.uint8), "label_category": i} for i in range(2)]

    prepare_local_dataset("ImagesWithCategories", features, records, str(tmp_path))
    with pytest.raises(DataError, match=r"\['image', 'label_category'\]; image classification"):
        images.open_source("images_with_categories", "train", str(tmp_path))


def test_images_of_varying_size_need_the_cropping_preset(tmp_path):
    """Batched as stored (`none`, `cifar`), they failed in Grain's batching (on the first
    batch holding an odd size) with a message naming neither `augment` nor the images."""
    import io

    import PIL.Image
    import tensorflow_datasets as tfds

    from tests.helpers import prepare_local_dataset

    def features():
        return {
            "image": tfds.features.Image(shape=(None, None, 1)),
            "label": tfds.features.ClassLabel(num_classes=2),
        }

    def png(height):  # encoded already: TFDS encodes arrays with TensorFlow
        out = io.BytesIO()
        PIL.Image.fromarray(np.zeros((height, 5), np.uint8)).save(out, "PNG")
        return out.getvalue()

    def records():
        return [{"image": png(4 + i), "label": i} for i in range(2)]

    prepare_local_dataset("ImagesOfSizes", features, records, str(tmp_path))
    for preset in ("none", "cifar"):
        with pytest.raises(DataError, match=r"varying size .*set --config.augment=inception"):
            images.open_source("images_of_sizes", "train", str(tmp_path), preset)
    source, _ = images.open_source("images_of_sizes", "train", str(tmp_path), "inception")
    assert [
        images.inception_train(source[i], np.random.default_rng(0), 8)["image"].shape
        for i in range(2)
    ] == [(8, 8, 1)] * 2


# ---------------------------------------------------------------------------------------
# Grain pipelines.


def _records(n):
    """A small in-memory source: record i has label i and a constant image of value i."""
    return [{"image": np.full((2, 2, 1), i, np.uint8), "label": np.int64(i)} for i in range(n)]


def _identity(record, rng):  # noqa: ARG001
    return record


def _noisy(record, rng):
    return {**record, "noise": np.int64(rng.integers(1 << 30))}


def _take(iterator, n):
    return [next(iterator) for _ in range(n)]


def _assert_batches_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys()
        for key in x:
            np.testing.assert_array_equal(x[key], y[key], err_msg=key)


def _train(source, **kwargs):
    kwargs = {
        "global_batch_size": 8,
        "seed": 3,
        "preprocess": _identity,
        "num_threads": 2,
        "prefetch": 2,
        **kwargs,
    }
    return pipeline.train_iterator(source, **kwargs)


def test_train_iterator_epochs_are_fresh_permutations():
    source = _records(24)
    batches = _take(_train(source), 9)  # three epochs of three batches
    for b in batches:
        assert b["image"].shape == (8, 2, 2, 1) and b["label"].shape == (8,)
        np.testing.assert_array_equal(b["image"][:, 0, 0, 0], b["label"])
    epochs = [np.concatenate([b["label"] for b in batches[3 * e : 3 * e + 3]]) for e in range(3)]
    for order in epochs:
        np.testing.assert_array_equal(np.sort(order), np.arange(24))
    assert not np.array_equal(epochs[0], np.arange(24))  # shuffled
    assert not np.array_equal(epochs[0], epochs[1])
    assert not np.array_equal(epochs[1], epochs[2])


def test_train_iterator_is_deterministic_for_a_seed():
    source = _records(24)
    a = _take(_train(source, preprocess=_noisy), 5)
    b = _take(_train(source, preprocess=_noisy), 5)
    _assert_batches_equal(a, b)
    c = _take(_train(source, preprocess=_noisy, seed=4), 5)
    assert not all(np.array_equal(x["label"], y["label"]) for x, y in zip(a, c, strict=True))
    # Augmentation randomness differs from example to example.
    noise = np.concatenate([x["noise"] for x in a])
    assert len(np.unique(noise)) == len(noise)


def test_train_iterator_prepares_prefetch_batches_ahead():
    # `prefetch` counts batches: the pipeline must not prepare prefetch x batch-size batches
    # (an ImageNet run would hold hundreds of GiB of images in host memory).
    prepared = []

    def counting(record, rng):  # noqa: ARG001
        prepared.append(1)
        return record

    it = _train(_records(200), preprocess=counting, global_batch_size=16, prefetch=2)
    next(it)
    time.sleep(1.0)  # let the threads fill their buffer
    assert 16 <= len(prepared) <= (2 + 1) * 16 + 2, len(prepared)


def test_train_iterator_state_counts_global_batches():
    # The saved position is in global batches, so a run may resume on other process counts.
    source = _records(40)
    one = _train(source, preprocess=_noisy)
    _take(one, 3)
    state = one.get_state()
    assert state["next_index"] == 3
    following = next(one)
    for index in range(2):
        part = _train(source, preprocess=_noisy, process_index=index, process_count=2)
        part.set_state(state)
        got = next(part)
        for key in got:
            np.testing.assert_array_equal(got[key], following[key][index * 4 : (index + 1) * 4])


def test_train_iterator_state_resumes_exactly():
    source = _records(24)
    it = _train(source, preprocess=_noisy)
    _take(it, 4)
    state = it.get_state()
    following = _take(it, 5)
    fresh = _train(source, preprocess=_noisy)
    fresh.set_state(state)
    _assert_batches_equal(_take(fresh, 5), following)
    # A fresh iterator without the state starts over, so the check above means something.
    assert not np.array_equal(
        next(_train(source, preprocess=_noisy))["label"], following[0]["label"]
    )


@pytest.mark.parametrize("preprocess", [_identity, _noisy], ids=["identity", "augmented"])
def test_train_iterator_processes_split_the_global_batch(preprocess):
    source = _records(24)
    single = _take(_train(source, preprocess=preprocess), 6)
    parts = [
        _take(_train(source, preprocess=preprocess, process_index=p, process_count=2), 6)
        for p in range(2)
    ]
    for step in range(6):
        local = [parts[p][step] for p in range(2)]
        assert local[0]["label"].shape == (4,)
        joined = {k: np.concatenate([b[k] for b in local]) for k in local[0]}
        _assert_batches_equal([joined], [single[step]])


def test_train_iterator_over_synthetic_images():
    source = pipeline.SyntheticImages((8, 8, 3), num_classes=5, size=40)
    assert len(source) == 40
    np.testing.assert_array_equal(source[7]["image"], source[7]["image"])
    assert not np.array_equal(source[7]["image"], source[8]["image"])
    batches = _take(_train(source, global_batch_size=4), 3)
    for b in batches:
        assert b["image"].shape == (4, 8, 8, 3) and b["image"].dtype == np.uint8
        assert ((b["label"] >= 0) & (b["label"] < 5)).all()


def test_global_batch_must_divide_among_processes():
    with pytest.raises(ValueError, match="divisible"):
        _train(_records(24), global_batch_size=6, process_count=4)


def test_eval_batches_count_every_example_once():
    n, global_batch, processes = 10, 4, 2
    source = _records(n)
    seen = []
    for p in range(processes):
        batches = list(
            pipeline.eval_batches(
                source,
                global_batch_size=global_batch,
                preprocess=_identity,
                process_index=p,
                process_count=processes,
                num_threads=2,
            )
        )
        assert len(batches) == math.ceil(n / global_batch) == 3
        for b in batches:
            assert b["label"].shape == (global_batch // processes,)
            assert b["weight"].dtype == np.float32
            assert set(np.unique(b["weight"]).tolist()) <= {0.0, 1.0}
            pad = b["weight"] == 0
            assert not b["image"][pad].any() and not b["label"][pad].any()
            seen.extend(b["label"][~pad].tolist())
    # Each real example exactly once; the 3 * 4 - 10 = 2 padding slots had weight 0.
    assert sorted(seen) == list(range(n))


def test_eval_batches_single_process_is_in_order():
    batches = list(pipeline.eval_batches(_records(10), global_batch_size=4, preprocess=_identity))
    labels = np.concatenate([b["label"] for b in batches])
    weights = np.concatenate([b["weight"] for b in batches])
    np.testing.assert_array_equal(labels[:10], np.arange(10))
    np.testing.assert_array_equal(weights, [1.0] * 10 + [0.0] * 2)


# ---------------------------------------------------------------------------------------
# Augmentation.


@pytest.mark.parametrize(
    ("dataset", "preset"),
    [
        ("sklearn_digits", "none"),
        ("mnist", "none"),
        ("synthetic", "none"),
        ("cifar10", "cifar"),
        ("imagenet2012", "inception"),
        ("cifar10:3.0.2", "cifar"),  # versioned names: were "inception"
        ("mnist:3.0.1", "none"),
        ("svhn_cropped", "none"),  # digits are not mirrored: was "cifar" (with flips)
    ],
)
def test_augment_preset_auto(dataset, preset):
    assert images.augment_preset(dataset, "auto") == preset


def test_augment_preset_explicit_and_unknown():
    assert images.augment_preset("imagenet2012", "none") == "none"
    assert images.augment_preset("mnist", "cifar") == "cifar"
    with pytest.raises(DataError, match="sideways"):
        images.augment_preset("cifar10", "sideways")


def test_plain_adds_a_channel_to_grayscale():
    out = images.plain({"image": np.zeros((5, 6), np.uint8), "label": 3}, None)
    assert out["image"].shape == (5, 6, 1) and out["label"] == 3


def test_cifar_train_is_a_padded_shifted_maybe_flipped_crop():
    image = np.random.default_rng(0).integers(1, 256, (32, 32, 3), dtype=np.uint8)
    record = {"image": image, "label": 7}
    padded = np.pad(image, ((4, 4), (4, 4), (0, 0)))
    candidates = [padded[y : y + 32, x : x + 32] for y in range(9) for x in range(9)]
    candidates += [c[:, ::-1] for c in candidates]
    outputs = []
    for seed in range(8):
        out = images.cifar_train(record, np.random.default_rng(seed))
        again = images.cifar_train(record, np.random.default_rng(seed))
        np.testing.assert_array_equal(out["image"], again["image"])
        assert out["image"].shape == (32, 32, 3) and out["image"].dtype == np.uint8
        assert out["label"] == 7 and out["label"].dtype == np.int32
        assert any(np.array_equal(out["image"], c) for c in candidates)
        outputs.append(out["image"])
    assert len({o.tobytes() for o in outputs}) > 1


def test_random_resized_crop_shape():
    image = np.random.default_rng(0).integers(0, 256, (50, 70, 3), dtype=np.uint8)
    crops = [images.random_resized_crop(image, np.random.default_rng(s), 24) for s in range(6)]
    for crop in crops:
        assert crop.shape == (24, 24, 3) and crop.dtype == np.uint8
    assert len({c.tobytes() for c in crops}) > 1
    again = images.random_resized_crop(image, np.random.default_rng(0), 24)
    np.testing.assert_array_equal(again, crops[0])


def test_center_crop_shape_and_content():
    image = np.full((300, 200, 3), 77, np.uint8)
    crop = images.center_crop(image, 224)
    assert crop.shape == (224, 224, 3) and crop.dtype == np.uint8
    assert (crop == 77).all()
    # Of a left-dark / right-bright image, the central crop keeps both halves equally.
    halves = np.zeros((200, 300, 3), np.uint8)
    halves[:, 150:] = 255
    crop = images.center_crop(halves, 64)
    assert crop.shape == (64, 64, 3)
    assert (crop[:, :31] == 0).all() and (crop[:, 33:] == 255).all()


def test_inception_preprocessing_shapes():
    image = np.random.default_rng(1).integers(0, 256, (64, 80, 3), dtype=np.uint8)
    record = {"image": image, "label": 4}
    train_fn, eval_fn = images.preprocessors("inception", 32)
    for fn in (train_fn, eval_fn):
        out = fn(record, np.random.default_rng(0))
        assert out["image"].shape == (32, 32, 3) and out["image"].dtype == np.uint8
        assert out["image"].flags["C_CONTIGUOUS"]
        assert out["label"] == 4
    out = images.inception_train(record, np.random.default_rng(0), size=16)
    assert out["image"].shape == (16, 16, 3)
    out = images.inception_eval(record, None, size=16)
    assert out["image"].shape == (16, 16, 3)
    # Greyscale images keep their one channel.
    grey = {"image": image[..., :1], "label": 4}
    for fn in (train_fn, eval_fn):
        out = fn(grey, np.random.default_rng(0))
        assert out["image"].shape == (32, 32, 1) and out["image"].dtype == np.uint8
    np.testing.assert_array_equal(
        images.center_crop(image[..., :1], 16),
        images.center_crop(image[..., :1].repeat(3, -1), 16)[..., :1],
    )


def test_preprocessors_by_preset():
    assert images.preprocessors("none", 28) == (images.plain, images.plain)
    assert images.preprocessors("cifar", 32) == (images.cifar_train, images.plain)


def test_normalize_on_device():
    x = jnp.array([[0, 255], [51, 255]], jnp.uint8)[..., None]
    out = images.normalize_on_device(x, [0.5], [0.5], jnp.float32)
    assert out.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(out)[..., 0], [[-1.0, 1.0], [-0.6, 1.0]], rtol=1e-6)
    rgb = jnp.full((1, 2, 2, 3), 255, jnp.uint8)
    out = images.normalize_on_device(rgb, [0.5, 0.0, 1.0], [0.5, 1.0, 0.25], jnp.bfloat16)
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(out, np.float32)[0, 0, 0], [1.0, 1.0, 0.0])


def test_a_label_outside_the_classes_is_a_clear_error():
    """A test split without labels (-1, as GLUE's and ImageNet's have) trained or evaluated
    on gave a meaningless loss and accuracy with no error."""
    import ml_collections

    from jaxmodels.errors import DataError
    from train.tasks import make_iterators

    config = ml_collections.ConfigDict(
        dict(dataset="toy", train_split="train", eval_split="test", batch_size=4, seed=0)
    )
    config.update(eval_batch_size=4, data_threads=1, prefetch=1)
    source = _records(8)
    train, evaluate = make_iterators(config, 0, 1, source, _identity, source, _identity, 8)
    assert next(train())["label"].shape == (4,) and next(evaluate())["label"].shape == (4,)
    train, evaluate = make_iterators(config, 0, 1, source, _identity, source, _identity, 7)
    message = r"dataset 'toy', split 'train', has label 7, outside \[0, 7\): a split without"
    batches = train()
    with pytest.raises(DataError, match=message):
        for _ in range(2):  # an epoch
            next(batches)
    with pytest.raises(DataError, match="split 'test', has label 7"):
        list(evaluate())
