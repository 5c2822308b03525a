"""What the Pallas kernels of `pallas_lstm` and `pallas_attention` share: how they compile.

On an NVIDIA GPU they compile through Pallas's Triton backend (jax 0.11 deprecates it in
favour of Mosaic GPU; where a jax lacks it, a clear error); on other backends they run in
Pallas's interpreter (exact, slow: for tests).
"""

from __future__ import annotations

from typing import Any

import jax


def triton_available() -> bool:
    """Whether this jax has Pallas's Triton backend."""
    try:
        from jax.experimental.pallas import triton  # noqa: F401
    except ImportError:
        return False
    return True


def call_params(interpret: bool, what: str, instead: str, **triton: Any) -> dict[str, Any]:
    """Keyword arguments of `pl.pallas_call`: the interpreter, or Triton's compiler
    parameters (`triton`, e.g. num_warps); `what` and `instead` word the error raised when
    this jax has no Triton backend."""
    if interpret:
        return {"interpret": True}
    try:
        from jax.experimental.pallas import triton as pl_triton
    except ImportError as e:
        raise RuntimeError(
            f"{what} need Pallas's Triton backend, which jax {jax.__version__} does not "
            f"have; use {instead}"
        ) from e
    return {"compiler_params": pl_triton.CompilerParams(**triton)}
