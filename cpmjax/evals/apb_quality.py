"""The APB quality study's library half: metrics (KL, Wilson interval, paired difference,
per-position logit statistics) and the hidden states of full attention and of a distributed
APB / Star prefill, the latter through :func:`cpmjax.generate.prefill.apb_prefill` (the path
``cpmjax.generate(prefill="apb"|"star")`` takes). ``scripts/apb_quality.py`` runs the study with
these; tests check them."""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from cpmjax import ops
from cpmjax.errors import ConfigError, ShardingError
from sharding.apb import APBLayout, make_apb_layout

__all__ = [
    "HOSTS",
    "distributed_hidden",
    "full_hidden",
    "kl_per_token",
    "layout_for",
    "logit_stats",
    "paired_delta",
    "sequence_mesh",
    "uniform_scores",
    "wilson_interval",
]

HOSTS = 8


# ----------------------------------------------------------------------------- metrics


def kl_per_token(p_logits: jax.Array, q_logits: jax.Array) -> jax.Array:
    """``KL(softmax(p) || softmax(q))`` per row: ``[..., vocab] x [..., vocab] -> [...]`` (nats,
    float32). ``p`` is the reference (full attention), ``q`` the approximation."""
    lp = jax.nn.log_softmax(p_logits.astype(jnp.float32), axis=-1)
    lq = jax.nn.log_softmax(q_logits.astype(jnp.float32), axis=-1)
    return jnp.sum(jnp.exp(lp) * (lp - lq), axis=-1)


def wilson_interval(successes: int, total: int, z: float = 1.959964) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion (95% by default)."""
    if total <= 0:
        return 0.0, 1.0
    p = successes / total
    den = 1 + z * z / total
    centre = (p + z * z / (2 * total)) / den
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / den
    return max(0.0, centre - half), min(1.0, centre + half)


def paired_delta(hit: np.ndarray, ref: np.ndarray, z: float = 1.959964
                 ) -> tuple[float, tuple[float, float]]:
    """Accuracy difference ``mean(hit) - mean(ref)`` on the same prompts (bool ``[n]`` each) and
    its normal-approximation 95% interval from the per-prompt differences."""
    d = hit.astype(np.float64) - ref.astype(np.float64)
    mean = float(d.mean())
    half = z * float(d.std(ddof=1)) / math.sqrt(d.size) if d.size > 1 else 1.0
    return mean, (mean - half, mean + half)


@jax.jit
def _chunk_stats(head: jax.Array, rh: jax.Array, h: jax.Array, t: jax.Array
                 ) -> dict[str, jax.Array]:
    ref = rh @ head.T
    out = h @ head.T
    lref = jax.nn.log_softmax(ref, -1)
    lout = jax.nn.log_softmax(out, -1)
    return dict(
        kl=kl_per_token(ref, out),
        nll=-jnp.take_along_axis(lout, t[:, None], -1)[:, 0],
        correct=jnp.argmax(out, -1) == t,
        ref_nll=-jnp.take_along_axis(lref, t[:, None], -1)[:, 0],
        ref_correct=jnp.argmax(ref, -1) == t,
        agree=jnp.argmax(out, -1) == jnp.argmax(ref, -1),
    )


def logit_stats(head: jax.Array, ref_hidden: jax.Array, hidden: jax.Array,
                targets: jax.Array, chunk: int = 512) -> dict[str, np.ndarray]:
    """Per-position KL(full || method), method NLL / correct, full NLL / correct, top-1 agreement
    (``[seq]`` each) from ``[seq, hidden]`` states and ``head [vocab, hidden]``; the vocab
    projection runs in chunks of ``chunk`` positions."""
    parts = []
    n = ref_hidden.shape[0]
    for s in range(0, n, chunk):
        e = min(n, s + chunk)
        pad = chunk - (e - s)
        rh = jnp.pad(ref_hidden[s:e], ((0, pad), (0, 0)))
        h = jnp.pad(hidden[s:e], ((0, pad), (0, 0)))
        t = jnp.pad(targets[s:e], (0, pad))
        parts.append({k: np.asarray(v)[: e - s] for k, v in _chunk_stats(head, rh, h, t).items()})
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


# ----------------------------------------------------------------------------- hidden states


def sequence_mesh(hosts: int = HOSTS) -> Mesh:
    """A one-axis ``("sequence",)`` mesh over the first ``hosts`` devices; ``ShardingError``
    when there are fewer."""
    devices = jax.devices()
    if len(devices) < hosts:
        raise ShardingError(f"need {hosts} devices, have {len(devices)} (set XLA_FLAGS before jax)")
    return Mesh(np.array(devices[:hosts]), ("sequence",))


def full_hidden(model: Any, tokens: jax.Array) -> jax.Array:
    """Full causal attention on one device: ``tokens [b, seq] -> hidden [b, seq, hidden]``
    (normalised, μP-scaled: ``logits = hidden @ head.T``)."""
    with ops.attention_backend("blockwise"):
        return model(tokens, return_hidden=True)


def layout_for(method: str, seq: int, *, query_len: int, query_offset: int = 1,
               hosts: int = HOSTS) -> APBLayout:
    """The ``APBLayout`` of ``method``: ``apb-*`` (paper defaults), ``star`` (anchor = the
    first block, nothing passed, query not embedded), ``exact-limit`` (anchor 0, pass all)."""
    probe = make_apb_layout(seq, hosts=hosts, anchor_len=0, passing_len=0, query_len=query_len,
                            embed_query=False)
    blk = probe.block_len
    if method.startswith("apb"):
        return make_apb_layout(seq, hosts=hosts, query_len=query_len, query_offset=query_offset)
    if method == "star":
        return make_apb_layout(seq, hosts=hosts, anchor_len=blk, passing_len=0,
                               query_len=query_len, embed_query=False)
    if method == "exact-limit":
        return make_apb_layout(seq, hosts=hosts, anchor_len=0, passing_len=blk,
                               query_len=query_len, embed_query=False)
    raise ConfigError(f"unknown method {method!r}: use 'apb-*', 'star' or 'exact-limit'")


def uniform_scores(q: jax.Array, k: jax.Array, v: jax.Array, *, query: Any = None,
                   **_: Any) -> jax.Array:
    """A scorer for the exact limit (every entry is passed, so the order does not matter):
    zeros ``[b, block, kv_heads]``."""
    return jnp.zeros(k.shape[:3], jnp.float32)


def distributed_hidden(model: Any, tokens: jax.Array, *, mesh: Mesh, layout: APBLayout,
                       scorer: Any, impl: Any = "blockwise") -> jax.Array:
    """APB / Star prefill of ``layout`` over ``mesh["sequence"]`` through
    :func:`cpmjax.generate.prefill.apb_prefill` (``return_hidden=True``), keeping every position:
    ``tokens [b, seq] -> hidden [b, seq, hidden]`` in input order (context rows from the
    expanded layout, then the query tokens against the sequence-sharded KV cache). The KV cache
    is ``seq`` rounded up to a multiple of ``8 * hosts``, sharded along the sequence."""
    b, seq = tokens.shape
    method = "star" if (layout.passing_len == 0 and not layout.query_embedded) else "apb"
    cache_len = -(-seq // (layout.hosts * 8)) * layout.hosts * 8
    cache = jax.device_put(model.init_cache(b, cache_len),
                           NamedSharding(mesh, PartitionSpec(None, "sequence")))
    graphdef, state = nnx.split(model)
    settings = (method, layout.anchor_len, layout.passing_len, layout.query_len,
                layout.query_offset, tuple(tokens.shape), cache_len)
    run, layouts = _compiled_prefill(graphdef, mesh, settings, scorer, impl)
    hidden = run(state, tokens, cache)
    used = layouts[0]
    if not np.array_equal(used.source_index(), layout.source_index()) or (
            used.passing_len != layout.passing_len):
        raise ConfigError(f"apb_prefill laid the prompt out as {used}, not as {layout}")
    return hidden


_PREFILLS: dict[Any, tuple[Any, list]] = {}


def _compiled_prefill(graphdef: Any, mesh: Mesh, settings: tuple, scorer: Any, impl: Any
                      ) -> tuple[Any, list]:
    """One jitted APB prefill per model, mesh, layout setting and shape (in ``settings``),
    scorer and implementation (a study runs many windows of one shape: compiled once, not per
    window; eager shard_maps would be ~4x slower still), and the list its one trace appends
    the layout to."""
    key = (graphdef, mesh, settings, scorer, impl)
    if key not in _PREFILLS:
        from cpmjax.generate.prefill import apb_prefill

        method, anchor_len, passing_len, query_len, query_offset = settings[:5]
        layouts: list = []

        def run(state, tokens, cache):
            hidden, _, used = apb_prefill(
                nnx.merge(graphdef, state), tokens, cache, mesh=mesh, axis="sequence",
                method=method, anchor_len=anchor_len, passing_len=passing_len,
                query_len=query_len, query_offset=query_offset, scorer=scorer, impl=impl,
                return_hidden=True)
            layouts.append(used)
            return hidden

        _PREFILLS[key] = (jax.jit(run), layouts)
    return _PREFILLS[key]

