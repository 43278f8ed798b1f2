"""APB: distributed long-context prefill that passes compressed context blocks between hosts.

The long input is split along the sequence axis of a mesh ("hosts" = the devices of that axis).
Following the APB paper (Huang et al., 2025, "APB: Accelerating Distributed Long-Context
Inference by Passing Compressed Context Blocks across GPUs"), every host ``h`` holds

- the **anchor block**: the first ``anchor_len`` tokens of the context with the query embedded
  (query tokens placed at ``query_offset`` and taking the positions of the tokens they
  displace); identical on every host, its outputs and KV are dropped after prefill;
- its **local block**: context tokens ``[h * block_len, (h + 1) * block_len)``.

Per layer, a **compressor** scores every local KV entry per KV head (the query-aware scorer, or
a trained retaining head), smooths the scores with a max-pool along the sequence, never selects
anchor tokens or padding, and keeps the top ``passing_len`` entries per KV head: the host's
**passing block** (keys taken after RoPE, so they keep their original positions). Passing
blocks are exchanged with one ``all_gather`` over the mesh axis. Then

- anchor queries attend causally to the anchor only;
- local queries attend to the whole anchor (hosts > 0), to the passing blocks of the hosts
  *before* them, and causally to their own local block.

The passing block is used for this attention only and never cached. The query tokens (the last
``query_len`` tokens of the input) are not part of the context split: like Star Attention's
phase 2 they attend exactly to every host's local KV (merged with log-sum-exp) and causally to
themselves.

Two entry points share one per-host kernel (:func:`_apb_shard`):

- :func:`apb_attention`: the attention core on a plain global ``[batch, seq, heads, dim]``
  input; returns the outputs of every input position in input order.
- :func:`apb_layer_attention`: the model path. The input is already in the *expanded layout*
  that :class:`APBLayout` describes (per host ``[anchor rows; local rows]``, so anchor hidden
  states are computed on every host, as in APB); returns the same layout. This is the
  ``"apb"`` backend of ``cpmjax.ops.attention`` (adapter: :func:`apb_backend`).

Baselines in the same code path: :func:`star_attention` (anchor = the first block, nothing
passed, query not embedded). Limits (tested): ``anchor_len=0`` with ``passing_len=block_len``
is exact causal attention; one host is full attention.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from sharding.errors import ConfigError, ShapeMismatchError, ShardingError

__all__ = [
    "APBLayout",
    "RetainingHead",
    "RetainingHeads",
    "apb_attention",
    "apb_backend",
    "apb_layer_attention",
    "apb_reference",
    "compress_block",
    "make_apb_layout",
    "make_method_layout",
    "merge_partials",
    "query_aware_scores",
    "star_attention",
]

# (q, k, v, *, causal, segment_ids, sm_scale) -> (o [b, q, hq, dv], lse [b, hq, q] float32)
LocalAttention = Callable[..., tuple[jax.Array, jax.Array]]
# (q_local, k_local, v_local, *, query) -> scores [b, block, kv_heads]; query may be None
Scorer = Callable[..., jax.Array]


# ----------------------------------------------------------------------------- layout


@dataclasses.dataclass(frozen=True)
class APBLayout:
    """Static description of how a sequence of ``seq_len`` tokens is laid out across hosts.

    ``context_len = seq_len - query_len`` tokens are split into ``hosts`` blocks of
    ``block_len`` (the last ones padded). The *expanded layout* has ``hosts * (anchor_len +
    block_len)`` rows: per host, ``anchor_len`` anchor rows then ``block_len`` local rows.
    With ``embed_query`` the query tokens (the last ``query_len`` of the input) sit in the
    anchor at ``[query_offset, query_offset + query_len)``."""

    seq_len: int
    hosts: int
    block_len: int
    anchor_len: int
    passing_len: int
    query_len: int = 0
    query_offset: int = 0
    embed_query: bool = True

    @property
    def context_len(self) -> int:
        return self.seq_len - self.query_len

    @property
    def host_len(self) -> int:
        """Rows per host in the expanded layout."""
        return self.anchor_len + self.block_len

    @property
    def expanded_len(self) -> int:
        return self.hosts * self.host_len

    @property
    def query_embedded(self) -> bool:
        return self.embed_query and self.query_len > 0 and self.anchor_len > 0

    def anchor_source(self) -> np.ndarray:
        """``[anchor_len]`` input index of every anchor row (query tokens embedded)."""
        a, q, off = self.anchor_len, self.query_len, self.query_offset
        if not self.query_embedded:
            return np.arange(a)
        return np.concatenate([
            np.arange(off), self.context_len + np.arange(q), np.arange(off, a - q),
        ]).astype(np.int64)

    def source_index(self) -> np.ndarray:
        """``[expanded_len]`` input index of every expanded row; ``-1`` marks padding."""
        rows = []
        anchor = self.anchor_source()
        for h in range(self.hosts):
            local = h * self.block_len + np.arange(self.block_len)
            rows += [anchor, np.where(local < self.context_len, local, -1)]
        return np.concatenate(rows).astype(np.int32)

    def positions(self) -> np.ndarray:
        """``[expanded_len]`` RoPE position of every expanded row: anchor rows ``0..anchor_len-1``
        (embedded query tokens take the positions of the tokens they displace), local rows
        their input position (padding continues the count; it is masked everywhere)."""
        rows = []
        for h in range(self.hosts):
            rows += [np.arange(self.anchor_len), h * self.block_len + np.arange(self.block_len)]
        return np.concatenate(rows).astype(np.int32)

    def local_rows(self) -> np.ndarray:
        """``[context_len]`` expanded row of every context token, in input order."""
        t = np.arange(self.context_len)
        return ((t // self.block_len) * self.host_len + self.anchor_len
                + t % self.block_len).astype(np.int32)

    def cache_slots(self, cache_len: int) -> np.ndarray:
        """``[expanded_len]`` KV-cache slot for every expanded row: local rows go to their input
        position, anchor and padding rows to ``cache_len`` (dropped by an out-of-range write)."""
        src = self.source_index()
        slots = np.full(self.expanded_len, cache_len, np.int32)
        local = np.zeros(self.expanded_len, bool)
        for h in range(self.hosts):
            start = h * self.host_len + self.anchor_len
            local[start : start + self.block_len] = True
        keep = local & (src >= 0)
        slots[keep] = src[keep]
        return slots


def make_apb_layout(
    seq_len: int,
    *,
    hosts: int,
    anchor_len: int | None = None,
    passing_len: int | None = None,
    query_len: int = 0,
    query_offset: int = 0,
    embed_query: bool = True,
    block_multiple: int = 1,
) -> APBLayout:
    """Validate an APB setting and return its :class:`APBLayout`.

    ``block_len = ceil(context_len / hosts)`` rounded up to ``block_multiple``; the last blocks
    are padded. Defaults (the paper's on 8 hosts): ``anchor_len = block_len // 4``,
    ``passing_len = block_len // 8``. Raises ``ShardingError`` / ``ConfigError`` naming the
    offending value."""
    for name, value in (("seq_len", seq_len), ("hosts", hosts), ("query_len", query_len),
                        ("query_offset", query_offset), ("block_multiple", block_multiple)):
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool):
            raise ConfigError(f"{name} must be an int, got {value!r}")
    if hosts < 1:
        raise ShardingError(f"hosts (the size of the sequence mesh axis) must be >= 1, got {hosts}")
    if block_multiple < 1:
        raise ConfigError(f"block_multiple must be >= 1, got {block_multiple}")
    if query_len < 0 or query_len >= seq_len:
        raise ConfigError(
            f"query_len={query_len} must be in [0, seq_len) with seq_len={seq_len}: the context "
            "(input minus query) must not be empty"
        )
    context_len = seq_len - query_len
    if context_len < hosts:
        raise ShardingError(
            f"the context of {context_len} tokens (seq_len={seq_len} - query_len={query_len}) "
            f"cannot be split across hosts={hosts}: every host needs at least one token"
        )
    block_len = -(-context_len // hosts)
    block_len = -(-block_len // block_multiple) * block_multiple
    anchor_len = block_len // 4 if anchor_len is None else anchor_len
    passing_len = block_len // 8 if passing_len is None else passing_len
    for name, value in (("anchor_len", anchor_len), ("passing_len", passing_len)):
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool):
            raise ConfigError(f"{name} must be an int, got {value!r}")
        if value < 0:
            raise ConfigError(f"{name} must be >= 0, got {value}")
        if value > block_len:
            raise ShardingError(
                f"{name}={value} is longer than a block: {context_len} context tokens over "
                f"{hosts} hosts give block_len={block_len}"
            )
    if query_offset < 0:
        raise ConfigError(f"query_offset must be >= 0, got {query_offset}")
    if embed_query and query_len > 0 and anchor_len > 0 and query_offset + query_len > anchor_len:
        raise ConfigError(
            f"query_len={query_len} at query_offset={query_offset} does not fit in the anchor "
            f"(anchor_len={anchor_len}); raise anchor_len or shorten the query"
        )
    return APBLayout(
        seq_len=int(seq_len), hosts=int(hosts), block_len=int(block_len),
        anchor_len=int(anchor_len), passing_len=int(passing_len), query_len=int(query_len),
        query_offset=int(query_offset), embed_query=bool(embed_query),
    )


def make_method_layout(
    method: str,
    seq_len: int,
    *,
    hosts: int,
    anchor_len: int | None = None,
    passing_len: int | None = None,
    query_len: int = 0,
    query_offset: int = 0,
) -> APBLayout:
    """The validated layout of a distributed prefill ``method``: ``"apb"`` (defaults as
    :func:`make_apb_layout`, query embedded in the anchor) or ``"star"`` (Star Attention: anchor
    = the first block unless ``anchor_len`` is given, nothing passed, query not embedded;
    ``passing_len`` must be None or 0). Raises ``ConfigError`` for another method."""
    if method == "apb":
        return make_apb_layout(seq_len, hosts=hosts, anchor_len=anchor_len,
                               passing_len=passing_len, query_len=query_len,
                               query_offset=query_offset)
    if method == "star":
        if passing_len:
            raise ConfigError(f"Star Attention passes nothing; got passing_len={passing_len}")
        if anchor_len is None:
            anchor_len = make_apb_layout(seq_len, hosts=hosts, anchor_len=0, passing_len=0,
                                         query_len=query_len, embed_query=False).block_len
        return make_apb_layout(seq_len, hosts=hosts, anchor_len=anchor_len, passing_len=0,
                               query_len=query_len, embed_query=False)
    raise ConfigError(f"method={method!r} is not 'apb' or 'star'")


# ----------------------------------------------------------------------------- local attention


def _jnp_attention(q, k, v, *, causal, segment_ids, sm_scale):
    """Local (o, lse) with materialised scores (exact, small shapes)."""
    from pallas_kernels import attention_reference

    return attention_reference(q, k, v, causal=causal, segment_ids=segment_ids,
                               sm_scale=sm_scale, return_lse=True)


def _blockwise(q, k, v, *, causal, segment_ids, sm_scale, block: int = 512):
    from pallas_kernels import blockwise_attention

    block = max(1, min(block, k.shape[1]))
    return blockwise_attention(q, k, v, causal=causal, segment_ids=segment_ids,
                               sm_scale=sm_scale, block_k=block, block_q=block, return_lse=True)


def _pallas(q, k, v, *, causal, segment_ids, sm_scale):
    from pallas_kernels import flash_attention

    return flash_attention(q, k, v, causal=causal, segment_ids=segment_ids, sm_scale=sm_scale,
                           return_lse=True)


_LOCAL_ATTENTION: dict[str, LocalAttention] = {
    "reference": _jnp_attention,
    "blockwise": _blockwise,
    "pallas": _pallas,
}


def _local_attention(impl: str | LocalAttention) -> LocalAttention:
    if callable(impl):
        return impl
    if impl not in _LOCAL_ATTENTION:
        raise ConfigError(
            f"attention_impl={impl!r} is not one of {sorted(_LOCAL_ATTENTION)} or a callable"
        )
    return _LOCAL_ATTENTION[impl]


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


# ----------------------------------------------------------------------------- compressor


def query_aware_scores(q: jax.Array, k: jax.Array, v: jax.Array, *, query: jax.Array | None,
                       key_valid: jax.Array | None = None,
                       sm_scale: float | None = None) -> jax.Array:
    """Training-free importance of every local KV entry: the attention probability the embedded
    query gives it, summed over the query tokens and the query heads of each KV head.

    k ``[b, block, kv_heads, d]``, query ``[b, query_len, q_heads, d]``; ``key_valid [block]``
    restricts the softmax to real keys. Returns ``[b, block, kv_heads]`` float32."""
    del q, v
    if query is None:
        raise ConfigError("scorer='query' needs the embedded query (query_len > 0)")
    b, block, kv_heads, dim = k.shape
    groups = query.shape[2] // kv_heads
    scale = dim**-0.5 if sm_scale is None else sm_scale
    qg = query.reshape(b, query.shape[1], kv_heads, groups, dim)
    logits = jnp.einsum("bthgd,bkhd->bhgtk", qg, k, preferred_element_type=jnp.float32) * scale
    if key_valid is not None:
        logits = jnp.where(key_valid, logits, -jnp.inf)
    probs = jax.nn.softmax(logits, axis=-1)
    if key_valid is not None:
        probs = jnp.where(key_valid, probs, 0.0)
    return jnp.einsum("bhgtk->bkh", probs)


def _max_pool(scores: jax.Array, size: int) -> jax.Array:
    """Max-pool ``[b, seq, h]`` along seq with a centred window of ``size`` (stride 1, same
    length, -inf padding)."""
    if size <= 1:
        return scores
    return lax.reduce_window(scores, -jnp.inf, lax.max, (1, size, 1), (1, 1, 1),
                             [(0, 0), ((size - 1) // 2, size // 2), (0, 0)])


def compress_block(k: jax.Array, v: jax.Array, scores: jax.Array, candidate: jax.Array,
                   passing_len: int, pool_size: int = 5
                   ) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """Select the passing block: top-``passing_len`` entries per KV head.

    k ``[b, block, kv_heads, dk]``, v ``[b, block, kv_heads, dv]``, scores ``[b, block,
    kv_heads]``, candidate ``[block]`` bool (False: anchor tokens, padding: never selected).
    Scores are max-pooled along the sequence (window ``pool_size``) first. Returns
    ``(k_sel [b, passing_len, kv_heads, dk], v_sel, indices [b, passing_len, kv_heads],
    n_valid)``: entries are in descending score order, and only the first ``n_valid`` (the
    number of candidates, the same for every head) are real."""
    scores = scores.astype(jnp.float32)
    scores = jnp.where(jnp.isnan(scores), -1e30, jnp.clip(scores, -1e30, 1e30))
    cand = candidate[None, :, None]
    scores = jnp.where(cand, scores, -jnp.inf)
    scores = jnp.where(cand, _max_pool(scores, pool_size), -jnp.inf)
    _, idx = lax.top_k(jnp.swapaxes(scores, 1, 2), passing_len)  # [b, h, passing_len]
    idx = jnp.swapaxes(idx, 1, 2)  # [b, passing_len, h]
    k_sel = jnp.take_along_axis(k, idx[..., None], axis=1)
    v_sel = jnp.take_along_axis(v, idx[..., None], axis=1)
    return k_sel, v_sel, idx, jnp.sum(candidate.astype(jnp.int32))


class RetainingHead:
    """Retaining head of one layer (as in Locret / APB): an MLP over ``concat[q; k; v]`` of every
    token giving one importance score per KV head.

    Parameters are plain arrays so the head works inside ``jit``/``shard_map`` without any
    module machinery: ``w1 [(q_heads + 2 kv_heads) * head_dim, hidden]``, ``w2 [hidden,
    kv_heads]``. Call: ``head(q [b, s, hq, d], k [b, s, hkv, d], v [b, s, hkv, dv]) -> [b, s,
    hkv]`` float32."""

    def __init__(self, w1: jax.Array, w2: jax.Array):
        self.w1, self.w2 = w1, w2

    @staticmethod
    def init(key: jax.Array, q_heads: int, kv_heads: int, head_dim: int, hidden: int = 256,
             v_dim: int | None = None) -> RetainingHead:
        v_dim = head_dim if v_dim is None else v_dim
        fan_in = (q_heads + kv_heads) * head_dim + kv_heads * v_dim
        k1, k2 = jax.random.split(key)
        w1 = jax.random.normal(k1, (fan_in, hidden), jnp.float32) * fan_in**-0.5
        w2 = jax.random.normal(k2, (hidden, kv_heads), jnp.float32) * hidden**-0.5
        return RetainingHead(w1, w2)

    def params(self) -> dict[str, jax.Array]:
        return {"w1": self.w1, "w2": self.w2}

    @staticmethod
    def apply(params: dict[str, jax.Array], q: jax.Array, k: jax.Array, v: jax.Array
              ) -> jax.Array:
        b, s = q.shape[:2]
        x = jnp.concatenate([q.reshape(b, s, -1), k.reshape(b, s, -1), v.reshape(b, s, -1)],
                            axis=-1).astype(jnp.float32)
        return jax.nn.silu(x @ params["w1"]) @ params["w2"]

    def __call__(self, q: jax.Array, k: jax.Array, v: jax.Array, *, query: Any = None,
                 **_: Any) -> jax.Array:
        return self.apply(self.params(), q, k, v)


class RetainingHeads:
    """One :class:`RetainingHead` per layer, usable as the ``scorer`` of the ``"apb"`` ops
    backend: the attention seam does not know its layer, so each call (at trace time) takes the
    next layer's head, cycling. Call :meth:`reset` before tracing a forward pass (the cpmjax
    model calls attention once per layer, in order)."""

    def __init__(self, heads: list[RetainingHead]):
        if not heads:
            raise ConfigError("RetainingHeads needs at least one layer head")
        self.heads = list(heads)
        self._next = 0

    def reset(self) -> None:
        self._next = 0

    def __len__(self) -> int:
        return len(self.heads)

    def __call__(self, q, k, v, *, query=None, **_):
        head = self.heads[self._next % len(self.heads)]
        self._next += 1
        return head(q, k, v)

    def save(self, path: str) -> None:
        arrays = {}
        for i, h in enumerate(self.heads):
            arrays[f"layer{i}.w1"] = np.asarray(h.w1)
            arrays[f"layer{i}.w2"] = np.asarray(h.w2)
        np.savez(path, **arrays)

    @staticmethod
    def load(path: str) -> RetainingHeads:
        data = np.load(path)
        n = len({key.split(".")[0] for key in data.files})
        return RetainingHeads([
            RetainingHead(jnp.asarray(data[f"layer{i}.w1"]), jnp.asarray(data[f"layer{i}.w2"]))
            for i in range(n)
        ])


def _resolve_scorer(scorer: Any, retaining_head: Any, layout: APBLayout) -> Scorer | None:
    if layout.passing_len == 0 or layout.hosts == 1:
        return None  # nothing is passed: no scoring
    if isinstance(scorer, str):
        if scorer == "query":
            if not layout.query_embedded:
                raise ConfigError(
                    "scorer='query' needs the query embedded in the anchor: query_len > 0 and "
                    f"anchor_len > 0 (got query_len={layout.query_len}, "
                    f"anchor_len={layout.anchor_len}); use scorer='retaining' or a callable"
                )
            return "query"  # type: ignore[return-value]
        if scorer == "retaining":
            if retaining_head is None:
                raise ConfigError("scorer='retaining' needs retaining_head= (a RetainingHead)")
            return retaining_head
        raise ConfigError(f"scorer={scorer!r} is not 'query', 'retaining' or a callable")
    if callable(scorer):
        return scorer
    raise ConfigError(f"scorer={scorer!r} is not 'query', 'retaining' or a callable")


# ----------------------------------------------------------------------------- per-host kernel


def _segments(batch: int, q_len: int, kv_keep: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Segment ids that keep exactly the keys where ``kv_keep [kv_len]`` is True."""
    q_seg = jnp.zeros((batch, q_len), jnp.int32)
    kv_seg = jnp.broadcast_to(jnp.where(kv_keep, 0, 1).astype(jnp.int32), (batch,) + kv_keep.shape)
    return q_seg, kv_seg


def _remote_branches(layout: APBLayout) -> tuple[np.ndarray, list[tuple[bool, int]]]:
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
               attend: LocalAttention, pool_size: int):
    """One host's APB attention on its expanded rows ``[b, anchor_len + block_len, h, d]``.

    The keys outside the local block (anchor, passing blocks of earlier hosts) differ in number
    from host to host; a ``lax.switch`` on the host index runs one attention over exactly the
    keys the host may see (no work on masked passing blocks of later hosts, none on the anchor
    on host 0). Under ``cost_analysis`` a switch counts its most expensive branch: the last
    host's, the critical path."""
    a, blk, ctx = layout.anchor_len, layout.block_len, layout.context_len
    hosts, passing = layout.hosts, layout.passing_len
    host = lax.axis_index(axis) if hosts > 1 else jnp.int32(0)
    b = q.shape[0]
    qa, ka, va = q[:, :a], k[:, :a], v[:, :a]
    ql, kl, vl = q[:, a:], k[:, a:], v[:, a:]
    gidx = host * blk + jnp.arange(blk)
    valid = gidx < ctx
    attn = functools.partial(attend, sm_scale=sm_scale)

    parts = [attn(ql, kl, vl, causal=True, segment_ids=_segments(b, blk, valid))]
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
        k_all = lax.all_gather(k_sel, axis)[: hosts - 1]  # [P-1, b, passing, hkv, d]
        v_all = lax.all_gather(v_sel, axis)[: hosts - 1]
        kp = jnp.moveaxis(k_all, 0, 1).reshape(b, (hosts - 1) * passing, *k_sel.shape[2:])
        vp = jnp.moveaxis(v_all, 0, 1).reshape(b, (hosts - 1) * passing, *v_sel.shape[2:])
        # a source block with fewer candidates than passing_len has unreal trailing slots
        src = np.repeat(np.arange(hosts - 1), passing)
        slot = np.tile(np.arange(passing), hosts - 1)
        real = np.minimum(ctx, (src + 1) * blk) - np.maximum(a, src * blk)
        slot_real = jnp.asarray(slot < np.maximum(real, 0))
    branch_of_host, branches = _remote_branches(layout)
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
                o, lse = attn(ql, kk, vv, causal=False, segment_ids=_segments(b, blk, keys_ok))
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


def _check_qkv(q: jax.Array, k: jax.Array, v: jax.Array) -> None:
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


def _axis_size(mesh: Mesh, axis: str) -> int:
    if not isinstance(mesh, Mesh):
        raise ShardingError(f"mesh must be a jax.sharding.Mesh, got {type(mesh).__name__}")
    if axis not in mesh.shape:
        raise ShardingError(f"axis={axis!r} is not an axis of the mesh {dict(mesh.shape)}")
    return int(mesh.shape[axis])


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
    attention_impl: str | LocalAttention = "blockwise",
) -> jax.Array:
    """APB attention on the expanded layout (the model path; one call per layer).

    q ``[b, layout.expanded_len, hq, d]``, k ``[b, expanded_len, hkv, d]``, v ``[b,
    expanded_len, hkv, dv]``, sharded (or shardable) along the sequence over ``mesh[axis]``.
    Returns ``[b, expanded_len, hq, dv]`` in the same layout (anchor rows included: the next
    layer needs them; :meth:`APBLayout.local_rows` picks the context rows)."""
    _check_qkv(q, k, v)
    hosts = _axis_size(mesh, axis)
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
    resolved = _resolve_scorer(scorer, retaining_head, layout)
    scale = q.shape[-1] ** -0.5 if sm_scale is None else float(sm_scale)
    fn = functools.partial(_apb_shard, layout=layout, axis=axis, scorer=resolved,
                           sm_scale=scale, attend=_local_attention(attention_impl),
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
                      segment_ids=_segments(qt.shape[0], qt.shape[1], valid))
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
                    query_offset, scorer, retaining_head, sm_scale, pool_size, attention_impl):
    """Shared body of :func:`apb_attention` and :func:`star_attention`: validate the inputs and
    the setting, lay the input out, run the hosts, put the outputs back in input order."""
    _check_qkv(q, k, v)
    layout = make_method_layout(method, q.shape[1], hosts=_axis_size(mesh, axis),
                                anchor_len=anchor_len, passing_len=passing_len,
                                query_len=query_len, query_offset=query_offset)
    idx = jnp.asarray(np.maximum(layout.source_index(), 0))
    seq_sharding = NamedSharding(mesh, PartitionSpec(None, axis))
    qe, ke, ve = (lax.with_sharding_constraint(jnp.take(x, idx, axis=1), seq_sharding)
                  for x in (q, k, v))
    out_e = apb_layer_attention(
        qe, ke, ve, mesh=mesh, layout=layout, axis=axis, scorer=scorer,
        retaining_head=retaining_head, sm_scale=sm_scale, pool_size=pool_size,
        attention_impl=attention_impl,
    )
    out = jnp.take(out_e, jnp.asarray(layout.local_rows()), axis=1)
    if layout.query_len == 0:
        return out
    c = layout.context_len
    scale = q.shape[-1] ** -0.5 if sm_scale is None else float(sm_scale)
    out_q = _tail_attention(q[:, c:], ke, ve, k[:, c:], v[:, c:], mesh=mesh, layout=layout,
                            axis=axis, sm_scale=scale, attend=_local_attention(attention_impl))
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
    attention_impl: str | LocalAttention = "blockwise",
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
      attention_impl: local (o, lse) attention: ``"blockwise"``, ``"reference"``, ``"pallas"``
        or a callable ``(q, k, v, *, causal, segment_ids, sm_scale) -> (o, lse)``.

    Returns ``[batch, seq, q_heads, v_dim]``. Context rows get APB's approximation (exact on
    host 0); query rows attend exactly to the whole context and causally to the query."""
    return _attention_core(q, k, v, "apb", mesh=mesh, axis=axis, anchor_len=anchor_len,
                           passing_len=passing_len, query_len=query_len,
                           query_offset=query_offset, scorer=scorer,
                           retaining_head=retaining_head, sm_scale=sm_scale,
                           pool_size=pool_size, attention_impl=attention_impl)


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
    attention_impl: str | LocalAttention = "blockwise",
) -> jax.Array:
    """Star Attention (Acharya et al., 2024) on the APB code path: every host prepends the anchor
    (default: the whole first block) to its local block, nothing is passed and the query is not
    embedded; query rows (phase 2) attend exactly to every host's KV. Shapes as
    :func:`apb_attention`."""
    return _attention_core(q, k, v, "star", mesh=mesh, axis=axis, anchor_len=anchor_len,
                           passing_len=None, query_len=query_len, query_offset=0, scorer=None,
                           retaining_head=None, sm_scale=sm_scale, pool_size=1,
                           attention_impl=attention_impl)


# ----------------------------------------------------------------------------- reference


def apb_reference(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    hosts: int,
    anchor_len: int | None = None,
    passing_len: int | None = None,
    scorer: str | Scorer = "query",
    query_len: int = 0,
    query_offset: int = 0,
    retaining_head: Any = None,
    embed_query: bool = True,
    sm_scale: float | None = None,
    pool_size: int = 5,
) -> jax.Array:
    """Single-device APB with one explicit mask per host, written independently of the sharded
    path (numpy selection, materialised scores): the ground truth in tests. Same arguments and
    result as :func:`apb_attention` (``hosts`` replaces the mesh)."""
    _check_qkv(q, k, v)
    lay = make_apb_layout(q.shape[1], hosts=hosts, anchor_len=anchor_len,
                          passing_len=passing_len, query_len=query_len,
                          query_offset=query_offset, embed_query=embed_query)
    resolved = _resolve_scorer(scorer, retaining_head, lay)
    a, blk, c, pl = lay.anchor_len, lay.block_len, lay.context_len, lay.passing_len
    scale = q.shape[-1] ** -0.5 if sm_scale is None else sm_scale
    groups = q.shape[2] // k.shape[2]
    anchor = lay.anchor_source()
    qf, kf, vf = (np.asarray(x, np.float64) for x in (q, k, v))

    def attend(qr, kr, vr, mask):  # qr [b, n, hq, d], kr [b, m, hkv, d], mask [n, m]
        kr = np.repeat(kr, groups, axis=2)
        vr = np.repeat(vr, groups, axis=2)
        s = np.einsum("bqhd,bkhd->bhqk", qr, kr) * scale
        s = np.where(mask, s, -np.inf)
        mx = np.max(s, axis=-1, keepdims=True)
        mx = np.where(np.isfinite(mx), mx, 0.0)
        w = np.exp(s - mx)
        den = w.sum(-1, keepdims=True)
        p = w / np.where(den > 0, den, 1.0)
        return np.einsum("bhqk,bkhd->bqhd", p, vr)

    passing: list[tuple[np.ndarray, np.ndarray]] = []  # per host: selected (k, v) [b, n, hkv, d]
    out = np.zeros(q.shape[:3] + (v.shape[3],))
    for h in range(hosts):
        rows = np.arange(h * blk, min((h + 1) * blk, c))
        ql, kl, vl = qf[:, rows], kf[:, rows], vf[:, rows]
        n = len(rows)
        keys = [kl]
        vals = [vl]
        mask = [np.tril(np.ones((n, n), bool))]
        if a > 0 and h > 0:
            keys.append(kf[:, anchor])
            vals.append(vf[:, anchor])
            mask.append(np.ones((n, a), bool))
        for kp, vp in passing:
            keys.append(kp)
            vals.append(vp)
            mask.append(np.ones((n, kp.shape[1]), bool))
        if pl > 0 and hosts > 1 and h < hosts - 1:
            cand = rows >= a
            if resolved == "query":
                qq = q[:, anchor[query_offset : query_offset + query_len]]
                sc = np.asarray(query_aware_scores(None, k[:, rows], None, query=qq,
                                                   sm_scale=scale))
            else:
                emb = (q[:, anchor[query_offset : query_offset + query_len]]
                       if lay.query_embedded else None)
                sc = np.asarray(resolved(q[:, rows], k[:, rows], v[:, rows], query=emb))
            sc = np.where(cand[None, :, None], sc, -np.inf)
            pooled = np.full_like(sc, -np.inf)
            left, right = (pool_size - 1) // 2, pool_size // 2
            for i in range(n):
                pooled[:, i] = sc[:, max(0, i - left) : i + right + 1].max(axis=1)
            pooled = np.where(cand[None, :, None], pooled, -np.inf)
            take = min(pl, int(cand.sum()))
            sel_k = np.zeros((q.shape[0], take) + k.shape[2:])
            sel_v = np.zeros((q.shape[0], take) + v.shape[2:])
            for bi in range(q.shape[0]):
                for hi in range(k.shape[2]):
                    order = np.argsort(-pooled[bi, :, hi], kind="stable")[:take]
                    sel_k[bi, :, hi] = kl[bi, order, hi]
                    sel_v[bi, :, hi] = vl[bi, order, hi]
            passing.append((sel_k, sel_v))
        out[:, rows] = attend(ql, np.concatenate(keys, 1), np.concatenate(vals, 1),
                              np.concatenate(mask, 1))
    if query_len:
        out[:, c:] = attend(qf[:, c:], kf, vf, np.tril(np.ones((query_len, q.shape[1]), bool),
                                                       k=c))
    return jnp.asarray(out, q.dtype)


# ----------------------------------------------------------------------------- ops adapter


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
    attention_impl: str | LocalAttention = "blockwise",
    **_: Any,
) -> jax.Array:
    """``cpmjax.ops`` adapter (``register_attention_backend("apb", apb_backend)``): the model
    runs the expanded layout of ``layout`` (tokens ``source_index``, ``positions``,
    ``cache_slots``) inside ``attention_backend("apb", mesh=..., layout=...)``."""
    if not causal:
        raise ConfigError("the 'apb' attention backend is causal-only (got causal=False)")
    if segment_ids is not None or kv_segment_ids is not None:
        raise ConfigError("the 'apb' attention backend does not take segment_ids (packed input)")
    return apb_layer_attention(q, k, v, mesh=mesh, layout=layout, axis=axis, scorer=scorer,
                               retaining_head=retaining_head, sm_scale=sm_scale,
                               pool_size=pool_size, attention_impl=attention_impl)
