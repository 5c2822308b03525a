"""TFDS on this machine only: the embedded datasets' first preparation, and prepared
datasets by name. Nothing here downloads; what is missing is an error saying how to get it."""

from __future__ import annotations

import contextlib
import contextvars
import fcntl
import os
import re
from collections.abc import Iterator
from typing import Any

from jaxmodels.errors import DataError


def prepare_once(builder_cls: Any, data_dir: str) -> Any:
    """Writes `builder_cls`'s dataset under `data_dir` unless it is there; returns the builder.

    A file lock makes concurrent first uses (several processes on one machine) safe.
    """
    os.makedirs(data_dir, exist_ok=True)
    builder = builder_cls(data_dir=data_dir, file_format="array_record")
    if builder.is_prepared():
        return builder
    with open(os.path.join(data_dir, f".{builder.name}.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        builder = builder_cls(data_dir=data_dir, file_format="array_record")
        if not builder.is_prepared():
            builder.download_and_prepare()
    return builder_cls(data_dir=data_dir, file_format="array_record")


def _how_to_prepare(name: str, data_dir: str, hint: str) -> str:
    return (
        "Training never downloads. Prepare it once where there is network access, e.g.\n"
        f"  pip install tensorflow tensorflow-datasets && tfds build {name} "
        f"--data_dir={data_dir} --file_format=array_record\n"
        f"then copy that folder here (or point --config.data_dir at it). {hint}"
    ).rstrip()


def prepared_builder(name: str, data_dir: str, hint: str = "") -> Any:
    """The TFDS builder of `name` in `data_dir`, which must already be prepared.

    Args:
      name: TFDS name, e.g. "mnist" or "wmt14_translate/de-en".
      data_dir: the TFDS data directory.
      hint: appended to the errors (e.g. which embedded dataset needs no download).

    Raises:
      DataError: an unknown name (or one TFDS cannot build here), or a dataset that is
        not prepared; both say how to prepare it.
    """
    import tensorflow_datasets as tfds

    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except Exception as e:  # noqa: BLE001 - TFDS raises several kinds here
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(
            f"unknown TFDS dataset {name!r}, or one TFDS cannot open here ({first}). Check the "
            "name (config key dataset; the catalog is at tensorflow.org/datasets/catalog). "
            + _how_to_prepare(name, data_dir, hint)
        ) from e
    if not builder.is_prepared():
        others = _prepared_versions(builder)
        if others:
            base = name.split(":", 1)[0]
            raise DataError(
                f"dataset {name!r} is not prepared in {data_dir} at version "
                f"{builder.version}, but at {', '.join(others)} (prepared by another TFDS); "
                f"name the version, e.g. dataset='{base}:{others[-1]}' (config key dataset)"
            )
        raise DataError(
            f"dataset {name!r} is not prepared in {data_dir}, and training never downloads. "
            + _how_to_prepare(name, data_dir, hint).removeprefix("Training never downloads. ")
        )
    return builder


def _prepared_versions(builder: Any) -> list[str]:
    """The versions of the builder's dataset prepared beside its own (oldest first)."""
    parent = os.path.dirname(os.path.normpath(str(builder.data_dir)))
    try:
        entries = os.listdir(parent)
    except OSError:
        return []
    found = [
        v
        for v in entries
        if re.fullmatch(r"\d+\.\d+\.\d+", v)
        and os.path.exists(os.path.join(parent, v, "dataset_info.json"))
    ]
    return sorted(found, key=lambda v: tuple(int(x) for x in v.split(".")))


_OPENED: contextvars.ContextVar[set[str] | None] = contextvars.ContextVar("_OPENED", default=None)


@contextlib.contextmanager
def recording() -> Iterator[set[str]]:
    """Collects, in the set it gives, what `split_source` opens in the block: each
    dataset's TFDS full name (name, config and version: "stdlib_docs/1.1.0")."""
    opened: set[str] = set()
    token = _OPENED.set(opened)
    try:
        yield opened
    finally:
        _OPENED.reset(token)


def split_source(builder: Any, name: str, split: str, data_dir: str) -> Any:
    """A random-access (array_record) source of `split`; a clear error if unreadable."""
    try:
        source = builder.as_data_source(split=split)
    except Exception as e:  # noqa: BLE001
        known = list(builder.info.splits.keys())
        # TFDS's split syntax: "train", "train[:90%]", "train+test[:10]", "all".
        names = [part.split("[")[0].strip() for part in split.split("+")]
        missing = [n for n in names if n not in known and n != "all"]
        if known and missing:
            raise DataError(
                f"{name!r} has no split {missing[0]!r} (asked for {split!r}); its splits are "
                f"{known}: set the config key train_split or eval_split to one of them"
            ) from e
        raise DataError(
            f"cannot read split {split!r} of {name!r} in {data_dir}: {str(e).rstrip('.')}. "
            "Datasets must be prepared as array_record (tfds build --file_format=array_record)."
        ) from e
    opened = _OPENED.get()
    if opened is not None:
        opened.add(builder.info.full_name)
    return source
