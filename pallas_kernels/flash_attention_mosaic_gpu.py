"""Flash attention kernels for Hopper GPUs through Pallas's Mosaic GPU backend.

The GPU half of :func:`pallas_kernels.flash_attention` (``kernel="mosaic_gpu"``, the default on
GPU). Same conventions as the module :mod:`pallas_kernels.flash_attention` (layout, GQA, causal
with ``q_offset``, segment ids, fully masked rows, log-sum-exp); three kernels:

- forward: one program per (q head, 64-row query tile, batch). The query tile is copied to
  shared memory (TMA), then a loop over the key tiles the tile may see (causal tiles above
  the ``q_offset``-shifted diagonal are never loaded) runs ``S = Q K^T`` and ``O += P V`` on
  the tensor cores (``wgmma``, float32 accumulators) with an online softmax in registers. The
  next key/value tile is prefetched into the other half of a double buffer while the current
  one is in use. Emits the float32 log-sum-exp.
- dq: one program per (q head, query tile, batch), looping over key tiles:
  ``dS = P * (dO V^T - delta)``, ``dQ += dS K``.
- dk/dv: one program per (kv head, key tile, batch), looping over the q heads of its GQA group
  and the query tiles that see the key tile: ``dV += P^T dO``, ``dK += dS^T Q``. The group's
  contributions are summed inside the kernel (no per-q-head dk/dv in memory).

Design choices that keep one kernel body valid both on the GPU and in Pallas's Mosaic GPU
interpreter (which is how the numerics are tested on machines without a GPU):

- every ``wgmma`` operand is a shared-memory tile in its natural ``(K, N)`` order: the
  transposed operands (``K^T``, ``V^T``, ``Q^T``, ``dO^T``) are transposed once in HBM by the
  wrapper, and the probabilities ``P`` / ``dS`` go through a shared-memory tile instead of
  registers;
- register-layout annotations (``plgpu.layout_cast`` / ``plgpu.broadcasted_iota``) are emitted
  only when compiling for the GPU; they do not change values.

Wrapper-side constraints: sequences are padded to the tile sizes (tails masked in the kernel),
head dims are zero-padded to a multiple of 64 (exact: zero columns change neither ``q.k`` nor the
kept columns of ``p @ v``), ``q_offset`` travels in a small int32 metadata vector so one
compilation serves every offset. Inputs must be bfloat16 or float16 for the GPU: Hopper's
``wgmma`` has no full-precision float32 mode (float32 operands would run as tf32), so the public
wrapper sends float32 inputs to the ``lax`` blockwise path instead.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels._common import (
    _MASK_VALUE,
    _block_mask,
    _pad_axis,
    _round_up,
)

BLOCK_Q = 64  # query rows per program: one warpgroup's wgmma M
DIM_MULTIPLE = 64  # head dims are zero-padded to this (128-byte swizzled bf16 rows)
_META_WORDS = 32  # int32 metadata vector (a TMA copy moves a multiple of 128 bytes)
# Double-buffer the streamed tiles only when the estimate stays under this (H100/H200 allow a
# block 227 KiB; tests/test_flash_attention_mosaic_gpu.py checks the lowered totals).
_SMEM_BUDGET = 200 * 1024


def interpret_params() -> Any:
    """Pallas's Mosaic GPU interpreter parameters (runs these kernels on CPU for tests)."""
    params = getattr(plgpu, "InterpretParams", None)
    if params is None:
        try:
            from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams as params
        except ImportError as error:  # pragma: no cover - depends on the jax version
            raise NotImplementedError(
                f"jax {jax.__version__} has no Mosaic GPU interpreter; run the Mosaic GPU "
                "kernels on a GPU or use kernel='portable'"
            ) from error
    return params()


# ----------------------------------------------------------------------------- in-kernel helpers


class _Ctx:
    """Register-layout helpers; layouts are GPU codegen hints, omitted in the interpreter."""

    def __init__(self, interpret: bool):
        self.interpret = interpret

    def layout(self, x: jax.Array, layout: Any) -> jax.Array:
        return x if self.interpret else plgpu.layout_cast(x, layout)

    def iota(self, shape: tuple[int, int], dim: int) -> jax.Array:
        if self.interpret:
            return lax.broadcasted_iota(jnp.int32, shape, dim)
        return plgpu.broadcasted_iota(jnp.int32, shape, dim, layout=plgpu.Layout.WGMMA)

    def rows(self, x: jax.Array) -> jax.Array:
        """A per-row vector ``[m]`` in the layout that broadcasts along the columns."""
        return self.layout(x, plgpu.Layout.WGMMA.reduce(1))

    def cols(self, x: jax.Array) -> jax.Array:
        """A per-column vector ``[n]`` in the layout that broadcasts along the rows."""
        return self.layout(x, plgpu.Layout.WGMMA.reduce(0))

    def zeros(self, shape: tuple[int, int]) -> jax.Array:
        return self.layout(jnp.zeros(shape, jnp.float32), plgpu.Layout.WGMMA)

    def full_rows(self, size: int, value: float) -> jax.Array:
        return self.rows(jnp.full((size,), value, jnp.float32))


def _matmul(a_smem, b_smem, shape: tuple[int, int]) -> jax.Array:
    """``a [m, k] @ b [k, n]`` on the tensor cores, float32 result in registers."""

    def run(acc_ref):
        plgpu.wgmma(acc_ref, a_smem, b_smem)
        return acc_ref[...]

    return pl.run_scoped(run, plgpu.ACC(shape, jnp.float32))


def _to_smem(smem_ref, value: jax.Array) -> None:
    """Store registers into a shared-memory tile and fence it for the tensor cores / TMA."""
    smem_ref[...] = value.astype(smem_ref.dtype)
    plgpu.commit_smem()


def _bcast_rows(x: jax.Array, shape: tuple[int, int]) -> jax.Array:
    return lax.broadcast_in_dim(x, shape, [0])


def _bcast_cols(x: jax.Array, shape: tuple[int, int]) -> jax.Array:
    return lax.broadcast_in_dim(x, shape, [1])


def _tile(shape: tuple[int, ...], dtype: Any) -> Any:
    """A swizzled shared-memory tile (the layout TMA and wgmma expect)."""
    itemsize = jnp.dtype(dtype).itemsize
    transforms = (plgpu.TilingTransform((8, 128 // itemsize)), plgpu.SwizzleTransform(128))
    return plgpu.SMEM(shape, dtype, transforms=transforms)


def _vec(shape: tuple[int, ...], dtype: Any) -> Any:
    return plgpu.SMEM(shape, dtype)


def _kv_steps_causal(q_start, q_offset, block_q: int, block_k: int, num_k: int):
    """Key tiles ``[0, hi)`` that queries ``q_start .. q_start + block_q - 1`` may see."""
    last_q = q_start + (block_q - 1) + q_offset
    return jnp.where(last_q < 0, 0, jnp.minimum(lax.div(last_q, block_k) + 1, num_k))


def _first_q_block_causal(k_start, q_offset, block_q: int, num_q: int):
    """First query tile that sees a key at ``k_start`` or later."""
    first_q = k_start - q_offset
    return jnp.where(first_q <= 0, 0, jnp.minimum(lax.div(first_q, block_q), num_q))


def _loop(lo, hi, slots: int, fetch, compute, carry):
    """``for step in [lo, hi)``: ``compute(step, slot, carry)`` with ``fetch(step, slot)``
    issued one step ahead when two buffer slots exist (double buffering)."""
    if slots == 2:

        @pl.when(lo < hi)
        def _():
            fetch(lo, 0)

    def body(step, carry):
        if slots == 2:
            slot = lax.rem(step - lo, 2)

            @pl.when(step + 1 < hi)
            def _():
                fetch(step + 1, 1 - slot)

        else:
            slot = 0
            fetch(step, slot)
        return compute(step, slot, carry)

    return lax.fori_loop(lo, hi, body, carry)


# ----------------------------------------------------------------------------- forward kernel


def _query_tile_mask(ctx, s, slot, shape, k_start, q_first, kv_len, causal, q_seg_rows):
    """Mask of a ``(block_q, block_k)`` score tile in the kernels that own a query tile
    (forward, dq): queries at ``q_first + i``, keys at ``k_start + j``; with segments
    (``q_seg_rows`` set) waits for the key tile's segment ids in ``s["kv_seg"][slot]``."""
    q_pos = ctx.iota(shape, 0) + q_first
    k_pos = ctx.iota(shape, 1) + k_start
    q_seg = kv_seg = None
    if q_seg_rows is not None:
        q_seg = _bcast_rows(q_seg_rows, shape)
        plgpu.barrier_wait(s["bar_seg"].at[slot])
        kv_seg = _bcast_cols(ctx.cols(s["kv_seg"].at[slot][...]), shape)
    return _block_mask(q_pos, k_pos, kv_len, causal, 0, q_seg, kv_seg)


def _fwd_kernel(*refs, scale, causal, kv_len, block_k, groups, has_segments, slots, interpret):
    """Inputs: meta [32] (meta[0] = q_offset), q [b, sq, hq, d], k^T [b, hkv, d, sk],
    v [b, sk, hkv, dv], optional q_seg [b, sq], kv_seg [b, sk]; outputs o [b, sq, hq, dv],
    lse [b, hq, sq]; then the scratch refs (keyword)."""
    ctx = _Ctx(interpret)
    n_in = 6 if has_segments else 4
    meta_ref, q_ref, kt_ref, v_ref = refs[:4]
    q_seg_ref, kv_seg_ref = refs[4:6] if has_segments else (None, None)
    o_ref, lse_ref, s = refs[n_in], refs[n_in + 1], refs[n_in + 2]  # s: the scratch refs
    block_q = s["q"].shape[0]
    v_dim = s["v"].shape[-1]
    num_k = kt_ref.shape[-1] // block_k
    head = lax.axis_index("heads")
    q_start = lax.axis_index("blocks") * block_q
    batch = lax.axis_index("batch")
    kv_head = lax.div(head, groups)

    plgpu.copy_gmem_to_smem(meta_ref, s["meta"], s["bar_q"].at[0])
    plgpu.copy_gmem_to_smem(q_ref.at[batch, pl.ds(q_start, block_q), head], s["q"],
                            s["bar_q"].at[1])
    if has_segments:
        plgpu.copy_gmem_to_smem(q_seg_ref.at[batch, pl.ds(q_start, block_q)], s["q_seg"],
                                s["bar_q"].at[2])
        plgpu.barrier_wait(s["bar_q"].at[2])
    plgpu.barrier_wait(s["bar_q"].at[0])
    plgpu.barrier_wait(s["bar_q"].at[1])
    q_offset = s["meta"][0]
    hi = _kv_steps_causal(q_start, q_offset, block_q, block_k, num_k) if causal else num_k
    shape = (block_q, block_k)
    # Per-row vectors stay 1-D across the loop; 2-D broadcasts are made per step (registers).
    q_seg_rows = ctx.rows(s["q_seg"][...]) if has_segments else None

    def fetch(step, slot):
        keys = pl.ds(step * block_k, block_k)
        plgpu.copy_gmem_to_smem(kt_ref.at[batch, kv_head, :, keys], s["kt"].at[slot],
                                s["bar_k"].at[slot])
        plgpu.copy_gmem_to_smem(v_ref.at[batch, keys, kv_head], s["v"].at[slot],
                                s["bar_v"].at[slot])
        if has_segments:
            plgpu.copy_gmem_to_smem(kv_seg_ref.at[batch, keys], s["kv_seg"].at[slot],
                                    s["bar_seg"].at[slot])

    def compute(step, slot, carry):
        row_max, row_sum, acc = carry
        plgpu.barrier_wait(s["bar_k"].at[slot])
        scores = _matmul(s["q"], s["kt"].at[slot], shape) * scale
        mask = _query_tile_mask(ctx, s, slot, shape, step * block_k, q_start + q_offset,
                                kv_len, causal, q_seg_rows)
        scores = jnp.where(mask, scores, _MASK_VALUE)
        max_new = jnp.maximum(row_max, scores.max(axis=1))
        probs = jnp.where(mask, jnp.exp(scores - _bcast_rows(max_new, shape)), 0.0)
        alpha = jnp.exp(row_max - max_new)
        sum_new = alpha * row_sum + probs.sum(axis=1)
        _to_smem(s["p"], probs)
        plgpu.barrier_wait(s["bar_v"].at[slot])
        pv = _matmul(s["p"], s["v"].at[slot], (block_q, v_dim))
        return max_new, sum_new, _bcast_rows(alpha, acc.shape) * acc + pv

    init = (
        ctx.full_rows(block_q, _MASK_VALUE),
        ctx.full_rows(block_q, 0.0),
        ctx.zeros((block_q, v_dim)),
    )
    row_max, row_sum, acc = _loop(0, hi, slots, fetch, compute, init)
    seen = row_sum > 0
    sum_safe = jnp.where(seen, row_sum, 1.0)
    _to_smem(s["o"], acc / _bcast_rows(sum_safe, acc.shape))
    s["lse"][...] = jnp.where(seen, row_max + jnp.log(sum_safe), -jnp.inf)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(s["o"], o_ref.at[batch, pl.ds(q_start, block_q), head])
    plgpu.copy_smem_to_gmem(s["lse"], lse_ref.at[batch, head, pl.ds(q_start, block_q)])
    plgpu.wait_smem_to_gmem(0)


# ----------------------------------------------------------------------------- dq kernel


def _dq_kernel(*refs, scale, causal, kv_len, block_k, groups, has_segments, slots, interpret):
    """Inputs: meta, q [b, sq, hq, d], k [b, sk, hkv, d], k^T [b, hkv, d, sk],
    v^T [b, hkv, dv, sk], dO [b, sq, hq, dv], lse/delta [b, hq, sq], optional segment ids;
    output dq [b, sq, hq, d]; then the scratch refs."""
    ctx = _Ctx(interpret)
    n_in = 10 if has_segments else 8
    meta_ref, q_ref, k_ref, kt_ref, vt_ref, do_ref, lse_ref, delta_ref = refs[:8]
    q_seg_ref, kv_seg_ref = refs[8:10] if has_segments else (None, None)
    dq_ref, s = refs[n_in], refs[n_in + 1]  # s: the scratch refs
    block_q, qk_dim = s["q"].shape
    num_k = kt_ref.shape[-1] // block_k
    head = lax.axis_index("heads")
    q_start = lax.axis_index("blocks") * block_q
    batch = lax.axis_index("batch")
    kv_head = lax.div(head, groups)
    rows = pl.ds(q_start, block_q)

    bar = s["bar_q"]
    plgpu.copy_gmem_to_smem(meta_ref, s["meta"], bar.at[0])
    plgpu.copy_gmem_to_smem(q_ref.at[batch, rows, head], s["q"], bar.at[1])
    plgpu.copy_gmem_to_smem(do_ref.at[batch, rows, head], s["do"], bar.at[2])
    plgpu.copy_gmem_to_smem(lse_ref.at[batch, head, rows], s["lse"], bar.at[3])
    plgpu.copy_gmem_to_smem(delta_ref.at[batch, head, rows], s["delta"], bar.at[4])
    if has_segments:
        plgpu.copy_gmem_to_smem(q_seg_ref.at[batch, rows], s["q_seg"], bar.at[5])
        plgpu.barrier_wait(bar.at[5])
    for i in range(5):
        plgpu.barrier_wait(bar.at[i])
    q_offset = s["meta"][0]
    hi = _kv_steps_causal(q_start, q_offset, block_q, block_k, num_k) if causal else num_k
    shape = (block_q, block_k)
    q_seg_rows = ctx.rows(s["q_seg"][...]) if has_segments else None
    lse_rows = ctx.rows(s["lse"][...])
    delta_rows = ctx.rows(s["delta"][...])

    def fetch(step, slot):
        keys = pl.ds(step * block_k, block_k)
        plgpu.copy_gmem_to_smem(kt_ref.at[batch, kv_head, :, keys], s["kt"].at[slot],
                                s["bar_kt"].at[slot])
        plgpu.copy_gmem_to_smem(vt_ref.at[batch, kv_head, :, keys], s["vt"].at[slot],
                                s["bar_vt"].at[slot])
        plgpu.copy_gmem_to_smem(k_ref.at[batch, keys, kv_head], s["k"].at[slot],
                                s["bar_k"].at[slot])
        if has_segments:
            plgpu.copy_gmem_to_smem(kv_seg_ref.at[batch, keys], s["kv_seg"].at[slot],
                                    s["bar_seg"].at[slot])

    def compute(step, slot, dq):
        plgpu.barrier_wait(s["bar_kt"].at[slot])
        scores = _matmul(s["q"], s["kt"].at[slot], shape) * scale
        mask = _query_tile_mask(ctx, s, slot, shape, step * block_k, q_start + q_offset,
                                kv_len, causal, q_seg_rows)
        probs = jnp.where(mask, jnp.exp(scores - _bcast_rows(lse_rows, shape)), 0.0)
        plgpu.barrier_wait(s["bar_vt"].at[slot])
        dp = _matmul(s["do"], s["vt"].at[slot], shape)
        _to_smem(s["ds"], probs * (dp - _bcast_rows(delta_rows, shape)) * scale)
        plgpu.barrier_wait(s["bar_k"].at[slot])
        return dq + _matmul(s["ds"], s["k"].at[slot], (block_q, qk_dim))

    dq = _loop(0, hi, slots, fetch, compute, ctx.zeros((block_q, qk_dim)))
    _to_smem(s["q"], dq)
    plgpu.copy_smem_to_gmem(s["q"], dq_ref.at[batch, rows, head])
    plgpu.wait_smem_to_gmem(0)


# ----------------------------------------------------------------------------- dk/dv kernel


def _dkv_kernel(*refs, scale, causal, kv_len, block_q, groups, has_segments, slots, interpret):
    """Inputs: meta, q [b, sq, hq, d], q^T [b, hq, d, sq], k [b, sk, hkv, d],
    v [b, sk, hkv, dv], dO [b, sq, hq, dv], dO^T [b, hq, dv, sq], lse/delta [b, hq, sq],
    optional segment ids; outputs dk [b, sk, hkv, d], dv [b, sk, hkv, dv]; then scratch.

    Rows of every tile here are keys and columns are queries (the transposed problem)."""
    ctx = _Ctx(interpret)
    n_in = 11 if has_segments else 9
    meta_ref, q_ref, qt_ref, k_ref, v_ref, do_ref, dot_ref, lse_ref, delta_ref = refs[:9]
    q_seg_ref, kv_seg_ref = refs[9:11] if has_segments else (None, None)
    dk_ref, dv_ref, s = refs[n_in], refs[n_in + 1], refs[n_in + 2]  # s: the scratch refs
    block_k, qk_dim = s["k"].shape
    v_dim = s["v"].shape[1]
    num_q = qt_ref.shape[-1] // block_q
    kv_head = lax.axis_index("heads")
    k_start = lax.axis_index("blocks") * block_k
    batch = lax.axis_index("batch")
    keys = pl.ds(k_start, block_k)

    bar = s["bar_k"]
    plgpu.copy_gmem_to_smem(meta_ref, s["meta"], bar.at[0])
    plgpu.copy_gmem_to_smem(k_ref.at[batch, keys, kv_head], s["k"], bar.at[1])
    plgpu.copy_gmem_to_smem(v_ref.at[batch, keys, kv_head], s["v"], bar.at[2])
    if has_segments:
        plgpu.copy_gmem_to_smem(kv_seg_ref.at[batch, keys], s["kv_seg"], bar.at[3])
        plgpu.barrier_wait(bar.at[3])
    for i in range(3):
        plgpu.barrier_wait(bar.at[i])
    q_offset = s["meta"][0]
    lo = _first_q_block_causal(k_start, q_offset, block_q, num_q) if causal else 0
    span = num_q - lo  # query tiles per q head of the group
    shape = (block_k, block_q)
    kv_seg_rows = ctx.rows(s["kv_seg"][...]) if has_segments else None

    def head_and_rows(step):
        group = lax.div(step, jnp.maximum(span, 1))
        q_block = lo + lax.rem(step, jnp.maximum(span, 1))
        return kv_head * groups + group, q_block

    def fetch(step, slot):
        head, q_block = head_and_rows(step)
        rows = pl.ds(q_block * block_q, block_q)
        for name, ref, index in (
            ("qt", qt_ref, (batch, head, slice(None), rows)),
            ("q", q_ref, (batch, rows, head)),
            ("do", do_ref, (batch, rows, head)),
            ("dot", dot_ref, (batch, head, slice(None), rows)),
            ("lse", lse_ref, (batch, head, rows)),
            ("delta", delta_ref, (batch, head, rows)),
        ):
            plgpu.copy_gmem_to_smem(ref.at[index], s[name].at[slot], s["bar_" + name].at[slot])
        if has_segments:
            plgpu.copy_gmem_to_smem(q_seg_ref.at[batch, rows], s["q_seg"].at[slot],
                                    s["bar_q_seg"].at[slot])

    def compute(step, slot, carry):
        dk, dv = carry
        _, q_block = head_and_rows(step)
        plgpu.barrier_wait(s["bar_qt"].at[slot])
        scores = _matmul(s["k"], s["qt"].at[slot], shape) * scale  # [keys, queries]
        q_pos = ctx.iota(shape, 1) + (q_block * block_q + q_offset)
        k_pos = ctx.iota(shape, 0) + k_start
        q_seg = kv_seg = None
        if has_segments:
            kv_seg = _bcast_rows(kv_seg_rows, shape)
            plgpu.barrier_wait(s["bar_q_seg"].at[slot])
            q_seg = _bcast_cols(ctx.cols(s["q_seg"].at[slot][...]), shape)
        mask = _block_mask(q_pos, k_pos, kv_len, causal, 0, q_seg, kv_seg)
        plgpu.barrier_wait(s["bar_lse"].at[slot])
        lse = _bcast_cols(ctx.cols(s["lse"].at[slot][...]), shape)
        probs = jnp.where(mask, jnp.exp(scores - lse), 0.0)
        _to_smem(s["p"], probs)
        plgpu.barrier_wait(s["bar_do"].at[slot])
        dv = dv + _matmul(s["p"], s["do"].at[slot], (block_k, v_dim))
        plgpu.barrier_wait(s["bar_dot"].at[slot])
        dp = _matmul(s["v"], s["dot"].at[slot], shape)
        plgpu.barrier_wait(s["bar_delta"].at[slot])
        delta = _bcast_cols(ctx.cols(s["delta"].at[slot][...]), shape)
        _to_smem(s["ds"], probs * (dp - delta) * scale)
        plgpu.barrier_wait(s["bar_q"].at[slot])
        dk = dk + _matmul(s["ds"], s["q"].at[slot], (block_k, qk_dim))
        return dk, dv

    init = (ctx.zeros((block_k, qk_dim)), ctx.zeros((block_k, v_dim)))
    dk, dv = _loop(0, groups * span, slots, fetch, compute, init)
    _to_smem(s["k"], dk)
    _to_smem(s["v"], dv)
    plgpu.copy_smem_to_gmem(s["k"], dk_ref.at[batch, keys, kv_head])
    plgpu.copy_smem_to_gmem(s["v"], dv_ref.at[batch, keys, kv_head])
    plgpu.wait_smem_to_gmem(0)


# ----------------------------------------------------------------------------- wrappers


def _nbytes(shape: tuple[int, ...], dtype: Any) -> int:
    size = jnp.dtype(dtype).itemsize
    for n in shape:
        size *= n
    return size


def _slots(per_slot_bytes: int, fixed_bytes: int) -> int:
    """Double-buffer the streamed tiles when both copies fit the shared-memory budget."""
    return 2 if fixed_bytes + 2 * per_slot_bytes <= _SMEM_BUDGET else 1


def _meta(q_offset: jax.Array) -> jax.Array:
    return jnp.zeros((_META_WORDS,), jnp.int32).at[0].set(jnp.asarray(q_offset, jnp.int32))


def _call(body, *, out_type, scratch, grid, interpret, name):
    def run(*refs, **scratch_refs):  # plgpu.kernel hands the scratch dict over as keywords
        return body(*refs, scratch_refs)

    run.__name__ = name  # the kernel's name in profiles
    extra = {"interpret": interpret_params()} if interpret else {}
    return plgpu.kernel(
        run,
        out_type=out_type,
        scratch_types=scratch,
        grid=grid,
        grid_names=("heads", "blocks", "batch"),
        compiler_params=plgpu.CompilerParams(),
        **extra,
    )


def _prepare(q, k, v, segs, block_k):
    """Pad sequences to the tiles and head dims to DIM_MULTIPLE; return arrays and sizes."""
    batch, q_len, q_heads, qk_dim = q.shape
    kv_len, kv_heads, v_dim = k.shape[1], k.shape[2], v.shape[3]
    d_pad, dv_pad = _round_up(qk_dim, DIM_MULTIPLE), _round_up(v_dim, DIM_MULTIPLE)
    q_pad, k_pad = _round_up(q_len, BLOCK_Q), _round_up(kv_len, block_k)
    q = _pad_axis(_pad_axis(q, 1, q_pad), 3, d_pad)
    k = _pad_axis(_pad_axis(k, 1, k_pad), 3, d_pad)
    v = _pad_axis(_pad_axis(v, 1, k_pad), 3, dv_pad)
    seg_args = ()
    if segs is not None:
        seg_args = (_pad_axis(segs[0], 1, q_pad, -1), _pad_axis(segs[1], 1, k_pad, -2))
    sizes = dict(
        batch=batch, q_len=q_len, q_heads=q_heads, qk_dim=qk_dim, kv_len=kv_len,
        kv_heads=kv_heads, v_dim=v_dim, d_pad=d_pad, dv_pad=dv_pad, q_pad=q_pad, k_pad=k_pad,
        groups=q_heads // kv_heads, block_k=block_k,
    )
    return q, k, v, seg_args, sizes


def forward_block_k(q: jax.Array, k: jax.Array, v: jax.Array, block_k: int) -> int:
    """The key tile the forward kernel uses: 64 or 128 (128 only when head dims are <= 128)."""
    wide = max(_round_up(q.shape[3], DIM_MULTIPLE), _round_up(v.shape[3], DIM_MULTIPLE)) <= 128
    return 128 if block_k >= 128 and wide and k.shape[1] > 64 else 64


def attention_forward(q, k, v, segs, q_offset, *, causal, scale, block_k, interpret):
    """``(o [b, sq, hq, dv] in q's dtype, lse [b, hq, sq] float32)`` via the Mosaic GPU kernel.

    ``block_k`` must come from :func:`forward_block_k`."""
    dtype = q.dtype
    q, k, v, seg_args, n = _prepare(q, k, v, segs, block_k)
    kt = k.transpose(0, 2, 3, 1)  # [b, hkv, d, sk]
    fixed = (_nbytes((BLOCK_Q, n["d_pad"]), dtype) + _nbytes((BLOCK_Q, block_k), dtype)
             + _nbytes((BLOCK_Q, n["dv_pad"]), dtype) + 4 * (_META_WORDS + 2 * BLOCK_Q))
    per_slot = (_nbytes((n["d_pad"], block_k), dtype) + _nbytes((block_k, n["dv_pad"]), dtype)
                + 4 * block_k)
    slots = _slots(per_slot, fixed)
    scratch = dict(
        meta=_vec((_META_WORDS,), jnp.int32),
        q=_tile((BLOCK_Q, n["d_pad"]), dtype),
        kt=_tile((slots, n["d_pad"], block_k), dtype),
        v=_tile((slots, block_k, n["dv_pad"]), dtype),
        p=_tile((BLOCK_Q, block_k), dtype),
        o=_tile((BLOCK_Q, n["dv_pad"]), dtype),
        lse=_vec((BLOCK_Q,), jnp.float32),
        bar_q=plgpu.Barrier(num_barriers=3),
        bar_k=plgpu.Barrier(num_barriers=slots),
        bar_v=plgpu.Barrier(num_barriers=slots),
    )
    if seg_args:
        scratch.update(
            q_seg=_vec((BLOCK_Q,), jnp.int32),
            kv_seg=_vec((slots, block_k), jnp.int32),
            bar_seg=plgpu.Barrier(num_barriers=slots),
        )
    body = functools.partial(
        _fwd_kernel, scale=scale, causal=causal, kv_len=n["kv_len"], block_k=block_k,
        groups=n["groups"], has_segments=bool(seg_args), slots=slots, interpret=interpret,
    )
    out_type = (
        jax.ShapeDtypeStruct((n["batch"], n["q_pad"], n["q_heads"], n["dv_pad"]), dtype),
        jax.ShapeDtypeStruct((n["batch"], n["q_heads"], n["q_pad"]), jnp.float32),
    )
    out, lse = _call(
        body, out_type=out_type, scratch=scratch, interpret=interpret,
        grid=(n["q_heads"], n["q_pad"] // BLOCK_Q, n["batch"]), name="flash_attention_fwd_mgpu",
    )(_meta(q_offset), q, kt, v, *seg_args)
    return out[:, : n["q_len"], :, : n["v_dim"]], lse[:, :, : n["q_len"]]


def attention_backward(q, k, v, segs, q_offset, out, lse, d_out, d_lse, *, causal, scale,
                       interpret):
    """``(dq, dk, dv)`` via the Mosaic GPU dq and dk/dv kernels (64 x 64 tiles)."""
    dtype = q.dtype
    block = BLOCK_Q
    delta = jnp.einsum("bqhd,bqhd->bhq", d_out.astype(jnp.float32), out.astype(jnp.float32))
    finite = jnp.isfinite(lse)
    delta = jnp.where(finite, delta - d_lse, 0.0)
    lse = jnp.where(finite, lse, 0.0)
    qp, kp, vp, seg_args, n = _prepare(q, k, v, segs, block)
    d_pad, dv_pad = n["d_pad"], n["dv_pad"]
    dop = _pad_axis(_pad_axis(d_out.astype(dtype), 1, n["q_pad"]), 3, dv_pad)
    lse = _pad_axis(lse, 2, n["q_pad"])
    delta = _pad_axis(delta, 2, n["q_pad"])
    kt = kp.transpose(0, 2, 3, 1)
    vt = vp.transpose(0, 2, 3, 1)
    qt = qp.transpose(0, 2, 3, 1)
    dot = dop.transpose(0, 2, 3, 1)
    meta = _meta(q_offset)
    has_segments = bool(seg_args)
    common = dict(scale=scale, causal=causal, kv_len=n["kv_len"], groups=n["groups"],
                  has_segments=has_segments, interpret=interpret)
    vec_bytes = 4 * (_META_WORDS + 3 * block)

    # dq: grid over (q head, query tile, batch), loop over key tiles.
    fixed = (_nbytes((block, d_pad), dtype) + _nbytes((block, dv_pad), dtype)
             + _nbytes((block, block), dtype) + vec_bytes)
    per_slot = (2 * _nbytes((d_pad, block), dtype) + _nbytes((dv_pad, block), dtype)
                + 4 * block)
    slots = _slots(per_slot, fixed)
    scratch = dict(
        meta=_vec((_META_WORDS,), jnp.int32),
        q=_tile((block, d_pad), dtype),
        do=_tile((block, dv_pad), dtype),
        lse=_vec((block,), jnp.float32),
        delta=_vec((block,), jnp.float32),
        ds=_tile((block, block), dtype),
        kt=_tile((slots, d_pad, block), dtype),
        vt=_tile((slots, dv_pad, block), dtype),
        k=_tile((slots, block, d_pad), dtype),
        bar_q=plgpu.Barrier(num_barriers=6),
        bar_kt=plgpu.Barrier(num_barriers=slots),
        bar_vt=plgpu.Barrier(num_barriers=slots),
        bar_k=plgpu.Barrier(num_barriers=slots),
    )
    if has_segments:
        scratch.update(
            q_seg=_vec((block,), jnp.int32),
            kv_seg=_vec((slots, block), jnp.int32),
            bar_seg=plgpu.Barrier(num_barriers=slots),
        )
    body = functools.partial(_dq_kernel, block_k=block, slots=slots, **common)
    dq = _call(
        body, out_type=jax.ShapeDtypeStruct(qp.shape, dtype), scratch=scratch,
        grid=(n["q_heads"], n["q_pad"] // block, n["batch"]), interpret=interpret,
        name="flash_attention_dq_mgpu",
    )(meta, qp, kp, kt, vt, dop, lse, delta, *seg_args)

    # dk, dv: grid over (kv head, key tile, batch), loop over the group's q heads and q tiles.
    fixed = (_nbytes((block, d_pad), dtype) + _nbytes((block, dv_pad), dtype)
             + 2 * _nbytes((block, block), dtype) + 4 * (_META_WORDS + block))
    per_slot = (2 * _nbytes((d_pad, block), dtype) + 2 * _nbytes((dv_pad, block), dtype)
                + 4 * 3 * block)
    slots = _slots(per_slot, fixed)
    scratch = dict(
        meta=_vec((_META_WORDS,), jnp.int32),
        k=_tile((block, d_pad), dtype),
        v=_tile((block, dv_pad), dtype),
        p=_tile((block, block), dtype),
        ds=_tile((block, block), dtype),
        qt=_tile((slots, d_pad, block), dtype),
        q=_tile((slots, block, d_pad), dtype),
        do=_tile((slots, block, dv_pad), dtype),
        dot=_tile((slots, dv_pad, block), dtype),
        lse=_vec((slots, block), jnp.float32),
        delta=_vec((slots, block), jnp.float32),
        bar_k=plgpu.Barrier(num_barriers=4),
    )
    for name in ("qt", "q", "do", "dot", "lse", "delta"):
        scratch["bar_" + name] = plgpu.Barrier(num_barriers=slots)
    if has_segments:
        scratch.update(
            kv_seg=_vec((block,), jnp.int32),
            q_seg=_vec((slots, block), jnp.int32),
            bar_q_seg=plgpu.Barrier(num_barriers=slots),
        )
    body = functools.partial(_dkv_kernel, block_q=block, slots=slots, **common)
    dk, dv = _call(
        body,
        out_type=(jax.ShapeDtypeStruct(kp.shape, dtype), jax.ShapeDtypeStruct(vp.shape, dtype)),
        scratch=scratch, grid=(n["kv_heads"], n["k_pad"] // block, n["batch"]),
        interpret=interpret, name="flash_attention_dkv_mgpu",
    )(meta, qp, qt, kp, vp, dop, dot, lse, delta, *seg_args)
    q_len, kv_len = n["q_len"], n["kv_len"]
    return (
        dq[:, :q_len, :, : n["qk_dim"]],
        dk[:, :kv_len, :, : n["qk_dim"]],
        dv[:, :kv_len, :, : n["v_dim"]],
    )
