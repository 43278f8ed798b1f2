"""The APB quality study's pieces: the key-value retrieval generator, the KL metric, the Wilson
interval, and the distributed-prefill harness (exact limit == full attention)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from cpmjax.evals import apb_quality as quality
from cpmjax.evals import kv_retrieval as kv


def test_training_document_is_one_row_and_answers_are_in_context(tmp_path):
    spec = kv.KVSpec(num_keys=200, num_values=16, value_len=2)
    tok = kv.make_tokenizer(spec, str(tmp_path / "tok"))
    rng = np.random.default_rng(3)
    for trial in range(8):
        if trial < 4:
            text = kv.training_document(rng, spec, seq_len=128, num_queries=6)
        else:  # mixed: 2-10 pairs, questions (keys with replacement) fill the rest
            text = kv.training_document(rng, spec, seq_len=128, min_pairs=2, max_pairs=10)
        words = text.split()
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert len(ids) == 128 - 2  # + <s> and </s> from the packer = seq_len
        assert tok.unk_token_id not in ids
        assert ids == [spec.vocab.index(w) for w in words]
        first_q = words.index("?")
        context = words[:first_q]
        pairs = {context[i]: context[i + 1 : i + 3] for i in range(0, len(context), 3)}
        assert all(k.startswith("k") for k in pairs) and len(pairs) == len(context) // 3
        questions = [i for i, w in enumerate(words) if w == "?"]
        if trial < 4:
            assert len(questions) == 6
        else:
            assert 2 <= len(pairs) <= 10 and len(questions) == (126 - 3 * len(pairs)) // 4
        for i in questions:
            assert words[i + 2 : i + 4] == pairs[words[i + 1]]


def test_eval_example_answer_follows_the_needle():
    spec = kv.KVSpec(num_keys=100, num_values=8, value_len=3)
    rng = np.random.default_rng(0)
    for needle_pair in (None, 0, 39):
        ex = kv.eval_example(rng, spec, num_pairs=40, needle_pair=needle_pair)
        assert ex.ids.size == 1 + 40 * spec.pair_len + 2 and ex.ids[0] == 1
        assert ex.ids[-2] == len(kv.SPECIALS)  # "?"
        assert ex.ids[ex.needle] == ex.ids[-1]  # the queried key sits at the needle
        np.testing.assert_array_equal(ex.ids[ex.needle + 1 : ex.needle + 4], ex.answer)
        keys = ex.ids[1:-2].reshape(40, spec.pair_len)[:, 0]
        assert len(set(keys.tolist())) == 40
        if needle_pair is not None:
            assert ex.needle == 1 + needle_pair * spec.pair_len


def test_kl_matches_reference_and_is_zero_for_identical_logits():
    rng = np.random.default_rng(1)
    p = rng.normal(size=(5, 7, 33)) * 3
    q = rng.normal(size=(5, 7, 33)) * 3
    got = np.asarray(quality.kl_per_token(jnp.asarray(p), jnp.asarray(q)))
    pp = np.exp(p - p.max(-1, keepdims=True))
    pp /= pp.sum(-1, keepdims=True)
    qq = np.exp(q - q.max(-1, keepdims=True))
    qq /= qq.sum(-1, keepdims=True)
    want = np.sum(pp * (np.log(pp) - np.log(qq)), axis=-1)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
    assert np.all(got > 0)
    np.testing.assert_allclose(quality.kl_per_token(jnp.asarray(p), jnp.asarray(p + 2.5)), 0,
                               atol=1e-5)


def test_wilson_interval():
    for k, n in ((0, 10), (7, 10), (200, 400), (400, 400)):
        lo, hi = quality.wilson_interval(k, n)
        assert 0 <= lo <= k / n <= hi <= 1
        lo2, hi2 = quality.wilson_interval(n - k, n)
        assert lo == pytest.approx(1 - hi2) and hi == pytest.approx(1 - lo2)
    lo, hi = quality.wilson_interval(5000, 10000)  # large n: the normal approximation
    assert hi - lo == pytest.approx(2 * 1.959964 * 0.005, rel=1e-3)


def test_harness_exact_limit_equals_full_attention():
    """APB with anchor 0 and every entry passed, through the study's distributed harness,
    reproduces one-device full attention at every position (context and query rows)."""
    from flax import nnx

    from cpmjax.models import CausalLM, ModelConfig

    cfg = ModelConfig(model_type="minicpm", vocab_size=64, hidden_size=32, intermediate_size=64,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=256, scale_emb=12.0, scale_depth=1.4,
                      dim_model_base=16)
    model = CausalLM(cfg, rngs=nnx.Rngs(0))
    tokens = jnp.asarray(np.random.default_rng(0).integers(4, 64, (1, 70)), jnp.int32)
    mesh = quality.sequence_mesh(8)
    ref = quality.full_hidden(model, tokens)
    layout = quality.layout_for("exact-limit", 70, query_len=6)
    got = quality.distributed_hidden(model, tokens, mesh=mesh, layout=layout,
                                     scorer=quality.uniform_scores)
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=2e-4, atol=2e-5)
    star = quality.distributed_hidden(model, tokens, mesh=mesh,
                                      layout=quality.layout_for("star", 70, query_len=6),
                                      scorer="query")
    blk = layout.block_len
    # Star: host 0's block is exact, later hosts' context rows differ (nothing passed)
    np.testing.assert_allclose(np.asarray(star)[:, :blk], np.asarray(ref)[:, :blk], rtol=2e-4,
                               atol=2e-5)
    assert float(jnp.max(jnp.abs(star[:, blk:64] - ref[:, blk:64]))) > 1e-3


def test_logit_stats_chunks_match_direct_computation():
    rng = np.random.default_rng(2)
    head = jnp.asarray(rng.normal(size=(50, 8)), jnp.float32)
    ref_h = jnp.asarray(rng.normal(size=(21, 8)), jnp.float32)
    hid = ref_h + jnp.asarray(rng.normal(size=(21, 8)) * 0.3, jnp.float32)
    targets = jnp.asarray(rng.integers(0, 50, 21), jnp.int32)
    got = quality.logit_stats(head, ref_h, hid, targets, chunk=8)  # 3 chunks, last padded
    ref_logits, logits = np.asarray(ref_h @ head.T), np.asarray(hid @ head.T)
    np.testing.assert_allclose(got["kl"], quality.kl_per_token(ref_logits, logits), rtol=1e-5)
    lsm = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    np.testing.assert_allclose(got["nll"], -lsm[np.arange(21), np.asarray(targets)], rtol=1e-5)
    np.testing.assert_array_equal(got["agree"], logits.argmax(-1) == ref_logits.argmax(-1))
    np.testing.assert_array_equal(got["ref_correct"], ref_logits.argmax(-1) == targets)


def test_query_first_document_opens_with_an_asked_question():
    spec = kv.KVSpec(num_keys=200, num_values=16, value_len=1)
    rng = np.random.default_rng(5)
    for _ in range(4):
        words = kv.training_document(rng, spec, seq_len=96, min_pairs=4, max_pairs=20,
                                     query_first=True).split()
        assert len(words) == 94 and words[0] == "?"
        body = words[2:]
        first_q = body.index("?")
        pairs = {body[i]: body[i + 1] for i in range(0, first_q, 2)}
        asked = [body[i + 1] for i, w in enumerate(body) if w == "?"]
        assert words[1] == asked[0] and words[1] in pairs  # the first question, restated


def test_straddling_pairs_span_a_block_boundary():
    spec = kv.KVSpec(num_keys=100, num_values=8, value_len=1)
    pairs, blk = 40, 13
    got = kv.straddling_pairs(spec, pairs, blk)
    brute = [i for i in range(pairs)
             if len({p // blk for p in range(1 + 2 * i, 3 + 2 * i)}) == 2]
    np.testing.assert_array_equal(got, brute)
    assert got.size > 0
    spec3 = kv.KVSpec(num_keys=100, num_values=8, value_len=3)
    got3 = kv.straddling_pairs(spec3, 20, 10)
    brute3 = [i for i in range(20) if len({p // 10 for p in range(1 + 4 * i, 5 + 4 * i)}) == 2]
    np.testing.assert_array_equal(got3, brute3)
