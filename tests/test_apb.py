"""APB distributed prefill: exact limits, the single-device reference, Star Attention, the
compressor's top-k, validation errors, LSE-merged decode attention and the model path.

8 simulated CPU devices (conftest). Every sharded call is jitted once; shapes are tiny."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, Mesh

from cpmjax.errors import ConfigError, ShapeMismatchError, ShardingError
from pallas_kernels import attention_reference
from sharding.apb import (
    RetainingHead,
    apb_attention,
    apb_reference,
    compress_block,
    decode_attention,
    make_apb_layout,
    make_method_layout,
    masked_attention_lse,
    star_attention,
)
from sharding.apb.kernel import remote_branches

B, HQ, HKV, D = 2, 4, 2, 8


def _mesh(n: int = 8) -> Mesh:
    return Mesh(np.array(jax.devices()[:n]), ("sequence",), axis_types=(AxisType.Auto,))


def _qkv(seq: int, seed: int = 0):
    kq, kk, kv = jax.random.split(jax.random.PRNGKey(seed), 3)
    return (jax.random.normal(kq, (B, seq, HQ, D)), jax.random.normal(kk, (B, seq, HKV, D)),
            jax.random.normal(kv, (B, seq, HKV, D)))


def _norm_score(q, k, v, *, query):
    return jnp.sum(k * k, axis=-1)


def _tiny_model(seed: int):
    """A 2-layer GQA MiniCPM (vocab 64, hidden 32) for the model-level APB tests."""
    from flax import nnx

    from cpmjax.models import CausalLM, ModelConfig

    cfg = ModelConfig(model_type="minicpm", vocab_size=64, hidden_size=32, intermediate_size=48,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=128, scale_emb=12.0, scale_depth=1.4,
                      dim_model_base=16)
    return CausalLM(cfg, rngs=nnx.Rngs(seed))


def _close(a, b, tol=2e-5):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=tol, rtol=tol)


@pytest.mark.slow
def test_no_anchor_passing_everything_is_exact_causal_attention():
    # 61 tokens: 57 context tokens over 8 hosts -> block 8 with 7 padded rows; 4 query tokens
    q, k, v = _qkv(61)
    mesh = _mesh()
    kw = dict(mesh=mesh, anchor_len=0, passing_len=8, query_len=4, scorer=_norm_score,
              impl="reference")
    out = jax.jit(lambda q, k, v: apb_attention(q, k, v, **kw))(q, k, v)
    _close(out, attention_reference(q, k, v, causal=True))
    # gradients flow through the passing blocks exactly like through full attention
    w = jax.random.normal(jax.random.PRNGKey(9), out.shape)
    grads = jax.jit(jax.grad(lambda q, k, v: jnp.sum(apb_attention(q, k, v, **kw) * w),
                             argnums=(0, 1, 2)))(q, k, v)
    want = jax.grad(lambda q, k, v: jnp.sum(attention_reference(q, k, v, causal=True) * w),
                    argnums=(0, 1, 2))(q, k, v)
    for g, r in zip(grads, want, strict=True):
        _close(g, r, 1e-4)


@pytest.mark.parametrize("setting", ["query", "callable_no_query", "retaining"])
def test_sharded_apb_matches_single_device_reference(setting):
    q, k, v = _qkv(70, seed=1)
    mesh = _mesh()
    if setting == "query":
        kw = dict(anchor_len=8, passing_len=3, query_len=6, query_offset=1, scorer="query")
    elif setting == "callable_no_query":
        kw = dict(anchor_len=4, passing_len=5, scorer=_norm_score)
    else:
        head = RetainingHead.init(jax.random.PRNGKey(3), HQ, HKV, D, hidden=16)
        kw = dict(anchor_len=6, passing_len=2, query_len=2, scorer="retaining",
                  retaining_head=head)
    out = jax.jit(lambda q, k, v: apb_attention(q, k, v, mesh=mesh, **kw))(q, k, v)
    want = apb_reference(q, k, v, hosts=8, **kw)
    _close(out, want)
    # a real approximation: not the exact causal attention, and exact on host 0's block
    full = attention_reference(q, k, v, causal=True)
    assert float(jnp.max(jnp.abs(out - full))) > 1e-2
    block = make_apb_layout(70, hosts=8, **{x: kw[x] for x in ("anchor_len", "passing_len")},
                            query_len=kw.get("query_len", 0)).block_len
    _close(out[:, :block], full[:, :block])
    if kw.get("query_len"):  # query rows attend exactly to everything
        _close(out[:, -kw["query_len"]:], full[:, -kw["query_len"]:])


def test_passing_nothing_equals_star_attention():
    q, k, v = _qkv(64, seed=2)
    mesh = _mesh()
    apb = jax.jit(lambda q, k, v: apb_attention(q, k, v, mesh=mesh, anchor_len=5,
                                                passing_len=0))(q, k, v)
    star = jax.jit(lambda q, k, v: star_attention(q, k, v, mesh=mesh, anchor_len=5))(q, k, v)
    _close(apb, star)
    # Star itself (anchor = the first block, query tokens by phase 2) against the reference
    star_q = jax.jit(lambda q, k, v: star_attention(q, k, v, mesh=mesh, query_len=8))(q, k, v)
    want = apb_reference(q, k, v, hosts=8, anchor_len=7, passing_len=0, query_len=8,
                         embed_query=False)
    _close(star_q, want)


def test_one_host_is_full_attention():
    q, k, v = _qkv(24, seed=3)
    out = jax.jit(lambda q, k, v: apb_attention(q, k, v, mesh=_mesh(1), query_len=3))(q, k, v)
    _close(out, attention_reference(q, k, v, causal=True))


def test_compressor_top_k_equals_reference():
    rng = np.random.default_rng(0)
    blk, heads, passing, pool = 24, 3, 7, 5
    # integer-valued scores: max-pooling produces many ties, which must resolve like a stable sort
    scores = rng.integers(0, 40, (B, blk, heads)).astype(np.float32)
    k = rng.normal(size=(B, blk, heads, 4)).astype(np.float32)
    v = rng.normal(size=(B, blk, heads, 5)).astype(np.float32)
    candidate = np.ones(blk, bool)
    candidate[:4] = False  # anchor tokens
    candidate[-3:] = False  # padding
    k_sel, v_sel, idx, n_valid = jax.jit(compress_block, static_argnums=(4, 5))(
        k, v, scores, candidate, passing, pool)
    assert int(n_valid) == candidate.sum()
    for b in range(B):
        for h in range(heads):
            padded = np.where(candidate, scores[b, :, h], -np.inf)
            pooled = np.array([padded[max(0, i - 2) : i + 3].max() for i in range(blk)])
            pooled = np.where(candidate, pooled, -np.inf)
            want = np.argsort(-pooled, kind="stable")[:passing]
            np.testing.assert_array_equal(np.asarray(idx[b, :, h]), want)
            np.testing.assert_array_equal(np.asarray(k_sel[b, :, h]), k[b, want, h])
            np.testing.assert_array_equal(np.asarray(v_sel[b, :, h]), v[b, want, h])
    # more slots than candidates: the first n_valid are the candidates, the rest never real
    _, _, idx, n_valid = compress_block(k, v, scores, candidate, 20, 1)
    assert set(np.asarray(idx[0, : int(n_valid), 0]).tolist()) == set(np.flatnonzero(candidate))


@pytest.mark.parametrize("kwargs, error, culprit", [
    (dict(anchor_len=9), ShardingError, "anchor_len=9"),
    (dict(passing_len=9), ShardingError, "passing_len=9"),
    (dict(anchor_len=-1), ConfigError, "anchor_len"),
    (dict(query_len=64), ConfigError, "query_len=64"),
    (dict(query_len=60), ShardingError, "hosts=8"),
    (dict(query_len=3, anchor_len=4, query_offset=2), ConfigError, "query_offset=2"),
    (dict(query_len=0, scorer="query", passing_len=2), ConfigError, "scorer='query'"),
    (dict(scorer="retaining", query_len=2, passing_len=2), ConfigError, "retaining_head"),
    (dict(scorer="topk", query_len=2), ConfigError, "scorer='topk'"),
    (dict(axis="tensor"), ShardingError, "axis='tensor'"),
    (dict(impl="cuda", query_len=2), ConfigError, "impl='cuda'"),
])
def test_invalid_settings_raise_naming_the_value(kwargs, error, culprit):
    q, k, v = _qkv(64)
    with pytest.raises(error, match=culprit.replace("(", r"\(")):
        apb_attention(q, k, v, mesh=_mesh(), **kwargs)


def test_method_layouts_and_per_host_branches():
    """One validation path for both methods; each host attends to exactly what it may see."""
    apb = make_method_layout("apb", 64, hosts=8, anchor_len=4, passing_len=2, query_len=0)
    assert (apb.anchor_len, apb.passing_len, apb.embed_query) == (4, 2, True)
    star = make_method_layout("star", 64, hosts=8, query_len=8, query_offset=3)
    assert (star.anchor_len, star.passing_len, star.embed_query) == (star.block_len, 0, False)
    with pytest.raises(ConfigError, match="passing_len=3"):
        make_method_layout("star", 64, hosts=8, passing_len=3)
    with pytest.raises(ConfigError, match="method='ring'"):
        make_method_layout("ring", 64, hosts=8)
    # APB: host h sees the anchor (h > 0) and h passing blocks: one branch per host
    index, branches = remote_branches(apb)
    assert [branches[i] for i in index] == [(False, 0)] + [(True, h) for h in range(1, 8)]
    # Star: host 0 sees nothing outside its block, every other host the anchor
    index, branches = remote_branches(star)
    assert branches == [(False, 0), (True, 0)] and index.tolist() == [0] + [1] * 7
    # no anchor, passing: host 0 has nothing, host h its h predecessors' blocks
    index, branches = remote_branches(make_apb_layout(64, hosts=8, anchor_len=0, passing_len=8))
    assert [branches[i] for i in index] == [(False, h) for h in range(8)]


def test_invalid_shapes_raise():
    q, k, v = _qkv(64)
    with pytest.raises(ShapeMismatchError, match="q_heads"):
        apb_attention(q[:, :, :3], k, v, mesh=_mesh(), anchor_len=0, passing_len=0)
    with pytest.raises(ShardingError, match="cache_len=60"):
        decode_attention(q[:, :1], k[:, :60], v[:, :60], mesh=_mesh(),
                         q_positions=jnp.zeros((B, 1), jnp.int32))


def test_decode_attention_merges_hosts_exactly():
    q, k, v = _qkv(64, seed=4)
    qd = q[:, :3]
    pos = jnp.array([[40, 41, 42], [10, 11, 12]], jnp.int32)
    out = jax.jit(lambda q, k, v, p: decode_attention(q, k, v, mesh=_mesh(), q_positions=p))(
        qd, k, v, pos)
    mask = jnp.arange(64)[None, None, :] <= pos[:, :, None]
    want, _ = masked_attention_lse(qd, k, v, mask, D**-0.5)
    _close(out, want)
    # the masked helper itself against the index-causal reference
    causal = jnp.arange(64)[None, None, :] <= jnp.arange(64)[None, :, None]
    got, lse = masked_attention_lse(q, k, v, jnp.broadcast_to(causal, (B, 64, 64)), D**-0.5)
    ref_o, ref_lse = attention_reference(q, k, v, causal=True, return_lse=True)
    _close(got, ref_o)
    _close(lse, ref_lse)


def test_model_prefill_on_expanded_layout():
    """The generation path: a cpmjax model run on the expanded layout through the ops seam.
    In the exact limit the cache and last logits equal a plain forward; with APB settings the
    cache holds exactly the host-local KV (anchor rows never written)."""
    from flax import nnx

    from cpmjax.generate.prefill import apb_prefill
    from sharding.mesh import make_mesh

    model = _tiny_model(0)
    mesh = make_mesh(sequence=8)
    seq, cache_len = 45, 64
    tokens = jax.random.randint(jax.random.PRNGKey(1), (B, seq), 0, 64)
    graphdef, state = nnx.split(model)

    def run(state, tokens, **kw):
        m = nnx.merge(graphdef, state)
        logits, cache, _ = apb_prefill(m, tokens, m.init_cache(B, cache_len), mesh=mesh,
                                       impl="reference", **kw)
        return logits, cache

    zero = lambda q, k, v, *, query: jnp.zeros(k.shape[:3])  # noqa: E731
    logits, cache = jax.jit(lambda s, t: run(s, t, anchor_len=0, passing_len=5, query_len=5,
                                             scorer=zero))(state, tokens)
    want_logits, want_cache = model(tokens, cache=model.init_cache(B, cache_len))
    _close(logits, want_logits[:, -1], 1e-4)
    for got, want in zip(cache, want_cache, strict=True):
        _close(got["k"], want["k"], 1e-4)
        _close(got["v"], want["v"], 1e-4)
    # APB proper (query embedded after the first token): block 6, anchor 5, passing 2
    logits, cache = jax.jit(lambda s, t: run(s, t, anchor_len=5, passing_len=2, query_len=4,
                                             query_offset=1))(state, tokens)
    assert np.all(np.isfinite(np.asarray(logits)))
    # layer 0 keys depend only on the token and position: equal to the plain forward's
    _close(cache[0]["k"][:, :seq], want_cache[0]["k"][:, :seq], 1e-4)
    assert float(jnp.max(jnp.abs(cache[0]["k"][:, seq:]))) == 0.0  # nothing else written
    # deeper layers differ after host 0's block (approximate attention there)
    assert float(jnp.max(jnp.abs(cache[1]["k"][:, 6:41] - want_cache[1]["k"][:, 6:41]))) > 1e-4
    _close(cache[1]["k"][:, :6], want_cache[1]["k"][:, :6], 1e-4)


def test_query_tail_attends_the_sharded_cache_through_decode_attention(monkeypatch):
    """The query tokens after an APB prefill go through ``decode_attention`` (per-host partials
    merged by log-sum-exp), once per layer, and the logits equal a plain forward in the exact
    limit."""

    from cpmjax.generate import prefill
    from sharding.mesh import make_mesh

    model = _tiny_model(3)
    mesh = make_mesh(sequence=4)
    calls = []
    real = prefill.decode_attention

    def spy(*args, **kwargs):
        calls.append(args[0].shape)
        return real(*args, **kwargs)

    monkeypatch.setattr(prefill, "decode_attention", spy)
    tokens = jax.random.randint(jax.random.PRNGKey(2), (B, 30), 0, 64)
    zero = lambda q, k, v, *, query: jnp.zeros(k.shape[:3])  # noqa: E731
    logits, _, _ = prefill.apb_prefill(model, tokens, model.init_cache(B, 32), mesh=mesh,
                                       anchor_len=0, passing_len=7, query_len=3,
                                       scorer=zero, impl="reference")
    assert calls == [(B, 3, 4, 8)] * model.config.num_hidden_layers
    want, _ = model(tokens, cache=model.init_cache(B, 32))
    _close(logits, want[:, -1], 1e-4)


def test_retaining_heads_get_the_layer_index_through_the_seam():
    """RetainingHeads scores layer i with head i: the model passes its layer index through
    ops.attention(layer=). Same numbers as the old scorer that counted its calls in layer
    order; a different head per layer matters."""
    from flax import nnx

    from cpmjax.generate.prefill import apb_prefill
    from sharding.apb import RetainingHeads
    from sharding.mesh import make_mesh

    model = _tiny_model(4)
    mesh = make_mesh(sequence=4)
    tokens = jax.random.randint(jax.random.PRNGKey(5), (B, 40), 0, 64)
    h0, h1 = (RetainingHead.init(jax.random.PRNGKey(s), 4, 2, 8, hidden=8) for s in (6, 7))

    class Counting:  # the old behaviour: the next layer's head on every call (trace order)
        def __init__(self, heads):
            self.heads, self.calls = heads, 0

        def __call__(self, q, k, v, *, query=None, **_):
            head = self.heads[self.calls % len(self.heads)]
            self.calls += 1
            return head(q, k, v)

    graphdef, state = nnx.split(model)

    def prefill_logits(scorer):  # hidden states of every position (layer 1 reads head 1)
        def run(state, tokens):  # one compiled program (eager shard_maps are much slower)
            hidden, _, _ = apb_prefill(nnx.merge(graphdef, state), tokens,
                                       model.init_cache(B, 48), mesh=mesh, anchor_len=4,
                                       passing_len=3, query_len=2, scorer=scorer,
                                       impl="reference", return_hidden=True)
            return hidden
        return np.asarray(jax.jit(run)(state, tokens))

    heads = RetainingHeads([h0, h1])
    got = prefill_logits(heads)
    np.testing.assert_array_equal(got, prefill_logits(Counting([h0, h1])))
    assert np.max(np.abs(got - prefill_logits(RetainingHeads([h0, h0])))) > 0
    assert heads.reset() is None  # kept as a no-op
    q, k, v = _qkv(8)
    with pytest.raises(ConfigError, match="no layer index"):
        heads(q, k, v)
    np.testing.assert_array_equal(heads(q, k, v, layer=3), h1(q, k, v))


def test_deprecated_keywords_still_work():
    q, k, v = _qkv(40, seed=3)
    mesh = _mesh()
    kw = dict(mesh=mesh, query_len=2, anchor_len=4, passing_len=2)
    new = jax.jit(lambda *a: apb_attention(*a, impl="reference", **kw))(q, k, v)
    with pytest.warns(DeprecationWarning, match="attention_impl"):  # warned while tracing
        old = jax.jit(lambda *a: apb_attention(*a, attention_impl="reference", **kw))(q, k, v)
    np.testing.assert_array_equal(old, new)
