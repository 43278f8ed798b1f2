"""Rotary position embeddings: default, linear, dynamic NTK, llama3 and longrope.

The inverse frequencies of ``dynamic`` and ``longrope`` depend on the current sequence length,
taken (as transformers does) as ``max(positions) + 1`` of the forward call; that value may be a
traced scalar, so everything here is jnp.
"""

from __future__ import annotations

import math

import jax.numpy as jnp

from cpmjax.models.config import ModelConfig


def _base_inv_freq(base: float | jnp.ndarray, dim: int) -> jnp.ndarray:
    exponents = jnp.arange(0, dim, 2, dtype=jnp.float32) / dim
    return 1.0 / (jnp.asarray(base, jnp.float32) ** exponents)


def _original_max_positions(config: ModelConfig) -> int:
    scaling = config.rope_scaling or {}
    return int(
        scaling.get("original_max_position_embeddings")
        or config.extra.get("original_max_position_embeddings")
        or config.max_position_embeddings
    )


def attention_factor(config: ModelConfig) -> float:
    """Multiplier on cos/sin (longrope's attention factor; 1 otherwise)."""
    if config.rope_type != "longrope":
        return 1.0
    scaling = config.rope_scaling
    if scaling.get("attention_factor") is not None:
        return float(scaling["attention_factor"])
    original = _original_max_positions(config)
    factor = scaling.get("factor") or config.max_position_embeddings / original
    if factor <= 1.0:
        return 1.0
    return math.sqrt(1 + math.log(factor) / math.log(original))


def inv_frequencies(config: ModelConfig, seq_len: jnp.ndarray | int) -> jnp.ndarray:
    """Inverse frequencies ``[rotary_dim // 2]`` (float32) for a call whose longest position is
    ``seq_len - 1``."""
    dim = config.rotary_dim
    base = config.rope_theta
    rope_type = config.rope_type
    scaling = config.rope_scaling or {}
    if rope_type == "default":
        return _base_inv_freq(base, dim)
    if rope_type == "linear":
        return _base_inv_freq(base, dim) / float(scaling["factor"])
    if rope_type == "dynamic":
        factor = float(scaling["factor"])
        max_pos = config.max_position_embeddings
        length = jnp.maximum(jnp.asarray(seq_len, jnp.float32), float(max_pos))
        scaled_base = base * ((factor * length / max_pos) - (factor - 1)) ** (dim / (dim - 2))
        return _base_inv_freq(scaled_base, dim)
    if rope_type == "llama3":
        inv_freq = _base_inv_freq(base, dim)
        factor = float(scaling["factor"])
        low = float(scaling["low_freq_factor"])
        high = float(scaling["high_freq_factor"])
        old_len = float(scaling["original_max_position_embeddings"])
        low_wavelen, high_wavelen = old_len / low, old_len / high
        wavelen = 2 * math.pi / inv_freq
        scaled = jnp.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return jnp.where(medium, smoothed, scaled)
    if rope_type == "longrope":
        original = _original_max_positions(config)
        long_factor = jnp.asarray(scaling["long_factor"], jnp.float32)
        short_factor = jnp.asarray(scaling["short_factor"], jnp.float32)
        ext = jnp.where(jnp.asarray(seq_len) > original, long_factor, short_factor)
        exponents = jnp.arange(0, dim, 2, dtype=jnp.float32) / dim
        return 1.0 / (ext * jnp.asarray(base, jnp.float32) ** exponents)
    raise AssertionError(rope_type)  # config validation rejects anything else


def rotary_tables(
    config: ModelConfig, positions: jnp.ndarray, dtype=jnp.float32, seq_len=None
) -> tuple[jnp.ndarray, jnp.ndarray]:
    """cos, sin tables ``[batch, seq, rotary_dim]`` for integer ``positions [batch, seq]``.

    ``seq_len`` (default ``max(positions) + 1``) selects the dynamic / longrope frequencies; a
    padded prefill passes the longest real prompt length."""
    if seq_len is None:
        seq_len = jnp.max(positions) + 1
    inv_freq = inv_frequencies(config, seq_len)
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    scale = attention_factor(config)
    return (jnp.cos(emb) * scale).astype(dtype), (jnp.sin(emb) * scale).astype(dtype)


def apply_rotary(x: jnp.ndarray, cos: jnp.ndarray, sin: jnp.ndarray) -> jnp.ndarray:
    """Rotate ``x [batch, seq, heads, dim]`` (rotate-half convention) by ``cos/sin [b, s, dim]``."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos[:, :, None, :] + rotated * sin[:, :, None, :]
