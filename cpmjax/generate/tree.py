"""EAGLE-2 dynamic draft trees: candidate pool, reranking, tree mask, tree positions, acceptance.

A draft tree for one row has ``T = total_tokens + 1`` nodes. Node 0 is the *root*: the last
committed token, whose key/value is not in the target cache yet; every other node is a draft
token. Nodes are ordered so that a parent always precedes its children.

Expansion (done by ``speculative.py`` with the draft model) fills a *candidate pool* of
``N = top_k + (depth - 1) * top_k**2`` entries, depth by depth:

- depth 1: the ``top_k`` most likely tokens after the root, score = their draft log-probability;
- depth ``d > 1``: the ``top_k`` pool entries of depth ``d - 1`` with the highest cumulative score
  (the *frontier*) are run through the draft; each proposes its ``top_k`` most likely next
  tokens, whose score is the parent's score plus their log-probability.

``select_tree`` then reranks the whole pool by cumulative score and keeps the best
``total_tokens``. A child's score never exceeds its parent's (log-probabilities are <= 0 and
float addition is monotone) and ``lax.top_k`` breaks ties towards the lower index, which the parent
always has, so the kept set is closed under ancestors: it is a tree.

All functions here are batched over rows (leading ``batch`` axis) and jit-friendly.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class Tree(NamedTuple):
    """A batch of draft trees (``T`` nodes each, node 0 = root).

    - ``tokens [b, T]`` int32: token of each node.
    - ``parents [b, T]`` int32: tree index of the parent (-1 for the root).
    - ``depths [b, T]`` int32: 0 for the root, ``d`` for a draft token ``d`` steps ahead.
    - ``ancestors [b, T, T]`` bool: ``ancestors[r, i, j]`` is True when node ``j`` is node ``i``
      or one of its ancestors (the tree-attention mask among the tree tokens).
    """

    tokens: jax.Array
    parents: jax.Array
    depths: jax.Array
    ancestors: jax.Array


def pool_size(depth: int, top_k: int) -> int:
    """Size of the EAGLE-2 candidate pool for ``depth`` draft steps of ``top_k`` each."""
    return top_k + (depth - 1) * top_k * top_k


def pool_depths(depth: int, top_k: int) -> jax.Array:
    """Depth (1-based) of each pool entry: ``[pool_size]`` int32."""
    parts = [jnp.ones((top_k,), jnp.int32)]
    parts += [jnp.full((top_k * top_k,), d, jnp.int32) for d in range(2, depth + 1)]
    return jnp.concatenate(parts)


def ancestor_matrix(parents: jax.Array, max_depth: int) -> jax.Array:
    """``[b, T, T]`` bool, ``out[r, i, j]`` = node ``j`` is node ``i`` or an ancestor of it.

    ``parents [b, T]`` (-1 for the root); ``max_depth`` bounds the depth of every node."""
    t = parents.shape[-1]
    eye = jnp.broadcast_to(jnp.eye(t, dtype=bool), parents.shape + (t,))
    has_parent = (parents >= 0)[..., None]
    safe = jnp.maximum(parents, 0)
    anc = eye
    for _ in range(max_depth):
        from_parent = jnp.take_along_axis(anc, safe[..., None], axis=-2)  # [b, T, T]
        anc = eye | (has_parent & from_parent)
    return anc


def select_tree(
    root_tokens: jax.Array,
    pool_tokens: jax.Array,
    pool_parents: jax.Array,
    pool_scores: jax.Array,
    depths: jax.Array,
    total_tokens: int,
    max_depth: int,
) -> Tree:
    """Keep the ``total_tokens`` best pool entries (by cumulative draft score) as a tree.

    ``root_tokens [b]``; ``pool_tokens, pool_parents, pool_scores [b, N]`` (``pool_parents``
    indexes the pool, -1 = child of the root); ``depths [N]`` (pool depth, 1-based).
    Returns a ``Tree`` of ``total_tokens + 1`` nodes whose draft nodes are in pool order (so
    parents precede children)."""
    batch, n = pool_tokens.shape
    if total_tokens > n:
        raise ValueError(f"total_tokens={total_tokens} exceeds the candidate pool size {n}")
    _, picked = jax.lax.top_k(pool_scores, total_tokens)  # ties -> lower index first
    picked = jnp.sort(picked, axis=-1)  # pool order: parents before children  [b, total]
    rows = jnp.arange(batch)[:, None]
    # pool index -> tree index (1-based; 0 = root)
    tree_index = jnp.zeros((batch, n), jnp.int32).at[rows, picked].set(
        jnp.arange(1, total_tokens + 1, dtype=jnp.int32)
    )
    parent_pool = jnp.take_along_axis(pool_parents, picked, axis=-1)
    parent_tree = jnp.where(
        parent_pool < 0, 0, jnp.take_along_axis(tree_index, jnp.maximum(parent_pool, 0), axis=-1)
    )
    tokens = jnp.concatenate(
        [root_tokens[:, None], jnp.take_along_axis(pool_tokens, picked, axis=-1)], axis=-1
    ).astype(jnp.int32)
    parents = jnp.concatenate([jnp.full((batch, 1), -1, jnp.int32), parent_tree], axis=-1)
    node_depths = jnp.concatenate(
        [jnp.zeros((batch, 1), jnp.int32), depths[picked]], axis=-1
    )
    return Tree(tokens, parents, node_depths, ancestor_matrix(parents, max_depth))


def tree_positions(prefix_len: jax.Array, tree: Tree) -> jax.Array:
    """Positions ``[b, T]`` of the tree tokens: the root sits at ``prefix_len``, a node of
    depth ``d`` at ``prefix_len + d``."""
    return prefix_len[:, None] + tree.depths


def verification_mask(prefix_len: jax.Array, cache_len: int, tree: Tree) -> jax.Array:
    """Attention mask ``[b, T, cache_len + T]`` for verifying the tree with the target.

    The cache holds the committed prefix in slots ``[0, prefix_len)`` and the tree tokens in the
    scratch slots ``[cache_len, cache_len + T)``; each tree token attends to the whole prefix and
    to itself and its ancestors."""
    t = tree.tokens.shape[-1]
    prefix = jnp.arange(cache_len)[None, :] < prefix_len[:, None]  # [b, cache_len]
    prefix = jnp.broadcast_to(prefix[:, None, :], (prefix.shape[0], t, cache_len))
    return jnp.concatenate([prefix, tree.ancestors], axis=-1)


def accept(tree: Tree, target_tokens: jax.Array, max_depth: int
           ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Longest accepted path of each tree.

    ``target_tokens [b, T]``: the token the target emits after each node (its argmax for greedy
    decoding; one independent sample from the target distribution per node for sampling). A
    draft node is correct when its token equals its parent's target token; it is accepted when
    it and all its ancestors are correct. Siblings carry distinct tokens, so the accepted nodes
    form one path.

    Returns ``accept_len [b]`` (accepted draft tokens), ``path [b, max_depth + 1]`` (tree indices
    of the root and the accepted nodes by depth; entries past ``accept_len`` are 0) and
    ``bonus [b]`` (the target token after the deepest accepted node)."""
    parent_target = jnp.take_along_axis(target_tokens, jnp.maximum(tree.parents, 0), axis=-1)
    correct = (tree.tokens == parent_target) | (tree.parents < 0)  # [b, T]
    accepted = ~jnp.any(tree.ancestors & ~correct[:, None, :], axis=-1)  # [b, T]
    deepest = jnp.argmax(jnp.where(accepted, tree.depths, -1), axis=-1)  # [b]
    accept_len = jnp.take_along_axis(tree.depths, deepest[:, None], axis=-1)[:, 0]
    on_path = jnp.take_along_axis(tree.ancestors, deepest[:, None, None], axis=1)[:, 0]  # [b, T]
    levels = jnp.arange(max_depth + 1)
    at_level = on_path[:, None, :] & (tree.depths[:, None, :] == levels[None, :, None])
    path = jnp.argmax(at_level, axis=-1).astype(jnp.int32)  # [b, D+1]; 0 where none
    bonus = jnp.take_along_axis(target_tokens, deepest[:, None], axis=-1)[:, 0]
    return accept_len.astype(jnp.int32), path, bonus.astype(jnp.int32)
