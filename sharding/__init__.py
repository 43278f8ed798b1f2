"""Meshes, sequence layouts and distributed attention: arrays in, arrays out (nothing here
knows of models, and nothing here imports ``cpmjax``).

- :mod:`sharding.mesh`: meshes and logical-axis partition rules (:func:`make_mesh`,
  :func:`shard_model`, :func:`axis_size` ...).
- :mod:`sharding.layout`: sequence layouts for sequence parallelism (zigzag, contiguous).
- :mod:`sharding.burst`: BurstAttention, exact sequence-parallel attention on a ring
  (``schedule=`` the ring schedule, ``impl=`` the local attention).
- :mod:`sharding.apb`: APB / Star distributed long-context prefill attention, its per-host
  kernel, reference, compressor and the decode attention over a sequence-sharded cache.
- :mod:`sharding.errors`: the typed errors raised here (``cpmjax.errors`` re-exports them).
"""

from sharding.apb import (
    APBLayout,
    RetainingHead,
    RetainingHeads,
    apb_attention,
    apb_host_attention,
    apb_layer_attention,
    apb_reference,
    decode_attention,
    make_apb_layout,
    make_method_layout,
    star_attention,
)
from sharding.burst import (
    SCHEDULES,
    OneHostRing,
    burst_attention,
    burst_forward_shard,
    choose_schedule,
    communication_bytes,
    remat_policy,
)
from sharding.errors import ConfigError, LibraryError, ShapeMismatchError, ShardingError
from sharding.layout import (
    LAYOUTS,
    check_layout,
    from_layout,
    layout_indices,
    layout_positions,
    local_positions,
    to_layout,
)
from sharding.mesh import (
    LOGICAL_AXIS_RULES,
    MESH_AXES,
    axis_size,
    batch_sharding,
    logical_to_spec,
    make_mesh,
    param_shardings,
    shard_model,
)

__all__ = [
    "LAYOUTS",
    "LOGICAL_AXIS_RULES",
    "MESH_AXES",
    "SCHEDULES",
    "APBLayout",
    "ConfigError",
    "LibraryError",
    "OneHostRing",
    "RetainingHead",
    "RetainingHeads",
    "ShapeMismatchError",
    "ShardingError",
    "apb_attention",
    "apb_host_attention",
    "apb_layer_attention",
    "apb_reference",
    "axis_size",
    "batch_sharding",
    "burst_attention",
    "burst_forward_shard",
    "check_layout",
    "choose_schedule",
    "communication_bytes",
    "decode_attention",
    "from_layout",
    "layout_indices",
    "layout_positions",
    "local_positions",
    "logical_to_spec",
    "make_apb_layout",
    "make_method_layout",
    "make_mesh",
    "param_shardings",
    "remat_policy",
    "shard_model",
    "star_attention",
    "to_layout",
]
