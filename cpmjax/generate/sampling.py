"""Sampling: greedy, or temperature with top-k and/or top-p (nucleus).

``filtered_logits`` applies temperature, top-k and top-p; ``sample_logits`` draws one token per
row (vanilla decoding); ``sample_nodes`` draws one independent token per tree node by inverting
the CDF (speculative decoding's verification). Both sample the same distribution.

Top-p keeps the smallest prefix of the ids sorted by probability whose mass reaches ``top_p``:
every id whose logit is at least a cut-off value. For a small vocabulary the cut-off is read off
one sort (``TOP_P_SORT_MAX``); for a large one it is found without sorting, by bisection on the
float32 order of the logits (32 masked sums over the vocabulary, exact to the last bit of the
cut-off), because a full sort per row (and per tree node when verifying) dominated batched
sampling. Both give the same kept set up to float32 rounding of the summed mass.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from cpmjax.errors import InputError

__all__ = [
    "TOP_P_SORT_MAX",
    "SamplingConfig",
    "filtered_logits",
    "sample_logits",
    "sample_nodes",
]

# vocabularies up to this size find the top-p cut-off by one sort; larger ones by bisection
TOP_P_SORT_MAX = 2048


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """``temperature == 0``: greedy (argmax); otherwise softmax(logits / temperature) restricted
    to the ``top_k`` most likely ids (0: all) and to the nucleus of mass ``top_p``."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0

    def check(self) -> SamplingConfig:
        """Raise ``InputError`` naming the bad value; returns ``self``."""
        if not 0.0 < self.top_p <= 1.0:
            raise InputError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0 or self.temperature < 0:
            raise InputError(
                f"top_k and temperature must be >= 0, got {self.top_k}, {self.temperature}")
        return self


def _nucleus_cutoff(logits: jax.Array, top_p: float) -> jax.Array:
    """The smallest logit kept by top-p, ``[..., 1]``: from a full sort of ``logits [..., V]``."""
    sorted_logits = jnp.sort(logits, axis=-1)[..., ::-1]
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    cumulative = jnp.cumsum(probs, axis=-1)
    # keep the smallest prefix whose mass reaches top_p (always at least one token)
    keep = (cumulative - probs) < top_p
    return jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1, keepdims=True)


def _order_key(x: jax.Array) -> jax.Array:
    """int32 keys with the order of the float32 values ``x`` (``-inf`` lowest)."""
    bits = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.int32)
    return jnp.where(bits < 0, bits ^ jnp.int32(0x7FFFFFFF), bits)


def _bisected_nucleus_cutoff(logits: jax.Array, top_p: float) -> jax.Array:
    """``_nucleus_cutoff`` without a sort: the smallest logit ``c`` whose strictly larger logits
    hold less than ``top_p`` of the mass (the first id of that value in the sorted order has
    exactly that mass before it), found by bisection over the 2**32 float32 order keys."""
    probs = jax.nn.softmax(logits, axis=-1)
    keys = _order_key(logits)
    # invariant: the mass above key ``hi`` is < top_p (none is above the largest), and above
    # ``lo`` it is not (all of it is above the smallest key - 1)
    hi = jnp.max(keys, axis=-1, keepdims=True)
    lo = jnp.min(keys, axis=-1, keepdims=True) - 1

    def halve(_, bounds):
        lo, hi = bounds
        mid = (lo >> 1) + (hi >> 1) + (lo & hi & 1)  # floor((lo + hi) / 2) without overflow
        below = jnp.sum(jnp.where(keys > mid, probs, 0.0), axis=-1, keepdims=True) < top_p
        return jnp.where(below, lo, mid), jnp.where(below, mid, hi)

    _, hi = jax.lax.fori_loop(0, 32, halve, (lo, hi))
    return jnp.min(jnp.where(keys >= hi, logits, jnp.inf), axis=-1, keepdims=True)


def filtered_logits(logits: jax.Array, sampling: SamplingConfig) -> jax.Array:
    """Temperature, top-k and top-p applied to float32 ``logits [..., vocab]`` (-inf outside the
    kept set); what ``sample_logits`` samples from."""
    logits = logits / sampling.temperature
    vocab = logits.shape[-1]
    if sampling.top_k and sampling.top_k < vocab:
        kth = jax.lax.top_k(logits, sampling.top_k)[0][..., -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if sampling.top_p < 1.0:
        if vocab <= TOP_P_SORT_MAX:
            cutoff = _nucleus_cutoff(logits, sampling.top_p)
        else:
            cutoff = _bisected_nucleus_cutoff(logits, sampling.top_p)
        logits = jnp.where(logits < cutoff, -jnp.inf, logits)
    return logits


def sample_logits(logits: jax.Array, key: jax.Array, sampling: SamplingConfig) -> jax.Array:
    """Sample token ids ``[b]`` from float32 ``logits [b, vocab]``."""
    if sampling.greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return jax.random.categorical(key, filtered_logits(logits, sampling), axis=-1).astype(
        jnp.int32)


def sample_nodes(logits: jax.Array, key: jax.Array, sampling: SamplingConfig) -> jax.Array:
    """One independent sample per tree node from the filtered target distribution:
    ``logits [b, T, vocab]`` -> ``[b, T]`` int32, by inverting the CDF at one uniform per node
    (``T`` random numbers instead of the ``T * vocab`` Gumbel draws of
    ``jax.random.categorical``; the distribution is the same, up to float32 rounding of the
    CDF)."""
    probs = jax.nn.softmax(filtered_logits(logits, sampling), axis=-1)
    cdf = jnp.cumsum(probs, axis=-1)
    u = jax.random.uniform(key, logits.shape[:-1] + (1,), jnp.float32) * cdf[..., -1:]
    index = jnp.sum(cdf <= u, axis=-1)
    # never land on a zero-probability id (u at the very top of the CDF, or rounding)
    last_kept = logits.shape[-1] - 1 - jnp.argmax(probs[..., ::-1] > 0, axis=-1)
    return jnp.minimum(index, last_kept).astype(jnp.int32)
