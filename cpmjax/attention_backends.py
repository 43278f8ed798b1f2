"""The attention backends of :func:`cpmjax.ops.attention`: a registry of named implementations,
the reference (:func:`xla_attention`, with :func:`build_mask`) and the built-in kernel and
distributed backends.

``cpmjax.ops`` imports this module (and re-exports its public names); nothing here imports
``cpmjax.ops``. Each backend is ``fn(q, k, v, *, causal, segment_ids, kv_segment_ids, sm_scale,
**options) -> out`` with index-causal masks, queries aligned to the end of the keys; options
come from the call or the ``attention_backend(...)`` context (``mesh=``, block sizes,
``layer=`` ...), and a backend ignores the options it does not use.

Built-in names (the library's implementation vocabulary, ``pallas_kernels.IMPLS``, plus the
distributed backends): ``"reference"``, ``"blockwise"``, ``"pallas"``, ``"burst"``, ``"apb"``.
The kernel backends run :func:`pallas_kernels.local_attention` with the block sizes they always
used (blockwise ``block_k=512``; pallas ``block_q = block_k = 128``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from pallas_kernels import local_attention

AttentionFn = Callable[..., jax.Array]

__all__ = [
    "AttentionFn",
    "available_backends",
    "build_mask",
    "get_backend",
    "register_attention_backend",
    "xla_attention",
]

_MASK_VALUE = -1e30
_REGISTRY: dict[str, AttentionFn] = {}


def register_attention_backend(name: str, fn: AttentionFn) -> None:
    """Register ``fn(q, k, v, *, causal, segment_ids, kv_segment_ids, sm_scale, **options) ->
    out`` under ``name`` (it replaces a backend of that name)."""
    _REGISTRY[name] = fn


def available_backends() -> list[str]:
    """The registered backend names, sorted."""
    return sorted(_REGISTRY)


def get_backend(name: str) -> AttentionFn | None:
    """The backend registered as ``name``, or None."""
    return _REGISTRY.get(name)


def build_mask(
    batch: int,
    q_len: int,
    kv_len: int,
    *,
    causal: bool,
    q_positions: jax.Array | None = None,
    kv_positions: jax.Array | None = None,
    segment_ids: jax.Array | None = None,
    kv_segment_ids: jax.Array | None = None,
    mask: jax.Array | None = None,
) -> jax.Array | None:
    """Boolean mask ``[batch, q_len, kv_len]`` (True = attend), or None when nothing is masked."""
    result = None

    def _and(a, b):
        return b if a is None else a & b

    if causal:
        if q_positions is None and kv_positions is None:
            # index-causal, queries aligned to the end of the keys
            qi = jnp.arange(q_len)[:, None] + (kv_len - q_len)
            ki = jnp.arange(kv_len)[None, :]
            result = jnp.broadcast_to(ki <= qi, (batch, q_len, kv_len))
        else:
            qp = q_positions if q_positions is not None else jnp.arange(q_len) + (kv_len - q_len)
            kp = kv_positions if kv_positions is not None else jnp.arange(kv_len)
            qp = jnp.broadcast_to(jnp.asarray(qp), (batch, q_len))
            kp = jnp.broadcast_to(jnp.asarray(kp), (batch, kv_len))
            result = kp[:, None, :] <= qp[:, :, None]
    if segment_ids is not None:
        kv_seg = segment_ids if kv_segment_ids is None else kv_segment_ids
        result = _and(result, segment_ids[:, :, None] == kv_seg[:, None, :])
    if mask is not None:
        result = _and(result, jnp.broadcast_to(mask, (batch, q_len, kv_len)))
    return result


def xla_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    causal: bool = True,
    q_positions: jax.Array | None = None,
    kv_positions: jax.Array | None = None,
    segment_ids: jax.Array | None = None,
    kv_segment_ids: jax.Array | None = None,
    mask: jax.Array | None = None,
    sm_scale: float | None = None,
    return_lse: bool = False,
    **unused: Any,
):
    """Reference attention. Fully masked query rows return zeros (lse = -inf)."""
    batch, q_len, q_heads, qk_dim = q.shape
    kv_len, kv_heads = k.shape[1], k.shape[2]
    groups = q_heads // kv_heads
    scale = qk_dim**-0.5 if sm_scale is None else sm_scale
    qg = q.reshape(batch, q_len, kv_heads, groups, qk_dim)
    scores = jnp.einsum("bqhgd,bkhd->bhgqk", qg, k, preferred_element_type=jnp.float32) * scale
    full_mask = build_mask(
        batch, q_len, kv_len, causal=causal, q_positions=q_positions, kv_positions=kv_positions,
        segment_ids=segment_ids, kv_segment_ids=kv_segment_ids, mask=mask,
    )
    if full_mask is not None:
        scores = jnp.where(full_mask[:, None, None], scores, _MASK_VALUE)
    row_max = jnp.max(scores, axis=-1, keepdims=True)
    weights = jnp.exp(scores - row_max)
    if full_mask is not None:
        weights = jnp.where(full_mask[:, None, None], weights, 0.0)
    denom = jnp.sum(weights, axis=-1, keepdims=True)
    probs = weights / jnp.where(denom == 0, 1.0, denom)
    out = jnp.einsum(
        "bhgqk,bkhd->bqhgd", probs.astype(v.dtype), v, preferred_element_type=jnp.float32
    )
    out = out.reshape(batch, q_len, q_heads, v.shape[-1]).astype(q.dtype)
    if return_lse:
        lse = jnp.where(denom[..., 0] > 0, row_max[..., 0] + jnp.log(denom[..., 0]), -jnp.inf)
        return out, lse.reshape(batch, q_heads, q_len)
    return out


def _segments(segment_ids, kv_segment_ids):
    if segment_ids is None:
        return None
    return segment_ids if kv_segment_ids is None else (segment_ids, kv_segment_ids)


def local_backend(impl: Any, *, block_q: int | None = None, block_k: int | None = None
                  ) -> AttentionFn:
    """A backend that runs the local attention ``impl`` (a name of ``pallas_kernels.IMPLS`` or a
    callable ``(q, k, v, *, causal, q_offset, sm_scale, segment_ids, **options) -> (out, lse)``)
    with queries aligned to the end of the keys; ``block_q``/``block_k`` are its defaults."""

    def backend(q, k, v, *, causal=True, segment_ids=None, kv_segment_ids=None, sm_scale=None,
                **options: Any) -> jax.Array:
        blocks = {"block_q": options.pop("block_q", block_q),
                  "block_k": options.pop("block_k", block_k)}
        interpret = options.pop("interpret", None)
        out, _ = local_attention(
            q, k, v, causal=causal, sm_scale=sm_scale, q_offset=k.shape[1] - q.shape[1],
            segment_ids=_segments(segment_ids, kv_segment_ids), impl=impl, interpret=interpret,
            **blocks,
        )
        return out

    return backend


def _burst(q, k, v, **options: Any) -> jax.Array:
    """Sequence-parallel exact attention (BurstAttention ring); see ``sharding.burst``."""
    from sharding.burst import ops_backend

    return ops_backend(q, k, v, **options)


def _apb(q, k, v, **options: Any) -> jax.Array:
    """APB distributed prefill attention; see ``sharding.apb``."""
    from sharding.apb import apb_backend

    return apb_backend(q, k, v, **options)


register_attention_backend("reference", xla_attention)
register_attention_backend("blockwise", local_backend("blockwise", block_k=512))
register_attention_backend("pallas", local_backend("pallas", block_q=128, block_k=128))
register_attention_backend("burst", _burst)
register_attention_backend("apb", _apb)
