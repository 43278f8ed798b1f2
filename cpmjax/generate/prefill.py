"""Prefill strategies that run a model across a mesh: APB / Star Attention.

:func:`apb_prefill` runs a cpmjax model on the APB expanded layout (filling the KV cache with
every host's local KV) and then runs the query tokens against the whole sequence-sharded cache
through :func:`sharding.apb_decode.decode_attention` (:func:`sharded_cache_transform`).
The attention arithmetic lives in :mod:`sharding`; this module is the model-level glue.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from cpmjax import ops
from cpmjax.errors import ConfigError
from sharding.apb import APBLayout, _axis_size, make_method_layout
from sharding.apb_decode import decode_attention

__all__ = ["apb_prefill", "sharded_cache_transform"]


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
