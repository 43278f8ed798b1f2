"""Autoregressive generation with a static, preallocated KV cache.

- Prompts (ragged, any lengths) are right-padded to a power-of-two length bucket, so prefill
  compiles once per (batch, bucket). Row ``r`` keeps its own positions; the cache slot of a token
  is its position, and the attention mask is causal by position, so padding never leaks.
- The decode loop runs on device in ``lax.while_loop``: no Python and no recompilation per token.
  For streaming it runs in chunks of ``stream_every`` tokens with the same compiled executable.
- Sampling: greedy (``temperature == 0``), or temperature with top-k and/or top-p (nucleus).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from cpmjax import ops
from cpmjax.errors import (
    ConfigError,
    EmptyPromptError,
    InputError,
    PromptTooLongError,
    TokenIdError,
)
from cpmjax.models import CausalLM


@dataclasses.dataclass
class GenerationStats:
    prompt_tokens: int = 0
    new_tokens: int = 0
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    compile_seconds: float = 0.0
    decode_steps: int = 0

    @property
    def prefill_tokens_per_second(self) -> float:
        return self.prompt_tokens / self.prefill_seconds if self.prefill_seconds else 0.0

    @property
    def decode_tokens_per_second(self) -> float:
        return self.new_tokens / self.decode_seconds if self.decode_seconds else 0.0

    def as_dict(self) -> dict[str, float]:
        out = dataclasses.asdict(self)
        out["prefill_tokens_per_second"] = self.prefill_tokens_per_second
        out["decode_tokens_per_second"] = self.decode_tokens_per_second
        return out


@dataclasses.dataclass
class GenerationResult:
    tokens: np.ndarray  # [batch, n] new tokens; after a stop token: pad_token_id
    lengths: np.ndarray  # [batch] new tokens per row, the stop token included
    stats: GenerationStats

    def row(self, i: int) -> list[int]:
        return self.tokens[i, : self.lengths[i]].tolist()


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0


def filtered_logits(logits: jax.Array, sampling: SamplingConfig) -> jax.Array:
    """Temperature, top-k and top-p applied to float32 ``logits [..., vocab]`` (-inf outside the
    kept set); what ``sample_logits`` samples from."""
    logits = logits / sampling.temperature
    if sampling.top_k and sampling.top_k < logits.shape[-1]:
        kth = jax.lax.top_k(logits, sampling.top_k)[0][..., -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if sampling.top_p < 1.0:
        sorted_logits = jnp.sort(logits, axis=-1)[..., ::-1]
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        cumulative = jnp.cumsum(probs, axis=-1)
        # keep the smallest prefix whose mass reaches top_p (always at least one token)
        keep = (cumulative - probs) < sampling.top_p
        cutoff = jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits < cutoff, -jnp.inf, logits)
    return logits


def sample_logits(logits: jax.Array, key: jax.Array, sampling: SamplingConfig) -> jax.Array:
    """Sample token ids ``[b]`` from float32 ``logits [b, vocab]``."""
    if sampling.greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return jax.random.categorical(key, filtered_logits(logits, sampling), axis=-1).astype(
        jnp.int32)


def _bucket(n: int, minimum: int = 16) -> int:
    size = minimum
    while size < n:
        size *= 2
    return size


def prepare_prompts(
    input_ids: Any, vocab_size: int, pad_id: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Validate prompts (array ``[b, s]``, one list of ids, or a list of lists) and return
    ``(padded [b, max_len] int32, lengths [b])``. Raises typed errors naming the culprit."""
    if isinstance(input_ids, (np.ndarray, jax.Array)):
        array = np.asarray(input_ids)
        if array.ndim == 1:
            array = array[None]
        if array.ndim != 2:
            raise InputError(f"input_ids must be [batch, seq], got shape {array.shape}")
        rows = [list(r) for r in array]
    else:
        rows = list(input_ids)
        if rows and not isinstance(rows[0], (list, tuple, np.ndarray)):
            rows = [rows]
    if not rows:
        raise EmptyPromptError("no prompts given (batch of size 0)")
    lengths = np.asarray([len(r) for r in rows], np.int32)
    for i, n in enumerate(lengths):
        if n == 0:
            raise EmptyPromptError(f"prompt {i} is empty (0 tokens)")
    width = int(lengths.max())
    padded = np.full((len(rows), width), pad_id, np.int64)
    for i, r in enumerate(rows):
        padded[i, : len(r)] = np.asarray(r, np.int64)
        bad = [(j, int(t)) for j, t in enumerate(r) if not 0 <= int(t) < vocab_size]
        if bad:
            j, t = bad[0]
            raise TokenIdError(
                f"token id {t} at prompt {i}, position {j} is outside the vocabulary "
                f"[0, {vocab_size})"
            )
    return padded.astype(np.int32), lengths


def validate_request(
    config: Any,
    input_ids: Any,
    max_new_tokens: int,
    *,
    temperature: float,
    top_k: int,
    top_p: float,
    pad_token_id: int | None,
) -> tuple[np.ndarray, np.ndarray, int]:
    """Check a generation request before any compute; returns ``(tokens, lengths, pad_id)``
    from ``prepare_prompts``. Raises typed errors naming the culprit."""
    if max_new_tokens < 1:
        raise InputError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if not 0.0 < top_p <= 1.0:
        raise InputError(f"top_p must be in (0, 1], got {top_p}")
    if top_k < 0 or temperature < 0:
        raise InputError(f"top_k and temperature must be >= 0, got {top_k}, {temperature}")
    pad_id = 0 if pad_token_id is None else int(pad_token_id)
    tokens, lengths = prepare_prompts(input_ids, config.vocab_size, pad_id)
    longest = int(lengths.max())
    if longest + max_new_tokens > config.max_position_embeddings:
        worst = int(np.argmax(lengths))
        raise PromptTooLongError(
            f"prompt {worst} has {longest} tokens; with max_new_tokens={max_new_tokens} that is "
            f"{longest + max_new_tokens} > max_position_embeddings="
            f"{config.max_position_embeddings}"
        )
    return tokens, lengths, pad_id


class _Compiled:
    """Per-model cache of compiled prefill / decode executables."""

    def __init__(self):
        self.executables: dict[Any, Any] = {}

    def get(self, key, fn, *args):
        if key not in self.executables:
            self.executables[key] = jax.jit(fn).lower(*args).compile()
            return self.executables[key], True
        return self.executables[key], False


_COMPILED: dict[Any, _Compiled] = {}


def _prefill_fn(graphdef, state, tokens, lengths, cache):
    """Run the padded prompt, fill the cache, return last-real-token logits [b, vocab]."""
    model = nnx.merge(graphdef, state)
    b, s = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
    hidden, cache = model(tokens, positions=positions, cache=cache, return_hidden=True,
                          rope_seq_len=jnp.max(lengths))
    last = hidden[jnp.arange(b), lengths - 1]
    return ops.lm_head(last, model.head_weight()), cache


def _decode_fn(graphdef, sampling, stop_ids, pad_id, state, carry, limit):
    """Decode until ``carry["step"] == limit`` or every row stopped (on device)."""
    model = nnx.merge(graphdef, state)
    stop_ids = jnp.asarray(stop_ids, jnp.int32) if stop_ids else None

    def cond(c):
        return (c["step"] < limit) & ~jnp.all(c["done"])

    def body(c):
        key, sub = jax.random.split(c["key"])
        token = sample_logits(c["logits"], sub, sampling)
        token = jnp.where(c["done"], pad_id, token)
        out = c["out"].at[:, c["step"]].set(token)
        lengths = c["lengths"] + (~c["done"]).astype(jnp.int32)
        done = c["done"]
        if stop_ids is not None:
            done = done | jnp.any(token[:, None] == stop_ids[None, :], axis=-1)
        pos = c["pos"]

        def forward(_):
            logits, cache = model(token[:, None], positions=pos[:, None], cache=c["cache"],
                                  attend_cache=True)
            return logits[:, 0].astype(c["logits"].dtype), cache

        # The forward after the last token (or once every row stopped) would only produce
        # logits nobody samples from: skip it.
        last = (c["step"] + 1 >= c["out"].shape[1]) | jnp.all(done)
        logits, cache = jax.lax.cond(last, lambda _: (c["logits"], c["cache"]), forward, None)
        return dict(c, key=key, out=out, lengths=lengths, done=done, pos=pos + 1,
                    logits=logits, cache=cache, step=c["step"] + 1)

    return jax.lax.while_loop(cond, body, carry)


def generate(
    model: CausalLM,
    input_ids: Any,
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int = 0,
    stop_token_ids: Sequence[int] = (),
    pad_token_id: int | None = None,
    stream: Callable[[np.ndarray], None] | None = None,
    stream_every: int = 8,
    speculative: Any = None,
    prefill: str = "local",
    mesh: jax.sharding.Mesh | None = None,
    prefill_options: dict[str, Any] | None = None,
) -> GenerationResult:
    """Generate up to ``max_new_tokens`` new tokens per prompt.

    ``input_ids``: ``[batch, seq]`` array or a (ragged) list of token-id lists. ``stream``, if
    given, is called with the ``[batch, n]`` tokens generated so far after every
    ``stream_every`` tokens. Returns a ``GenerationResult`` with ``.tokens [batch, n]``,
    ``.lengths`` and ``.stats``. ``speculative``: a ``cpmjax.Speculative`` to decode with a draft
    (EAGLE-2 / FR-Spec; same output distribution, see ``cpmjax.generate.speculative``).

    ``prefill``: ``"local"`` (one device, the default), or a distributed long-context prefill over
    the ``sequence`` axis of ``mesh``: ``"apb"`` (anchor + compressed passing blocks),
    ``"star"`` (anchor + local block, nothing passed) or ``"ring"`` (exact, BurstAttention).
    ``prefill_options`` go to ``cpmjax.generate.prefill.apb_prefill`` (``anchor_len``,
    ``passing_len``, ``query_len``, ``query_offset``, ``scorer`` ...). A distributed prefill lays
    out one prompt length at a time: prompts of different lengths run as one batch per length
    (sampling seeds the same per batch); the cache stays sharded along the sequence and
    decoding attends to every host's part of it."""
    if speculative is not None:
        from cpmjax.generate.speculative import speculative_generate

        return speculative_generate(
            model, input_ids, max_new_tokens, speculative, temperature=temperature, top_k=top_k,
            top_p=top_p, seed=seed, stop_token_ids=stop_token_ids, pad_token_id=pad_token_id,
            stream=stream, stream_every=stream_every,
        )
    config = model.config
    tokens, lengths, pad_id = validate_request(
        config, input_ids, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
        pad_token_id=pad_token_id,
    )
    longest = int(lengths.max())
    batch = tokens.shape[0]
    if prefill not in ("local", "full", "apb", "star", "ring"):
        raise ConfigError(f"prefill={prefill!r}; expected local, apb, star or ring")
    if prefill != "local" and prefill != "full":
        return _generate_by_length(
            model, tokens, lengths, max_new_tokens, prefill=prefill, mesh=mesh,
            options=dict(prefill_options or {}), sampling=SamplingConfig(
                float(temperature), int(top_k), float(top_p)),
            stop_ids=tuple(int(t) for t in stop_token_ids), pad_id=pad_id, seed=seed,
        )
    bucket = min(_bucket(longest), config.max_position_embeddings)
    padded = np.full((batch, bucket), pad_id, np.int32)
    padded[:, :longest] = tokens[:, :bucket]
    cache_len = max(bucket, longest + max_new_tokens)
    cache_len = min(-(-cache_len // 64) * 64, max(config.max_position_embeddings, bucket))
    sampling = SamplingConfig(float(temperature), int(top_k), float(top_p))
    stop_ids = tuple(int(t) for t in stop_token_ids)

    graphdef, state = nnx.split(model)
    compiled = _COMPILED.setdefault(graphdef, _Compiled())
    stats = GenerationStats(prompt_tokens=int(lengths.sum()))

    cache = model.init_cache(batch, cache_len)
    lengths_dev = jnp.asarray(lengths)
    args = (state, jnp.asarray(padded), lengths_dev, cache)
    t0 = time.perf_counter()
    prefill_exe, fresh = compiled.get(("prefill", batch, bucket, cache_len),
                                      partial(_prefill_fn, graphdef), *args)
    if fresh:
        stats.compile_seconds += time.perf_counter() - t0
    t0 = time.perf_counter()
    logits, cache = prefill_exe(*args)
    logits = jax.block_until_ready(logits)
    stats.prefill_seconds = time.perf_counter() - t0
    return _decode(compiled, graphdef, state, logits, cache, lengths_dev, max_new_tokens,
                   sampling=sampling, stop_ids=stop_ids, pad_id=pad_id, seed=seed, stats=stats,
                   stream=stream, stream_every=stream_every)


def _decode(compiled, graphdef, state, logits, cache, positions, max_new_tokens, *, sampling,
            stop_ids, pad_id, seed, stats, stream=None, stream_every=8) -> GenerationResult:
    """Run the on-device decode loop from prefill logits and a filled cache."""
    batch, cache_len = logits.shape[0], jax.tree.leaves(cache)[0].shape[1]
    carry = dict(
        key=jax.random.PRNGKey(seed),
        out=jnp.full((batch, max_new_tokens), pad_id, jnp.int32),
        lengths=jnp.zeros((batch,), jnp.int32),
        done=jnp.zeros((batch,), bool),
        pos=positions,
        logits=logits,
        cache=cache,
        step=jnp.asarray(0, jnp.int32),
    )
    cache_sharding = str(getattr(jax.tree.leaves(cache)[0], "sharding", None))
    decode_key = ("decode", batch, cache_len, max_new_tokens, sampling, stop_ids, pad_id,
                  cache_sharding)
    decode_fn = partial(_decode_fn, graphdef, sampling, stop_ids, pad_id)
    limit0 = jnp.asarray(max_new_tokens, jnp.int32)
    t0 = time.perf_counter()
    decode, fresh = compiled.get(decode_key, decode_fn, state, carry, limit0)
    if fresh:
        stats.compile_seconds += time.perf_counter() - t0
    t0 = time.perf_counter()
    if stream is None:
        carry = decode(state, carry, limit0)
    else:
        step = 0
        while step < max_new_tokens:
            step = min(step + stream_every, max_new_tokens)
            carry = decode(state, carry, jnp.asarray(step, jnp.int32))
            done_steps = int(carry["step"])
            stream(np.asarray(carry["out"][:, :done_steps]))
            if done_steps < step:  # every row stopped
                break
    out = np.asarray(jax.block_until_ready(carry["out"]))
    stats.decode_seconds = time.perf_counter() - t0
    steps = int(carry["step"])
    stats.decode_steps = steps
    new_lengths = np.asarray(carry["lengths"])
    stats.new_tokens = int(new_lengths.sum())
    return GenerationResult(tokens=out[:, :steps], lengths=new_lengths, stats=stats)


def _apb_prefill_fn(graphdef, method, options, mesh, state, tokens, cache):
    from cpmjax.generate.prefill import apb_prefill

    model = nnx.merge(graphdef, state)
    logits, cache, _ = apb_prefill(model, tokens, cache, mesh=mesh, method=method,
                                   **dict(options))
    return logits, cache


def _ring_prefill_fn(graphdef, mesh, state, tokens, lengths, cache):
    with ops.attention_backend("burst", mesh=mesh, layout="contiguous"):
        return _prefill_fn(graphdef, state, tokens, lengths, cache)


def _generate_by_length(model, tokens, lengths, max_new_tokens, *, pad_id, **kwargs
                        ) -> GenerationResult:
    """A distributed prefill per group of equal-length prompts (its layout depends on the
    length), the results put back in input order."""
    groups = np.unique(lengths)
    if groups.size == 1:
        return _generate_distributed(model, tokens, lengths, max_new_tokens, pad_id=pad_id,
                                     **kwargs)
    batch = tokens.shape[0]
    out = np.full((batch, max_new_tokens), pad_id, np.int32)
    new_lengths = np.zeros((batch,), lengths.dtype)
    stats = GenerationStats(prompt_tokens=int(lengths.sum()))
    for length in groups:
        rows = np.flatnonzero(lengths == length)
        res = _generate_distributed(model, tokens[rows, :length], lengths[rows],
                                    max_new_tokens, pad_id=pad_id, **kwargs)
        out[rows, : res.tokens.shape[1]] = res.tokens
        new_lengths[rows] = res.lengths
        for field in ("new_tokens", "prefill_seconds", "decode_seconds", "compile_seconds"):
            setattr(stats, field, getattr(stats, field) + getattr(res.stats, field))
        stats.decode_steps = max(stats.decode_steps, res.stats.decode_steps)
    return GenerationResult(tokens=out[:, : stats.decode_steps], lengths=new_lengths,
                            stats=stats)


def _generate_distributed(model, tokens, lengths, max_new_tokens, *, prefill, mesh, options,
                          sampling, stop_ids, pad_id, seed) -> GenerationResult:
    """Prefill prompts of one length (``_generate_by_length`` groups them) across the
    ``sequence`` axis of ``mesh`` (APB, Star or ring), then decode with the cache sharded along
    the sequence."""
    from jax.sharding import NamedSharding, PartitionSpec

    if mesh is None or "sequence" not in mesh.shape:
        raise ConfigError(f"prefill={prefill!r} needs mesh= with a 'sequence' axis")
    hosts = mesh.shape["sequence"]
    batch, seq = tokens.shape
    cache_len = -(-(seq + max_new_tokens) // (hosts * 8)) * hosts * 8
    graphdef, state = nnx.split(model)
    compiled = _COMPILED.setdefault(graphdef, _Compiled())
    stats = GenerationStats(prompt_tokens=int(lengths.sum()))
    cache_sharding = NamedSharding(mesh, PartitionSpec(None, "sequence"))
    cache = jax.device_put(model.init_cache(batch, cache_len), cache_sharding)
    frozen = tuple(sorted(options.items()))
    t0 = time.perf_counter()
    if prefill == "ring":
        width = -(-seq // hosts) * hosts  # right-pad so that every host holds a block
        padded = np.full((batch, width), pad_id, np.int32)
        padded[:, :seq] = tokens
        args = (state, jnp.asarray(padded), jnp.asarray(lengths), cache)
        exe, fresh = compiled.get(("ring", batch, seq, cache_len, id(mesh)),
                                  partial(_ring_prefill_fn, graphdef, mesh), *args)
    else:
        args = (state, jnp.asarray(tokens), cache)
        exe, fresh = compiled.get((prefill, batch, seq, cache_len, frozen, id(mesh)),
                                  partial(_apb_prefill_fn, graphdef, prefill, frozen, mesh),
                                  *args)
    if fresh:
        stats.compile_seconds += time.perf_counter() - t0
    t0 = time.perf_counter()
    logits, cache = exe(*args)
    logits = jax.block_until_ready(logits)
    stats.prefill_seconds = time.perf_counter() - t0
    positions = jnp.full((batch,), seq, jnp.int32)
    return _decode(compiled, graphdef, state, logits, cache, positions, max_new_tokens,
                   sampling=sampling, stop_ids=stop_ids, pad_id=pad_id, seed=seed, stats=stats)
