"""APB's compressor: score every local KV entry (the training-free query-aware scorer or a
trained retaining head), max-pool the scores along the sequence and keep the top
``passing_len`` per KV head (:func:`compress_block`): the host's passing block."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from sharding.apb.layout import APBLayout
from sharding.errors import ConfigError

__all__ = [
    "RetainingHead",
    "RetainingHeads",
    "Scorer",
    "compress_block",
    "query_aware_scores",
    "resolve_scorer",
    "scorer_for_layer",
]

# (q_local, k_local, v_local, *, query) -> scores [b, block, kv_heads]; query may be None
Scorer = Callable[..., jax.Array]


def query_aware_scores(q: jax.Array, k: jax.Array, v: jax.Array, *, query: jax.Array | None,
                       key_valid: jax.Array | None = None,
                       sm_scale: float | None = None) -> jax.Array:
    """Training-free importance of every local KV entry: the attention probability the embedded
    query gives it, summed over the query tokens and the query heads of each KV head.

    k ``[b, block, kv_heads, d]``, query ``[b, query_len, q_heads, d]``; ``key_valid [block]``
    restricts the softmax to real keys. Returns ``[b, block, kv_heads]`` float32."""
    del q, v
    if query is None:
        raise ConfigError("scorer='query' needs the embedded query (query_len > 0)")
    b, block, kv_heads, dim = k.shape
    groups = query.shape[2] // kv_heads
    scale = dim**-0.5 if sm_scale is None else sm_scale
    qg = query.reshape(b, query.shape[1], kv_heads, groups, dim)
    logits = jnp.einsum("bthgd,bkhd->bhgtk", qg, k, preferred_element_type=jnp.float32) * scale
    if key_valid is not None:
        logits = jnp.where(key_valid, logits, -jnp.inf)
    probs = jax.nn.softmax(logits, axis=-1)
    if key_valid is not None:
        probs = jnp.where(key_valid, probs, 0.0)
    return jnp.einsum("bhgtk->bkh", probs)


def _max_pool(scores: jax.Array, size: int) -> jax.Array:
    """Max-pool ``[b, seq, h]`` along seq with a centred window of ``size`` (stride 1, same
    length, -inf padding)."""
    if size <= 1:
        return scores
    return lax.reduce_window(scores, -jnp.inf, lax.max, (1, size, 1), (1, 1, 1),
                             [(0, 0), ((size - 1) // 2, size // 2), (0, 0)])


def compress_block(k: jax.Array, v: jax.Array, scores: jax.Array, candidate: jax.Array,
                   passing_len: int, pool_size: int = 5
                   ) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """Select the passing block: top-``passing_len`` entries per KV head.

    k ``[b, block, kv_heads, dk]``, v ``[b, block, kv_heads, dv]``, scores ``[b, block,
    kv_heads]``, candidate ``[block]`` bool (False: anchor tokens, padding: never selected).
    Scores are max-pooled along the sequence (window ``pool_size``) first. Returns
    ``(k_sel [b, passing_len, kv_heads, dk], v_sel, indices [b, passing_len, kv_heads],
    n_valid)``: entries are in descending score order, and only the first ``n_valid`` (the
    number of candidates, the same for every head) are real."""
    scores = scores.astype(jnp.float32)
    scores = jnp.where(jnp.isnan(scores), -1e30, jnp.clip(scores, -1e30, 1e30))
    cand = candidate[None, :, None]
    scores = jnp.where(cand, scores, -jnp.inf)
    scores = jnp.where(cand, _max_pool(scores, pool_size), -jnp.inf)
    _, idx = lax.top_k(jnp.swapaxes(scores, 1, 2), passing_len)  # [b, h, passing_len]
    idx = jnp.swapaxes(idx, 1, 2)  # [b, passing_len, h]
    k_sel = jnp.take_along_axis(k, idx[..., None], axis=1)
    v_sel = jnp.take_along_axis(v, idx[..., None], axis=1)
    return k_sel, v_sel, idx, jnp.sum(candidate.astype(jnp.int32))


class RetainingHead:
    """Retaining head of one layer (as in Locret / APB): an MLP over ``concat[q; k; v]`` of every
    token giving one importance score per KV head.

    Parameters are plain arrays so the head works inside ``jit``/``shard_map`` without any
    module machinery: ``w1 [(q_heads + 2 kv_heads) * head_dim, hidden]``, ``w2 [hidden,
    kv_heads]``. Call: ``head(q [b, s, hq, d], k [b, s, hkv, d], v [b, s, hkv, dv]) -> [b, s,
    hkv]`` float32."""

    def __init__(self, w1: jax.Array, w2: jax.Array):
        self.w1, self.w2 = w1, w2

    @staticmethod
    def init(key: jax.Array, q_heads: int, kv_heads: int, head_dim: int, hidden: int = 256,
             v_dim: int | None = None) -> RetainingHead:
        v_dim = head_dim if v_dim is None else v_dim
        fan_in = (q_heads + kv_heads) * head_dim + kv_heads * v_dim
        k1, k2 = jax.random.split(key)
        w1 = jax.random.normal(k1, (fan_in, hidden), jnp.float32) * fan_in**-0.5
        w2 = jax.random.normal(k2, (hidden, kv_heads), jnp.float32) * hidden**-0.5
        return RetainingHead(w1, w2)

    def params(self) -> dict[str, jax.Array]:
        return {"w1": self.w1, "w2": self.w2}

    @staticmethod
    def apply(params: dict[str, jax.Array], q: jax.Array, k: jax.Array, v: jax.Array
              ) -> jax.Array:
        b, s = q.shape[:2]
        x = jnp.concatenate([q.reshape(b, s, -1), k.reshape(b, s, -1), v.reshape(b, s, -1)],
                            axis=-1).astype(jnp.float32)
        return jax.nn.silu(x @ params["w1"]) @ params["w2"]

    def __call__(self, q: jax.Array, k: jax.Array, v: jax.Array, *, query: Any = None,
                 **_: Any) -> jax.Array:
        return self.apply(self.params(), q, k, v)


class RetainingHeads:
    """One :class:`RetainingHead` per layer, usable as the ``scorer`` (or ``retaining_head``) of
    the ``"apb"`` ops backend: the model passes its layer index through the attention seam
    (``ops.attention(layer=i)``) and the backend scores layer ``i`` with :meth:`for_layer`
    ``(i)`` (``i`` modulo the number of heads). Called directly (no layer), a single head is
    used as is; with several heads that is a ``ConfigError`` naming the missing layer."""

    def __init__(self, heads: list[RetainingHead]):
        if not heads:
            raise ConfigError("RetainingHeads needs at least one layer head")
        self.heads = list(heads)

    def reset(self) -> None:
        """No-op, kept for callers of the old call-counting version (the layer index now comes
        through the attention seam)."""

    def __len__(self) -> int:
        return len(self.heads)

    def for_layer(self, layer: int) -> RetainingHead:
        """The head of layer ``layer`` (modulo the number of heads)."""
        return self.heads[int(layer) % len(self.heads)]

    def __call__(self, q, k, v, *, query=None, layer: int | None = None, **_):
        if layer is None:
            if len(self.heads) > 1:
                raise ConfigError(
                    f"RetainingHeads has {len(self.heads)} layer heads but no layer index was "
                    "given: call ops.attention(..., layer=i) (the cpmjax models do) or "
                    "for_layer(i)")
            layer = 0
        return self.for_layer(layer)(q, k, v)

    def save(self, path: str) -> None:
        arrays = {}
        for i, h in enumerate(self.heads):
            arrays[f"layer{i}.w1"] = np.asarray(h.w1)
            arrays[f"layer{i}.w2"] = np.asarray(h.w2)
        np.savez(path, **arrays)

    @staticmethod
    def load(path: str) -> RetainingHeads:
        data = np.load(path)
        n = len({key.split(".")[0] for key in data.files})
        return RetainingHeads([
            RetainingHead(jnp.asarray(data[f"layer{i}.w1"]), jnp.asarray(data[f"layer{i}.w2"]))
            for i in range(n)
        ])


def scorer_for_layer(scorer: Any, layer: int | None) -> Any:
    """``scorer.for_layer(layer)`` for a per-layer scorer (:class:`RetainingHeads`) when the
    layer is known, else ``scorer`` unchanged."""
    if layer is not None and hasattr(scorer, "for_layer"):
        return scorer.for_layer(layer)
    return scorer


def resolve_scorer(scorer: Any, retaining_head: Any, layout: APBLayout) -> Scorer | None:
    """The scorer the hosts run: None when nothing is passed (``passing_len == 0`` or one
    host), ``"query"`` (the query-aware scorer), or a callable ``(q, k, v, *, query) -> [b,
    block, kv_heads]`` (``scorer="retaining"`` gives ``retaining_head``). Raises
    ``ConfigError`` naming the bad setting."""
    if layout.passing_len == 0 or layout.hosts == 1:
        return None  # nothing is passed: no scoring
    if isinstance(scorer, str):
        if scorer == "query":
            if not layout.query_embedded:
                raise ConfigError(
                    "scorer='query' needs the query embedded in the anchor: query_len > 0 and "
                    f"anchor_len > 0 (got query_len={layout.query_len}, "
                    f"anchor_len={layout.anchor_len}); use scorer='retaining' or a callable"
                )
            return "query"  # type: ignore[return-value]
        if scorer == "retaining":
            if retaining_head is None:
                raise ConfigError("scorer='retaining' needs retaining_head= (a RetainingHead)")
            return retaining_head
        raise ConfigError(f"scorer={scorer!r} is not 'query', 'retaining' or a callable")
    if callable(scorer):
        return scorer
    raise ConfigError(f"scorer={scorer!r} is not 'query', 'retaining' or a callable")
