"""Device mesh and the one table that maps logical axis names to mesh axes.

Models name the axes of their parameters and key activations with *logical* names
(`batch`, `embed`, `mlp`, `heads`, `conv_out`, ...). How those names land on the
devices is decided here, and only here, by a named rule set chosen from the config:

| rules     | batch split over  | parameters split over                         |
|-----------|-------------------|-----------------------------------------------|
| `data`    | data, fsdp        | nothing (replicated)                          |
| `fsdp`    | data, fsdp        | fsdp (one large axis of each tensor)          |
| `fsdp_tp` | data, fsdp        | fsdp, and tensor over heads / mlp / vocab     |

The mesh always has the three axes `('data', 'fsdp', 'tensor')`; a rule set that names an
axis of size 1 costs nothing, and an axis of several devices that it never names would
only repeat the same work on them (`check_rules_use_mesh`). A dimension that the mesh axis
does not divide is left replicated rather than failing (e.g. a 10-way classifier on 8
devices; the 259 tokens of the byte-level models' vocabulary stay whole under `tensor`).
A convolution computes with its kernel whole over `fsdp` (`fsdp_gathered`), as FSDP does.

Example:
  >>> import jax
  >>> mesh = make_mesh(data=-1)
  >>> mesh.axis_names
  ('data', 'fsdp', 'tensor')
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from jaxmodels.errors import ConfigError

MESH_AXES = ("data", "fsdp", "tensor")

# The one table. Each entry is (logical name, mesh axis or axes); a logical name may appear
# several times: Flax takes the first entry whose mesh axis the tensor is not using yet.
_BATCH = ("batch", ("data", "fsdp"))
RULES: dict[str, tuple[tuple[str, Any], ...]] = {
    "data": (_BATCH,),
    "fsdp": (
        _BATCH,
        ("embed", "fsdp"),
        ("conv_out", "fsdp"),
        ("mlp", "fsdp"),
        ("vocab", "fsdp"),
        ("conv_in", "fsdp"),
    ),
    "fsdp_tp": (
        _BATCH,
        ("heads", "tensor"),
        ("mlp", "tensor"),
        ("vocab", "tensor"),
        ("conv_out", "tensor"),
        ("embed", "fsdp"),
        ("conv_in", "fsdp"),
        ("mlp", "fsdp"),
        ("conv_out", "fsdp"),
    ),
}


def logical_rules(name: str) -> tuple[tuple[str, Any], ...]:
    """Returns the rule set `name` (one of `RULES`)."""
    if name not in RULES:
        raise ConfigError(
            f"unknown sharding rules {name!r}; choose one of {sorted(RULES)} "
            "(config key sharding_rules)"
        )
    return RULES[name]


def _mesh_axes(name: str) -> set[str]:
    """The mesh axes that the rule set `name` names."""
    return {
        axis for _, axes in RULES[name] for axis in ((axes,) if isinstance(axes, str) else axes)
    }


def check_rules_use_mesh(mesh: Mesh, name: str) -> None:
    """A `ConfigError` where a mesh axis of more than one device is named by no rule of the
    rule set `name`: every device along it would hold the same batch rows and parameters,
    and compute the same thing."""
    used = _mesh_axes(name)
    for axis in MESH_AXES:
        if mesh.shape[axis] > 1 and axis not in used:
            wanted = sorted(n for n in RULES if axis in _mesh_axes(n))
            raise ConfigError(
                f"mesh.{axis}={mesh.shape[axis]} with sharding_rules={name!r}, which use no "
                f"{axis!r} axis: each example would be computed on {mesh.shape[axis]} devices "
                f"alike; use sharding_rules {' or '.join(map(repr, wanted))}, or move those "
                "devices to mesh.data"
            )


def make_mesh(
    data: int = -1, fsdp: int = 1, tensor: int = 1, devices: Sequence[Any] | None = None
) -> Mesh:
    """Builds the `('data', 'fsdp', 'tensor')` mesh over all (or the given) devices.

    Args:
      data, fsdp, tensor: axis sizes; at most one may be -1, meaning "all devices left".
      devices: defaults to `jax.devices()` (every device of every process).

    Raises:
      ConfigError: when the sizes do not multiply to the number of devices.
    """
    devices = list(jax.devices() if devices is None else devices)
    sizes = [data, fsdp, tensor]
    n = len(devices)
    if sizes.count(-1) > 1:
        raise ConfigError("at most one of mesh.data / mesh.fsdp / mesh.tensor may be -1")
    if -1 in sizes:
        known = math.prod(s for s in sizes if s != -1)
        if known <= 0 or n % known:
            raise ConfigError(
                f"mesh sizes {dict(zip(MESH_AXES, sizes, strict=True))} do not divide the "
                f"{n} available devices; set mesh.data/fsdp/tensor so their product is {n}"
            )
        sizes[sizes.index(-1)] = n // known
    if math.prod(sizes) != n or min(sizes) < 1:
        raise ConfigError(
            f"mesh sizes {dict(zip(MESH_AXES, sizes, strict=True))} multiply to "
            f"{math.prod(sizes)}, but there are {n} devices; set mesh.data/fsdp/tensor "
            f"so their product is {n} (or use -1 for one of them)"
        )
    # Auto axes: XLA propagates shardings; models only annotate (with_logical_constraint).
    axis_types = (AxisType.Auto,) * len(MESH_AXES)
    if devices == list(jax.devices()):
        return jax.make_mesh(tuple(sizes), MESH_AXES, devices=devices, axis_types=axis_types)
    return Mesh(np.asarray(devices).reshape(sizes), MESH_AXES, axis_types=axis_types)


def batch_parallelism(mesh: Mesh) -> int:
    """Number of ways the batch is split (the product of the `data` and `fsdp` axes)."""
    return mesh.shape["data"] * mesh.shape["fsdp"]


def process_batch_part(mesh: Mesh) -> tuple[int, int]:
    """(index, count): the part of every global batch this process feeds, of `count` equal,
    consecutive parts. Usually one per process; processes whose devices differ only along
    `tensor` hold the same rows and get the same part (each must load the same examples).

    Raises:
      ConfigError: when the processes' rows are not equal, consecutive blocks (a mesh that
        interleaves processes along the batch axes).
    """
    index_map = batch_sharding(mesh).devices_indices_map((batch_parallelism(mesh),))
    part = _batch_part(index_map, jax.process_index(), lambda d: d.process_index)
    if part is None:
        raise ConfigError(
            f"the mesh {dict(mesh.shape)} gives the processes batch rows that are not equal, "
            "consecutive blocks; choose mesh sizes whose data x fsdp split keeps each "
            "process's devices together (keep mesh.tensor within a host's devices)"
        )
    return part


def _batch_part(index_map: Any, process: int, process_of: Any) -> tuple[int, int] | None:
    """`process_batch_part` for `index_map` (device -> (slice of batch rows,)) and
    `process_of(device)`; None where the processes' rows are not equal consecutive blocks."""
    rows: dict[int, set[int]] = {}
    for device, (block,) in index_map.items():
        rows.setdefault(process_of(device), set()).add(block.start or 0)
    parts = sorted({tuple(sorted(r)) for r in rows.values()})
    # Sorted parts that concatenate to 0, 1, ..., n-1 are consecutive blocks.
    flat = [r for part in parts for r in part]
    if flat != list(range(len(flat))) or len({len(p) for p in parts}) != 1:
        return None
    return parts.index(tuple(sorted(rows[process]))), len(parts)


def batch_sharding(mesh: Mesh, ndim: int = 1) -> NamedSharding:
    """Sharding of a batch array: leading axis over `data` x `fsdp`, the rest replicated."""
    return NamedSharding(mesh, PartitionSpec(("data", "fsdp"), *([None] * (ndim - 1))))


def _fit_spec(spec: PartitionSpec, shape: Sequence[int], mesh: Mesh) -> PartitionSpec:
    """Drops mesh axes from dimensions they do not divide evenly."""
    out = []
    for i, axes in enumerate(tuple(spec) + (None,) * (len(shape) - len(spec))):
        if axes is None:
            out.append(None)
            continue
        names = axes if isinstance(axes, tuple) else (axes,)
        size = math.prod(mesh.shape[a] for a in names)
        out.append(axes if shape[i] % size == 0 else None)
    return PartitionSpec(*out)


def fsdp_gathered(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
    """A parameter `x` whose axes have the logical `names`, laid out as a layer computes with
    it: whole along the dimensions the active rules split over `fsdp` (all-gathered before
    use, as FSDP does), still split along `tensor` (tensor parallelism). Outside a mesh and
    rules context (`jaxmodels.training.mesh_context`), or not traced, `x` as it is.

    Left to itself, XLA may instead partition the computation over the stored split; for
    convolutions whose kernel was split over both `fsdp` and `tensor` that gave wrong
    gradients (ResNet under `fsdp_tp` on a 2x2x2 mesh), so the ResNets' and the conv net's
    kernels go through here.
    """
    rules = nn.get_logical_axis_rules()
    mesh = jax.sharding.get_abstract_mesh()
    if not rules or mesh.empty or not isinstance(x, jax.core.Tracer):
        return x
    spec = nn.logical_to_mesh_axes(tuple(names), rules)

    def without_fsdp(axes: Any) -> Any:
        kept = tuple(a for a in (axes if isinstance(axes, tuple) else (axes,)) if a != "fsdp")
        return None if not kept or kept == (None,) else kept[0] if len(kept) == 1 else kept

    spec = PartitionSpec(*(without_fsdp(a) for a in spec))
    return jax.lax.with_sharding_constraint(x, _fit_spec(spec, x.shape, mesh))


def state_shardings(abstract_boxed_tree: Any, mesh: Mesh, rules: Sequence[tuple[str, Any]]) -> Any:
    """Mesh shardings for a pytree whose leaves carry logical names (`nn.Partitioned`).

    Args:
      abstract_boxed_tree: the output of `jax.eval_shape` of an init function, with the
        `nn.LogicallyPartitioned` boxes still on (not unboxed). Leaves without names are
        replicated. Leaves boxed by Flax's `nn.with_partitioning` (`nn.Partitioned`) name
        mesh axes, not logical ones: they are split as named, without the rules.
      mesh: the device mesh.
      rules: logical -> mesh rules (see `logical_rules`).

    Returns:
      A pytree of `NamedSharding` with the structure of the *unboxed* tree.

    Raises:
      ValueError: an `nn.with_partitioning` box names an axis this mesh lacks.
    """

    def spec_of(path: Any, x: Any) -> PartitionSpec:
        if isinstance(x, nn.LogicallyPartitioned):
            return nn.logical_to_mesh_axes(x.names, rules)
        if not isinstance(x, nn.Partitioned):
            return PartitionSpec()
        # (were read as logical names, which the rules do not map: replicated, silently)
        named = [a for n in x.names for a in (n if isinstance(n, tuple) else (n,))]
        unknown = [a for a in named if a is not None and a not in mesh.shape]
        if unknown:
            raise ValueError(
                f"{jax.tree_util.keystr(path)} is split over mesh axis {unknown[0]!r} "
                f"(nn.with_partitioning names mesh axes), which this mesh lacks (its axes: "
                f"{', '.join(mesh.axis_names)}): name one of those, or name logical axes "
                "with nn.with_logical_partitioning for the rules to map"
            )
        return PartitionSpec(*x.names)

    def leaf(path: Any, x: Any) -> NamedSharding:
        value = x.value if isinstance(x, nn.meta.AxisMetadata) else x
        return NamedSharding(mesh, _fit_spec(spec_of(path, x), value.shape, mesh))

    return jax.tree_util.tree_map_with_path(
        leaf, abstract_boxed_tree, is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata)
    )
