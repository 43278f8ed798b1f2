"""The seams models call: ``attention(...)`` and ``lm_head(...)``.

Models never call a kernel directly. ``attention`` runs the implementation chosen by the
``impl=`` argument, else by the innermost ``attention_backend(...)`` context, else
``"reference"`` for key lengths under ``LONG_SEQUENCE`` (2048) and ``"blockwise"`` from there
on. The names are the library's one vocabulary (``pallas_kernels.IMPLS``) plus the
distributed backends:

- ``"reference"``: :func:`xla_attention` (materialised scores, float32 softmax). Supports every
  mask. (``"xla"`` is its deprecated name: accepted with a ``DeprecationWarning``.)
- ``"blockwise"``: ``pallas_kernels.blockwise_attention`` (lax scan over key blocks, O(seq)
  memory); what CPU training uses for long sequences.
- ``"pallas"``: ``pallas_kernels.flash_attention`` (Pallas; interpreted on CPU).
- ``"burst"``: ``sharding.burst.burst_attention`` (sequence-parallel ring; needs ``mesh=``).
- ``"apb"``: ``sharding.apb`` (distributed long-context prefill; needs ``mesh=``).
- ``"auto"`` (or None): the context's choice, else the length rule above.
- a callable local attention ``(q, k, v, *, causal, q_offset, sm_scale, segment_ids) -> (out,
  lse)`` (see ``pallas_kernels.local_attention``).

The backends live in :mod:`cpmjax.attention_backends` (``register_attention_backend`` adds
one). ``backend=`` is the deprecated name of ``impl=``.

Kernel backends handle index-causal masks with segment ids (training and prefill). Calls with
explicit ``q_positions``/``kv_positions`` or ``mask`` (decoding against a KV cache, draft trees)
always run on the reference path, which is cheap for those shapes. Every other keyword is a
backend option: ``layer=`` (the model's layer index, which the APB backend's per-layer
retaining heads read; the others ignore it), ``mesh=``, block sizes ...

Layout everywhere: q ``[batch, q_len, q_heads, qk_dim]``, k ``[batch, kv_len, kv_heads, qk_dim]``,
v ``[batch, kv_len, kv_heads, v_dim]``; q_heads is a multiple of kv_heads (GQA, never repeated
in memory).
"""

from __future__ import annotations

import contextlib
import threading
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp

from cpmjax.attention_backends import (
    AttentionFn,
    available_backends,
    build_mask,
    get_backend,
    local_backend,
    register_attention_backend,
    xla_attention,
)
from cpmjax.errors import ConfigError

__all__ = [
    "LONG_SEQUENCE",
    "AttentionFn",
    "attention",
    "attention_backend",
    "attention_transform",
    "available_backends",
    "build_mask",
    "current_backend",
    "lm_head",
    "register_attention_backend",
    "resolve_name",
    "xla_attention",
]

_STATE = threading.local()
LONG_SEQUENCE = 2048  # with no implementation chosen, key lengths from here on run "blockwise"
_ALIASES = {"xla": "reference"}


def resolve_name(name: str, *, keyword: str = "impl", stacklevel: int = 2) -> str:
    """``name`` with deprecated aliases resolved (``"xla"`` -> ``"reference"``, with a
    ``DeprecationWarning`` naming ``keyword``)."""
    if isinstance(name, str) and name in _ALIASES:
        new = _ALIASES[name]
        warnings.warn(f"{keyword}={name!r} is deprecated; use {keyword}={new!r}",
                      DeprecationWarning, stacklevel=stacklevel + 1)
        return new
    return name


@contextlib.contextmanager
def attention_backend(name: str, **options: Any) -> Iterator[None]:
    """Select the attention implementation ``name`` (same vocabulary as ``impl=`` of
    :func:`attention`) and its options (e.g. ``mesh=``) inside a ``with`` block.

    The choice is read when a function is traced, so wrap the call that traces (``jit``)."""
    name = resolve_name(name, keyword="attention_backend", stacklevel=3)
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
    """``(name, options)`` of the innermost ``attention_backend`` context, else
    ``("reference", {})``."""
    stack = getattr(_STATE, "stack", None)
    if stack:
        return stack[-1]
    return "reference", {}


def attention(q: jax.Array, k: jax.Array, v: jax.Array, **kwargs: Any) -> jax.Array:
    """Multi-head attention ``[b, sq, hq, dqk] x [b, sk, hkv, dqk] x [b, sk, hkv, dv] ->
    [b, sq, hq, dv]``; see the module docstring for implementations and masks. Keywords:
    ``causal``, ``q_positions``, ``kv_positions``, ``segment_ids``, ``kv_segment_ids``,
    ``mask``, ``sm_scale``, ``impl`` and backend options (``layer``, ``mesh`` ...)."""
    fn = _dispatch
    for transform in reversed(getattr(_STATE, "transforms", None) or ()):
        fn = transform(fn)
    return fn(q, k, v, **kwargs)


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
    impl: str | Callable[..., Any] | None = None,
    backend: str | None = None,
    **options: Any,
) -> jax.Array:
    if backend is not None:
        warnings.warn("attention(backend=...) is deprecated; use impl=", DeprecationWarning,
                      stacklevel=3)
        if impl is None:
            impl = backend
    if impl is not None and not callable(impl):
        impl = resolve_name(impl, stacklevel=3)
    if impl is None or impl == "auto":
        stack = getattr(_STATE, "stack", None)
        if stack:
            impl, ctx_options = stack[-1]
            options = {**ctx_options, **options}
        elif k.shape[1] >= LONG_SEQUENCE:
            # Nothing chosen: long sequences take the O(seq)-memory blockwise kernel, which
            # also skips the fully masked causal blocks the reference computes.
            impl = "blockwise"
        else:
            impl = "reference"
    needs_reference = q_positions is not None or kv_positions is not None or mask is not None
    if needs_reference or impl == "reference":
        return xla_attention(
            q, k, v, causal=causal, q_positions=q_positions, kv_positions=kv_positions,
            segment_ids=segment_ids, kv_segment_ids=kv_segment_ids, mask=mask, sm_scale=sm_scale,
        )
    fn = local_backend(impl) if callable(impl) else get_backend(impl)
    if fn is None:
        raise ConfigError(
            f"unknown attention impl {impl!r}; available: {available_backends()} or a callable"
        )
    return fn(
        q, k, v, causal=causal, segment_ids=segment_ids, kv_segment_ids=kv_segment_ids,
        sm_scale=sm_scale, **options,
    )


def lm_head(hidden: jax.Array, weight: jax.Array) -> jax.Array:
    """Logits in float32: ``hidden [..., d] @ weight[vocab, d].T -> [..., vocab]``."""
    return jnp.einsum("...d,vd->...v", hidden, weight, preferred_element_type=jnp.float32)
