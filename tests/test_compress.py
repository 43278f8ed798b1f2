"""cpmjax.compress (pruning, MoEfication, qwix quantization) and the CPET delta pieces
(recovery, inherit) on tiny random MiniCPM models."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from helpers import minicpm_hf_dict

import cpmjax
import cpmjax.compress as cc
import cpmjax.delta as cd
from cpmjax.errors import CompressionError, DeltaError, QuantizedCheckpointError
from cpmjax.models import CausalLM, ModelConfig

IDS = jnp.asarray(np.random.RandomState(0).randint(3, 96, (2, 12)), jnp.int32)
CALIB = [np.random.RandomState(i).randint(3, 96, (2, 16)) for i in range(2)]


def tiny(seed: int = 0, **overrides) -> CausalLM:
    return CausalLM(ModelConfig.from_hf_dict(minicpm_hf_dict(**overrides)),
                    rngs=nnx.Rngs(seed))


def kernel(model, layer=0, name="up_proj", part="mlp"):
    return getattr(getattr(model.model.layers[layer], part), name)


# ------------------------------------------------------------------------------ quantization
@pytest.mark.parametrize("bits,group", [(8, None), (4, None), (4, 16)])
def test_quantize_error_within_half_a_step(bits, group):
    model = tiny()
    w = np.asarray(kernel(model).kernel[...])
    cc.quantize(model, bits=bits, group_size=group)
    q = kernel(model)
    assert isinstance(q, cc.QuantizedLinear)
    dq = np.asarray(q.dequantized())
    scale = np.asarray(q.kernel_scale[...])  # [in / group, out]
    step = np.repeat(scale, w.shape[0] // scale.shape[0], axis=0)
    assert np.all(np.abs(w - dq) <= step / 2 * (1 + 1e-5) + 1e-8)
    qmax = {8: 127.5, 4: 7.5}[bits]  # qwix: absmax maps to the edge of the last step
    absmax = np.abs(w).reshape(scale.shape[0], -1, w.shape[1]).max(1)
    np.testing.assert_allclose(scale, absmax / qmax, rtol=1e-5)
    # embeddings and head untouched
    assert isinstance(model.model.embed_tokens.embedding, nnx.Param)


def test_int4_has_at_most_16_levels_per_group():
    model = tiny()
    cc.quantize(model, bits=4, group_size=16)
    q = np.asarray(kernel(model).kernel[...].astype(jnp.int8))
    assert q.min() >= -8 and q.max() <= 7
    for g in q.reshape(-1, 16, q.shape[1]).transpose(0, 2, 1).reshape(-1, 16):
        assert len(np.unique(g)) <= 16
    assert cc.weight_bytes(model) < cc.weight_bytes(tiny())


def test_quantized_greedy_equals_reforward_argmax_and_checkpoint_roundtrip(tmp_path):
    model = tiny()
    cc.quantize(model, bits=8)
    out = cpmjax.generate(model, np.asarray(IDS[:1, :6]), 5)
    tokens = np.asarray(out.tokens)[0]
    seq = np.concatenate([np.asarray(IDS[0, :6]), tokens])
    logits = np.asarray(model(jnp.asarray(seq[None])))
    np.testing.assert_array_equal(logits[0, 5:-1].argmax(-1), tokens)

    cc.save_quantized(model, str(tmp_path / "q"))
    again = cc.load_quantized(str(tmp_path / "q"))
    np.testing.assert_array_equal(np.asarray(again(IDS)), np.asarray(model(IDS)))
    with pytest.raises(QuantizedCheckpointError, match="bits=8"):
        cc.load_quantized(str(tmp_path / "q"), bits=4)
    other = tiny()
    cc.quantize(other, bits=4)
    with pytest.raises(QuantizedCheckpointError, match="bits"):
        cc.load_quantized(str(tmp_path / "q"), other)
    with pytest.raises(QuantizedCheckpointError, match="config"):
        cc.load_quantized(str(tmp_path / "q"), tiny(hidden_size=64))


# ------------------------------------------------------------------------------ pruning
def test_unstructured_sparsity_exact():
    model = tiny()
    got = cc.prune(model, 0.5)
    assert got and all(v == 0.5 for v in got.values())
    w = np.asarray(kernel(model, 1, "q_proj", "self_attn").kernel[...])
    assert np.all((w == 0).sum(0) == w.shape[0] // 2)  # per output column
    got = cc.prune(tiny(), 0.25)
    assert all(v == 0.25 for v in got.values())


def _two_four_ok(w):
    groups = (w != 0).reshape(w.shape[0] // 4, 4, w.shape[1]).sum(1)
    return np.all(groups <= 2)


def test_two_four_masks_exact_and_kept_after_training_steps():
    model = tiny()
    cc.prune(model, 0.5, "2:4")
    for m in cc.masks(model).values():
        assert np.all(np.asarray(m).reshape(-1, 4, m.shape[1]).sum(1) == 2)
    # delta tuning: the backbone is frozen, pruned weights stay zero
    cd.attach(model, "lora", targets=["q_proj", "up_proj"], r=2)
    opt = nnx.Optimizer(model, optax.adam(1e-2), wrt=cd.trainable(model))

    def loss_fn(m):
        return jnp.mean(m(IDS) ** 2)

    grads = nnx.grad(loss_fn, argnums=nnx.DiffState(0, cd.trainable(model)))(model)
    opt.update(model, grads)
    assert _two_four_ok(np.asarray(kernel(model).kernel[...]))
    cd.detach(model)
    # full fine-tuning revives weights; apply_masks after the update zeroes them again
    opt = nnx.Optimizer(model, optax.sgd(1e-1), wrt=nnx.Param)
    opt.update(model, nnx.grad(loss_fn)(model))
    assert not _two_four_ok(np.asarray(kernel(model).kernel[...]))
    assert cc.apply_masks(model) == 14
    assert _two_four_ok(np.asarray(kernel(model).kernel[...]))


def test_wanda_differs_from_magnitude_on_skewed_activations():
    a, b = tiny(), tiny()
    for m in (a, b):  # a few hidden channels carry huge activations into the MLP
        scale = m.model.layers[0].post_attention_layernorm.scale
        scale.set_value(scale[...].at[:4].multiply(50.0))
    cc.prune(a, 0.5, criterion="magnitude")
    cc.prune(b, 0.5, criterion="wanda", calibration=CALIB)
    ma, mb = cc.masks(a), cc.masks(b)
    key = "model.layers.0.mlp.up_proj"
    assert not np.array_equal(np.asarray(ma[key]), np.asarray(mb[key]))
    assert np.asarray(mb[key])[:4].mean() > np.asarray(ma[key])[:4].mean()


# ------------------------------------------------------------------------------ MoEfication
def test_moefy_exact_at_full_top_k_and_routes_below():
    model = tiny()
    ref = np.asarray(model(IDS))
    recall = cc.moefy(model, num_experts=4, top_k=4)
    assert isinstance(model.model.layers[0].mlp, cc.MoEfiedMLP)
    np.testing.assert_allclose(np.asarray(model(IDS)), ref, atol=1e-5)
    assert set(recall.values()) == {1.0}
    table = np.asarray(model.model.layers[0].mlp.expert_of[...])
    assert np.all(np.bincount(table) == 12)

    routed = tiny()
    recall = cc.moefy(routed, num_experts=4, top_k=2, calibration=CALIB)
    assert all(0.5 <= r <= 1.0 for r in recall.values())
    out = np.asarray(routed(IDS))
    assert np.all(np.isfinite(out)) and not np.allclose(out, ref)


# ------------------------------------------------------------------------------ CPET deltas
def test_recovery_is_identity_at_init_and_trains():
    model = tiny()
    ref = np.asarray(model(IDS))
    delta = cd.attach(model, "recovery", targets=[nnx.Linear], r=4)
    np.testing.assert_allclose(np.asarray(model(IDS)), ref, atol=1e-6)
    opt = nnx.Optimizer(model, optax.adam(1e-2), wrt=cd.trainable(model))
    grads = nnx.grad(lambda m: jnp.mean(m(IDS) ** 2),
                     argnums=nnx.DiffState(0, cd.trainable(model)))(model)
    opt.update(model, grads)
    assert not np.allclose(np.asarray(model(IDS)), ref, atol=1e-6)
    assert delta.num_params() > 0


def _trained_lora(model, path):
    delta = cd.attach(model, "lora", targets=["q_proj", "v_proj", "up_proj"], r=2)
    for _, module in delta.modules():
        module.lora_b.set_value(0.05 * jnp.ones_like(module.lora_b[...]))
    delta.save(str(path))
    return delta


def test_inherit_reproduces_source_delta_and_records_compression(tmp_path):
    source = tiny()
    _trained_lora(source, tmp_path / "lora")
    want = np.asarray(source(IDS))
    # inherited onto an uncompressed copy: the same output
    plain = tiny()
    cd.inherit(str(tmp_path / "lora"), plain)
    np.testing.assert_allclose(np.asarray(plain(IDS)), want, atol=1e-6)
    # onto a quantized copy (ordinary load refuses: the structure changed)
    comp = tiny()
    cc.quantize(comp, bits=8)
    with pytest.raises(DeltaError, match="different backbone"):
        cd.load(comp, str(tmp_path / "lora"))
    delta = cd.inherit(str(tmp_path / "lora"), comp)
    assert np.abs(np.asarray(comp(IDS)) - want).max() < 0.05
    meta = __import__("json").loads(delta.modules()[0][1].meta)
    assert meta["compression"][0]["kind"] == "quantize"
    assert meta["inherited_from"].endswith("lora")
    # recovery beside the inherited LoRA, on a pruned + MoEfied model
    other = tiny()
    cc.prune(other, 0.5, "2:4")
    cc.moefy(other, 4, 4)
    cd.inherit(str(tmp_path / "lora"), other)
    cd.attach(other, "recovery", targets=[nnx.Linear],
              exclude=["lm_head", "router"], name="rec", r=2)
    assert set(cd.active_names(other)) == {"default", "rec"}


def test_inherit_refuses_a_different_backbone(tmp_path):
    _trained_lora(tiny(), tmp_path / "lora")
    with pytest.raises(DeltaError, match="hidden_size"):
        cd.inherit(str(tmp_path / "lora"), tiny(hidden_size=64, intermediate_size=64))


# ------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize("call,match", [
    (lambda m: cc.quantize(m, bits=3), "bits must be 8 or 4"),
    (lambda m: cc.quantize(m, bits=4, group_size=5), "group_size=5"),
    (lambda m: cc.prune(m, 0.0), "sparsity"),
    (lambda m: cc.prune(m, 1.0), "sparsity"),
    (lambda m: cc.prune(m, 0.3, "2:4"), "contradicts"),
    (lambda m: cc.prune(m, 0.5, "4:2"), "N:M"),
    (lambda m: cc.prune(m, 0.5, criterion="taylor"), "criterion"),
    (lambda m: cc.prune(m, 0.5, criterion="wanda"), "calibration"),
    (lambda m: cc.moefy(m, 4, 5), "top_k=5 exceeds num_experts=4"),
    (lambda m: cc.moefy(m, 5, 1, CALIB), "does not divide"),
    (lambda m: cc.moefy(m, 4, 2), "calibration"),
])
def test_bad_input_is_typed_and_changes_nothing(call, match):
    model = tiny()
    before = jax.tree.map(np.asarray, nnx.state(model, nnx.Param))
    with pytest.raises(CompressionError, match=match):
        call(model)
    after = jax.tree.map(np.asarray, nnx.state(model, nnx.Param))
    assert jax.tree.all(jax.tree.map(np.array_equal, before, after))
    assert cc.compression_of(model) == []


def test_two_four_on_an_input_dim_not_divisible_by_four():
    model = tiny(intermediate_size=50)
    with pytest.raises(CompressionError, match=r"mlp\.down_proj.*divisible by 4"):
        cc.prune(model, 0.5, "2:4")
    assert cc.masks(model) == {}


def test_train_step_with_lora_on_a_pruned_quantized_model():
    """cpmjax train's own step (as ``--delta lora`` runs it): masks and integers unchanged."""
    from cpmjax.train.step import make_train_step

    model = tiny()
    cc.prune(model, 0.5, "2:4")
    pruned = np.asarray(kernel(model).kernel[...])
    cc.quantize(model, bits=4, group_size=16)
    ints = np.asarray(kernel(model).kernel[...].astype(jnp.int8))
    assert np.all(ints[pruned == 0] == 0)  # zeros quantize to zero
    delta = cd.attach(model, "lora", r=2)
    wrt = cd.trainable(model)
    opt = nnx.Optimizer(model, optax.adam(1e-2), wrt=wrt)
    graphdef, state = nnx.split((model, opt))
    b, s = IDS.shape
    batch = {"input_ids": IDS, "targets": jnp.roll(IDS, -1, 1),
             "positions": jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s)),
             "segment_ids": jnp.ones((b, s), jnp.int32), "loss_mask": jnp.ones((b, s), bool)}
    before = {p: np.asarray(m.lora_b[...]) for p, m in delta.modules()}
    state, metrics = jax.jit(make_train_step(graphdef, wrt, chunk=12))(state, batch)
    nnx.update((model, opt), state)
    assert np.isfinite(float(metrics["loss"]))
    assert any(not np.array_equal(before[p], np.asarray(m.lora_b[...]))
               for p, m in delta.modules())
    np.testing.assert_array_equal(np.asarray(kernel(model).kernel[...].astype(jnp.int8)), ints)
    with pytest.raises(CompressionError, match="quantized kernel"):
        cd.merge(model, delta)  # a float LoRA cannot be folded into integers
    np.testing.assert_array_equal(np.asarray(kernel(model).kernel[...].astype(jnp.int8)), ints)
