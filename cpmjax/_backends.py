"""Registers the kernel and distributed attention backends with ``cpmjax.ops``.

Imported lazily by ``cpmjax.ops`` the first time a non-reference backend is asked for. Each
adapter receives the seam's arguments (index-causal with queries aligned to the end of the keys,
optional segment ids) plus the options of the ``attention_backend(...)`` context."""

from __future__ import annotations

from typing import Any

import jax

from cpmjax import ops


def _segments(segment_ids, kv_segment_ids):
    if segment_ids is None:
        return None
    return segment_ids if kv_segment_ids is None else (segment_ids, kv_segment_ids)


def _blockwise(q, k, v, *, causal=True, segment_ids=None, kv_segment_ids=None, sm_scale=None,
               block_k: int = 512, block_q: int | None = None, **_: Any) -> jax.Array:
    from pallas_kernels import blockwise_attention

    return blockwise_attention(
        q, k, v, causal=causal, sm_scale=sm_scale,
        segment_ids=_segments(segment_ids, kv_segment_ids), q_offset=k.shape[1] - q.shape[1],
        block_k=block_k, block_q=block_q,
    )


def _pallas(q, k, v, *, causal=True, segment_ids=None, kv_segment_ids=None, sm_scale=None,
            block_q: int = 128, block_k: int = 128, interpret: bool | None = None,
            **_: Any) -> jax.Array:
    from pallas_kernels import flash_attention

    return flash_attention(
        q, k, v, causal=causal, sm_scale=sm_scale,
        segment_ids=_segments(segment_ids, kv_segment_ids), q_offset=k.shape[1] - q.shape[1],
        block_q=block_q, block_k=block_k, interpret=interpret,
    )


ops.register_attention_backend("blockwise", _blockwise)
ops.register_attention_backend("pallas", _pallas)


def _burst(q, k, v, **options: Any) -> jax.Array:
    """Sequence-parallel exact attention (BurstAttention ring); see ``sharding.burst``."""
    from sharding.burst import ops_backend

    return ops_backend(q, k, v, **options)


def _apb(q, k, v, **options: Any) -> jax.Array:
    from sharding.apb import apb_backend

    return apb_backend(q, k, v, **options)


ops.register_attention_backend("burst", _burst)
ops.register_attention_backend("apb", _apb)
