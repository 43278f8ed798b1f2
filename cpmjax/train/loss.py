"""Next-token cross-entropy in float32, computed in chunks over the sequence.

``chunked_cross_entropy`` never builds the ``[batch, seq, vocab]`` logits: a ``lax.scan`` walks
the sequence ``chunk`` positions at a time, each step computing ``[batch, chunk, vocab]`` logits,
their log-sum-exp and the target logit, and discards them. The scan body is rematerialised
(``jax.checkpoint``), so the backward pass also recomputes one chunk's logits at a time; peak
logits memory is ``batch * chunk * vocab`` floats in both directions.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _chunk_terms(hidden: jax.Array, weight: jax.Array, targets: jax.Array, mask: jax.Array
                 ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Sum of masked token losses, mask count and correct-prediction count for one chunk
    (``hidden [b, c, d]``, ``weight [vocab, d]``, ``targets/mask [b, c]``)."""
    logits = jnp.einsum("bcd,vd->bcv", hidden, weight, preferred_element_type=jnp.float32)
    logits = logits.astype(jnp.float32)
    lse = jax.nn.logsumexp(logits, axis=-1)
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    losses = (lse - target_logit) * mask
    correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32) * mask
    return jnp.sum(losses), jnp.sum(mask), jnp.sum(correct)


def chunked_cross_entropy(
    hidden: jax.Array,
    weight: jax.Array,
    targets: jax.Array,
    loss_mask: jax.Array | None = None,
    *,
    chunk_size: int = 128,
    remat: bool = True,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Mean next-token cross-entropy over unmasked positions, in float32.

    ``hidden [batch, seq, d]``: final hidden states (``model(..., return_hidden=True)``);
    ``weight [vocab, d]``: the LM head (``model.head_weight()``); ``targets [batch, seq]``
    int; ``loss_mask [batch, seq]`` (1 = counted). The sequence is padded to a multiple of
    ``chunk_size`` (padding is masked). ``remat=False`` keeps each chunk's logits for the
    backward pass instead of recomputing them (faster when the whole ``[b, s, vocab]`` fits in
    memory; then the logits do exist whole). Returns ``(loss, {"tokens", "accuracy"})``."""
    b, s, d = hidden.shape
    mask = jnp.ones((b, s), jnp.float32) if loss_mask is None else loss_mask.astype(jnp.float32)
    chunk = max(1, min(int(chunk_size), s))
    n_chunks = -(-s // chunk)
    pad = n_chunks * chunk - s
    if pad:
        hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
        targets = jnp.pad(targets, ((0, 0), (0, pad)))
        mask = jnp.pad(mask, ((0, 0), (0, pad)))
    # [n_chunks, b, chunk, ...]: scan over the sequence, batch stays the leading (sharded) axis.
    hs = hidden.reshape(b, n_chunks, chunk, d).swapaxes(0, 1)
    ts = targets.reshape(b, n_chunks, chunk).swapaxes(0, 1)
    ms = mask.reshape(b, n_chunks, chunk).swapaxes(0, 1)

    def body(carry, xs):
        h, t, m = xs
        loss_sum, count, correct = _chunk_terms(h, weight, t, m)
        return (carry[0] + loss_sum, carry[1] + count, carry[2] + correct), None

    if remat:
        body = jax.checkpoint(body)
    zero = jnp.zeros((), jnp.float32)
    (loss_sum, count, correct), _ = jax.lax.scan(body, (zero, zero, zero), (hs, ts, ms))
    denom = jnp.maximum(count, 1.0)
    return loss_sum / denom, {"tokens": count, "accuracy": correct / denom}


def cross_entropy_reference(logits: jax.Array, targets: jax.Array,
                            loss_mask: jax.Array | None = None) -> jax.Array:
    """Plain mean cross-entropy from full ``logits [batch, seq, vocab]`` (the reference the
    chunked loss is tested against)."""
    logits = logits.astype(jnp.float32)
    mask = jnp.ones(targets.shape, jnp.float32) if loss_mask is None else loss_mask
    logp = jax.nn.log_softmax(logits, axis=-1)
    nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    return jnp.sum(nll * mask) / jnp.maximum(jnp.sum(mask), 1.0)
