"""The seams models call: ``attention(...)`` and ``lm_head(...)``.

Models never call a kernel directly. ``attention`` dispatches to a backend chosen by the
``backend=`` argument, else by the innermost ``attention_backend(...)`` context, else ``"xla"``
for key lengths under ``LONG_SEQUENCE`` (2048) and ``"blockwise"`` from there on:

- ``"xla"``: the reference (materialised scores, float32 softmax). Supports every mask.
- ``"blockwise"``: ``pallas_kernels.blockwise_attention`` (lax scan over key blocks, O(seq)
  memory); what CPU training uses for long sequences.
- ``"pallas"``: ``pallas_kernels.flash_attention`` (Pallas; interpreted on CPU).
- ``"burst"``: ``sharding.burst.burst_attention`` (sequence-parallel ring; needs ``mesh=``).
- ``"apb"``: ``sharding.apb`` (distributed long-context prefill; needs ``mesh=``).

Kernel backends handle index-causal masks with segment ids (training and prefill). Calls with
explicit ``q_positions``/``kv_positions`` or ``mask`` (decoding against a KV cache, draft trees)
always run on the reference path, which is cheap for those shapes.

Layout everywhere: q ``[batch, q_len, q_heads, qk_dim]``, k ``[batch, kv_len, kv_heads, qk_dim]``,
v ``[batch, kv_len, kv_heads, v_dim]``; q_heads is a multiple of kv_heads (GQA, never repeated
in memory).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp

from cpmjax.errors import ConfigError

AttentionFn = Callable[..., jax.Array]

_REGISTRY: dict[str, AttentionFn] = {}
_STATE = threading.local()
_MASK_VALUE = -1e30
LONG_SEQUENCE = 2048  # with no backend selected, key lengths from here on run "blockwise"


def register_attention_backend(name: str, fn: AttentionFn) -> None:
    """Register ``fn(q, k, v, *, causal, segment_ids, sm_scale, **options) -> out``."""
    _REGISTRY[name] = fn


def available_backends() -> list[str]:
    _load_builtin_backends()
    return sorted(_REGISTRY)


@contextlib.contextmanager
def attention_backend(name: str, **options: Any) -> Iterator[None]:
    """Select the attention backend (and its options, e.g. ``mesh=``) inside a ``with`` block.

    The choice is read when a function is traced, so wrap the call that traces (``jit``)."""
    stack = getattr(_STATE, "stack", None)
    if stack is None:
        stack = _STATE.stack = []
    stack.append((name, options))
    try:
        yield
    finally:
        stack.pop()


@contextlib.contextmanager
def attention_transform(transform: Callable[[AttentionFn], AttentionFn]) -> Iterator[None]:
    """Inside the block, ``attention(...)`` runs ``transform(impl)`` instead of ``impl`` (the
    dispatcher). Deltas use it to change attention without touching model code (prefix tuning
    prepends learned keys/values). Thread-local; read at trace time."""
    stack = getattr(_STATE, "transforms", None)
    if stack is None:
        stack = _STATE.transforms = []
    stack.append(transform)
    try:
        yield
    finally:
        stack.pop()


def current_backend() -> tuple[str, dict[str, Any]]:
    stack = getattr(_STATE, "stack", None)
    if stack:
        return stack[-1]
    return "xla", {}


def build_mask(
    batch: int,
    q_len: int,
    kv_len: int,
    *,
    causal: bool,
    q_positions: jax.Array | None = None,
    kv_positions: jax.Array | None = None,
    segment_ids: jax.Array | None = None,
    kv_segment_ids: jax.Array | None = None,
    mask: jax.Array | None = None,
) -> jax.Array | None:
    """Boolean mask ``[batch, q_len, kv_len]`` (True = attend), or None when nothing is masked."""
    result = None

    def _and(a, b):
        return b if a is None else a & b

    if causal:
        if q_positions is None and kv_positions is None:
            # index-causal, queries aligned to the end of the keys
            qi = jnp.arange(q_len)[:, None] + (kv_len - q_len)
            ki = jnp.arange(kv_len)[None, :]
            result = jnp.broadcast_to(ki <= qi, (batch, q_len, kv_len))
        else:
            qp = q_positions if q_positions is not None else jnp.arange(q_len) + (kv_len - q_len)
            kp = kv_positions if kv_positions is not None else jnp.arange(kv_len)
            qp = jnp.broadcast_to(jnp.asarray(qp), (batch, q_len))
            kp = jnp.broadcast_to(jnp.asarray(kp), (batch, kv_len))
            result = kp[:, None, :] <= qp[:, :, None]
    if segment_ids is not None:
        kv_seg = segment_ids if kv_segment_ids is None else kv_segment_ids
        result = _and(result, segment_ids[:, :, None] == kv_seg[:, None, :])
    if mask is not None:
        result = _and(result, jnp.broadcast_to(mask, (batch, q_len, kv_len)))
    return result


def xla_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    causal: bool = True,
    q_positions: jax.Array | None = None,
    kv_positions: jax.Array | None = None,
    segment_ids: jax.Array | None = None,
    kv_segment_ids: jax.Array | None = None,
    mask: jax.Array | None = None,
    sm_scale: float | None = None,
    return_lse: bool = False,
    **unused: Any,
):
    """Reference attention. Fully masked query rows return zeros (lse = -inf)."""
    batch, q_len, q_heads, qk_dim = q.shape
    kv_len, kv_heads = k.shape[1], k.shape[2]
    groups = q_heads // kv_heads
    scale = qk_dim**-0.5 if sm_scale is None else sm_scale
    qg = q.reshape(batch, q_len, kv_heads, groups, qk_dim)
    scores = jnp.einsum("bqhgd,bkhd->bhgqk", qg, k, preferred_element_type=jnp.float32) * scale
    full_mask = build_mask(
        batch, q_len, kv_len, causal=causal, q_positions=q_positions, kv_positions=kv_positions,
        segment_ids=segment_ids, kv_segment_ids=kv_segment_ids, mask=mask,
    )
    if full_mask is not None:
        scores = jnp.where(full_mask[:, None, None], scores, _MASK_VALUE)
    row_max = jnp.max(scores, axis=-1, keepdims=True)
    weights = jnp.exp(scores - row_max)
    if full_mask is not None:
        weights = jnp.where(full_mask[:, None, None], weights, 0.0)
    denom = jnp.sum(weights, axis=-1, keepdims=True)
    probs = weights / jnp.where(denom == 0, 1.0, denom)
    out = jnp.einsum(
        "bhgqk,bkhd->bqhgd", probs.astype(v.dtype), v, preferred_element_type=jnp.float32
    )
    out = out.reshape(batch, q_len, q_heads, v.shape[-1]).astype(q.dtype)
    if return_lse:
        lse = jnp.where(denom[..., 0] > 0, row_max[..., 0] + jnp.log(denom[..., 0]), -jnp.inf)
        return out, lse.reshape(batch, q_heads, q_len)
    return out


_REGISTRY["xla"] = xla_attention
_BUILTINS_LOADED = False


def _load_builtin_backends() -> None:
    """Register the kernel and distributed backends (imported lazily: they are optional)."""
    global _BUILTINS_LOADED
    if _BUILTINS_LOADED:
        return
    _BUILTINS_LOADED = True
    from cpmjax import _backends  # noqa: F401  (registers on import)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, **kwargs: Any) -> jax.Array:
    """Multi-head attention ``[b, sq, hq, dqk] x [b, sk, hkv, dqk] x [b, sk, hkv, dv] ->
    [b, sq, hq, dv]``; see the module docstring for backends and masks. Keywords: ``causal``,
    ``q_positions``, ``kv_positions``, ``segment_ids``, ``kv_segment_ids``, ``mask``,
    ``sm_scale``, ``backend`` and backend options."""
    impl = _dispatch
    for transform in reversed(getattr(_STATE, "transforms", None) or ()):
        impl = transform(impl)
    return impl(q, k, v, **kwargs)


def _dispatch(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    causal: bool = True,
    q_positions: jax.Array | None = None,
    kv_positions: jax.Array | None = None,
    segment_ids: jax.Array | None = None,
    kv_segment_ids: jax.Array | None = None,
    mask: jax.Array | None = None,
    sm_scale: float | None = None,
    backend: str | None = None,
    **options: Any,
) -> jax.Array:
    if backend is None:
        stack = getattr(_STATE, "stack", None)
        if stack:
            backend, ctx_options = stack[-1]
            options = {**ctx_options, **options}
        elif k.shape[1] >= LONG_SEQUENCE:
            # No backend chosen: long sequences take the O(seq)-memory blockwise kernel, which
            # also skips the fully masked causal blocks the reference computes.
            backend = "blockwise"
        else:
            backend = "xla"
    needs_reference = q_positions is not None or kv_positions is not None or mask is not None
    if needs_reference or backend == "xla":
        return xla_attention(
            q, k, v, causal=causal, q_positions=q_positions, kv_positions=kv_positions,
            segment_ids=segment_ids, kv_segment_ids=kv_segment_ids, mask=mask, sm_scale=sm_scale,
        )
    _load_builtin_backends()
    if backend not in _REGISTRY:
        raise ConfigError(
            f"unknown attention backend {backend!r}; available: {sorted(_REGISTRY)}"
        )
    return _REGISTRY[backend](
        q, k, v, causal=causal, segment_ids=segment_ids, kv_segment_ids=kv_segment_ids,
        sm_scale=sm_scale, **options,
    )


def lm_head(hidden: jax.Array, weight: jax.Array) -> jax.Array:
    """Logits in float32: ``hidden [..., d] @ weight[vocab, d].T -> [..., vocab]``."""
    return jnp.einsum("...d,vd->...v", hidden, weight, preferred_element_type=jnp.float32)
