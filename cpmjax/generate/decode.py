"""Vanilla autoregressive decoding with a static, preallocated KV cache.

Row ``r`` keeps its own positions; the cache slot of a token is its position, and the attention
mask is causal by position, so padding never leaks. The decode loop runs on device in
``lax.while_loop``: no Python and no recompilation per token (``decode_fn``); the driver
(``cpmjax.generate.driver.drive``) runs it, in chunks of ``stream_every`` tokens when streaming.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from cpmjax.generate.driver import (
    GenerationResult,
    GenerationStats,
    Request,
    bucket,
    compile_cache,
    compiled,
    drive,
    on_mesh,
    to_host,
)
from cpmjax.generate.prefill import (
    by_length,
    distributed_cache_len,
    local_prefill_fn,
    method_prefill_fn,
    ring_prefill_fn,
    ring_width,
)
from cpmjax.generate.sampling import SamplingConfig, sample_logits
from cpmjax.models import CausalLM

__all__ = ["decode_fn", "vanilla_generate"]


def decode_fn(graphdef: Any, sampling: SamplingConfig, stop_ids: tuple[int, ...], pad_id: int,
              state: Any, carry: dict, limit: jax.Array) -> dict:
    """Decode until ``carry["step"] == limit`` or every row stopped (on device)."""
    model = nnx.merge(graphdef, state)
    stop = jnp.asarray(stop_ids, jnp.int32) if stop_ids else None

    def cond(c):
        return (c["step"] < limit) & ~jnp.all(c["done"])

    def body(c):
        key, sub = jax.random.split(c["key"])
        token = sample_logits(c["logits"], sub, sampling)
        token = jnp.where(c["done"], pad_id, token)
        out = c["out"].at[:, c["step"]].set(token)
        lengths = c["lengths"] + (~c["done"]).astype(jnp.int32)
        done = c["done"]
        if stop is not None:
            done = done | jnp.any(token[:, None] == stop[None, :], axis=-1)
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


def vanilla_generate(
    model: CausalLM,
    request: Request,
    *,
    prefill: str = "local",
    mesh: Mesh | None = None,
    options: dict[str, Any] | None = None,
    stream: Callable[[np.ndarray], None] | None = None,
    stream_every: int = 8,
) -> GenerationResult:
    """Prefill (``prefill``: local, ring, apb or star; checked by the caller) and decode a
    validated ``request``: ``tokens [batch, n]`` new tokens per row."""
    if prefill == "local":
        return _local(model, request, stream=stream, stream_every=stream_every)

    def run(group: Request) -> GenerationResult:
        one = group.batch == request.batch  # a single group: its rows are the request's
        return _distributed(model, group, prefill=prefill, mesh=mesh, options=options or {},
                            stream=stream if one else None, stream_every=stream_every)

    return by_length(run, request)


def _local(model, request: Request, *, stream, stream_every) -> GenerationResult:
    config = model.config
    longest, batch = request.longest, request.batch
    width = min(bucket(longest), config.max_position_embeddings)
    padded = np.full((batch, width), request.pad_id, np.int32)
    padded[:, :longest] = request.tokens[:, :width]
    cache_len = max(width, longest + request.max_new_tokens)
    cache_len = min(-(-cache_len // 64) * 64, max(config.max_position_embeddings, width))
    graphdef, state = nnx.split(model)
    cache = compile_cache(graphdef)
    stats = GenerationStats(prompt_tokens=int(request.lengths.sum()))
    lengths = jnp.asarray(request.lengths)
    args = (state, jnp.asarray(padded), lengths, model.init_cache(batch, cache_len))
    prefill = compiled(cache, stats, ("prefill", batch, width, cache_len),
                       partial(local_prefill_fn, graphdef), *args)
    return _prefill_and_decode(cache, graphdef, state, prefill, args, lengths, request, stats,
                               stream=stream, stream_every=stream_every)


def _distributed(model, request: Request, *, prefill, mesh, options, stream, stream_every
                 ) -> GenerationResult:
    """Prefill prompts of one length across the ``sequence`` axis of ``mesh`` (APB, Star or
    ring), then decode with the cache sharded along the sequence."""
    hosts = mesh.shape["sequence"]
    batch, seq = request.tokens.shape
    cache_len = distributed_cache_len(seq, request.max_new_tokens, hosts)
    graphdef, state = nnx.split(model)
    cache = compile_cache(graphdef)
    stats = GenerationStats(prompt_tokens=int(request.lengths.sum()))
    # everything the compiled programs take lies on the mesh, which may span the devices of
    # several processes (one per host): weights, prompts and decode state replicated (each
    # process fills its own devices), the cache allocated sharded along the sequence
    state = on_mesh(state, mesh)
    kv = jax.jit(partial(model.init_cache, batch, cache_len),
                 out_shardings=NamedSharding(mesh, PartitionSpec(None, "sequence")))()
    if prefill == "ring":
        padded = np.full((batch, ring_width(seq, hosts)), request.pad_id, np.int32)
        padded[:, :seq] = request.tokens
        args = (state, *on_mesh((padded, request.lengths), mesh), kv)
        exe = compiled(cache, stats, ("ring", batch, seq, cache_len, id(mesh)),
                       partial(ring_prefill_fn, graphdef, mesh), *args)
    else:
        frozen = tuple(sorted(options.items()))
        args = (state, on_mesh(request.tokens, mesh), kv)
        exe = compiled(cache, stats, (prefill, batch, seq, cache_len, frozen, id(mesh)),
                       partial(method_prefill_fn, graphdef, prefill, frozen, mesh), *args)
    positions = np.full((batch,), seq, np.int32)
    return _prefill_and_decode(cache, graphdef, state, exe, args, positions, request, stats,
                               stream=stream, stream_every=stream_every, mesh=mesh)


def _prefill_and_decode(cache, graphdef, state, prefill, args, positions, request: Request,
                        stats: GenerationStats, *, stream, stream_every, mesh=None
                        ) -> GenerationResult:
    """Run the compiled prefill, then the on-device decode loop from its logits and cache
    (with ``mesh``: the decode state replicated on it, next to the sharded cache)."""
    t0 = time.perf_counter()
    logits, kv = prefill(*args)
    logits = jax.block_until_ready(logits)
    stats.prefill_seconds = time.perf_counter() - t0
    batch, max_new = request.batch, request.max_new_tokens
    carry = dict(
        key=jax.random.PRNGKey(request.seed),
        out=jnp.full((batch, max_new), request.pad_id, jnp.int32),
        lengths=jnp.zeros((batch,), jnp.int32),
        done=jnp.zeros((batch,), bool),
        pos=positions,
        logits=logits,
        cache=kv,
        step=jnp.asarray(0, jnp.int32),
    )
    if mesh is not None:
        carry = on_mesh(carry, mesh)
    leaf = jax.tree.leaves(kv)[0]
    key = ("decode", batch, leaf.shape[1], max_new, request.sampling, request.stop_ids,
           request.pad_id, str(getattr(leaf, "sharding", None)))
    loop = compiled(cache, stats, key, partial(decode_fn, graphdef, request.sampling,
                                               request.stop_ids, request.pad_id),
                    state, carry, jnp.asarray(max_new, jnp.int32))
    carry, stats.decode_seconds = drive(
        loop, (state,), carry, limit=max_new, stream=stream, chunk=stream_every,
        emitted=lambda c: int(to_host(c["step"])),
        finished=lambda c, step: int(to_host(c["step"])) < step)
    out = to_host(carry["out"])
    steps = int(to_host(carry["step"]))
    stats.decode_steps = steps
    new_lengths = to_host(carry["lengths"])
    stats.new_tokens = int(new_lengths.sum())
    return GenerationResult(tokens=out[:, :steps], lengths=new_lengths, stats=stats)
