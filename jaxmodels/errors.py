"""Errors that carry a message meant for the user: what is wrong and how to fix it.

The application catches `UserError` at the top level, prints its message and exits
with a non-zero status instead of showing a traceback from deep inside JAX.
"""

from typing import Any

import jax


def brief(error: BaseException) -> str:
    """An exception's type and first line, at most 300 characters (some libraries'
    messages, TensorStore's for one, run to pages)."""
    first = (str(error).strip().splitlines() or [""])[0]
    text = f"{type(error).__name__}: {first}" if first else type(error).__name__
    return text if len(text) <= 300 else text[:297] + "..."


def leaves_by_name(tree: Any, is_leaf: Any = None) -> dict[str, Any]:
    """A pytree's leaves by the one name messages give them: the path's keys joined by
    "/" (`params/Dense_0/kernel`; sequence indices and dataclass fields alike), as
    checkpoints spell them on disk. Dicts, frozen dicts and `TrainState`s of the same
    contents give the same names, so trees of either kind compare by name. `is_leaf`: as
    `jax.tree_util`'s (e.g. to name empty nodes too)."""
    return {
        "/".join(_key_name(k) for k in path): leaf
        for path, leaf in jax.tree_util.tree_leaves_with_path(tree, is_leaf=is_leaf)
    }


def _key_name(key: Any) -> str:
    for attr in ("key", "name", "idx"):  # DictKey, GetAttrKey, SequenceKey/FlattenedIndexKey
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


class UserError(Exception):
    """Bad input from the user; the message names the problem and the fix."""


class ConfigError(UserError, ValueError):
    """A config key is unknown, or values are inconsistent."""


class DataError(UserError):
    """A dataset is missing, unreadable or not of the expected form."""


class CheckpointError(UserError):
    """A checkpoint is unreadable, partial, or belongs to a different model."""


class CheckpointMismatchError(CheckpointError):
    """A readable checkpoint holds another model's (or optimizer's) state than the one it
    is restored onto."""


class NonFiniteError(UserError, FloatingPointError):
    """Training produced a NaN or infinite loss."""
