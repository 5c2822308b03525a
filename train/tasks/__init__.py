"""Tasks: each module turns a config into a model, its loss/eval functions and its data.

A task module exposes `build(config, process_index, process_count, workdir) -> Task`
(the workdir holds what a task must keep across restarts, e.g. a text vocabulary).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import json
import os
import tempfile
from collections.abc import Callable, Iterator
from typing import Any

import flax.linen as nn

from jaxmodels import checkpoint
from jaxmodels.errors import ConfigError, DataError
from jaxmodels.training import EvalFn, LossFn
from train.data import tfds_local

TASKS = (
    "image_classification",
    "text_classification",
    "bert_pretraining",
    "seq2seq",
    "language_model",
)


@dataclasses.dataclass
class Task:
    """What the trainer needs from a task.

    Attributes:
      model: the Flax module.
      example_inputs: positional model inputs with the right shapes (for initialisation).
      loss_fn, eval_fn: see `jaxmodels.training`.
      train_iterator: makes this process's resumable (`get_state`/`set_state`) iterator
        of local train batches.
      eval_iterator: makes one pass of local eval batches (with `weight`), or None.
      info: facts for the log (dataset sizes, classes).
      init_params: for a fresh run (no checkpoint yet), maps the initialised params to
        the starting ones, e.g. a pretrained encoder put in place; None: keep them.
      datasets: the TFDS datasets the task reads, by full name and version (e.g.
        "stdlib_docs/1.1.0"), sorted; () for generated data. `build` fills it in.
    """

    model: nn.Module
    example_inputs: list[Any]
    loss_fn: LossFn
    eval_fn: EvalFn
    train_iterator: Callable[[], Any]
    eval_iterator: Callable[[], Iterator[dict[str, Any]]] | None
    info: dict[str, Any]
    init_params: Callable[[Any], Any] | None = None
    datasets: tuple[str, ...] = ()


def build(config: Any, process_index: int, process_count: int, workdir: str) -> Task:
    if config.task not in TASKS:
        raise ConfigError(f"unknown task {config.task!r} (config key task); choose one of {TASKS}")
    module = importlib.import_module(f"train.tasks.{config.task}")
    with tfds_local.recording() as opened:
        task = module.build(config, process_index, process_count, workdir)
    return dataclasses.replace(task, datasets=tuple(sorted(opened)))


CONFIG_FILE = "config.json"


def resumed_config(workdir: str) -> Any | None:
    """The config the run `workdir` holds the checkpoints of was started with (or last
    resumed with); None for a new run, or one whose config.json cannot be read (nothing to
    go by: the checkpoints' own checks still apply)."""
    if not resuming(workdir):
        return None
    try:
        return run_config(workdir)
    except ConfigError:
        return None


def resuming(workdir: str) -> bool:
    """Whether `workdir` holds a run's checkpoint: only then do the files a task keeps there
    (a vocabulary) pin anything; a start that ended before its first checkpoint left files
    that the next start, whatever its config, makes anew."""
    return checkpoint.has_checkpoint(os.path.join(workdir, "checkpoints"))


def run_config(workdir: str) -> Any:
    """The config a run in `workdir` was started with (the `config.json` the trainer
    writes there); a `ConfigError` where there is none to read."""
    import ml_collections

    path = os.path.join(workdir, CONFIG_FILE)
    try:
        with open(path, encoding="utf-8") as f:
            values = json.load(f)
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot read {path} ({e}): is {workdir} a run's workdir?") from e
    if not isinstance(values, dict):
        raise ConfigError(
            f"{path} does not hold a config (a JSON object): is {workdir} a run's workdir?"
        )
    try:
        return ml_collections.ConfigDict(values)
    except (TypeError, ValueError) as e:  # e.g. a key with a dot, edited in by hand
        raise ConfigError(f"{path} does not hold a config ({e})") from e


def _file_mode() -> int:
    umask = os.umask(0)  # the only way to read it; done once, when this module is imported
    os.umask(umask)
    return 0o666 & ~umask


_FILE_MODE = _file_mode()


def write_atomically(path: str, write: Callable[[str], None]) -> None:
    """`write(tmp)` to a temporary file beside `path`, then renames it to `path`: readers
    see the old file or the whole new one, and processes (on any host sharing the
    filesystem) that write the same file at once each rename their own, whole copy."""
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".", prefix=".tmp-")
    os.close(fd)
    os.chmod(tmp, _FILE_MODE)  # as open() would make it, not mkstemp's owner-only 0600
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_text_atomically(path: str, text: str) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    write_atomically(path, write)


def class_count(config: Any, dataset_classes: int) -> int:
    """The model's classes: config key num_classes (0: the dataset's), never fewer than the
    dataset's labels (a label past the logits would make the loss meaningless)."""
    if config.num_classes and config.num_classes < dataset_classes:
        raise ConfigError(
            f"config key num_classes={config.num_classes} is fewer than the "
            f"{dataset_classes} classes of dataset {config.dataset!r}; use 0 (the dataset's)"
        )
    return int(config.num_classes or dataset_classes)


def make_module(namespace: Any, spec: Any, **fixed: Any) -> nn.Module:
    """Instantiates `namespace.<spec.name>(**spec_without_name, **fixed)` with checked keys."""
    spec = dict(spec)
    name = spec.pop("name")
    factory = getattr(namespace, name, None)
    if factory is None or not callable(factory):
        raise ConfigError(f"unknown model {name!r} (config key model.name)")
    cls = getattr(factory, "func", factory)
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(spec) - fields)
    if unknown:
        raise ConfigError(
            f"model {name} has no field(s) {unknown} (config keys model.{unknown[0]} ...); "
            f"its fields are {sorted(fields - {'parent', 'name'})}"
        )
    return factory(**spec, **fixed)


def _labelled(
    record: Any, rng: Any, *, preprocess: Any, num_classes: int, dataset: str, split: str
) -> dict[str, Any]:
    example = preprocess(record, rng)
    label = int(example["label"])
    if not 0 <= label < num_classes:
        raise DataError(
            f"a record of dataset {dataset!r}, split {split!r}, has label {label}, outside "
            f"[0, {num_classes}): a split without labels (test splits often have -1) cannot be "
            "trained or evaluated on; give a labelled split (config keys train_split, "
            "eval_split)"
        )
    return example


def make_iterators(
    config: Any,
    process_index: int,
    process_count: int,
    train_source: Any,
    train_preprocess: Any,
    eval_source: Any = None,
    eval_preprocess: Any = None,
    num_classes: int | None = None,
) -> tuple[Callable[[], Any], Callable[[], Iterator[dict[str, Any]]] | None]:
    """The (train, eval) iterator factories of `train.data.pipeline` for a config.

    `num_classes`: the examples' `label` is checked to lie in [0, num_classes) (a
    `DataError` where not: the loss of a label past the logits means nothing).
    """
    from train.data import pipeline

    if num_classes is not None:
        check = functools.partial(_labelled, num_classes=num_classes, dataset=config.dataset)
        train_preprocess = functools.partial(
            check, preprocess=train_preprocess, split=config.train_split
        )
        if eval_preprocess is not None:
            eval_preprocess = functools.partial(
                check, preprocess=eval_preprocess, split=config.eval_split
            )

    common = dict(
        process_index=process_index, process_count=process_count, num_threads=config.data_threads
    )
    train_iterator = functools.partial(
        pipeline.train_iterator,
        train_source,
        global_batch_size=config.batch_size,
        seed=config.seed,
        preprocess=train_preprocess,
        prefetch=config.prefetch,
        **common,
    )
    if eval_source is None:
        return train_iterator, None
    eval_iterator = functools.partial(
        pipeline.eval_batches,
        eval_source,
        global_batch_size=config.eval_batch_size or config.batch_size,
        preprocess=eval_preprocess,
        **common,
    )
    return train_iterator, eval_iterator
