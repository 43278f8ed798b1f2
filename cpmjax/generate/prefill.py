"""Prefill strategies: fill the KV cache with the prompt and return the logits after it.

- ``"local"``: one device; prompts right-padded to a length bucket (``local_prefill_fn``).
- ``"ring"``: exact, sequence-parallel over the ``sequence`` axis of a mesh (BurstAttention
  ring through ``ops.attention_backend("burst", ...)``; ``ring_prefill_fn``).
- ``"apb"`` / ``"star"``: approximate long-context prefill (anchor + compressed passing blocks,
  or anchor + local block): :func:`apb_prefill` runs a cpmjax model on the APB expanded layout
  (filling the KV cache with every host's local KV) and then runs the query tokens against the
  whole sequence-sharded cache through :func:`sharding.apb.decode_attention`
  (:func:`sharded_cache_transform`). The attention arithmetic lives in :mod:`sharding`; this
  module is the model-level glue.

``check_prefill`` validates a strategy with its mesh and options before any compute. A
distributed prefill lays out one prompt length at a time: ``by_length`` runs a request as one
batch per prompt length and puts the rows back in input order.
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from cpmjax import ops
from cpmjax.errors import ConfigError
from cpmjax.generate.driver import GenerationResult, GenerationStats, Request
from sharding.apb import APBLayout, decode_attention, make_method_layout
from sharding.mesh import axis_size

__all__ = [
    "DISTRIBUTED",
    "PREFILLS",
    "apb_prefill",
    "by_length",
    "check_prefill",
    "distributed_cache_len",
    "local_prefill_fn",
    "method_prefill_fn",
    "ring_prefill_fn",
    "ring_width",
    "sharded_cache_transform",
]

PREFILLS = ("local", "apb", "star", "ring")
DISTRIBUTED = ("apb", "star", "ring")


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
    impl: Any = "blockwise",
    attention_impl: Any = None,
    return_hidden: bool = False,
) -> tuple[jax.Array, Any, APBLayout]:
    """Distributed prefill of a cpmjax ``CausalLM`` (``method`` ``"apb"`` or ``"star"``).

    ``tokens [b, seq]`` (every row the same length; the last ``query_len`` tokens are the
    query), ``cache`` from ``model.init_cache(b, cache_len)`` with ``cache_len >= seq``. Runs
    the expanded layout through the model inside ``attention_backend("apb", ...)``, writing only
    local rows to the cache at their input positions (anchor and padding rows are dropped), then
    the query tokens (if any) against the full cache. Returns ``(last_logits [b, vocab], cache,
    layout)``; decoding continues from position ``seq`` with the returned cache. ``impl``: the
    hosts' local attention (``sharding.apb.apb_local_attention``; ``attention_impl`` is its
    deprecated name). A per-layer scorer (``RetainingHeads``) gets each layer's index through
    ``ops.attention(layer=)``. With ``return_hidden`` the first result is instead the final
    (normalised) hidden states of every input position in input order, ``[b, seq, hidden]``
    (context rows from the expanded layout, then the query rows)."""
    if attention_impl is not None:
        warnings.warn("apb_prefill(attention_impl=...) is deprecated; use impl=",
                      DeprecationWarning, stacklevel=2)
        impl = attention_impl
    b, seq = tokens.shape
    hosts = axis_size(mesh, axis)
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
                               retaining_head=retaining_head, impl=impl):
        hidden, cache = model(exp_tokens, positions=positions, cache=cache, cache_slots=slots,
                              return_hidden=True, rope_seq_len=seq)
    c = layout.context_len
    if return_hidden:
        ctx = hidden[:, jnp.asarray(layout.local_rows())]
        if query_len == 0:
            return ctx, cache, layout
    elif query_len == 0:
        last = hidden[:, int(layout.local_rows()[-1])]
        return ops.lm_head(last, model.head_weight()), cache, layout
    q_pos = jnp.broadcast_to(jnp.arange(c, seq, dtype=jnp.int32), (b, query_len))
    with ops.attention_transform(sharded_cache_transform(mesh, axis, cache_len)):
        out, cache = model(jnp.asarray(tokens)[:, c:], positions=q_pos, cache=cache,
                           attend_cache=True, rope_seq_len=seq, return_hidden=return_hidden)
    if return_hidden:
        return jnp.concatenate([ctx, out.astype(ctx.dtype)], axis=1), cache, layout
    return out[:, -1], cache, layout


def sharded_cache_transform(mesh: Mesh, axis: str, cache_len: int
                            ) -> Callable[[Callable[..., jax.Array]], Callable[..., jax.Array]]:
    """An ``ops.attention_transform`` that sends attention of new tokens to the whole
    sequence-sharded cache through :func:`decode_attention` (every host attends to its own
    shard, the partials merged by log-sum-exp: Star Attention's phase 2) instead of the
    generic masked attention. It takes the calls a model makes with ``attend_cache`` and no
    explicit mask (keys = the ``cache_len`` cache slots, slot ``j`` visible iff ``j <=
    q_position``); every other call goes to the wrapped implementation unchanged."""
    hosts = axis_size(mesh, axis)

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


# ----------------------------------------------------------------------------------------------
# strategies as the decode paths use them
def _apb_option_names() -> set[str]:
    skip = {"model", "tokens", "cache", "mesh", "method"}
    return {name for name, p in inspect.signature(apb_prefill).parameters.items()
            if p.kind == p.KEYWORD_ONLY and name not in skip}


def check_prefill(prefill: str, mesh: Mesh | None, options: dict[str, Any] | None) -> str:
    """Validate a prefill strategy with its mesh and options before any compute; returns the
    strategy's name (``"full"`` is an old name of ``"local"``). Raises ``ConfigError`` naming
    the culprit."""
    if prefill == "full":
        prefill = "local"
    if prefill not in PREFILLS:
        raise ConfigError(f"prefill={prefill!r}; expected local, apb, star or ring")
    if prefill in DISTRIBUTED and (mesh is None or "sequence" not in mesh.shape):
        raise ConfigError(f"prefill={prefill!r} needs mesh= with a 'sequence' axis")
    if options:
        if prefill not in ("apb", "star"):
            raise ConfigError(
                f"prefill_options {sorted(options)} are APB / Star settings; prefill={prefill!r} "
                "takes none")
        unknown = sorted(set(options) - _apb_option_names())
        if unknown:
            raise ConfigError(
                f"prefill_options {unknown} are not settings of prefill={prefill!r}; known: "
                f"{sorted(_apb_option_names())}")
    return prefill


def local_prefill_fn(graphdef: Any, state: Any, tokens: jax.Array, lengths: jax.Array,
                     cache: Any) -> tuple[jax.Array, Any]:
    """Run the right-padded prompts ``tokens [b, s]`` (``lengths [b]`` real tokens), fill the
    cache (slot = position); returns ``(last-real-token logits [b, vocab], cache)``."""
    model = nnx.merge(graphdef, state)
    b, s = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
    hidden, cache = model(tokens, positions=positions, cache=cache, return_hidden=True,
                          rope_seq_len=jnp.max(lengths))
    last = hidden[jnp.arange(b), lengths - 1]
    return ops.lm_head(last, model.head_weight()), cache


def ring_prefill_fn(graphdef: Any, mesh: Mesh, state: Any, tokens: jax.Array,
                    lengths: jax.Array, cache: Any) -> tuple[jax.Array, Any]:
    """``local_prefill_fn`` with exact sequence-parallel attention over the ``sequence`` axis of
    ``mesh`` (``tokens [b, s]`` with ``s`` a multiple of the axis size: ``ring_width``)."""
    with ops.attention_backend("burst", mesh=mesh, layout="contiguous"):
        return local_prefill_fn(graphdef, state, tokens, lengths, cache)


def method_prefill_fn(graphdef: Any, method: str, options: tuple, mesh: Mesh, state: Any,
                      tokens: jax.Array, cache: Any) -> tuple[jax.Array, Any]:
    """APB / Star prefill (``apb_prefill``) of equal-length prompts ``tokens [b, s]``;
    ``options`` as sorted ``(name, value)`` pairs. Returns ``(last logits [b, vocab], cache)``."""
    model = nnx.merge(graphdef, state)
    logits, cache, _ = apb_prefill(model, tokens, cache, mesh=mesh, method=method,
                                   **dict(options))
    return logits, cache


def ring_width(seq: int, hosts: int) -> int:
    """Prompt width right-padded so that every host of the ring holds a block."""
    return -(-seq // hosts) * hosts


def distributed_cache_len(seq: int, max_new_tokens: int, hosts: int) -> int:
    """Cache slots for a distributed prefill: prompt + new tokens, rounded up to a multiple of
    ``hosts * 8`` (the cache is sharded along the sequence)."""
    return -(-(seq + max_new_tokens) // (hosts * 8)) * hosts * 8


def by_length(run: Callable[[Request], GenerationResult], request: Request
              ) -> GenerationResult:
    """``run`` once per group of equal-length prompts (a distributed prefill's layout depends on
    the length), the results put back in input order (sampling seeds the same per group)."""
    lengths = request.lengths
    groups = np.unique(lengths)
    if groups.size == 1:
        return run(request)
    batch, max_new = request.batch, request.max_new_tokens
    out = np.full((batch, max_new), request.pad_id, np.int32)
    new_lengths = np.zeros((batch,), lengths.dtype)
    stats = GenerationStats(prompt_tokens=int(lengths.sum()))
    for length in groups:
        rows = np.flatnonzero(lengths == length)
        res = run(request.rows(rows, int(length)))
        out[rows, : res.tokens.shape[1]] = res.tokens
        new_lengths[rows] = res.lengths
        for field in ("new_tokens", "prefill_seconds", "decode_seconds", "compile_seconds"):
            setattr(stats, field, getattr(stats, field) + getattr(res.stats, field))
        stats.decode_steps = max(stats.decode_steps, res.stats.decode_steps)
    return GenerationResult(tokens=out[:, : stats.decode_steps], lengths=new_lengths,
                            stats=stats)
