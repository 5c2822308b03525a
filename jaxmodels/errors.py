"""Errors that carry a message meant for the user: what is wrong and how to fix it.

The application catches `UserError` at the top level, prints its message and exits
with a non-zero status instead of showing a traceback from deep inside JAX.
"""


def brief(error: BaseException) -> str:
    """An exception's type and first line, at most 300 characters (some libraries'
    messages, TensorStore's for one, run to pages)."""
    first = (str(error).strip().splitlines() or [""])[0]
    text = f"{type(error).__name__}: {first}" if first else type(error).__name__
    return text if len(text) <= 300 else text[:297] + "..."


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
