"""Building blocks: RMSNorm, SwiGLU MLP, top-k MoE, grouped-query attention and multi-head
latent attention. Every parameter carries ``logical_axes`` metadata that ``sharding`` maps to
mesh axes.

KV cache (per layer): a dict ``{"k": [batch, max_len, kv_heads, qk_dim], "v": [batch, max_len,
kv_heads, v_dim]}``; slot ``p`` holds the token at position ``p`` of its row.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from cpmjax import ops
from cpmjax.models.config import ModelConfig
from cpmjax.models.rope import apply_rotary

LayerCache = dict[str, jax.Array]


def _normal(std: float):
    return nnx.initializers.normal(stddev=std)


def linear(
    in_features: int,
    out_features: int,
    axes: tuple[str | None, str | None],
    *,
    bias: bool = False,
    std: float = 0.02,
    dtype=jnp.float32,
    param_dtype=jnp.float32,
    rngs: nnx.Rngs,
) -> nnx.Linear:
    """An ``nnx.Linear`` (kernel ``[in, out]``) with logical axis names on its parameters."""
    return nnx.Linear(
        in_features,
        out_features,
        use_bias=bias,
        dtype=dtype,
        param_dtype=param_dtype,
        kernel_init=_normal(std),
        kernel_metadata={"logical_axes": axes},
        bias_metadata={"logical_axes": (axes[1],)},
        rngs=rngs,
    )


class RMSNorm(nnx.Module):
    """``x / rms(x) * scale`` computed in float32, cast back to the input dtype before scaling
    (as the reference implementations do)."""

    def __init__(self, dim: int, eps: float = 1e-6, *, param_dtype=jnp.float32):
        self.eps = eps
        self.scale = nnx.Param(jnp.ones((dim,), param_dtype), logical_axes=("norm",))

    def __call__(self, x: jax.Array) -> jax.Array:
        dtype = x.dtype
        x32 = x.astype(jnp.float32)
        variance = jnp.mean(x32 * x32, axis=-1, keepdims=True)
        normed = (x32 * jax.lax.rsqrt(variance + self.eps)).astype(dtype)
        return self.scale[...].astype(dtype) * normed


class MLP(nnx.Module):
    """SwiGLU: ``down(silu(gate(x)) * up(x))``."""

    def __init__(self, config: ModelConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        h, inter, std = config.hidden_size, config.intermediate_size, config.initializer_range
        kw = dict(bias=config.mlp_bias, std=std, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.gate_proj = linear(h, inter, ("embed", "mlp"), **kw)
        self.up_proj = linear(h, inter, ("embed", "mlp"), **kw)
        self.down_proj = linear(inter, h, ("mlp", "embed"), **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class MoE(nnx.Module):
    """MiniCPM-MoE: softmax router, top-k experts renormalised, SwiGLU experts.

    Expert weights are stacked: ``w_gate, w_up [experts, hidden, inter]``, ``w_down [experts,
    inter, hidden]``. Computed densely (every expert on every token, weighted by the sparse
    gates): exact, and fine for the sizes this library trains on CPU."""

    def __init__(self, config: ModelConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        h, inter, e = config.hidden_size, config.intermediate_size, config.num_experts
        std = config.initializer_range
        self.top_k = config.num_experts_per_tok
        self.dtype = dtype
        self.gate = linear(h, e, ("embed", None), std=std, dtype=dtype, param_dtype=param_dtype,
                           rngs=rngs)
        init = _normal(std)
        self.w_gate = nnx.Param(init(rngs.params(), (e, h, inter), param_dtype),
                                logical_axes=("experts", "embed", "mlp"))
        self.w_up = nnx.Param(init(rngs.params(), (e, h, inter), param_dtype),
                              logical_axes=("experts", "embed", "mlp"))
        self.w_down = nnx.Param(init(rngs.params(), (e, inter, h), param_dtype),
                                logical_axes=("experts", "mlp", "embed"))

    def __call__(self, x: jax.Array) -> jax.Array:
        router_logits = self.gate(x).astype(jnp.float32)
        probs = jax.nn.softmax(router_logits, axis=-1)
        top_w, top_i = jax.lax.top_k(probs, self.top_k)
        top_w = top_w / jnp.sum(top_w, axis=-1, keepdims=True)
        num_experts = probs.shape[-1]
        gates = jnp.sum(jax.nn.one_hot(top_i, num_experts, dtype=jnp.float32) * top_w[..., None],
                        axis=-2)  # [..., experts]
        dtype = x.dtype
        w_gate = self.w_gate[...].astype(dtype)
        w_up = self.w_up[...].astype(dtype)
        w_down = self.w_down[...].astype(dtype)
        hidden = jax.nn.silu(jnp.einsum("...h,ehi->...ei", x, w_gate)) * jnp.einsum(
            "...h,ehi->...ei", x, w_up
        )
        expert_out = jnp.einsum("...ei,eih->...eh", hidden, w_down)
        return jnp.einsum("...eh,...e->...h", expert_out, gates.astype(dtype))


def _write_cache(cache: LayerCache, k: jax.Array, v: jax.Array, positions: jax.Array
                 ) -> LayerCache:
    """Scatter ``k, v [b, s, h, d]`` into the cache rows at slots ``positions [b, s]``."""
    rows = jnp.arange(k.shape[0])[:, None]
    return {
        "k": cache["k"].at[rows, positions].set(k.astype(cache["k"].dtype), mode="drop"),
        "v": cache["v"].at[rows, positions].set(v.astype(cache["v"].dtype), mode="drop"),
    }


def _attend(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    positions: jax.Array,
    segment_ids: jax.Array | None,
    cache: LayerCache | None,
    attend_cache: bool,
    mask: jax.Array | None,
    sm_scale: float,
    cache_slots: jax.Array | None = None,
    layer: int | None = None,
) -> tuple[jax.Array, LayerCache | None]:
    """Attention of the new tokens, with an optional KV cache.

    Without ``attend_cache`` (training, prefill of a fresh cache) the new tokens attend to
    themselves (index-causal, segment-masked) and are then written into the cache. With
    ``attend_cache`` (decode, chunked prefill, draft-tree verification) they are first written at
    ``cache_slots`` (default: their positions) and then attend to every cache slot whose index is
    <= their position, or, when ``mask [b, s, max_len]`` is given, exactly to the slots it allows
    (tree verification writes siblings to scratch slots and passes the tree mask). ``layer``
    (the layer index) goes to ``ops.attention(layer=)`` for backends that work per layer."""
    slots = positions if cache_slots is None else cache_slots
    new_cache = None if cache is None else _write_cache(cache, k, v, slots)
    if cache is None or not attend_cache:
        options = {} if layer is None else {"layer": layer}
        out = ops.attention(q, k, v, causal=True, segment_ids=segment_ids, sm_scale=sm_scale,
                            **options)
        return out, new_cache
    max_len = new_cache["k"].shape[1]
    if mask is not None:
        out = ops.attention(q, new_cache["k"], new_cache["v"], causal=False, mask=mask,
                            sm_scale=sm_scale)
    else:
        out = ops.attention(
            q, new_cache["k"], new_cache["v"], causal=True, q_positions=positions,
            kv_positions=jnp.arange(max_len), sm_scale=sm_scale,
        )
    return out, new_cache


class Attention(nnx.Module):
    """Grouped-query attention with RoPE (Llama / MiniCPM)."""

    def __init__(self, config: ModelConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        h, d = config.hidden_size, config.head_dim
        hq, hkv = config.num_attention_heads, config.num_key_value_heads
        kw = dict(bias=config.attention_bias, std=config.initializer_range, dtype=dtype,
                  param_dtype=param_dtype, rngs=rngs)
        self.num_heads, self.num_kv_heads, self.head_dim = hq, hkv, d
        self.q_proj = linear(h, hq * d, ("embed", "heads"), **kw)
        self.k_proj = linear(h, hkv * d, ("embed", "kv_heads"), **kw)
        self.v_proj = linear(h, hkv * d, ("embed", "kv_heads"), **kw)
        self.o_proj = linear(hq * d, h, ("heads", "embed"), **kw)

    def __call__(self, x, cos, sin, *, positions, segment_ids=None, cache=None,
                 attend_cache=False, mask=None, cache_slots=None, layer=None):
        b, s, _ = x.shape
        q = self.q_proj(x).reshape(b, s, self.num_heads, self.head_dim)
        k = self.k_proj(x).reshape(b, s, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).reshape(b, s, self.num_kv_heads, self.head_dim)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        out, cache = _attend(q, k, v, positions=positions, segment_ids=segment_ids, cache=cache,
                             attend_cache=attend_cache, mask=mask, sm_scale=self.head_dim**-0.5,
                             cache_slots=cache_slots, layer=layer)
        return self.o_proj(out.reshape(b, s, -1)), cache


class MLAttention(nnx.Module):
    """Multi-head latent attention (MiniCPM3): low-rank queries and a compressed joint KV latent
    with a shared rotary key. The cache holds the expanded per-head keys and values."""

    def __init__(self, config: ModelConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        h, hq = config.hidden_size, config.num_attention_heads
        self.num_heads = hq
        self.nope_dim, self.rope_dim = config.qk_nope_head_dim, config.qk_rope_head_dim
        self.v_dim, self.kv_rank = config.v_head_dim, config.kv_lora_rank
        self.qk_dim = self.nope_dim + self.rope_dim
        self.q_rank = config.q_lora_rank
        kw = dict(std=config.initializer_range, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        bias = config.attention_bias
        if self.q_rank:
            self.q_a_proj = linear(h, self.q_rank, ("embed", None), bias=bias, **kw)
            self.q_a_layernorm = RMSNorm(self.q_rank, config.rms_norm_eps, param_dtype=param_dtype)
            self.q_b_proj = linear(self.q_rank, hq * self.qk_dim, (None, "heads"), **kw)
        else:
            self.q_proj = linear(h, hq * self.qk_dim, ("embed", "heads"), **kw)
        self.kv_a_proj_with_mqa = linear(h, self.kv_rank + self.rope_dim, ("embed", None),
                                         bias=bias, **kw)
        self.kv_a_layernorm = RMSNorm(self.kv_rank, config.rms_norm_eps, param_dtype=param_dtype)
        self.kv_b_proj = linear(self.kv_rank, hq * (self.nope_dim + self.v_dim), (None, "heads"),
                                **kw)
        self.o_proj = linear(hq * self.v_dim, h, ("heads", "embed"), bias=bias, **kw)

    def __call__(self, x, cos, sin, *, positions, segment_ids=None, cache=None,
                 attend_cache=False, mask=None, cache_slots=None, layer=None):
        b, s, _ = x.shape
        hq = self.num_heads
        if self.q_rank:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        else:
            q = self.q_proj(x)
        q = q.reshape(b, s, hq, self.qk_dim)
        q_nope, q_rot = q[..., : self.nope_dim], q[..., self.nope_dim :]
        compressed = self.kv_a_proj_with_mqa(x)
        kv_latent, k_rot = compressed[..., : self.kv_rank], compressed[..., self.kv_rank :]
        kv = self.kv_b_proj(self.kv_a_layernorm(kv_latent)).reshape(
            b, s, hq, self.nope_dim + self.v_dim
        )
        k_nope, v = kv[..., : self.nope_dim], kv[..., self.nope_dim :]
        q_rot = apply_rotary(q_rot, cos, sin)
        k_rot = apply_rotary(k_rot[:, :, None, :], cos, sin)
        q = jnp.concatenate([q_nope, q_rot], axis=-1)
        k = jnp.concatenate([k_nope, jnp.broadcast_to(k_rot, (b, s, hq, self.rope_dim))], axis=-1)
        out, cache = _attend(q, k, v, positions=positions, segment_ids=segment_ids, cache=cache,
                             attend_cache=attend_cache, mask=mask, sm_scale=self.qk_dim**-0.5,
                             cache_slots=cache_slots, layer=layer)
        return self.o_proj(out.reshape(b, s, -1)), cache


def init_layer_cache(config: ModelConfig, batch: int, max_len: int, dtype: Any) -> LayerCache:
    heads = config.kv_cache_heads
    return {
        "k": jnp.zeros((batch, max_len, heads, config.qk_head_dim), dtype),
        "v": jnp.zeros((batch, max_len, heads, config.value_head_dim), dtype),
    }
