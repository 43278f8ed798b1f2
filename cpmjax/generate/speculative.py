"""Lossless speculative decoding: EAGLE-2 dynamic draft trees, optionally with the FR-Spec
frequency-ranked draft head, in one on-device loop.

One *cycle* (the body of a ``lax.while_loop``, batched, every row independent):

1. **Draft** (``_draft_tree``): from the draft's predicted feature after the root token, expand an
   EAGLE-2 tree (``tree.py``): ``depth - 1`` draft forwards of ``top_k`` frontier tokens each,
   every one attending to the committed draft cache plus its own ancestors (written to scratch
   slots of the draft cache); rerank the candidate pool and keep ``total_tokens``.
2. **Verify** (``_verify``): one target forward over the ``total_tokens + 1`` tree tokens written
   to scratch slots ``[cache_len, cache_len + T)`` of the target cache, at tree positions, under
   the tree mask.
3. **Accept / commit** (``_commit``): the target picks its token after every node it reaches
   on the walk from the root (``_target_path``: argmax, or one sample per node from its
   temperature / top-k / top-p distribution); the longest draft path
   that agrees is accepted, plus the target's token after it (the *bonus*). The accepted path's
   keys/values are copied from the scratch slots to consecutive slots (slot = position again),
   and the draft re-reads the accepted path with the target's true features (its KV cache gets
   the same compaction) to predict the feature after the new root.

Exactness. The tree is a deterministic function of the draft (top-k at every step), so each
draft token is a point-mass proposal. The recursive rejection rule over the siblings
``x_1, x_2, ...`` of a node with target distribution ``p`` then reads: accept ``x_1`` with
probability ``p(x_1)``; otherwise move to the residual ``p`` with ``x_1`` removed, renormalised,
and accept ``x_2`` with probability ``p(x_2) / (1 - p(x_1))``; ...; if every sibling is rejected
sample from ``p`` without the siblings. The probability of ending with token ``y`` is exactly
``p(y)``, and that is also what one draws by sampling ``y ~ p`` once and descending into the
child whose token is ``y`` when there is one. The implementation uses that form: one
independent sample (``sample_nodes``) at each node of the walk from the root, so the output is
distributed exactly as vanilla sampling (greedy is the special case of the argmax). FR-Spec
only changes which candidates are proposed (the draft scores ``V_s`` frequent ids), never ``p``.

After a prefill on one device (``"local"``) or the exact ring (``"ring"``, which leaves the same
caches); the approximate APB / Star prefills are refused by ``cpmjax.generate``: the draft has
no features of the prompt they compress.
"""

from __future__ import annotations

import dataclasses
import os
import time
import warnings
from collections.abc import Callable
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from cpmjax import ops
from cpmjax.errors import ConfigError, MissingPathError
from cpmjax.generate import tree as tree_lib
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
    validate_request,
)
from cpmjax.generate.eagle import EagleDraft, check_compatible, load_draft
from cpmjax.generate.frspec import (
    HEAD_IMPLS,
    draft_topk,
    head_flops,
    load_freq_vocab,
    resolve_head_impl,
)
from cpmjax.generate.prefill import ring_width
from cpmjax.generate.sampling import SamplingConfig, sample_logits, sample_nodes
from cpmjax.models import CausalLM
from cpmjax.timing import median_seconds

__all__ = [
    "DEFAULT_DRAFT_NAME",
    "DEFAULT_FREQ_VOCAB",
    "METHODS",
    "Speculative",
    "SpeculativeStats",
    "check_speculative",
    "default_draft_path",
    "resolve",
    "run_speculative",
]

METHODS = ("eagle2", "frspec")
DEFAULT_DRAFT_NAME = "cpmjax-tiny-draft"
DEFAULT_FREQ_VOCAB = "freq_vocab.npy"
_ASSETS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets")


def default_draft_path() -> str:
    """Directory of the EAGLE draft shipped for the bundled default model (``cpmjax-tiny``);
    it holds the draft's ``config.json``, ``model.safetensors`` and its FR-Spec
    ``freq_vocab.npy``."""
    path = os.path.join(_ASSETS, DEFAULT_DRAFT_NAME)
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise MissingPathError(f"no bundled draft at {path}; pass a draft directory")
    return path


@dataclasses.dataclass
class Speculative:
    """Speculative decoding settings for ``cpmjax.generate(..., speculative=...)``.

    - ``draft``: an ``EagleDraft`` or the directory of a saved one (``save_draft``); ``None``:
      the draft shipped for the bundled model (``default_draft_path()``).
    - ``method``: ``"eagle2"`` (full-vocabulary draft head) or ``"frspec"`` (the draft scores
      only ``vocab_subset``).
    - ``vocab_subset``: for ``"frspec"``, the frequency-ranked ids (an int array or a ``.npy``
      written by ``cpmjax freq-vocab``); ``None``: the draft directory's own
      ``freq_vocab.npy``. ``subset_size`` keeps the first that many; ``None``: the whole given
      list, or, with the draft directory's list, ``vocab_size // 4`` (at least ``top_k``) as
      ``cpmjax generate --spec frspec`` does.
    - ``depth``: draft steps (tree depth); ``top_k``: branching per step; ``total_tokens``: draft
      tokens verified per cycle (the tree also holds the root token).
    - ``head_impl``: the draft head's top-k: ``"reference"`` (matmul + log-softmax + top-k),
      ``"blockwise"`` or ``"pallas"`` (``pallas_kernels.fr_lm_head``; use it on GPU/TPU).
      ``head_backend=`` and ``"xla"`` are deprecated names of the same settings.
    - ``time_phases``: after generating, time the draft and verify phases as separate
      executables on the final state and report their shares of a cycle in the stats.
    """

    draft: Any = None
    method: str = "eagle2"
    vocab_subset: Any = None
    subset_size: int | None = None
    depth: int = 6
    top_k: int = 10
    total_tokens: int = 60
    head_impl: str = "reference"
    time_phases: bool = False
    head_backend: dataclasses.InitVar[str | None] = None

    def __post_init__(self, head_backend: str | None) -> None:
        if head_backend is not None:
            warnings.warn("Speculative(head_backend=...) is deprecated; use head_impl= "
                          "('xla' is now 'reference')", DeprecationWarning, stacklevel=3)
            self.head_impl = "reference" if head_backend == "xla" else head_backend
        self.head_impl = resolve_head_impl(self.head_impl, what="head_impl", stacklevel=4)


@dataclasses.dataclass
class SpeculativeStats(GenerationStats):
    """``GenerationStats`` plus: ``cycles`` (draft-verify cycles summed over rows),
    ``mean_accepted_length`` (tokens committed per cycle: accepted draft tokens + the bonus
    token), ``draft_seconds`` / ``verify_seconds`` (one cycle's draft phase / verify forward
    timed as separate executables when ``time_phases``), ``draft_share`` / ``verify_share``
    (those over the measured time per loop iteration), ``draft_head_flops`` (per draft token)."""

    cycles: int = 0
    loop_iterations: int = 0
    mean_accepted_length: float = 0.0
    draft_seconds: float = float("nan")
    verify_seconds: float = float("nan")
    draft_share: float = float("nan")
    verify_share: float = float("nan")
    draft_head_flops: int = 0


@dataclasses.dataclass(frozen=True)
class _Static:
    depth: int
    top_k: int
    total_tokens: int
    cache_len: int
    sampling: SamplingConfig
    stop_ids: tuple[int, ...]
    pad_id: int
    max_new_tokens: int
    head_impl: str
    subset: bool
    max_positions: int

    @property
    def tree_size(self) -> int:
        return self.total_tokens + 1

    @property
    def draft_scratch(self) -> int:
        return max(1, (self.depth - 1) * self.top_k)


_DRAFTS: dict[str, EagleDraft] = {}


def check_speculative(spec: Any) -> None:
    """The checks of ``spec`` that need no model (method, tree shape); ``ConfigError``."""
    if not isinstance(spec, Speculative):
        raise ConfigError(f"speculative must be a cpmjax.Speculative, got {spec!r}")
    if spec.method not in METHODS:
        raise ConfigError(f"speculative method {spec.method!r} is unknown; use one of {METHODS}")
    if spec.depth < 1 or spec.top_k < 1 or spec.total_tokens < 1:
        raise ConfigError(
            f"depth, top_k and total_tokens must be >= 1, got {spec.depth}, {spec.top_k}, "
            f"{spec.total_tokens}"
        )
    limit = tree_lib.pool_size(spec.depth, spec.top_k)
    if spec.total_tokens > limit:
        raise ConfigError(
            f"total_tokens={spec.total_tokens} exceeds the {limit} candidates that depth="
            f"{spec.depth}, top_k={spec.top_k} produce"
        )
    if spec.head_impl not in HEAD_IMPLS:
        raise ConfigError(f"head_impl {spec.head_impl!r}: use one of {HEAD_IMPLS}")


def resolve(spec: Speculative, model: CausalLM) -> tuple[EagleDraft, np.ndarray | None]:
    """Validate ``spec`` against ``model``; return the draft module and the subset ids
    (``[V_s]`` int32 for FR-Spec, else ``None``). Fills the defaults: no draft = the bundled
    one, no FR-Spec vocabulary = the draft directory's ``freq_vocab.npy``."""
    check_speculative(spec)
    draft = default_draft_path() if spec.draft is None else spec.draft
    directory = os.fspath(draft) if isinstance(draft, (str, os.PathLike)) else None
    if directory is not None:
        key = f"{os.path.abspath(directory)}|{jnp.dtype(model.dtype).name}"
        if key not in _DRAFTS:
            _DRAFTS[key] = load_draft(directory, dtype=model.dtype)
        draft = _DRAFTS[key]
    if not isinstance(draft, EagleDraft):
        raise ConfigError(f"speculative draft must be an EagleDraft or a directory, got {draft!r}")
    try:
        check_compatible(draft, model)
    except ConfigError as exc:
        if spec.draft is None:
            raise ConfigError(f"{exc} (draft=None is the draft shipped for the bundled model; "
                              "pass the draft trained for this one)") from None
        raise
    vocab = model.config.vocab_size
    subset = None
    if spec.method == "frspec":
        ranked, size = spec.vocab_subset, spec.subset_size
        if ranked is None:
            ranked = None if directory is None else os.path.join(directory, DEFAULT_FREQ_VOCAB)
            if ranked is None or not os.path.isfile(ranked):
                where = "an EagleDraft object" if ranked is None else f"no {ranked}"
                raise ConfigError(
                    f"method='frspec' needs vocab_subset (a freq-vocab .npy or ids): {where} "
                    f"to take the draft directory's {DEFAULT_FREQ_VOCAB} from")
            if size is None:
                size = max(spec.top_k, vocab // 4)
        subset = load_freq_vocab(ranked, size, vocab_size=vocab)
    elif spec.vocab_subset is not None:
        raise ConfigError("vocab_subset is used only by method='frspec'")
    scored = vocab if subset is None else subset.size
    if spec.top_k > scored:
        raise ConfigError(f"top_k={spec.top_k} exceeds the {scored} ids the draft head scores")
    return draft, subset


# ----------------------------------------------------------------------------------------------
# the cycle
def _prefix_mask(pos: jax.Array, cache_len: int, queries: int) -> jax.Array:
    prefix = jnp.arange(cache_len)[None, :] < pos[:, None]
    return jnp.broadcast_to(prefix[:, None, :], (pos.shape[0], queries, cache_len))


def _draft_tree(target: CausalLM, draft: EagleDraft, head: jax.Array, subset_ids, st: _Static,
                carry: dict) -> tuple[tree_lib.Tree, list]:
    """Expand and rerank the EAGLE-2 tree for every row; returns (tree, draft cache)."""
    k, depth = st.top_k, st.depth
    pos, root_feature, dcache = carry["pos"], carry["root_feature"], carry["dcache"]
    b = pos.shape[0]
    ids, logp = draft_topk(root_feature, head, k, subset_ids, impl=st.head_impl)
    pool_tokens, pool_scores = [ids], [logp]
    pool_parents = [jnp.full((b, k), -1, jnp.int32)]
    frontier_tokens, frontier_scores = ids, logp  # [b, k]
    frontier_pool = jnp.broadcast_to(jnp.arange(k, dtype=jnp.int32), (b, k))
    frontier_feat = jnp.broadcast_to(root_feature[:, None, :], (b, k, root_feature.shape[-1]))
    scratch = st.draft_scratch
    ancestors = jnp.zeros((b, k, scratch), bool)
    offset = k
    for d in range(1, depth):
        own = (d - 1) * k + jnp.arange(k)
        ancestors = ancestors | jax.nn.one_hot(own, scratch, dtype=bool)[None]
        mask = jnp.concatenate([_prefix_mask(pos, st.cache_len, k), ancestors], axis=-1)
        positions = jnp.broadcast_to(pos[:, None] + (d - 1), (b, k))
        slots = jnp.broadcast_to(st.cache_len + own, (b, k))
        out, dcache = draft(frontier_feat, target.embed(frontier_tokens), positions=positions,
                            cache=dcache, attend_cache=True, mask=mask, cache_slots=slots)
        ids, logp = draft_topk(out, head, k, subset_ids, impl=st.head_impl)  # [b, k, k]
        scores = (frontier_scores[..., None] + logp).reshape(b, k * k)
        ids = ids.reshape(b, k * k)
        pool_tokens.append(ids)
        pool_scores.append(scores)
        pool_parents.append(jnp.repeat(frontier_pool, k, axis=-1))
        if d < depth - 1:
            frontier_scores, pick = jax.lax.top_k(scores, k)
            parent = pick // k
            frontier_tokens = jnp.take_along_axis(ids, pick, axis=-1)
            frontier_pool = (offset + pick).astype(jnp.int32)
            frontier_feat = jnp.take_along_axis(out, parent[..., None], axis=1)
            ancestors = jnp.take_along_axis(ancestors, parent[..., None], axis=1)
        offset += k * k
    tree = tree_lib.select_tree(
        carry["root"], jnp.concatenate(pool_tokens, -1), jnp.concatenate(pool_parents, -1),
        jnp.concatenate(pool_scores, -1), tree_lib.pool_depths(depth, k), st.total_tokens, depth,
    )
    return tree, dcache


def _verify(target: CausalLM, st: _Static, carry: dict, tree: tree_lib.Tree):
    """One target forward over the tree: hidden ``[b, T, h]`` and the cache (the logits are
    computed by ``_target_path`` for the nodes it visits only)."""
    pos = carry["pos"]
    b, t = tree.tokens.shape
    positions = tree_lib.tree_positions(pos, tree)
    mask = tree_lib.verification_mask(pos, st.cache_len, tree)
    slots = jnp.broadcast_to(st.cache_len + jnp.arange(t), (b, t))
    rope_len = jnp.minimum(jnp.max(positions) + 1, st.max_positions)
    hidden, tcache = target(tree.tokens, positions=positions, cache=carry["tcache"],
                            attend_cache=True, mask=mask, cache_slots=slots, return_hidden=True,
                            rope_seq_len=rope_len)
    return hidden, tcache


def _compact(cache: list, src: jax.Array, dst: jax.Array) -> list:
    """Copy cache slots ``src [b, n]`` to ``dst [b, n]`` in every layer (out-of-range dst:
    dropped)."""
    rows = jnp.arange(src.shape[0])[:, None]

    def move(x):
        return x.at[rows, dst].set(x[rows, src], mode="drop")

    return [{name: move(x) for name, x in layer.items()} for layer in cache]


def _catch_up(target: CausalLM, draft: EagleDraft, features, tokens, pos, slots, dcache):
    """Draft forward over committed pairs ``(features [b, n, h], tokens [b, n])`` at positions
    ``pos + arange(n)``, written at ``slots``; returns predicted features and the cache."""
    b, n = tokens.shape
    positions = pos[:, None] + jnp.arange(n)[None, :]
    return draft(features, target.embed(tokens), positions=positions, cache=dcache,
                 attend_cache=True, cache_slots=slots)


def _commit(target: CausalLM, draft: EagleDraft, st: _Static, carry: dict,
            tree: tree_lib.Tree, hidden, tcache, dcache, key) -> dict:
    b, t = tree.tokens.shape
    depth = st.depth
    choice = _target_path(target, hidden, tree, key, st.sampling, depth)
    accept_len, path, bonus = tree_lib.accept(tree, choice, depth)
    active = ~carry["done"]
    pos, lengths = carry["pos"], carry["lengths"]
    j = jnp.arange(depth + 1)[None, :]
    path_tokens = jnp.take_along_axis(tree.tokens, path, axis=-1)  # [b, D+1], [:, 0] = root
    shifted = jnp.concatenate([path_tokens[:, 1:], jnp.zeros((b, 1), jnp.int32)], axis=-1)
    a = accept_len[:, None]
    valid = j <= a
    new_tokens = jnp.where(j < a, shifted, jnp.where(j == a, bonus[:, None], st.pad_id))
    # stop tokens and the length limit cut the committed tokens (the row is then done)
    count = accept_len + 1
    stopped = jnp.zeros((b,), bool)
    if st.stop_ids:
        is_stop = jnp.any(new_tokens[..., None] == jnp.asarray(st.stop_ids)[None, None], -1)
        is_stop = is_stop & valid
        stopped = jnp.any(is_stop, axis=-1)
        first = jnp.argmax(is_stop, axis=-1)
        count = jnp.where(stopped, jnp.minimum(count, first + 1), count)
    count = jnp.minimum(count, st.max_new_tokens - lengths)
    count = jnp.where(active, count, 0)
    width = carry["out"].shape[1]
    rows = jnp.arange(b)[:, None]
    out_idx = jnp.where(j < count[:, None], lengths[:, None] + j, width)
    out = carry["out"].at[rows, out_idx].set(new_tokens, mode="drop")
    new_lengths = lengths + count
    done = carry["done"] | (active & stopped) | (new_lengths >= st.max_new_tokens)
    # KV compaction of the accepted path: scratch slot cache_len + path[j] -> slot pos + j
    keep = valid & active[:, None]
    target_total = tcache[0]["k"].shape[1]
    tcache = _compact(tcache, st.cache_len + path,
                      jnp.where(keep, pos[:, None] + j, target_total))
    # the draft re-reads the accepted pairs with the target's features
    features = jnp.take_along_axis(hidden, path[..., None], axis=1)
    draft_total = dcache[0]["k"].shape[1]
    slots = jnp.where(keep, pos[:, None] + j, draft_total)
    predicted, dcache = _catch_up(target, draft, features, new_tokens, pos, slots, dcache)
    root_feature = jnp.take_along_axis(predicted, accept_len[:, None, None], axis=1)[:, 0]
    cycle = active.astype(jnp.int32)
    return dict(
        carry,
        out=out,
        lengths=new_lengths,
        done=done,
        root=jnp.where(active, bonus, carry["root"]),
        pos=jnp.where(active, pos + accept_len + 1, pos),
        root_feature=jnp.where(active[:, None], root_feature.astype(carry["root_feature"].dtype),
                               carry["root_feature"]),
        tcache=tcache,
        dcache=dcache,
        committed=carry["committed"] + cycle * (accept_len + 1),
        cycles=carry["cycles"] + cycle,
    )


def _target_path(target: CausalLM, hidden: jax.Array, tree: tree_lib.Tree, key: jax.Array,
                 sampling: SamplingConfig, depth: int) -> jax.Array:
    """The target's token after each node on the walk from the root: ``[b, T]`` int32, -1 at
    the nodes the walk does not reach.

    The walk picks the target's token after the root (its argmax for greedy decoding, else one
    ``sample_nodes`` draw from its filtered distribution), computed from ``hidden [b, T, h]``
    for that node only, moves to the child that carries it, picks there, and so on until no
    child matches. ``tree_lib.accept`` then finds that same path. Each visited node gets one
    independent sample from its distribution, so the committed tokens are distributed exactly
    as with one sample at every node (the picks at nodes off the walk are never read); the cost
    is ``depth + 1`` rows of logits (and filtering and sampling) per row instead of ``T``."""
    b, t = tree.tokens.shape
    rows = jnp.arange(b)
    weight = target.head_weight()
    choice = jnp.full((b, t), -1, jnp.int32)
    node = jnp.zeros((b,), jnp.int32)
    walking = jnp.ones((b,), bool)
    for d, sub in enumerate(jax.random.split(key, depth + 1)):
        logits = ops.lm_head(hidden[rows, node], weight)  # [b, vocab]
        if sampling.greedy:
            token = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        else:
            token = sample_nodes(logits[:, None], sub, sampling)[:, 0]
        choice = choice.at[rows, node].set(jnp.where(walking, token, choice[rows, node]))
        if d == depth:
            break
        child = (tree.parents == node[:, None]) & (tree.tokens == token[:, None])  # [b, T]
        walking = walking & jnp.any(child, axis=-1)
        node = jnp.where(walking, jnp.argmax(child, axis=-1).astype(jnp.int32), node)
    return choice


def _prefill_fn(tgraph, dgraph, st: _Static, tstate, dstate, tokens, lengths, tcache, dcache,
                key):
    """Prefill target and draft; sample the first token; return the loop carry."""
    target, draft = nnx.merge(tgraph, tstate), nnx.merge(dgraph, dstate)
    b, s = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
    hidden, tcache = target(tokens, positions=positions, cache=tcache, return_hidden=True,
                            rope_seq_len=jnp.max(lengths))
    rows = jnp.arange(b)
    logits = ops.lm_head(hidden[rows, lengths - 1], target.head_weight())
    key, sub = jax.random.split(key)
    first = sample_logits(logits, sub, st.sampling)
    following = jnp.concatenate([tokens[:, 1:], jnp.zeros((b, 1), tokens.dtype)], axis=-1)
    following = following.at[rows, lengths - 1].set(first)
    predicted, dcache = draft(hidden, target.embed(following), positions=positions, cache=dcache)
    root_feature = predicted[rows, lengths - 1]
    width = st.max_new_tokens + st.depth + 1
    out = jnp.full((b, width), st.pad_id, jnp.int32).at[:, 0].set(first)
    done = jnp.full((b,), st.max_new_tokens <= 1)
    if st.stop_ids:
        done = done | jnp.any(first[:, None] == jnp.asarray(st.stop_ids)[None], -1)
    return dict(
        key=key, out=out, lengths=jnp.ones((b,), jnp.int32), done=done, root=first,
        pos=lengths.astype(jnp.int32), root_feature=root_feature, tcache=tcache, dcache=dcache,
        committed=jnp.zeros((b,), jnp.int32), cycles=jnp.zeros((b,), jnp.int32),
        it=jnp.asarray(0, jnp.int32),
    )


def _loop_fn(tgraph, dgraph, st: _Static, tstate, dstate, head, subset_ids, carry, it_limit):
    """Draft -> verify -> commit until every row is done or ``it_limit`` iterations ran."""
    target, draft = nnx.merge(tgraph, tstate), nnx.merge(dgraph, dstate)

    def cond(c):
        return ~jnp.all(c["done"]) & (c["it"] < it_limit)

    def body(c):
        key, sub = jax.random.split(c["key"])
        tree, dcache = _draft_tree(target, draft, head, subset_ids, st, c)
        hidden, tcache = _verify(target, st, c, tree)
        c = _commit(target, draft, st, dict(c, key=key), tree, hidden, tcache, dcache, sub)
        return dict(c, it=c["it"] + 1)

    return jax.lax.while_loop(cond, body, carry)


# ----------------------------------------------------------------------------------------------
# phase timing: each phase alone in its own on-device loop (the output of one iteration feeds
# the next, so nothing is hoisted), started from the final decoding state
def _draft_phase_fn(tgraph, dgraph, st, iterations, tstate, dstate, head, subset_ids, carry):
    target, draft = nnx.merge(tgraph, tstate), nnx.merge(dgraph, dstate)
    n = st.depth + 1

    def body(_, c):
        tree, dcache = _draft_tree(target, draft, head, subset_ids, st, c)
        feats = jnp.broadcast_to(c["root_feature"][:, None], (tree.tokens.shape[0], n,
                                                              c["root_feature"].shape[-1]))
        slots = jnp.full(tree.tokens.shape[:1] + (n,), dcache[0]["k"].shape[1])  # dropped
        predicted, dcache = _catch_up(target, draft, feats, tree.tokens[:, :n], c["pos"], slots,
                                      dcache)
        return dict(c, root=tree.tokens[:, 1], root_feature=predicted[:, -1].astype(
            c["root_feature"].dtype), dcache=dcache)

    return jax.lax.fori_loop(0, iterations, body, carry)["root_feature"]


def _verify_phase_fn(tgraph, dgraph, st, iterations, tstate, dstate, head, subset_ids, carry):
    target, draft = nnx.merge(tgraph, tstate), nnx.merge(dgraph, dstate)
    tree, _ = _draft_tree(target, draft, head, subset_ids, st, carry)

    def body(_, state):
        tokens, tcache = state
        hidden, tcache = _verify(target, st, dict(carry, tcache=tcache),
                                 tree._replace(tokens=tokens))
        picked = _target_path(target, hidden, tree, carry["key"], st.sampling, st.depth)
        return jnp.where(picked >= 0, picked, tokens), tcache

    return jax.lax.fori_loop(0, iterations, body, (tree.tokens, carry["tcache"]))[0]


# ----------------------------------------------------------------------------------------------
def _ring_prefill_fn(tgraph, dgraph, st: _Static, mesh: Mesh, *args):
    """``_prefill_fn`` with exact sequence-parallel attention (BurstAttention ring) over the
    ``sequence`` axis of ``mesh``: the same logits, features and caches as one device."""
    with ops.attention_backend("burst", mesh=mesh, layout="contiguous"):
        return _prefill_fn(tgraph, dgraph, st, *args)


def run_speculative(
    model: CausalLM,
    request: Request,
    speculative: Speculative,
    resolved: tuple[EagleDraft, np.ndarray | None],
    *,
    prefill: str = "local",
    mesh: Mesh | None = None,
    stream: Callable[[np.ndarray], None] | None = None,
    stream_every: int = 8,
) -> tuple[GenerationResult, dict]:
    """Speculative decoding of a validated ``request`` with ``resolved = resolve(speculative,
    model)``; ``prefill`` ``"local"`` or ``"ring"`` (exact, over the ``sequence`` axis of
    ``mesh``). Returns the result (``tokens [batch, n]``, stats a ``SpeculativeStats``) and the
    final loop carry (caches included). Greedy output equals vanilla greedy output token for
    token; sampled output has exactly the vanilla distribution."""
    draft, subset = resolved
    config = model.config
    tokens, lengths, pad_id = request.tokens, request.lengths, request.pad_id
    longest, batch = request.longest, request.batch
    max_new_tokens = request.max_new_tokens
    width = min(bucket(longest), config.max_position_embeddings)
    padded_width = width
    if prefill == "ring":  # every host of the ring holds a block of the padded prompt
        padded_width = ring_width(width, mesh.shape["sequence"])
    padded = np.full((batch, padded_width), pad_id, np.int32)
    padded[:, :longest] = tokens[:, :width]
    depth = speculative.depth
    cache_len = max(padded_width, longest + max_new_tokens + depth + 2)
    cache_len = -(-cache_len // 64) * 64
    st = _Static(
        depth=depth, top_k=speculative.top_k, total_tokens=speculative.total_tokens,
        cache_len=cache_len, sampling=request.sampling, stop_ids=request.stop_ids, pad_id=pad_id,
        max_new_tokens=max_new_tokens, head_impl=speculative.head_impl,
        subset=subset is not None, max_positions=config.max_position_embeddings,
    )
    tgraph, tstate = nnx.split(model)
    dgraph, dstate = nnx.split(draft)
    cache = compile_cache(("speculative", tgraph, dgraph))
    stats = SpeculativeStats(prompt_tokens=int(lengths.sum()))
    head_full = model.head_weight()
    if subset is None:
        head, subset_ids = head_full, None
        stats.draft_head_flops = head_flops(config.hidden_size, config.vocab_size)
    else:
        subset_ids = jnp.asarray(subset)
        head = jnp.take(head_full, subset_ids, axis=0)
        stats.draft_head_flops = head_flops(config.hidden_size, int(subset.size))

    tcache = model.init_cache(batch, cache_len + st.tree_size)
    dcache = draft.init_cache(batch, cache_len + st.draft_scratch, dtype=draft.dtype)
    args = (tstate, dstate, jnp.asarray(padded), jnp.asarray(lengths), tcache, dcache,
            jax.random.PRNGKey(request.seed))
    if prefill == "ring":
        # everything on the ring's mesh, which may span several processes (one per host)
        args = on_mesh((tstate, dstate, padded, lengths, tcache, dcache, args[-1]), mesh)
        tstate, dstate = args[:2]
        head, subset_ids = on_mesh((head, subset_ids), mesh)
        prefill_exe = compiled(cache, stats, ("ring-prefill", batch, padded_width, st, id(mesh)),
                               partial(_ring_prefill_fn, tgraph, dgraph, st, mesh), *args)
    else:
        prefill_exe = compiled(cache, stats, ("prefill", batch, width, st),
                               partial(_prefill_fn, tgraph, dgraph, st), *args)
    t0 = time.perf_counter()
    carry = jax.block_until_ready(prefill_exe(*args))
    stats.prefill_seconds = time.perf_counter() - t0

    limit0 = jnp.asarray(max_new_tokens, jnp.int32)  # a cycle commits >= 1 token per row
    scored = None if subset is None else int(subset.size)
    sharding = str(getattr(jax.tree.leaves(carry["tcache"])[0], "sharding", None))
    loop = compiled(cache, stats, ("loop", batch, st, scored, sharding),
                    partial(_loop_fn, tgraph, dgraph, st), tstate, dstate, head, subset_ids,
                    carry, limit0)
    carry, stats.decode_seconds = drive(
        loop, (tstate, dstate, head, subset_ids), carry, limit=max_new_tokens, stream=stream,
        chunk=max(1, stream_every // 4),
        emitted=lambda c: int(np.max(to_host(c["lengths"]))),
        finished=lambda c, _: bool(np.all(to_host(c["done"]))))
    out = to_host(carry["out"])
    new_lengths = to_host(carry["lengths"])
    # the first token comes from the prefill, like vanilla decoding's first step
    stats.new_tokens = int(new_lengths.sum())
    stats.decode_steps = int(to_host(carry["it"]))
    stats.loop_iterations = stats.decode_steps
    cycles = to_host(carry["cycles"])
    stats.cycles = int(cycles.sum())
    stats.mean_accepted_length = (
        float(to_host(carry["committed"]).sum() / cycles.sum()) if cycles.sum() else 0.0
    )
    if speculative.time_phases and stats.loop_iterations:
        _time_phases(cache, stats, tgraph, dgraph, st, tstate, dstate, head, subset_ids,
                     carry, batch)
    steps = int(new_lengths.max())
    return GenerationResult(tokens=out[:, :steps], lengths=new_lengths, stats=stats), carry


def _generate(model: CausalLM, input_ids: Any, max_new_tokens: int, speculative: Speculative,
              *, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0,
              stop_token_ids=(), pad_token_id: int | None = None, **kwargs: Any
              ) -> tuple[GenerationResult, dict]:
    """Validate, resolve and ``run_speculative`` (the result and the final loop carry)."""
    request = validate_request(model.config, input_ids, max_new_tokens, temperature=temperature,
                               top_k=top_k, top_p=top_p, pad_token_id=pad_token_id,
                               stop_token_ids=stop_token_ids, seed=seed)
    return run_speculative(model, request, speculative, resolve(speculative, model), **kwargs)


def _time_phases(cache, stats, tgraph, dgraph, st, tstate, dstate, head, subset_ids, carry,
                 batch, iterations: int = 16):
    scored = None if subset_ids is None else int(subset_ids.shape[0])
    sharding = str(getattr(jax.tree.leaves(carry["tcache"])[0], "sharding", None))
    args = (tstate, dstate, head, subset_ids, carry)
    for name, fn in (("draft", _draft_phase_fn), ("verify", _verify_phase_fn)):
        executable, _ = cache.get((f"{name}-phase", batch, st, scored, iterations, sharding),
                                  partial(fn, tgraph, dgraph, st, iterations), *args)
        seconds = median_seconds(executable, *args, repeats=3) / iterations
        setattr(stats, f"{name}_seconds", seconds)
    per_iteration = stats.decode_seconds / stats.loop_iterations
    stats.draft_share = stats.draft_seconds / per_iteration
    stats.verify_share = stats.verify_seconds / per_iteration
