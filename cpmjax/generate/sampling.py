"""Sampling: greedy, or temperature with top-k and/or top-p (nucleus).

``filtered_logits`` applies temperature, top-k and top-p; ``sample_logits`` draws one token per
row (vanilla decoding); ``sample_nodes`` draws one independent token per tree node by inverting
the CDF (speculative decoding's verification). Both sample the same distribution.

Top-p needs the sorted probabilities only down to where their mass reaches ``top_p``. With a
large vocabulary the kept set is almost always a small head, so the cut-off is looked for among
the ``TOP_P_CANDIDATES`` largest logits first (``lax.top_k``, no sort of the vocabulary); only a
batch where some row's nucleus is wider than that falls back to the full sort. Either way the
kept set is the same: the smallest prefix of the sorted ids whose mass reaches ``top_p``.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from cpmjax.errors import InputError

__all__ = [
    "TOP_P_CANDIDATES",
    "SamplingConfig",
    "filtered_logits",
    "sample_logits",
    "sample_nodes",
]

# how many of the largest logits the top-p cut-off is first looked for among (per row)
TOP_P_CANDIDATES = 1024


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


def _bounded_nucleus_cutoff(logits: jax.Array, top_p: float, candidates: int) -> jax.Array:
    """``_nucleus_cutoff`` looked for among the ``candidates`` largest logits (their true
    probabilities: normalised over the whole vocabulary); the full sort runs only when some row's
    nucleus does not end among them."""
    values = jax.lax.top_k(logits, candidates)[0]  # [..., c], descending
    probs = jnp.exp(values - jax.nn.logsumexp(logits, axis=-1, keepdims=True))
    cumulative = jnp.cumsum(probs, axis=-1)
    keep = (cumulative - probs) < top_p
    cutoff = jnp.min(jnp.where(keep, values, jnp.inf), axis=-1, keepdims=True)
    inside = jnp.all(cumulative[..., -1] >= top_p)
    return jax.lax.cond(inside, lambda _: cutoff, lambda _: _nucleus_cutoff(logits, top_p),
                        None)


def filtered_logits(logits: jax.Array, sampling: SamplingConfig) -> jax.Array:
    """Temperature, top-k and top-p applied to float32 ``logits [..., vocab]`` (-inf outside the
    kept set); what ``sample_logits`` samples from."""
    logits = logits / sampling.temperature
    vocab = logits.shape[-1]
    if sampling.top_k and sampling.top_k < vocab:
        kth = jax.lax.top_k(logits, sampling.top_k)[0][..., -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if sampling.top_p < 1.0:
        # after top-k, the nucleus lies among the top_k kept ids
        bound = min(sampling.top_k or vocab, TOP_P_CANDIDATES)
        if bound >= vocab:
            cutoff = _nucleus_cutoff(logits, sampling.top_p)
        else:
            cutoff = _bounded_nucleus_cutoff(logits, sampling.top_p, bound)
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
