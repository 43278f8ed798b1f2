"""BurstAttention: exact sequence-parallel attention on ``jax.shard_map``.

The sequence dimension of q, k, v ``[batch, seq, heads, head_dim]`` is sharded over a mesh axis
(``G`` devices, ``L = seq / G`` tokens each, in the order of :mod:`sharding.layout`). Each
device keeps its query block; partial attentions are merged by an online softmax on float32
log-sum-exps, so the result equals full attention.

Ring schedules (``schedule=``), all exact and differentiable:

- ``"burst"``: forward moves K, V round the ring; the backward keeps K, V, dK, dV on their
  device and moves Q, dO, D = rowsum(dO * O), lse round the ring, with the dQ accumulator
  travelling with its Q block back to its owner (BurstAttention's backward).
- ``"ring"``: RingAttention: forward as burst; backward moves K, V and the dK, dV accumulators.
- ``"allgather"``: all-gather K, V (backward: reduce-scatter of dK, dV through autodiff).
- ``"auto"``: burst or ring, whichever moves fewer bytes for these shapes
  (:func:`communication_bytes`); with grouped-query attention Ring's backward moves
  ``4 * kv_heads * d`` per token against Burst's ``3 * q_heads * d``, so Ring wins once
  ``q_heads / kv_heads`` is large enough. The choice is logged at debug level.

With ``inner_axis`` the ring is a double ring: the sequence is sharded over
``(axis, inner_axis)``; blocks circulate round the fast inner ring and move to the next node
(outer ring) once per inner round, that transfer overlapping the whole inner round.

Communication overlaps computation: each step issues the ``ppermute`` of the next block before
the attention on the current one. The forward ring and the backward ring are tied together by a
``jax.custom_vjp``; the forward saves only ``o`` and ``lse`` (tagged with
:data:`BURST_OUT` / :data:`BURST_LSE` for :func:`remat_policy`).

The per-block attention (local attention optimisation) is chosen with ``impl=``, the library's
implementation vocabulary (:data:`pallas_kernels.IMPLS`): ``"auto"`` (the blockwise flash
attention of :mod:`pallas_kernels` on CPU, the Pallas kernel on GPU/TPU), ``"reference"``,
``"blockwise"`` (``block_k=512``), ``"pallas"``, or a callable ``(q, k, v, *, causal, q_offset,
sm_scale, segment_ids) -> (o, lse)`` (:func:`pallas_kernels.local_attention`).

Deprecated (one release): ``impl="burst" | "ring" | "allgather"`` (the schedule's old keyword;
the values are disjoint from the local-attention names, so they are resolved by value) and
``local_attention=`` (now ``impl=``); both emit a ``DeprecationWarning`` and still work.

:func:`burst_forward_shard` is the forward each device runs inside ``shard_map``; with a
:class:`OneHostRing` it runs one device's work alone (the blocks it would receive given as
arrays), for timing one host's critical path.
"""

from __future__ import annotations

import functools
import logging
import re
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.ad_checkpoint import checkpoint_name
from jax.sharding import Mesh, PartitionSpec

from pallas_kernels import IMPLS as LOCAL_IMPLS
from pallas_kernels import local_attention, local_attention_fn
from sharding.errors import ConfigError, ShapeMismatchError, ShardingError
from sharding.layout import check_layout, layout_indices

logger = logging.getLogger(__name__)

SCHEDULES = ("auto", "burst", "ring", "allgather")
IMPLS = SCHEDULES  # the old name of SCHEDULES (the ring schedule was chosen with impl=)
BURST_OUT = "burst_out"
BURST_LSE = "burst_lse"

LocalAttention = Callable[..., tuple[jax.Array, jax.Array]]

__all__ = [
    "BURST_LSE",
    "BURST_OUT",
    "SCHEDULES",
    "OneHostRing",
    "Ring",
    "burst_attention",
    "burst_forward_shard",
    "choose_impl",
    "choose_schedule",
    "collective_bytes_from_hlo",
    "communication_bytes",
    "default_local_attention",
    "hlo_computation_weights",
    "ops_backend",
    "reference_local_attention",
    "remat_policy",
]


# ----------------------------------------------------------------------------- local attention


def reference_local_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    causal: bool,
    q_offset: int | jax.Array = 0,
    sm_scale: float,
    segment_ids: tuple[jax.Array, jax.Array] | None = None,
) -> tuple[jax.Array, jax.Array]:
    """``pallas_kernels.local_attention(impl="reference")``: exact attention of one block with
    materialised scores. q ``[b, lq, hq, dk]``, k ``[b, lk, hkv, dk]``, v ``[b, lk, hkv, dv]``;
    returns ``o [b, lq, hq, dv]`` and ``lse [b, hq, lq]`` float32 (a row that sees no key: 0 and
    -inf)."""
    return local_attention(q, k, v, causal=causal, q_offset=q_offset, sm_scale=sm_scale,
                           segment_ids=segment_ids, impl="reference")


def blockwise_local_attention(q, k, v, *, causal, q_offset=0, sm_scale, segment_ids=None,
                              block_k: int = 512):
    """``pallas_kernels.local_attention(impl="blockwise", block_k=512)``."""
    return local_attention(q, k, v, causal=causal, q_offset=q_offset, sm_scale=sm_scale,
                           segment_ids=segment_ids, impl="blockwise", block_k=block_k)


def pallas_local_attention(q, k, v, *, causal, q_offset=0, sm_scale, segment_ids=None):
    """``pallas_kernels.local_attention(impl="pallas")``."""
    return local_attention(q, k, v, causal=causal, q_offset=q_offset, sm_scale=sm_scale,
                           segment_ids=segment_ids, impl="pallas")


def default_local_attention() -> LocalAttention:
    """``impl="auto"``: the blockwise flash attention on CPU, the Pallas kernel on GPU/TPU."""
    return local_attention_fn("auto")


def resolve_local_attention(impl: str | LocalAttention) -> LocalAttention:
    """The local attention ``impl`` names (``pallas_kernels.IMPLS``) or ``impl`` itself when
    callable. Raises ``ConfigError`` naming it otherwise."""
    if callable(impl):
        return impl
    if impl not in LOCAL_IMPLS and impl != "xla":
        raise ConfigError(
            f"unknown burst impl {impl!r}: impl= is the local attention, one of {LOCAL_IMPLS} "
            f"or a callable; the ring schedule is schedule=, one of {SCHEDULES}")
    return local_attention_fn(impl)


# ----------------------------------------------------------------------------- block backward


def _block_backward(q, k, v, do, lse, delta, *, causal, q_offset, sm_scale, segment_ids,
                    block_k):
    """Gradients of one block pair given the *global* ``lse`` and ``delta`` ``[b, hq, lq]``.

    q ``[b, lq, hq, dk]``, k ``[b, lk, hkv, dk]``, v ``[b, lk, hkv, dv]``, do ``[b, lq, hq, dv]``.
    Returns float32 ``dq [b, lq, hq, dk]``, ``dk [b, lk, hkv, dk]``, ``dv [b, lk, hkv, dv]``.
    Scans over key chunks of ``block_k`` so memory is O(lq * block_k)."""
    b, lq, hq, dkd = q.shape
    lk, hkv, dvd = k.shape[1], k.shape[2], v.shape[3]
    g = hq // hkv
    qg = q.reshape(b, lq, hkv, g, dkd)
    dog = do.reshape(b, lq, hkv, g, dvd)
    finite = jnp.isfinite(lse)
    lse_g = jnp.where(finite, lse, 0.0).reshape(b, hkv, g, lq)[..., None]
    delta_g = jnp.where(finite, delta, 0.0).reshape(b, hkv, g, lq)[..., None]
    q_seg, kv_seg = segment_ids if segment_ids is not None else (None, None)
    bk = max(1, min(block_k, lk))
    nk = -(-lk // bk)
    pad = nk * bk - lk

    def padded(x, value=0):
        if not pad:
            return x
        widths = [(0, 0)] * x.ndim
        widths[1] = (0, pad)
        return jnp.pad(x, widths, constant_values=value)

    kc = padded(k).reshape(b, nk, bk, hkv, dkd).swapaxes(0, 1)
    vc = padded(v).reshape(b, nk, bk, hkv, dvd).swapaxes(0, 1)
    segc = None if kv_seg is None else padded(kv_seg, -2).reshape(b, nk, bk).swapaxes(0, 1)
    q_pos = jnp.arange(lq)[:, None] + jnp.asarray(q_offset, jnp.int32)

    def chunk(dq, xs):
        ci, k_c, v_c, seg_c = xs
        k_pos = ci * bk + jnp.arange(bk)[None, :]
        mask = k_pos < lk
        if causal:
            mask = mask & (k_pos <= q_pos)
        mask = mask[None, None, None]
        if seg_c is not None:
            mask = mask & (q_seg[:, :, None] == seg_c[:, None, :])[:, None, None]
        s = jnp.einsum("bqhgd,bkhd->bhgqk", qg, k_c, preferred_element_type=jnp.float32)
        p = jnp.where(mask, jnp.exp(s * sm_scale - lse_g), 0.0)
        dv_c = jnp.einsum("bhgqk,bqhgd->bkhd", p.astype(do.dtype), dog,
                          preferred_element_type=jnp.float32)
        dp = jnp.einsum("bqhgd,bkhd->bhgqk", dog, v_c, preferred_element_type=jnp.float32)
        ds = p * (dp - delta_g) * sm_scale
        dk_c = jnp.einsum("bhgqk,bqhgd->bkhd", ds.astype(q.dtype), qg,
                          preferred_element_type=jnp.float32)
        dq = dq + jnp.einsum("bhgqk,bkhd->bqhgd", ds.astype(k.dtype), k_c,
                             preferred_element_type=jnp.float32)
        return dq, (dk_c, dv_c)

    dq0 = jnp.zeros((b, lq, hkv, g, dkd), jnp.float32)
    dq, (dk, dv) = lax.scan(chunk, dq0, (jnp.arange(nk), kc, vc, segc))
    dk = dk.swapaxes(0, 1).reshape(b, nk * bk, hkv, dkd)[:, :lk]
    dv = dv.swapaxes(0, 1).reshape(b, nk * bk, hkv, dvd)[:, :lk]
    return dq.reshape(b, lq, hq, dkd), dk, dv


# ----------------------------------------------------------------------------- block pairs


def _sub(seg, start, stop):
    return None if seg is None else seg[:, start:stop]


def _segs(q_seg, kv_seg):
    return None if q_seg is None else (q_seg, kv_seg)


def _pair_forward(attend, q, q_seg, k, v, kv_seg, q_owner, kv_owner, *, causal, layout,
                  diagonal, sm_scale):
    """Partial attention of a local query block against one key/value block.

    Owners are ring ranks (traced); ``diagonal`` (static) says the two blocks are the same
    device's. Returns ``o [b, lq, hq, dv]`` float32 and ``lse [b, hq, lq]``; with a causal mask
    only the visible sub-blocks are computed (``lax.cond`` on the owners)."""
    b, lq, hq, _ = q.shape
    dv = v.shape[-1]

    def run(qq, kk, vv, qs, ks, is_causal):
        o, lse = attend(qq, kk, vv, causal=is_causal, q_offset=0, sm_scale=sm_scale,
                        segment_ids=_segs(qs, ks))
        return o.astype(jnp.float32), lse.astype(jnp.float32)

    if not causal:
        return run(q, k, v, q_seg, kv_seg, False)
    if diagonal:  # same positions on both sides: local-index causal in either layout
        return run(q, k, v, q_seg, kv_seg, True)

    def empty(rows):
        return (jnp.zeros((b, rows, hq, dv), jnp.float32),
                jnp.full((b, hq, rows), -jnp.inf, jnp.float32))

    if layout == "contiguous":
        def full(_):
            return run(q, k, v, q_seg, kv_seg, False)

        return lax.cond(kv_owner < q_owner, full, lambda _: empty(lq), None)

    c = lq // 2

    def lower(_):  # kv block is earlier: every query sees its first chunk only
        return run(q, k[:, :c], v[:, :c], q_seg, _sub(kv_seg, 0, c), False)

    def upper(_):  # kv block is later: only the second query chunk sees it, all of it
        o, lse = run(q[:, c:], k, v, _sub(q_seg, c, lq), kv_seg, False)
        zo, zl = empty(c)
        return jnp.concatenate([zo, o], axis=1), jnp.concatenate([zl, lse], axis=2)

    return lax.cond(kv_owner < q_owner, lower, upper, None)


def _pair_backward(q, do, lse, delta, q_seg, k, v, kv_seg, q_owner, kv_owner, *, causal,
                   layout, diagonal, sm_scale, block_k):
    """Float32 ``(dq, dk, dv)`` contributions of one block pair (full local shapes)."""
    lq = q.shape[1]
    bwd = functools.partial(_block_backward, q_offset=0, sm_scale=sm_scale, block_k=block_k)

    def run(qq, doo, ll, dd, kk, vv, qs, ks, is_causal):
        return bwd(qq, kk, vv, doo, ll, dd, causal=is_causal, segment_ids=_segs(qs, ks))

    args = (q, do, lse, delta, k, v, q_seg, kv_seg)
    if not causal:
        return run(*args, False)
    if diagonal:
        return run(*args, True)

    def zeros():
        return (jnp.zeros(q.shape, jnp.float32), jnp.zeros(k.shape, jnp.float32),
                jnp.zeros(v.shape, jnp.float32))

    if layout == "contiguous":
        return lax.cond(kv_owner < q_owner, lambda _: run(*args, False), lambda _: zeros(),
                        None)

    c = lq // 2

    def lower(_):
        dq, dk, dv = run(q, do, lse, delta, k[:, :c], v[:, :c], q_seg, _sub(kv_seg, 0, c), False)
        _, dk0, dv0 = zeros()
        return dq, dk0.at[:, :c].set(dk), dv0.at[:, :c].set(dv)

    def upper(_):
        dq, dk, dv = run(q[:, c:], do[:, c:], lse[:, :, c:], delta[:, :, c:], k, v,
                         _sub(q_seg, c, lq), kv_seg, False)
        dq0 = jnp.zeros(q.shape, jnp.float32)
        return dq0.at[:, c:].set(dq), dk, dv

    return lax.cond(kv_owner < q_owner, lower, upper, None)


def _merge(o, lse, o_new, lse_new):
    """Online-softmax merge of two float32 partials (``o [b, l, h, d]``, ``lse [b, h, l]``)."""
    top = jnp.maximum(lse, lse_new)
    safe_top = jnp.where(jnp.isfinite(top), top, 0.0)
    w_old = jnp.exp(lse - safe_top)
    w_new = jnp.exp(lse_new - safe_top)
    total = w_old + w_new
    seen = total > 0
    out_lse = jnp.where(seen, safe_top + jnp.log(jnp.where(seen, total, 1.0)), -jnp.inf)
    scale_old = jnp.where(seen, w_old / jnp.where(seen, total, 1.0), 0.0)
    scale_new = jnp.where(seen, w_new / jnp.where(seen, total, 1.0), 0.0)

    def per_row(w):  # [b, h, l] -> [b, l, h, 1]
        return jnp.swapaxes(w, 1, 2)[..., None]

    return o * per_row(scale_old) + o_new * per_row(scale_new), out_lse


# ----------------------------------------------------------------------------- ring schedule


class Ring:
    """Single ring over ``inner`` (``outer`` None) or a double ring: ``outer`` ring of nodes,
    each an ``inner`` ring. Ranks are ``outer_index * n_inner + inner_index`` (the order of
    ``PartitionSpec((outer, inner))``)."""

    def __init__(self, outer: str | None, n_outer: int, inner: str, n_inner: int,
                 direction: int = 1):
        self.outer, self.n_outer, self.inner, self.n_inner = outer, n_outer, inner, n_inner
        self.size = n_outer * n_inner
        self.direction = direction

    def reversed(self) -> Ring:
        """The same ring, travelled the other way."""
        return Ring(self.outer, self.n_outer, self.inner, self.n_inner, -self.direction)

    def indices(self):
        i = lax.axis_index(self.inner)
        o = lax.axis_index(self.outer) if self.outer is not None else jnp.int32(0)
        return o, i

    def rank(self):
        o, i = self.indices()
        return o * self.n_inner + i

    def source(self, round_index, step):
        """Rank whose block this device holds at (round, inner step)."""
        o, i = self.indices()
        d = self.direction
        return ((o - d * round_index) % self.n_outer) * self.n_inner + (i - d * step) % self.n_inner

    @staticmethod
    def _permute(tree, axis_name, perm):
        return jax.tree.map(lambda x: lax.ppermute(x, axis_name, perm), tree)

    def inner_send(self, tree):
        n, d = self.n_inner, self.direction
        return self._permute(tree, self.inner, [(j, (j + d) % n) for j in range(n)])

    def outer_send(self, tree):
        n, d = self.n_outer, self.direction
        return self._permute(tree, self.outer, [(j, (j + d) % n) for j in range(n)])

    def round_end_send(self, tree):
        """Send to (outer + 1, inner + 1) (one step along the ring's direction): where a
        travelling accumulator's block sits in the next round."""
        if self.outer is None or self.n_outer == 1:
            return self.inner_send(tree)
        if self.n_inner == 1:
            return self.outer_send(tree)
        no, ni, d = self.n_outer, self.n_inner, self.direction
        perm = [(o * ni + i, ((o + d) % no) * ni + (i + d) % ni)
                for o in range(no) for i in range(ni)]
        return self._permute(tree, (self.outer, self.inner), perm)

    def run(self, bundle, acc, state, step):
        """Circulate ``bundle`` round the ring; ``step(bundle, acc, state, source_rank,
        diagonal) -> (acc, state)`` runs once per block.

        ``acc`` (zeros, or None) is an accumulator that travels with the bundle: the
        contribution of the device's own block stays home, and the accumulator of every other
        block visits the other ``G - 1`` devices and reaches its owner after ``G - 1`` sends.
        Returns ``(acc, state)`` with ``acc`` summed on its owner."""
        n_outer, n_inner = self.n_outer, self.n_inner
        fresh = acc
        home = None
        round_bundle = bundle
        for j in range(n_outer):
            next_round = self.outer_send(round_bundle) if j < n_outer - 1 else None
            cur, first = round_bundle, 0
            if j == 0:  # the device's own block: static diagonal, its accumulator stays home
                nxt = self.inner_send(cur) if n_inner > 1 else None
                home, state = step(cur, fresh, state, self.source(0, 0), True)
                cur, first = nxt, 1

            def body(t, carry, j=j):
                cur, acc, state = carry
                nxt = self.inner_send(cur)  # issued before this block's attention
                acc, state = step(cur, acc, state, self.source(j, t), False)
                acc = self.inner_send(acc) if acc is not None else None
                return nxt, acc, state

            if first > n_inner - 1:
                round_bundle = next_round
                continue
            if n_inner - 1 > first:
                cur, acc, state = lax.fori_loop(first, n_inner - 1, body, (cur, acc, state))
            acc, state = step(cur, acc, state, self.source(j, n_inner - 1), False)
            if acc is not None:
                acc = self.round_end_send(acc)
            round_bundle = next_round
        if home is None:
            return None, state
        if self.size == 1:
            return home, state
        return jax.tree.map(jnp.add, home, acc), state


# ----------------------------------------------------------------------------- shard functions


class OneHostRing:
    """A ring seen from one device, for running that device's forward alone (no collectives).

    ``rank`` is the device's ring rank (an int or a traced int32 scalar, as ``axis_index`` is
    under ``shard_map``); ``received`` is the bundle of blocks that would arrive, stacked along
    a leading axis: ``received[t - 1]`` is the block of rank ``(rank - t) % size``, which
    arrives at ring step ``t``. Single ring only. Passed as ``ring=`` to
    :func:`burst_forward_shard`."""

    def __init__(self, rank: int | jax.Array, size: int, received: Any):
        self._rank = jnp.asarray(rank, jnp.int32)
        self.size = int(size)
        self.received = received

    def rank(self) -> jax.Array:
        return self._rank

    def run(self, bundle, acc, state, step):
        """:meth:`Ring.run` for the forward (``acc`` None): the own block (diagonal), then the
        received blocks in ring order, the middle ones in a ``fori_loop`` as the ring does."""
        if acc is not None:
            raise ConfigError("OneHostRing runs the forward only (no travelling accumulator)")
        size, me = self.size, self._rank

        def at(t):
            return jax.tree.map(lambda x: x[t - 1], self.received)

        _, state = step(bundle, None, state, me, True)
        if size > 2:
            state = lax.fori_loop(1, size - 1, lambda t, st: step(
                at(t), None, st, (me - t) % size, False)[1], state)
        if size > 1:
            _, state = step(at(size - 1), None, state, (me - (size - 1)) % size, False)
        return None, state


def burst_forward_shard(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    seg: jax.Array | None = None,
    *,
    ring: Ring | OneHostRing,
    causal: bool = True,
    layout: str = "zigzag",
    sm_scale: float | None = None,
    impl: str | LocalAttention = "auto",
) -> tuple[jax.Array, jax.Array]:
    """One device's forward of :func:`burst_attention` (what it runs inside ``shard_map``).

    q ``[b, L, hq, dk]``, k ``[b, L, hkv, dk]``, v ``[b, L, hkv, dv]``, seg ``[b, L]`` or None:
    the device's blocks in layout order. ``ring``: a :class:`Ring` over the mesh axes (inside
    ``shard_map``) or a :class:`OneHostRing` (alone, on one device; ``received`` the bundles
    ``(k, v, seg)`` of the other devices). ``impl``: the local attention. Returns ``o [b, L, hq,
    dv]`` (q's dtype) and ``lse [b, hq, L]`` float32."""
    scale = float(q.shape[-1]) ** -0.5 if sm_scale is None else float(sm_scale)
    return _forward_shard(q, k, v, seg, ring=ring, attend=resolve_local_attention(impl),
                          causal=bool(causal), layout=layout, sm_scale=scale)


def _forward_shard(q, k, v, seg, *, ring, attend, causal, layout, sm_scale):
    """Per device: ``o [b, L, hq, dv]`` (q's dtype) and ``lse [b, hq, L]`` float32."""
    me = ring.rank()

    def step(bundle, acc, state, src, diagonal):
        kb, vb, kseg = bundle
        o, lse = state
        o_b, lse_b = _pair_forward(attend, q, seg, kb, vb, kseg, me, src, causal=causal,
                                   layout=layout, diagonal=diagonal, sm_scale=sm_scale)
        return acc, _merge(o, lse, o_b, lse_b)

    b, lq, hq, _ = q.shape
    state = (jnp.zeros((b, lq, hq, v.shape[-1]), jnp.float32),
             jnp.full((b, hq, lq), -jnp.inf, jnp.float32))
    _, (o, lse) = ring.run((k, v, seg), None, state, step)
    return o.astype(q.dtype), lse


def _delta(o, do):
    return jnp.einsum("bqhd,bqhd->bhq", do.astype(jnp.float32), o.astype(jnp.float32))


def _burst_backward_shard(q, k, v, seg, o, lse, do, *, ring, causal, layout, sm_scale, block_k):
    """Burst backward: Q, dO, D, lse (+ dQ) travel; K, V, dK, dV stay."""
    ring = ring.reversed()
    me = ring.rank()
    pair = functools.partial(_pair_backward, causal=causal, layout=layout, sm_scale=sm_scale,
                             block_k=block_k)

    def step(bundle, dq, state, src, diagonal):
        qb, dob, lseb, deltab, qseg = bundle
        dk, dv = state
        dq_p, dk_p, dv_p = pair(qb, dob, lseb, deltab, qseg, k, v, seg, src, me,
                                diagonal=diagonal)
        return dq + dq_p, (dk + dk_p, dv + dv_p)

    bundle = (q, do, lse, _delta(o, do), seg)
    dq0 = jnp.zeros(q.shape, jnp.float32)
    state = (jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32))
    dq, (dk, dv) = ring.run(bundle, dq0, state, step)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)


def _ring_backward_shard(q, k, v, seg, o, lse, do, *, ring, causal, layout, sm_scale, block_k):
    """RingAttention backward: K, V and the dK, dV accumulators travel; Q side stays."""
    ring = ring.reversed()
    me = ring.rank()
    delta = _delta(o, do)
    pair = functools.partial(_pair_backward, causal=causal, layout=layout, sm_scale=sm_scale,
                             block_k=block_k)

    def step(bundle, acc, dq, src, diagonal):
        kb, vb, kseg = bundle
        dk, dv = acc
        dq_p, dk_p, dv_p = pair(q, do, lse, delta, seg, kb, vb, kseg, me, src,
                                diagonal=diagonal)
        return (dk + dk_p, dv + dv_p), dq + dq_p

    acc = (jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32))
    (dk, dv), dq = ring.run((k, v, seg), acc, jnp.zeros(q.shape, jnp.float32), step)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)


def _allgather_shard(q, k, v, seg, *, ring, seq_axes, attend, causal, layout, sm_scale):
    """All-gather K, V (and kv segment ids); attend locally; differentiable by autodiff."""
    size = ring.size
    kf = lax.all_gather(k, seq_axes, axis=1, tiled=True)
    vf = lax.all_gather(v, seq_axes, axis=1, tiled=True)
    kseg = None if seg is None else lax.all_gather(seg, seq_axes, axis=1, tiled=True)
    if not causal:
        o, _ = attend(q, kf, vf, causal=False, q_offset=0, sm_scale=sm_scale,
                      segment_ids=_segs(seg, kseg))
        return o
    if layout == "zigzag":  # natural order, then each query chunk is a contiguous range
        inverse = np.argsort(layout_indices(kf.shape[1], size, layout))
        kf, vf = kf[:, inverse], vf[:, inverse]
        kseg = None if kseg is None else kseg[:, inverse]
    me = ring.rank()
    lq = q.shape[1]
    if layout == "contiguous":
        o, _ = attend(q, kf, vf, causal=True, q_offset=me * lq, sm_scale=sm_scale,
                      segment_ids=_segs(seg, kseg))
        return o
    c = lq // 2
    outs = []
    for part, offset in ((slice(0, c), me * c), (slice(c, lq), (2 * size - 1 - me) * c)):
        qs = None if seg is None else seg[:, part]
        o, _ = attend(q[:, part], kf, vf, causal=True, q_offset=offset, sm_scale=sm_scale,
                      segment_ids=_segs(qs, kseg))
        outs.append(o)
    return jnp.concatenate(outs, axis=1)


# ----------------------------------------------------------------------------- volume model


def communication_bytes(
    schedule: str,
    *,
    batch: int,
    seq_len: int,
    q_heads: int,
    kv_heads: int,
    qk_dim: int,
    v_dim: int,
    num_shards: int,
    itemsize: int = 4,
    segments: bool = False,
) -> dict[str, int]:
    """Bytes each device sends in collectives, ``{"forward", "backward", "total"}``.

    ``batch``, ``q_heads``, ``kv_heads`` are per device (after data/tensor sharding);
    ``seq_len`` is global over ``num_shards`` devices (``L = seq_len / num_shards`` local
    tokens). Accumulators (dQ for burst, dK/dV for ring) travel in float32; lse and D are
    float32; segment ids int32. Derivation in docs/burst.md. Matches the count from the
    compiled HLO (``collective_bytes_from_hlo``)."""
    g = num_shards
    tokens = batch * (seq_len // g)
    seg = 4 if segments else 0
    kv = kv_heads * (qk_dim + v_dim)
    forward = (g - 1) * tokens * (kv * itemsize + seg)
    if schedule == "ring":
        backward = (g - 1) * tokens * (kv * itemsize + seg + kv * 4)
    elif schedule == "burst":
        q_side = q_heads * (qk_dim + v_dim) * itemsize + 2 * q_heads * 4 + seg
        backward = (g - 1) * tokens * (q_side + q_heads * qk_dim * 4)
    elif schedule == "allgather":
        backward = (g - 1) * tokens * kv * itemsize
    else:
        raise ConfigError(f"no volume model for schedule {schedule!r}")
    return {"forward": forward, "backward": backward, "total": forward + backward}


def choose_schedule(**shapes: Any) -> str:
    """``"burst"`` or ``"ring"``: the lower forward+backward volume (ties go to burst).
    Keywords as :func:`communication_bytes`."""
    burst = communication_bytes("burst", **shapes)["total"]
    ring = communication_bytes("ring", **shapes)["total"]
    return "burst" if burst <= ring else "ring"


choose_impl = choose_schedule  # the old name (the schedule was chosen with impl=)


_SHAPE_RE = re.compile(r"(pred|s8|u8|s16|u16|s32|u32|s64|u64|f16|bf16|f32|f64)\[([0-9,]*)\]")
_ITEMSIZE = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4,
             "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8}
_COLLECTIVES = ("collective-permute", "all-gather", "reduce-scatter", "all-reduce", "all-to-all")


def _shape_bytes(match: re.Match) -> int:
    n = 1
    for d in filter(None, match.group(2).split(",")):
        n *= int(d)
    return n * _ITEMSIZE[match.group(1)]


def hlo_computation_weights(hlo_text: str) -> tuple[dict[str, list[str]], dict[str, float]]:
    """``(computations, weights)`` of compiled HLO text: the instruction lines of every
    computation and how many times it runs per call of the entry computation (``while`` bodies
    times their known trip count, nested loops by the product, the branches of a conditional
    ``1 / branches`` each: exact when the branches do equal work, as zigzag's do)."""
    computations: dict[str, list[str]] = {}
    entry = None
    current = None
    for line in hlo_text.splitlines():
        header = re.match(r"^(ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$", line)
        if header and not line.startswith(" "):
            current = header.group(2)
            computations[current] = []
            if header.group(1):
                entry = current
            continue
        if current is not None and line.strip():
            computations[current].append(line)
    multiplier = {entry: 1.0} if entry else {}
    order = [entry] if entry else []
    while order:
        name = order.pop(0)
        for line in computations.get(name, []):
            trip = re.search(r'"known_trip_count":\{"n":"(\d+)"', line)
            body_factor = float(trip.group(1)) if trip and re.search(r"\swhile\(", line) else 1.0
            callees = [(c, 1.0) for c in re.findall(
                r"(?:condition|to_apply|calls|true_computation|false_computation)=%?([\w.\-]+)",
                line)]
            callees += [(c, body_factor) for c in re.findall(r"body=%?([\w.\-]+)", line)]
            branches = re.search(r"branch_computations=\{([^}]*)\}", line)
            if branches:
                names = [c.strip().lstrip("%") for c in branches.group(1).split(",")]
                callees += [(c, 1.0 / len(names)) for c in names]
            for callee, factor in callees:
                if callee not in computations:
                    continue
                value = multiplier[name] * factor
                if value > multiplier.get(callee, 0.0):
                    multiplier[callee] = value
                    order.append(callee)
    return computations, multiplier


def collective_bytes_from_hlo(hlo_text: str) -> dict[str, int]:
    """Bytes one device sends per collective kind, from compiled (optimised) HLO text.

    Each instruction counts as often as its computation runs (:func:`hlo_computation_weights`:
    ``while`` trip counts). Per instruction, from its
    result shape over a group of ``n`` devices (ring algorithms): collective-permute sends its
    result; all-gather ``(n - 1) / n`` of its result; reduce-scatter ``n - 1`` results;
    all-reduce ``2 (n - 1) / n`` of its result; all-to-all ``(n - 1) / n``. Only the
    ``-start`` half of async pairs is counted."""
    computations, multiplier = hlo_computation_weights(hlo_text)
    totals = {kind: 0 for kind in _COLLECTIVES}
    for name, lines in computations.items():
        weight = multiplier.get(name, 0.0)
        if not weight:
            continue
        for line in lines:
            for kind in _COLLECTIVES:
                m = re.search(r"=\s*(.*?)\s" + kind + r"(-start)?\(", line)
                if not m:
                    continue
                shapes = [_shape_bytes(s) for s in _SHAPE_RE.finditer(m.group(1))]
                if not shapes:
                    break
                if m.group(2) and kind == "all-gather" and len(shapes) > 1:
                    result = shapes[1]  # async all-gather: (operand, result, ...)
                else:
                    result = shapes[0]
                group = _group_size(line)
                if kind == "all-gather":
                    sent = result * (group - 1) / group
                elif kind == "reduce-scatter":
                    sent = result * (group - 1)
                elif kind == "all-reduce":
                    sent = result * 2 * (group - 1) / group
                elif kind == "all-to-all":
                    sent = result * (group - 1) / group
                else:
                    sent = result
                totals[kind] += int(round(weight * sent))
                break
    totals["total"] = sum(totals[k] for k in _COLLECTIVES)
    return totals


def _group_size(line: str) -> int:
    iota = re.search(r"replica_groups=\[(\d+),(\d+)\]", line)
    if iota:
        return int(iota.group(2))
    groups = re.search(r"replica_groups=\{\{([^}]*)\}", line)
    if groups:
        return len(groups.group(1).split(","))
    return 1


# ----------------------------------------------------------------------------- public entry


def remat_policy(*extra_names: str) -> Callable[..., Any]:
    """Sequence-level selective checkpointing: a ``jax.checkpoint`` policy that saves the
    attention output and log-sum-exp of every burst call (and the residuals named in
    ``extra_names``) and recomputes everything else. The backward then never re-runs the
    forward ring (no K/V communication, no attention FLOPs), only the cheap projections."""
    return jax.checkpoint_policies.save_only_these_names(BURST_OUT, BURST_LSE, *extra_names)


def _axis_size(mesh: Mesh, name: str) -> int:
    if name not in mesh.shape:
        raise ShardingError(f"mesh has no axis {name!r}; axes are {tuple(mesh.shape)}")
    return int(mesh.shape[name])


def _default_batch_axes(mesh: Mesh, batch: int) -> tuple[str, ...] | None:
    axes = tuple(a for a in ("data", "fsdp") if mesh.shape.get(a, 1) > 1)
    if not axes or batch % int(np.prod([mesh.shape[a] for a in axes])):
        return None
    return axes


def burst_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    mesh: Mesh,
    axis: str = "sequence",
    causal: bool = True,
    segment_ids: jax.Array | None = None,
    impl: str | LocalAttention = "auto",
    inner_axis: str | None = None,
    layout: str = "zigzag",
    sm_scale: float | None = None,
    batch_axes: str | Sequence[str] | None = "default",
    head_axis: str | None = "default",
    local_attention: LocalAttention | None = None,
    block_k: int = 512,
    schedule: str = "auto",
) -> jax.Array:
    """Exact attention on a sequence sharded over ``mesh[axis]`` (and ``mesh[inner_axis]``).

    Args:
      q: ``[batch, seq, q_heads, qk_dim]``; k ``[batch, seq, kv_heads, qk_dim]``; v
        ``[batch, seq, kv_heads, v_dim]`` (``q_heads % kv_heads == 0``; kv never repeated).
        The sequence axis is in layout order (:mod:`sharding.layout`).
      mesh: the device mesh; arrays may arrive with any sharding (they are resharded to
        ``P(batch_axes, (axis, inner_axis), head_axis)``).
      axis: the sequence mesh axis (the outer ring when ``inner_axis`` is given).
      causal: causal mask on the true token positions of the layout.
      segment_ids: ``[batch, seq]`` int (layout order): a query sees only keys of its segment.
      impl: the local (per-block) attention: ``"auto"`` | ``"reference"`` | ``"blockwise"`` |
        ``"pallas"`` or a callable ``(q, k, v, *, causal, q_offset, sm_scale, segment_ids) ->
        (o, lse)``. (Deprecated: a schedule name here, resolved as ``schedule=``.)
      inner_axis: with a second sequence axis, a double ring (``inner_axis`` the fast ring).
      layout: ``"zigzag"`` (balanced causal work) or ``"contiguous"``.
      sm_scale: score scale, default ``qk_dim ** -0.5``.
      batch_axes: mesh axes for the batch; default those of ``data``/``fsdp`` that divide it.
      head_axis: mesh axis for heads; default ``"tensor"`` when it divides ``kv_heads``.
      local_attention: deprecated name of ``impl=`` (a callable).
      block_k: key chunk of the per-block backward.
      schedule: the ring schedule, ``"auto"`` | ``"burst"`` | ``"ring"`` | ``"allgather"``.

    Returns:
      ``o [batch, seq, q_heads, v_dim]`` in q's dtype, same layout and sharding specs.
    """
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.ndim != 4:
            raise ShapeMismatchError(
                f"{name} must be [batch, seq, heads, head_dim], got shape {tuple(x.shape)}")
    batch, seq, q_heads, qk_dim = q.shape
    if k.shape[:2] != (batch, seq) or v.shape[:3] != k.shape[:3] or k.shape[3] != qk_dim:
        raise ShapeMismatchError(
            f"self-attention shapes disagree: q {tuple(q.shape)}, k {tuple(k.shape)}, "
            f"v {tuple(v.shape)}")
    kv_heads = k.shape[2]
    if q_heads % kv_heads:
        raise ShapeMismatchError(f"q heads {q_heads} not a multiple of kv heads {kv_heads}")
    if isinstance(impl, str) and impl in SCHEDULES[1:]:
        warnings.warn(f"burst_attention(impl={impl!r}) is deprecated: the ring schedule is "
                      f"schedule={impl!r} (impl= now chooses the local attention)",
                      DeprecationWarning, stacklevel=2)
        schedule, impl = impl, "auto"
    if local_attention is not None:
        warnings.warn("burst_attention(local_attention=...) is deprecated; use impl=",
                      DeprecationWarning, stacklevel=2)
        impl = local_attention
    if schedule not in SCHEDULES:
        raise ConfigError(f"unknown burst schedule {schedule!r}; expected one of {SCHEDULES}")
    attend = resolve_local_attention(impl)
    if segment_ids is not None and tuple(segment_ids.shape) != (batch, seq):
        raise ShapeMismatchError(
            f"segment_ids shape {tuple(segment_ids.shape)} != (batch, seq) {(batch, seq)}")
    n_outer = _axis_size(mesh, axis)
    if inner_axis is None:
        ring = Ring(None, 1, axis, n_outer)
        seq_axes: Any = axis
    else:
        ring = Ring(axis, n_outer, inner_axis, _axis_size(mesh, inner_axis))
        seq_axes = (axis, inner_axis)
    check_layout(layout, seq, ring.size)
    if batch_axes == "default":
        batch_axes = _default_batch_axes(mesh, batch)
    if head_axis == "default":
        head_axis = "tensor" if mesh.shape.get("tensor", 1) > 1 else None
        if head_axis is not None and kv_heads % mesh.shape["tensor"]:
            head_axis = None
    elif head_axis is not None and kv_heads % _axis_size(mesh, head_axis):
        raise ShardingError(
            f"head axis {head_axis!r} of size {mesh.shape[head_axis]} does not divide "
            f"kv_heads={kv_heads}")
    scale = float(qk_dim) ** -0.5 if sm_scale is None else float(sm_scale)

    if schedule == "auto":
        local_batch = batch // (int(np.prod([mesh.shape[a] for a in _as_tuple(batch_axes)])))
        heads_split = mesh.shape[head_axis] if head_axis else 1
        schedule = choose_schedule(
            batch=local_batch, seq_len=seq, q_heads=q_heads // heads_split,
            kv_heads=kv_heads // heads_split, qk_dim=qk_dim, v_dim=v.shape[3],
            num_shards=ring.size, itemsize=q.dtype.itemsize, segments=segment_ids is not None)
        logger.debug("burst_attention schedule=auto chose %r (q_heads=%d, kv_heads=%d)",
                     schedule, q_heads, kv_heads)

    qkv_spec = PartitionSpec(batch_axes, seq_axes, head_axis, None)
    seg_spec = PartitionSpec(batch_axes, seq_axes)
    lse_spec = PartitionSpec(batch_axes, head_axis, seq_axes)
    has_seg = segment_ids is not None
    seg_in = (seg_spec,) if has_seg else ()
    statics = dict(ring=ring, causal=bool(causal), layout=layout, sm_scale=scale)

    def with_seg(fn):
        """Adapt ``fn(q, k, v, seg, *rest)`` to shard_map args without a segment array."""
        if has_seg:
            return fn
        return lambda q_, k_, v_, *rest: fn(q_, k_, v_, None, *rest)

    if schedule == "allgather":
        fn = functools.partial(_allgather_shard, seq_axes=seq_axes, attend=attend, **statics)
        mapped = jax.shard_map(with_seg(fn), mesh=mesh, in_specs=(qkv_spec,) * 3 + seg_in,
                               out_specs=qkv_spec, check_vma=False)
        return mapped(q, k, v, *((segment_ids,) if has_seg else ()))

    forward = jax.shard_map(
        with_seg(functools.partial(_forward_shard, attend=attend, **statics)), mesh=mesh,
        in_specs=(qkv_spec,) * 3 + seg_in, out_specs=(qkv_spec, lse_spec), check_vma=False)
    backward_fn = _burst_backward_shard if schedule == "burst" else _ring_backward_shard
    backward = jax.shard_map(
        with_seg(functools.partial(backward_fn, block_k=block_k, **statics)), mesh=mesh,
        in_specs=(qkv_spec,) * 3 + seg_in + (qkv_spec, lse_spec, qkv_spec),
        out_specs=(qkv_spec,) * 3, check_vma=False)

    @jax.custom_vjp
    def attention(q, k, v, *seg):
        return forward(q, k, v, *seg)[0]

    def attention_fwd(q, k, v, *seg):
        o, lse = forward(q, k, v, *seg)
        o = checkpoint_name(o, BURST_OUT)
        lse = checkpoint_name(lse, BURST_LSE)
        return o, (q, k, v, seg, o, lse)

    def attention_bwd(residuals, d_out):
        q, k, v, seg, o, lse = residuals
        dq, dk, dv = backward(q, k, v, *seg, o, lse, d_out)
        seg_ct = tuple(np.zeros(s.shape, jax.dtypes.float0) for s in seg)
        return (dq, dk, dv, *seg_ct)

    attention.defvjp(attention_fwd, attention_bwd)
    return attention(q, k, v, *((segment_ids,) if has_seg else ()))


def _as_tuple(axes) -> tuple[str, ...]:
    if axes is None:
        return ()
    return (axes,) if isinstance(axes, str) else tuple(axes)


def ops_backend(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    causal: bool = True,
    segment_ids: jax.Array | None = None,
    kv_segment_ids: jax.Array | None = None,
    sm_scale: float | None = None,
    mesh: Mesh | None = None,
    **options: Any,
) -> jax.Array:
    """Adapter for ``cpmjax.ops.register_attention_backend("burst", ops_backend)``.

    Self-attention over the whole (laid-out) sequence; ``mesh=`` and the other
    :func:`burst_attention` keywords come from ``attention_backend("burst", mesh=..., ...)``."""
    if mesh is None:
        raise ConfigError("the 'burst' attention backend needs mesh= (attention_backend("
                          "'burst', mesh=mesh))")
    if q.shape[1] != k.shape[1]:
        raise ConfigError(
            f"the 'burst' backend is self-attention over one sequence; got q_len {q.shape[1]} "
            f"and kv_len {k.shape[1]} (decode against a cache with another backend)")
    if kv_segment_ids is not None and kv_segment_ids is not segment_ids:
        raise ConfigError("the 'burst' backend takes one segment_ids array for q and kv")
    options.pop("layer", None)  # the model's layer index: every layer runs the same ring
    return burst_attention(q, k, v, mesh=mesh, causal=causal, segment_ids=segment_ids,
                           sm_scale=sm_scale, **options)
