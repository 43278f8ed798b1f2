"""NF4 weight-only quantization (qwix's ``"nf4"`` qtype behind ``quantize(bits="nf4")``): the
rounding error within half the widest gap of the NF4 levels times each group's absmax, only NF4
levels used, half a byte per weight, and a save / load round trip."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import minicpm_hf_dict

import cpmjax.compress as cc
from cpmjax.compress.quantize import NF4_HALF_GAP, NF4_LEVELS
from cpmjax.errors import CompressionError, QuantizedCheckpointError
from cpmjax.models import CausalLM, ModelConfig

IDS = jnp.asarray(np.random.RandomState(0).randint(3, 96, (2, 12)))


def tiny() -> CausalLM:
    return CausalLM(ModelConfig.from_hf_dict(minicpm_hf_dict()), rngs=nnx.Rngs(0))


@pytest.mark.parametrize("group_size", [None, 16])
def test_nf4_error_within_half_the_widest_level_gap(group_size):
    dense = nnx.Linear(32, 48, rngs=nnx.Rngs(1))
    w = np.asarray(dense.kernel[...], np.float64)
    layer = cc.QuantizedLinear(dense, "nf4", group_size)
    assert layer.kernel[...].dtype == jnp.uint4
    deq = np.asarray(layer.dequantized(), np.float64)
    rows = group_size or 32
    absmax = np.abs(w.reshape(32 // rows, rows, 48)).max(axis=1)            # [groups, out]
    bound = np.repeat(absmax, rows, axis=0) * NF4_HALF_GAP
    err = np.abs(deq - w)
    assert np.all(err <= bound * (1 + 1e-5) + 1e-7), float((err / bound).max())
    assert float((err / bound).max()) > 0.3  # the bound is not vacuous
    # every dequantized value is an NF4 level times its group's absmax
    levels = np.asarray(NF4_LEVELS)
    ratio = deq / np.repeat(absmax, rows, axis=0)
    assert np.abs(ratio[..., None] - levels).min(axis=-1).max() < 1e-5
    x = jax.random.normal(jax.random.key(2), (3, 32))
    np.testing.assert_allclose(np.asarray(layer(x)), np.asarray(x) @ deq + np.asarray(
        dense.bias[...]), rtol=1e-4, atol=1e-5)


def test_nf4_model_half_a_byte_per_weight_and_round_trip(tmp_path):
    model = tiny()
    before = cc.weight_bytes(model)
    cc.quantize(model, bits="nf4", group_size=16)
    kernels = sum(m.in_features * m.out_features for m in cc.quantized_modules(model).values())
    saved = kernels * 4 - kernels // 2  # float32 -> half a byte per weight
    scales = sum(m.kernel_scale[...].size * 4 for m in cc.quantized_modules(model).values())
    assert cc.weight_bytes(model) == before - saved + scales
    logits = model(IDS)
    cc.save_quantized(model, str(tmp_path / "nf4"))
    again = cc.load_quantized(str(tmp_path / "nf4"))
    np.testing.assert_array_equal(np.asarray(again(IDS)), np.asarray(logits))
    with pytest.raises(QuantizedCheckpointError, match="bits"):
        cc.load_quantized(str(tmp_path / "nf4"), bits=4)


def test_bad_bits_name_nf4():
    with pytest.raises(CompressionError, match="'nf4'"):
        cc.quantize(tiny(), bits="nf3")



@pytest.mark.parametrize("bits", [8, 4, "nf4"])
def test_dequantize_exports_what_the_quantized_model_computes(tmp_path, bits):
    from cpmjax.hf import from_pretrained, save_pretrained

    model = tiny()
    float_logits = np.asarray(model(IDS))
    cc.quantize(model, bits=bits, group_size=16)
    quantized_logits = np.asarray(model(IDS))
    paths = cc.dequantize(model)
    assert paths and not cc.quantized_modules(model)
    assert cc.compression_of(model)[-1]["kind"] == "dequantize"
    np.testing.assert_allclose(np.asarray(model(IDS)), quantized_logits, rtol=1e-5, atol=1e-5)
    save_pretrained(model, str(tmp_path / "hf"))
    again = from_pretrained(str(tmp_path / "hf"), dtype="float32")
    np.testing.assert_allclose(np.asarray(again(IDS)), quantized_logits, rtol=1e-5, atol=1e-5)
    assert np.abs(quantized_logits - float_logits).max() > 1e-4  # the rounding is kept
    with pytest.raises(CompressionError, match="no quantized layer"):
        cc.dequantize(model)
