"""Speculative decoding end to end: greedy EAGLE-2 / FR-Spec output == vanilla greedy output
(batch > 1, ragged prompts, stop tokens), draft-tree expansion == a re-forward of every path, KV
compaction == a re-forward of the committed text, sampling is lossless (chi-square against the
exact distribution, with its power computed), draft training / orbax resume / export, CLI."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import word_tokenizer

import cpmjax
from cpmjax import errors
from cpmjax.generate import SamplingConfig
from cpmjax.generate.eagle import (
    EagleDraft,
    draft_loss,
    load_draft,
    new_draft,
    save_draft,
    train_draft,
)
from cpmjax.generate.frspec import rank_by_frequency
from cpmjax.generate.speculative import (
    Speculative,
    _draft_tree,
    _generate,
    _prefill_fn,
    _Static,
)
from cpmjax.models import CausalLM, ModelConfig
from cpmjax.train.data import token_windows

pytestmark = pytest.mark.slow  # end-to-end decoding: each test compiles a decode loop

VOCAB = 64


def _target(vocab=VOCAB, hidden=32, seed=0, std=0.2, **kw):
    cfg = ModelConfig(model_type="llama", vocab_size=vocab, hidden_size=hidden,
                      intermediate_size=2 * hidden, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=128, initializer_range=std,
                      **kw)
    return CausalLM(cfg, rngs=nnx.Rngs(seed))


@pytest.fixture(scope="module")
def setup():
    """A random target, a corpus of its own samples, and a draft trained briefly on it."""
    model = _target()
    rs = np.random.RandomState(0)
    samples = cpmjax.generate(model, [rs.randint(3, VOCAB, 4).tolist() for _ in range(48)], 60,
                              temperature=1.0, seed=1)
    corpus = samples.tokens.reshape(-1)
    draft = new_draft(model, seed=1)
    history = train_draft(model, draft, token_windows(corpus, 32, 16), steps=150,
                          learning_rate=3e-3, log_every=50)
    ranked = rank_by_frequency(np.bincount(corpus, minlength=VOCAB))
    return model, draft, corpus, ranked, history


def _prompts(lengths, seed=3):
    rs = np.random.RandomState(seed)
    return [rs.randint(3, VOCAB, n).tolist() for n in lengths]


SPEC = dict(depth=4, top_k=4, total_tokens=16)


def test_draft_training_reduces_loss(setup):
    history = setup[4]
    assert history[-1]["loss"] < 0.7 * history[0]["loss"]
    assert history[-1]["top1"] > history[0]["top1"]


def test_greedy_eagle2_equals_vanilla(setup):
    model, draft = setup[:2]
    prompts = _prompts([5, 9, 14, 3])
    ref = cpmjax.generate(model, prompts, 24)
    res = cpmjax.generate(model, prompts, 24, speculative=Speculative(draft=draft, **SPEC))
    for i in range(len(prompts)):
        assert res.row(i) == ref.row(i), i
    np.testing.assert_array_equal(res.lengths, ref.lengths)
    s = res.stats
    assert s.new_tokens == 4 * 24
    # the trained draft gets draft tokens accepted, so multi-token commits are exercised
    assert s.mean_accepted_length > 1.2
    assert s.cycles * s.mean_accepted_length >= 4 * 23


def test_greedy_frspec_equals_vanilla_with_stop_tokens(setup):
    model, draft, corpus, ranked = setup[:4]
    prompts = _prompts([7, 2, 11], seed=5)
    ref = cpmjax.generate(model, prompts, 20)
    stop = int(ref.tokens[0, 9])  # a token the first row emits mid-way
    ref = cpmjax.generate(model, prompts, 20, stop_token_ids=[stop], pad_token_id=0)
    spec = Speculative(draft=draft, method="frspec", vocab_subset=ranked, subset_size=VOCAB // 2,
                       **SPEC)
    res = cpmjax.generate(model, prompts, 20, stop_token_ids=[stop], pad_token_id=0,
                          speculative=spec)
    assert ref.lengths[0] <= 10
    np.testing.assert_array_equal(res.lengths, ref.lengths)
    for i in range(len(prompts)):
        assert res.row(i) == ref.row(i), i
    np.testing.assert_array_equal(res.tokens, ref.tokens)  # padding after the stop token too
    assert res.stats.draft_head_flops == 2 * 32 * (VOCAB // 2)


def test_kv_compaction_equals_reforward(setup):
    """After decoding, target and draft cache slots [0, n) hold exactly the keys/values a fresh
    forward over the committed tokens produces."""
    model, draft = setup[:2]
    prompts = _prompts([5, 9, 14, 3])
    result, carry = _generate(model, prompts, 24, Speculative(draft=draft, **SPEC))
    width = max(len(p) for p in prompts) + 24
    seqs = np.zeros((len(prompts), width), np.int32)
    for i, prompt in enumerate(prompts):
        seqs[i, : len(prompt) + int(result.lengths[i])] = prompt + result.row(i)

    @jax.jit
    def reference(seqs):
        b, s = seqs.shape
        positions = jnp.broadcast_to(jnp.arange(s), (b, s))
        hidden, cache = model(seqs, positions=positions, cache=model.init_cache(b, s),
                              return_hidden=True)
        _, dcache = draft(hidden[:, :-1], model.embed(seqs[:, 1:]), positions=positions[:, :-1],
                          cache=draft.init_cache(b, s))
        return cache, dcache

    cache, dcache = reference(jnp.asarray(seqs))
    for i, prompt in enumerate(prompts):
        n = len(prompt) + int(result.lengths[i]) - 1  # the last token is the uncached root
        assert int(carry["pos"][i]) >= n
        for layer, ref in zip(carry["tcache"] + carry["dcache"], cache + dcache, strict=True):
            for name in ("k", "v"):
                np.testing.assert_allclose(layer[name][i, :n], ref[name][i, :n], rtol=2e-4,
                                           atol=2e-5)


def test_draft_tree_matches_path_reforward(setup):
    """The batched tree expansion (scratch slots + tree masks in the draft cache) proposes the
    same candidates with the same scores as re-running the draft over each path from scratch."""
    model, draft = setup[:2]
    depth, k, total = 3, 3, 8
    prompts = _prompts([6, 10])
    lengths = np.asarray([len(p) for p in prompts], np.int32)
    padded = np.zeros((2, 16), np.int32)
    for i, p in enumerate(prompts):
        padded[i, : len(p)] = p
    st = _Static(depth=depth, top_k=k, total_tokens=total, cache_len=64,
                 sampling=SamplingConfig(), stop_ids=(), pad_id=0, max_new_tokens=8,
                 head_impl="reference", subset=False, max_positions=128)
    tgraph, tstate = nnx.split(model)
    dgraph, dstate = nnx.split(draft)
    carry = jax.jit(lambda *a: _prefill_fn(tgraph, dgraph, st, *a))(
        tstate, dstate, jnp.asarray(padded), jnp.asarray(lengths),
        model.init_cache(2, 64 + total + 1), draft.init_cache(2, 64 + st.draft_scratch),
        jax.random.PRNGKey(0))
    tree, _ = jax.jit(lambda c: _draft_tree(model, draft, model.head_weight(), None, st, c))(carry)
    weight = np.asarray(model.head_weight())
    draft_forward = jax.jit(lambda f, e: draft(f, e, positions=jnp.arange(f.shape[1])[None])[0])
    for row, prompt in enumerate(prompts):
        seq = jnp.asarray([prompt + [int(carry["root"][row])]])
        feats = model(seq[:, :-1], return_hidden=True)  # [1, L, h]
        base_feats, base_emb = feats, model.embed(seq[:, 1:])

        def expand(path_tokens, path_inputs, base_feats=base_feats, base_emb=base_emb):
            """Draft output after the root followed by ``path_tokens`` (re-forward), the draft
            reading ``path_inputs`` (its own earlier outputs) as their features."""
            f = jnp.concatenate([base_feats] + path_inputs, axis=1)
            e = jnp.concatenate([base_emb] + [model.embed(jnp.asarray([[t]]))
                                              for t in path_tokens], axis=1)
            return draft_forward(f, e)[:, -1:]

        def children(feature):
            logits = np.asarray(feature[0, 0]) @ weight.T
            logp = logits - np.log(np.sum(np.exp(logits - logits.max()))) - logits.max()
            order = np.argsort(-logp, kind="stable")[:k]
            return order, logp[order]

        root_out = expand([], [])
        np.testing.assert_allclose(root_out[0, 0], carry["root_feature"][row], rtol=1e-4,
                                   atol=1e-5)
        # frontier entries: (path tokens, cumulative score, draft input features along the path)
        ids, lps = children(root_out)
        pool = [((int(t),), float(s)) for t, s in zip(ids, lps, strict=True)]
        frontier = [((int(t),), float(s), [root_out]) for t, s in zip(ids, lps, strict=True)]
        for _ in range(1, depth):
            level = []
            for path, score, inputs in frontier:
                out = expand(list(path), inputs)
                ids, lps = children(out)
                for t, s in zip(ids, lps, strict=True):
                    level.append((path + (int(t),), score + float(s), inputs + [out]))
            pool += [(p, s) for p, s, _ in level]
            order = sorted(range(len(level)), key=lambda i: -level[i][1])[:k]
            frontier = [level[i] for i in order]
        kept = sorted(range(len(pool)), key=lambda i: -pool[i][1])[:total]
        expected_paths = {pool[i][0] for i in kept}
        got = {}
        toks, pars = np.asarray(tree.tokens[row]), np.asarray(tree.parents[row])
        for node in range(1, total + 1):
            path, j = [], node
            while j > 0:
                path.append(int(toks[j]))
                j = pars[j]
            got[tuple(reversed(path))] = node
        assert set(got) == expected_paths


# ----------------------------------------------------------------------------------------------
# sampling is lossless
def _wilson_hilferty(df: int, z: float) -> float:
    """Upper chi-square quantile (z = standard-normal quantile of 1 - alpha)."""
    return df * (1 - 2 / (9 * df) + z * np.sqrt(2 / (9 * df))) ** 3


def _chi_square(counts: np.ndarray, probs: np.ndarray, n: int):
    """Pearson statistic with every cell of expected count < 5 pooled into one bin."""
    expected = probs * n
    small = expected < 5
    obs = np.append(counts[~small], counts[small].sum())
    exp = np.append(expected[~small], expected[small].sum())
    keep = exp > 0
    stat = float(np.sum((obs[keep] - exp[keep]) ** 2 / exp[keep]))
    return stat, int(keep.sum()) - 1, small


def _exact_first_three(model, prompt, temperature):
    """Exact joint distribution [V, V, V] of the first three sampled tokens."""
    v = model.config.vocab_size
    pairs = np.stack(np.meshgrid(np.arange(v), np.arange(v), indexing="ij"), -1).reshape(-1, 2)
    seqs = np.concatenate([np.tile(prompt, (v * v, 1)), pairs], axis=1)
    logits = np.asarray(model(jnp.asarray(seqs)), np.float64) / temperature
    logp = logits - logits.max(-1, keepdims=True)
    probs = np.exp(logp) / np.exp(logp).sum(-1, keepdims=True)
    n = len(prompt)
    p1 = probs[0, n - 1]  # [V]
    p2 = probs[:, n].reshape(v, v, v)[:, 0]  # p2[t1, t2]
    p3 = probs[:, n + 1].reshape(v, v, v)  # p3[t1, t2, t3]
    return p1[:, None, None] * p2[:, :, None] * p3


def test_sampling_is_lossless_chi_square():
    """Speculative sampling (temperature 0.8, untrained draft, trees of depth 2) gives the first
    three tokens exactly the target's joint distribution: Pearson chi-square of N = 4000 draws
    against the exact probabilities at alpha = 1e-3 (fixed seed). Power: the same test rejects a
    sampler whose distribution is that of temperature 0.896 instead of 0.8 (total-variation
    distance printed, about 0.06) in >= 90% of simulated runs."""
    model = _target(vocab=8, hidden=16, seed=4, std=0.5)
    draft = new_draft(model, seed=2)
    prompt = [3, 5, 1, 6]
    n = 4000
    temperature = 0.8
    exact = _exact_first_three(model, prompt, temperature).reshape(-1)
    assert abs(exact.sum() - 1) < 1e-9
    spec = Speculative(draft=draft, depth=2, top_k=3, total_tokens=6)
    res = cpmjax.generate(model, [prompt] * n, 3, temperature=temperature, seed=11,
                          speculative=spec)
    assert res.stats.mean_accepted_length > 1.2  # draft tokens do get accepted
    threshold = None
    for tokens in (res.tokens, cpmjax.generate(model, [prompt] * n, 3,
                                               temperature=temperature, seed=12).tokens):
        codes = tokens[:, 0] * 64 + tokens[:, 1] * 8 + tokens[:, 2]
        counts = np.bincount(codes, minlength=512)
        stat, df, _ = _chi_square(counts, exact, n)
        threshold = _wilson_hilferty(df, 3.0902)  # alpha = 1e-3
        assert stat < threshold, (stat, df, threshold)
    # power against a nearby wrong distribution
    wrong = _exact_first_three(model, prompt, temperature * 1.12).reshape(-1)
    tv = 0.5 * np.abs(wrong - exact).sum()
    rng = np.random.default_rng(0)
    rejections = 0
    for _ in range(200):
        stat, df, _ = _chi_square(rng.multinomial(n, wrong), exact, n)
        rejections += stat > _wilson_hilferty(df, 3.0902)
    print(f"chi-square power vs TV={tv:.3f}: {rejections / 200:.2f}")
    assert 0.03 < tv < 0.08 and rejections / 200 >= 0.9


# ----------------------------------------------------------------------------------------------
# training, checkpoints, export
def test_draft_export_roundtrip_and_orbax_resume(setup, tmp_path):
    model, draft, corpus = setup[:3]
    ids = jnp.asarray(corpus[:64].reshape(2, 32))
    loss = nnx.jit(lambda d, m, x: draft_loss(d, m, x)[0])
    for dtype, tol in (("float32", 0.0), ("bfloat16", 5e-2)):
        save_draft(draft, tmp_path / dtype, dtype=dtype, metadata={"note": "test"})
        loaded = load_draft(tmp_path / dtype)
        assert isinstance(loaded, EagleDraft)
        a = loss(draft, model, ids)
        b = loss(loaded, model, ids)
        np.testing.assert_allclose(b, a, rtol=tol, atol=tol)
    cfg = json.loads((tmp_path / "float32" / "config.json").read_text())
    assert cfg["eagle_draft"]["note"] == "test" and cfg["num_hidden_layers"] == 1
    # orbax: data for 6 steps; a fresh draft resumes at step 6 with the same weights and
    # continues with data for 2 more (the fixture's settings: its compiled step is reused)
    ck = tmp_path / "ck"
    first = new_draft(model, seed=5)
    windows = token_windows(corpus, 32, 16)
    kw = dict(steps=150, learning_rate=3e-3, checkpoint_dir=str(ck), log_every=1)
    train_draft(model, first, (next(windows) for _ in range(6)), checkpoint_every=3, **kw)
    second = new_draft(model, seed=6)
    assert train_draft(model, second, iter([]), **kw) == []
    for (p, x), (_, y) in zip(nnx.to_flat_state(nnx.state(first, nnx.Param)),
                              nnx.to_flat_state(nnx.state(second, nnx.Param)), strict=True):
        np.testing.assert_array_equal(x[...], y[...], err_msg=str(p))
    history = train_draft(model, second, (next(windows) for _ in range(2)), **kw)
    assert [h["step"] for h in history] == [7, 8]


def test_load_draft_errors(setup, tmp_path):
    model, draft = setup[:2]
    with pytest.raises(errors.MissingPathError):
        load_draft(tmp_path / "none")
    save_draft(draft, tmp_path / "d")
    cfg = json.loads((tmp_path / "d" / "config.json").read_text())
    cfg["hidden_size"] = 48
    cfg["head_dim"] = 8
    (tmp_path / "d" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(errors.ShapeMismatchError, match="draft tensor fc"):
        load_draft(tmp_path / "d")
    cfg.pop("eagle_draft")
    (tmp_path / "d" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(errors.CheckpointError, match="eagle_draft"):
        load_draft(tmp_path / "d")


def test_speculative_config_errors(setup):
    model, draft, _, ranked = setup[:4]
    prompts = [[4, 5, 6]]
    bad = [
        (dict(method="medusa"), errors.ConfigError, "medusa"),
        (dict(method="frspec"), errors.ConfigError, "vocab_subset"),
        (dict(vocab_subset=ranked), errors.ConfigError, "frspec"),
        (dict(depth=2, top_k=2, total_tokens=7), errors.ConfigError, "total_tokens"),
        (dict(method="frspec", vocab_subset=ranked, subset_size=3, top_k=4),
         errors.ConfigError, "top_k"),
        (dict(depth=0), errors.ConfigError, "depth"),
    ]
    for kw, exc, match in bad:
        with pytest.raises(exc, match=match):
            cpmjax.generate(model, prompts, 4, speculative=Speculative(draft=draft, **kw))
    other = new_draft(_target(hidden=48), seed=0)
    with pytest.raises(errors.ConfigError, match="hidden_size"):
        cpmjax.generate(model, prompts, 4, speculative=Speculative(draft=other))
    with pytest.raises(errors.PromptTooLongError):
        cpmjax.generate(model, [[4] * 120], 20, speculative=Speculative(draft=draft))
    with pytest.raises(errors.TokenIdError):
        cpmjax.generate(model, [[4, 999]], 4, speculative=Speculative(draft=draft))


# ----------------------------------------------------------------------------------------------
# CLI
@pytest.mark.slow
def test_cli_freq_vocab_train_draft_and_generate(tmp_path, capsys):
    from helpers import write_random_minicpm

    from cpmjax.cli import main

    model_dir = tmp_path / "m"
    write_random_minicpm(model_dir, max_position_embeddings=64)
    word_tokenizer(model_dir)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("def fibonacci ( n ) : return a if n else b\nthe c of the a and b to\n" * 20)
    assert main(["freq-vocab", "--tokenizer", str(model_dir), "--corpus", str(corpus),
                 "--out", str(tmp_path / "v.npy")]) == 0
    ranked = np.load(tmp_path / "v.npy")
    assert sorted(ranked.tolist()) == list(range(19)) and ranked[0] != 0
    draft_dir = tmp_path / "draft"
    assert main(["train-draft", "--model", str(model_dir), "--corpus", str(corpus), "--out",
                 str(draft_dir), "--steps", "3", "--seq-len", "8", "--batch", "2",
                 "--checkpoint-dir", str(tmp_path / "ck")]) == 0
    assert (draft_dir / "model.safetensors").exists() and (draft_dir / "freq_vocab.npy").exists()
    assert load_draft(draft_dir).config.hidden_size == 32
    # --init starts from a draft's weights: with no steps, the export is those weights
    again = tmp_path / "draft-again"
    assert main(["train-draft", "--model", str(model_dir), "--corpus", str(corpus), "--out",
                 str(again), "--steps", "0", "--seq-len", "8", "--batch", "2",
                 "--init", str(draft_dir)]) == 0
    from safetensors.numpy import load_file

    first, second = (load_file(d / "model.safetensors") for d in (draft_dir, again))
    assert first.keys() == second.keys()
    assert all(np.array_equal(first[k], second[k]) for k in first)
    capsys.readouterr()
    common = ["generate", "--model", str(model_dir), "--prompt", "def fibonacci ( n )",
              "--max-new-tokens", "6", "--no-stop"]
    assert main(common) == 0
    plain = capsys.readouterr().out
    assert main(common + ["--spec", "frspec", "--draft", str(draft_dir), "--subset", "8",
                          "--depth", "2", "--spec-top-k", "2", "--total-tokens", "4"]) == 0
    captured = capsys.readouterr()
    assert captured.out == plain
    assert "mean accepted length" in captured.err
    assert main(["generate", "--model", str(model_dir), "--prompt", "a", "--spec", "eagle2",
                 "--draft", str(tmp_path / "nowhere")]) == 2
