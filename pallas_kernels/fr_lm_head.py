"""Frequency-ranked LM head (FR-Spec draft head): top-k log-probs over a vocabulary subset.

The draft model of FR-Spec scores only a frequency-ranked subset of the vocabulary. Given
``hidden [tokens, d]`` (any leading dims), ``weight [vocab, d]`` (tied embedding or head) and
``subset_ids [subset]`` (full-vocabulary ids, most frequent first; ``None`` = whole vocabulary),
every implementation returns

- ``top_ids [tokens, top_k]`` int32: full-vocabulary ids of the ``top_k`` highest logits of the
  subset, best first; ties go to the earlier subset position;
- ``top_logprobs [tokens, top_k]`` float32: those logits minus the log-sum-exp over the subset
  (log-probabilities normalised over the subset).

Three implementations:

- :func:`fr_lm_head`: a Pallas kernel. Each program takes a block of tokens and walks the
  (gathered, contiguous) subset weight in vocabulary tiles, keeping a running top-k (merged by
  ``top_k`` rounds of max-selection) and a running log-sum-exp; the ``[tokens, subset]`` logits
  are never written to memory. It lowers through Mosaic TPU and runs interpreted on CPU. There
  is no Mosaic GPU version yet: on a GPU (``interpret`` False) ``fr_lm_head`` runs
  :func:`fr_lm_head_blockwise`, which XLA compiles for the GPU.
- :func:`fr_lm_head_blockwise`: the same walk as a ``lax.scan`` over tiles with ``lax.top_k``
  merges; the fast path on CPU.
- :func:`fr_lm_head_reference`: full logits, ``log_softmax``, ``lax.top_k``.

Scoring cost is ``2 * tokens * subset * d`` FLOPs against ``2 * tokens * vocab * d`` for the full
head. ``fr_lm_head`` gathers ``weight[subset_ids]`` on every call; a caller that keeps the
subset weight can pass it as ``weight`` with ``subset_ids=None`` and map the returned positions
with ``subset_ids[top_ids]`` itself.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

__all__ = ["fr_lm_head", "fr_lm_head_blockwise", "fr_lm_head_reference"]

_NEG_INF = float("-inf")


def _default_interpret(interpret: bool | None) -> bool:
    if interpret is None:
        return jax.default_backend() == "cpu"
    return bool(interpret)


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def _prepare(
    hidden: jax.Array, weight: jax.Array, subset_ids: jax.Array | None, top_k: int
) -> tuple[jax.Array, jax.Array, tuple[int, ...]]:
    """Validate; return (hidden [tokens, d], subset weight [subset, d], leading shape)."""
    if hidden.ndim < 1 or weight.ndim != 2:
        raise ValueError(
            f"hidden must be [..., d] and weight [vocab, d]; got {tuple(hidden.shape)} and "
            f"{tuple(weight.shape)}"
        )
    if hidden.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"hidden dim {hidden.shape[-1]} != weight dim {weight.shape[1]} (weight is [vocab, d])"
        )
    if subset_ids is not None:
        subset_ids = jnp.asarray(subset_ids)
        if subset_ids.ndim != 1:
            raise ValueError(f"subset_ids must be 1-D [subset], got shape {subset_ids.shape}")
        sub_weight = jnp.take(weight, subset_ids, axis=0)
    else:
        sub_weight = weight
    subset = sub_weight.shape[0]
    if not 1 <= top_k <= subset:
        raise ValueError(f"top_k={top_k} must be in [1, subset size {subset}]")
    lead = hidden.shape[:-1]
    return hidden.reshape(-1, hidden.shape[-1]), sub_weight, lead


def _finish(positions, values, lse, subset_ids, lead, top_k):
    ids = positions if subset_ids is None else jnp.take(jnp.asarray(subset_ids), positions)
    logprobs = values - lse
    return (
        ids.astype(jnp.int32).reshape(*lead, top_k),
        logprobs.astype(jnp.float32).reshape(*lead, top_k),
    )


def fr_lm_head_reference(
    hidden: jax.Array,
    weight: jax.Array,
    subset_ids: jax.Array | None = None,
    *,
    top_k: int,
    block_v: int | None = None,
    interpret: bool | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Materialise the ``[tokens, subset]`` float32 logits, then ``log_softmax`` + ``top_k``.

    hidden ``[..., d]``, weight ``[vocab, d]``, subset_ids ``[subset]`` or None ->
    (top_ids ``[..., top_k]`` int32, top_logprobs ``[..., top_k]`` float32).
    ``block_v``/``interpret`` are accepted for signature parity and ignored."""
    del block_v, interpret
    flat, sub_weight, lead = _prepare(hidden, weight, subset_ids, top_k)
    logits = jnp.einsum("td,vd->tv", flat, sub_weight, preferred_element_type=jnp.float32)
    lse = jax.nn.logsumexp(logits, axis=-1, keepdims=True)
    values, positions = lax.top_k(logits, top_k)
    return _finish(positions, values, lse, subset_ids, lead, top_k)


def fr_lm_head_blockwise(
    hidden: jax.Array,
    weight: jax.Array,
    subset_ids: jax.Array | None = None,
    *,
    top_k: int,
    block_v: int = 4096,
    interpret: bool | None = None,
) -> tuple[jax.Array, jax.Array]:
    """``lax.scan`` over vocabulary tiles of ``block_v`` rows: running top-k and log-sum-exp.

    Same arguments and results as :func:`fr_lm_head_reference`; peak extra memory is one
    ``[tokens, block_v]`` tile of logits. ``interpret`` is ignored."""
    del interpret
    flat, sub_weight, lead = _prepare(hidden, weight, subset_ids, top_k)
    tokens, dim = flat.shape
    subset = sub_weight.shape[0]
    block_v = max(1, min(block_v, subset))
    padded = _round_up(subset, block_v)
    tiles = jnp.pad(sub_weight, ((0, padded - subset), (0, 0))).reshape(-1, block_v, dim)

    def step(carry, args):
        values, positions, row_max, row_sum = carry
        tile_index, tile = args
        logits = jnp.einsum("td,vd->tv", flat, tile, preferred_element_type=jnp.float32)
        tile_pos = tile_index * block_v + jnp.arange(block_v, dtype=jnp.int32)
        logits = jnp.where(tile_pos[None, :] < subset, logits, _NEG_INF)
        new_max = jnp.maximum(row_max, jnp.max(logits, axis=-1, keepdims=True))
        row_sum = row_sum * jnp.exp(row_max - new_max) + jnp.sum(
            jnp.exp(logits - new_max), axis=-1, keepdims=True
        )
        merged_values = jnp.concatenate([values, logits], axis=-1)
        merged_pos = jnp.concatenate(
            [positions, jnp.broadcast_to(tile_pos, (tokens, block_v))], axis=-1
        )
        values, picked = lax.top_k(merged_values, top_k)
        positions = jnp.take_along_axis(merged_pos, picked, axis=-1)
        return (values, positions, new_max, row_sum), None

    # The first tile holds at least one real logit, so row_max is finite after it.
    init = (
        jnp.full((tokens, top_k), _NEG_INF, jnp.float32),
        jnp.zeros((tokens, top_k), jnp.int32),
        jnp.full((tokens, 1), -jnp.finfo(jnp.float32).max, jnp.float32),
        jnp.zeros((tokens, 1), jnp.float32),
    )
    (values, positions, row_max, row_sum), _ = lax.scan(
        step, init, (jnp.arange(tiles.shape[0], dtype=jnp.int32), tiles)
    )
    lse = row_max + jnp.log(row_sum)
    return _finish(positions, values, lse, subset_ids, lead, top_k)


def _hidden_chunk(dim: int) -> int:
    """Chunk of the hidden dim for the in-kernel matmuls (bounds the live tile size): the
    largest of 512..64 dividing ``dim`` (2304 -> 256), else ``dim`` padded to a power of 2
    (small dims) or to a multiple of 128."""
    for chunk in (512, 256, 128, 64):
        if dim % chunk == 0:
            return chunk
    return pl.next_power_of_2(dim) if dim < 128 else 128


def _fr_head_kernel(hidden_ref, weight_ref, values_ref, positions_ref, lse_ref, *, subset,
                    block_v, block_d, top_k):
    """One block of tokens: hidden_ref [bt, d], weight_ref [subset_pad, d] ->
    values_ref/positions_ref [bt, top_k] (best first), lse_ref [bt, 1]."""
    block_t = hidden_ref.shape[0]
    num_tiles = weight_ref.shape[0] // block_v
    dim = hidden_ref.shape[1]
    k_cols = lax.broadcasted_iota(jnp.int32, (block_t, top_k), 1)
    v_cols = lax.broadcasted_iota(jnp.int32, (block_t, block_v), 1)
    big = jnp.int32(2**30)

    def merge(run_values, run_pos, tile_values, tile_start):
        """Best ``top_k`` of (running list, tile) by ``top_k`` rounds of max-selection.

        Ties prefer the running list, then the lower column: the earlier subset position."""

        def pick(j, state):
            run_left, tile_left, out_values, out_pos = state
            run_best = jnp.max(run_left, axis=1, keepdims=True)
            tile_best = jnp.max(tile_left, axis=1, keepdims=True)
            from_run = run_best >= tile_best
            run_col = jnp.min(jnp.where(run_left == run_best, k_cols, big), axis=1,
                              keepdims=True)
            tile_col = jnp.min(jnp.where(tile_left == tile_best, v_cols, big), axis=1,
                               keepdims=True)
            run_hit = k_cols == run_col
            best = jnp.where(from_run, run_best, tile_best)
            best_pos = jnp.where(
                from_run,
                jnp.sum(jnp.where(run_hit, run_pos, 0), axis=1, keepdims=True),
                tile_start + tile_col,
            )
            run_left = jnp.where(from_run & run_hit, _NEG_INF, run_left)
            tile_left = jnp.where(~from_run & (v_cols == tile_col), _NEG_INF, tile_left)
            out_values = jnp.where(k_cols == j, best, out_values)
            out_pos = jnp.where(k_cols == j, best_pos, out_pos)
            return run_left, tile_left, out_values, out_pos

        state = (run_values, tile_values, run_values, run_pos)
        _, _, out_values, out_pos = lax.fori_loop(0, top_k, pick, state)
        return out_values, out_pos

    def body(tile_index, carry):
        run_values, run_pos, row_max, row_sum = carry
        start = pl.multiple_of(tile_index * block_v, block_v)
        logits = jnp.zeros((block_t, block_v), jnp.float32)
        for chunk in range(0, dim, block_d):  # static: d in power-of-2 chunks
            tile = weight_ref[pl.ds(start, block_v), pl.ds(chunk, block_d)]
            logits = logits + lax.dot_general(
                hidden_ref[:, pl.ds(chunk, block_d)], tile, (((1,), (1,)), ((), ())),
                preferred_element_type=jnp.float32,
            )
        logits = jnp.where(start + v_cols < subset, logits, _NEG_INF)
        new_max = jnp.maximum(row_max, jnp.max(logits, axis=1, keepdims=True))
        row_sum = row_sum * jnp.exp(row_max - new_max) + jnp.sum(
            jnp.exp(logits - new_max), axis=1, keepdims=True
        )
        run_values, run_pos = merge(run_values, run_pos, logits, start)
        return run_values, run_pos, new_max, row_sum

    init = (
        jnp.full((block_t, top_k), _NEG_INF, jnp.float32),
        jnp.zeros((block_t, top_k), jnp.int32),
        jnp.full((block_t, 1), -jnp.finfo(jnp.float32).max, jnp.float32),
        jnp.zeros((block_t, 1), jnp.float32),
    )
    values, positions, row_max, row_sum = lax.fori_loop(0, num_tiles, body, init)
    values_ref[...] = values
    positions_ref[...] = positions
    lse_ref[...] = row_max + jnp.log(row_sum)


def fr_lm_head(
    hidden: jax.Array,
    weight: jax.Array,
    subset_ids: jax.Array | None = None,
    *,
    top_k: int,
    block_v: int = 512,
    block_t: int = 32,
    interpret: bool | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Top-k log-probs over a vocabulary subset, as a Pallas kernel (logits never stored).

    Args:
      hidden: ``[..., d]`` final hidden states (any float dtype; logits accumulate in float32).
      weight: ``[vocab, d]`` tied embedding or LM head.
      subset_ids: ``[subset]`` full-vocabulary ids (frequency ranked), or None for the whole
        vocabulary.
      top_k: number of candidates per token, ``1 <= top_k <= subset``.
      block_v: vocabulary tile (rows of the subset weight per step); the subset need not be a
        multiple: the tail tile is masked.
      block_t: tokens per program.
      interpret: run in the Pallas interpreter; ``None`` = on CPU only. On a GPU without
        ``interpret`` this runs :func:`fr_lm_head_blockwise` (tiles of at least 4096 rows).

    Returns:
      ``(top_ids [..., top_k] int32, top_logprobs [..., top_k] float32)``, best first.
    """
    interpret = _default_interpret(interpret)
    if not interpret and jax.default_backend() == "gpu":
        # No Mosaic GPU version of this kernel yet: on GPU the lax walk (XLA-compiled, one
        # [tokens, block_v] logits tile live at a time) is the implementation.
        return fr_lm_head_blockwise(
            hidden, weight, subset_ids, top_k=top_k, block_v=max(block_v, 4096)
        )
    flat, sub_weight, lead = _prepare(hidden, weight, subset_ids, top_k)
    tokens, dim = flat.shape
    subset = sub_weight.shape[0]
    block_v = max(8, min(block_v, pl.next_power_of_2(subset)))
    block_t = max(8, min(block_t, pl.next_power_of_2(tokens)))
    block_d = _hidden_chunk(dim)
    tokens_pad = _round_up(tokens, block_t)
    subset_pad = _round_up(subset, block_v)
    dim_pad = _round_up(dim, block_d)
    flat_p = jnp.pad(flat, ((0, tokens_pad - tokens), (0, dim_pad - dim)))
    weight_p = jnp.pad(sub_weight, ((0, subset_pad - subset), (0, dim_pad - dim)))
    dim = dim_pad
    kernel = functools.partial(
        _fr_head_kernel, subset=subset, block_v=block_v, block_d=block_d, top_k=top_k
    )
    values, positions, lse = pl.pallas_call(
        kernel,
        grid=(tokens_pad // block_t,),
        in_specs=[
            pl.BlockSpec((block_t, dim), lambda i: (i, 0)),
            pl.BlockSpec((subset_pad, dim), lambda i: (0, 0)),
        ],
        out_specs=[
            pl.BlockSpec((block_t, top_k), lambda i: (i, 0)),
            pl.BlockSpec((block_t, top_k), lambda i: (i, 0)),
            pl.BlockSpec((block_t, 1), lambda i: (i, 0)),
        ],
        out_shape=[
            jax.ShapeDtypeStruct((tokens_pad, top_k), jnp.float32),
            jax.ShapeDtypeStruct((tokens_pad, top_k), jnp.int32),
            jax.ShapeDtypeStruct((tokens_pad, 1), jnp.float32),
        ],
        interpret=interpret,
        name="fr_lm_head",
    )(flat_p, weight_p)
    return _finish(
        positions[:tokens], values[:tokens], lse[:tokens], subset_ids, lead, top_k
    )
