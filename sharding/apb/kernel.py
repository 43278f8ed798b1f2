"""APB's per-host kernel and its distributed entry points.

Every host runs :func:`apb_host_attention` on its expanded rows ``[anchor; local block]``:
local causal attention, the compressor (scores, max-pool, top-k: its passing block), one
``all_gather`` of the passing blocks, the attention of its local queries to the anchor and the
passing blocks of the hosts before it, the log-sum-exp merge, and the anchor rows' causal
attention. Inside ``shard_map`` the host index is ``lax.axis_index`` and the exchange
``lax.all_gather``; given ``host=`` and ``gather=`` (e.g. :class:`OneHostGather`) the same
function runs one host's work alone on one device, with exactly that host's shapes.

- :func:`apb_layer_attention`: the hosts over a mesh on the expanded layout (the model path;
  the ``"apb"`` backend of ``cpmjax.ops`` through :func:`apb_backend`);
- :func:`apb_attention` / :func:`star_attention`: the same on a plain ``[batch, seq, heads,
  dim]`` input, outputs in input order (query rows: Star's phase 2 over every host's KV).

The local attention is chosen with ``impl=`` (the library's vocabulary,
``pallas_kernels.IMPLS``; APB's default ``"blockwise"`` with 512-token query and key blocks
clipped to the key length); ``attention_impl=`` is its deprecated name.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from pallas_kernels import IMPLS as LOCAL_IMPLS
from pallas_kernels import local_attention, resolve_impl
from sharding.apb.compressor import (
    Scorer,
    compress_block,
    query_aware_scores,
    resolve_scorer,
    scorer_for_layer,
)
from sharding.apb.layout import APBLayout, make_method_layout
from sharding.errors import ConfigError, ShapeMismatchError, ShardingError
from sharding.mesh import axis_size

__all__ = [
    "BLOCK",
    "LocalAttention",
    "OneHostGather",
    "apb_attention",
    "apb_backend",
    "apb_host_attention",
    "apb_layer_attention",
    "apb_local_attention",
    "check_qkv",
    "key_mask_segments",
    "merge_partials",
    "star_attention",
]

# (q, k, v, *, causal, segment_ids, sm_scale) -> (o [b, q, hq, dv], lse [b, hq, q] float32)
LocalAttention = Callable[..., tuple[jax.Array, jax.Array]]
BLOCK = 512  # the blockwise local attention's query and key block (clipped to the key length)


# ----------------------------------------------------------------------------- local attention


def _impl_argument(impl: Any, attention_impl: Any, stacklevel: int = 3) -> tuple[Any, str]:
    """``(impl, keyword)``: ``attention_impl`` (deprecated) wins when given."""
    if attention_impl is None:
        return impl, "impl"
    warnings.warn("attention_impl= is deprecated; use impl=", DeprecationWarning,
                  stacklevel=stacklevel)
    return attention_impl, "attention_impl"


def apb_local_attention(impl: str | LocalAttention = "blockwise", *, keyword: str = "impl"
                        ) -> LocalAttention:
    """The local attention APB's hosts run: ``(q, k, v, *, causal, segment_ids, sm_scale) ->
    (o, lse)`` (queries at offset 0), through :func:`pallas_kernels.local_attention`.

    ``impl``: ``"blockwise"`` (query and key blocks of :data:`BLOCK` clipped to the key
    length), ``"reference"``, ``"pallas"`` (the kernel's default blocks), ``"auto"``
    (blockwise on CPU, pallas elsewhere) or a callable, returned as is. Raises ``ConfigError``
    naming ``keyword`` for an unknown name."""
    if callable(impl):
        return impl
    if impl not in LOCAL_IMPLS and impl != "xla":
        raise ConfigError(f"{keyword}={impl!r} is not one of {LOCAL_IMPLS} or a callable")
    name = resolve_impl(impl, keyword=keyword, stacklevel=3)
    if name == "auto":
        name = "blockwise" if jax.default_backend() == "cpu" else "pallas"
    if name == "blockwise":
        def blockwise(q, k, v, *, causal, segment_ids, sm_scale):
            block = max(1, min(BLOCK, k.shape[1]))
            return local_attention(q, k, v, causal=causal, segment_ids=segment_ids,
                                   sm_scale=sm_scale, impl="blockwise", block_q=block,
                                   block_k=block)
        return blockwise
    return functools.partial(local_attention, impl=name)


def merge_partials(parts: list[tuple[jax.Array, jax.Array]]) -> tuple[jax.Array, jax.Array]:
    """Merge partial attentions over disjoint key sets with their log-sum-exps.

    ``parts``: ``(o [b, q, h, d], lse [b, h, q])`` pairs. Returns the attention over the union
    (``o`` in the first part's dtype, ``lse`` float32); rows with no key anywhere give 0 / -inf.
    """
    dtype = parts[0][0].dtype
    if len(parts) == 1:
        return parts[0][0], parts[0][1].astype(jnp.float32)
    lses = jnp.stack([p[1].astype(jnp.float32) for p in parts])  # [n, b, h, q]
    top = jnp.max(lses, axis=0)
    top = jnp.where(jnp.isfinite(top), top, 0.0)
    weights = jnp.exp(lses - top)  # exp(-inf) = 0 for empty parts
    denom = jnp.sum(weights, axis=0)
    out = sum(
        p[0].astype(jnp.float32) * jnp.swapaxes(w, 1, 2)[..., None]
        for p, w in zip(parts, weights, strict=True)
    )
    safe = jnp.where(denom > 0, denom, 1.0)
    out = out / jnp.swapaxes(safe, 1, 2)[..., None]
    lse = jnp.where(denom > 0, top + jnp.log(safe), -jnp.inf)
    return out.astype(dtype), lse


def key_mask_segments(batch: int, q_len: int, kv_keep: jax.Array
                      ) -> tuple[jax.Array, jax.Array]:
    """Segment ids ``(q_seg [batch, q_len], kv_seg [batch, kv_len])`` that keep exactly the keys
    where ``kv_keep [kv_len]`` is True (for a local attention's ``segment_ids=``)."""
    q_seg = jnp.zeros((batch, q_len), jnp.int32)
    kv_seg = jnp.broadcast_to(jnp.where(kv_keep, 0, 1).astype(jnp.int32), (batch,) + kv_keep.shape)
    return q_seg, kv_seg


def remote_branches(layout: APBLayout) -> tuple[np.ndarray, list[tuple[bool, int]]]:
    """What each host attends to outside its own block, grouped into distinct static shapes.

    Host ``h`` sees the anchor (``h > 0``) and the passing blocks of hosts ``0..h-1``. Returns
    ``(branch_of_host [hosts], branches)`` with one ``(with_anchor, passing_blocks)`` per distinct
    shape (Star: two branches, nothing / anchor; APB: one per host)."""
    keys = []
    for h in range(layout.hosts):
        with_anchor = h > 0 and layout.anchor_len > 0
        blocks = h if layout.passing_len > 0 else 0
        keys.append((with_anchor, blocks) if (with_anchor or blocks) else (False, 0))
    branches = sorted(set(keys), key=lambda kb: (kb[1], kb[0]))
    return np.array([branches.index(kb) for kb in keys], np.int32), branches


def _apb_shard(q, k, v, *, layout: APBLayout, axis: str, scorer: Any, sm_scale: float,
               attend: LocalAttention, pool_size: int, host: Any = None,
               gather: Callable[[jax.Array], jax.Array] | None = None):
    """One host's APB attention on its expanded rows ``[b, anchor_len + block_len, h, d]``.

    The keys outside the local block (anchor, passing blocks of earlier hosts) differ in number
    from host to host; a ``lax.switch`` on the host index runs one attention over exactly the
    keys the host may see (no work on masked passing blocks of later hosts, none on the anchor
    on host 0). Under ``cost_analysis`` a switch counts its most expensive branch: the last
    host's, the critical path."""
    a, blk, ctx = layout.anchor_len, layout.block_len, layout.context_len
    hosts, passing = layout.hosts, layout.passing_len
    if host is None:
        host = lax.axis_index(axis) if hosts > 1 else jnp.int32(0)
    if gather is None:
        gather = functools.partial(lax.all_gather, axis_name=axis)
    b = q.shape[0]
    qa, ka, va = q[:, :a], k[:, :a], v[:, :a]
    ql, kl, vl = q[:, a:], k[:, a:], v[:, a:]
    gidx = host * blk + jnp.arange(blk)
    valid = gidx < ctx
    attn = functools.partial(attend, sm_scale=sm_scale)

    parts = [attn(ql, kl, vl, causal=True, segment_ids=key_mask_segments(b, blk, valid))]
    kp = vp = slot_real = None
    if scorer is not None:
        if scorer == "query":
            query = qa[:, layout.query_offset : layout.query_offset + layout.query_len]
            scores = query_aware_scores(ql, kl, vl, query=query, key_valid=valid,
                                        sm_scale=sm_scale)
        else:
            query = (qa[:, layout.query_offset : layout.query_offset + layout.query_len]
                     if layout.query_embedded else None)
            scores = scorer(ql, kl, vl, query=query)
        candidate = valid & (gidx >= a)
        k_sel, v_sel, _, _ = compress_block(kl, vl, scores, candidate, passing, pool_size)
        # the last host's block is never read: gather all, keep hosts 0..P-2
        k_all = gather(k_sel)[: hosts - 1]  # [P-1, b, passing, hkv, d]
        v_all = gather(v_sel)[: hosts - 1]
        kp = jnp.moveaxis(k_all, 0, 1).reshape(b, (hosts - 1) * passing, *k_sel.shape[2:])
        vp = jnp.moveaxis(v_all, 0, 1).reshape(b, (hosts - 1) * passing, *v_sel.shape[2:])
        # a source block with fewer candidates than passing_len has unreal trailing slots
        src = np.repeat(np.arange(hosts - 1), passing)
        slot = np.tile(np.arange(passing), hosts - 1)
        real = np.minimum(ctx, (src + 1) * blk) - np.maximum(a, src * blk)
        slot_real = jnp.asarray(slot < np.maximum(real, 0))
    branch_of_host, branches = remote_branches(layout)
    if hosts > 1 and any(with_anchor or blocks for with_anchor, blocks in branches):
        dv = v.shape[-1]

        def remote(with_anchor: bool, blocks: int):
            def run():
                if not (with_anchor or blocks):
                    return (jnp.zeros((b, blk, q.shape[2], dv), jnp.float32),
                            jnp.full((b, q.shape[2], blk), -jnp.inf, jnp.float32))
                ks, vs, keep = [], [], []
                if with_anchor:
                    ks, vs, keep = [ka], [va], [jnp.ones((a,), bool)]
                if blocks:
                    n = blocks * passing
                    ks.append(kp[:, :n])
                    vs.append(vp[:, :n])
                    keep.append(slot_real[:n])
                kk, vv = (x[0] if len(x) == 1 else jnp.concatenate(x, axis=1) for x in (ks, vs))
                keys_ok = keep[0] if len(keep) == 1 else jnp.concatenate(keep)
                o, lse = attn(ql, kk, vv, causal=False,
                              segment_ids=key_mask_segments(b, blk, keys_ok))
                return o.astype(jnp.float32), lse.astype(jnp.float32)
            return run

        fns = [remote(*br) for br in branches]
        if len(fns) == 1:
            parts.append(fns[0]())
        else:
            index = jnp.asarray(branch_of_host)[host]
            parts.append(lax.switch(index, fns))
    o_local, _ = merge_partials(parts)
    if a == 0:
        return o_local

    def anchor_attention():
        return attn(qa, ka, va, causal=True, segment_ids=None)[0].astype(o_local.dtype)

    if scorer is None and hosts > 1:
        # host 0's local queries never read the anchor, and without a scorer nothing reads the
        # anchor's queries either: its anchor rows only feed its own (discarded) anchor rows
        o_anchor = lax.cond(host > 0, anchor_attention,
                            lambda: jnp.zeros(qa.shape[:3] + v.shape[3:], o_local.dtype))
    else:
        o_anchor = anchor_attention()
    return jnp.concatenate([o_anchor, o_local], axis=1)


class OneHostGather:
    """``lax.all_gather`` over the hosts as one host sees it, for running that host alone.

    ``host``: the host index (int or traced int32 scalar); ``received``: one stack ``[hosts -
    1, ...]`` per gather call, in call order (APB gathers the passing keys, then the values),
    holding the blocks of every other host in host order. A call returns ``[hosts, ...]`` with
    the host's own block at its index (what the collective returns) and records the block the
    host sends in :attr:`sent`."""

    def __init__(self, host: int | jax.Array, received: list[jax.Array]):
        self.host = jnp.asarray(host, jnp.int32)
        self.received = list(received)
        self.sent: list[jax.Array] = []

    def __call__(self, x: jax.Array) -> jax.Array:
        others = self.received[len(self.sent)]  # [hosts - 1, ...]: every host but this one
        self.sent.append(x)
        slot = jnp.arange(others.shape[0] + 1)
        stacked = others[jnp.maximum(jnp.where(slot < self.host, slot, slot - 1), 0)]
        mine = (slot == self.host).reshape((-1,) + (1,) * x.ndim)
        return jnp.where(mine, x[None], stacked)


def apb_host_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    layout: APBLayout,
    axis: str = "sequence",
    scorer: str | Scorer | None = "query",
    retaining_head: Any = None,
    sm_scale: float | None = None,
    pool_size: int = 5,
    impl: str | LocalAttention = "blockwise",
    host: int | jax.Array | None = None,
    gather: Callable[[jax.Array], jax.Array] | None = None,
) -> jax.Array:
    """One host's APB (or Star) attention on its expanded rows: what each host runs inside
    ``shard_map`` in :func:`apb_layer_attention`.

    q ``[b, anchor_len + block_len, hq, d]``, k ``[b, anchor_len + block_len, hkv, d]``, v
    ``[b, anchor_len + block_len, hkv, dv]``: the host's rows of the expanded layout. ``host``:
    the host index, default ``lax.axis_index(axis)``; ``gather``: ``x -> [hosts, *x.shape]``,
    default ``lax.all_gather(x, axis)`` (called twice, keys then values, only when something
    is passed). With both given (:class:`OneHostGather`) the function runs outside
    ``shard_map``, one host alone. ``scorer``/``retaining_head`` as :func:`apb_attention`
    (ignored when nothing is passed). Returns ``[b, anchor_len + block_len, hq, dv]``."""
    if q.shape[1] != layout.host_len:
        raise ShapeMismatchError(
            f"expected the host's {layout.host_len} rows (anchor_len={layout.anchor_len} + "
            f"block_len={layout.block_len}), got {q.shape[1]}")
    scale = q.shape[-1] ** -0.5 if sm_scale is None else float(sm_scale)
    return _apb_shard(q, k, v, layout=layout, axis=axis,
                      scorer=resolve_scorer(scorer, retaining_head, layout), sm_scale=scale,
                      attend=apb_local_attention(impl), pool_size=pool_size, host=host,
                      gather=gather)


def check_qkv(q: jax.Array, k: jax.Array, v: jax.Array) -> None:
    """Raise ``ShapeMismatchError`` unless q, k, v are ``[batch, seq, heads, dim]`` self-attention
    inputs with ``q_heads % kv_heads == 0``."""
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ShapeMismatchError(
            f"q, k, v must be [batch, seq, heads, dim]; got {q.shape}, {k.shape}, {v.shape}"
        )
    if q.shape[:2] != k.shape[:2] or k.shape[:3] != v.shape[:3] or q.shape[3] != k.shape[3]:
        raise ShapeMismatchError(
            f"q {q.shape}, k {k.shape}, v {v.shape} disagree on batch/seq/heads/dim"
        )
    if q.shape[2] % k.shape[2]:
        raise ShapeMismatchError(
            f"q_heads={q.shape[2]} is not a multiple of kv_heads={k.shape[2]}"
        )


def apb_layer_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    mesh: Mesh,
    layout: APBLayout,
    axis: str = "sequence",
    scorer: str | Scorer = "query",
    retaining_head: Any = None,
    sm_scale: float | None = None,
    pool_size: int = 5,
    impl: str | LocalAttention = "blockwise",
    layer: int | None = None,
    attention_impl: str | LocalAttention | None = None,
) -> jax.Array:
    """APB attention on the expanded layout (the model path; one call per layer).

    q ``[b, layout.expanded_len, hq, d]``, k ``[b, expanded_len, hkv, d]``, v ``[b,
    expanded_len, hkv, dv]``, sharded (or shardable) along the sequence over ``mesh[axis]``.
    ``impl``: the hosts' local attention (:func:`apb_local_attention`); ``layer``: the layer
    index, which picks the head of a per-layer scorer (:class:`RetainingHeads`);
    ``attention_impl``: deprecated name of ``impl``. Returns ``[b, expanded_len, hq, dv]`` in
    the same layout (anchor rows included: the next layer needs them;
    :meth:`APBLayout.local_rows` picks the context rows). Each host runs
    :func:`apb_host_attention`."""
    impl, keyword = _impl_argument(impl, attention_impl)
    check_qkv(q, k, v)
    hosts = axis_size(mesh, axis)
    if hosts != layout.hosts:
        raise ShardingError(
            f"layout is for hosts={layout.hosts} but mesh axis {axis!r} has {hosts} devices"
        )
    if q.shape[1] != layout.expanded_len:
        raise ShapeMismatchError(
            f"expected {layout.expanded_len} expanded rows (hosts={hosts} x (anchor_len="
            f"{layout.anchor_len} + block_len={layout.block_len})), got seq={q.shape[1]}"
        )
    if not isinstance(pool_size, int) or pool_size < 1:
        raise ConfigError(f"pool_size must be an int >= 1, got {pool_size!r}")
    resolved = resolve_scorer(scorer_for_layer(scorer, layer),
                              scorer_for_layer(retaining_head, layer), layout)
    scale = q.shape[-1] ** -0.5 if sm_scale is None else float(sm_scale)
    fn = functools.partial(_apb_shard, layout=layout, axis=axis, scorer=resolved,
                           sm_scale=scale, attend=apb_local_attention(impl, keyword=keyword),
                           pool_size=pool_size)
    spec = PartitionSpec(None, axis)
    return jax.shard_map(fn, mesh=mesh, in_specs=(spec, spec, spec), out_specs=spec,
                         check_vma=False)(q, k, v)


def _tail_attention(q_tail, k_ctx, v_ctx, k_tail, v_tail, *, mesh, layout, axis, sm_scale,
                    attend):
    """Star phase 2 for the query rows: exact attention of ``q_tail [b, t, hq, d]`` over every
    host's local KV (expanded layout, partials merged across hosts by log-sum-exp) and causally
    over the tail itself."""
    a, blk, ctx = layout.anchor_len, layout.block_len, layout.context_len
    attn = functools.partial(attend, sm_scale=sm_scale)

    def shard(qt, k, v):
        host = lax.axis_index(axis) if layout.hosts > 1 else jnp.int32(0)
        valid = host * blk + jnp.arange(blk) < ctx
        o, lse = attn(qt, k[:, a:], v[:, a:], causal=False,
                      segment_ids=key_mask_segments(qt.shape[0], qt.shape[1], valid))
        if layout.hosts == 1:
            return o.astype(jnp.float32), lse
        top = lax.pmax(lax.stop_gradient(lse), axis)  # a stabiliser only
        top = jnp.where(jnp.isfinite(top), top, 0.0)
        w = jnp.exp(lse - top)
        denom = lax.psum(w, axis)
        num = lax.psum(o.astype(jnp.float32) * jnp.swapaxes(w, 1, 2)[..., None], axis)
        safe = jnp.where(denom > 0, denom, 1.0)
        return (num / jnp.swapaxes(safe, 1, 2)[..., None],
                jnp.where(denom > 0, top + jnp.log(safe), -jnp.inf))

    spec = PartitionSpec(None, axis)
    o_ctx, lse_ctx = jax.shard_map(
        shard, mesh=mesh, in_specs=(PartitionSpec(), spec, spec),
        out_specs=(PartitionSpec(), PartitionSpec()), check_vma=False,
    )(q_tail, k_ctx, v_ctx)
    o_self, lse_self = attn(q_tail, k_tail, v_tail, causal=True, segment_ids=None)
    out, _ = merge_partials([(o_ctx, lse_ctx), (o_self.astype(jnp.float32), lse_self)])
    return out.astype(q_tail.dtype)


def _attention_core(q, k, v, method, *, mesh, axis, anchor_len, passing_len, query_len,
                    query_offset, scorer, retaining_head, sm_scale, pool_size, impl,
                    attention_impl, layer=None):
    """Shared body of :func:`apb_attention` and :func:`star_attention`: validate the inputs and
    the setting, lay the input out, run the hosts, put the outputs back in input order."""
    impl, keyword = _impl_argument(impl, attention_impl, stacklevel=4)
    attend = apb_local_attention(impl, keyword=keyword)
    check_qkv(q, k, v)
    layout = make_method_layout(method, q.shape[1], hosts=axis_size(mesh, axis),
                                anchor_len=anchor_len, passing_len=passing_len,
                                query_len=query_len, query_offset=query_offset)
    idx = jnp.asarray(np.maximum(layout.source_index(), 0))
    seq_sharding = NamedSharding(mesh, PartitionSpec(None, axis))
    qe, ke, ve = (lax.with_sharding_constraint(jnp.take(x, idx, axis=1), seq_sharding)
                  for x in (q, k, v))
    out_e = apb_layer_attention(
        qe, ke, ve, mesh=mesh, layout=layout, axis=axis, scorer=scorer,
        retaining_head=retaining_head, sm_scale=sm_scale, pool_size=pool_size, impl=attend,
        layer=layer,
    )
    out = jnp.take(out_e, jnp.asarray(layout.local_rows()), axis=1)
    if layout.query_len == 0:
        return out
    c = layout.context_len
    scale = q.shape[-1] ** -0.5 if sm_scale is None else float(sm_scale)
    out_q = _tail_attention(q[:, c:], ke, ve, k[:, c:], v[:, c:], mesh=mesh, layout=layout,
                            axis=axis, sm_scale=scale, attend=attend)
    return jnp.concatenate([out, out_q.astype(out.dtype)], axis=1)


def apb_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    mesh: Mesh,
    axis: str = "sequence",
    anchor_len: int | None = None,
    passing_len: int | None = None,
    scorer: str | Scorer = "query",
    query_len: int = 0,
    query_offset: int = 0,
    retaining_head: Any = None,
    sm_scale: float | None = None,
    pool_size: int = 5,
    impl: str | LocalAttention = "blockwise",
    layer: int | None = None,
    attention_impl: str | LocalAttention | None = None,
) -> jax.Array:
    """APB attention on a global sequence-sharded input, outputs in input order.

    Args:
      q: ``[batch, seq, q_heads, qk_dim]`` (after RoPE), k ``[batch, seq, kv_heads, qk_dim]``,
        v ``[batch, seq, kv_heads, v_dim]``. The last ``query_len`` positions are the query.
      mesh, axis: the hosts are the devices along ``mesh[axis]``.
      anchor_len, passing_len: default ``block_len // 4`` and ``block_len // 8`` with
        ``block_len = ceil((seq - query_len) / hosts)``; each must be <= block_len.
      scorer: ``"query"`` (training-free, needs ``query_len > 0``), ``"retaining"`` (with
        ``retaining_head=``), or ``fn(q_local, k_local, v_local, *, query) -> [b, block,
        kv_heads]``.
      query_offset: where the query is embedded in the anchor.
      impl: the local (o, lse) attention: ``"blockwise"`` (default), ``"reference"``,
        ``"pallas"``, ``"auto"`` or a callable ``(q, k, v, *, causal, segment_ids, sm_scale) ->
        (o, lse)`` (:func:`apb_local_attention`).
      layer: the layer index for a per-layer scorer (:class:`RetainingHeads`).
      attention_impl: deprecated name of ``impl``.

    Returns ``[batch, seq, q_heads, v_dim]``. Context rows get APB's approximation (exact on
    host 0); query rows attend exactly to the whole context and causally to the query."""
    return _attention_core(q, k, v, "apb", mesh=mesh, axis=axis, anchor_len=anchor_len,
                           passing_len=passing_len, query_len=query_len,
                           query_offset=query_offset, scorer=scorer,
                           retaining_head=retaining_head, sm_scale=sm_scale,
                           pool_size=pool_size, impl=impl, attention_impl=attention_impl,
                           layer=layer)


def star_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    mesh: Mesh,
    axis: str = "sequence",
    anchor_len: int | None = None,
    query_len: int = 0,
    sm_scale: float | None = None,
    impl: str | LocalAttention = "blockwise",
    attention_impl: str | LocalAttention | None = None,
) -> jax.Array:
    """Star Attention (Acharya et al., 2024) on the APB code path: every host prepends the anchor
    (default: the whole first block) to its local block, nothing is passed and the query is not
    embedded; query rows (phase 2) attend exactly to every host's KV. Shapes as
    :func:`apb_attention` (``attention_impl``: deprecated name of ``impl``)."""
    return _attention_core(q, k, v, "star", mesh=mesh, axis=axis, anchor_len=anchor_len,
                           passing_len=None, query_len=query_len, query_offset=0, scorer=None,
                           retaining_head=None, sm_scale=sm_scale, pool_size=1, impl=impl,
                           attention_impl=attention_impl)


def apb_backend(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    mesh: Mesh,
    layout: APBLayout,
    causal: bool = True,
    segment_ids: jax.Array | None = None,
    kv_segment_ids: jax.Array | None = None,
    sm_scale: float | None = None,
    axis: str = "sequence",
    scorer: str | Scorer = "query",
    retaining_head: Any = None,
    pool_size: int = 5,
    impl: str | LocalAttention = "blockwise",
    layer: int | None = None,
    attention_impl: str | LocalAttention | None = None,
    **_: Any,
) -> jax.Array:
    """``cpmjax.ops`` adapter (``register_attention_backend("apb", apb_backend)``): the model
    runs the expanded layout of ``layout`` (tokens ``source_index``, ``positions``,
    ``cache_slots``) inside ``attention_backend("apb", mesh=..., layout=...)``; the model's
    ``layer=`` picks the layer's head of a per-layer scorer (:class:`RetainingHeads`)."""
    if not causal:
        raise ConfigError("the 'apb' attention backend is causal-only (got causal=False)")
    if segment_ids is not None or kv_segment_ids is not None:
        raise ConfigError("the 'apb' attention backend does not take segment_ids (packed input)")
    return apb_layer_attention(q, k, v, mesh=mesh, layout=layout, axis=axis, scorer=scorer,
                               retaining_head=retaining_head, sm_scale=sm_scale,
                               pool_size=pool_size, impl=impl, attention_impl=attention_impl,
                               layer=layer)
