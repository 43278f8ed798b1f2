"""Weight-only quantization of the decoder's linear layers, with qwix doing the arithmetic.

``quantize(model, bits, group_size)`` replaces each decoder ``nnx.Linear`` (kernel ``[in,
out]``) by a ``QuantizedLinear``: ``qwix.quantize`` computes symmetric absmax scales, per output
channel (``group_size=None``) or per group of ``group_size`` input rows of each output channel,
and the integer values; the layer calls ``qwix.dequantize`` and a float matmul. Per element
the error is at most half a step: ``|w - dq(w)| <= scale / 2`` with ``scale = absmax /
qmax`` of the channel or group (qwix takes qmax = 127.5 for int8, 7.5 for int4: the
absmax lands half a step past the last level and is clipped to it). NF4 (``bits="nf4"``,
qwix's ``"nf4"`` qtype) rounds ``w / absmax`` to the nearest of 16 fixed levels in [-1, 1]: the
error is at most ``absmax * NF4_HALF_GAP`` (half the widest gap, 1 - 0.7230, so 0.1385).

Why not ``qwix.quantize_model`` (its PTQ provider does quantize these models: int8 logits
within 1e-3 on the tiny test model): it intercepts only the model's top-level call method,
clones the model, and swaps each kernel for a value that is not an NNX variable. Deltas could
then neither find the linear layers (``cpmjax.delta`` reads ``kernel`` shapes) nor be attached
after quantizing, and ``model.head_weight()`` / ``model.embed()`` callers are not intercepted.
A module of our own keeps the layer addressable and holds qwix's integers and scales.

The integers (``kernel``, a ``QuantizedKernel`` variable, not a parameter: optimizers skip it)
and scales are saved with ``save_quantized`` (safetensors + ``quantization.json``) and read
with ``load_quantized``; a mismatched config raises ``QuantizedCheckpointError``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import qwix
from flax import nnx

from cpmjax.compress._common import (
    DEFAULT_EXCLUDE,
    compression_of,
    decoder_linears,
    modules,
    record,
    set_child,
)
from cpmjax.errors import CompressionError, MissingPathError, QuantizedCheckpointError
from cpmjax.safetensors_io import atomic_directory, read_tensors, save_file

QTYPES: dict[Any, Any] = {8: jnp.int8, 4: jnp.int4, "nf4": "nf4"}
QMAX: dict[Any, float] = {8: 127.5, 4: 7.5, "nf4": 1.0}
#: NF4's 16 levels (QLoRA, Appendix E; qwix's table): normal quantiles scaled to [-1, 1]
NF4_LEVELS = (-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
              -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
              0.07958029955625534, 0.16093020141124725, 0.24611230194568634,
              0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
              0.7229568362236023, 1.0)
#: NF4's worst rounding error in units of the scale (absmax): half the widest gap of the levels
NF4_HALF_GAP = max(b - a for a, b in zip(NF4_LEVELS, NF4_LEVELS[1:], strict=False)) / 2
SUB_BYTE = (jnp.int4, jnp.uint4)
FORMAT = "cpmjax-quantized"
WEIGHTS = "model.safetensors"
CONFIG = "quantization.json"


class QuantizedKernel(nnx.Variable):
    """Integer kernel values ``[in, out]`` (int8 or int4), not trainable and read-only:
    writing (``set_value``, ``kernel[...] = w``; e.g. merging a LoRA into it, which would cast
    float weights to integers) raises ``CompressionError``. NNX's own state updates (jit,
    ``nnx.update``) do not go through ``set_value`` and keep working."""

    def set_value(self, value: Any, **kwargs: Any) -> None:
        raise CompressionError(
            "cannot write into a quantized kernel (would cast float weights to integers): "
            "merge deltas before quantizing, or keep them as deltas"
        )


class QuantScale(nnx.Variable):
    """float32 scales ``[1, out]`` (per channel) or ``[in / group_size, out]`` (grouped)."""


class QuantizedLinear(nnx.Module):
    """A weight-only quantized ``nnx.Linear``: ``y = x @ dequantize(kernel, scale) + bias``."""

    def __init__(self, base: nnx.Linear, bits: int, group_size: int | None):
        w = base.kernel[...]
        tiled = {0: group_size} if group_size else None
        q = qwix.quantize(w.astype(jnp.float32), QTYPES[bits], channelwise_axes=(1,),
                          tiled_axes=tiled)
        axes = getattr(base.kernel, "logical_axes", None)
        meta = {"logical_axes": axes} if axes else {}
        self.kernel = QuantizedKernel(q.qvalue, **meta)
        self.kernel_scale = QuantScale(q.scale.astype(jnp.float32))
        self.bias = base.bias
        self.in_features, self.out_features = int(w.shape[0]), int(w.shape[1])
        self.bits, self.group_size = bits, group_size
        self.dtype = base.dtype
        self.param_dtype = w.dtype
        mask = getattr(base, "prune_mask", None)
        if mask is not None:
            self.prune_mask = mask

    def dequantized(self) -> jax.Array:
        """The kernel ``[in, out]`` in float32."""
        q = qwix.QArray(self.kernel[...], self.kernel_scale[...], qtype=QTYPES[self.bits])
        return qwix.dequantize(q)

    def __call__(self, x: jax.Array) -> jax.Array:
        dtype = self.dtype or x.dtype
        y = jnp.dot(x.astype(dtype), self.dequantized().astype(dtype))
        if self.bias is not None:
            y = y + self.bias[...].astype(dtype)
        return y


def _check(bits: Any, group_size: Any) -> None:
    if isinstance(bits, bool) or bits not in QMAX:
        raise CompressionError(f"bits must be 8 or 4 (or 'nf4': 4-bit NormalFloat), got "
                               f"{bits!r}")
    if group_size is not None and (isinstance(group_size, bool) or not isinstance(
            group_size, int) or group_size < 1):
        raise CompressionError(f"group_size must be None or a positive int, got {group_size!r}")


def quantize(model: nnx.Module, bits: int = 8, group_size: int | None = None,
             exclude: Sequence[str] = DEFAULT_EXCLUDE) -> list[str]:
    """Quantize the decoder's linear kernels of ``model`` in place, weight-only.

    ``bits`` 8, 4 or ``"nf4"`` (4-bit NormalFloat: 16 normal-quantile levels times the absmax
of the channel or group, stored as uint4 level indices); ``group_size`` ``None`` (one scale per output channel) or the number of
    input rows sharing a scale (must divide every kernel's input dimension); ``exclude``:
    regular expressions over module paths (embeddings and head are excluded by default).
    Deltas attached before or after stay attached. Returns the quantized module paths."""
    _check(bits, group_size)
    targets = decoder_linears(model, exclude)
    if not targets:
        raise CompressionError(f"no float linear module of {type(model).__name__} to quantize "
                               f"(exclude={list(exclude)}; already quantized?)")
    if group_size:
        for path, module, _, _ in targets:
            if module.kernel.shape[0] % group_size:
                raise CompressionError(f"group_size={group_size} does not divide the input "
                                       f"dimension of {path} (kernel {module.kernel.shape})")
    for _, module, parent, key in targets:
        set_child(parent, key, QuantizedLinear(module, bits, group_size))
    paths = [p for p, _, _, _ in targets]
    record(model, "quantize", bits=bits, group_size=group_size, exclude=list(exclude),
           modules=paths)
    return paths


def quantized_modules(model: nnx.Module) -> dict[str, QuantizedLinear]:
    return {p: m for p, m, _, _ in modules(model) if isinstance(m, QuantizedLinear)}


def dequantize(model: nnx.Module) -> list[str]:
    """Undo ``quantize`` as a format, not as a rounding: replace every ``QuantizedLinear`` of
    ``model`` by an ``nnx.Linear`` whose kernel is its dequantized kernel (``dequantized()`` cast
    to the layer's original parameter dtype), in place, keeping bias and prune mask. The model
    then computes what the quantized model computes (the same float matmul of the same
    dequantized values) and exports with ``cpmjax.hf.save_pretrained`` as a float checkpoint
    that any HF reader loads: the way to measure a quantized model with tools that take HF
    checkpoints (``cpmjax scaling density``). Returns the module paths replaced."""
    targets = [(p, m, parent, key) for p, m, parent, key in modules(model)
               if isinstance(m, QuantizedLinear)]
    if not targets:
        raise CompressionError(f"{type(model).__name__} has no quantized layer to dequantize")
    for _, module, parent, key in targets:
        axes = getattr(module.kernel, "logical_axes", None)
        meta = {"logical_axes": axes} if axes else {}
        linear = nnx.Linear(module.in_features, module.out_features,
                            use_bias=module.bias is not None, dtype=module.dtype,
                            param_dtype=module.param_dtype, rngs=nnx.Rngs(0))
        linear.kernel = nnx.Param(module.dequantized().astype(module.param_dtype), **meta)
        if module.bias is not None:
            linear.bias = module.bias
        mask = getattr(module, "prune_mask", None)
        if mask is not None:
            linear.prune_mask = mask
        set_child(parent, key, linear)
    paths = [p for p, _, _, _ in targets]
    record(model, "dequantize", modules=paths)
    return paths


def weight_bytes(model: nnx.Module) -> int:
    """Bytes of all weights, integers counted at their logical width (int4 = half a byte)."""
    total = 0
    for _, var in nnx.to_flat_state(nnx.state(model, nnx.Variable)):
        arr = var[...]
        if not hasattr(arr, "dtype") or not hasattr(arr, "size"):
            continue
        bits = 4 if arr.dtype in SUB_BYTE else arr.dtype.itemsize * 8
        total += (arr.size * bits + 7) // 8
    return int(total)


# ----------------------------------------------------------------------------------------------
# checkpoints
def _flat(model: nnx.Module) -> dict[str, nnx.Variable]:
    from cpmjax.delta import DeltaParam

    return {".".join(str(p) for p in path): var
            for path, var in nnx.to_flat_state(nnx.state(model, nnx.Variable))
            if not isinstance(var, DeltaParam) and hasattr(var[...], "shape")}


def _quant_config(model: nnx.Module) -> dict[str, Any]:
    steps = [s for s in compression_of(model) if s["kind"] == "quantize"]
    if not steps:
        raise QuantizedCheckpointError(f"{type(model).__name__} is not quantized")
    config = getattr(model, "config", None)
    return {"format": FORMAT, "bits": steps[-1]["bits"], "group_size": steps[-1]["group_size"],
            "exclude": steps[-1]["exclude"], "modules": sorted(quantized_modules(model)),
            "compression": compression_of(model),
            "model_config": config.to_hf_dict() if hasattr(config, "to_hf_dict") else None}


def save_quantized(model: nnx.Module, path: str) -> str:
    """Write a quantized model (its backbone, without deltas) to directory ``path``:
    ``model.safetensors`` (int4 stored as int8, NF4 level indices as uint8) + ``quantization.json``; atomic."""
    config = _quant_config(model)
    tensors = {}
    for name, var in _flat(model).items():
        arr = var[...]
        if arr.dtype == jnp.int4:
            arr = arr.astype(jnp.int8)
        elif arr.dtype == jnp.uint4:  # NF4 level indices
            arr = arr.astype(jnp.uint8)
        tensors[name] = np.asarray(arr)
    with atomic_directory(path) as tmp:
        save_file(tensors, os.path.join(tmp, WEIGHTS), metadata={"format": FORMAT})
        with open(os.path.join(tmp, CONFIG), "w") as f:
            json.dump(config, f, indent=2, default=str)
    return path


def load_quantized(path: str, model: nnx.Module | None = None, *, bits: int | None = None,
                   group_size: int | None = None) -> nnx.Module:
    """Read a checkpoint of ``save_quantized``. ``model``: a float model of the same config
    (default: a fresh ``CausalLM`` from the saved config) which is quantized with the saved
    settings and then filled. ``bits`` / ``group_size`` given, or a ``model`` already quantized
    differently, must match the saved config, else ``QuantizedCheckpointError``."""
    cfg_file, weights = os.path.join(path, CONFIG), os.path.join(path, WEIGHTS)
    for file in (cfg_file, weights):
        if not os.path.isfile(file):
            raise MissingPathError(f"no quantized checkpoint at {path}: "
                                   f"{os.path.basename(file)} missing")
    with open(cfg_file) as f:
        cfg = json.load(f)
    if cfg.get("format") != FORMAT:
        raise QuantizedCheckpointError(f"{cfg_file} is not a cpmjax quantized checkpoint")
    for key, given in (("bits", bits), ("group_size", group_size)):
        if given is not None and given != cfg[key]:
            raise QuantizedCheckpointError(f"{path} was quantized with {key}={cfg[key]!r}, "
                                           f"asked for {key}={given!r}")
    if model is None:
        from cpmjax.models import CausalLM, ModelConfig

        model = CausalLM(ModelConfig.from_hf_dict(cfg["model_config"]), rngs=nnx.Rngs(0))
    config = getattr(model, "config", None)
    if cfg.get("model_config") and hasattr(config, "to_hf_dict"):
        here = config.to_hf_dict()
        diff = sorted(k for k in set(here) | set(cfg["model_config"])
                      if k not in ("torch_dtype", "dtype", "transformers_version")
                      and here.get(k) != cfg["model_config"].get(k))
        if diff:
            raise QuantizedCheckpointError(f"{path} holds a different model: config differs in "
                                           f"{diff[:6]}")
    have = quantized_modules(model)
    if have:
        mine = _quant_config(model)
        for key in ("bits", "group_size", "modules"):
            if mine[key] != cfg[key]:
                raise QuantizedCheckpointError(
                    f"the model is quantized with {key}={mine[key]!r}, {path} with "
                    f"{key}={cfg[key]!r}")
    else:
        quantize(model, cfg["bits"], cfg["group_size"], cfg["exclude"])
        if sorted(quantized_modules(model)) != cfg["modules"]:
            raise QuantizedCheckpointError(f"quantizing this model with {path}'s config "
                                           "selects different modules than were saved")
    tensors = read_tensors(weights)
    flat = _flat(model)
    missing, extra = sorted(set(flat) - set(tensors)), sorted(set(tensors) - set(flat))
    if missing or extra:
        raise QuantizedCheckpointError(f"{weights} does not fit the model: missing {missing[:4]}"
                                       f", unexpected {extra[:4]}")
    for name, var in flat.items():
        value = tensors[name]
        if tuple(value.shape) != tuple(var.shape):
            raise QuantizedCheckpointError(f"tensor {name} in {weights} has shape {value.shape},"
                                           f" the model needs {tuple(var.shape)}")
        var.set_raw_value(jnp.asarray(value).astype(var[...].dtype))
    return model
