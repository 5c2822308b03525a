"""Grain pipelines over random-access (TFDS array_record) sources.

Both pipelines split every *global* batch into one contiguous slice per process, so a run on
N processes sees exactly the global batches a single process would, and each process
reads only its own examples. Random augmentation is seeded by the example's global position
in the stream, never by the process, for the same reason.

* `train_iterator`: an endless, shuffled (re-shuffled every epoch), augmented, batched
  stream. Its position is `iterator.get_state()` (a small dict saved in checkpoints);
  `set_state` resumes it exactly.
* `eval_batches`: one pass over a split in order, padded to whole batches; padding
  examples have `weight` 0 so every real example counts exactly once.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Any

import grain
import numpy as np

Example = dict[str, Any]
# preprocess(record, rng) -> example; rng is a numpy Generator seeded per example.
Preprocess = Callable[[Any, np.random.Generator], Example]

_ENDLESS = 2**62


def _slice_index(j: int, local: int, global_: int, process_index: int) -> int:
    """Global stream position of this process's j-th example."""
    step, k = divmod(j, local)
    return step * global_ + process_index * local + k


def _local_batch(global_batch_size: int, process_count: int) -> int:
    if global_batch_size % process_count:
        raise ValueError(
            f"global batch {global_batch_size} is not divisible by {process_count} processes"
        )
    return global_batch_size // process_count


def train_iterator(
    source: Any,
    *,
    global_batch_size: int,
    seed: int,
    preprocess: Preprocess,
    process_index: int = 0,
    process_count: int = 1,
    num_threads: int = 4,
    prefetch: int = 4,
) -> grain.DatasetIterator:
    """This process's part of an endless shuffled stream of global batches.

    Args:
      source: random-access source (`len`, `__getitem__`) of records.
      global_batch_size: batch size summed over all processes.
      seed: shuffling and augmentation seed.
      preprocess: `(record, rng) -> dict of numpy arrays`.
      process_index, process_count: this process among all.
      num_threads: host threads reading and preprocessing.
      prefetch: batches prepared ahead of the train step (at least `num_threads`: each
        thread prepares whole batches).

    Returns:
      A Grain iterator of dicts of `[global_batch_size // process_count, ...]` arrays.
    """
    local = _local_batch(global_batch_size, process_count)
    stream = (
        grain.MapDataset.source(source).seed(seed).shuffle().repeat(None).random_map(preprocess)
    )
    mine = grain.MapDataset.range(0, _ENDLESS).map(
        lambda j: stream[_slice_index(j, local, global_batch_size, process_index)]
    )
    return _prefetched(mine.batch(local, drop_remainder=True), num_threads, prefetch)


def eval_batches(
    source: Any,
    *,
    global_batch_size: int,
    preprocess: Preprocess,
    process_index: int = 0,
    process_count: int = 1,
    num_threads: int = 4,
) -> Iterator[Example]:
    """One ordered pass over `source` in padded global batches; this process's slices.

    Each example gets `weight` 1.0; padding examples are zeros with weight 0.0.
    """
    local = _local_batch(global_batch_size, process_count)
    n = len(source)
    steps = math.ceil(n / global_batch_size)
    rng = np.random.default_rng(0)  # eval preprocessing must not depend on it
    template = preprocess(source[0], rng)
    padding = {k: np.zeros_like(v) for k, v in template.items()}
    padding["weight"] = np.float32(0.0)

    def example(j: int) -> Example:
        g = _slice_index(j, local, global_batch_size, process_index)
        if g >= n:
            return padding
        return {**preprocess(source[g], rng), "weight": np.float32(1.0)}

    return _prefetched(
        grain.MapDataset.range(0, steps * local).map(example).batch(local), num_threads, 2
    )


def _prefetched(batches: grain.MapDataset, num_threads: int, prefetch: int) -> Any:
    """An iterator over `batches`, `max(prefetch, num_threads)` of them prepared ahead.

    Grain's buffer counts elements of the dataset it prefetches, here whole batches; each
    thread prepares one batch at a time (threads per example cost ~1 ms per example)."""
    options = grain.ReadOptions(
        num_threads=num_threads, prefetch_buffer_size=max(prefetch, num_threads)
    )
    return iter(batches.to_iter_dataset(options))


class SyntheticImages:
    """Endless random-access source of random images and labels (for benchmarks/tests).

    Each record is a deterministic function of its index.
    """

    def __init__(self, shape: tuple[int, ...], num_classes: int, size: int = 1 << 20):
        self.shape = tuple(shape)
        self.num_classes = num_classes
        self.size = size

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> Example:
        rng = np.random.default_rng(int(index))
        return {
            "image": rng.integers(0, 256, self.shape, dtype=np.uint8),
            "label": np.int64(rng.integers(0, self.num_classes)),
        }
