"""Sequence layouts for sequence parallelism: lay a sequence out over devices and restore it.

A sequence of ``seq_len`` tokens sharded over ``num_shards`` devices is stored, along the
sequence dimension of a global array, in *layout order*: device ``r`` holds the slice
``[r * L, (r + 1) * L)`` of the laid-out dimension (``L = seq_len / num_shards``).

- ``"contiguous"``: layout order is the natural order; device ``r`` holds tokens
  ``[r * L, (r + 1) * L)``. With a causal mask device ``G - 1`` does ``2G - 1`` times the work
  of device 0.
- ``"zigzag"``: the sequence is cut into ``2 * num_shards`` chunks of ``c = L / 2`` tokens and
  device ``r`` holds chunks ``r`` and ``2 * num_shards - 1 - r`` (in that order). Every device
  then does the same causal work (load balance).

Everything that is per token (tokens, positions, labels, segment ids, loss masks) is laid out
with :func:`to_layout` before the model; outputs are restored with :func:`from_layout`. Losses
that average over tokens need no restoring.
"""

from __future__ import annotations

import numpy as np

from sharding.errors import ShapeMismatchError, ShardingError

LAYOUTS = ("zigzag", "contiguous")


def check_layout(layout: str, seq_len: int, num_shards: int) -> None:
    """Raise a typed error unless ``seq_len`` tokens can be laid out over ``num_shards``."""
    if layout not in LAYOUTS:
        raise ShardingError(f"unknown sequence layout {layout!r}; expected one of {LAYOUTS}")
    if num_shards < 1:
        raise ShardingError(f"num_shards must be >= 1, got {num_shards}")
    chunks = 2 * num_shards if layout == "zigzag" else num_shards
    if seq_len % chunks:
        raise ShapeMismatchError(
            f"sequence length {seq_len} must be a multiple of {chunks} for layout {layout!r} "
            f"over {num_shards} shards"
        )


def layout_indices(seq_len: int, num_shards: int, layout: str = "zigzag") -> np.ndarray:
    """``perm [seq_len]`` int: position ``p`` of the laid-out sequence holds token ``perm[p]``.

    These are also the token positions (RoPE positions) of the laid-out sequence."""
    check_layout(layout, seq_len, num_shards)
    if layout == "contiguous":
        return np.arange(seq_len)
    chunk = seq_len // (2 * num_shards)
    chunks = np.arange(seq_len).reshape(2 * num_shards, chunk)
    order = []
    for r in range(num_shards):
        order.append(chunks[r])
        order.append(chunks[2 * num_shards - 1 - r])
    return np.concatenate(order)


def to_layout(x, num_shards: int, layout: str = "zigzag", axis: int = 1):
    """Reorder the natural-order sequence axis ``axis`` of ``x`` into layout order.

    ``x`` may be a numpy or jax array (e.g. tokens ``[batch, seq]`` or
    ``[batch, seq, heads, head_dim]``); the result has the same type and shape."""
    perm = layout_indices(x.shape[axis], num_shards, layout)
    return x.take(perm, axis=axis) if layout != "contiguous" else x


def from_layout(x, num_shards: int, layout: str = "zigzag", axis: int = 1):
    """Inverse of :func:`to_layout`: layout order back to natural order along ``axis``."""
    perm = layout_indices(x.shape[axis], num_shards, layout)
    if layout == "contiguous":
        return x
    return x.take(np.argsort(perm), axis=axis)


def layout_positions(seq_len: int, num_shards: int, layout: str = "zigzag") -> np.ndarray:
    """Token positions ``[seq_len]`` int32 of the laid-out sequence (pass them to RoPE)."""
    return layout_indices(seq_len, num_shards, layout).astype(np.int32)


def local_positions(rank, local_len: int, num_shards: int, layout: str):
    """Global positions ``[local_len]`` of the tokens held by device ``rank`` (jnp; ``rank``
    may be traced). Used to build masks inside ``shard_map``."""
    import jax.numpy as jnp

    idx = jnp.arange(local_len)
    if layout == "contiguous":
        return rank * local_len + idx
    chunk = local_len // 2
    first = rank * chunk + idx
    second = (2 * num_shards - 1 - rank) * chunk + (idx - chunk)
    return jnp.where(idx < chunk, first, second)
