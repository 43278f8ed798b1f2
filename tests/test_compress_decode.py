"""Quantized models in the decoding paths and under the recovery delta's defaults: speculative
decoding (EAGLE-2 on int8, FR-Spec on grouped int4) gives exactly the model's own vanilla greedy
output, the ring prefill of int8 and int4 models and the exact-limit APB prefill of an int4
model equal their local prefill, and ``"recovery"`` attached with its default targets finds every projection of a quantized model (and the same
ones on the float model) and is the identity at init."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import minicpm_hf_dict

import cpmjax
import cpmjax.compress as cc
import cpmjax.delta as cd
from cpmjax.generate import Speculative
from cpmjax.generate.eagle import new_draft
from cpmjax.models import CausalLM, ModelConfig
from sharding.mesh import make_mesh

SPEC = dict(depth=3, top_k=3, total_tokens=8)
PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def tiny(seed: int = 0) -> CausalLM:
    config = ModelConfig.from_hf_dict(minicpm_hf_dict(max_position_embeddings=128))
    return CausalLM(config, rngs=nnx.Rngs(seed))


@pytest.mark.parametrize("bits,group_size,method", [(8, None, "eagle2"), (4, 16, "frspec")],
                         ids=["int8-eagle2", "int4-g16-frspec"])
def test_speculative_greedy_equals_vanilla_greedy_of_the_quantized_model(bits, group_size,
                                                                         method):
    model = tiny()
    cc.quantize(model, bits=bits, group_size=group_size)
    draft = new_draft(model, seed=1)
    rng = np.random.RandomState(3)
    prompts = [rng.randint(3, 96, n).tolist() for n in (21, 14)]
    vanilla = cpmjax.generate(model, prompts, 10)
    kw = {"vocab_subset": np.arange(48)} if method == "frspec" else {}
    spec = cpmjax.generate(model, prompts, 10,
                           speculative=Speculative(draft=draft, method=method, **kw, **SPEC))
    np.testing.assert_array_equal(spec.tokens, vanilla.tokens)
    np.testing.assert_array_equal(spec.lengths, vanilla.lengths)
    assert spec.stats.cycles > 0


# int4 weights replicated over the mesh travel as int8 (JAX on CPU drops the packed 4-bit layout
# of arrays placed on a mesh; generate's on_mesh widens them), so the ring prefill takes them too
@pytest.mark.parametrize("bits", [8, 4])
def test_ring_prefill_of_a_quantized_model_equals_local(bits):
    model = tiny()
    cc.quantize(model, bits=bits)
    rng = np.random.RandomState(5)
    prompts = rng.randint(3, 96, (2, 32))
    local = cpmjax.generate(model, prompts, 6)
    ring = cpmjax.generate(model, prompts, 6, prefill="ring", mesh=make_mesh(sequence=4))
    np.testing.assert_array_equal(ring.tokens, local.tokens)


def test_apb_prefill_of_an_int4_model_in_its_exact_limit_equals_local():
    """APB with no anchor, whole blocks passed and every entry kept is exact causal attention,
    so an int4 model decodes the same tokens as with its local prefill."""
    model = tiny()
    cc.quantize(model, bits=4, group_size=16)
    prompts = np.random.RandomState(6).randint(3, 96, (2, 32))
    local = cpmjax.generate(model, prompts, 6)
    apb = cpmjax.generate(model, prompts, 6, prefill="apb", mesh=make_mesh(sequence=4),
                          prefill_options={"anchor_len": 0, "passing_len": 8,
                                           "scorer": lambda q, k, v, *, query:
                                           jnp.zeros(k.shape[:3])})
    np.testing.assert_array_equal(apb.tokens, local.tokens)


def test_recovery_default_targets_find_quantized_projections_and_start_as_identity():
    ids = jnp.asarray(np.random.RandomState(0).randint(3, 96, (2, 12)))
    float_model, model = tiny(), tiny()
    cc.quantize(model, bits=4, group_size=16)
    before = model(ids)
    handles = {}
    for name, m in (("float", float_model), ("quantized", model)):
        handles[name] = cd.attach(m, "recovery", name="rec", r=4)
    paths = {name: sorted(h.sites) for name, h in handles.items()}
    expected = sorted(f"model.layers.{i}.{'mlp' if p in PROJECTIONS[4:] else 'self_attn'}.{p}"
                      for i in range(2) for p in PROJECTIONS)
    assert paths["quantized"] == expected
    assert paths["float"] == expected
    assert any(isinstance(cc.quantized_modules(model).get(p), cc.QuantizedLinear)
               for p in expected)
    np.testing.assert_allclose(np.asarray(model(ids)), np.asarray(before), atol=1e-6, rtol=0)
