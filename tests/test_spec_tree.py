"""EAGLE-2 tree pieces: rerank/selection, tree mask and positions, acceptance (hand-built
examples), FR-Spec frequency ranking and the subset draft head."""

from __future__ import annotations

import collections

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import word_tokenizer

from cpmjax import errors
from cpmjax.generate import tree as tree_lib
from cpmjax.generate.frspec import (
    count_token_frequencies,
    draft_topk,
    load_freq_vocab,
    rank_by_frequency,
    save_freq_vocab,
)


def _hand_pool():
    """depth 3, top_k 2. Pool (index: token, parent, score):
    depth 1: 0: 10 root -0.1 | 1: 11 root -0.5
    depth 2 (children of the depth-1 frontier {0, 1}):
        2: 20 <-0 -0.2 | 3: 21 <-0 -0.9 | 4: 22 <-1 -0.6 | 5: 23 <-1 -2.0
    depth 3 (children of the frontier {2, 4}, the 2 best of depth 2):
        6: 30 <-2 -0.3 | 7: 31 <-2 -1.5 | 8: 32 <-4 -0.7 | 9: 33 <-4 -3.0
    The 5 best: 0 (-0.1), 2 (-0.2), 6 (-0.3), 1 (-0.5), 4 (-0.6)."""
    tokens = [10, 11, 20, 21, 22, 23, 30, 31, 32, 33]
    parents = [-1, -1, 0, 0, 1, 1, 2, 2, 4, 4]
    scores = [-0.1, -0.5, -0.2, -0.9, -0.6, -2.0, -0.3, -1.5, -0.7, -3.0]
    return (jnp.asarray([tokens]), jnp.asarray([parents]), jnp.asarray([scores], jnp.float32))


def test_pool_layout():
    assert tree_lib.pool_size(3, 2) == 10
    np.testing.assert_array_equal(tree_lib.pool_depths(3, 2), [1, 1, 2, 2, 2, 2, 3, 3, 3, 3])


def test_select_tree_mask_and_positions_hand_built():
    tokens, parents, scores = _hand_pool()
    tree = tree_lib.select_tree(jnp.asarray([99]), tokens, parents, scores,
                                tree_lib.pool_depths(3, 2), total_tokens=5, max_depth=3)
    np.testing.assert_array_equal(tree.tokens[0], [99, 10, 11, 20, 22, 30])
    np.testing.assert_array_equal(tree.parents[0], [-1, 0, 0, 1, 2, 3])
    np.testing.assert_array_equal(tree.depths[0], [0, 1, 1, 2, 2, 3])
    expected_anc = np.zeros((6, 6), bool)
    for node, chain in {0: [0], 1: [0, 1], 2: [0, 2], 3: [0, 1, 3], 4: [0, 2, 4],
                        5: [0, 1, 3, 5]}.items():
        expected_anc[node, chain] = True
    np.testing.assert_array_equal(tree.ancestors[0], expected_anc)
    prefix = jnp.asarray([7])
    np.testing.assert_array_equal(tree_lib.tree_positions(prefix, tree)[0], [7, 8, 8, 9, 9, 10])
    mask = np.asarray(tree_lib.verification_mask(prefix, 8, tree)[0])
    assert mask.shape == (6, 8 + 6)
    np.testing.assert_array_equal(mask[:, :8], np.tile([1] * 7 + [0], (6, 1)).astype(bool))
    np.testing.assert_array_equal(mask[:, 8:], expected_anc)


def test_select_tree_rejects_too_many_tokens():
    tokens, parents, scores = _hand_pool()
    with pytest.raises(ValueError):
        tree_lib.select_tree(jnp.asarray([99]), tokens, parents, scores,
                             tree_lib.pool_depths(3, 2), total_tokens=11, max_depth=3)


def test_accept_hand_built():
    tokens, parents, scores = _hand_pool()
    tree = tree_lib.select_tree(jnp.asarray([99, 99, 99]), jnp.repeat(tokens, 3, 0),
                                jnp.repeat(parents, 3, 0), jnp.repeat(scores, 3, 0),
                                tree_lib.pool_depths(3, 2), total_tokens=5, max_depth=3)
    # nodes: 0 root(99), 1:10, 2:11, 3:20 (<-1), 4:22 (<-2), 5:30 (<-3)
    target = jnp.asarray([
        [10, 20, 0, 31, 0, 0],  # 10 ok, 20 ok, 30 != 31 -> 2 accepted, bonus 31
        [11, 0, 55, 0, 0, 0],   # 11 ok, 22 != 55 -> 1 accepted, bonus 55
        [5, 0, 0, 0, 0, 0],     # nothing accepted, bonus 5
    ])
    accept_len, path, bonus = tree_lib.accept(tree, target, 3)
    np.testing.assert_array_equal(accept_len, [2, 1, 0])
    np.testing.assert_array_equal(path, [[0, 1, 3, 0], [0, 2, 0, 0], [0, 0, 0, 0]])
    np.testing.assert_array_equal(bonus, [31, 55, 5])
    full = jnp.asarray([[10, 20, 0, 30, 0, 77]])
    accept_len, path, bonus = tree_lib.accept(
        jax.tree.map(lambda x: x[:1], tree), full, 3)
    assert int(accept_len[0]) == 3 and int(bonus[0]) == 77
    np.testing.assert_array_equal(path[0], [0, 1, 3, 5])


def test_selected_tree_is_closed_under_ancestors_on_random_pools():
    """Random EAGLE-2 pools (cumulative log-prob scores, ties included): every kept node's
    parent is kept, and the ancestor matrix matches a walk up the parent links."""
    rs = np.random.RandomState(0)
    depth, k, total = 4, 3, 12
    for trial in range(20):
        logp = np.log(rs.dirichlet(np.ones(k) * 0.3, size=(1 + (depth - 1) * k,)))
        logp = np.sort(logp, axis=-1)[:, ::-1]
        if trial % 2:
            logp = np.round(logp, 1)  # ties
        tokens, parents, scores = list(range(k)), [-1] * k, list(logp[0])
        frontier = list(range(k))
        for d in range(1, depth):
            children = []
            for fi, f in enumerate(frontier):
                for c in range(k):
                    idx = len(tokens)
                    tokens.append(100 * d + 10 * fi + c)
                    parents.append(f)
                    scores.append(scores[f] + logp[1 + (d - 1) * k + fi][c])
                    children.append(idx)
            frontier = sorted(children, key=lambda i: (-scores[i], i))[:k]
        tree = tree_lib.select_tree(
            jnp.asarray([7]), jnp.asarray([tokens]), jnp.asarray([parents]),
            jnp.asarray([scores], jnp.float32), tree_lib.pool_depths(depth, k), total, depth)
        par = np.asarray(tree.parents[0])
        assert np.all(par[1:] >= 0) and np.all(par[1:] < np.arange(1, total + 1))
        anc = np.asarray(tree.ancestors[0])
        dep = np.asarray(tree.depths[0])
        for i in range(total + 1):
            chain, j = {i}, i
            while par[j] >= 0:
                j = par[j]
                chain.add(j)
            assert set(np.flatnonzero(anc[i])) == chain
            assert dep[i] == len(chain) - 1


# ----------------------------------------------------------------------------------------------
# FR-Spec
def test_frequency_counting_and_ranking(tmp_path):
    tok = word_tokenizer(tmp_path / "tok", "the of and to a in is it def return x y")
    texts = ["the of the and the x\nreturn x x\n", "def y return the\n" * 3]
    files = []
    for i, text in enumerate(texts):
        (tmp_path / f"c{i}.txt").write_text(text)
        files.append(tmp_path / f"c{i}.txt")
    counts = count_token_frequencies(tok, files, chunk_chars=8)
    expected = collections.Counter(
        tok.convert_tokens_to_ids(w) for text in texts for w in text.split())
    assert counts.size == len(tok)
    for i in range(counts.size):
        assert counts[i] == expected.get(i, 0)
    ranked = rank_by_frequency(counts)
    assert sorted(ranked.tolist()) == list(range(counts.size))
    ordered = sorted(range(counts.size), key=lambda i: (-counts[i], i))
    assert ranked.tolist() == ordered
    out = save_freq_vocab(tmp_path / "v.npy", ranked)
    np.testing.assert_array_equal(load_freq_vocab(out, 4), ranked[:4])
    with pytest.raises(errors.InputError):
        load_freq_vocab(out, 0)
    with pytest.raises(errors.TokenIdError):
        load_freq_vocab(np.asarray([1, 99]), vocab_size=16)
    with pytest.raises(errors.ConfigError):
        load_freq_vocab(np.asarray([1, 1]))
    with pytest.raises(errors.MissingPathError):
        load_freq_vocab(tmp_path / "none.npy")
    with pytest.raises(errors.MissingPathError):
        count_token_frequencies(tok, [tmp_path / "none.txt"])


def test_subset_draft_head_matches_reference():
    """Subset head == full logits restricted to the subset, softmax over the subset, top-k,
    mapped back to full ids; full head == log_softmax + top_k."""
    rs = np.random.RandomState(1)
    hidden = jnp.asarray(rs.randn(2, 3, 16), jnp.float32)
    weight = jnp.asarray(rs.randn(40, 16), jnp.float32)
    subset = rs.permutation(40)[:12].astype(np.int32)
    ids, logp = draft_topk(hidden, weight[subset], 4, jnp.asarray(subset))
    logits = np.asarray(hidden) @ np.asarray(weight).T
    sub = logits[..., subset]
    sub_logp = sub - np.log(np.sum(np.exp(sub - sub.max(-1, keepdims=True)), -1,
                                   keepdims=True)) - sub.max(-1, keepdims=True)
    order = np.argsort(-sub_logp, axis=-1)[..., :4]
    np.testing.assert_array_equal(ids, subset[order])
    np.testing.assert_allclose(logp, np.take_along_axis(sub_logp, order, -1), rtol=1e-5,
                               atol=1e-5)
    ids_full, logp_full = draft_topk(hidden, weight, 5)
    ref = jax.nn.log_softmax(jnp.asarray(logits), -1)
    ref_logp, ref_ids = jax.lax.top_k(ref, 5)
    np.testing.assert_array_equal(ids_full, ref_ids)
    np.testing.assert_allclose(logp_full, ref_logp, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["blockwise", "pallas"])
def test_subset_draft_head_kernel_backends(backend):
    """The kernel backends (``pallas_kernels.fr_lm_head``; Pallas interpreted on CPU) give the
    same ids and log-probs as the jnp head, with and without a subset."""
    rs = np.random.RandomState(2)
    hidden = jnp.asarray(rs.randn(2, 5, 16), jnp.float32)
    weight = jnp.asarray(rs.randn(300, 16), jnp.float32)
    subset = jnp.asarray(rs.permutation(300)[:130].astype(np.int32))
    for w, ids_map in ((weight, None), (weight[subset], subset)):
        ref_ids, ref_logp = draft_topk(hidden, w, 6, ids_map)
        ids, logp = draft_topk(hidden, w, 6, ids_map, backend=backend)
        np.testing.assert_array_equal(ids, ref_ids)
        np.testing.assert_allclose(logp, ref_logp, rtol=1e-4, atol=1e-4)
    with pytest.raises(errors.ConfigError):
        draft_topk(hidden, weight, 6, backend="cuda")


def test_sample_nodes_matches_filtered_distribution():
    """One inverse-CDF sample per node follows softmax(filtered logits): temperature, top-k and
    top-p as ``sample_logits`` applies them (filtered ids are never drawn)."""
    from cpmjax.generate import SamplingConfig, filtered_logits, sample_nodes

    rs = np.random.RandomState(3)
    logits = jnp.asarray(rs.randn(1, 3, 12) * 2, jnp.float32)
    n = 20000
    for sampling in (SamplingConfig(0.7), SamplingConfig(1.0, top_k=5),
                     SamplingConfig(1.3, top_p=0.8)):
        keys = jax.random.split(jax.random.PRNGKey(0), n)
        draws = np.asarray(jax.vmap(lambda k, s=sampling: sample_nodes(logits, k, s))(keys))
        probs = np.asarray(jax.nn.softmax(filtered_logits(logits, sampling), -1))[0]
        for node in range(3):
            freq = np.bincount(draws[:, 0, node], minlength=12) / n
            assert np.all(freq[probs[node] == 0] == 0)
            sigma = np.sqrt(probs[node] * (1 - probs[node]) / n)
            assert np.all(np.abs(freq - probs[node]) <= 5 * sigma + 1e-9), (sampling, node)
        if sampling.top_k:
            assert np.all((probs > 0).sum(-1) == 5)
