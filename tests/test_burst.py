"""BurstAttention (sharding/burst.py) on 8 simulated CPU devices against full attention.

Every numeric case compares outputs and gradients (dq, dk, dv) with the reference attention of
``cpmjax.ops.xla_attention`` (materialised scores, autodiff) within 1e-5 in float32, on random
inputs with grouped-query heads and odd head dims. One jit per case."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AxisType, Mesh

from cpmjax.errors import ConfigError, ShapeMismatchError, ShardingError
from cpmjax.ops import xla_attention
from sharding.burst import (
    burst_attention,
    choose_impl,
    collective_bytes_from_hlo,
    communication_bytes,
    reference_local_attention,
    remat_policy,
)
from sharding.layout import (
    from_layout,
    layout_indices,
    layout_positions,
    local_positions,
    to_layout,
)

G = 8
TOL = dict(atol=1e-5, rtol=1e-5)


def _mesh(shape=(G,), names=("sequence",)) -> Mesh:
    devices = np.array(jax.devices()[: int(np.prod(shape))]).reshape(shape)
    return Mesh(devices, names, axis_types=(AxisType.Auto,) * len(names))


def _inputs(seed=0, batch=2, seq=64, q_heads=4, kv_heads=2, qk_dim=9, v_dim=7, segments=False):
    rng = np.random.default_rng(seed)
    q = rng.normal(size=(batch, seq, q_heads, qk_dim)).astype(np.float32)
    k = rng.normal(size=(batch, seq, kv_heads, qk_dim)).astype(np.float32)
    v = rng.normal(size=(batch, seq, kv_heads, v_dim)).astype(np.float32)
    ct = rng.normal(size=(batch, seq, q_heads, v_dim)).astype(np.float32)
    seg = None
    if segments:  # packed documents, plus a padding segment id that no query shares
        seg = np.sort(rng.integers(0, 4, size=(batch, seq)), axis=1).astype(np.int32)
    return q, k, v, ct, seg


def _run(q, k, v, ct, seg, *, mesh, layout="zigzag", causal=True, shards=G, **kw):
    """(out, dq, dk, dv) of burst (natural order in and out) and of the reference, one jit."""

    def burst_loss(q, k, v):
        lay = lambda x: to_layout(x, shards, layout)  # noqa: E731
        o = burst_attention(lay(q), lay(k), lay(v), mesh=mesh, causal=causal, layout=layout,
                            segment_ids=None if seg is None else lay(jnp.asarray(seg)), **kw)
        o = from_layout(o, shards, layout)
        return jnp.sum(o * ct), o

    def ref_loss(q, k, v):
        o = xla_attention(q, k, v, causal=causal,
                          segment_ids=None if seg is None else jnp.asarray(seg))
        return jnp.sum(o * ct), o

    def both(q, k, v):
        grad = lambda f: jax.grad(f, argnums=(0, 1, 2), has_aux=True)(q, k, v)  # noqa: E731
        (gb, ob), (gr, orf) = grad(burst_loss), grad(ref_loss)
        return (ob, *gb), (orf, *gr)

    return jax.jit(both)(q, k, v)


def _assert_close(got, want):
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, want, strict=True):
        assert np.isfinite(np.asarray(a)).all(), name
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), err_msg=name, **TOL)


# ----------------------------------------------------------------------------- layouts


def test_zigzag_layout_round_trip_and_positions():
    perm = layout_indices(16, 4, "zigzag")
    # 8 chunks of 2: device r holds chunks r and 7 - r
    assert perm.tolist() == [0, 1, 14, 15, 2, 3, 12, 13, 4, 5, 10, 11, 6, 7, 8, 9]
    x = np.arange(2 * 16 * 3).reshape(2, 16, 3)
    laid = to_layout(x, 4)
    np.testing.assert_array_equal(laid[:, :, 0] // 3 % 16, np.broadcast_to(perm, (2, 16)))
    np.testing.assert_array_equal(from_layout(laid, 4), x)
    np.testing.assert_array_equal(from_layout(to_layout(x, 4, "contiguous"), 4, "contiguous"), x)
    for r in range(4):
        np.testing.assert_array_equal(local_positions(r, 4, 4, "zigzag"), perm[4 * r: 4 * r + 4])
        np.testing.assert_array_equal(local_positions(r, 4, 4, "contiguous"),
                                      np.arange(4 * r, 4 * r + 4))
    assert layout_positions(16, 4).dtype == np.int32
    with pytest.raises(ShapeMismatchError, match="multiple of 8"):
        layout_indices(12, 4, "zigzag")
    with pytest.raises(ShardingError, match="unknown sequence layout"):
        layout_indices(16, 4, "striped")


def test_reference_local_attention_fully_masked_rows():
    q, k, v, _, _ = _inputs(batch=1, seq=8)
    seg_q = jnp.array([[0, 0, 5, 5, 1, 1, 1, 1]])  # segment 5 has no keys
    seg_k = jnp.array([[0, 0, 0, 1, 1, 1, 1, 1]])
    o, lse = reference_local_attention(q, k, v, causal=True, q_offset=-2, sm_scale=0.3,
                                       segment_ids=(seg_q, seg_k))
    assert np.isfinite(np.asarray(o)).all()
    masked = np.asarray(lse)[0, :, [0, 1, 2, 3]]  # no key (offset -2 or segment 5)
    assert np.isneginf(masked).all()
    np.testing.assert_array_equal(np.asarray(o)[0, [0, 1, 2, 3]], 0.0)
    ref = xla_attention(q, k, v, causal=True, q_positions=jnp.arange(8) - 2,
                        segment_ids=seg_q, kv_segment_ids=seg_k, sm_scale=0.3)
    np.testing.assert_allclose(np.asarray(o), np.asarray(ref), **TOL)


# ----------------------------------------------------------------------------- exactness

CASES = [
    # impl, layout, causal, segments
    *[(impl, "zigzag", True, False) for impl in ("burst", "ring", "allgather", "auto")],
    *[(impl, "contiguous", True, True) for impl in ("burst", "ring", "allgather")],
    *[(impl, "zigzag", False, True) for impl in ("burst", "ring", "allgather")],
    ("burst", "zigzag", True, True),
    ("ring", "zigzag", True, True),
]


@pytest.mark.parametrize("impl,layout,causal,segments", CASES)
def test_matches_full_attention(impl, layout, causal, segments):
    q, k, v, ct, seg = _inputs(seed=len(impl) + causal, segments=segments)
    got, want = _run(q, k, v, ct, seg, mesh=_mesh(), layout=layout, causal=causal,
                     schedule=impl)
    _assert_close(got, want)


def test_multi_head_auto_and_three_axis_mesh():
    """MHA (auto picks burst), batch over ``data``, heads over ``tensor``, the sequence over
    the 2 devices of ``sequence``."""
    mesh = _mesh((2, 2, 2), ("data", "tensor", "sequence"))
    q, k, v, ct, seg = _inputs(seed=3, q_heads=4, kv_heads=4, qk_dim=16, v_dim=16,
                               segments=True)
    got, want = _run(q, k, v, ct, seg, mesh=mesh, schedule="auto", shards=2)
    _assert_close(got, want)


@pytest.mark.parametrize("impl", ["burst", "ring"])
def test_double_ring_equals_single_ring(impl):
    q, k, v, ct, seg = _inputs(seed=7, segments=True)
    single, want = _run(q, k, v, ct, seg, mesh=_mesh(), schedule=impl)
    double, _ = _run(q, k, v, ct, seg, mesh=_mesh((2, 4), ("node", "sequence")), schedule=impl,
                     axis="node", inner_axis="sequence")
    _assert_close(double, single)
    _assert_close(double, want)


# ----------------------------------------------------------------------------- communication


def _grad_hlo(mesh, shapes, impl):
    def loss(q, k, v):
        return jnp.sum(burst_attention(q, k, v, mesh=mesh, schedule=impl))

    args = [jax.ShapeDtypeStruct(s, jnp.float32) for s in shapes]
    return jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(*args).compile().as_text()


@pytest.mark.parametrize("q_heads,kv_heads", [(4, 4), (4, 1)])
def test_hlo_bytes_match_volume_model_and_auto_picks_cheaper(q_heads, kv_heads):
    batch, seq, dim = 1, 64, 32
    shapes = [(batch, seq, q_heads, dim), (batch, seq, kv_heads, dim), (batch, seq, kv_heads, dim)]
    mesh = _mesh()
    measured = {}
    for impl in ("burst", "ring"):
        measured[impl] = collective_bytes_from_hlo(_grad_hlo(mesh, shapes, impl))
        model = communication_bytes(impl, batch=batch, seq_len=seq, q_heads=q_heads,
                                    kv_heads=kv_heads, qk_dim=dim, v_dim=dim, num_shards=G)
        assert measured[impl]["collective-permute"] == measured[impl]["total"]
        assert measured[impl]["total"] == model["total"], impl
    cheaper = min(measured, key=lambda name: measured[name]["total"])
    assert choose_impl(batch=batch, seq_len=seq, q_heads=q_heads, kv_heads=kv_heads,
                       qk_dim=dim, v_dim=dim, num_shards=G) == cheaper
    if q_heads == kv_heads:  # paper arithmetic: (2 + 3) / (2 + 4) tensors plus two vectors
        assert cheaper == "burst"
        assert measured["burst"]["total"] <= 0.85 * measured["ring"]["total"]
    else:
        assert cheaper == "ring"


def test_auto_never_above_cheaper_for_any_head_ratio():
    for kv_heads in (1, 2, 4, 8):
        for groups in (1, 2, 3, 4, 8):
            for dim in (8, 64, 128):
                shapes = dict(batch=1, seq_len=4096, q_heads=kv_heads * groups,
                              kv_heads=kv_heads, qk_dim=dim, v_dim=dim, num_shards=8,
                              itemsize=2)
                chosen = communication_bytes(choose_impl(**shapes), **shapes)["total"]
                best = min(communication_bytes(i, **shapes)["total"] for i in ("burst", "ring"))
                assert chosen == best
    # the crossover: burst for MHA, ring from 2 q heads per kv head on (bf16 inputs, d = 128)
    base = dict(batch=1, seq_len=4096, kv_heads=8, qk_dim=128, v_dim=128, num_shards=8,
                itemsize=2)
    assert choose_impl(q_heads=8, **base) == "burst"
    assert choose_impl(q_heads=16, **base) == "ring"


# ----------------------------------------------------------------------------- remat


def test_remat_policy_saves_ring_outputs_and_keeps_gradients():
    mesh = _mesh()
    rng = np.random.default_rng(11)
    x = jnp.asarray(rng.normal(size=(1, 64, 16)), jnp.float32)
    weights = [jnp.asarray(rng.normal(size=(16, 16)) * 0.3, jnp.float32) for _ in range(3)]

    def layer(x, w):
        q, k, v = [(x @ wi).reshape(1, 64, 2, 8) for wi in w]
        return x + jnp.tanh(burst_attention(q, k, v, mesh=mesh, schedule="burst").reshape(x.shape))

    def model(policy):
        f = layer if policy is None else jax.checkpoint(layer, policy=policy)

        def loss(x, w):
            for _ in range(2):
                x = f(x, w)
            return jnp.sum(x**2)

        return jax.grad(loss, argnums=1)

    def ring_passes(policy):
        return str(jax.make_jaxpr(model(policy))(x, weights)).count("shard_map")

    # 2 layers: 2 forward rings + 2 backward rings; full remat re-runs the forward rings
    assert ring_passes(None) == ring_passes(remat_policy()) == 4
    assert ring_passes(jax.checkpoint_policies.nothing_saveable) == 6
    plain, rematted = jax.jit(lambda x, w: (model(None)(x, w), model(remat_policy())(x, w)))(
        x, weights)
    for a, b in zip(plain, rematted, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# ----------------------------------------------------------------------------- errors


def test_user_errors_are_typed():
    q, k, v, _, _ = _inputs(batch=1, seq=64)
    mesh = _mesh()
    with pytest.raises(ConfigError, match="unknown burst impl 'fast'"):
        burst_attention(q, k, v, mesh=mesh, impl="fast")
    with pytest.raises(ShardingError, match="no axis 'seq'"):
        burst_attention(q, k, v, mesh=mesh, axis="seq")
    with pytest.raises(ShapeMismatchError, match="multiple of 16"):
        burst_attention(q[:, :40], k[:, :40], v[:, :40], mesh=mesh)
    with pytest.raises(ShapeMismatchError, match="segment_ids shape"):
        burst_attention(q, k, v, mesh=mesh, segment_ids=jnp.zeros((1, 32), jnp.int32))
    with pytest.raises(ShapeMismatchError, match="not a multiple of kv heads"):
        burst_attention(q[:, :, :3], k, v, mesh=mesh)


def test_schedule_keyword_and_deprecated_aliases():
    """schedule= picks the ring, impl= the local attention; the old impl="ring" (a schedule
    name) and local_attention= still work, with a DeprecationWarning, and agree exactly."""
    q, k, v, _, _ = _inputs(batch=1, seq=64)
    mesh = _mesh()
    new = burst_attention(q, k, v, mesh=mesh, schedule="ring", impl="reference")
    with pytest.warns(DeprecationWarning) as record:
        old = burst_attention(q, k, v, mesh=mesh, impl="ring",
                              local_attention=reference_local_attention)
    messages = " ".join(str(w.message) for w in record)
    assert "schedule='ring'" in messages and "local_attention=" in messages
    np.testing.assert_array_equal(old, new)
    with pytest.raises(ConfigError, match="unknown burst schedule 'fast'"):
        burst_attention(q, k, v, mesh=mesh, schedule="fast")


def test_sharding_errors_are_cpmjax_errors():
    """sharding defines its own error types (it imports nothing from cpmjax); cpmjax.errors
    re-exports them, so cpmjax's except clauses catch what sharding raises."""
    import cpmjax.errors
    import sharding.errors
    from sharding.layout import check_layout

    for catch in (cpmjax.errors.ShardingError, cpmjax.errors.CpmjaxError, ValueError):
        with pytest.raises(catch, match="unknown sequence layout"):
            check_layout("diagonal", 64, 8)
    for catch in (cpmjax.errors.ShapeMismatchError, cpmjax.errors.CpmjaxError):
        with pytest.raises(catch, match="multiple of 16"):
            check_layout("zigzag", 40, 8)
    for catch in (cpmjax.errors.ConfigError, cpmjax.errors.CpmjaxError):
        with pytest.raises(catch, match="passes nothing"):
            from sharding.apb import make_method_layout
            make_method_layout("star", 64, hosts=8, passing_len=2)
    assert cpmjax.errors.ConfigError is sharding.errors.ConfigError
    assert issubclass(cpmjax.errors.DeltaError, cpmjax.errors.CpmjaxError)


# ----------------------------------------------------------------------------- training


def test_train_step_with_sequence_parallelism_equals_single_device():
    """MiniCPM (GQA, packed documents) on a (data=2, sequence=4) mesh: the batch laid out by
    ``SequenceParallel.shard_batch`` through the step wrapped by ``SequenceParallel.wrap`` (the
    'burst' backend) gives the single-device loss and gradients, and a full optimizer step gives
    the same loss."""
    from flax import nnx

    from cpmjax.models import CausalLM, ModelConfig
    from cpmjax.train.data import pack_rows
    from cpmjax.train.loop import SequenceParallel, loss_fn, make_train_step
    from sharding.mesh import make_mesh, shard_model

    hf = dict(model_type="minicpm", vocab_size=64, hidden_size=32, intermediate_size=64,
              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              dim_model_base=8, scale_emb=4.0, scale_depth=1.4, tie_word_embeddings=True,
              max_position_embeddings=64)
    rng = np.random.default_rng(0)
    ids = rng.integers(4, 64, (4, 33)).astype(np.int32)
    ids[:, 13] = 1  # a second document starts mid-row
    batch = pack_rows(ids, bos_id=1)  # seq 32

    def run(mesh):
        model = CausalLM(ModelConfig.from_hf_dict(hf), rngs=nnx.Rngs(0))
        feed = {k: jnp.asarray(v) for k, v in batch.items()}
        parallel = None
        if mesh is not None:
            shard_model(model, mesh)
            parallel = SequenceParallel(mesh, impl="burst")
            feed = parallel.shard_batch(batch)
            assert feed["input_ids"].sharding.spec[1] == "sequence"
            np.testing.assert_array_equal(np.asarray(feed["positions"]),
                                          to_layout(batch["positions"], 4))
        opt = nnx.Optimizer(model, optax.adamw(1e-2), wrt=nnx.Param)
        graphdef, state = nnx.split((model, opt))
        step = make_train_step(graphdef, nnx.Param, chunk=8)

        def grads(state, feed):
            model, _ = nnx.merge(graphdef, state)
            (loss, _), g = nnx.value_and_grad(lambda m: loss_fn(m, feed, 8), has_aux=True)(model)
            return loss, nnx.to_flat_state(g)

        def both(state, feed):
            loss, g = grads(state, feed)
            state, _ = step(state, feed)
            return loss, g, grads(state, feed)[0]

        if parallel is None:
            return jax.jit(both)(state, feed)
        both = parallel.wrap(both)
        assert "ppermute" in str(jax.make_jaxpr(both)(state, feed))  # the ring ran
        return jax.jit(both)(state, feed)

    loss1, grads1, next1 = run(None)
    loss8, grads8, next8 = run(make_mesh(data=2, sequence=4))
    np.testing.assert_allclose(float(loss8), float(loss1), rtol=1e-5)
    np.testing.assert_allclose(float(next8), float(next1), rtol=1e-5)
    grads1, grads8 = dict(grads1), dict(grads8)
    assert grads1.keys() == grads8.keys()
    for path, g in grads1.items():
        np.testing.assert_allclose(np.asarray(grads8[path][...]), np.asarray(g[...]),
                                   rtol=1e-5, atol=1e-6, err_msg=str(path))
