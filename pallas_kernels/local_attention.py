"""One local-attention interface, ``(out, lse)``, over the implementations of this package.

Everything that attends to a block of keys on one device and may need to merge the result with
other partial attentions (the kernel backends of ``cpmjax.ops``, the BurstAttention ring, the
APB hosts) calls :func:`local_attention`, choosing an implementation with ``impl=``:

- ``"reference"``: :func:`attention_reference` (materialised float32 scores; ground truth);
- ``"blockwise"``: :func:`blockwise_attention` (``lax`` loops over blocks, O(seq) memory; the
  CPU path);
- ``"pallas"``: :func:`flash_attention` (Pallas kernels; interpreted on CPU);
- ``"auto"``: ``"blockwise"`` on CPU, ``"pallas"`` on GPU/TPU;
- a callable with the signature of :func:`local_attention` (minus ``impl``).

The same names (:data:`IMPLS`) choose an implementation everywhere in the library (keyword
``impl=``). ``"xla"``, the old name of the reference in ``cpmjax.ops``, is still accepted by
:func:`resolve_impl` with a ``DeprecationWarning``.

Which *lowering* of the Pallas kernels runs (the portable kernels for TPU and the CPU
interpreter, or the Hopper kernels of :mod:`pallas_kernels.flash_attention_mosaic_gpu`) is not
an implementation choice but a sub-option of ``"pallas"``: ``kernel=`` of
:func:`flash_attention` (``"auto"`` | ``"portable"`` | ``"mosaic_gpu"``), passed through here.

Block sizes are options of the implementation that takes them (``block_q``, ``block_k``); left
as None they take that implementation's defaults (blockwise: ``block_k=512``, ``block_q =
block_k``; pallas: 128 and 128), so a call site that passes nothing keeps its numbers.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import jax

from pallas_kernels._common import SegmentIds
from pallas_kernels.flash_attention import (
    attention_reference,
    blockwise_attention,
    flash_attention,
)

__all__ = [
    "IMPLS",
    "LocalAttention",
    "local_attention",
    "local_attention_fn",
    "resolve_impl",
]

#: The implementation names accepted by ``impl=`` across the library.
IMPLS = ("auto", "reference", "blockwise", "pallas")
#: Deprecated names, resolved with a ``DeprecationWarning``.
ALIASES = {"xla": "reference"}

# (q, k, v, *, causal, q_offset, sm_scale, segment_ids, **block_sizes) -> (out, lse)
LocalAttention = Callable[..., tuple[jax.Array, jax.Array]]


def resolve_impl(impl: str, *, keyword: str = "impl", stacklevel: int = 2) -> str:
    """The canonical name of ``impl``: one of :data:`IMPLS` (``"xla"`` -> ``"reference"`` with a
    ``DeprecationWarning``). Raises ``ValueError`` naming ``keyword`` for an unknown name."""
    if impl in ALIASES:
        new = ALIASES[impl]
        warnings.warn(f"{keyword}={impl!r} is deprecated; use {keyword}={new!r}",
                      DeprecationWarning, stacklevel=stacklevel + 1)
        return new
    if impl not in IMPLS:
        raise ValueError(f"{keyword}={impl!r} is not one of {IMPLS}")
    return impl


def _auto() -> str:
    return "blockwise" if jax.default_backend() == "cpu" else "pallas"


def _reference(q, k, v, *, causal, q_offset=0, sm_scale=None, segment_ids=None, **_: Any):
    return attention_reference(q, k, v, causal=causal, q_offset=q_offset, sm_scale=sm_scale,
                               segment_ids=segment_ids, return_lse=True)


def _blockwise(q, k, v, *, causal, q_offset=0, sm_scale=None, segment_ids=None,
               block_q: int | None = None, block_k: int | None = None, **_: Any):
    return blockwise_attention(q, k, v, causal=causal, sm_scale=sm_scale,
                               segment_ids=segment_ids, q_offset=q_offset,
                               block_k=512 if block_k is None else block_k, block_q=block_q,
                               return_lse=True)


def _pallas(q, k, v, *, causal, q_offset=0, sm_scale=None, segment_ids=None,
            block_q: int | None = None, block_k: int | None = None,
            interpret: bool | None = None, kernel: str = "auto", **_: Any):
    return flash_attention(q, k, v, causal=causal, sm_scale=sm_scale, segment_ids=segment_ids,
                           q_offset=q_offset, block_q=128 if block_q is None else block_q,
                           block_k=128 if block_k is None else block_k, return_lse=True,
                           interpret=interpret, kernel=kernel)


_IMPLEMENTATIONS: dict[str, LocalAttention] = {
    "reference": _reference,
    "blockwise": _blockwise,
    "pallas": _pallas,
}


def local_attention_fn(impl: str | LocalAttention = "auto") -> LocalAttention:
    """The implementation ``impl`` names (``"auto"`` resolved for the default backend now), or
    ``impl`` itself when it is a callable. Raises ``ValueError`` for an unknown name."""
    if callable(impl):
        return impl
    name = resolve_impl(impl, stacklevel=3)
    return _IMPLEMENTATIONS[_auto() if name == "auto" else name]


def local_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    causal: bool,
    q_offset: int | jax.Array = 0,
    sm_scale: float | None = None,
    segment_ids: SegmentIds = None,
    impl: str | LocalAttention = "auto",
    **options: Any,
) -> tuple[jax.Array, jax.Array]:
    """Attention of one block of queries over one block of keys, with its log-sum-exp.

    Args:
      q: ``[batch, lq, q_heads, qk_dim]``; query ``i`` sits at position ``q_offset + i``.
      k: ``[batch, lk, kv_heads, qk_dim]`` (``q_heads % kv_heads == 0``, never repeated); key
        ``j`` sits at position ``j``.
      v: ``[batch, lk, kv_heads, v_dim]``.
      causal: keep key ``j`` for query ``i`` when ``j <= i + q_offset``.
      q_offset: int or traced int32 scalar.
      sm_scale: score scale, default ``qk_dim ** -0.5``.
      segment_ids: ``[batch, seq]`` (``lq == lk``) or ``(q_seg [batch, lq], kv_seg [batch,
        lk])``: a query sees only keys of its segment.
      impl: ``"auto"`` | ``"reference"`` | ``"blockwise"`` | ``"pallas"`` or a callable.
      options: implementation options: ``block_q``, ``block_k`` (blockwise, pallas),
        ``interpret``, ``kernel`` (pallas: the lowering, see the module docstring); an
        implementation ignores the options it does not take.

    Returns:
      ``out [batch, lq, q_heads, v_dim]`` in q's dtype and ``lse [batch, q_heads, lq]``
      float32 of the scaled scores; a row that sees no key gets ``out = 0``, ``lse = -inf``.
    """
    fn = local_attention_fn(impl)
    return fn(q, k, v, causal=causal, q_offset=q_offset, sm_scale=sm_scale,
              segment_ids=segment_ids, **options)
