"""``FusedLM``: UltraFuser's token-level fusion of specialists that share a tokenizer.

For ``k`` specialists with final (normalised) hidden states ``h_i [b, s, d]`` and logits
``o_i [b, s, vocab]``, a gate ``g`` shared by all specialists scores every specialist at every
token, ``w = softmax(g(h_1), ..., g(h_k))`` over the specialists, and the fused logits are
``sum_i w_i * o_i`` (the mixing happens on logits; the softmax over the vocabulary comes after,
as in the paper). ``g`` is a two-layer MLP with ReLU (``gate="mlp"``, the paper's) or one
linear map (``gate="linear"``).

The model interface of ``cpmjax.generate`` holds: ``fused(input_ids, positions=, cache=,
attend_cache=, return_hidden=, ...)``, ``fused.init_cache`` (one KV cache per specialist, a
list of them), ``fused.config`` (the first specialist's, with the smallest context of all),
``fused.head_weight()``. With ``return_hidden=True`` the fused model returns the features
``concat_i(w_i * h_i / width_i) [b, s, k * d]`` and ``head_weight()`` is ``concat_i(W_i)
[vocab, k * d]``, so that ``features @ head_weight().T == sum_i w_i * o_i`` exactly as the
generate prefill and the chunked training loss use a ``CausalLM``'s hidden states.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from cpmjax import ops
from cpmjax.errors import ConfigError, InputError
from cpmjax.models import CausalLM

__all__ = ["GATES", "FusedLM", "Gate", "check_specialists", "fuse_logits"]

GATES = ("mlp", "linear")


class Gate(nnx.Module):
    """The shared gate: ``h [..., d] -> score [...]`` (one scalar per specialist and token).
    ``kind="mlp"``: ``Linear(d, hidden) -> ReLU -> Linear(hidden, 1)``; ``"linear"``:
    ``Linear(d, 1)``. Parameters are float32."""

    def __init__(self, hidden_size: int, kind: str = "mlp", *, gate_hidden: int | None = None,
                 rngs: nnx.Rngs):
        if kind not in GATES:
            raise ConfigError(f"gate={kind!r} is not one of {GATES}")
        self.kind = kind
        self.hidden_size = int(hidden_size)
        self.gate_hidden = int(gate_hidden or hidden_size)
        if kind == "mlp":
            self.inner = nnx.Linear(hidden_size, self.gate_hidden, rngs=rngs)
            self.outer = nnx.Linear(self.gate_hidden, 1, rngs=rngs)
        else:
            self.inner = None
            self.outer = nnx.Linear(hidden_size, 1, rngs=rngs)

    def __call__(self, hidden: jax.Array) -> jax.Array:
        x = hidden.astype(jnp.float32)
        if self.inner is not None:
            x = jax.nn.relu(self.inner(x))
        return self.outer(x)[..., 0]


def fuse_logits(weights: jax.Array, logits: Sequence[jax.Array]) -> jax.Array:
    """``sum_i weights[..., i] * logits[i]`` in float32 (``weights [b, s, k]``, each logits
    ``[b, s, vocab]``), accumulated in specialist order: with a one-hot ``weights`` it returns
    that specialist's logits bit for bit."""
    out = weights[..., 0:1].astype(jnp.float32) * logits[0].astype(jnp.float32)
    for i in range(1, len(logits)):
        out = out + weights[..., i:i + 1].astype(jnp.float32) * logits[i].astype(jnp.float32)
    return out


def check_specialists(specialists: Sequence[Any], names: Sequence[str] | None = None) -> None:
    """Raise ``ConfigError`` naming the culprit unless the specialists can be fused: at least
    one, all ``CausalLM``-like, the same vocabulary size, and the same hidden size (the shared
    gate reads every specialist's hidden state)."""
    if len(specialists) < 1:
        raise ConfigError("FusedLM needs at least one specialist, got none")
    names = list(names) if names is not None else [f"specialist {i}" for i in
                                                    range(len(specialists))]
    if len(names) != len(specialists):
        raise ConfigError(f"{len(names)} names for {len(specialists)} specialists")
    if len(set(names)) != len(names):
        raise ConfigError(f"specialist names must be distinct, got {names}")
    first = specialists[0]
    for name, model in zip(names, specialists, strict=True):
        if not isinstance(model, CausalLM):
            raise ConfigError(f"{name} is a {type(model).__name__}, not a cpmjax CausalLM")
        if model.config.vocab_size != first.config.vocab_size:
            raise ConfigError(
                f"{name} has vocab_size={model.config.vocab_size} but {names[0]} has "
                f"{first.config.vocab_size}: fused specialists must share one vocabulary")
        if model.config.hidden_size != first.config.hidden_size:
            raise ConfigError(
                f"{name} has hidden_size={model.config.hidden_size} but the shared gate takes "
                f"{first.config.hidden_size} ({names[0]}): the gate cannot read it")


class FusedLM(nnx.Module):
    """Token-level fusion of ``specialists`` (``CausalLM``s with one vocabulary and one hidden
    size) under a shared ``gate`` (``"mlp"`` or ``"linear"``).

    ``fused(input_ids [b, s])`` -> fused logits ``[b, s, vocab]`` (float32);
    ``fused.gate_weights(input_ids)`` -> ``[b, s, k]`` (each row sums to 1);
    ``fused.specialists`` -> the specialists, in order; ``fused.names`` their names."""

    def __init__(self, specialists: Sequence[CausalLM], gate: str = "mlp", *,
                 names: Sequence[str] | None = None, gate_hidden: int | None = None,
                 rngs: nnx.Rngs | None = None):
        check_specialists(specialists, names)
        if gate not in GATES:
            raise ConfigError(f"gate={gate!r} is not one of {GATES}")
        rngs = rngs if rngs is not None else nnx.Rngs(0)
        self.names = tuple(names) if names is not None else tuple(
            f"specialist{i}" for i in range(len(specialists)))
        self.specialists = nnx.List(list(specialists))
        first = specialists[0].config
        self.config = first.model_copy(update={"max_position_embeddings": min(
            s.config.max_position_embeddings for s in specialists)})
        self.dtype = specialists[0].dtype
        self.gate = Gate(first.hidden_size, gate, gate_hidden=gate_hidden, rngs=rngs)

    @property
    def num_specialists(self) -> int:
        return len(self.specialists)

    # ------------------------------------------------------------------------------------
    def _run(self, input_ids, *, positions=None, segment_ids=None, cache=None,
             attend_cache=False, mask=None, rope_seq_len=None, cache_slots=None):
        """Every specialist's scaled hidden state ``h_i / width_i`` and the gate weights."""
        if cache is not None and len(cache) != self.num_specialists:
            raise InputError(f"cache holds {len(cache)} specialist caches, the fused model has "
                             f"{self.num_specialists} specialists")
        hiddens, scores, caches = [], [], []
        for i, model in enumerate(self.specialists):
            h, new_cache = model.hidden_states(
                input_ids, positions=positions, segment_ids=segment_ids,
                cache=None if cache is None else cache[i], attend_cache=attend_cache,
                mask=mask, rope_seq_len=rope_seq_len, cache_slots=cache_slots)
            scores.append(self.gate(h))
            width = model.config.width_scale
            hiddens.append(h / width if width != 1.0 else h)
            caches.append(new_cache)
        weights = jax.nn.softmax(jnp.stack(scores, axis=-1), axis=-1)
        return hiddens, weights, (None if cache is None else caches)

    def gate_weights(self, input_ids: jax.Array, **kwargs: Any) -> jax.Array:
        """The mixing weights ``[b, s, num_specialists]`` (softmax over specialists)."""
        _, weights, _ = self._run(input_ids, **kwargs)
        return weights

    def specialist_logits(self, input_ids: jax.Array, **kwargs: Any) -> list[jax.Array]:
        """Each specialist's own logits ``[b, s, vocab]`` (float32), in order."""
        return [m(input_ids, **kwargs) for m in self.specialists]

    def head_weight(self) -> jax.Array:
        """``concat_i(W_i) [vocab, k * hidden]``: the head of the fused features."""
        return jnp.concatenate([m.head_weight() for m in self.specialists], axis=-1)

    def __call__(self, input_ids: jax.Array, *, positions=None, segment_ids=None, cache=None,
                 attend_cache: bool = False, mask=None, return_hidden: bool = False,
                 rope_seq_len=None, cache_slots=None, gate_weights: jax.Array | None = None):
        """Fused logits ``[b, s, vocab]`` (``(logits, cache)`` with a cache), keyword arguments
        as ``CausalLM.__call__``. ``gate_weights [b, s, k]``: mix with these instead of the
        gate's (ablations: a one-hot or uniform mixture). ``return_hidden``: the fused features
        ``concat_i(w_i * h_i / width_i) [b, s, k * hidden]`` with
        ``features @ head_weight().T == sum_i w_i * o_i``."""
        hiddens, weights, new_cache = self._run(
            input_ids, positions=positions, segment_ids=segment_ids, cache=cache,
            attend_cache=attend_cache, mask=mask, rope_seq_len=rope_seq_len,
            cache_slots=cache_slots)
        if gate_weights is not None:
            if gate_weights.shape != weights.shape:
                raise InputError(f"gate_weights has shape {tuple(gate_weights.shape)}, expected "
                                 f"{tuple(weights.shape)} [batch, seq, specialists]")
            weights = gate_weights
        if return_hidden:
            out = jnp.concatenate([h * weights[..., i:i + 1].astype(h.dtype)
                                   for i, h in enumerate(hiddens)], axis=-1)
        else:
            logits = [ops.lm_head(h, m.head_weight())
                      for h, m in zip(hiddens, self.specialists, strict=True)]
            out = fuse_logits(weights, logits)
        return out if cache is None else (out, new_cache)

    def init_cache(self, batch: int, max_len: int, dtype: Any = None) -> list:
        """One zeroed KV cache per specialist (a list, in specialist order)."""
        return [m.init_cache(batch, max_len, dtype) for m in self.specialists]

    def num_parameters(self) -> int:
        return sum(x.size for x in jax.tree.leaves(nnx.state(self, nnx.Param)))
