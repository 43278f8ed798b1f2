"""Blockwise (flash) attention: a Pallas kernel pair, a ``lax`` blockwise path and a reference.

Three implementations of one function, all with the layout q ``[batch, q_len, q_heads, qk_dim]``,
k ``[batch, kv_len, kv_heads, qk_dim]``, v ``[batch, kv_len, kv_heads, v_dim]`` and output
``[batch, q_len, q_heads, v_dim]``:

- :func:`flash_attention`: Pallas kernels (forward with an online softmax that also emits the
  log-sum-exp; backward as a dq kernel and a dk/dv kernel that recompute the probabilities from
  the saved log-sum-exp), tied together with ``jax.custom_vjp``. Two kernel sets: the Hopper
  kernels for Pallas's Mosaic GPU backend in :mod:`pallas_kernels.flash_attention_mosaic_gpu`
  (the default on GPU) and the portable kernels below (lowered by Mosaic TPU; interpreted on
  CPU).
- :func:`blockwise_attention`: the same algorithm in plain ``lax`` loops over query and key
  blocks (O(seq) memory forward and backward, causal blocks above the diagonal skipped). This
  is the fast path on CPU.
- :func:`attention_reference`: materialises the scores; the ground truth in tests.

Choosing among the three is the library's implementation vocabulary (``impl="reference" |
"blockwise" | "pallas" | "auto"``, :func:`pallas_kernels.local_attention`). ``kernel=`` of
:func:`flash_attention` is deliberately not part of it: it picks the *lowering* of the Pallas
implementation (``"portable"`` kernels for TPU and the CPU interpreter, ``"mosaic_gpu"`` for
Hopper, ``"auto"``), a sub-option of ``impl="pallas"`` that ``local_attention`` passes through.

Conventions shared by all three:

- GQA/MQA: q head ``i`` reads kv head ``i // (q_heads // kv_heads)``; kv is never repeated.
- Positions: query ``i`` sits at position ``q_offset + i`` and key ``j`` at position ``j``;
  ``causal`` keeps key ``j`` for query ``i`` when ``j <= i + q_offset``. ``q_offset`` may be a
  Python int or a traced int32 scalar (ring attention passes a device-dependent offset).
- ``segment_ids``: an int array ``[batch, seq]`` (when ``q_len == kv_len``) or a pair
  ``(q_segment_ids [batch, q_len], kv_segment_ids [batch, kv_len])``; a query only sees keys of
  its own segment.
- A query row that sees no key at all (possible with segment ids or a negative ``q_offset``)
  gets output 0 and log-sum-exp ``-inf``; its gradients are 0 and finite.
- The log-sum-exp is returned as float32 ``[batch, q_heads, q_len]`` of the *scaled* scores
  (``log sum_j exp(sm_scale * q.k_j)``), which is what merging partial attentions needs.
- Softmax statistics and accumulators are float32 whatever the input dtype; matmuls take the
  input dtype (bfloat16 stays bfloat16 on the MXU/tensor cores) with float32 accumulation. On
  GPU, float32 inputs run the ``lax`` blockwise path (Hopper has no full-precision float32
  tensor-core matmul).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels._common import (
    _MASK_VALUE,
    SegmentIds,
    _block_mask,
    _check_qkv,
    _default_interpret,
    _pad_axis,
    _round_up,
    _scale,
    _split_segment_ids,
    _validate,
)

__all__ = [
    "attention_reference",
    "blockwise_attention",
    "flash_attention",
]


# ----------------------------------------------------------------------------- reference


def attention_reference(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    causal: bool = True,
    sm_scale: float | None = None,
    segment_ids: SegmentIds = None,
    q_offset: int | jax.Array = 0,
    return_lse: bool = False,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """Attention with materialised float32 scores ``[batch, heads, q_len, kv_len]``.

    Args/returns as :func:`flash_attention`: ``o [batch, q_len, q_heads, v_dim]`` in q's dtype
    and, with ``return_lse``, ``lse [batch, q_heads, q_len]`` float32. Differentiable.
    """
    batch, q_len, q_heads, qk_dim, kv_len, kv_heads, v_dim = _check_qkv(q, k, v)
    groups = q_heads // kv_heads
    scale = _scale(sm_scale, qk_dim)
    q_seg, kv_seg = _split_segment_ids(segment_ids, batch, q_len, kv_len)
    qg = q.reshape(batch, q_len, kv_heads, groups, qk_dim)
    scores = jnp.einsum("bqhgd,bkhd->bhgqk", qg, k, preferred_element_type=jnp.float32) * scale
    mask = jnp.ones((1, q_len, kv_len), dtype=bool)
    if causal:
        q_pos = jnp.arange(q_len)[:, None] + jnp.asarray(q_offset, jnp.int32)
        mask = mask & (jnp.arange(kv_len)[None, :] <= q_pos)[None]
    if q_seg is not None:
        mask = mask & (q_seg[:, :, None] == kv_seg[:, None, :])
    mask = mask[:, None, None]  # [batch|1, 1, 1, q_len, kv_len]
    scores = jnp.where(mask, scores, -jnp.inf)
    row_max = lax.stop_gradient(jnp.max(scores, axis=-1, keepdims=True))
    row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
    weights = jnp.exp(scores - row_max)
    denom = jnp.sum(weights, axis=-1, keepdims=True)
    safe_denom = jnp.where(denom > 0, denom, 1.0)
    probs = weights / safe_denom
    out = jnp.einsum("bhgqk,bkhd->bqhgd", probs, v.astype(jnp.float32))
    out = out.reshape(batch, q_len, q_heads, v_dim).astype(q.dtype)
    if not return_lse:
        return out
    lse = jnp.where(denom > 0, row_max + jnp.log(safe_denom), -jnp.inf)[..., 0]
    return out, lse.reshape(batch, q_heads, q_len)


# ----------------------------------------------------------------------------- lax blockwise


def _blockwise_prepare(q, k, v, segment_ids, block_q, block_k):
    batch, q_len, q_heads, qk_dim, kv_len, kv_heads, v_dim = _check_qkv(q, k, v)
    q_seg, kv_seg = _split_segment_ids(segment_ids, batch, q_len, kv_len)
    groups = q_heads // kv_heads
    block_q = max(1, min(block_q, q_len))
    block_k = max(1, min(block_k, kv_len))
    q_pad, k_pad = _round_up(q_len, block_q), _round_up(kv_len, block_k)
    # [batch, kv_heads, groups, blocks, block, dim]: the head axes lead so a block is one slice.
    qb = _pad_axis(q, 1, q_pad).reshape(batch, q_pad // block_q, block_q, kv_heads, groups, qk_dim)
    qb = qb.transpose(1, 0, 3, 4, 2, 5)  # [nq, b, hkv, g, bq, d]
    kb = _pad_axis(k, 1, k_pad).reshape(batch, k_pad // block_k, block_k, kv_heads, qk_dim)
    kb = kb.transpose(1, 0, 3, 2, 4)  # [nk, b, hkv, bk, d]
    vb = _pad_axis(v, 1, k_pad).reshape(batch, k_pad // block_k, block_k, kv_heads, v_dim)
    vb = vb.transpose(1, 0, 3, 2, 4)
    if q_seg is not None:
        q_seg = _pad_axis(q_seg, 1, q_pad, -1).reshape(batch, -1, block_q).transpose(1, 0, 2)
        kv_seg = _pad_axis(kv_seg, 1, k_pad, -2).reshape(batch, -1, block_k).transpose(1, 0, 2)
    dims = dict(
        batch=batch, q_len=q_len, q_heads=q_heads, kv_len=kv_len, kv_heads=kv_heads,
        groups=groups, block_q=block_q, block_k=block_k, v_dim=v_dim, qk_dim=qk_dim,
    )
    return qb, kb, vb, q_seg, kv_seg, dims


def _kv_block_range(qi, dims, causal, q_offset):
    """Key blocks ``[0, hi)`` that query block ``qi`` may see (causal skips the rest)."""
    num_k = -(-dims["kv_len"] // dims["block_k"])
    if not causal:
        return num_k
    last_q = (qi + 1) * dims["block_q"] - 1 + q_offset
    return jnp.clip(last_q // dims["block_k"] + 1, 0, num_k)


def _q_block_start(ki, dims, causal, q_offset):
    """First query block that may see key block ``ki`` (causal)."""
    if not causal:
        return 0
    first = ki * dims["block_k"] - q_offset  # first query index that sees this block's first key
    return jnp.clip(first // dims["block_q"], 0, -(-dims["q_len"] // dims["block_q"]))


def _blockwise_fwd_impl(q, k, v, segment_ids, q_offset, *, causal, scale, block_q, block_k):
    qb, kb, vb, q_seg, kv_seg, dims = _blockwise_prepare(q, k, v, segment_ids, block_q, block_k)
    batch, kv_heads, groups = dims["batch"], dims["kv_heads"], dims["groups"]
    bq, bk = dims["block_q"], dims["block_k"]
    num_q = qb.shape[0]

    def one_q_block(args):
        qi, q_blk, qs = args  # q_blk [b, hkv, g, bq, d]
        q_pos = qi * bq + jnp.arange(bq)[:, None]
        q_seg_blk = None if qs is None else qs[:, None, None, :, None]

        def body(ki, carry):
            row_max, row_sum, acc = carry
            k_blk = kb[ki]
            v_blk = vb[ki]
            s = jnp.einsum(
                "bhgqd,bhkd->bhgqk", q_blk, k_blk, preferred_element_type=jnp.float32
            ) * scale
            k_pos = ki * bk + jnp.arange(bk)[None, :]
            kv_seg_blk = None if kv_seg is None else kv_seg[ki][:, None, None, None, :]
            mask = _block_mask(q_pos, k_pos, dims["kv_len"], causal, q_offset, q_seg_blk,
                               kv_seg_blk)
            s = jnp.where(mask, s, _MASK_VALUE)
            max_new = jnp.maximum(row_max, jnp.max(s, axis=-1, keepdims=True))
            p = jnp.where(mask, jnp.exp(s - max_new), 0.0)
            alpha = jnp.exp(row_max - max_new)
            sum_new = alpha * row_sum + jnp.sum(p, axis=-1, keepdims=True)
            pv = jnp.einsum(
                "bhgqk,bhkd->bhgqd", p.astype(v_blk.dtype), v_blk,
                preferred_element_type=jnp.float32,
            )
            return max_new, sum_new, alpha * acc + pv

        init = (
            jnp.full((batch, kv_heads, groups, bq, 1), _MASK_VALUE, jnp.float32),
            jnp.zeros((batch, kv_heads, groups, bq, 1), jnp.float32),
            jnp.zeros((batch, kv_heads, groups, bq, dims["v_dim"]), jnp.float32),
        )
        hi = _kv_block_range(qi, dims, causal, q_offset)
        row_max, row_sum, acc = lax.fori_loop(0, hi, body, init)
        seen = row_sum > 0
        out = acc / jnp.where(seen, row_sum, 1.0)
        lse = jnp.where(seen, row_max + jnp.log(jnp.where(seen, row_sum, 1.0)), -jnp.inf)
        return out, lse[..., 0]

    out, lse = lax.map(one_q_block, (jnp.arange(num_q), qb, q_seg))
    # out [nq, b, hkv, g, bq, dv] -> [b, q_len, hq, dv]; lse [nq, b, hkv, g, bq] -> [b, hq, q_len]
    out = out.transpose(1, 0, 4, 2, 3, 5).reshape(batch, num_q * bq, dims["q_heads"], -1)
    lse = lse.transpose(1, 2, 3, 0, 4).reshape(batch, dims["q_heads"], num_q * bq)
    return out[:, : dims["q_len"]].astype(q.dtype), lse[:, :, : dims["q_len"]]


def _blockwise_bwd_impl(
    q, k, v, segment_ids, q_offset, out, lse, d_out, d_lse, *, causal, scale, block_q, block_k
):
    """One pass over key blocks; each key block walks the query blocks that see it."""
    qb, kb, vb, q_seg, kv_seg, dims = _blockwise_prepare(q, k, v, segment_ids, block_q, block_k)
    batch, kv_heads, groups = dims["batch"], dims["kv_heads"], dims["groups"]
    q_len, bq, bk = dims["q_len"], dims["block_q"], dims["block_k"]
    num_q, num_k = qb.shape[0], kb.shape[0]
    q_pad = num_q * bq

    # delta_i = sum_d dO_i . O_i  - dlse_i  (the lse cotangent folds into the same term).
    delta = jnp.einsum("bqhd,bqhd->bhq", d_out.astype(jnp.float32), out.astype(jnp.float32))
    delta = delta - d_lse
    lse_safe = jnp.where(jnp.isfinite(lse), lse, 0.0)
    delta = jnp.where(jnp.isfinite(lse), delta, 0.0)

    def to_blocks(x):  # [b, hq, q_len] -> [nq, b, hkv, g, bq, 1]
        x = _pad_axis(x, 2, q_pad).reshape(batch, kv_heads, groups, num_q, bq)
        return x.transpose(3, 0, 1, 2, 4)[..., None]

    lse_b, delta_b = to_blocks(lse_safe), to_blocks(delta)
    dob = _pad_axis(d_out, 1, q_pad).reshape(batch, num_q, bq, kv_heads, groups, -1)
    dob = dob.transpose(1, 0, 3, 4, 2, 5)  # [nq, b, hkv, g, bq, dv]

    def one_k_block(dq_acc, args):
        ki, k_blk, v_blk, ks = args  # k_blk [b, hkv, bk, d]
        k_pos = ki * bk + jnp.arange(bk)[None, :]
        kv_seg_blk = None if ks is None else ks[:, None, None, None, :]

        def body(qi, carry):
            dk, dv, dq = carry
            q_blk, do_blk = qb[qi], dob[qi]
            q_pos = qi * bq + jnp.arange(bq)[:, None]
            q_seg_blk = None if q_seg is None else q_seg[qi][:, None, None, :, None]
            mask = _block_mask(q_pos, k_pos, dims["kv_len"], causal, q_offset, q_seg_blk,
                               kv_seg_blk)
            s = jnp.einsum(
                "bhgqd,bhkd->bhgqk", q_blk, k_blk, preferred_element_type=jnp.float32
            ) * scale
            p = jnp.where(mask, jnp.exp(s - lse_b[qi]), 0.0)
            dv = dv + jnp.einsum(
                "bhgqk,bhgqd->bhkd", p.astype(do_blk.dtype), do_blk,
                preferred_element_type=jnp.float32,
            )
            dp = jnp.einsum(
                "bhgqd,bhkd->bhgqk", do_blk, v_blk, preferred_element_type=jnp.float32
            )
            ds = p * (dp - delta_b[qi]) * scale
            dk = dk + jnp.einsum(
                "bhgqk,bhgqd->bhkd", ds.astype(q_blk.dtype), q_blk,
                preferred_element_type=jnp.float32,
            )
            dq_blk = jnp.einsum(
                "bhgqk,bhkd->bhgqd", ds.astype(k_blk.dtype), k_blk,
                preferred_element_type=jnp.float32,
            )
            dq = lax.dynamic_update_index_in_dim(dq, dq[qi] + dq_blk, qi, 0)
            return dk, dv, dq

        init = (
            jnp.zeros(k_blk.shape, jnp.float32),
            jnp.zeros(v_blk.shape, jnp.float32),
            dq_acc,
        )
        lo = _q_block_start(ki, dims, causal, q_offset)
        dk, dv, dq_acc = lax.fori_loop(lo, num_q, body, init)
        return dq_acc, (dk, dv)

    dq0 = jnp.zeros(qb.shape, jnp.float32)
    dq, (dk, dv) = lax.scan(one_k_block, dq0, (jnp.arange(num_k), kb, vb, kv_seg))
    dq = dq.transpose(1, 0, 4, 2, 3, 5).reshape(batch, q_pad, dims["q_heads"], -1)[:, :q_len]
    dk = dk.transpose(1, 0, 3, 2, 4).reshape(batch, num_k * bk, kv_heads, -1)[:, : dims["kv_len"]]
    dv = dv.transpose(1, 0, 3, 2, 4).reshape(batch, num_k * bk, kv_heads, -1)[:, : dims["kv_len"]]
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7, 8))
def _blockwise_core(q, k, v, segs, q_offset, causal, scale, block_q, block_k):
    return _blockwise_fwd_impl(
        q, k, v, segs, q_offset, causal=causal, scale=scale, block_q=block_q, block_k=block_k
    )


def _blockwise_core_fwd(q, k, v, segs, q_offset, causal, scale, block_q, block_k):
    out, lse = _blockwise_fwd_impl(
        q, k, v, segs, q_offset, causal=causal, scale=scale, block_q=block_q, block_k=block_k
    )
    return (out, lse), (q, k, v, segs, q_offset, out, lse)


def _blockwise_core_bwd(causal, scale, block_q, block_k, residuals, cotangents):
    q, k, v, segs, q_offset, out, lse = residuals
    d_out, d_lse = cotangents
    dq, dk, dv = _blockwise_bwd_impl(
        q, k, v, segs, q_offset, out, lse, d_out, d_lse,
        causal=causal, scale=scale, block_q=block_q, block_k=block_k,
    )
    return dq, dk, dv, _zero_cotangent(segs), _zero_cotangent(q_offset)


_blockwise_core.defvjp(_blockwise_core_fwd, _blockwise_core_bwd)


def _zero_cotangent(tree):
    """Cotangents for integer inputs (segment ids, offsets) are float0 zeros."""
    def zero(x):
        x = jnp.asarray(x)
        return jnp.zeros(x.shape, jax.dtypes.float0) if not jnp.issubdtype(
            x.dtype, jnp.floating) else jnp.zeros_like(x)
    return jax.tree.map(zero, tree)


def blockwise_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    causal: bool = True,
    sm_scale: float | None = None,
    segment_ids: SegmentIds = None,
    q_offset: int | jax.Array = 0,
    block_k: int = 512,
    return_lse: bool = False,
    block_q: int | None = None,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """Flash attention in plain ``lax``: loops over query blocks and key blocks.

    q ``[batch, q_len, q_heads, qk_dim]``, k ``[batch, kv_len, kv_heads, qk_dim]``,
    v ``[batch, kv_len, kv_heads, v_dim]`` -> o ``[batch, q_len, q_heads, v_dim]`` (and lse
    ``[batch, q_heads, q_len]`` float32 with ``return_lse``). Memory is O(seq * block) in the
    forward and the backward (a ``custom_vjp`` recomputes probabilities from the saved lse);
    with ``causal`` the key blocks above the diagonal are skipped. ``block_q`` defaults to
    ``block_k``. Masks and conventions as in the module docstring.
    """
    block_q = block_k if block_q is None else block_q
    segs, scale = _validate(q, k, v, segment_ids, sm_scale, block_q, block_k)
    out, lse = _blockwise_core(
        q, k, v, segs, jnp.asarray(q_offset, jnp.int32), bool(causal), scale, int(block_q),
        int(block_k),
    )
    return (out, lse) if return_lse else out


# ----------------------------------------------------------------------------- portable kernels
# One program per (batch, head, tile) that loops over the other sequence, slicing a whole-
# sequence ref: lowered by Mosaic TPU, run by the Pallas interpreter on CPU.


def _load_offset(offset_ref):
    return offset_ref[0, 0]


def _flash_fwd_kernel(offset_ref, q_ref, k_ref, v_ref, *refs, scale, causal, kv_len, block_k,
                      has_segments):
    """One (batch, q head, q block) program: loop over the key blocks it may see.

    q_ref [bq, d], k_ref [sk_pad, d], v_ref [sk_pad, dv]; optional q_seg_ref [bq, 1],
    kv_seg_ref [1, sk_pad]; outputs o_ref [bq, dv], lse_ref [bq, 1]."""
    if has_segments:
        q_seg_ref, kv_seg_ref, o_ref, lse_ref = refs
    else:
        o_ref, lse_ref = refs
    block_q = q_ref.shape[0]
    num_k = k_ref.shape[0] // block_k
    q_offset = _load_offset(offset_ref)
    qi = pl.program_id(2)
    q = q_ref[...]
    q_pos = qi * block_q + lax.broadcasted_iota(jnp.int32, (block_q, block_k), 0)
    q_seg = q_seg_ref[...] if has_segments else None

    def body(ki, carry):
        row_max, row_sum, acc = carry
        start = pl.multiple_of(ki * block_k, block_k)
        k_blk = k_ref[pl.ds(start, block_k), :]
        v_blk = v_ref[pl.ds(start, block_k), :]
        s = lax.dot_general(
            q, k_blk, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32
        ) * scale
        k_pos = start + lax.broadcasted_iota(jnp.int32, (block_q, block_k), 1)
        kv_seg = kv_seg_ref[:, pl.ds(start, block_k)] if has_segments else None
        mask = _block_mask(q_pos, k_pos, kv_len, causal, q_offset, q_seg, kv_seg)
        s = jnp.where(mask, s, _MASK_VALUE)
        max_new = jnp.maximum(row_max, jnp.max(s, axis=1, keepdims=True))
        p = jnp.where(mask, jnp.exp(s - max_new), 0.0)
        alpha = jnp.exp(row_max - max_new)
        sum_new = alpha * row_sum + jnp.sum(p, axis=1, keepdims=True)
        pv = lax.dot_general(
            p.astype(v_blk.dtype), v_blk, (((1,), (0,)), ((), ())),
            preferred_element_type=jnp.float32,
        )
        return max_new, sum_new, alpha * acc + pv

    if causal:
        last_q = qi * block_q + (block_q - 1) + q_offset
        hi = jnp.where(last_q < 0, 0, jnp.clip(lax.div(last_q, block_k) + 1, 0, num_k))
    else:
        hi = num_k
    init = (
        jnp.full((block_q, 1), _MASK_VALUE, jnp.float32),
        jnp.zeros((block_q, 1), jnp.float32),
        jnp.zeros((block_q, v_ref.shape[1]), jnp.float32),
    )
    row_max, row_sum, acc = lax.fori_loop(0, hi, body, init)
    seen = row_sum > 0
    sum_safe = jnp.where(seen, row_sum, 1.0)
    o_ref[...] = (acc / sum_safe).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(seen, row_max + jnp.log(sum_safe), -jnp.inf)


def _flash_dq_kernel(offset_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *refs, scale,
                     causal, kv_len, block_k, has_segments):
    """dq for one (batch, q head, q block): loop over key blocks. Shapes as the forward;
    do_ref [bq, dv], lse_ref/delta_ref [bq, 1]; output dq_ref [bq, d]."""
    if has_segments:
        q_seg_ref, kv_seg_ref, dq_ref = refs
    else:
        (dq_ref,) = refs
    block_q = q_ref.shape[0]
    num_k = k_ref.shape[0] // block_k
    q_offset = _load_offset(offset_ref)
    qi = pl.program_id(2)
    q = q_ref[...]
    d_out = do_ref[...]
    lse = lse_ref[...]
    delta = delta_ref[...]
    q_pos = qi * block_q + lax.broadcasted_iota(jnp.int32, (block_q, block_k), 0)
    q_seg = q_seg_ref[...] if has_segments else None

    def body(ki, dq):
        start = pl.multiple_of(ki * block_k, block_k)
        k_blk = k_ref[pl.ds(start, block_k), :]
        v_blk = v_ref[pl.ds(start, block_k), :]
        s = lax.dot_general(
            q, k_blk, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32
        ) * scale
        k_pos = start + lax.broadcasted_iota(jnp.int32, (block_q, block_k), 1)
        kv_seg = kv_seg_ref[:, pl.ds(start, block_k)] if has_segments else None
        mask = _block_mask(q_pos, k_pos, kv_len, causal, q_offset, q_seg, kv_seg)
        p = jnp.where(mask, jnp.exp(s - lse), 0.0)
        dp = lax.dot_general(
            d_out, v_blk, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32
        )
        ds = p * (dp - delta) * scale
        return dq + lax.dot_general(
            ds.astype(k_blk.dtype), k_blk, (((1,), (0,)), ((), ())),
            preferred_element_type=jnp.float32,
        )

    if causal:
        last_q = qi * block_q + (block_q - 1) + q_offset
        hi = jnp.where(last_q < 0, 0, jnp.clip(lax.div(last_q, block_k) + 1, 0, num_k))
    else:
        hi = num_k
    dq = lax.fori_loop(0, hi, body, jnp.zeros(q_ref.shape, jnp.float32))
    dq_ref[...] = dq.astype(dq_ref.dtype)


def _flash_dkv_kernel(offset_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *refs, scale,
                      causal, kv_len, block_q, has_segments):
    """dk, dv for one (batch, kv head, k block): loop over the q heads of the group and the
    query blocks that see this key block.

    q_ref [groups, sq_pad, d], do_ref [groups, sq_pad, dv], lse_ref/delta_ref [groups, sq_pad, 1],
    k_ref [bk, d], v_ref [bk, dv]; optional q_seg_ref [sq_pad, 1], kv_seg_ref [1, sk_pad];
    outputs dk_ref [bk, d], dv_ref [bk, dv]."""
    if has_segments:
        q_seg_ref, kv_seg_ref, dk_ref, dv_ref = refs
    else:
        dk_ref, dv_ref = refs
    groups, q_pad = q_ref.shape[0], q_ref.shape[1]
    block_k = k_ref.shape[0]
    num_q = q_pad // block_q
    q_offset = _load_offset(offset_ref)
    ki = pl.program_id(2)
    k_blk = k_ref[...]
    v_blk = v_ref[...]
    k_pos = ki * block_k + lax.broadcasted_iota(jnp.int32, (block_q, block_k), 1)
    if has_segments:
        kv_seg = kv_seg_ref[:, pl.ds(pl.multiple_of(ki * block_k, block_k), block_k)]
    else:
        kv_seg = None

    def body(qi, carry):
        dk, dv = carry
        start = pl.multiple_of(qi * block_q, block_q)
        q_pos = start + lax.broadcasted_iota(jnp.int32, (block_q, block_k), 0)
        q_seg = q_seg_ref[pl.ds(start, block_q), :] if has_segments else None
        mask = _block_mask(q_pos, k_pos, kv_len, causal, q_offset, q_seg, kv_seg)
        for g in range(groups):  # static: the q heads sharing this kv head
            q = q_ref[g, pl.ds(start, block_q), :]
            d_out = do_ref[g, pl.ds(start, block_q), :]
            lse = lse_ref[g, pl.ds(start, block_q), :]
            delta = delta_ref[g, pl.ds(start, block_q), :]
            s = lax.dot_general(
                q, k_blk, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32
            ) * scale
            p = jnp.where(mask, jnp.exp(s - lse), 0.0)
            dv = dv + lax.dot_general(
                p.astype(d_out.dtype), d_out, (((0,), (0,)), ((), ())),
                preferred_element_type=jnp.float32,
            )
            dp = lax.dot_general(
                d_out, v_blk, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32
            )
            ds = p * (dp - delta) * scale
            dk = dk + lax.dot_general(
                ds.astype(q.dtype), q, (((0,), (0,)), ((), ())),
                preferred_element_type=jnp.float32,
            )
        return dk, dv

    if causal:
        first_q = ki * block_k - q_offset
        lo = jnp.where(first_q <= 0, 0, jnp.clip(lax.div(first_q, block_q), 0, num_q))
    else:
        lo = 0
    init = (jnp.zeros(k_ref.shape, jnp.float32), jnp.zeros(v_ref.shape, jnp.float32))
    dk, dv = lax.fori_loop(lo, num_q, body, init)
    dk_ref[...] = dk.astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def _to_heads_major(x: jax.Array, seq_pad: int) -> jax.Array:
    """[batch, seq, heads, dim] -> [batch, heads, seq_pad, dim] (zero padded)."""
    return _pad_axis(x, 1, seq_pad).transpose(0, 2, 1, 3)


def _pallas_prepare(q, k, v, segs, block_q, block_k):
    batch, q_len, q_heads, qk_dim, kv_len, kv_heads, v_dim = _check_qkv(q, k, v)
    block_q = max(8, min(block_q, pl.next_power_of_2(q_len)))
    block_k = max(8, min(block_k, pl.next_power_of_2(kv_len)))
    q_pad, k_pad = _round_up(q_len, block_q), _round_up(kv_len, block_k)
    seg_args = ()
    if segs is not None:
        q_seg, kv_seg = segs
        seg_args = (
            _pad_axis(q_seg, 1, q_pad, -1)[:, :, None],  # [b, sq_pad, 1]
            _pad_axis(kv_seg, 1, k_pad, -2)[:, None, :],  # [b, 1, sk_pad]
        )
    dims = dict(
        batch=batch, q_len=q_len, q_heads=q_heads, qk_dim=qk_dim, kv_len=kv_len,
        kv_heads=kv_heads, v_dim=v_dim, groups=q_heads // kv_heads, block_q=block_q,
        block_k=block_k, q_pad=q_pad, k_pad=k_pad,
    )
    return seg_args, dims


def _flash_fwd_pallas(q, k, v, segs, q_offset, *, causal, scale, block_q, block_k, interpret):
    seg_args, d = _pallas_prepare(q, k, v, segs, block_q, block_k)
    bq, bk, groups = d["block_q"], d["block_k"], d["groups"]
    qh = _to_heads_major(q, d["q_pad"])
    kh = _to_heads_major(k, d["k_pad"])
    vh = _to_heads_major(v, d["k_pad"])
    offset = jnp.reshape(q_offset, (1, 1)).astype(jnp.int32)
    grid = (d["batch"], d["q_heads"], d["q_pad"] // bq)
    in_specs = [
        pl.BlockSpec((1, 1), lambda b, h, i: (0, 0)),
        pl.BlockSpec((None, None, bq, d["qk_dim"]), lambda b, h, i: (b, h, i, 0)),
        pl.BlockSpec((None, None, d["k_pad"], d["qk_dim"]), lambda b, h, i: (b, lax.div(h, groups), 0, 0)),
        pl.BlockSpec((None, None, d["k_pad"], d["v_dim"]), lambda b, h, i: (b, lax.div(h, groups), 0, 0)),
    ]
    if seg_args:
        in_specs += [
            pl.BlockSpec((None, bq, 1), lambda b, h, i: (b, i, 0)),
            pl.BlockSpec((None, 1, d["k_pad"]), lambda b, h, i: (b, 0, 0)),
        ]
    kernel = functools.partial(
        _flash_fwd_kernel, scale=scale, causal=causal, kv_len=d["kv_len"], block_k=bk,
        has_segments=bool(seg_args),
    )
    out, lse = pl.pallas_call(
        kernel,
        grid=grid,
        in_specs=in_specs,
        out_specs=[
            pl.BlockSpec((None, None, bq, d["v_dim"]), lambda b, h, i: (b, h, i, 0)),
            pl.BlockSpec((None, None, bq, 1), lambda b, h, i: (b, h, i, 0)),
        ],
        out_shape=[
            jax.ShapeDtypeStruct((d["batch"], d["q_heads"], d["q_pad"], d["v_dim"]), q.dtype),
            jax.ShapeDtypeStruct((d["batch"], d["q_heads"], d["q_pad"], 1), jnp.float32),
        ],
        interpret=interpret,
        name="flash_attention_fwd",
    )(offset, qh, kh, vh, *seg_args)
    out = out[:, :, : d["q_len"]].transpose(0, 2, 1, 3)
    return out, lse[:, :, : d["q_len"], 0]


def _flash_bwd_pallas(q, k, v, segs, q_offset, out, lse, d_out, d_lse, *, causal, scale,
                      block_q, block_k, interpret):
    seg_args, d = _pallas_prepare(q, k, v, segs, block_q, block_k)
    bq, bk, groups = d["block_q"], d["block_k"], d["groups"]
    q_pad, k_pad = d["q_pad"], d["k_pad"]
    delta = jnp.einsum("bqhd,bqhd->bhq", d_out.astype(jnp.float32), out.astype(jnp.float32))
    finite = jnp.isfinite(lse)
    delta = jnp.where(finite, delta - d_lse, 0.0)
    lse = jnp.where(finite, lse, 0.0)
    lse_h = _pad_axis(lse, 2, q_pad)[..., None]  # [b, hq, sq_pad, 1]
    delta_h = _pad_axis(delta, 2, q_pad)[..., None]
    qh = _to_heads_major(q, q_pad)
    doh = _to_heads_major(d_out.astype(q.dtype), q_pad)
    kh = _to_heads_major(k, k_pad)
    vh = _to_heads_major(v, k_pad)
    offset = jnp.reshape(q_offset, (1, 1)).astype(jnp.int32)
    qk_dim, v_dim = d["qk_dim"], d["v_dim"]
    common = dict(scale=scale, causal=causal, kv_len=d["kv_len"], has_segments=bool(seg_args))

    # dq: grid over (batch, q head, q block), loop over key blocks.
    in_specs = [
        pl.BlockSpec((1, 1), lambda b, h, i: (0, 0)),
        pl.BlockSpec((None, None, bq, qk_dim), lambda b, h, i: (b, h, i, 0)),
        pl.BlockSpec((None, None, k_pad, qk_dim), lambda b, h, i: (b, lax.div(h, groups), 0, 0)),
        pl.BlockSpec((None, None, k_pad, v_dim), lambda b, h, i: (b, lax.div(h, groups), 0, 0)),
        pl.BlockSpec((None, None, bq, v_dim), lambda b, h, i: (b, h, i, 0)),
        pl.BlockSpec((None, None, bq, 1), lambda b, h, i: (b, h, i, 0)),
        pl.BlockSpec((None, None, bq, 1), lambda b, h, i: (b, h, i, 0)),
    ]
    if seg_args:
        in_specs += [
            pl.BlockSpec((None, bq, 1), lambda b, h, i: (b, i, 0)),
            pl.BlockSpec((None, 1, k_pad), lambda b, h, i: (b, 0, 0)),
        ]
    dq = pl.pallas_call(
        functools.partial(_flash_dq_kernel, block_k=bk, **common),
        grid=(d["batch"], d["q_heads"], q_pad // bq),
        in_specs=in_specs,
        out_specs=pl.BlockSpec((None, None, bq, qk_dim), lambda b, h, i: (b, h, i, 0)),
        out_shape=jax.ShapeDtypeStruct(qh.shape, q.dtype),
        interpret=interpret,
        name="flash_attention_dq",
    )(offset, qh, kh, vh, doh, lse_h, delta_h, *seg_args)

    # dk, dv: grid over (batch, kv head, key block), loop over the group's q heads and q blocks.
    in_specs = [
        pl.BlockSpec((1, 1), lambda b, h, j: (0, 0)),
        pl.BlockSpec((None, groups, q_pad, qk_dim), lambda b, h, j: (b, h, 0, 0)),
        pl.BlockSpec((None, None, bk, qk_dim), lambda b, h, j: (b, h, j, 0)),
        pl.BlockSpec((None, None, bk, v_dim), lambda b, h, j: (b, h, j, 0)),
        pl.BlockSpec((None, groups, q_pad, v_dim), lambda b, h, j: (b, h, 0, 0)),
        pl.BlockSpec((None, groups, q_pad, 1), lambda b, h, j: (b, h, 0, 0)),
        pl.BlockSpec((None, groups, q_pad, 1), lambda b, h, j: (b, h, 0, 0)),
    ]
    if seg_args:
        in_specs += [
            pl.BlockSpec((None, q_pad, 1), lambda b, h, j: (b, 0, 0)),
            pl.BlockSpec((None, 1, k_pad), lambda b, h, j: (b, 0, 0)),
        ]
    dk, dv = pl.pallas_call(
        functools.partial(_flash_dkv_kernel, block_q=bq, **common),
        grid=(d["batch"], d["kv_heads"], k_pad // bk),
        in_specs=in_specs,
        out_specs=[
            pl.BlockSpec((None, None, bk, qk_dim), lambda b, h, j: (b, h, j, 0)),
            pl.BlockSpec((None, None, bk, v_dim), lambda b, h, j: (b, h, j, 0)),
        ],
        out_shape=[
            jax.ShapeDtypeStruct(kh.shape, k.dtype),
            jax.ShapeDtypeStruct(vh.shape, v.dtype),
        ],
        interpret=interpret,
        name="flash_attention_dkv",
    )(offset, qh, kh, vh, doh, lse_h, delta_h, *seg_args)

    dq = dq[:, :, : d["q_len"]].transpose(0, 2, 1, 3)
    dk = dk[:, :, : d["kv_len"]].transpose(0, 2, 1, 3)
    dv = dv[:, :, : d["kv_len"]].transpose(0, 2, 1, 3)
    return dq, dk, dv


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7, 8, 9, 10))
def _flash_core(q, k, v, segs, q_offset, causal, scale, block_q, block_k, interpret, kernel):
    return _flash_forward(q, k, v, segs, q_offset, causal, scale, block_q, block_k, interpret,
                          kernel)


def _flash_forward(q, k, v, segs, q_offset, causal, scale, block_q, block_k, interpret, kernel):
    if kernel == "mosaic_gpu":
        from pallas_kernels import flash_attention_mosaic_gpu as mgpu

        return mgpu.attention_forward(
            q, k, v, segs, q_offset, causal=causal, scale=scale,
            block_k=mgpu.forward_block_k(q, k, v, block_k), interpret=interpret,
        )
    return _flash_fwd_pallas(
        q, k, v, segs, q_offset, causal=causal, scale=scale, block_q=block_q,
        block_k=block_k, interpret=interpret,
    )


def _flash_core_fwd(q, k, v, segs, q_offset, causal, scale, block_q, block_k, interpret, kernel):
    out, lse = _flash_forward(q, k, v, segs, q_offset, causal, scale, block_q, block_k,
                              interpret, kernel)
    return (out, lse), (q, k, v, segs, q_offset, out, lse)


def _flash_core_bwd(causal, scale, block_q, block_k, interpret, kernel, residuals, cotangents):
    q, k, v, segs, q_offset, out, lse = residuals
    d_out, d_lse = cotangents
    if kernel == "mosaic_gpu":
        from pallas_kernels import flash_attention_mosaic_gpu as mgpu

        dq, dk, dv = mgpu.attention_backward(
            q, k, v, segs, q_offset, out, lse, d_out, d_lse, causal=causal, scale=scale,
            interpret=interpret,
        )
    else:
        dq, dk, dv = _flash_bwd_pallas(
            q, k, v, segs, q_offset, out, lse, d_out, d_lse, causal=causal, scale=scale,
            block_q=block_q, block_k=block_k, interpret=interpret,
        )
    return dq, dk, dv, _zero_cotangent(segs), _zero_cotangent(q_offset)


_flash_core.defvjp(_flash_core_fwd, _flash_core_bwd)

KERNELS = ("auto", "portable", "mosaic_gpu")


def _cuda_hopper() -> bool:
    """True when the default device is an NVIDIA Hopper GPU (compute capability 9.x): the kernels
    use wgmma, which only sm_90a has (Blackwell's tensor-core instructions are different)."""
    capability = getattr(jax.devices()[0], "compute_capability", None)
    try:
        return capability is not None and 9.0 <= float(capability) < 10.0
    except (TypeError, ValueError):
        return False


def _select_kernel(kernel: str, dtypes: tuple[Any, ...], interpret: bool) -> str:
    """Resolve ``kernel``: "portable" (TPU Mosaic, CPU interpreter), "mosaic_gpu" (Hopper), or
    "blockwise" (the lax path: the Mosaic GPU choice for inputs that are not all bfloat16 or
    all float16, see flash_attention)."""
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
    if kernel == "auto":
        if jax.default_backend() != "gpu" or interpret:
            kernel = "portable"
        elif _cuda_hopper():
            kernel = "mosaic_gpu"
        else:  # not Hopper (older or newer NVIDIA, ROCm): no kernels of ours there
            return "blockwise"
    half = {jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)}
    if kernel == "mosaic_gpu" and not (len(set(dtypes)) == 1 and jnp.dtype(dtypes[0]) in half):
        return "blockwise"
    return kernel


def flash_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    causal: bool = True,
    sm_scale: float | None = None,
    segment_ids: SegmentIds = None,
    q_offset: int | jax.Array = 0,
    block_q: int = 128,
    block_k: int = 128,
    return_lse: bool = False,
    interpret: bool | None = None,
    kernel: str = "auto",
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """Flash attention as Pallas kernels, differentiable through ``jax.custom_vjp``.

    Args:
      q: ``[batch, q_len, q_heads, qk_dim]``.
      k: ``[batch, kv_len, kv_heads, qk_dim]``; ``q_heads % kv_heads == 0`` (GQA/MQA).
      v: ``[batch, kv_len, kv_heads, v_dim]``; ``v_dim`` may differ from ``qk_dim`` (MLA).
      causal: keep key ``j`` for query ``i`` when ``j <= i + q_offset``.
      sm_scale: score scale; default ``qk_dim ** -0.5``.
      segment_ids: ``[batch, seq]`` ints, or ``(q_segment_ids, kv_segment_ids)``.
      q_offset: position of query 0 (int or traced int32 scalar).
      block_q, block_k: tile sizes of the portable kernels (clipped to the padded sequence
        lengths). Lengths need not be multiples: tails are padded and masked. The Mosaic GPU
        kernels use 64-row query tiles and 64- or 128-column key tiles (128 when
        ``block_k >= 128`` and the head dims are <= 128).
      return_lse: also return the float32 log-sum-exp ``[batch, q_heads, q_len]``.
      interpret: run the kernels in a Pallas interpreter; ``None`` = on CPU only.
      kernel: ``"auto"`` (Mosaic GPU kernels on an NVIDIA Hopper GPU, compute capability 9.x,
        the lax blockwise path on other GPUs, the portable kernels elsewhere),
        ``"portable"`` (one kernel pair for TPU, lowered by Mosaic TPU, and the CPU
        interpreter) or ``"mosaic_gpu"`` (Hopper kernels; with ``interpret`` they run in Pallas's
        Mosaic GPU interpreter). The Mosaic GPU kernels take q, k, v all bfloat16 or all
        float16: Hopper's tensor cores have no full-precision float32 matmul, so float32 (or
        mixed) inputs on that path run the ``lax`` blockwise algorithm
        (:func:`blockwise_attention`) instead, exactly.

    Returns:
      ``o [batch, q_len, q_heads, v_dim]`` in q's dtype, and ``lse`` when ``return_lse``.
      Rows that see no key give ``o = 0`` and ``lse = -inf``.
    """
    segs, scale = _validate(q, k, v, segment_ids, sm_scale, block_q, block_k)
    interpret = _default_interpret(interpret)
    kernel = _select_kernel(kernel, (q.dtype, k.dtype, v.dtype), interpret)
    offset = jnp.asarray(q_offset, jnp.int32)
    if kernel == "blockwise":
        out, lse = _blockwise_core(
            q, k, v, segs, offset, bool(causal), scale, int(block_q), int(block_k)
        )
    else:
        out, lse = _flash_core(
            q, k, v, segs, offset, bool(causal), scale, int(block_q), int(block_k), interpret,
            kernel,
        )
    return (out, lse) if return_lse else out
