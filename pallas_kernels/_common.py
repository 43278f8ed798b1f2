"""Helpers shared by the portable and the Mosaic GPU flash-attention kernels (argument checks,
segment ids, padding, the block mask). Private to :mod:`pallas_kernels`."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

SegmentIds = jax.Array | tuple[jax.Array, jax.Array] | None

# Finite stand-in for -inf inside the kernels: keeps ``m_prev - max_new`` finite when a whole
# block is masked. Masked probabilities are zeroed explicitly, never through exp(mask_value).
_MASK_VALUE = -1e30


def _default_interpret(interpret: bool | None) -> bool:
    if interpret is None:
        return jax.default_backend() == "cpu"
    return bool(interpret)


def _check_qkv(q: jax.Array, k: jax.Array, v: jax.Array) -> tuple[int, ...]:
    """Validate the layouts; return (batch, q_len, q_heads, qk_dim, kv_len, kv_heads, v_dim)."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.ndim != 4:
            raise ValueError(
                f"{name} must be [batch, seq, heads, head_dim], got shape {tuple(x.shape)}"
            )
    batch, q_len, q_heads, qk_dim = q.shape
    kb, kv_len, kv_heads, k_dim = k.shape
    vb, v_len, v_heads, v_dim = v.shape
    if not batch == kb == vb:
        raise ValueError(f"batch sizes differ: q {batch}, k {kb}, v {vb}")
    if k_dim != qk_dim:
        raise ValueError(f"k head_dim {k_dim} != q head_dim {qk_dim}")
    if v_len != kv_len or v_heads != kv_heads:
        raise ValueError(
            f"v shape {tuple(v.shape)} does not match k shape {tuple(k.shape)} in seq/heads"
        )
    if kv_heads == 0 or q_heads % kv_heads:
        raise ValueError(f"q heads {q_heads} must be a multiple of kv heads {kv_heads}")
    return batch, q_len, q_heads, qk_dim, kv_len, kv_heads, v_dim


def _split_segment_ids(
    segment_ids: SegmentIds, batch: int, q_len: int, kv_len: int
) -> tuple[jax.Array | None, jax.Array | None]:
    """Return ``(q_segment_ids [batch, q_len], kv_segment_ids [batch, kv_len])`` as int32."""
    if segment_ids is None:
        return None, None
    if isinstance(segment_ids, (tuple, list)):
        if len(segment_ids) != 2:
            raise ValueError("segment_ids as a tuple must be (q_segment_ids, kv_segment_ids)")
        q_seg, kv_seg = segment_ids
    else:
        if q_len != kv_len:
            raise ValueError(
                f"a single segment_ids array needs q_len == kv_len (got {q_len} and {kv_len}); "
                "pass (q_segment_ids, kv_segment_ids)"
            )
        q_seg = kv_seg = segment_ids
    q_seg = jnp.asarray(q_seg)
    kv_seg = jnp.asarray(kv_seg)
    if q_seg.shape != (batch, q_len):
        raise ValueError(f"q_segment_ids shape {q_seg.shape} != (batch, q_len) {(batch, q_len)}")
    if kv_seg.shape != (batch, kv_len):
        raise ValueError(
            f"kv_segment_ids shape {kv_seg.shape} != (batch, kv_len) {(batch, kv_len)}"
        )
    return q_seg.astype(jnp.int32), kv_seg.astype(jnp.int32)


def _scale(sm_scale: float | None, qk_dim: int) -> float:
    return float(qk_dim) ** -0.5 if sm_scale is None else float(sm_scale)


def _validate(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    segment_ids: SegmentIds,
    sm_scale: float | None,
    block_q: int,
    block_k: int,
) -> tuple[tuple[jax.Array, jax.Array] | None, float]:
    """Argument checks shared by the blockwise and the kernel entry points.

    Returns ``(segs, scale)``: ``segs`` is ``None`` or ``(q_segment_ids [batch, q_len],
    kv_segment_ids [batch, kv_len])`` int32, ``scale`` the resolved softmax scale."""
    batch, q_len, _, qk_dim, kv_len, _, _ = _check_qkv(q, k, v)
    if block_q < 1 or block_k < 1:
        raise ValueError(f"block sizes must be positive, got block_q={block_q}, block_k={block_k}")
    q_seg, kv_seg = _split_segment_ids(segment_ids, batch, q_len, kv_len)
    segs = None if q_seg is None else (q_seg, kv_seg)
    return segs, _scale(sm_scale, qk_dim)


def _pad_axis(x: jax.Array, axis: int, size: int, value: Any = 0) -> jax.Array:
    extra = size - x.shape[axis]
    if extra == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, extra)
    return jnp.pad(x, widths, constant_values=value)


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _block_mask(
    q_pos: jax.Array,
    k_pos: jax.Array,
    kv_len: int,
    causal: bool,
    q_offset: jax.Array,
    q_seg: jax.Array | None,
    kv_seg: jax.Array | None,
) -> jax.Array:
    """``q_pos [bq, 1]`` or broadcastable, ``k_pos [1, bk]`` -> bool mask (True = attend).

    ``q_seg [..., bq, 1]``, ``kv_seg [..., 1, bk]`` broadcast in front when present."""
    mask = k_pos < kv_len
    if causal:
        mask = mask & (k_pos <= q_pos + q_offset)
    if q_seg is not None:
        mask = mask & (q_seg == kv_seg)
    return mask
