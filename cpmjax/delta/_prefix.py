"""Prefix tuning (Li & Liang, 2021): learned keys and values that every query of an attention
layer also attends to, ``num_tokens`` of them per layer.

The target is an attention module whose attention goes through ``cpmjax.ops.attention`` (every
cpmjax model; a foreign model that calls it works the same). While the wrapped module runs, the
call to ``cpmjax.ops.attention`` gets the prefix prepended to its keys and values, and the mask
becomes: every query sees every prefix slot, plus what the original mask allowed (causal,
segments, KV-cache positions or a tree mask). Prefix keys are used as given (no rotary
embedding), the way a KV cache holds them. The backbone's code is unchanged; the substitution
lasts only for the wrapped call and is made while tracing, so it lives in the compiled function.

Shapes: ``prefix_k [num_tokens, kv_heads, qk_dim]``, ``prefix_v [num_tokens, kv_heads, v_dim]``.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from cpmjax import ops
from cpmjax.delta._addressing import Entry
from cpmjax.delta._core import DeltaModule, DeltaParam
from cpmjax.errors import DeltaError

DEFAULTS: dict[str, Any] = {"num_tokens": 10, "kv_heads": None, "qk_dim": None, "v_dim": None,
                            "init_std": 0.02, "param_dtype": "float32"}


def with_prefix(attention_fn, prefix_k: jax.Array, prefix_v: jax.Array):
    """``attention_fn`` (the signature of ``cpmjax.ops.attention``) with ``prefix_k/v
    [p, kv_heads, d]`` prepended to the keys and values of every call."""

    def attend(q, k, v, *, causal=True, q_positions=None, kv_positions=None, segment_ids=None,
               kv_segment_ids=None, mask=None, sm_scale=None, backend=None, **options):
        batch, q_len = q.shape[:2]
        kv_len = k.shape[1]
        base = ops.build_mask(batch, q_len, kv_len, causal=causal, q_positions=q_positions,
                              kv_positions=kv_positions, segment_ids=segment_ids,
                              kv_segment_ids=kv_segment_ids, mask=mask)
        if base is None:
            base = jnp.ones((batch, q_len, kv_len), bool)
        p = prefix_k.shape[0]
        full = jnp.concatenate([jnp.ones((batch, q_len, p), bool), base], axis=-1)
        pk = jnp.broadcast_to(prefix_k.astype(k.dtype), (batch, *prefix_k.shape))
        pv = jnp.broadcast_to(prefix_v.astype(v.dtype), (batch, *prefix_v.shape))
        return attention_fn(q, jnp.concatenate([pk, k], axis=1), jnp.concatenate([pv, v], axis=1),
                            causal=False, mask=full, sm_scale=sm_scale, backend=backend,
                            **options)

    return attend


class Prefix(DeltaModule):
    method = "prefix"

    def __init__(self, num_tokens: int, kv_heads: int, qk_dim: int, v_dim: int, *,
                 init_std: float, param_dtype: Any, rngs: nnx.Rngs):
        def init(d):
            return init_std * jax.random.normal(rngs.params(), (num_tokens, kv_heads, d),
                                                jnp.float32)

        self.prefix_k = DeltaParam(init(qk_dim).astype(param_dtype),
                                   logical_axes=(None, "kv_heads", None))
        self.prefix_v = DeltaParam(init(v_dim).astype(param_dtype),
                                   logical_axes=(None, "kv_heads", None))

    def wrap(self, fn, args, kwargs):
        prefix_k, prefix_v = self.prefix_k[...], self.prefix_v[...]
        with ops.attention_transform(lambda impl: with_prefix(impl, prefix_k, prefix_v)):
            return fn(*args, **kwargs)


def _kv_shape(entry: Entry, hp: dict[str, Any]) -> tuple[int, int, int]:
    module = entry.module
    heads = hp["kv_heads"] or getattr(module, "num_kv_heads", None)
    qk = hp["qk_dim"] or getattr(module, "qk_dim", None) or getattr(module, "head_dim", None)
    vd = hp["v_dim"] or getattr(module, "v_dim", None) or getattr(module, "head_dim", None)
    if heads is None and getattr(module, "qk_dim", None) is not None:  # MLA: one kv head per head
        heads = getattr(module, "num_heads", None)
    if not (heads and qk and vd):
        raise DeltaError(
            f"prefix tuning cannot tell the key/value shape of {entry.path} "
            f"({type(module).__name__}); pass kv_heads=, qk_dim= and v_dim="
        )
    return int(heads), int(qk), int(vd)


def build(model: nnx.Module, entries: list[Entry], hp: dict[str, Any], rngs: nnx.Rngs
          ) -> list[tuple[str, DeltaModule]]:
    out = []
    for entry in entries:
        heads, qk, vd = _kv_shape(entry, hp)
        out.append((entry.path, Prefix(int(hp["num_tokens"]), heads, qk, vd,
                                       init_std=float(hp["init_std"]),
                                       param_dtype=jnp.dtype(hp["param_dtype"]), rngs=rngs)))
    return out
