"""What the Pallas kernels of `pallas_lstm` and `pallas_attention` share: how they compile
and how they run on a sharded batch.

Lowered for an NVIDIA GPU they compile through Pallas's Triton backend (jax 0.11 deprecates
it in favour of Mosaic GPU; where a jax lacks it, a clear error); for other platforms they
run in Pallas's interpreter (exact, slow: for tests). The choice is made when the step is
lowered (`jax.lax.platform_dependent`), not from the machine's default backend, so a step
compiled ahead of time for a GPU on a host without one gets the Triton kernels.

A `pallas_call` has no partitioning rule: under a jit whose batch is sharded over a mesh,
XLA would gather the whole batch onto every device and run the kernel on all of it there.
`mesh_axes` finds the mesh axes a logical dimension (``batch``, ``heads``) is split over
under the active logical-axis rules (`jaxmodels.sharding`), so the callers run their kernels
per shard with `jax.shard_map`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax


def on_nvidia_gpu() -> bool:
    """True when the default backend is an NVIDIA (CUDA) GPU."""
    if jax.default_backend() != "gpu":
        return False
    try:
        return "rocm" not in jax.devices()[0].client.platform_version.lower()
    except Exception:  # a client without the attribute: assume CUDA
        return True


def triton_available() -> bool:
    """Whether this jax has Pallas's Triton backend."""
    try:
        from jax.experimental.pallas import triton  # noqa: F401
    except ImportError:
        return False
    return True


def pallas_call(
    kernel: Callable[..., None],
    *,
    interpret: bool | None,
    what: str,
    instead: str,
    triton: dict[str, Any],
    **kwargs: Any,
) -> Callable[..., Any]:
    """`pl.pallas_call(kernel, **kwargs)`, compiled by Triton (compiler parameters `triton`,
    e.g. num_warps) or run in Pallas's interpreter.

    `interpret` True or False forces one. None picks by the platform the computation is
    lowered for: Triton for CUDA, the interpreter for any other, so a step compiled for an
    NVIDIA GPU ahead of time on a machine without one gets the Triton kernels. `what` and
    `instead` word the error raised when this jax has no Triton backend.
    """
    from jax.experimental import pallas as pl

    def build(interpreted: bool) -> Callable[..., Any]:
        if interpreted:
            return pl.pallas_call(kernel, interpret=True, **kwargs)
        try:
            from jax.experimental.pallas import triton as pl_triton
        except ImportError as e:
            raise RuntimeError(
                f"{what} need Pallas's Triton backend, which jax {jax.__version__} does not "
                f"have; use {instead}"
            ) from e
        return pl.pallas_call(kernel, compiler_params=pl_triton.CompilerParams(**triton), **kwargs)

    if interpret is not None:
        return build(interpret)
    if not triton_available():  # the interpreter, or the error on an NVIDIA GPU
        return build(not on_nvidia_gpu())
    compiled, interpreted = build(False), build(True)
    return lambda *args: jax.lax.platform_dependent(*args, cuda=compiled, default=interpreted)


def mesh_axes(logical: str, size: int) -> tuple[str, ...]:
    """The axes of the current mesh (of more than one device) that the logical dimension
    `logical`, of `size` elements, is split over under the active rules; () when there is no
    such mesh, no rule, or the split would not be even."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return ()
    spec = nn.logical_to_mesh_axes((logical,))
    axes = spec[0] if len(spec) else None
    if axes is None:
        return ()
    axes = tuple(a for a in ((axes,) if isinstance(axes, str) else axes) if mesh.shape[a] > 1)
    if not axes or size % math.prod(mesh.shape[a] for a in axes):
        return ()
    return axes


def shard_offset(axes: tuple[str, ...], local_size: int) -> jax.Array:
    """Inside `jax.shard_map`: the global index of this shard's first element along a
    dimension split over `axes` (0 when it is not split)."""
    if not axes:
        return jax.numpy.zeros((), jax.numpy.int32)
    return jax.lax.axis_index(axes) * local_size
