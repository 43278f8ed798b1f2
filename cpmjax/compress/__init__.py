"""Compressing a model for CPET: pruning (unstructured, N:M, whole MLP neurons; magnitude or
Wanda), MoEfication, and weight-only quantization (int8 / int4 / NF4 through qwix). Every function works in place on a
``cpmjax.models.CausalLM`` (with or without deltas attached), checks its arguments before any
compute (``cpmjax.errors.CompressionError``), and appends what it did to ``model.compression``.

    cpmjax.compress.prune(model, 0.5, "2:4", "wanda", calibration=ids)
    cpmjax.compress.prune_neurons(model, 0.25)            # structured: whole MLP neurons
    cpmjax.compress.moefy(model, num_experts=8, top_k=4, calibration=ids)
    cpmjax.compress.quantize(model, bits=4, group_size=32)
    cpmjax.compress.save_quantized(model, "out/int4"); cpmjax.compress.load_quantized("out/int4")
    cpmjax.delta.inherit("out/lora", model)      # the uncompressed model's LoRA, inherited

See docs/compress.md.
"""

from cpmjax.compress._common import DEFAULT_EXCLUDE, compression_of
from cpmjax.compress.moefy import MoEfiedMLP, balanced_kmeans, moefy
from cpmjax.compress.prune import (
    PruneMask,
    apply_masks,
    masks,
    neuron_scores,
    prune,
    prune_neurons,
)
from cpmjax.compress.quantize import (
    QuantizedKernel,
    QuantizedLinear,
    QuantScale,
    dequantize,
    load_quantized,
    quantize,
    quantized_modules,
    save_quantized,
    weight_bytes,
)

__all__ = [
    "DEFAULT_EXCLUDE",
    "MoEfiedMLP",
    "PruneMask",
    "QuantScale",
    "QuantizedKernel",
    "QuantizedLinear",
    "apply_masks",
    "balanced_kmeans",
    "compression_of",
    "dequantize",
    "load_quantized",
    "masks",
    "moefy",
    "neuron_scores",
    "prune",
    "prune_neurons",
    "quantize",
    "quantized_modules",
    "save_quantized",
    "weight_bytes",
]
