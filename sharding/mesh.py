"""Meshes and partition rules.

Layers name their parameter axes logically (``embed``, ``heads``, ``kv_heads``, ``mlp``,
``vocab``, ``experts``, ``norm``); one table maps logical names to mesh axes. Changing the
parallelism means changing the table, never the layers.

Mesh axes: ``data`` (batch), ``fsdp`` (batch + parameter sharding), ``tensor`` (heads / mlp /
vocab), ``sequence`` (sequence parallelism: BurstAttention, APB).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from sharding.errors import ShardingError

MESH_AXES = ("data", "fsdp", "tensor", "sequence")

# logical axis -> mesh axis (or tuple of mesh axes, or None = replicated)
LOGICAL_AXIS_RULES: dict[str, Any] = {
    "batch": ("data", "fsdp"),
    "length": "sequence",
    "embed": "fsdp",
    "heads": "tensor",
    "kv_heads": "tensor",
    "mlp": "tensor",
    "vocab": "tensor",
    "experts": None,
    "norm": None,
}


def axis_size(mesh: Mesh, axis: str) -> int:
    """Size of ``axis`` of ``mesh``; ``ShardingError`` naming the culprit when ``mesh`` is not a
    ``jax.sharding.Mesh`` or has no such axis."""
    if not isinstance(mesh, Mesh):
        raise ShardingError(f"mesh must be a jax.sharding.Mesh, got {type(mesh).__name__}")
    if axis not in mesh.shape:
        raise ShardingError(f"axis={axis!r} is not an axis of the mesh {dict(mesh.shape)}")
    return int(mesh.shape[axis])


def make_mesh(
    data: int = 1,
    fsdp: int = 1,
    tensor: int = 1,
    sequence: int = 1,
    devices: Sequence[jax.Device] | None = None,
) -> Mesh:
    """A 4-axis mesh ``(data, fsdp, tensor, sequence)`` with Auto axis types (plain jnp code runs
    on its sharded arrays). ``-1`` for one axis takes all remaining devices."""
    sizes = [data, fsdp, tensor, sequence]
    devices = list(jax.devices() if devices is None else devices)
    if sizes.count(-1) > 1:
        raise ShardingError(f"at most one mesh axis may be -1, got {dict(zip(MESH_AXES, sizes, strict=True))}")
    if -1 in sizes:
        known = int(np.prod([s for s in sizes if s != -1]))
        if len(devices) % known:
            raise ShardingError(f"{len(devices)} devices do not divide into mesh axes {sizes}")
        sizes[sizes.index(-1)] = len(devices) // known
    total = int(np.prod(sizes))
    if total > len(devices):
        raise ShardingError(
            f"mesh {dict(zip(MESH_AXES, sizes, strict=True))} needs {total} devices, only {len(devices)} exist"
        )
    grid = np.asarray(devices[:total]).reshape(sizes)
    return Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def logical_to_spec(
    logical_axes: Sequence[str | None] | None,
    rules: Mapping[str, Any] | None = None,
    mesh: Mesh | None = None,
    shape: Sequence[int] | None = None,
) -> PartitionSpec:
    """PartitionSpec for a parameter with the given logical axes.

    A mesh axis is used at most once per tensor; with ``mesh`` and ``shape`` given, a dimension
    that the mesh axes do not divide evenly is replicated instead."""
    rules = LOGICAL_AXIS_RULES if rules is None else rules
    if logical_axes is None:
        return PartitionSpec()
    used: set[str] = set()
    spec = []
    for i, name in enumerate(logical_axes):
        target = rules.get(name) if name is not None else None
        axes = (target,) if isinstance(target, str) else tuple(target or ())
        if mesh is not None:
            axes = tuple(a for a in axes if a in mesh.shape and mesh.shape[a] > 1)
        axes = tuple(a for a in axes if a not in used)
        if mesh is not None and shape is not None and axes:
            size = int(np.prod([mesh.shape[a] for a in axes]))
            if shape[i] % size:
                axes = ()
        used.update(axes)
        spec.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return PartitionSpec(*spec)


def param_shardings(model: Any, mesh: Mesh, rules: Mapping[str, Any] | None = None
                    ) -> dict[str, NamedSharding]:
    """``{"dotted.param.path": NamedSharding}`` for every ``nnx.Param`` of ``model``."""
    from flax import nnx

    out = {}
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        axes = var.get_metadata().get("logical_axes")
        spec = logical_to_spec(axes, rules, mesh, var.shape)
        out[".".join(str(p) for p in path)] = NamedSharding(mesh, spec)
    return out


def shard_model(model: Any, mesh: Mesh, rules: Mapping[str, Any] | None = None) -> Any:
    """Place every parameter of ``model`` on ``mesh`` by its logical axes (in place)."""
    from flax import nnx

    shardings = param_shardings(model, mesh, rules)
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        var.set_value(jax.device_put(var[...], shardings[".".join(str(p) for p in path)]))
    return model


def batch_sharding(mesh: Mesh, sequence: bool = False) -> NamedSharding:
    """Sharding of ``[batch, seq]`` token arrays: batch over data+fsdp, and seq over
    ``sequence`` when asked."""
    batch_axes = tuple(a for a in ("data", "fsdp") if mesh.shape.get(a, 1) > 1) or None
    seq_axis = "sequence" if sequence and mesh.shape.get("sequence", 1) > 1 else None
    return NamedSharding(mesh, PartitionSpec(batch_axes, seq_axis))
