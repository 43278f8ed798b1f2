"""HF checkpoints in and out: ``config.json`` + safetensors <-> a ``CausalLM``.

One generic mechanism maps our parameter paths to HF tensor names for every family:

- ``<module>.kernel [in, out]``   <-> ``<module>.weight [out, in]`` (transposed)
- ``<module>.embedding``          <-> ``<module>.weight``
- ``<module>.scale`` (RMSNorm)    <-> ``<module>.weight``
- ``<module>.bias``               <-> ``<module>.bias``
- MoE stacked experts ``mlp.w_gate [E, h, i]`` <-> ``mlp.experts.{e}.gate_proj.weight [i, h]``
  (likewise ``w_up`` / ``up_proj`` and ``w_down`` / ``down_proj``)

Weights are read with safetensors only (never pickle), from ``model.safetensors`` or a sharded
``model.safetensors.index.json``; every tensor is checked: a missing, unexpected or mis-shaped
tensor raises a typed error naming it (and both shapes).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from cpmjax.errors import (
    CheckpointError,
    ConfigError,
    MissingPathError,
    MissingTensorError,
    ShapeMismatchError,
    UnexpectedTensorError,
)
from cpmjax.models import CausalLM, ModelConfig
from cpmjax.safetensors_io import TensorFiles, atomic_directory, save_file, write_sharded

SAFE_WEIGHTS = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
# Tensors some checkpoints carry that hold no parameters (RoPE buffers).
_IGNORED = re.compile(r".*rotary_emb\.inv_freq$")
_MOE_STACKED = {"w_gate": "gate_proj", "w_up": "up_proj", "w_down": "down_proj"}


_DTYPES = {"bfloat16": jnp.bfloat16, "float32": jnp.float32, "float16": jnp.float16}


def as_dtype(value: str | Any) -> Any:
    """A dtype from its name (``"bfloat16"``, ``"float32"``, ``"float16"``: the
    ``torch_dtype`` names of config.json) or a dtype given as is."""
    if isinstance(value, str):
        if value not in _DTYPES:
            raise ConfigError(f"dtype {value!r} is not one of {sorted(_DTYPES)}")
        return _DTYPES[value]
    return value


# ----------------------------------------------------------------------------------------------
# names
def _path_str(path: tuple[Any, ...]) -> str:
    return ".".join(str(p) for p in path)


def hf_names(our_name: str, shape: tuple[int, ...]) -> list[tuple[str, str]]:
    """HF tensor names for one of our parameters, each with its transform kind
    (``"t"``: transpose of a 2-D kernel, ``"id"``: as is, ``"moe_t"``: one expert's slice,
    transposed)."""
    prefix, leaf = our_name.rsplit(".", 1)
    if leaf in _MOE_STACKED:
        hf_leaf = _MOE_STACKED[leaf]
        return [(f"{prefix}.experts.{e}.{hf_leaf}.weight", "moe_t") for e in range(shape[0])]
    if leaf == "kernel":
        return [(f"{prefix}.weight", "t")]
    if leaf in ("embedding", "scale"):
        return [(f"{prefix}.weight", "id")]
    if leaf == "bias":
        return [(f"{prefix}.bias", "id")]
    raise CheckpointError(f"no HF name rule for parameter {our_name}")


def _expected_hf_shape(kind: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    if kind == "t":
        return tuple(reversed(shape))
    if kind == "moe_t":
        return (shape[2], shape[1])
    return tuple(shape)


# ----------------------------------------------------------------------------------------------
# reading
def _tensor_source(path: str) -> TensorFiles:
    """The checkpoint's tensors, read lazily (as jax arrays) from one file or a sharded index."""
    return TensorFiles(path, weights_name=SAFE_WEIGHTS, index_name=SAFE_INDEX, framework="flax")


def _abstract_model(config: ModelConfig, dtype: Any) -> CausalLM:
    return nnx.eval_shape(lambda: CausalLM(config, dtype=dtype, param_dtype=dtype,
                                           rngs=nnx.Rngs(0)))


def from_pretrained(
    path: str | os.PathLike,
    dtype: str | Any = "float32",
    mesh: jax.sharding.Mesh | None = None,
    rules: Any = None,
) -> CausalLM:
    """Load a local HF checkpoint directory into a ``CausalLM``.

    ``dtype`` is the dtype of parameters and activations (``"bfloat16"`` or ``"float32"``).
    With ``mesh=``, every parameter is placed by the logical-axis rules of ``sharding.mesh``.
    """
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise MissingPathError(f"checkpoint directory does not exist: {path}")
    config = ModelConfig.from_pretrained(path)
    dtype = as_dtype(dtype)
    source = _tensor_source(path)
    model = _abstract_model(config, dtype)
    graphdef, state = nnx.split(model)
    flat = nnx.to_flat_state(state)
    used: set[str] = set()
    shardings = None
    if mesh is not None:
        from sharding.mesh import param_shardings

        shardings = param_shardings(model, mesh, rules)
    new_leaves = []
    available = set(source.names())
    for path_tuple, var in flat:
        name = _path_str(path_tuple)
        if not isinstance(var, nnx.Param):
            new_leaves.append((path_tuple, var))
            continue
        shape = tuple(var.shape)
        parts = []
        for hf_name, kind in hf_names(name, shape):
            if hf_name not in available:
                raise MissingTensorError(
                    f"tensor {hf_name} (for parameter {name}, shape "
                    f"{_expected_hf_shape(kind, shape)}) is missing from checkpoint {path}"
                )
            got = source.shape(hf_name)
            want = _expected_hf_shape(kind, shape)
            if got != want:
                raise ShapeMismatchError(
                    f"tensor {hf_name} in {path} has shape {got}, but config.json implies {want}"
                )
            tensor = jnp.asarray(source.get(hf_name))
            parts.append(tensor.T if kind in ("t", "moe_t") else tensor)
            used.add(hf_name)
        value = jnp.stack(parts) if len(parts) > 1 or parts[0].ndim != len(shape) else parts[0]
        value = value.astype(dtype)
        if shardings is not None:
            value = jax.device_put(value, shardings[name])
        new_leaves.append((path_tuple, var.replace(value)))
    extra = sorted(available - used)
    if config.tie_word_embeddings and "lm_head.weight" in extra:
        extra.remove("lm_head.weight")  # some tied checkpoints store the head anyway
    extra = [n for n in extra if not _IGNORED.match(n)]
    if extra:
        raise UnexpectedTensorError(
            f"checkpoint {path} has tensors the model does not use: {extra[:8]}"
            + (f" (and {len(extra) - 8} more)" if len(extra) > 8 else "")
        )
    state = nnx.from_flat_state(new_leaves)
    return nnx.merge(graphdef, state)


# ----------------------------------------------------------------------------------------------
# writing
def to_hf_tensors(model: CausalLM, dtype: Any = None) -> Iterator[tuple[str, np.ndarray]]:
    """Yield ``(hf_name, array)`` for every parameter (numpy; bfloat16 via ml_dtypes)."""
    for path_tuple, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        name = _path_str(path_tuple)
        value = var[...]
        if dtype is not None:
            value = value.astype(as_dtype(dtype))
        value = np.asarray(jax.device_get(value))
        for e, (hf_name, kind) in enumerate(hf_names(name, value.shape)):
            if kind == "t":
                yield hf_name, np.ascontiguousarray(value.T)
            elif kind == "moe_t":
                yield hf_name, np.ascontiguousarray(value[e].T)
            else:
                yield hf_name, np.ascontiguousarray(value)


def save_pretrained(
    model: CausalLM,
    path: str | os.PathLike,
    *,
    dtype: str | Any | None = None,
    max_shard_bytes: int = 5 * 1024**3,
) -> str:
    """Write an HF-layout directory (``config.json`` + safetensors, sharded with an index when
    larger than ``max_shard_bytes``) that transformers loads with identical logits.

    The directory is written beside the target and renamed into place, so a failure midway
    leaves any previous checkpoint at ``path`` untouched."""
    path = os.path.abspath(os.fspath(path))
    save_dtype = as_dtype(dtype) if dtype is not None else None
    value_dtype = save_dtype or model.model.embed_tokens.embedding[...].dtype
    hf_config = model.config.to_hf_dict()
    hf_config["torch_dtype"] = hf_config["dtype"] = str(jnp.dtype(value_dtype).name)
    with atomic_directory(path, stale=_previous_weights) as tmp:
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(hf_config, f, indent=2, sort_keys=True)
        # ``save`` is looked up here at call time, so a test can make the disk fail
        write_sharded(tmp, to_hf_tensors(model, save_dtype), weights_name=SAFE_WEIGHTS,
                      index_name=SAFE_INDEX, max_shard_bytes=max_shard_bytes,
                      metadata={"format": "pt"}, save=save_file)
    return path


def _previous_weights(entry: str) -> bool:
    """Files of an earlier save that a new one replaces even when it does not rewrite them."""
    return entry == "config.json" or entry.startswith("model") and (
        entry.endswith(".safetensors") or entry == SAFE_INDEX)
