"""Parity of cpmjax models with transformers (Llama, MiniCPM3) and with a torch MiniCPM reference,
plus export round trips and sharded loading."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from helpers import (
    TorchMiniCPM,
    minicpm_hf_dict,
    save_hf_model,
    tiny_llama_config,
    tiny_minicpm3_config,
    write_random_minicpm,
)
from transformers import AutoModelForCausalLM, LlamaForCausalLM, MiniCPM3ForCausalLM

import cpmjax
from cpmjax.models import ModelConfig

RTOL = 1e-4


def _ids(batch=2, seq=13, vocab=96, seed=0):
    return np.random.RandomState(seed).randint(0, vocab, (batch, seq))


def _assert_close(ours, ref, rtol=RTOL):
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    scale = np.abs(ref).max()
    err = np.abs(ours - ref).max()
    assert err <= rtol * scale, f"max abs err {err:.3g} vs scale {scale:.3g}"


def _hf_logits(model, ids):
    with torch.no_grad():
        return model(torch.as_tensor(ids)).logits.float().numpy()


LLAMA_VARIANTS = {
    "gqa_untied": dict(),
    "mha_tied": dict(num_key_value_heads=4, tie_word_embeddings=True),
    "llama3_rope": dict(rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                      "high_freq_factor": 4.0,
                                      "original_max_position_embeddings": 16}),
    "linear_rope": dict(rope_scaling={"rope_type": "linear", "factor": 2.0}),
    # max_position_embeddings below the sequence length so that the NTK base actually changes
    "dynamic_rope": dict(max_position_embeddings=8,
                         rope_scaling={"rope_type": "dynamic", "factor": 2.0}),
    "theta_bias": dict(rope_theta=500000.0, attention_bias=True, head_dim=12),
}


@pytest.mark.parametrize("variant", sorted(LLAMA_VARIANTS))
def test_llama_parity(tmp_path, variant):
    config = tiny_llama_config(**LLAMA_VARIANTS[variant])
    hf = save_hf_model(LlamaForCausalLM, config, tmp_path)
    model = cpmjax.from_pretrained(tmp_path)
    ids = _ids()
    _assert_close(model(jnp.asarray(ids)), _hf_logits(hf, ids))


MINICPM3_VARIANTS = {
    "tied": dict(),
    "untied_no_qlora": dict(tie_word_embeddings=False, q_lora_rank=None),
    # longrope: sequences of 13 tokens with original_max 8 take the long factors, 6 the short
    "longrope": dict(max_position_embeddings=32, rope_scaling={
        "rope_type": "longrope", "long_factor": [1.0, 2.5], "short_factor": [1.0, 1.5],
        "original_max_position_embeddings": 8}),
}


@pytest.mark.parametrize("variant", sorted(MINICPM3_VARIANTS))
def test_minicpm3_parity(tmp_path, variant):
    config = tiny_minicpm3_config(**MINICPM3_VARIANTS[variant])
    hf = save_hf_model(MiniCPM3ForCausalLM, config, tmp_path)
    model = cpmjax.from_pretrained(tmp_path)
    for seq in (13, 6):
        ids = _ids(seq=seq)
        _assert_close(model(jnp.asarray(ids)), _hf_logits(hf, ids))


@pytest.mark.parametrize("moe", [False, True])
def test_minicpm_parity_with_torch_reference(tmp_path, moe):
    overrides = dict(num_experts=4, num_experts_per_tok=2) if moe else {}
    write_random_minicpm(tmp_path, **overrides)
    ref = TorchMiniCPM(tmp_path)
    model = cpmjax.from_pretrained(tmp_path)
    assert model.config.model_type == "minicpm" and model.config.is_moe == moe
    ids = _ids()
    _assert_close(model(jnp.asarray(ids)), ref(ids))


def test_minicpm_reads_hub_layout(tmp_path):
    """Hub MiniCPM checkpoints carry rope_scaling with 'type' and sometimes a tied lm_head."""
    write_random_minicpm(tmp_path)
    with open(tmp_path / "config.json") as f:
        cfg = json.load(f)
    cfg.pop("rope_parameters")
    cfg["rope_scaling"] = {"type": "dynamic", "factor": 4.0}
    with open(tmp_path / "config.json", "w") as f:
        json.dump(cfg, f)
    config = ModelConfig.from_pretrained(tmp_path)
    assert config.rope_type == "dynamic" and config.rope_scaling["factor"] == 4.0
    model = cpmjax.from_pretrained(tmp_path)
    assert model(jnp.asarray(_ids())).shape == (2, 13, 96)


def test_rope_parameters_and_legacy_keys_agree():
    legacy = ModelConfig.from_hf_dict(dict(
        model_type="llama", hidden_size=32, num_attention_heads=4, rope_theta=5e5,
        rope_scaling={"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 16}))
    new = ModelConfig.from_hf_dict(dict(
        model_type="llama", hidden_size=32, num_attention_heads=4,
        rope_parameters={"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0,
                         "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 16}))
    assert legacy.rope_theta == new.rope_theta == 5e5
    assert legacy.rope_scaling == new.rope_scaling
    assert ModelConfig.from_hf_dict(new.to_hf_dict()) == new


@pytest.mark.parametrize("family", ["llama", "minicpm3"])
def test_export_roundtrip_loads_in_transformers(tmp_path, family):
    if family == "llama":
        hf = save_hf_model(LlamaForCausalLM, tiny_llama_config(), tmp_path / "src")
    else:
        hf = save_hf_model(MiniCPM3ForCausalLM, tiny_minicpm3_config(), tmp_path / "src")
    model = cpmjax.from_pretrained(tmp_path / "src")
    cpmjax.save_pretrained(model, tmp_path / "out")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    ids = _ids()
    np.testing.assert_allclose(_hf_logits(reloaded, ids), _hf_logits(hf, ids), rtol=0, atol=0)
    _assert_close(model(jnp.asarray(ids)), _hf_logits(reloaded, ids))


def test_minicpm_export_roundtrip_and_sharded_checkpoint(tmp_path):
    original = write_random_minicpm(tmp_path / "a", num_experts=2)
    cpmjax.save_pretrained(original, tmp_path / "b", max_shard_bytes=20_000)
    assert os.path.isfile(tmp_path / "b" / "model.safetensors.index.json")
    reloaded = cpmjax.from_pretrained(tmp_path / "b")
    ids = jnp.asarray(_ids())
    np.testing.assert_array_equal(np.asarray(original(ids)), np.asarray(reloaded(ids)))


def test_bfloat16_load_close_to_float32(tmp_path):
    save_hf_model(LlamaForCausalLM, tiny_llama_config(), tmp_path)
    ids = jnp.asarray(_ids())
    f32 = np.asarray(cpmjax.from_pretrained(tmp_path, dtype="float32")(ids))
    bf16_model = cpmjax.from_pretrained(tmp_path, dtype="bfloat16")
    assert bf16_model.model.embed_tokens.embedding[...].dtype == jnp.bfloat16
    out = bf16_model(ids)
    assert out.dtype == jnp.float32
    _assert_close(out, f32, rtol=5e-2)


def test_sharded_load_on_8_devices(tmp_path):
    from sharding.mesh import make_mesh

    assert jax.device_count() == 8
    hf = save_hf_model(LlamaForCausalLM, tiny_llama_config(), tmp_path)
    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    model = cpmjax.from_pretrained(tmp_path, mesh=mesh)
    q_kernel = model.model.layers[0].self_attn.q_proj.kernel[...]
    assert q_kernel.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
    assert len(q_kernel.addressable_shards) == 8
    assert q_kernel.addressable_shards[0].data.shape == (16, 16)
    ids = _ids(batch=4)
    _assert_close(model(jnp.asarray(ids)), _hf_logits(hf, ids))


@pytest.mark.parametrize("mla", [False, True], ids=["gqa", "mla"])
def test_layers_pass_their_index_through_the_attention_seam(mla):
    """Every decoder layer calls ops.attention with layer=i (in order), so per-layer backends
    (APB's retaining heads) need no call counting."""
    from flax import nnx

    from cpmjax import ops
    from cpmjax.models import CausalLM

    hf = (tiny_minicpm3_config(num_hidden_layers=3).to_dict() if mla
          else minicpm_hf_dict(num_hidden_layers=3))
    model = CausalLM(ModelConfig.from_hf_dict(hf), rngs=nnx.Rngs(0))
    seen = []

    def record(fn):
        def wrapped(q, k, v, **kw):
            seen.append(kw.get("layer"))
            return fn(q, k, v, **kw)
        return wrapped

    with ops.attention_transform(record):
        model(_ids(batch=1, seq=5))
    assert seen == list(range(model.config.num_hidden_layers))
