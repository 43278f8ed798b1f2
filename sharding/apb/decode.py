"""After an APB / Star prefill: attention over every host's KV cache, merged with log-sum-exp.

Each host keeps the KV of its own local block (anchor and passing blocks are dropped), so the KV
cache ``[batch, cache_len, kv_heads, dim]`` is sharded along the sequence over the mesh axis.
A decode step (or the query tokens after the context, Star Attention's "phase 2") attends to
all of it: every host computes a partial attention over its shard, and the partials are merged
with their log-sum-exps (one ``pmax`` and two ``psum`` over the axis). The result equals
attention over the whole cache exactly.

The model-level glue (running a model on the APB layout, sending the query tail here) lives in
``cpmjax.generate.prefill``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import Mesh, PartitionSpec

from sharding.errors import ShapeMismatchError, ShardingError
from sharding.mesh import axis_size

__all__ = ["decode_attention", "masked_attention_lse"]


def masked_attention_lse(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array,
                         sm_scale: float) -> tuple[jax.Array, jax.Array]:
    """Attention with an explicit mask: q ``[b, t, hq, d]``, k ``[b, n, hkv, d]``, v ``[b, n,
    hkv, dv]``, mask ``[b, t, n]`` bool -> (o ``[b, t, hq, dv]`` float32, lse ``[b, hq, t]``)."""
    b, t, hq, d = q.shape
    hkv = k.shape[2]
    qg = q.reshape(b, t, hkv, hq // hkv, d)
    s = jnp.einsum("bthgd,bnhd->bhgtn", qg, k, preferred_element_type=jnp.float32) * sm_scale
    m = mask[:, None, None]
    s = jnp.where(m, s, -jnp.inf)
    top = jnp.max(s, axis=-1, keepdims=True)
    top = jnp.where(jnp.isfinite(top), top, 0.0)
    w = jnp.where(m, jnp.exp(s - top), 0.0)
    den = jnp.sum(w, axis=-1, keepdims=True)
    safe = jnp.where(den > 0, den, 1.0)
    o = jnp.einsum("bhgtn,bnhd->bthgd", w / safe, v.astype(jnp.float32))
    lse = jnp.where(den > 0, top + jnp.log(safe), -jnp.inf)[..., 0]
    return o.reshape(b, t, hq, v.shape[-1]), lse.reshape(b, hq, t)


def decode_attention(
    q: jax.Array,
    k_cache: jax.Array,
    v_cache: jax.Array,
    *,
    mesh: Mesh,
    q_positions: jax.Array,
    axis: str = "sequence",
    sm_scale: float | None = None,
) -> jax.Array:
    """Attention of new tokens to a sequence-sharded KV cache, merged across hosts by LSE.

    q ``[b, t, hq, d]`` (replicated), k_cache ``[b, cache_len, hkv, d]``, v_cache ``[b,
    cache_len, hkv, dv]`` sharded along ``cache_len`` over ``mesh[axis]`` (``cache_len``
    divisible by the axis size); ``q_positions [b, t]``: a query sees cache slot ``j`` iff
    ``j <= q_positions``. Returns ``[b, t, hq, dv]`` in q's dtype."""
    hosts = axis_size(mesh, axis)
    if q.ndim != 4 or k_cache.ndim != 4 or v_cache.ndim != 4:
        raise ShapeMismatchError(
            f"q, k_cache, v_cache must be rank 4; got {q.shape}, {k_cache.shape}, {v_cache.shape}"
        )
    cache_len = k_cache.shape[1]
    if cache_len % hosts:
        raise ShardingError(
            f"cache_len={cache_len} is not divisible by the {hosts} hosts of axis {axis!r}"
        )
    if q_positions.shape != q.shape[:2]:
        raise ShapeMismatchError(f"q_positions {q_positions.shape} != q[:2] {q.shape[:2]}")
    scale = q.shape[-1] ** -0.5 if sm_scale is None else float(sm_scale)
    shard_len = cache_len // hosts

    def shard(qs, ks, vs, pos):
        host = lax.axis_index(axis)
        slots = host * shard_len + jnp.arange(shard_len)
        mask = slots[None, None, :] <= pos[:, :, None]
        o, lse = masked_attention_lse(qs, ks, vs, mask, scale)
        top = lax.pmax(lax.stop_gradient(lse), axis)  # a stabiliser only
        top = jnp.where(jnp.isfinite(top), top, 0.0)
        w = jnp.exp(lse - top)
        den = lax.psum(w, axis)
        num = lax.psum(o * jnp.swapaxes(w, 1, 2)[..., None], axis)
        return num / jnp.swapaxes(jnp.where(den > 0, den, 1.0), 1, 2)[..., None]

    rep, seq = PartitionSpec(), PartitionSpec(None, axis)
    out = jax.shard_map(shard, mesh=mesh, in_specs=(rep, seq, seq, rep), out_specs=rep,
                        check_vma=False)(q, k_cache, v_cache, q_positions)
    return out.astype(q.dtype)
