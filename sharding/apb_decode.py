"""After an APB / Star prefill: attention over every host's KV cache, merged with log-sum-exp.

Each host keeps the KV of its own local block (anchor and passing blocks are dropped), so the KV
cache ``[batch, cache_len, kv_heads, dim]`` is sharded along the sequence over the mesh axis.
A decode step (or the query tokens after the context, Star Attention's "phase 2") attends to
all of it: every host computes a partial attention over its shard, and the partials are merged
with their log-sum-exps (one ``pmax`` and two ``psum`` over the axis). The result equals
attention over the whole cache exactly.

:func:`apb_prefill` is the glue a generation loop calls: it runs a cpmjax model on the APB
expanded layout (filling the cache with every host's local KV) and then runs the query tokens
against the full cache.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from cpmjax.errors import ConfigError, ShapeMismatchError, ShardingError
from sharding.apb import APBLayout, _axis_size, make_method_layout

__all__ = ["apb_prefill", "decode_attention", "masked_attention_lse", "sharded_cache_transform"]


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
    hosts = _axis_size(mesh, axis)
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


def apb_prefill(
    model: Any,
    tokens: jax.Array,
    cache: Any,
    *,
    mesh: Mesh,
    axis: str = "sequence",
    method: str = "apb",
    anchor_len: int | None = None,
    passing_len: int | None = None,
    query_len: int = 0,
    query_offset: int = 0,
    scorer: str | Callable[..., jax.Array] = "query",
    retaining_head: Any = None,
    attention_impl: Any = "blockwise",
) -> tuple[jax.Array, Any, APBLayout]:
    """Distributed prefill of a cpmjax ``CausalLM`` (``method`` ``"apb"`` or ``"star"``).

    ``tokens [b, seq]`` (every row the same length; the last ``query_len`` tokens are the
    query), ``cache`` from ``model.init_cache(b, cache_len)`` with ``cache_len >= seq``. Runs
    the expanded layout through the model inside ``attention_backend("apb", ...)``, writing only
    local rows to the cache at their input positions (anchor and padding rows are dropped), then
    the query tokens (if any) against the full cache. Returns ``(last_logits [b, vocab], cache,
    layout)``; decoding continues from position ``seq`` with the returned cache."""
    from cpmjax import ops
    from sharding.apb import apb_backend

    if "apb" not in ops.available_backends():  # until cpmjax._backends registers it
        ops.register_attention_backend("apb", apb_backend)
    b, seq = tokens.shape
    hosts = _axis_size(mesh, axis)
    layout = make_method_layout(method, seq, hosts=hosts, anchor_len=anchor_len,
                                passing_len=passing_len, query_len=query_len,
                                query_offset=query_offset)
    cache_len = jax.tree.leaves(cache)[0].shape[1]
    if cache_len < seq:
        raise ConfigError(f"cache_len={cache_len} is shorter than the prompt ({seq} tokens)")
    src = np.maximum(layout.source_index(), 0)
    seq_sharding = NamedSharding(mesh, PartitionSpec(None, axis))
    exp_tokens = jax.device_put(jnp.asarray(tokens)[:, src], seq_sharding)
    positions = jnp.broadcast_to(jnp.asarray(layout.positions()), exp_tokens.shape)
    slots = jnp.broadcast_to(jnp.asarray(layout.cache_slots(cache_len)), exp_tokens.shape)
    with ops.attention_backend("apb", mesh=mesh, layout=layout, axis=axis, scorer=scorer,
                               retaining_head=retaining_head, attention_impl=attention_impl):
        if hasattr(scorer, "reset"):
            scorer.reset()
        hidden, cache = model(exp_tokens, positions=positions, cache=cache, cache_slots=slots,
                              return_hidden=True, rope_seq_len=seq)
    c = layout.context_len
    if query_len == 0:
        last = hidden[:, int(layout.local_rows()[-1])]
        return ops.lm_head(last, model.head_weight()), cache, layout
    q_pos = jnp.broadcast_to(jnp.arange(c, seq, dtype=jnp.int32), (b, query_len))
    with ops.attention_transform(sharded_cache_transform(mesh, axis, cache_len)):
        logits, cache = model(jnp.asarray(tokens)[:, c:], positions=q_pos, cache=cache,
                              attend_cache=True, rope_seq_len=seq)
    return logits[:, -1], cache, layout


def sharded_cache_transform(mesh: Mesh, axis: str, cache_len: int
                            ) -> Callable[[Callable[..., jax.Array]], Callable[..., jax.Array]]:
    """An ``ops.attention_transform`` that sends attention of new tokens to the whole
    sequence-sharded cache through :func:`decode_attention` (every host attends to its own
    shard, the partials merged by log-sum-exp: Star Attention's phase 2) instead of the
    generic masked attention. It takes the calls a model makes with ``attend_cache`` and no
    explicit mask (keys = the ``cache_len`` cache slots, slot ``j`` visible iff ``j <=
    q_position``); every other call goes to the wrapped implementation unchanged."""
    hosts = _axis_size(mesh, axis)

    def transform(impl: Callable[..., jax.Array]) -> Callable[..., jax.Array]:
        def wrapped(q, k, v, **kw):
            qpos = kw.get("q_positions")
            takes = (qpos is not None and kw.get("kv_positions") is not None
                     and kw.get("mask") is None and kw.get("causal", True)
                     and kw.get("segment_ids") is None and kw.get("kv_segment_ids") is None
                     and kw.get("backend") is None and k.shape[1] == cache_len
                     and cache_len % hosts == 0 and qpos.shape == q.shape[:2])
            if not takes:
                return impl(q, k, v, **kw)
            return decode_attention(q, k, v, mesh=mesh, q_positions=qpos, axis=axis,
                                    sm_scale=kw.get("sm_scale"))
        return wrapped

    return transform
