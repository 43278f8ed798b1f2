"""The decoder-only LM shared by every family (Llama, MiniCPM, MiniCPM-MoE, MiniCPM3).

Attribute paths mirror HF parameter names (``model.layers[i].self_attn.q_proj`` ...), so the
converter in ``cpmjax.hf`` is one generic rule set, and deltas address modules by HF-like paths.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from cpmjax import ops
from cpmjax.models.config import ModelConfig
from cpmjax.models.modules import (
    MLP,
    Attention,
    LayerCache,
    MLAttention,
    MoE,
    RMSNorm,
    init_layer_cache,
)
from cpmjax.models.rope import rotary_tables

Cache = list[LayerCache]


def resolve_dtype(value: Any) -> Any:
    """A dtype from its name (``"bfloat16"``, ``"float32"``, ``"float16"``) or the dtype itself."""
    if isinstance(value, str):
        return {"bfloat16": jnp.bfloat16, "float32": jnp.float32, "float16": jnp.float16}[value]
    return value


_dtype = resolve_dtype  # the old private name, for callers not yet moved to resolve_dtype


class DecoderLayer(nnx.Module):
    def __init__(self, config: ModelConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.residual_scale = config.residual_scale
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps,
                                       param_dtype=param_dtype)
        attn_cls = MLAttention if config.is_mla else Attention
        self.self_attn = attn_cls(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps,
                                                param_dtype=param_dtype)
        mlp_cls = MoE if config.is_moe else MLP
        self.mlp = mlp_cls(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x, cos, sin, *, positions, segment_ids=None, cache=None,
                 attend_cache=False, mask=None, cache_slots=None, layer: int | None = None):
        """``layer``: this layer's index, passed to ``ops.attention(layer=)`` (per-layer
        backends such as APB's retaining heads read it)."""
        attn_out, cache = self.self_attn(
            self.input_layernorm(x), cos, sin, positions=positions, segment_ids=segment_ids,
            cache=cache, attend_cache=attend_cache, mask=mask, cache_slots=cache_slots,
            layer=layer,
        )
        if self.residual_scale != 1.0:
            attn_out = attn_out * self.residual_scale
        x = x + attn_out
        mlp_out = self.mlp(self.post_attention_layernorm(x))
        if self.residual_scale != 1.0:
            mlp_out = mlp_out * self.residual_scale
        return x + mlp_out, cache


class Decoder(nnx.Module):
    def __init__(self, config: ModelConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.embed_tokens = nnx.Embed(
            config.vocab_size, config.hidden_size, dtype=dtype, param_dtype=param_dtype,
            embedding_init=nnx.initializers.normal(stddev=config.initializer_range),
            embedding_metadata={"logical_axes": ("vocab", "embed")}, rngs=rngs,
        )
        self.layers = nnx.List(
            [DecoderLayer(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
             for _ in range(config.num_hidden_layers)]
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, param_dtype=param_dtype)


def run_layers(
    layers: Sequence[DecoderLayer],
    config: ModelConfig,
    x: jax.Array,
    *,
    positions: jax.Array,
    segment_ids: jax.Array | None = None,
    cache: Cache | None = None,
    attend_cache: bool = False,
    mask: jax.Array | None = None,
    rope_seq_len: jax.Array | int | None = None,
    cache_slots: jax.Array | None = None,
) -> tuple[jax.Array, Cache | None]:
    """Run decoder ``layers`` over ``x [b, s, hidden]`` at ``positions [b, s]``: the rotary
    tables once, then each layer with its slice of ``cache`` (one entry per layer). Returns the
    un-normalised output and the updated cache (``None`` without a cache). The target model and
    the EAGLE draft both run their layers through this."""
    cos, sin = rotary_tables(config, positions, x.dtype, rope_seq_len)
    new_cache = None if cache is None else []
    for i, layer in enumerate(layers):
        x, layer_cache = layer(
            x, cos, sin, positions=positions, segment_ids=segment_ids,
            cache=None if cache is None else cache[i], attend_cache=attend_cache, mask=mask,
            cache_slots=cache_slots, layer=i,
        )
        if cache is not None:
            new_cache.append(layer_cache)
    return x, new_cache


class CausalLM(nnx.Module):
    """A decoder-only causal LM.

    ``model(input_ids [b, s])`` returns float32 logits ``[b, s, vocab]``. Keyword arguments:

    - ``positions [b, s]``: token positions (default ``arange(s)``; per-document for packed data).
    - ``segment_ids [b, s]``: packed documents; attention never crosses a segment boundary.
    - ``cache``: a KV cache from ``init_cache``; the new keys/values are written at ``positions``
      and ``(logits, new_cache)`` is returned.
    - ``attend_cache``: attend to the cache (decode / chunked prefill) instead of only to the new
      tokens (the first prefill of an empty cache, which can use the kernel backends).
    - ``cache_slots [b, s]``: cache slots to write the new keys/values to (default: positions).
    - ``mask [b, s, max_len]``: with ``attend_cache``, replaces the causal-by-position mask: the
      new tokens attend exactly to the cache slots it allows (draft-tree verification).
    - ``rope_seq_len``: sequence length that selects dynamic / longrope frequencies (default
      ``max(positions) + 1``; a right-padded prefill passes the longest real prompt length).
    - ``return_hidden``: return the final hidden states (normalised and divided by the μP
      width scale) instead of logits: ``logits == hidden @ head_weight().T``.
    """

    def __init__(
        self,
        config: ModelConfig,
        *,
        dtype: Any = jnp.float32,
        param_dtype: Any = jnp.float32,
        rngs: nnx.Rngs | None = None,
    ):
        rngs = rngs if rngs is not None else nnx.Rngs(0)
        dtype, param_dtype = _dtype(dtype), _dtype(param_dtype)
        self.config = config
        self.dtype = dtype
        self.model = Decoder(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        if config.tie_word_embeddings:
            self.lm_head = None
        else:
            self.lm_head = nnx.Linear(
                config.hidden_size, config.vocab_size, use_bias=False, dtype=dtype,
                param_dtype=param_dtype,
                kernel_init=nnx.initializers.normal(stddev=config.initializer_range),
                kernel_metadata={"logical_axes": ("embed", "vocab")}, rngs=rngs,
            )

    def head_weight(self) -> jax.Array:
        """The LM head as ``[vocab, hidden]`` (the tied embedding, or the head transposed)."""
        if self.lm_head is None:
            return self.model.embed_tokens.embedding[...]
        return self.lm_head.kernel[...].T

    def embed(self, input_ids: jax.Array) -> jax.Array:
        x = self.model.embed_tokens(input_ids)
        scale = self.config.embedding_scale
        return x * scale if scale != 1.0 else x

    def hidden_states(
        self,
        input_ids: jax.Array | None = None,
        *,
        inputs_embeds: jax.Array | None = None,
        positions: jax.Array | None = None,
        segment_ids: jax.Array | None = None,
        cache: Cache | None = None,
        attend_cache: bool = False,
        mask: jax.Array | None = None,
        rope_seq_len: jax.Array | int | None = None,
        cache_slots: jax.Array | None = None,
    ) -> tuple[jax.Array, Cache | None]:
        """Final normalised hidden states ``[b, s, hidden]`` (before the μP width division)."""
        x = self.embed(input_ids) if inputs_embeds is None else inputs_embeds
        b, s = x.shape[:2]
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
        x, new_cache = run_layers(
            self.model.layers, self.config, x, positions=positions, segment_ids=segment_ids,
            cache=cache, attend_cache=attend_cache, mask=mask, rope_seq_len=rope_seq_len,
            cache_slots=cache_slots,
        )
        return self.model.norm(x), new_cache

    def __call__(
        self,
        input_ids: jax.Array,
        *,
        positions: jax.Array | None = None,
        segment_ids: jax.Array | None = None,
        cache: Cache | None = None,
        attend_cache: bool = False,
        mask: jax.Array | None = None,
        return_hidden: bool = False,
        rope_seq_len: jax.Array | int | None = None,
        cache_slots: jax.Array | None = None,
    ):
        hidden, new_cache = self.hidden_states(
            input_ids, positions=positions, segment_ids=segment_ids, cache=cache,
            attend_cache=attend_cache, mask=mask, rope_seq_len=rope_seq_len,
            cache_slots=cache_slots,
        )
        width = self.config.width_scale
        if width != 1.0:
            hidden = hidden / width
        out = hidden if return_hidden else ops.lm_head(hidden, self.head_weight())
        return out if cache is None else (out, new_cache)

    def init_cache(self, batch: int, max_len: int, dtype: Any = None) -> Cache:
        """A zeroed KV cache for ``batch`` rows of up to ``max_len`` positions."""
        dtype = self.dtype if dtype is None else _dtype(dtype)
        return [init_layer_cache(self.config, batch, max_len, dtype)
                for _ in range(self.config.num_hidden_layers)]

    def num_parameters(self) -> int:
        return sum(x.size for x in jax.tree.leaves(nnx.state(self, nnx.Param)))
